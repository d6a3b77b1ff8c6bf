//! The overview: brokers, connectors, devices online, the last hour as charts, top denials.

use super::*;
use crate::control::console::chart;
use crate::control::console::feed::{Sample, rates};

pub async fn page(State(ctl): Ctl, s: Session) -> Response {
    // Helpdesk sees devices only.
    if !s.may("GET", "/v1/admin/connectors") {
        return see_other("/console/devices");
    }
    let view = ctl.dp.view().await;
    let brokers = ctl
        .brokers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let connectors = match ctl.store.connectors().await {
        Ok(c) => c,
        Err(e) => return api_failure(&s, e.into()),
    };
    let samples = ctl.feed().samples();
    let now = now_unix();
    let online = view.peers.iter().filter(|p| online(p)).count();
    let series = |f: fn(&Sample) -> u64| rates(&samples, f);
    let bits: Vec<(u64, f64)> = series(|s| s.bytes)
        .into_iter()
        .map(|(t, v)| (t, v * 8.0))
        .collect();
    let decided: Vec<(u64, f64)> = series(|s| s.allowed + s.denied);
    let peers: Vec<(u64, f64)> = samples.iter().map(|s| (s.at, s.peers as f64)).collect();
    let flows: Vec<(u64, f64)> = samples.iter().map(|s| (s.at, s.flows as f64)).collect();
    let denials = ctl.feed().top_denials(8);
    let active = connectors.iter().filter(|c| c.revoked_at.is_none()).count();
    let body = html! {
        section.cards aria-label="Totals" {
            div.card { span.big { (online) } " devices online" }
            div.card { span.big { (view.flows) } " open flows" }
            div.card { span.big { (brokers.len()) } " brokers" }
            div.card { span.big { (view.connectors.len()) } " connector links of " (active) " connectors" }
        }
        section aria-labelledby="charts" {
            h2 #charts { "The last hour (this broker)" }
            div.charts {
                (chart::line("chart-decisions", "Flow decisions per second", "/s", &decided, now, 3600))
                (chart::line("chart-throughput", "Throughput", "bit/s", &bits, now, 3600))
                (chart::line("chart-flows", "Open flows", "", &flows, now, 3600))
                (chart::line("chart-peers", "Devices connected", "", &peers, now, 3600))
            }
        }
        section aria-labelledby="brokers" {
            h2 #brokers { "Brokers" }
            table #broker-table {
                thead { tr { th scope="col" { "Name" } th scope="col" { "Devices connect to" } th scope="col" { "API" } th scope="col" { "" } } }
                tbody {
                    @for b in &brokers {
                        tr {
                            td { (b.name) }
                            td { (b.wireguard_endpoint) }
                            td { (b.api_url) }
                            td { @if b.public_key == ctl.broker_key { "this broker" } }
                        }
                    }
                }
            }
        }
        section aria-labelledby="links" {
            h2 #links { "Connector links of this broker" }
            @if view.connectors.is_empty() {
                p.muted { "No connector is linked to this broker." }
            } @else {
                table #link-table {
                    thead { tr { th scope="col" { "Connector" } th scope="col" { "Site" } th scope="col" { "State" } th scope="col" { "Open flows" } th scope="col" { "Unreachable" } } }
                    tbody {
                        @for l in &view.connectors {
                            tr {
                                td { (l.connector) }
                                td { (l.site) }
                                td { span class=(format!("state {}", l.state.as_str())) { (l.state.as_str()) } }
                                td.num { (l.flows) }
                                td { (l.unreachable.join(", ")) }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="denials" {
            h2 #denials { "Top denial reasons (since this broker started)" }
            @if denials.is_empty() {
                p.muted { "No flow was denied." }
            } @else {
                table #denial-table {
                    thead { tr { th scope="col" { "Reason" } th scope="col" { "Flows" } } }
                    tbody {
                        @for (reason, n) in &denials {
                            tr {
                                td { a href=(format!("/console/decisions?denied=on&reason={}", seg(reason))) { (reason) } }
                                td.num { (n) }
                            }
                        }
                    }
                }
            }
        }
    };
    s.render("Overview", body)
}
