//! What happened: live flow decisions (filtered), DNS blocks per device, the audit log.

use super::*;
use crate::control::console::feed::{Decided, DecisionFilter};

#[derive(serde::Deserialize, Default)]
pub struct DecisionQuery {
    /// "on" when only denials are wanted (an HTML checkbox).
    #[serde(default)]
    denied: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    application: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    page: Option<usize>,
}

impl DecisionQuery {
    fn filter(&self) -> DecisionFilter {
        DecisionFilter {
            denied_only: !self.denied.is_empty(),
            user: self.user.clone(),
            application: self.application.clone(),
            reason: self.reason.clone(),
        }
    }

    fn page(&self) -> usize {
        self.page.unwrap_or(1).max(1)
    }

    fn skip(&self) -> usize {
        (self.page() - 1).saturating_mul(PAGE)
    }
}

fn rows(list: &[Decided]) -> Markup {
    html! {
        @for d in list {
            tr class=(if d.allowed { "allow" } else { "deny" }) {
                td { (when(d.at)) }
                td { @if d.allowed { "allow" } @else { strong { "deny" } } }
                td { (d.user) }
                td { (d.device) }
                td { (d.application.as_deref().unwrap_or("—")) }
                td { (d.proto) " " (d.dst) }
                td { (d.rule.as_deref().unwrap_or("—")) }
                td { (d.reason) @if let Some(c) = &d.check { " (" (c) ")" } @if let Some(r) = &d.risk { " · risk " (r) } }
            }
        }
    }
}

/// The live decisions' table rows alone: the console's script refreshes the table with them.
pub async fn decision_rows(
    State(ctl): Ctl,
    s: Session,
    Query(q): Query<DecisionQuery>,
) -> Response {
    if let Some(r) = not_for_role(&s, &ctl, "GET", "/v1/admin/decisions") {
        return r;
    }
    let (list, _) = ctl.feed().decisions(&q.filter(), q.skip(), PAGE);
    (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        rows(&list).into_string(),
    )
        .into_response()
}

pub async fn decisions(State(ctl): Ctl, s: Session, Query(q): Query<DecisionQuery>) -> Response {
    if let Some(r) = not_for_role(&s, &ctl, "GET", "/v1/admin/decisions") {
        return r;
    }
    let (list, total) = ctl.feed().decisions(&q.filter(), q.skip(), PAGE);
    let forgotten = ctl.feed().forgotten().decisions;
    let body = html! {
        form.filters method="get" action="/console/decisions" role="search" {
            div.check {
                input #denied type="checkbox" name="denied" checked[!q.denied.is_empty()];
                label for="denied" { "Denied only" }
            }
            div { label for="user" { "User" } input #user name="user" value=(q.user); }
            div { label for="application" { "Application" } input #application name="application" value=(q.application); }
            div { label for="reason" { "Reason contains" } input #reason name="reason" value=(q.reason); }
            button type="submit" { "Filter" }
        }
        p.muted { "The newest first, refreshed every few seconds; the last " (feed::DECISIONS)
            " decisions of this broker (" (forgotten) " older ones dropped from this view; the decision log and the SIEM keep every one)." }
        div.scroll {
        table #decision-table data-live=(if q.page() == 1 { "/console/decisions/rows" } else { "" }) {
            thead { tr {
                th scope="col" { "Time" } th scope="col" { "Decision" } th scope="col" { "User" } th scope="col" { "Device" }
                th scope="col" { "Application" } th scope="col" { "Destination" } th scope="col" { "Rule" } th scope="col" { "Reason" }
            } }
            tbody aria-live="polite" { (rows(&list)) }
        }
        }
        (pager("/console/decisions", &[("denied", &q.denied), ("user", &q.user), ("application", &q.application), ("reason", &q.reason)], q.page(), total))
    };
    s.render("Live decisions", body)
}

pub async fn dns(State(ctl): Ctl, s: Session, Query(q): Query<ListQuery>) -> Response {
    if let Some(r) = not_for_role(&s, &ctl, "GET", "/v1/admin/dns-blocks") {
        return r;
    }
    let all = ctl.feed().dns_blocks();
    let matching: Vec<_> = all
        .iter()
        .filter(|(d, p)| {
            q.matches(&[
                d,
                &p.dns_blocks.keys().cloned().collect::<Vec<_>>().join(" "),
            ])
        })
        .collect();
    let total = matching.len();
    let body = html! {
        p.muted { "Names each device's DNS filter blocked, counted per category since this broker started. The names themselves stay on the device." }
        (search("/console/dns", "Find (device or category)", &q.q))
        table #dns-table {
            thead { tr { th scope="col" { "Device" } th scope="col" { "Blocked, by category" } th scope="col" { "In all" } th scope="col" { "Last block reported" } } }
            tbody { @for (device, p) in matching.iter().skip(q.skip()).take(PAGE) {
                tr {
                    td { a href=(format!("/console/devices/{}", seg(device))) { (device) } }
                    td { (p.dns_blocks.iter().map(|(c, n)| format!("{c}: {n}")).collect::<Vec<_>>().join(", ")) }
                    td.num { (p.dns_blocks.values().sum::<u64>()) }
                    td { (p.last_block.map(when).unwrap_or_default()) }
                }
            } }
        }
        @if all.is_empty() { p.muted { "No device reported a blocked name." } }
        (pager("/console/dns", &[("q", &q.q)], q.page(), total))
    };
    s.render("DNS blocks", body)
}

pub async fn audit(State(ctl): Ctl, s: Session, Query(q): Query<ListQuery>) -> Response {
    if let Some(r) = not_for_role(&s, &ctl, "GET", "/v1/admin/audit") {
        return r;
    }
    // Admin and SCIM tokens are the admin role's alone, even to list: their lines too.
    let tokens = s.may("GET", "/v1/admin/admin-tokens");
    let (lines, total) = ctl.feed().audit_lines(&q.q, tokens, q.skip(), PAGE);
    let body = html! {
        p.muted { "Every change and refusal through this broker's control plane, newest first (the last "
            (feed::AUDIT_LINES) "; the audit log file and the SIEM keep every one)." }
        (search("/console/audit", "Find (event, admin, device…)", &q.q))
        div.scroll {
        table #audit-table {
            thead { tr { th scope="col" { "Time" } th scope="col" { "Event" } th scope="col" { "By" } th scope="col" { "Detail" } } }
            tbody { @for l in &lines {
                tr {
                    td { (l["ts"].as_str().unwrap_or("")) }
                    td { (l["event"].as_str().unwrap_or("")) }
                    td { (l["actor"].as_str().unwrap_or("")) }
                    td { code { (l["detail"].to_string()) } }
                }
            } }
        }
        }
        (pager("/console/audit", &[("q", &q.q)], q.page(), total))
    };
    s.render("Audit log", body)
}
