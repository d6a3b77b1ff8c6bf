//! The connector's data plane as a state machine without I/O.
//!
//! Inputs: packets from broker links ([`ConnectorState::handle_link_packet`]), packets from
//! the site ([`ConnectorState::handle_site_packet`], read from the TUN device), links coming
//! and going, name translations resolved, and [`ConnectorState::handle_timeout`]. Outputs:
//! [`ConnectorState::poll_transmit`] (packets for the site or a link, without copies),
//! [`ConnectorState::poll_event`] (names to resolve, routes to add) and
//! [`ConnectorState::poll_timeout`].
//!
//! A device's replies go back over the link its packets last came from: a device that moved
//! to another broker gets its replies there, so its TCP connections survive the move.

pub mod allow;
pub mod names;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;
use serde::Serialize;

use crate::counters;
use crate::counters::Traffic;
use crate::flow::{FlowEntry, FlowTable, IdleTimeouts, TcpEnd};
use crate::link::LinkId;
use crate::packet::{self, FlowKey, PacketKind};
use crate::timers::{TimerName, Timers};

pub use allow::{Allowlist, Refusal};
pub use names::{Admit, Key};

/// How often flows and waiting packets expire.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

counters! {
    /// Packets the connector dropped, by reason.
    pub struct Drops {
        /// A reply while no broker is linked.
        no_link,
        /// Larger than the link carries (the sender gets ICMP "fragmentation needed" or
        /// "packet too big" when it forbids fragmenting).
        too_large,
        /// Waited too long for its name translation, or the queue for it was full, or the
        /// name did not resolve.
        name_queue,
        /// The link's send queue was full.
        link_congested,
        /// The link closed while the packet was on its way to it.
        link_closed,
        /// The TUN device refused the write.
        site_write_failed,
        /// A packet from the site that does not parse.
        malformed,
        /// A packet from a broker to a destination outside the connector's allowlist.
        not_allowed,
        /// A packet to a name that resolved at the site to an address the device's deny rules
        /// forbid.
        denied_at_site,
    }
}

/// The connector's counters.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Packets from brokers into the site.
    pub to_site: Traffic,
    /// Packets from the site to brokers.
    pub from_site: Traffic,
    pub drops: Drops,
    /// ICMP "fragmentation needed" / "packet too big" answers sent into the site.
    pub too_big_replies: u64,
    /// Name translations a broker asked for outside the allowed zones, or whose address fell
    /// outside the allowed networks.
    pub refused_names: u64,
    /// Routes a broker asked for over the allowed networks, or too wide.
    pub refused_routes: u64,
}

/// The connector's named timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    Housekeeping,
}

impl TimerName for Timer {
    const ALL: &'static [Timer] = &[Timer::Housekeeping];
    fn index(self) -> usize {
        self as usize
    }
}

/// One output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// Into the site (the TUN device).
    Site(Bytes),
    /// To the broker on `link`.
    Link { link: LinkId, packet: Bytes },
}

/// Something the shell must do besides moving packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Resolve `name` on the site's DNS and install `key → address` (replacing `previous`),
    /// then call [`ConnectorState::handle_name_resolved`].
    Resolve {
        key: Key,
        name: String,
        previous: Option<Ipv4Addr>,
    },
    /// Route this network (devices, synthetic addresses) into the TUN device.
    Route(IpNet),
    /// Stop routing this network into the TUN device (it covers an address that must be
    /// reached outside it).
    Unroute(IpNet),
    /// Something a broker asked for was refused by the allowlist: log it. At most
    /// [`REFUSALS_LOGGED_PER_SECOND`] a second; the rest are summed up in the next
    /// [`Event::RefusedMore`].
    Refused { what: String, why: Refusal },
    /// This many more refusals in the last second than were logged one by one.
    RefusedMore(u64),
}

/// Refusals logged one by one per second (the counters count them all).
pub const REFUSALS_LOGGED_PER_SECOND: u32 = 10;

/// What a broker said when it accepted the link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkParams {
    pub device_ranges: Vec<IpNet>,
    pub app_ranges: Vec<IpNet>,
    /// The largest datagram the link carries now.
    pub max_datagram: usize,
}

#[derive(Debug)]
struct Link {
    broker: String,
    max_datagram: usize,
}

/// A flow through this connector, tracked to know when it ended (draining, metrics).
struct Tracked(TcpEnd);

impl FlowEntry for Tracked {
    fn allowed(&self) -> bool {
        true
    }
    fn owner(&self) -> u32 {
        0
    }
    fn closed(&self) -> bool {
        self.0.ended()
    }
}

