//! Records in the Open Cybersecurity Schema Framework's shape (OCSF 1.1), as SIEMs expect
//! them: flows and flow decisions as Network Activity (4001), DNS as DNS Activity (4003),
//! sign-ins as Authentication (3002), user and group changes as Account Change (3001), other
//! control-plane calls as API Activity (6003), posture as Device Config State Change (5019).
//! What OCSF has no field for (the deciding rule, the reason, the failing check, the
//! application's sensitivity) goes under `unmapped`. Pure: records and time in, JSON out.

use std::net::IpAddr;

use serde_json::{Map, Value, json};

use crate::broker::{AppDnsRecord, DecisionRecord, FlowRecord, PostureRecord, SummaryRecord};
use crate::flow::FlowEnd;
use crate::policy::Action;

/// The OCSF schema version these records follow.
pub const VERSION: &str = "1.1.0";

/// Which Sekisho program wrote a record (OCSF `metadata.product.feature.name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observer {
    Broker,
    Client,
    Connector,
}

impl Observer {
    fn name(self) -> &'static str {
        match self {
            Observer::Broker => "broker",
            Observer::Client => "client",
            Observer::Connector => "connector",
        }
    }
}

fn base(class_uid: u32, activity_id: u32, activity: &str, time_ms: u64, by: Observer) -> Value {
    let category_uid = class_uid / 1000;
    json!({
        "class_uid": class_uid,
        "category_uid": category_uid,
        "activity_id": activity_id,
        "activity_name": activity,
        "type_uid": class_uid as u64 * 100 + activity_id as u64,
        "time": time_ms,
        "severity_id": 1,
        "severity": "Informational",
        "metadata": {
            "version": VERSION,
            "product": {
                "name": "Sekisho",
                "vendor_name": "Sekisho",
                "version": env!("CARGO_PKG_VERSION"),
                "feature": {"name": by.name()},
            },
        },
    })
}

fn set(v: &mut Value, key: &str, value: Value) {
    if let Value::Object(m) = v {
        m.insert(key.to_string(), value);
    }
}

/// `unmapped`: Sekisho's own fields, without the empty ones.
fn unmapped(fields: &[(&str, Value)]) -> Value {
    let mut m = Map::new();
    for (k, v) in fields {
        if !v.is_null() {
            m.insert(k.to_string(), v.clone());
        }
    }
    Value::Object(m)
}

fn protocol_num(name: &str) -> u8 {
    match name {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" => 58,
        _ => 0,
    }
}

fn endpoint(ip: IpAddr, port: u16) -> Value {
    if port == 0 {
        json!({"ip": ip})
    } else {
        json!({"ip": ip, "port": port})
    }
}

fn connection(proto: &str) -> Value {
    // The device opened the flow: outbound from it.
    json!({"protocol_name": proto, "protocol_num": protocol_num(proto),
        "direction": "Outbound", "direction_id": 2})
}

/// Where a flow went, seen from the device that opened it.
struct Ends<'a> {
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    proto: &'a str,
}

/// What every traffic record has: times, endpoints, traffic each way, why it was written.
fn traffic_record(ends: Ends<'_>, r: &FlowReportTimes, time_ms: u64, by: Observer) -> Value {
    let (activity_id, activity) = match r.end {
        FlowEnd::Ongoing | FlowEnd::Aggregate => (6, "Traffic"),
        FlowEnd::Cut => (3, "Reset"),
        _ => (2, "Close"),
    };
    let t = r.traffic;
    let mut v = base(4001, activity_id, activity, time_ms, by);
    set(&mut v, "start_time", json!(r.start_ms));
    set(&mut v, "end_time", json!(r.end_ms));
    set(&mut v, "duration", json!(r.duration_ms));
    set(&mut v, "src_endpoint", endpoint(ends.src, ends.sport));
    set(&mut v, "dst_endpoint", endpoint(ends.dst, ends.dport));
    set(&mut v, "connection_info", connection(ends.proto));
    set(
        &mut v,
        "traffic",
        json!({"bytes_out": t.bytes_out, "packets_out": t.packets_out,
            "bytes_in": t.bytes_in, "packets_in": t.packets_in,
            "bytes": t.bytes_out + t.bytes_in, "packets": t.packets_out + t.packets_in}),
    );
    v
}

