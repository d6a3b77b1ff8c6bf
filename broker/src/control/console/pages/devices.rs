//! Devices: who owns them, their posture, risk and class, last sign-in; revoke, set the class.

use std::collections::HashMap;

use sekisho_proto::broker::PeerInfo;
use sekisho_proto::policy::DeviceClass;
use sekisho_proto::risk::{Assessment, Level};

use super::*;
use crate::store::DeviceRecord;

#[derive(serde::Deserialize, Default)]
pub struct DeviceQuery {
    #[serde(default)]
    q: String,
    /// `active` (default), `revoked` or `all`.
    #[serde(default)]
    state: String,
    /// Only devices failing this posture check.
    #[serde(default)]
    failing: String,
    /// Only devices at this risk level or above (`medium`, `high`).
    #[serde(default)]
    risk: String,
    #[serde(default)]
    page: Option<usize>,
}

/// What the console knows of a device's posture: the checks it last reported failing (to this
/// control plane), else those of its token at this broker's data plane.
fn failing_checks(ctl: &Control, d: &DeviceRecord, peer: Option<&PeerInfo>) -> Option<Vec<String>> {
    if let Some(p) = ctl.feed().posture_of(&d.name) {
        return Some(
            p.checks
                .iter()
                .filter(|(_, ok)| !**ok)
                .map(|(n, _)| n.clone())
                .collect(),
        );
    }
    peer.filter(|p| p.posture_expires.is_some())
        .map(|p| p.failing_checks.clone())
}

fn risk_of(ctl: &Control, d: &DeviceRecord) -> Option<Assessment> {
    ctl.risk.get().map(|r| r.assess(&d.name, &d.user))
}

/// Whether the role may see posture, risk and sign-in details, which the API gives through
/// `explain` (helpdesk lists and revokes devices; it does not get these).
fn sees_details(s: &Session) -> bool {
    s.may("POST", "/v1/admin/explain")
}

fn level_badge(level: Level) -> Markup {
    html! { span class=(format!("risk {}", level.as_str())) { (level.as_str()) } }
}