/// A link as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkView {
    pub link: LinkId,
    pub broker: String,
    pub max_datagram: usize,
}

/// The connector's data plane.
pub struct ConnectorState {
    links: BTreeMap<LinkId, Link>,
    /// The link each device's packets last came from.
    via: HashMap<IpAddr, LinkId>,
    flows: FlowTable<Tracked>,
    names: names::Translations,
    routes: BTreeSet<IpNet>,
    counters: Counters,
    /// Open flows as of the last count.
    open_flows: usize,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    timers: Timers<Timer, 1>,
    scratch: Vec<u8>,
    allow: Allowlist,
    /// Addresses no route into the tunnel may cover: the brokers this connector links to and
    /// the site's DNS servers (a broker routing them into the tunnel would cut the
    /// connector off from the others, or from name resolution).
    protected: Vec<IpAddr>,
    /// Refusals logged in the current second, and those past the limit.
    refusals_logged: u32,
    refusals_unlogged: u64,
}

impl ConnectorState {
    /// A connector that forwards only inside `allow`.
    pub fn new(now: Instant, allow: Allowlist) -> ConnectorState {
        let mut timers = Timers::default();
        timers.set(Timer::Housekeeping, now + HOUSEKEEPING);
        ConnectorState {
            links: BTreeMap::new(),
            via: HashMap::new(),
            flows: FlowTable::new(
                IdleTimeouts {
                    udp: Duration::from_secs(30),
                    other: Duration::from_secs(30),
                    closed: Duration::from_secs(2),
                    ..IdleTimeouts::default()
                },
                1_000_000,
                1_000_000,
            ),
            names: names::Translations::default(),
            routes: BTreeSet::new(),
            counters: Counters::default(),
            open_flows: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            timers,
            scratch: vec![0; 1500],
            allow,
            protected: Vec::new(),
            refusals_logged: 0,
            refusals_unlogged: 0,
        }
    }

    pub fn allowlist(&self) -> &Allowlist {
        &self.allow
    }

    /// No route a broker asks for may cover `addr` (a broker's or a DNS server's address);
    /// one a broker asked for earlier is taken back.
    pub fn protect(&mut self, addr: IpAddr) {
        if self.protected.contains(&addr) {
            return;
        }
        self.protected.push(addr);
        let covering: Vec<IpNet> = self
            .routes
            .iter()
            .filter(|n| n.contains(&addr))
            .copied()
            .collect();
        for net in covering {
            self.routes.remove(&net);
            self.names.forget_range(&net);
            self.counters.refused_routes += 1;
            self.refused(Refusal::Route, || {
                format!("route {net}: it covers {addr}, which must stay outside the tunnel")
            });
            self.events.push_back(Event::Unroute(net));
        }
    }

    /// Notes a refusal for the log (rate-limited).
    fn refused(&mut self, why: Refusal, what: impl FnOnce() -> String) {
        if self.refusals_logged < REFUSALS_LOGGED_PER_SECOND {
            self.refusals_logged += 1;
            self.events.push_back(Event::Refused { what: what(), why });
        } else {
            self.refusals_unlogged += 1;
        }
    }

    pub fn counters(&self) -> Counters {
        let mut c = self.counters.clone();
        c.drops.name_queue = self.names.dropped;
        c
    }

    /// Open flows through this connector (as of the last second, plus new ones since).
    pub fn open_flows(&self) -> usize {
        self.open_flows
    }

    pub fn links(&self) -> Vec<LinkView> {
        self.links
            .iter()
            .map(|(id, l)| LinkView {
                link: *id,
                broker: l.broker.clone(),
                max_datagram: l.max_datagram,
            })
            .collect()
    }

    /// A broker accepted the link.
    pub fn handle_link_up(&mut self, link: LinkId, broker: &str, params: LinkParams) {
        self.links.insert(
            link,
            Link {
                broker: broker.to_string(),
                max_datagram: params.max_datagram,
            },
        );
        // Ranges a broker names are routed into the tunnel only where they cannot capture
        // the site's own networks.
        let allowed =
            |net: &IpNet, this: &mut Self| match this.allow.permits_route(net).and_then(|()| {
                if this.protected.iter().any(|a| net.contains(a)) {
                    Err(Refusal::Route)
                } else {
                    Ok(())
                }
            }) {
                Ok(()) => true,
                Err(why) => {
                    this.counters.refused_routes += 1;
                    this.refused(why, || format!("route {net} from broker {broker}"));
                    false
                }
            };
        let app_ranges: Vec<IpNet> = params
            .app_ranges
            .iter()
            .filter(|n| allowed(n, self))
            .copied()
            .collect();
        let device_ranges: Vec<IpNet> = params
            .device_ranges
            .iter()
            .filter(|n| allowed(n, self))
            .copied()
            .collect();
        self.names.set_app_ranges(app_ranges.clone());
        for net in device_ranges.iter().chain(&app_ranges) {
            if self.routes.insert(*net) {
                self.events.push_back(Event::Route(*net));
            }
        }
    }

