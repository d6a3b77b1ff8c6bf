//! The broker's Prometheus metrics, read from the core's counters at every scrape.

use std::sync::Arc;

use sekisho_sys::metrics::{Readiness, Snapshot, Snapshotting, Source};

use crate::control;
use crate::dataplane::DataPlane;
use crate::stats::KernelSources;

pub struct BrokerMetrics {
    pub dp: DataPlane,
    pub control: Option<Arc<control::Control>>,
    pub kernel: KernelSources,
    pub shipper: sekisho_sys::logship::Shipper,
    pub risk: Arc<crate::risk::RiskService>,
}

impl Source for BrokerMetrics {
    fn snapshot(&self) -> Snapshotting<'_> {
        Box::pin(async move {
            let mut m = Snapshot::new("sekisho_broker");
            sekisho_sys::metrics::log_sink_metrics(&mut m, &self.shipper.stats());
            if let Some(c) = &self.control {
                for s in c.ssf_stats() {
                    for (outcome, n) in [
                        ("sent", s.sent),
                        ("refused", s.refused),
                        ("failed", s.failed),
                        ("dropped_queue_full", s.dropped_queue_full),
                    ] {
                        m.counter_with(
                            "ssf_sets",
                            "Security Event Tokens pushed to Shared Signals receivers, by outcome.",
                            &[("receiver", &s.url), ("outcome", outcome)],
                            n,
                        );
                    }
                }
            }
            let r = self.risk.stats();
            m.counter(
                "risk_inputs",
                "Records and signals the risk engine took.",
                r.inputs,
            );
            m.counter(
                "risk_inputs_dropped",
                "Records and signals lost on the way to the risk engine (its queue was full).",
                r.inputs_dropped,
            );
            m.counter(
                "risk_changes",
                "Changes of a device's risk level.",
                r.changes,
            );
            m.gauge_with(
                "risk_devices",
                "Devices at a risk level above low.",
                &[("level", "medium")],
                r.devices_medium as f64,
            );
            m.gauge_with(
                "risk_devices",
                "Devices at a risk level above low.",
                &[("level", "high")],
                r.devices_high as f64,
            );
            let v = self.dp.view().await;
            let c = &v.counters;
            m.gauge(
                "peers",
                "Devices in the policy known to this broker.",
                v.peers.len() as f64,
            );
            m.gauge(
                "peers_connected",
                "Devices with a WireGuard handshake in the last 3 minutes.",
                v.peers
                    .iter()
                    .filter(|p| p.seconds_since_handshake.is_some_and(|s| s < 180))
                    .count() as f64,
            );
            m.gauge(
                "flows",
                "Flows in the flow tables (allowed and denied).",
                v.flows as f64,
            );
            m.gauge(
                "policy_generation",
                "Policy generation in force (bumped by every change).",
                v.policy_generation as f64,
            );
            m.gauge(
                "workers",
                "Data-plane workers (threads, each with its share of the devices).",
                v.workers.len() as f64,
            );
            for ((result, reason), n) in &v.decisions {
                m.counter_with(
                    "decisions",
                    "Flow decisions by result and reason.",
                    &[("result", result), ("reason", reason)],
                    *n,
                );
            }
            for (dir, t) in [
                ("from_clients", &c.from_clients),
                ("to_clients", &c.to_clients),
                ("to_connectors", &c.to_sites),
                ("from_connectors", &c.from_sites),
                ("to_internet", &c.to_internet),
                ("from_internet", &c.from_internet),
            ] {
                m.counter_with(
                    "bytes",
                    "IP bytes by direction.",
                    &[("direction", dir)],
                    t.bytes,
                );
                m.counter_with(
                    "packets",
                    "IP packets by direction.",
                    &[("direction", dir)],
                    t.packets,
                );
            }
            m.counter(
                "handshakes",
                "WireGuard handshakes answered.",
                c.handshakes.completed,
            );
            m.counter(
                "cookie_replies",
                "WireGuard cookie replies sent (handshake load).",
                c.handshakes.cookie_replies,
            );
            for (why, n) in c.drops.fields() {
                m.counter_with(
                    "dropped_packets",
                    "Packets dropped, by reason.",
                    &[("reason", why)],
                    n,
                );
            }
            m.counter(
                "connector_quic_retries",
                "Connection attempts on the connector port answered with a QUIC Retry (address validation).",
                self.kernel.quic_retries.load(std::sync::atomic::Ordering::Relaxed),
            );
            let k = self.kernel.read(&v);
            for (what, n) in [
                ("wireguard_socket", Some(k.wireguard_socket)),
                ("connector_socket", k.link_socket),
                ("egress_tun", k.egress_tun),
                ("egress_write_failed", Some(k.egress_write_failed)),
                ("handshake_shield", k.handshake_shield),
            ] {
                if let Some(n) = n {
                    m.counter_with(
                        "kernel_dropped_packets",
                        "Packets the kernel dropped for this broker (socket buffers full, TUN queue full, handshakes over a source's limit).",
                        &[("where", what)],
                        n,
                    );
                }
            }
            for (result, n) in c.posture.fields() {
                m.counter_with(
                    "posture_tokens",
                    "Posture tokens by result.",
                    &[("result", result)],
                    n,
                );
            }
            for (what, n) in c.flows.fields() {
                m.counter_with(
                    "flow_events",
                    "Flow decisions and what became of them.",
                    &[("event", what)],
                    n,
                );
            }
            m.counter(
                "decisions_not_logged",
                "Decisions the log writer could not take (queue full).",
                c.drops.decisions_not_logged,
            );
            m.counter(
                "flows_moved",
                "Flows given another connector because theirs went away.",
                c.flows.moved,
            );
            m.counter(
                "connector_stale",
                "Times a connector link went silent (summed over workers).",
                c.links.stale_events,
            );
            for l in &v.connectors {
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
            if let Some(c) = &self.control {
                control_metrics(c, &mut m);
            }
            m
        })
    }

    fn ready(&self) -> Readiness<'_> {
        Box::pin(async move {
            if self.dp.generation() == 0 {
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
    m.gauge(
        "directory_left_out",
        "Directory entries left out of the policy in force: they clash with the policy text (see the log).",
        h.directory_left_out as f64,
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
    if let Some(gate) = c
        .api_gate
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        m.gauge(
            "api_connections",
            "Connections the control API holds now.",
            gate.open() as f64,
        );
    }
    let f = c.console_forgotten();
    for (ring, n) in [
        ("decisions", f.decisions),
        ("audit_lines", f.audit_lines),
        ("postures", f.postures),
    ] {
        m.counter_with(
            "console_forgotten",
            "Entries the console's in-memory views let go (the oldest first; the logs keep them).",
            &[("ring", ring)],
            n,
        );
    }
    let r = &c.api_refusals;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    for (why, n) in [
        ("connections_total", get(&r.connections_total)),
        ("connections_per_address", get(&r.connections_per_address)),
        ("rate_limited", get(&r.rate_limited)),
        ("timed_out", get(&r.timed_out)),
        ("evicted", get(&r.evicted)),
    ] {
        m.counter_with(
            "api_refused",
            "Control API connections and requests refused by its limits, by reason.",
            &[("reason", why)],
            n,
        );
    }
}