pub async fn list(State(ctl): Ctl, s: Session, Query(q): Query<DeviceQuery>) -> Response {
    if let Some(r) = not_for_role(&s, &ctl, "GET", "/v1/admin/devices") {
        return r;
    }
    let devices = match ctl.store.devices().await {
        Ok(d) => d,
        Err(e) => return api_failure(&s, e.into()),
    };
    let view = ctl.dp.view().await;
    let peers: HashMap<&str, &PeerInfo> =
        view.peers.iter().map(|p| (p.device.as_str(), p)).collect();
    let list = ListQuery {
        q: q.q.clone(),
        page: q.page,
    };
    let details = sees_details(&s);
    let min_risk = match q.risk.as_str() {
        "medium" if details => Some(Level::Medium),
        "high" if details => Some(Level::High),
        _ => None,
    };
    let failing = if details { q.failing.trim() } else { "" };
    let matching: Vec<&DeviceRecord> = devices
        .iter()
        .filter(|d| match q.state.as_str() {
            "revoked" => d.revoked_at.is_some(),
            "all" => true,
            _ => d.revoked_at.is_none(),
        })
        .filter(|d| list.matches(&[&d.name, &d.user, &d.address.to_string()]))
        .filter(|d| {
            failing.is_empty()
                || failing_checks(&ctl, d, peers.get(d.name.as_str()).copied())
                    .is_some_and(|f| f.iter().any(|c| c.eq_ignore_ascii_case(failing)))
        })
        .filter(|d| min_risk.is_none_or(|m| risk_of(&ctl, d).is_some_and(|a| a.level >= m)))
        .collect();
    let total = matching.len();
    let checks: Vec<String> = ctl
        .policy()
        .posture_checks
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let may_revoke =
        |d: &DeviceRecord| s.may("POST", &format!("/v1/admin/devices/{}/revoke", d.name));
    let body = html! {
        form.filters method="get" action="/console/devices" role="search" {
            div {
                label for="q" { "Find (device, user or address)" }
                input #q type="search" name="q" value=(q.q);
            }
            @if details {
            div {
                label for="failing" { "Failing the check" }
                select #failing name="failing" {
                    option value="" { "any posture" }
                    @for c in &checks {
                        option value=(c) selected[c.eq_ignore_ascii_case(failing)] { (c) }
                    }
                }
            }
            div {
                label for="risk" { "Risk" }
                select #risk name="risk" {
                    option value="" { "any" }
                    option value="medium" selected[q.risk == "medium"] { "medium or high" }
                    option value="high" selected[q.risk == "high"] { "high" }
                }
            }
            }
            div {
                label for="state" { "State" }
                select #state name="state" {
                    option value="active" { "active" }
                    option value="revoked" selected[q.state == "revoked"] { "revoked" }
                    option value="all" selected[q.state == "all"] { "all" }
                }
            }
            button type="submit" { "Show" }
        }
        div.scroll {
        table #device-table {
            thead { tr {
                th scope="col" { "Device" } th scope="col" { "User" } th scope="col" { "Address" }
                th scope="col" { "Class" } th scope="col" { "Online" }
                @if details { th scope="col" { "Posture" } th scope="col" { "Risk" } }
                th scope="col" { "Actions" }
            } }
            tbody {
                @for d in matching.iter().skip(list.skip()).take(PAGE) {
                    @let peer = peers.get(d.name.as_str()).copied();
                    @let fails = failing_checks(&ctl, d, peer);
                    tr data-device=(d.name) {
                        td { a href=(format!("/console/devices/{}", seg(&d.name))) { (d.name) } }
                        td { (d.user) }
                        td { (d.address) }
                        td { (d.class.as_str()) }
                        td { @if peer.is_some_and(online) { "online" } @else { "—" } }
                        @if details {
                            td.posture { @match &fails {
                                None => span.muted { "no report" },
                                Some(f) if f.is_empty() => "passes",
                                Some(f) => span.state.stale { "fails " (f.join(", ")) },
                            } }
                            td { @if let Some(a) = risk_of(&ctl, d) { (level_badge(a.level)) } }
                        }
                        td {
                            @if d.revoked_at.is_some() { "revoked" }
                            @else if may_revoke(d) {
                                (button(&s, &format!("/console/devices/{}/revoke", seg(&d.name)), &format!("Revoke {}", d.name), "danger"))
                            }
                        }
                    }
                }
            }
        }
        }
        (pager("/console/devices", &[("q", &q.q), ("failing", &q.failing), ("risk", &q.risk), ("state", &q.state)], list.page(), total))
    };
    s.render("Devices", body)
}