    /// The largest datagram the link carries changed.
    pub fn handle_link_mtu(&mut self, link: LinkId, max_datagram: usize) {
        if let Some(l) = self.links.get_mut(&link) {
            l.max_datagram = max_datagram;
        }
    }

    /// The link closed: devices that used it get their replies over another one until their
    /// next packet says where they are.
    pub fn handle_link_down(&mut self, link: LinkId) {
        self.links.remove(&link);
        self.via.retain(|_, l| *l != link);
    }

    /// A packet from a device, through the broker on `link`.
    pub fn handle_link_packet(&mut self, link: LinkId, packet: Bytes, now: Instant) {
        self.counters.to_site.count(packet.len());
        let Ok((src, dst)) = packet::addresses(&packet) else {
            // The broker checked it; a connector still never writes garbage into the site.
            self.counters.drops.malformed += 1;
            return;
        };
        let kind = packet::classify(&packet);
        // A packet of a flow already let through needs no check: its first packet was checked
        // (the allowlist does not change while the connector runs, and the kernel keeps a
        // connection on the translation it started with).
        if let Ok(PacketKind::Flow(key)) = &kind
            && let Some(f) = self.flows.touch(key, now)
        {
            let end = TcpEnd::of(&packet, true);
            f.0.merge(end);
            if end != TcpEnd::default() {
                self.flows.reschedule(key);
            }
        } else {
            // The allowlist, whatever the broker decided. A packet to a synthetic address is
            // checked against the address its name translates to; one still waiting for its
            // translation is checked when the translation comes (its flow starts with its
            // next packet, checked here).
            let real = if self.names.is_synthetic(dst) {
                self.names.translation(&(src, dst)).map(IpAddr::V4)
            } else {
                Some(dst)
            };
            if let Some(real) = real {
                if let Err(why) = self.allow.permits_kind(&kind, &packet, Some(real)) {
                    self.counters.drops.not_allowed += 1;
                    self.refused(why, || describe(&packet, src, real));
                    return;
                }
                if real != dst
                    && self
                        .names
                        .denials(&(src, dst))
                        .is_some_and(|d| d.permits_kind(&kind, &packet, Some(real)).is_ok())
                {
                    self.counters.drops.denied_at_site += 1;
                    self.refused(Refusal::Denied, || describe(&packet, src, real));
                    return;
                }
                if let Ok(PacketKind::Flow(key)) = kind
                    && self
                        .flows
                        .insert(key, Tracked(TcpEnd::of(&packet, true)), now)
                        .is_ok()
                {
                    // Counted at once (a drain must see it); recounted every second.
                    self.open_flows += 1;
                }
            }
        }
        if self.via.get(&src) != Some(&link) {
            self.via.insert(src, link);
        }
        match self.names.admit(src, dst, &packet, now) {
            Admit::Forward => self.transmits.push_back(Transmit::Site(packet)),
            Admit::Queued | Admit::Dropped => {}
        }
    }

    /// A packet from the site (a reply) for a device: back over the link its device's packets
    /// last came from, else any link.
    pub fn handle_site_packet(&mut self, packet: Bytes, now: Instant) {
        self.counters.from_site.count(packet.len());
        let dst = match packet::addresses(&packet) {
            Ok((_, d)) => d,
            Err(_) => {
                self.counters.drops.malformed += 1;
                return;
            }
        };
        if let Some(key) = client_key(&packet)
            && let Some(f) = self.flows.touch(&key, now)
        {
            let end = TcpEnd::of(&packet, false);
            f.0.merge(end);
            if end != TcpEnd::default() {
                self.flows.reschedule(&key);
            }
        }
        let link = self
            .via
            .get(&dst)
            .filter(|l| self.links.contains_key(l))
            .copied()
            .or_else(|| self.links.keys().next().copied());
        let Some(link) = link else {
            self.counters.drops.no_link += 1;
            return;
        };
        let max = self.links.get(&link).map_or(usize::MAX, |l| l.max_datagram);
        if packet.len() > max {
            self.counters.drops.too_large += 1;
            let mtu = max.min(u16::MAX as usize) as u16;
            if let Some(n) = packet::too_big_reply(&packet, mtu, &mut self.scratch) {
                self.counters.too_big_replies += 1;
                let reply = Bytes::copy_from_slice(&self.scratch[..n]);
                self.transmits.push_back(Transmit::Site(reply));
            }
            return;
        }
        self.transmits.push_back(Transmit::Link { link, packet });
    }