/// The traffic and times of a flow record, whichever side wrote it.
struct FlowReportTimes {
    traffic: crate::flow::Traffic,
    start_ms: u64,
    end_ms: u64,
    duration_ms: u64,
    end: FlowEnd,
}

/// A flow's traffic record at the broker (when it ends, and while it runs).
pub fn flow(r: &FlowRecord, time_ms: u64, by: Observer) -> Value {
    let ends = Ends {
        src: r.src,
        sport: r.sport,
        dst: r.dst,
        dport: r.dport,
        proto: r.proto,
    };
    let times = FlowReportTimes {
        traffic: r.traffic,
        start_ms: r.start_ms,
        end_ms: r.end_ms,
        duration_ms: r.duration_ms,
        end: r.end,
    };
    let mut v = traffic_record(ends, &times, time_ms, by);
    set(&mut v, "actor", json!({"user": {"name": r.meta.user}}));
    set(&mut v, "device", json!({"name": r.meta.device}));
    set(&mut v, "disposition", json!("Allowed"));
    set(&mut v, "disposition_id", json!(1));
    set(
        &mut v,
        "unmapped",
        unmapped(&[
            ("application", json!(r.meta.application)),
            ("site", json!(r.meta.site)),
            ("rule", json!(r.meta.rule)),
            ("sensitivity", json!(r.meta.sensitivity)),
            ("end", json!(r.end)),
            ("flows", json!(r.flows)),
            ("risk", json!(r.meta.risk)),
        ]),
    );
    v
}

/// A flow record a laptop made of its own side (no policy names: the broker's record has them).
pub fn client_flow(
    report: &crate::flow::FlowReport,
    device: &str,
    user: &str,
    time_ms: u64,
) -> Value {
    let k = report.key;
    let ends = Ends {
        src: k.src,
        sport: k.sport,
        dst: k.dst,
        dport: k.dport,
        proto: k.proto_name(),
    };
    let times = FlowReportTimes {
        traffic: report.traffic,
        start_ms: report.start_ms,
        end_ms: report.end_ms,
        duration_ms: report.duration_ms,
        end: report.end,
    };
    let mut v = traffic_record(ends, &times, time_ms, Observer::Client);
    set(&mut v, "actor", json!({"user": {"name": user}}));
    set(&mut v, "device", json!({"name": device}));
    set(&mut v, "unmapped", unmapped(&[("end", json!(report.end))]));
    v
}

/// A flow decision: allowed (Open) or denied (Refuse), with the rule and reason.
pub fn decision(r: &DecisionRecord, time_ms: u64) -> Value {
    let allowed = r.decision == Action::Allow;
    let (activity_id, activity) = if allowed { (1, "Open") } else { (5, "Refuse") };
    let mut v = base(4001, activity_id, activity, time_ms, Observer::Broker);
    set(&mut v, "src_endpoint", endpoint(r.src, r.sport));
    set(&mut v, "dst_endpoint", endpoint(r.dst, r.dport));
    set(&mut v, "connection_info", connection(r.proto));
    set(&mut v, "actor", json!({"user": {"name": r.user}}));
    set(&mut v, "device", json!({"name": r.device}));
    set(
        &mut v,
        "disposition",
        json!(if allowed { "Allowed" } else { "Blocked" }),
    );
    set(&mut v, "disposition_id", json!(if allowed { 1 } else { 2 }));
    if !allowed {
        set(&mut v, "severity_id", json!(2));
        set(&mut v, "severity", json!("Low"));
    }
    set(
        &mut v,
        "unmapped",
        unmapped(&[
            ("application", json!(r.application)),
            ("site", json!(r.site)),
            ("rule", json!(r.rule)),
            ("reason", json!(r.reason)),
            ("check", json!(r.check)),
            ("risk", json!(r.risk)),
        ]),
    );
    v
}

