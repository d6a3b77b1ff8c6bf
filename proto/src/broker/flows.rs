//! Flow authorization: a new flow is decided once against the policy (user, groups, posture,
//! application, port, protocol) and cached by 5-tuple with the connector it goes through; a
//! policy or posture change makes the cached decision stale, so it is decided anew on the
//! flow's next packet.

use std::sync::Arc;
use std::time::Instant;

use super::BrokerState;
use super::events::{DecisionRecord, Event, FlowMeta, FlowRecord, RiskMark};
use super::links::LinkId;
use super::peers::PeerSlot;
use crate::api::Denial;
use crate::flow::{FLOW_REPORT_EVERY, FlowEnd, FlowEntry, Meter, TcpEnd};
use crate::packet::FlowKey;
use crate::policy::{Action, AppId, Decision, DeviceId, Facts, Reason, SiteId};
use crate::risk::Level;

/// Where an allowed flow goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FlowRoute {
    /// To the application `app` of site `site`, through a connector.
    Site { site: SiteId, app: AppId },
    /// To the internet, through this broker's egress (full tunnel).
    Internet,
    /// Nowhere: the flow is denied.
    Nowhere,
}

/// The connector link of a flow to a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FlowLink {
    /// No connector found yet (none took new flows when it was decided).
    None,
    Via(LinkId),
    /// Its link closed; it gets another on its next packet.
    Gone,
}

impl FlowLink {
    pub(super) fn id(self) -> Option<LinkId> {
        match self {
            FlowLink::Via(l) => Some(l),
            _ => None,
        }
    }
}

/// A cached decision for one flow.
#[derive(Debug, Clone)]
pub struct Flow {
    allowed: bool,
    pub(super) peer: PeerSlot,
    route: FlowRoute,
    pub(super) link: FlowLink,
    /// How far the TCP flow has ended.
    tcp: TcpEnd,
    /// A packet came back: the flow is set up at its connector.
    answered: bool,
    generation: u64,
    peer_generation: u64,
    /// Bytes and packets each way since the flow began (carried across re-decisions).
    meter: Meter,
    /// Who and what, for its flow record (allowed flows only).
    meta: Option<Arc<FlowMeta>>,
}

impl Flow {
    /// Allowed, through a connector, and not ended: it counts towards the link's load.
    pub(super) fn open(&self) -> bool {
        self.allowed && self.link.id().is_some() && !self.closed()
    }
}

impl FlowEntry for Flow {
    fn allowed(&self) -> bool {
        self.allowed
    }
    fn owner(&self) -> u32 {
        self.peer.0
    }
    fn closed(&self) -> bool {
        self.tcp.ended()
    }
    fn reports(&self) -> bool {
        self.meta.is_some()
    }
}

/// What to do with a packet of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Forward: the flow is allowed, this way.
    Allow(FlowRoute, FlowLink),
    /// Answer with a deny reply.
    Deny,
    /// Drop silently (no such peer, connector-initiated, or no room in the flow table).
    Drop,
}

impl BrokerState {
    /// Looks up the flow `key` of peer `slot`, or decides it when it is new or its decision is
    /// stale (policy or posture changed). A flow that does not exist is only created when
    /// `may_create`: connectors and the internet cannot open flows. One table lookup when the
    /// decision is current.
    /// `bytes`: the packet's length, counted on the flow (from the device when `may_create`).
    pub(super) fn authorize(
        &mut self,
        slot: PeerSlot,
        key: &FlowKey,
        now: Instant,
        may_create: bool,
        tcp: TcpEnd,
        bytes: usize,
    ) -> Verdict {
        let verdict = self.decide_flow(slot, key, now, may_create, tcp, bytes);
        if tcp != TcpEnd::default() {
            // A FIN or reset may have ended the flow: it goes after the closed limit.
            self.flows.reschedule(key);
        }
        verdict
    }

