//! The broker's Prometheus metrics, read from the core's counters at every scrape.

use std::sync::Arc;

use sekisho_proto::metrics::{Readiness, Snapshot, Source};

use crate::{SharedRef, control, lock};

pub struct BrokerMetrics {
    pub shared: SharedRef,
    pub control: Option<Arc<control::Control>>,
}

impl Source for BrokerMetrics {
    fn snapshot(&self) -> Snapshot {
        let mut m = Snapshot::new("sekisho_broker");
        {
            let g = lock(&self.shared);
            let core = &g.core;
            let s = core.stats();
            let peers = core.peers();
            m.gauge(
                "peers",
                "Devices in the policy known to this broker.",
                peers.len() as f64,
            );
            m.gauge(
                "peers_connected",
                "Devices with a WireGuard handshake in the last 3 minutes.",
                peers
                    .iter()
                    .filter(|p| p.seconds_since_handshake.is_some_and(|s| s < 180))
                    .count() as f64,
            );
            m.gauge(
                "flows",
                "Flows in the flow table (allowed and denied).",
                core.flow_count() as f64,
            );
            m.gauge(
                "policy_generation",
                "Policy generation in force (bumped by every change).",
                s.policy_generation as f64,
            );
            for ((result, reason), n) in core.decision_counts() {
                m.counter_with(
                    "decisions",
                    "Flow decisions by result and reason.",
                    &[("result", result), ("reason", reason)],
                    *n,
                );
            }
            for (dir, v) in [
                ("from_clients", s.bytes_from_clients),
                ("to_clients", s.bytes_to_clients),
                ("to_connectors", s.bytes_to_sites),
                ("from_connectors", s.bytes_from_sites),
                ("to_internet", s.bytes_to_internet),
                ("from_internet", s.bytes_from_internet),
            ] {
                m.counter_with("bytes", "IP bytes by direction.", &[("direction", dir)], v);
            }
            for (dir, v) in [
                ("from_clients", s.packets_from_clients),
                ("to_clients", s.packets_to_clients),
                ("to_connectors", s.packets_to_sites),
                ("from_connectors", s.packets_from_sites),
                ("to_internet", s.packets_to_internet),
                ("from_internet", s.packets_from_internet),
            ] {
                m.counter_with(
                    "packets",
                    "IP packets by direction.",
                    &[("direction", dir)],
                    v,
                );
            }
            m.counter("handshakes", "WireGuard handshakes answered.", s.handshakes);
            for (why, v) in [
                ("spoofed_source", s.dropped_spoofed_source),
                ("malformed", s.dropped_malformed),
                ("invalid_wireguard", s.dropped_invalid_wireguard),
                ("unknown_peer", s.dropped_unknown_peer),
                ("no_connector", s.dropped_no_connector),
                ("unsolicited_from_site", s.dropped_unsolicited_from_site),
                ("denied", s.dropped_denied),
                ("flow_table_full", s.dropped_flow_table_full),
                ("no_endpoint", s.dropped_no_endpoint),
                ("no_egress", s.dropped_no_egress),
                (
                    "unsolicited_from_internet",
                    s.dropped_unsolicited_from_internet,
                ),
            ] {
                m.counter_with(
                    "dropped_packets",
                    "Packets dropped, by reason.",
                    &[("reason", why)],
                    v,
                );
            }
            for (result, v) in [
                ("accepted", s.posture_tokens_accepted),
                ("refused", s.posture_tokens_refused),
                ("expired", s.posture_tokens_expired),
            ] {
                m.counter_with(
                    "posture_tokens",
                    "Posture tokens by result.",
                    &[("result", result)],
                    v,
                );
            }
            m.counter(
                "decisions_not_logged",
                "Decisions the log writer could not take (queue full).",
                s.decisions_not_logged,
            );
            m.counter(
                "flows_moved",
                "Flows given another connector because theirs went away.",
                s.flows_moved,
            );
            m.counter(
                "connector_stale",
                "Times a connector link went silent.",
                s.connector_stale_events,
            );
            for l in core.connector_links() {
                for state in ["up", "draining", "stale"] {
                    m.gauge_with(
                        "connector_link",
                        "Connector QUIC links by state (1 = in that state).",
                        &[
                            ("site", &l.site),
                            ("connector", &l.connector),
                            ("state", state),
                        ],
                        if l.state.as_str() == state { 1.0 } else { 0.0 },
                    );
                }
                m.gauge_with(
                    "connector_flows",
                    "Open flows through each connector link.",
                    &[("site", &l.site), ("connector", &l.connector)],
                    l.flows as f64,
                );
            }
        }
        if let Some(c) = &self.control {
            control_metrics(c, &mut m);
        }
        m
    }

    fn ready(&self) -> Readiness<'_> {
        Box::pin(async move {
            if lock(&self.shared).core.stats().policy_generation == 0 {
                return Err("no policy loaded".into());
            }
            match &self.control {
                Some(c) if c.ready().await => Ok(()),
                Some(_) => Err("the store does not answer".into()),
                None => Ok(()),
            }
        })
    }
}

/// The control plane's store health.
fn control_metrics(c: &control::Control, m: &mut Snapshot) {
    let h = c.health();
    m.gauge(
        "store_up",
        "1 when the last round trip to the store succeeded.",
        if h.store_ok { 1.0 } else { 0.0 },
    );
    m.gauge(
        "store_notify_connected",
        "1 while listening for store changes (PostgreSQL LISTEN/NOTIFY).",
        if h.notify_connected { 1.0 } else { 0.0 },
    );
    m.counter(
        "store_changes_applied",
        "Changes made through other brokers and applied here.",
        h.changes_applied,
    );
    m.counter(
        "store_errors",
        "Failed store operations of the background loops.",
        h.store_errors,
    );
    m.gauge(
        "signing_keys_valid",
        "Posture signing keys that verify tokens now.",
        h.signing_keys_valid as f64,
    );
    m.gauge(
        "brokers",
        "Brokers in the deployment's registry.",
        h.brokers as f64,
    );
}