/// A device's risk level changed (the risk engine's view): an OCSF Detection Finding with
/// the level, the score and the reasons.
pub fn risk(r: &crate::risk::RiskRecord, time_ms: u64) -> Value {
    let activity = if r.previous.is_none() {
        (1, "Create")
    } else {
        (2, "Update")
    };
    let mut v = base(2004, activity.0, activity.1, time_ms, Observer::Broker);
    let (level_id, severity_id, severity) = match r.level {
        crate::risk::Level::Low => (1, 1, "Informational"),
        crate::risk::Level::Medium => (2, 3, "Medium"),
        crate::risk::Level::High => (3, 4, "High"),
    };
    set(&mut v, "severity_id", json!(severity_id));
    set(&mut v, "severity", json!(severity));
    set(&mut v, "risk_level_id", json!(level_id));
    set(&mut v, "risk_level", json!(r.level.as_str()));
    set(&mut v, "risk_score", json!(r.score.round() as i64));
    set(&mut v, "actor", json!({"user": {"name": r.user}}));
    set(&mut v, "device", json!({"name": r.device}));
    set(
        &mut v,
        "finding_info",
        json!({
            "uid": format!("risk:{}:{}", r.device, time_ms),
            "title": format!("risk of {} is {}", r.device, r.level.as_str()),
            "types": r.reasons.iter().map(|x| x.signal).collect::<Vec<_>>(),
        }),
    );
    set(
        &mut v,
        "unmapped",
        unmapped(&[
            ("previous", json!(r.previous)),
            ("reasons", json!(r.reasons)),
        ]),
    );
    v
}

/// Decisions of one device summed up instead of logged one by one.
pub fn summary(r: &SummaryRecord, time_ms: u64) -> Value {
    let mut v = base(4001, 99, "Other", time_ms, Observer::Broker);
    set(&mut v, "actor", json!({"user": {"name": r.user}}));
    set(&mut v, "device", json!({"name": r.device}));
    set(&mut v, "count", json!(r.allowed + r.denied));
    set(
        &mut v,
        "unmapped",
        unmapped(&[
            ("summary", json!(true)),
            ("allowed", json!(r.allowed)),
            ("denied", json!(r.denied)),
            ("seconds", json!(r.seconds)),
        ]),
    );
    v
}

/// An application name asked through the tunnel (the broker's view).
pub fn app_dns(r: &AppDnsRecord, time_ms: u64) -> Value {
    let mut v = base(4003, 1, "Query", time_ms, Observer::Broker);
    set(&mut v, "query", json!({"hostname": r.name}));
    set(&mut v, "actor", json!({"user": {"name": r.user}}));
    set(&mut v, "device", json!({"name": r.device}));
    if let Some(a) = r.address {
        set(&mut v, "answers", json!([{"rdata": a.to_string()}]));
    }
    let (rcode_id, rcode) = if r.result == "synthetic" {
        (0, "NoError")
    } else {
        (3, "NXDomain")
    };
    set(&mut v, "rcode_id", json!(rcode_id));
    set(&mut v, "rcode", json!(rcode));
    set(
        &mut v,
        "unmapped",
        unmapped(&[
            ("result", json!(r.result)),
            ("application", json!(r.application)),
        ]),
    );
    v
}

/// A name the laptop's DNS stub answered (`entry` is its DNS log line: name, qtype, action,
/// list/category when blocked, answers).
pub fn client_dns(entry: &Value, device: &str, user: &str, time_ms: u64) -> Value {
    let mut v = base(4003, 1, "Query", time_ms, Observer::Client);
    let field = |k: &str| entry.get(k).cloned().unwrap_or(Value::Null);
    set(
        &mut v,
        "query",
        json!({"hostname": field("name"), "type": field("qtype")}),
    );
    set(&mut v, "actor", json!({"user": {"name": user}}));
    set(&mut v, "device", json!({"name": device}));
    if let Some(r) = entry.get("rcode") {
        set(&mut v, "rcode", r.clone());
    }
    let blocked = entry
        .get("action")
        .and_then(Value::as_str)
        .is_some_and(|a| a.starts_with("block"));
    set(
        &mut v,
        "disposition",
        json!(if blocked { "Blocked" } else { "Allowed" }),
    );
    set(&mut v, "disposition_id", json!(if blocked { 2 } else { 1 }));
    let mut rest = Map::new();
    if let Value::Object(m) = entry {
        for (k, val) in m {
            if !matches!(k.as_str(), "name" | "qtype" | "ts" | "event") {
                rest.insert(k.clone(), val.clone());
            }
        }
    }
    set(&mut v, "unmapped", Value::Object(rest));
    v
}