    fn decide_flow(
        &mut self,
        slot: PeerSlot,
        key: &FlowKey,
        now: Instant,
        may_create: bool,
        tcp: TcpEnd,
        bytes: usize,
    ) -> Verdict {
        let generation = self.generation;
        let Some(peer) = self.peers.get(&slot) else {
            return Verdict::Drop;
        };
        let peer_generation = peer.generation;
        let device = peer.device;
        let risk = peer.risk;
        let previous = match self.flows.touch(key, now) {
            Some(flow)
                if flow.generation == generation
                    && flow.peer_generation == peer_generation
                    && flow.peer == slot =>
            {
                let was_ended = flow.tcp.ended();
                flow.tcp.merge(tcp);
                flow.answered |= !may_create;
                flow.meter.traffic.count(may_create, bytes);
                if let Some(meta) = &flow.meta
                    && let Some(r) =
                        flow.meter
                            .final_at_tcp_end(*key, was_ended, flow.tcp.ended(), now)
                {
                    emit_flow(
                        &mut self.aggregates,
                        &mut self.events,
                        &mut self.counters,
                        meta.clone(),
                        &r,
                    );
                }
                if !flow.allowed {
                    return Verdict::Deny;
                }
                // A flow moves when its connector is gone (or there was none yet), or, while
                // nothing came back yet (a SYN being retried), when its connector went silent
                // or drains: the retry then reaches the application through another one.
                let moves = match flow.link {
                    FlowLink::None | FlowLink::Gone => true,
                    FlowLink::Via(l) => !flow.answered && !self.pool.takes_new(l),
                };
                if let FlowRoute::Site { app, .. } = flow.route
                    && may_create
                    && moves
                {
                    let p = &self.policy;
                    let app = &p.applications[app as usize];
                    if let Some(link) = self.pool.pick(&p.sites[app.site as usize], &app.name) {
                        if flow.link != FlowLink::None {
                            self.counters.flows.moved += 1;
                        }
                        if let Some(b) = peer.names.lookup(key.dst) {
                            self.events.push_back(Event::MapName {
                                link,
                                device: key.src,
                                synthetic: key.dst,
                                name: b.name.clone(),
                                deny: p.site_denials(peer.device, app.site),
                            });
                        }
                        flow.link = FlowLink::Via(link);
                    } else {
                        flow.link = FlowLink::None;
                    }
                }
                return Verdict::Allow(flow.route, flow.link);
            }
            Some(flow) => Some((
                flow.allowed,
                flow.route,
                flow.link,
                flow.tcp,
                flow.answered,
                flow.meter,
            )),
            None if may_create => {
                // A device at its cap (or a full table) is refused before any decision work
                // or log line.
                if self.flows.room_for(key, slot.0, now).is_err() {
                    self.counters.drops.flow_table_full += 1;
                    return Verdict::Drop;
                }
                None
            }
            None => return Verdict::Drop,
        };
        // The connector it had, if that is still linked. (Its site is compared below by the
        // link's site in the current policy: a site index of the old policy may now name
        // another site.)
        let previous_link = match previous {
            Some((true, FlowRoute::Site { .. }, FlowLink::Via(link), _, _, _))
                if self.pool.contains(link) =>
            {
                Some(link)
            }
            _ => None,
        };
        let mut tcp = tcp;
        if let Some(p) = previous {
            tcp.merge(p.3);
        }
        let answered = !may_create || previous.is_some_and(|p| p.4);
        let mut meter = previous
            .map(|p| p.5)
            .unwrap_or_else(|| Meter::new(now, self.unix_now * 1000));
        meter.traffic.count(may_create, bytes);
        let previous = previous.map(|p| p.0);
        let p = &self.policy;
        let binding = peer.names.lookup(key.dst);
        let decision = if peer.names.contains(key.dst) {
            // A synthetic address: the flow is to the application whose name it stands for.
            match binding.and_then(|b| p.app_by_name(&b.app)) {
                Some(app) => p.evaluate_named(
                    peer.device,
                    key,
                    &Facts::new(peer.posture.as_ref(), self.unix_now).at_risk(peer.risk),
                    app,
                ),
                None => Decision {
                    action: Action::Deny,
                    application: None,
                    reason: Reason::DefaultDeny,
                    risk_logged: false,
                },
            }
        } else {
            p.evaluate(
                peer.device,
                key,
                &Facts::new(peer.posture.as_ref(), self.unix_now).at_risk(peer.risk),
            )
        };
        let allowed = decision.allowed();
        let route = match (allowed, decision.application) {
            (true, Some(a)) => FlowRoute::Site {
                site: p.applications[a as usize].site,
                app: a,
            },
            (true, None) => FlowRoute::Internet,
            (false, _) => FlowRoute::Nowhere,
        };
        // The flow's connector: the one it had (a flow stays on its connector), else the
        // least loaded healthy one of the site.
        let link = match route {
            FlowRoute::Site { site, app } => match previous_link {
                Some(link) if self.link_sites.get(&link) == Some(&site) => FlowLink::Via(link),
                _ if may_create => {
                    let app = &p.applications[app as usize];
                    match self.pool.pick(&p.sites[app.site as usize], &app.name) {
                        Some(picked) => {
                            if let Some(b) = binding {
                                self.events.push_back(Event::MapName {
                                    link: picked,
                                    device: key.src,
                                    synthetic: key.dst,
                                    name: b.name.clone(),
                                    deny: p.site_denials(peer.device, app.site),
                                });
                            }
                            FlowLink::Via(picked)
                        }
                        None => FlowLink::None,
                    }
                }
                _ => FlowLink::None,
            },
            _ => FlowLink::None,
        };
        // A flow re-checked after a policy change is logged only when its answer changed.
        if previous != Some(allowed) {
            self.note_decision(slot, device, key, &decision, now);
        }
        let meta = allowed.then(|| Arc::new(self.flow_meta(device, &decision, risk)));
        let flow = Flow {
            allowed,
            peer: slot,
            route,
            link,
            tcp,
            answered,
            generation,
            peer_generation,
            meter,
            meta,
        };
        match self.flows.insert(*key, flow, now) {
            Ok(_) if allowed => Verdict::Allow(route, link),
            Ok(_) => Verdict::Deny,
            Err(_) => {
                self.counters.drops.flow_table_full += 1;
                Verdict::Drop
            }
        }
    }

