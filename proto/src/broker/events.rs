//! What a broker worker reports besides packets: decisions, posture events and application
//! names for the decision log, and name mappings for connectors.

use std::net::IpAddr;

use serde::Serialize;

use super::links::LinkId;
use crate::policy::Action;

/// Something the I/O shell should know, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A flow was decided (one line in the decision log).
    Decision(DecisionRecord),
    /// A posture token was accepted, refused or expired.
    Posture(PostureRecord),
    /// An application name was asked through the tunnel.
    AppDns(AppDnsRecord),
    /// A flow's traffic: when it ends, and every minute while it runs.
    Flow(FlowRecord),
    /// Decisions of one device left out of the log over the last second (it decided more
    /// flows than its share of the log).
    Summary(SummaryRecord),
    /// Tell the connector on `link` that `synthetic`, for flows from `device`, stands for the
    /// host name `name` (sent before the flow's first packet).
    MapName {
        link: LinkId,
        device: IpAddr,
        synthetic: IpAddr,
        name: String,
        /// What the device's address-based deny rules forbid, in allowlist syntax: the
        /// connector refuses the name's resolution or packets that land there.
        deny: Vec<String>,
    },
}

/// One flow decision, as written to the decision log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DecisionRecord {
    pub event: &'static str,
    pub decision: Action,
    pub device: String,
    pub user: String,
    pub application: Option<String>,
    pub site: Option<String>,
    pub rule: Option<String>,
    pub reason: &'static str,
    /// The posture check that failed, when that decided.
    pub check: Option<String>,
    pub proto: &'static str,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    /// The device's risk, when it was above low or decided the flow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk: Option<RiskMark>,
}

/// The device's risk at a decision, in its records: the level, and what the application's
/// sensitivity level made of it ("log": allowed above the tolerated risk, recorded in full;
/// "deny"; "allow": tolerated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RiskMark {
    pub level: crate::risk::Level,
    pub response: &'static str,
}

impl RiskMark {
    /// The mark for decision `d` at `risk` (None at low risk).
    pub fn of(d: &crate::policy::Decision, risk: crate::risk::Level) -> Option<RiskMark> {
        let response = if d.risk_logged {
            "log"
        } else if matches!(d.reason, crate::policy::Reason::RiskTooHigh(_)) {
            "deny"
        } else if risk == crate::risk::Level::Low {
            return None;
        } else {
            "allow"
        };
        Some(RiskMark {
            level: risk,
            response,
        })
    }
}

/// Who and what an allowed flow is (kept with the flow for its records).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowMeta {
    pub device: String,
    pub user: String,
    pub application: Option<String>,
    pub site: Option<String>,
    pub rule: Option<String>,
    pub sensitivity: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk: Option<RiskMark>,
    /// Below the policy's monitored level with `[risk] aggregate_below`: records leave out
    /// destinations and traffic is summed per device and application.
    #[serde(skip)]
    pub aggregated: bool,
}

/// A flow's traffic, as written to the decision log (`"event": "traffic"`): bytes and packets
/// each way (`out`: from the device), start, end and duration, and why it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowRecord {
    pub event: &'static str,
    #[serde(flatten)]
    pub meta: std::sync::Arc<FlowMeta>,
    pub proto: &'static str,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    #[serde(flatten)]
    pub traffic: crate::flow::Traffic,
    pub start_ms: u64,
    pub end_ms: u64,
    pub duration_ms: u64,
    pub end: crate::flow::FlowEnd,
    /// An aggregate record: how many flows it sums.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows: Option<u64>,
}

impl FlowRecord {
    pub fn new(meta: std::sync::Arc<FlowMeta>, r: &crate::flow::FlowReport) -> FlowRecord {
        FlowRecord {
            event: "traffic",
            meta,
            proto: r.key.proto_name(),
            src: r.key.src,
            sport: r.key.sport,
            dst: r.key.dst,
            dport: r.key.dport,
            traffic: r.traffic,
            start_ms: r.start_ms,
            end_ms: r.end_ms,
            duration_ms: r.duration_ms,
            end: r.end,
            flows: None,
        }
    }
}

/// A posture token presented, refused or expired, as written to the decision log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PostureRecord {
    pub event: &'static str,
    pub result: &'static str,
    /// The device whose tunnel it came on.
    pub device: String,
    pub user: String,
    /// For refusals: the error kind (bad-signature, expired, wrong-device, ...) and text.
    pub reason: Option<String>,
    /// Checks that fail according to an accepted token.
    pub failing_checks: Vec<String>,
    pub exp: Option<u64>,
}

/// An application name asked through the tunnel, as written to the decision log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppDnsRecord {
    pub event: &'static str,
    pub device: String,
    pub user: String,
    pub name: String,
    /// "synthetic" (answered with an address), "nxdomain" (an application this user may not
    /// use), "not-an-application" or "full" (no synthetic address left for this device).
    pub result: &'static str,
    pub application: Option<String>,
    pub address: Option<IpAddr>,
}

/// Decisions of one device that were counted but not logged one by one, as written to the
/// decision log: "1,234 more denied flows in 1 s".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SummaryRecord {
    pub event: &'static str,
    pub device: String,
    pub user: String,
    /// Allowed and denied flows not logged one by one.
    pub allowed: u64,
    pub denied: u64,
    /// The period they were decided in.
    pub seconds: u64,
}