    /// A broker says `key` (device, synthetic address) stands for the host name `name`.
    pub fn handle_map_name(&mut self, key: Key, name: String, deny: &[String]) {
        let denials = Allowlist::parse(deny).unwrap_or_else(|e| {
            // A broker's list this connector cannot read: deny the whole name rather than
            // guess (nothing resolves).
            self.refused(Refusal::Denied, || format!("deny list for {name}: {e}"));
            Allowlist::parse(&["0.0.0.0/0", "::/0"]).unwrap_or_default()
        });
        self.names.mapping(key, &name, denials);
        if self.names.has(&key, &name) {
            return;
        }
        let previous = self.names.previous(&key);
        if let Err(why) = self.allow.permits_name(&name) {
            self.counters.refused_names += 1;
            self.names.failed(&key);
            self.refused(why, || format!("name {name} for {}", key.0));
            return;
        }
        if !self.names.start_resolving(key, &name) {
            // Another name for this pair is being resolved: this one follows when it is done.
            return;
        }
        self.events.push_back(Event::Resolve {
            key,
            name,
            previous,
        });
    }

    /// The shell resolved and installed a translation (or failed to).
    pub fn handle_name_resolved(&mut self, key: Key, name: String, result: Result<Ipv4Addr, ()>) {
        let (current, next) = self.names.finished(key, &name, result.ok());
        if !current {
            // The broker wants another name for this pair now: this resolution releases
            // nothing, and the wanted one is resolved next (replacing what the kernel holds).
            if let Some(wanted) = next {
                let previous = self.names.previous(&key);
                self.events.push_back(Event::Resolve {
                    key,
                    name: wanted,
                    previous,
                });
            }
            return;
        }
        match result {
            Ok(real) if self.allow.permits_resolved(IpAddr::V4(real)).is_err() => {
                // The shell checks before installing; this is the core's own word on it.
                self.counters.refused_names += 1;
                self.names.failed(&key);
                self.refused(Refusal::Address, || {
                    format!("name {name} resolved to {real}")
                });
            }
            Ok(real) => {
                let real_ip = IpAddr::V4(real);
                for pkt in self.names.installed(key, name, real) {
                    let denied = self
                        .names
                        .denials(&key)
                        .is_some_and(|d| d.permits_packet(&pkt, Some(real_ip)).is_ok());
                    match self.allow.permits_packet(&pkt, Some(real_ip)) {
                        Ok(()) if !denied => self.transmits.push_back(Transmit::Site(pkt)),
                        Ok(()) => {
                            self.counters.drops.denied_at_site += 1;
                            self.refused(Refusal::Denied, || describe(&pkt, key.0, real_ip));
                        }
                        Err(why) => {
                            self.counters.drops.not_allowed += 1;
                            self.refused(why, || describe(&pkt, key.0, real_ip));
                        }
                    }
                }
            }
            Err(()) => self.names.failed(&key),
        }
    }