    /// Counts and logs a decision; a denial is also kept for the device's status.
    fn note_decision(
        &mut self,
        slot: PeerSlot,
        device: DeviceId,
        key: &FlowKey,
        d: &Decision,
        now: Instant,
    ) {
        let allowed = d.allowed();
        if allowed {
            self.counters.flows.allowed += 1;
        } else {
            self.counters.flows.denied += 1;
        }
        let result = if allowed { "allow" } else { "deny" };
        *self
            .decisions
            .entry((result, self.policy.reason_text(d.reason)))
            .or_insert(0) += 1;
        let logged = self
            .peers
            .get_mut(&slot)
            .is_some_and(|p| p.may_log(allowed, now));
        if !logged {
            // Counted above; it shows in the device's summary line.
            self.counters.flows.summarized += 1;
            return;
        }
        let risk = self.peers.get(&slot).map(|p| p.risk).unwrap_or_default();
        let record = self.record(device, key, d, risk);
        if !allowed && let Some(peer) = self.peers.get_mut(&slot) {
            peer.note_denial(Denial {
                at: self.unix_now,
                application: record.application.clone(),
                proto: record.proto.to_string(),
                dst: record.dst,
                dport: record.dport,
                rule: record.rule.clone(),
                reason: record.reason.to_string(),
                check: record.check.clone(),
            });
        }
        self.events.push_back(Event::Decision(record));
    }

    /// Who and what a flow of `device` is (its decision's and its traffic's records).
    fn flow_meta(&self, device: DeviceId, d: &Decision, risk: Level) -> FlowMeta {
        let p = &self.policy;
        let (app, reason) = (d.application, d.reason);
        let internet = matches!(reason, Reason::Egress(_) | Reason::EgressRefused(_));
        FlowMeta {
            device: p.device(device).name.clone(),
            user: p.user_of(device).name.clone(),
            application: match app {
                None if internet => Some("internet".to_string()),
                a => p.app_name(a).map(str::to_string),
            },
            site: app.map(|a| p.sites[p.applications[a as usize].site as usize].clone()),
            rule: p.rule_name(reason).map(str::to_string),
            sensitivity: app.map(|a| p.applications[a as usize].sensitivity),
            risk: RiskMark::of(d, risk),
            aggregated: app
                .is_some_and(|a| p.risk.aggregated(p.applications[a as usize].sensitivity)),
        }
    }

