//! "Why?": the decision for a user or device and a destination, as `admin explain` gives it:
//! the rule, the posture checks, the device's class and risk.

use std::net::{IpAddr, SocketAddr};

use sekisho_proto::policy::{Policy, Protocol};

use super::*;

#[derive(serde::Deserialize, Default)]
pub struct WhyQuery {
    #[serde(default)]
    user: String,
    #[serde(default)]
    device: String,
    /// `address:port`, an address, an application's name or a DNS name it answers to
    /// (`name:port` too).
    #[serde(default)]
    to: String,
    #[serde(default)]
    protocol: String,
}

/// Where "Why?" asks about.
#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    pub address: IpAddr,
    pub port: u16,
    /// The application's protocol, when `to` named one.
    pub protocol: Option<Protocol>,
    /// An application known by DNS names only: the flow is one to a name of it.
    pub named: Option<String>,
}

/// Where `to` points: an address and port, or the application of that name or answering to
/// that DNS name (its first address, or a name of it; the port given or its first port).
pub fn destination(policy: &Policy, to: &str) -> Result<Destination, String> {
    let to = to.trim();
    let plain = |address: IpAddr, port: u16| Destination {
        address,
        port,
        protocol: None,
        named: None,
    };
    if let Ok(sa) = to.parse::<SocketAddr>() {
        return Ok(plain(sa.ip(), sa.port()));
    }
    if let Ok(ip) = to.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
        return Ok(plain(ip, 0));
    }
    let (name, port) = match to.rsplit_once(':') {
        Some((n, p)) if p.parse::<u16>().is_ok() => (n, p.parse::<u16>().ok()),
        _ => (to, None),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    // An application's own name, else the one the data plane would take for that DNS name
    // (an exact name before the longest wildcard).
    let app = policy
        .applications
        .iter()
        .position(|a| a.name.eq_ignore_ascii_case(&name))
        .map(|i| i as sekisho_proto::policy::AppId)
        .or_else(|| policy.app_for_name(&name))
        .map(|i| &policy.applications[i as usize]);
    let Some(app) = app else {
        return Err(format!(
            "{to:?} is not an address (like 10.20.0.10:5432) nor a name of an application of the policy"
        ));
    };
    let port = port.or(app.ports.first().map(|p| p.0)).unwrap_or(0);
    let protocol = app.protocols.first().copied();
    Ok(match app.networks.first() {
        Some(net) => Destination {
            address: if net.prefix_len() == net.max_prefix_len() {
                net.addr()
            } else {
                net.hosts().next().unwrap_or(net.addr())
            },
            port,
            protocol,
            named: None,
        },
        None => Destination {
            address: IpAddr::from([0, 0, 0, 0]),
            port,
            protocol,
            named: Some(app.name.clone()),
        },
    })
}

fn protocol(text: &str) -> Option<Protocol> {
    match text {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "icmp" => Some(Protocol::Icmp),
        _ => None,
    }
}