/// A posture token accepted, refused or expired at a broker.
pub fn posture(r: &PostureRecord, time_ms: u64) -> Value {
    let mut v = base(5019, 99, "Other", time_ms, Observer::Broker);
    set(&mut v, "actor", json!({"user": {"name": r.user}}));
    set(&mut v, "device", json!({"name": r.device}));
    set(&mut v, "status", json!(r.result));
    if r.result == "refused" {
        set(&mut v, "severity_id", json!(3));
        set(&mut v, "severity", json!("Medium"));
    }
    set(
        &mut v,
        "unmapped",
        unmapped(&[
            ("result", json!(r.result)),
            ("reason", json!(r.reason)),
            ("failing_checks", json!(r.failing_checks)),
            ("expires", json!(r.exp)),
        ]),
    );
    v
}

/// What a connector refused of a broker's asks (outside its own allowlist): a Network
/// Activity refusal seen by the connector.
pub fn connector_refusal(detail: &Value, time_ms: u64) -> Value {
    let mut v = base(4001, 5, "Refuse", time_ms, Observer::Connector);
    set(&mut v, "disposition", json!("Blocked"));
    set(&mut v, "disposition_id", json!(2));
    set(&mut v, "severity_id", json!(3));
    set(&mut v, "severity", json!("Medium"));
    set(&mut v, "unmapped", detail.clone());
    v
}

/// What kind of SIEM record a control-plane audit event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    /// A posture refresh (the device's pass/fail per check).
    Posture,
    /// Who came in: enrollments, sign-ins, refused admin calls, override codes used.
    Audit,
    /// What admins (and SCIM) changed.
    Admin,
}

/// The kind of an audit event by its name.
pub fn audit_kind(event: &str) -> AuditKind {
    match event {
        "posture" => AuditKind::Posture,
        "enroll_device" | "enroll_connector" | "sign_in" | "admin_sign_in" | "admin_refused"
        | "scim_refused" | "override_used" | "connector_renewed" => AuditKind::Audit,
        _ => AuditKind::Admin,
    }
}