    /// Records for the flows that went (idle, ended, cut) and, for long ones still running,
    /// one per [`FLOW_REPORT_EVERY`] (looked for once a period: the table is not scanned every
    /// second).
    pub(super) fn report_flows(&mut self, now: Instant) {
        for (key, flow, last_seen, end) in self.flows.take_retired() {
            if let Some(meta) = flow.meta
                && !flow.meter.final_sent
            {
                let r = flow.meter.report(key, last_seen, end);
                emit_flow(
                    &mut self.aggregates,
                    &mut self.events,
                    &mut self.counters,
                    meta,
                    &r,
                );
            }
        }
        if now < self.next_progress_report {
            return;
        }
        self.next_progress_report = now + FLOW_REPORT_EVERY;
        // Aggregates of the period that ended.
        for (_, a) in self.aggregates.drain() {
            self.counters.flows.records += 1;
            self.events.push_back(Event::Flow(a));
        }
        let mut out = Vec::new();
        self.flows.for_each_mut(|key, flow, last_seen| {
            // Aggregated flows are counted when they end, not while they run.
            if let Some(meta) = &flow.meta
                && !meta.aggregated
                && !flow.meter.final_sent
                && now.saturating_duration_since(flow.meter.reported) >= FLOW_REPORT_EVERY
            {
                flow.meter.reported = now;
                let r = flow.meter.report(*key, last_seen, FlowEnd::Ongoing);
                out.push(FlowRecord::new(meta.clone(), &r));
            }
        });
        self.counters.flows.records += out.len() as u64;
        self.events.extend(out.into_iter().map(Event::Flow));
    }

    fn record(&self, device: DeviceId, key: &FlowKey, d: &Decision, risk: Level) -> DecisionRecord {
        let p = &self.policy;
        let reason = d.reason;
        let m = self.flow_meta(device, d, risk);
        // Below the monitored level with aggregation on: no destination in the record.
        let (sport, dst, dport) = if m.aggregated {
            (0, unspecified(key.dst), 0)
        } else {
            (key.sport, key.dst, key.dport)
        };
        DecisionRecord {
            event: "flow",
            decision: d.action,
            device: m.device,
            user: m.user,
            application: m.application,
            site: m.site,
            rule: m.rule,
            reason: p.reason_text(reason),
            check: p.check_name(reason).map(str::to_string),
            proto: key.proto_name(),
            src: key.src,
            sport,
            dst,
            dport,
            risk: m.risk,
        }
    }
}

/// The unspecified address of `a`'s family (records that leave destinations out).
fn unspecified(a: std::net::IpAddr) -> std::net::IpAddr {
    match a {
        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// A flow's record: as it is, or summed into its device's and application's aggregate for
/// the period, without its destination (flows below the monitored level with
/// `[risk] aggregate_below`).
fn emit_flow(
    aggregates: &mut std::collections::HashMap<(String, Option<String>), FlowRecord>,
    events: &mut std::collections::VecDeque<Event>,
    counters: &mut crate::broker::Counters,
    meta: Arc<FlowMeta>,
    r: &crate::flow::FlowReport,
) {
    if !meta.aggregated {
        counters.flows.records += 1;
        events.push_back(Event::Flow(FlowRecord::new(meta, r)));
        return;
    }
    let key = (meta.device.clone(), meta.application.clone());
    let a = aggregates.entry(key).or_insert_with(|| {
        let mut first = FlowRecord::new(meta.clone(), r);
        first.traffic = crate::flow::Traffic::default();
        first.sport = 0;
        first.dst = unspecified(r.key.dst);
        first.dport = 0;
        first.end = FlowEnd::Aggregate;
        first.flows = Some(0);
        first
    });
    a.traffic
        .add(true, r.traffic.packets_out, r.traffic.bytes_out);
    a.traffic
        .add(false, r.traffic.packets_in, r.traffic.bytes_in);
    a.start_ms = a.start_ms.min(r.start_ms);
    a.end_ms = a.end_ms.max(r.end_ms);
    a.duration_ms = a.end_ms - a.start_ms;
    a.flows = Some(a.flows.unwrap_or(0) + 1);
}