pub async fn detail(State(ctl): Ctl, s: Session, UrlPath(name): UrlPath<String>) -> Response {
    if let Some(r) = not_for_role(&s, &ctl, "GET", "/v1/admin/devices") {
        return r;
    }
    let devices = match ctl.store.devices().await {
        Ok(d) => d,
        Err(e) => return api_failure(&s, e.into()),
    };
    let Some(d) = devices.into_iter().find(|d| d.name == name) else {
        return failure(&s, StatusCode::NOT_FOUND, &format!("no device {name:?}"));
    };
    let view = ctl.dp.view().await;
    let peer = view.peers.iter().find(|p| p.device == d.name);
    let posture = ctl.feed().posture_of(&d.name);
    let signed_in = ctl.store.device_signed_in_at(&d.name).await.ok().flatten();
    let details = sees_details(&s);
    let risk = risk_of(&ctl, &d);
    let revoke = format!("/v1/admin/devices/{}/revoke", d.name);
    let class = format!("/v1/admin/devices/{}/class", d.name);
    let body = html! {
        dl.facts {
            dt { "User" } dd { (d.user) }
            dt { "Address" } dd { (d.address) }
            dt { "Class" } dd #class { (d.class.as_str()) }
            dt { "Enrolled" } dd { (when(d.created_at)) }
            @if details {
                dt { "Last sign-in" } dd { @match signed_in { Some(t) => (when(t)), None => "never through the identity provider" } }
            }
            dt { "State" } dd { @if let Some(t) = d.revoked_at { "revoked " (when(t)) } @else { "active" } }
            dt { "Tunnel" } dd { @match peer.and_then(|p| p.seconds_since_handshake) {
                Some(t) => { "last handshake " (t) " s ago" @if details { @if let Some(e) = peer.and_then(|p| p.endpoint) { " from " (e) } } },
                None => "not connected to this broker",
            } }
        }
        @if details {
        h2 { "Posture" }
        @match &posture {
            Some(p) => {
                p { "Last report " (when(p.at)) "." }
                table #posture-table {
                    thead { tr { th scope="col" { "Check" } th scope="col" { "Result" } } }
                    tbody { @for (check, ok) in &p.checks {
                        tr { td { (check) } td { @if *ok { "passes" } @else { span.state.stale { "fails" } } } }
                    } }
                }
            }
            None => {
                @match peer.filter(|p| p.posture_expires.is_some()) {
                    Some(p) if p.failing_checks.is_empty() => p { "Its posture token passes every check." },
                    Some(p) => p { "Its posture token fails: " (p.failing_checks.join(", ")) },
                    None => p.muted { "No posture report reached this broker since it started." },
                }
            }
        }
        h2 { "Risk" }
        @match &risk {
            Some(a) => {
                p { "Level " (level_badge(a.level)) ", score " (format!("{:.0}", a.score)) "." }
                @if a.reasons.is_empty() { p.muted { "Nothing is held against this device." } }
                @else {
                    table #risk-table {
                        thead { tr { th scope="col" { "Signal" } th scope="col" { "Why" } th scope="col" { "Points now" } th scope="col" { "Seen" } } }
                        tbody { @for r in &a.reasons {
                            tr { td { (r.signal.as_str()) } td { (r.detail) } td.num { (format!("{:.0}", r.score)) } td { (when(r.at)) } }
                        } }
                    }
                }
            }
            None => p.muted { "The risk engine is not running." },
        }
        p { a href=(format!("/console/why?device={}", seg(&d.name))) { "Why can or can't this device reach something?" } }
        }
        @if d.revoked_at.is_none() {
            h2 { "Actions" }
            @if s.may("POST", &class) {
                form method="post" action=(format!("/console/devices/{}/class", seg(&d.name))) {
                    (s.csrf_field())
                    label for="new-class" { "Class" }
                    select #new-class name="class" {
                        option value="managed" selected[d.class == DeviceClass::Managed] { "managed" }
                        option value="personal" selected[d.class == DeviceClass::Personal] { "personal" }
                    }
                    button type="submit" { "Set the class" }
                }
            }
            @if s.may("POST", &revoke) {
                (button(&s, &format!("/console/devices/{}/revoke", seg(&d.name)), &format!("Revoke {}", d.name), "danger"))
                p.muted { "Revoking cuts the device's tunnel and flows at once; it must enroll again." }
            }
        }
    };
    s.render(&format!("Device {}", d.name), body)
}

pub async fn revoke(
    State(ctl): Ctl,
    UrlPath(name): UrlPath<String>,
    Posted(s, Nothing {}): Posted<Nothing>,
) -> Response {
    if let Err(r) = s.require(&ctl, "POST", &format!("/v1/admin/devices/{name}/revoke")) {
        return r;
    }
    match revoke_device(State(ctl.clone()), s.admin(), UrlPath(name)).await {
        Ok(Json(done)) => s.done("/console/devices", &format!("{}.", done.done)),
        Err(e) => api_failure(&s, e),
    }
}

#[derive(serde::Deserialize)]
pub struct ClassForm {
    class: DeviceClass,
}

pub async fn set_class(
    State(ctl): Ctl,
    UrlPath(name): UrlPath<String>,
    Posted(s, f): Posted<ClassForm>,
) -> Response {
    if let Err(r) = s.require(&ctl, "POST", &format!("/v1/admin/devices/{name}/class")) {
        return r;
    }
    let body = json_body(&api::SetDeviceClass { class: f.class });
    let back = format!("/console/devices/{}", seg(&name));
    match set_device_class(State(ctl.clone()), s.admin(), UrlPath(name), body).await {
        Ok(Json(done)) => s.done(&back, &format!("{}.", done.done)),
        Err(e) => api_failure(&s, e),
    }
}
