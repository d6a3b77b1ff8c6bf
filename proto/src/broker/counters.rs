//! A broker worker's counters, by concern. Every place a packet can die has its own drop
//! counter; the stats command and the metrics endpoint show the sum over workers.

use serde::Serialize;

use crate::counters;
use crate::counters::Traffic;

counters! {
    /// Packets the data plane dropped, by reason.
    pub struct Drops {
        /// An inner source address that is not the sending device's own.
        spoofed_source,
        /// An IP packet that does not parse.
        malformed,
        /// A datagram WireGuard refused (bad MAC, replay, garbage).
        invalid_wireguard,
        /// A handshake from a key not in the policy, or a session index nobody has.
        unknown_peer,
        /// A handshake message over its source address's limit (dropped before any work).
        handshake_per_source,
        /// A handshake over the worker's budget of handshakes per second.
        handshake_budget,
        /// Under load, a handshake from a source address that had its cookie replies.
        cookie_per_source,
        /// An allowed flow whose site has no connector that takes it.
        no_connector,
        /// A packet from a connector that belongs to no flow a device opened there.
        unsolicited_from_site,
        /// A packet of a denied flow (answered with a TCP RST or ICMP prohibited).
        denied,
        /// An ICMP error from a device whose outer destination is not the other end of the
        /// flow it quotes (or that quotes no flow of the device's).
        icmp_mismatch,
        /// No room in the flow table (in all, or for this device).
        flow_table_full,
        /// An answer for a device whose address is not known yet.
        no_endpoint,
        /// A full-tunnel flow while this broker has no internet egress.
        no_egress,
        /// A packet from the internet that belongs to no flow a device opened.
        unsolicited_from_internet,
        /// Larger than the connector link carries (answered with ICMP "fragmentation needed"
        /// or "packet too big" when the sender forbids fragmenting).
        too_large,
        /// The connector link's send queue was full.
        link_congested,
        /// The connector link closed while the packet was on its way to it.
        link_closed,
        /// WireGuard could not encrypt an answer (no session yet; the engine queues a few).
        no_session,
        /// The worker's queue towards another worker was full.
        worker_queue_full,
        /// The WireGuard socket refused a send (counted per datagram).
        send_failed,
        /// An in-tunnel service request (token, DNS, status, echo) over the device's rate.
        service_rate_limited,
        /// The decision log could not take a record (its writer is behind).
        decisions_not_logged,
    }
}

counters! {
    /// Flow decisions and what became of them.
    pub struct Flows {
        allowed,
        denied,
        /// Deny answers sent (TCP RST, ICMP prohibited).
        deny_replies,
        /// Flows given another connector because theirs went away.
        moved,
        /// ICMP "fragmentation needed" / "packet too big" answers sent.
        too_big_replies,
        /// TCP SYNs whose MSS was lowered to what the link carries.
        mss_clamped,
        /// Decisions counted but summed into a device's summary line instead of logged one by
        /// one (the device decided more than its share of the log).
        summarized,
        /// Flow records (traffic each way) written: at a flow's end and every minute of it.
        records,
    }
}

counters! {
    /// WireGuard handshakes.
    pub struct Handshakes {
        completed,
        cookie_replies,
        /// Initiations that arrived at a worker not owning the peer and were handed over.
        handed_over,
    }
}

counters! {
    /// Posture tokens presented in the tunnel.
    pub struct Posture {
        accepted,
        refused,
        expired,
    }
}

counters! {
    /// Application names asked in the tunnel.
    pub struct AppDns {
        queries,
        malformed,
    }
}

counters! {
    /// Connector links as the workers saw them.
    pub struct Links {
        /// Times a link went silent (no new flows to it until it answers again).
        stale_events,
    }
}

/// All of a worker's counters.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub from_clients: Traffic,
    pub to_clients: Traffic,
    pub to_sites: Traffic,
    pub from_sites: Traffic,
    pub to_internet: Traffic,
    pub from_internet: Traffic,
    pub flows: Flows,
    pub handshakes: Handshakes,
    pub posture: Posture,
    pub app_dns: AppDns,
    pub links: Links,
    pub drops: Drops,
}

impl Counters {
    /// Adds another worker's counts.
    pub fn merge(&mut self, o: &Counters) {
        self.from_clients.merge(&o.from_clients);
        self.to_clients.merge(&o.to_clients);
        self.to_sites.merge(&o.to_sites);
        self.from_sites.merge(&o.from_sites);
        self.to_internet.merge(&o.to_internet);
        self.from_internet.merge(&o.from_internet);
        self.flows.merge(&o.flows);
        self.handshakes.merge(&o.handshakes);
        self.posture.merge(&o.posture);
        self.app_dns.merge(&o.app_dns);
        self.links.merge(&o.links);
        self.drops.merge(&o.drops);
    }
}