    /// The shell could not write these site packets, or send these link packets.
    pub fn count_drops(&mut self, f: impl FnOnce(&mut Drops)) {
        f(&mut self.counters.drops);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for t in self.timers.take_due(now) {
            match t {
                Timer::Housekeeping => {
                    if self.refusals_unlogged > 0 {
                        self.events
                            .push_back(Event::RefusedMore(self.refusals_unlogged));
                    }
                    (self.refusals_logged, self.refusals_unlogged) = (0, 0);
                    self.names.expire(now);
                    self.flows.expire(now);
                    self.open_flows = self.flows.iter().filter(|(_, f, _)| !f.closed()).count();
                    self.timers.set(Timer::Housekeeping, now + HOUSEKEEPING);
                }
            }
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }
}

/// A refused packet for the log: protocol, source, destination and port.
fn describe(pkt: &[u8], src: IpAddr, dst: IpAddr) -> String {
    match packet::classify(pkt) {
        Ok(PacketKind::Flow(k)) if matches!(k.proto, packet::PROTO_TCP | packet::PROTO_UDP) => {
            let proto = if k.proto == packet::PROTO_TCP {
                "tcp"
            } else {
                "udp"
            };
            format!("{proto} {src} -> {dst}:{}", k.dport)
        }
        Ok(PacketKind::Flow(k)) => format!("protocol {} {src} -> {dst}", k.proto),
        Ok(PacketKind::IcmpError { .. }) => format!("icmp error {src} -> {dst}"),
        Err(_) => format!("packet {src} -> {dst}"),
    }
}

/// The client-side 5-tuple of a packet from the site.
fn client_key(pkt: &[u8]) -> Option<FlowKey> {
    match packet::classify(pkt) {
        Ok(PacketKind::Flow(k)) => Some(k.reversed()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::testpkt::{tcp4, udp4};

    fn up(c: &mut ConnectorState, link: u64, max: usize) {
        c.handle_link_up(
            LinkId(link),
            &format!("b{link}"),
            LinkParams {
                device_ranges: vec!["100.118.0.0/16".parse().unwrap()],
                app_ranges: vec!["100.119.0.0/16".parse().unwrap()],
                max_datagram: max,
            },
        );
    }

    fn site_allowlist() -> Allowlist {
        Allowlist::parse(&["10.20.0.0/24", "corp.example"]).unwrap()
    }

    fn drain(c: &mut ConnectorState) -> Vec<Transmit> {
        std::iter::from_fn(|| c.poll_transmit()).collect()
    }

    #[test]
    fn replies_follow_the_link_the_device_used_last() {
        let now = Instant::now();
        let mut c = ConnectorState::new(now, site_allowlist());
        up(&mut c, 1, 1400);
        up(&mut c, 2, 1400);
        let routes: Vec<Event> = std::iter::from_fn(|| c.poll_event()).collect();
        assert_eq!(routes.len(), 2, "each range routed once: {routes:?}");
        let out = Bytes::from(tcp4([100, 118, 0, 2], 4000, [10, 20, 0, 10], 80, 0x02, 1));
        c.handle_link_packet(LinkId(2), out.clone(), now);
        assert_eq!(drain(&mut c), vec![Transmit::Site(out)]);
        let back = Bytes::from(tcp4([10, 20, 0, 10], 80, [100, 118, 0, 2], 4000, 0x12, 9));
        c.handle_site_packet(back.clone(), now);
        assert_eq!(
            drain(&mut c),
            vec![Transmit::Link {
                link: LinkId(2),
                packet: back.clone()
            }]
        );
        // The device moves to link 1; then link 1 goes and replies take link 2 again.
        let again = Bytes::from(tcp4([100, 118, 0, 2], 4000, [10, 20, 0, 10], 80, 0x10, 2));
        c.handle_link_packet(LinkId(1), again, now);
        drain(&mut c);
        c.handle_site_packet(back.clone(), now);
        assert!(matches!(
            &drain(&mut c)[..],
            [Transmit::Link {
                link: LinkId(1),
                ..
            }]
        ));
        c.handle_link_down(LinkId(1));
        c.handle_site_packet(back.clone(), now);
        assert!(matches!(
            &drain(&mut c)[..],
            [Transmit::Link {
                link: LinkId(2),
                ..
            }]
        ));
        c.handle_link_down(LinkId(2));
        c.handle_site_packet(back, now);
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.counters().drops.no_link, 1);
        assert_eq!(c.open_flows(), 1);
    }

    #[test]
    fn a_reply_too_large_for_the_link_is_answered_into_the_site() {
        let now = Instant::now();
        let mut c = ConnectorState::new(now, site_allowlist());
        up(&mut c, 1, 1000);
        let big = Bytes::from(udp4(
            [10, 20, 0, 10],
            53,
            [100, 118, 0, 2],
            5000,
            &[7; 1200],
        ));
        c.handle_site_packet(big, now);
        let out = drain(&mut c);
        let [Transmit::Site(icmp)] = &out[..] else {
            panic!("{out:?}")
        };
        let Ok(PacketKind::IcmpError { outer, .. }) = packet::classify(icmp) else {
            panic!("not an ICMP error")
        };
        assert_eq!(outer.dst, "10.20.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(icmp[20..22], [3, 4]);
        assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1000);
        assert_eq!(c.counters().drops.too_large, 1);
    }

    #[test]
    fn packets_for_names_wait_for_their_translation() {
        let now = Instant::now();
        let mut c = ConnectorState::new(now, site_allowlist());
        up(&mut c, 1, 1400);
        while c.poll_event().is_some() {}
        let dev: IpAddr = "100.118.0.2".parse().unwrap();
        let syn: IpAddr = "100.119.0.9".parse().unwrap();
        c.handle_map_name((dev, syn), "wiki.corp.example".into(), &[]);
        assert!(matches!(
            c.poll_event(),
            Some(Event::Resolve { previous: None, .. })
        ));
        let p = Bytes::from(tcp4([100, 118, 0, 2], 4000, [100, 119, 0, 9], 80, 0x02, 1));
        c.handle_link_packet(LinkId(1), p.clone(), now);
        assert!(drain(&mut c).is_empty(), "waits");
        c.handle_name_resolved(
            (dev, syn),
            "wiki.corp.example".into(),
            Ok(Ipv4Addr::new(10, 20, 0, 10)),
        );
        assert_eq!(drain(&mut c), vec![Transmit::Site(p)]);
        // Asked again for the same name: nothing to do.
        c.handle_map_name((dev, syn), "wiki.corp.example".into(), &[]);
        assert_eq!(c.poll_event(), None);
    }

    /// A broker that grants everything still gets only what the site's allowlist holds:
    /// other hosts and ports, names outside the zones, names resolving outside the networks,
    /// and routes over the site's own networks are refused, counted and logged.
    #[test]
    fn the_allowlist_holds_whatever_a_broker_asks() {
        let now = Instant::now();
        let allow =
            Allowlist::parse(&["10.20.0.10:80", "10.20.0.0/25:443", "corp.example"]).unwrap();
        let mut c = ConnectorState::new(now, allow);
        // Another broker this connector links to lives in 172.16.0.0/12.
        c.protect("172.16.5.5".parse().unwrap());
        // A route an earlier broker asked for is taken back when it turns out to cover a
        // broker found later.
        c.handle_link_up(
            LinkId(9),
            "b0",
            LinkParams {
                device_ranges: vec!["192.168.0.0/16".parse().unwrap()],
                app_ranges: vec![],
                max_datagram: 1400,
            },
        );
        assert_eq!(
            c.poll_event(),
            Some(Event::Route("192.168.0.0/16".parse().unwrap()))
        );
        c.protect("192.168.7.7".parse().unwrap());
        assert_eq!(
            std::iter::from_fn(|| c.poll_event())
                .filter(|e| matches!(e, Event::Unroute(_)))
                .collect::<Vec<_>>(),
            vec![Event::Unroute("192.168.0.0/16".parse().unwrap())]
        );
        c.handle_link_down(LinkId(9));
        c.handle_link_up(
            LinkId(1),
            "b1",
            LinkParams {
                device_ranges: vec![
                    "100.118.0.0/16".parse().unwrap(),
                    "10.20.0.0/16".parse().unwrap(),
                    "0.0.0.0/0".parse().unwrap(),
                    "172.16.0.0/12".parse().unwrap(),
                ],
                app_ranges: vec!["100.119.0.0/16".parse().unwrap()],
                max_datagram: 1400,
            },
        );
        let routes: Vec<Event> = std::iter::from_fn(|| c.poll_event())
            .filter(|e| matches!(e, Event::Route(_)))
            .collect();
        assert_eq!(
            routes,
            vec![
                Event::Route("100.118.0.0/16".parse().unwrap()),
                Event::Route("100.119.0.0/16".parse().unwrap())
            ]
        );
        assert_eq!(c.counters().refused_routes, 4);
        let dev = [100, 118, 0, 2];
        let ok = Bytes::from(tcp4(dev, 4000, [10, 20, 0, 10], 80, 0x02, 1));
        c.handle_link_packet(LinkId(1), ok.clone(), now);
        assert_eq!(drain(&mut c), vec![Transmit::Site(ok)]);
        for refused in [
            tcp4(dev, 4001, [10, 20, 0, 10], 22, 0x02, 1),
            udp4(dev, 4002, [10, 20, 0, 53], 53, b"q"),
            tcp4(dev, 4003, [10, 20, 0, 200], 443, 0x02, 1),
            tcp4(dev, 4004, [192, 168, 1, 1], 80, 0x02, 1),
        ] {
            c.handle_link_packet(LinkId(1), Bytes::from(refused), now);
        }
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.counters().drops.not_allowed, 4);
        assert_eq!(c.open_flows(), 1, "refused packets open no flows");
        // Names: outside the zones, no resolution at all; inside but resolving elsewhere,
        // the waiting packets are dropped.
        let d: IpAddr = "100.118.0.2".parse().unwrap();
        let syn: IpAddr = "100.119.0.9".parse().unwrap();
        c.handle_map_name((d, syn), "intranet.evil.example".into(), &[]);
        assert!(!std::iter::from_fn(|| c.poll_event()).any(|e| matches!(e, Event::Resolve { .. })));
        c.handle_map_name((d, syn), "wiki.corp.example".into(), &[]);
        assert!(matches!(c.poll_event(), Some(Event::Resolve { .. })));
        let p = Bytes::from(tcp4(dev, 4005, [100, 119, 0, 9], 80, 0x02, 1));
        c.handle_link_packet(LinkId(1), p.clone(), now);
        c.handle_name_resolved(
            (d, syn),
            "wiki.corp.example".into(),
            Ok(Ipv4Addr::new(10, 20, 0, 200)),
        );
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.counters().refused_names, 2);
        // Resolving to the allowed host: port 80 passes, port 22 to the same name does not.
        c.handle_map_name((d, syn), "wiki.corp.example".into(), &[]);
        c.handle_link_packet(LinkId(1), p.clone(), now);
        c.handle_name_resolved(
            (d, syn),
            "wiki.corp.example".into(),
            Ok(Ipv4Addr::new(10, 20, 0, 10)),
        );
        assert_eq!(drain(&mut c), vec![Transmit::Site(p)]);
        // A new second: the log budget is fresh for the refusal checked below.
        c.handle_timeout(now + Duration::from_secs(1));
        while c.poll_event().is_some() {}
        c.handle_link_packet(
            LinkId(1),
            Bytes::from(tcp4(dev, 4006, [100, 119, 0, 9], 22, 0x02, 1)),
            now,
        );
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.counters().drops.not_allowed, 5);
        // Every refusal was logged (under the per-second limit), with what and why.
        let logged: Vec<Event> = std::iter::from_fn(|| c.poll_event()).collect();
        assert!(
            logged.iter().any(|e| matches!(e, Event::Refused { what, why: Refusal::Port } if what == "tcp 100.118.0.2 -> 10.20.0.10:22")),
            "{logged:?}"
        );
    }

    #[test]
    fn refusals_past_the_log_limit_are_summed_up() {
        let now = Instant::now();
        let mut c = ConnectorState::new(now, site_allowlist());
        up(&mut c, 1, 1400);
        for port in 0..100u16 {
            c.handle_link_packet(
                LinkId(1),
                Bytes::from(tcp4([100, 118, 0, 2], port, [10, 20, 1, 1], 80, 0x02, 1)),
                now,
            );
        }
        c.handle_timeout(now + Duration::from_secs(1));
        let events: Vec<Event> = std::iter::from_fn(|| c.poll_event()).collect();
        let lines = events
            .iter()
            .filter(|e| matches!(e, Event::Refused { .. }))
            .count();
        assert_eq!(lines, REFUSALS_LOGGED_PER_SECOND as usize);
        assert!(events.contains(&Event::RefusedMore(90)), "{events:?}");
        assert_eq!(c.counters().drops.not_allowed, 100);
    }

    /// A broker (after a failover, say) says a synthetic address now stands for another name:
    /// the old translation is dropped at once, so the flow's packets wait for the new one
    /// instead of following the stale one; the kernel's element is replaced, not added twice.
    #[test]
    fn a_new_name_for_a_synthetic_address_never_follows_the_old_translation() {
        let now = Instant::now();
        let mut c = ConnectorState::new(now, site_allowlist());
        up(&mut c, 1, 1400);
        while c.poll_event().is_some() {}
        let dev: IpAddr = "100.118.0.2".parse().unwrap();
        let syn: IpAddr = "100.119.0.9".parse().unwrap();
        c.handle_map_name((dev, syn), "wiki.corp.example".into(), &[]);
        let _ = c.poll_event();
        c.handle_name_resolved(
            (dev, syn),
            "wiki.corp.example".into(),
            Ok(Ipv4Addr::new(10, 20, 0, 10)),
        );
        let p = Bytes::from(tcp4([100, 118, 0, 2], 4000, [100, 119, 0, 9], 80, 0x02, 1));
        c.handle_link_packet(LinkId(1), p.clone(), now);
        assert_eq!(drain(&mut c), vec![Transmit::Site(p.clone())]);
        // Now the same address stands for payroll: nothing goes out until its translation is in.
        c.handle_map_name((dev, syn), "payroll.corp.example".into(), &[]);
        assert_eq!(
            c.poll_event(),
            Some(Event::Resolve {
                key: (dev, syn),
                name: "payroll.corp.example".into(),
                previous: Some(Ipv4Addr::new(10, 20, 0, 10)),
            }),
            "the kernel's old element is named for replacement"
        );
        c.handle_link_packet(LinkId(1), p.clone(), now);
        assert!(
            drain(&mut c).is_empty(),
            "a packet followed the stale translation"
        );
        c.handle_name_resolved(
            (dev, syn),
            "payroll.corp.example".into(),
            Ok(Ipv4Addr::new(10, 20, 0, 30)),
        );
        assert_eq!(drain(&mut c), vec![Transmit::Site(p)]);
    }

    /// Address-based deny rules reach names: a name that resolves at the site to an address
    /// the device's deny rules forbid carries nothing there (on the denied port), whatever the
    /// name's own rule allows.
    #[test]
    fn deny_rules_apply_to_the_address_a_name_resolves_to() {
        let now = Instant::now();
        let mut c = ConnectorState::new(now, site_allowlist());
        up(&mut c, 1, 1400);
        while c.poll_event().is_some() {}
        let dev: IpAddr = "100.118.0.2".parse().unwrap();
        let syn: IpAddr = "100.119.0.9".parse().unwrap();
        c.handle_map_name(
            (dev, syn),
            "db.corp.example".into(),
            &["10.20.0.10:5432".into()],
        );
        let _ = c.poll_event();
        let to_db = Bytes::from(tcp4(
            [100, 118, 0, 2],
            4000,
            [100, 119, 0, 9],
            5432,
            0x02,
            1,
        ));
        c.handle_link_packet(LinkId(1), to_db.clone(), now);
        c.handle_name_resolved(
            (dev, syn),
            "db.corp.example".into(),
            Ok(Ipv4Addr::new(10, 20, 0, 10)),
        );
        assert!(
            drain(&mut c).is_empty(),
            "the waiting packet to a denied address went out"
        );
        c.handle_link_packet(LinkId(1), to_db, now);
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.counters().drops.denied_at_site, 2);
        // Another port of the same host is not what the rule denies.
        let web = Bytes::from(tcp4([100, 118, 0, 2], 4001, [100, 119, 0, 9], 80, 0x02, 1));
        c.handle_link_packet(LinkId(1), web.clone(), now);
        assert_eq!(drain(&mut c), vec![Transmit::Site(web)]);
        let logged: Vec<Event> = std::iter::from_fn(|| c.poll_event()).collect();
        assert!(
            logged.iter().any(|e| matches!(
                e,
                Event::Refused {
                    why: Refusal::Denied,
                    ..
                }
            )),
            "{logged:?}"
        );
    }

    /// Two names for one pair in quick succession (a broker failover while the first is still
    /// resolving): the second is resolved only after the first is done, the first releases
    /// nothing, and the packets go out once the wanted name's translation is in.
    #[test]
    fn a_late_resolution_of_an_old_name_releases_nothing() {
        let now = Instant::now();
        let mut c = ConnectorState::new(now, site_allowlist());
        up(&mut c, 1, 1400);
        while c.poll_event().is_some() {}
        let dev: IpAddr = "100.118.0.2".parse().unwrap();
        let syn: IpAddr = "100.119.0.9".parse().unwrap();
        c.handle_map_name((dev, syn), "wiki.corp.example".into(), &[]);
        assert!(matches!(c.poll_event(), Some(Event::Resolve { .. })));
        let p = Bytes::from(tcp4([100, 118, 0, 2], 4000, [100, 119, 0, 9], 80, 0x02, 1));
        c.handle_link_packet(LinkId(1), p.clone(), now);
        c.handle_map_name((dev, syn), "payroll.corp.example".into(), &[]);
        assert_eq!(
            c.poll_event(),
            None,
            "two resolutions in flight for one pair"
        );
        // wiki comes back (and the shell installed it in the kernel): nothing is released,
        // payroll is resolved next, replacing wiki's element.
        c.handle_name_resolved(
            (dev, syn),
            "wiki.corp.example".into(),
            Ok(Ipv4Addr::new(10, 20, 0, 10)),
        );
        assert!(drain(&mut c).is_empty(), "packets followed the old name");
        assert_eq!(
            c.poll_event(),
            Some(Event::Resolve {
                key: (dev, syn),
                name: "payroll.corp.example".into(),
                previous: Some(Ipv4Addr::new(10, 20, 0, 10)),
            })
        );
        c.handle_name_resolved(
            (dev, syn),
            "payroll.corp.example".into(),
            Ok(Ipv4Addr::new(10, 20, 0, 30)),
        );
        assert_eq!(drain(&mut c), vec![Transmit::Site(p)]);
    }
}