pub async fn page(State(ctl): Ctl, s: Session, Query(q): Query<WhyQuery>) -> Response {
    if let Some(r) = not_for_role(&s, &ctl, "POST", "/v1/admin/explain") {
        return r;
    }
    let asked =
        !q.to.trim().is_empty() && (!q.user.trim().is_empty() || !q.device.trim().is_empty());
    let answer: Option<Result<(api::Explanation, String), String>> = if asked {
        let policy = ctl.policy();
        Some(match destination(&policy, &q.to) {
            Err(e) => Err(e),
            Ok(Destination {
                address,
                port,
                protocol: app_protocol,
                named,
            }) => {
                let proto = protocol(&q.protocol)
                    .or(app_protocol)
                    .unwrap_or(Protocol::Tcp);
                let req = api::ExplainRequest {
                    user: Some(q.user.trim().to_string())
                        .filter(|u| !u.is_empty() && q.device.trim().is_empty()),
                    device: Some(q.device.trim().to_string()).filter(|d| !d.is_empty()),
                    address,
                    port,
                    protocol: proto,
                    failing_checks: Vec::new(),
                    risk: None,
                    application: named.clone(),
                };
                let target = match &named {
                    Some(app) => format!("a name of {app}"),
                    None => address.to_string(),
                };
                let shown = format!(
                    "{} {target}{}",
                    format!("{proto:?}").to_ascii_lowercase(),
                    if port == 0 {
                        String::new()
                    } else {
                        format!(" port {port}")
                    }
                );
                let body = json_body(&req);
                match explain(State(ctl.clone()), s.admin(), body).await {
                    Ok(Json(e)) => Ok((e, shown)),
                    Err(e) => Err(e.1),
                }
            }
        })
    } else {
        None
    };
    let users: Vec<String> = ctl.policy().users.iter().map(|u| u.name.clone()).collect();
    let body = html! {
        form.filters method="get" action="/console/why" {
            div {
                label for="user" { "User" }
                input #user name="user" list="user-names" value=(q.user) autocomplete="off";
                datalist #user-names { @for u in &users { option value=(u) {} } }
            }
            div {
                label for="device" { "or device" }
                input #device name="device" value=(q.device) autocomplete="off";
            }
            div {
                label for="to" { "Destination (address:port or name)" }
                input #to name="to" value=(q.to) required placeholder="10.20.0.10:5432";
            }
            div {
                label for="protocol" { "Protocol" }
                select #protocol name="protocol" {
                    option value="" { "the application's" }
                    @for p in ["tcp", "udp", "icmp"] { option value=(p) selected[q.protocol == p] { (p) } }
                }
            }
            button type="submit" { "Explain" }
        }
        @match &answer {
            None => p.muted { "Give a user (their posture assumed passing) or a device (its own posture and risk), and a destination." },
            Some(Err(e)) => p.error role="alert" { (e) },
            Some(Ok((e, shown))) => {
                section #answer aria-label="The decision" {
                    p.verdict class=(format!("decision {}", e.decision.as_str())) {
                        strong { (e.decision.as_str()) } " — " (shown) ": " (e.reason)
                    }
                    dl.facts {
                        dt { "Application" } dd #why-application { (e.application.as_deref().unwrap_or("none (no application covers it)")) }
                        dt { "Rule" } dd #why-rule { (e.rule.as_deref().unwrap_or("none (the default)")) }
                        dt { "Posture" } dd { (e.posture) @if let Some(c) = &e.check { ", failing check " strong { (c) } } }
                        dt { "Checks the rule requires" } dd { @if e.required_checks.is_empty() { "none" } @else { (e.required_checks.join(", ")) } }
                        dt { "Device class" } dd { (e.class) }
                        @if let Some(r) = &e.risk {
                            dt { "Risk" } dd {
                                (r.level.as_str()) " (score " (format!("{:.0}", r.score)) ", " (r.source) ")"
                                @if let Some(resp) = &r.response { "; for this application: " strong { (resp) } }
                                @if !r.reasons.is_empty() {
                                    ul { @for why in &r.reasons { li { (why.signal) ": " (why.detail) " (" (format!("{:.0}", why.score)) " points)" } } }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    s.render("Why?", body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sekisho_proto::policy::Directory;

    fn policy() -> Policy {
        let text = r#"
[[sites]]
name = "dc1"

[[applications]]
name = "db"
site = "dc1"
addresses = ["10.20.0.10"]
protocols = ["tcp"]
ports = [5432]

[[applications]]
name = "net"
site = "dc1"
addresses = ["10.30.0.0/24"]
protocols = ["icmp"]

[[applications]]
name = "wiki"
site = "dc1"
names = ["wiki.corp.example", "*.dev.corp.example"]
protocols = ["tcp"]
ports = [80, 8080]

[[applications]]
name = "build"
site = "dc1"
names = ["build.dev.corp.example"]
protocols = ["tcp"]
ports = [443]
"#;
        Policy::parse_with(std::path::Path::new("p.toml"), text, &Directory::default()).unwrap()
    }

    #[test]
    fn destinations_by_address_or_name() {
        let p = policy();
        let d = destination(&p, "10.20.0.10:5432").unwrap();
        assert_eq!(
            (d.address.to_string(), d.port, d.named),
            ("10.20.0.10".into(), 5432, None)
        );
        let d = destination(&p, "[fd00::1]:443").unwrap();
        assert_eq!((d.address.to_string(), d.port), ("fd00::1".into(), 443));
        assert_eq!(destination(&p, "10.1.2.3").unwrap().port, 0);
        // An application's name: its address and first port and protocol.
        let d = destination(&p, "db").unwrap();
        assert_eq!(
            (d.address.to_string(), d.port, d.protocol),
            ("10.20.0.10".into(), 5432, Some(Protocol::Tcp))
        );
        // A network: its first host.
        assert_eq!(
            destination(&p, "net").unwrap().address.to_string(),
            "10.30.0.1"
        );
        // Known by DNS names only: a flow to a name of it, the port given or its first.
        let d = destination(&p, "wiki.corp.example").unwrap();
        assert_eq!((d.named.as_deref(), d.port), (Some("wiki"), 80));
        let d = destination(&p, "ci.dev.corp.example:8080").unwrap();
        assert_eq!((d.named.as_deref(), d.port), (Some("wiki"), 8080));
        // An exact name wins over a wildcard, as in the data plane, whatever the order.
        let d = destination(&p, "Build.Dev.Corp.Example.").unwrap();
        assert_eq!((d.named.as_deref(), d.port), (Some("build"), 443));
        let e = destination(&p, "evil.example").unwrap_err();
        assert!(e.contains("not an address"), "{e}");
        assert!(
            destination(&p, "dev.corp.example").is_err(),
            "a wildcard is for names below it"
        );
    }
}