/// A control-plane audit event (`audit.jsonl`): `event`, `actor`, and its details.
pub fn audit(event: &str, actor: &str, detail: &Value, time_ms: u64) -> Value {
    let result = detail.get("result").and_then(Value::as_str).unwrap_or("");
    let refused = result == "refused" || event.ends_with("_refused");
    let mut v = match event {
        "sign_in" | "admin_sign_in" | "enroll_device" | "enroll_connector" => {
            let mut v = base(3002, 1, "Logon", time_ms, Observer::Broker);
            set(
                &mut v,
                "auth_protocol",
                json!(if event.contains("sign_in") {
                    "OpenID Connect"
                } else {
                    "Sekisho enrollment token"
                }),
            );
            set(&mut v, "user", json!({"name": actor}));
            set(&mut v, "is_mfa", Value::Null);
            v
        }
        e if e.starts_with("user_")
            || e.starts_with("group_")
            || e.starts_with("scim_user")
            || e.starts_with("scim_group") =>
        {
            let (id, name) = if e.ends_with("created") {
                (1, "Create")
            } else if e.ends_with("enabled") {
                (2, "Enable")
            } else if e.ends_with("disabled") {
                (5, "Disable")
            } else if e.ends_with("deleted") {
                (6, "Delete")
            } else {
                (99, "Other")
            };
            let mut v = base(3001, id, name, time_ms, Observer::Broker);
            set(&mut v, "actor", json!({"user": {"name": actor}}));
            v
        }
        "posture" => {
            let mut v = base(5019, 99, "Other", time_ms, Observer::Broker);
            set(&mut v, "actor", json!({"user": {"name": actor}}));
            v
        }
        _ => {
            let mut v = base(6003, 99, "Other", time_ms, Observer::Broker);
            set(&mut v, "actor", json!({"user": {"name": actor}}));
            set(&mut v, "api", json!({"operation": event}));
            v
        }
    };
    set(
        &mut v,
        "status",
        json!(if refused { "Failure" } else { "Success" }),
    );
    set(&mut v, "status_id", json!(if refused { 2 } else { 1 }));
    if refused {
        set(&mut v, "severity_id", json!(3));
        set(&mut v, "severity", json!("Medium"));
        if let Some(r) = detail.get("reason") {
            set(&mut v, "status_detail", r.clone());
        }
    }
    set(
        &mut v,
        "message",
        json!(format!(
            "{event} by {actor}{}",
            if refused { " (refused)" } else { "" }
        )),
    );
    set(
        &mut v,
        "unmapped",
        json!({"event": event, "detail": detail}),
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::FlowMeta;
    use crate::flow::{FlowReport, Traffic};
    use crate::packet::FlowKey;
    use std::sync::Arc;

    fn key() -> FlowKey {
        FlowKey {
            src: "100.118.0.2".parse().unwrap(),
            dst: "10.20.0.10".parse().unwrap(),
            sport: 40000,
            dport: 80,
            proto: 6,
        }
    }

    fn report(end: FlowEnd) -> FlowReport {
        FlowReport {
            key: key(),
            traffic: Traffic {
                packets_out: 10,
                bytes_out: 800,
                packets_in: 20,
                bytes_in: 20_000,
            },
            start_ms: 1_000,
            end_ms: 4_000,
            duration_ms: 3_000,
            end,
        }
    }

    #[test]
    fn a_flow_is_network_activity_with_its_traffic() {
        let meta = Arc::new(FlowMeta {
            device: "alice-laptop".into(),
            user: "alice".into(),
            application: Some("intranet".into()),
            site: Some("dc1".into()),
            rule: Some("eng-web".into()),
            sensitivity: Some(1),
            risk: None,
            aggregated: false,
        });
        let r = FlowRecord::new(meta, &report(FlowEnd::Idle));
        let v = flow(&r, 5_000, Observer::Broker);
        assert_eq!(v["class_uid"], 4001);
        assert_eq!(v["category_uid"], 4);
        assert_eq!(v["type_uid"], 400102);
        assert_eq!(v["activity_name"], "Close");
        assert_eq!(v["traffic"]["bytes_in"], 20_000);
        assert_eq!(v["traffic"]["bytes"], 20_800);
        assert_eq!(v["duration"], 3_000);
        assert_eq!(v["src_endpoint"]["ip"], "100.118.0.2");
        assert_eq!(v["dst_endpoint"]["port"], 80);
        assert_eq!(v["connection_info"]["protocol_num"], 6);
        assert_eq!(v["actor"]["user"]["name"], "alice");
        assert_eq!(v["unmapped"]["rule"], "eng-web");
        assert_eq!(v["unmapped"]["end"], "idle");
        assert_eq!(v["metadata"]["product"]["feature"]["name"], "broker");
        let ongoing = flow(
            &FlowRecord::new(r.meta.clone(), &report(FlowEnd::Ongoing)),
            5_000,
            Observer::Broker,
        );
        assert_eq!(ongoing["type_uid"], 400106);
        let c = client_flow(&report(FlowEnd::Closed), "alice-laptop", "alice", 9);
        assert_eq!(c["metadata"]["product"]["feature"]["name"], "client");
        assert_eq!(c["traffic"]["bytes_out"], 800);
    }

    #[test]
    fn audit_events_take_their_class() {
        let d = json!({"result": "refused", "reason": "the ID token's nonce is not …"});
        let v = audit("sign_in", "-", &d, 1);
        assert_eq!(
            (v["class_uid"].clone(), v["status"].clone()),
            (json!(3002), json!("Failure"))
        );
        assert_eq!(v["severity_id"], 3);
        let v = audit("scim_user_deleted", "scim:entra", &json!({}), 1);
        assert_eq!(
            (v["class_uid"].clone(), v["activity_name"].clone()),
            (json!(3001), json!("Delete"))
        );
        let v = audit("policy", "admin", &json!({"version": 3}), 1);
        assert_eq!(v["class_uid"], 6003);
        assert_eq!(audit_kind("posture"), AuditKind::Posture);
        assert_eq!(audit_kind("sign_in"), AuditKind::Audit);
        assert_eq!(audit_kind("device_revoked"), AuditKind::Admin);
    }
}
