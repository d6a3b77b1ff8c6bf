//! The services a device reaches inside its tunnel, at the device range's first address:
//! posture tokens (UDP 7443), application names (UDP 53), its status here (UDP 7444) and echo
//! (the client's liveness and RTT probes).

use super::BrokerState;
use super::events::{AppDnsRecord, Event, PostureRecord};
use super::peers::PeerSlot;
use crate::api::{STATUS_PORT, TunnelStatus};
use crate::dns::{AppName, DNS_PORT};
use crate::packet::{self, FlowKey};
use crate::posture::{POSTURE_PORT, TokenAnswer, TokenError};
use std::net::IpAddr;

impl BrokerState {
    /// A packet from peer `slot` to the service address.
    pub(super) fn handle_service(
        &mut self,
        slot: PeerSlot,
        key: &FlowKey,
        pkt: &[u8],
        now: std::time::Instant,
    ) {
        if !self.peers.get_mut(&slot).is_some_and(|p| p.may_ask(now)) {
            self.counters.drops.service_rate_limited += 1;
            return;
        }
        if key.proto == packet::PROTO_UDP && key.dport == POSTURE_PORT {
            self.handle_token(slot, key, pkt);
        } else if key.proto == packet::PROTO_UDP && key.dport == DNS_PORT {
            self.handle_app_dns(slot, key, pkt);
        } else if key.proto == packet::PROTO_UDP && key.dport == STATUS_PORT {
            self.handle_status(slot, key);
        } else if let Some(e) = packet::echo(pkt).filter(|e| e.request) {
            let mut reply = std::mem::take(&mut self.scratch);
            if let Some(n) =
                packet::build_echo(e.dst, e.src, false, e.id, e.seq, e.payload, &mut reply)
            {
                self.send_to_peer(slot, &reply[..n]);
            }
            self.scratch = reply;
        }
    }

    /// A posture token arrived inside the tunnel of peer `slot`: verify it against this
    /// tunnel's key and the wall clock, keep it if good, and answer either way.
    fn handle_token(&mut self, slot: PeerSlot, key: &FlowKey, pkt: &[u8]) {
        let Some(peer) = self.peers.get_mut(&slot) else {
            return;
        };
        let policy = &self.policy;
        let device = policy.device(peer.device);
        let token = packet::udp_payload(pkt)
            .and_then(|p| std::str::from_utf8(p).ok())
            .unwrap_or("");
        let verified = self
            .tokens
            .verify(token, self.unix_now, &peer.key)
            .and_then(|c| {
                // The token must also name the device and user the policy has for this key.
                if c.device != device.name || c.user != policy.user_of(peer.device).name {
                    Err(TokenError::WrongDevice(c.device.clone()))
                } else {
                    Ok(c)
                }
            });
        let mut record = PostureRecord {
            event: "posture",
            result: "accepted",
            device: device.name.clone(),
            user: policy.user_of(peer.device).name.clone(),
            reason: None,
            failing_checks: Vec::new(),
            exp: None,
        };
        let answer = match verified {
            Ok(claims) => {
                self.counters.posture.accepted += 1;
                record.failing_checks = claims
                    .checks
                    .iter()
                    .filter(|(_, ok)| !**ok)
                    .map(|(n, _)| n.clone())
                    .collect();
                record.exp = Some(claims.exp);
                let changed = peer
                    .posture
                    .as_ref()
                    .is_none_or(|old| old.checks != claims.checks);
                let answer = TokenAnswer {
                    accepted: true,
                    exp: claims.exp,
                    error: String::new(),
                };
                peer.posture = Some(claims);
                if changed {
                    peer.generation += 1;
                }
                answer
            }
            Err(e) => {
                self.counters.posture.refused += 1;
                record.result = "refused";
                record.reason = Some(format!("{}: {e}", e.kind()));
                TokenAnswer {
                    accepted: false,
                    exp: 0,
                    error: e.to_string(),
                }
            }
        };
        self.events.push_back(Event::Posture(record));
        let body = serde_json::to_vec(&answer).unwrap_or_default();
        self.answer_service(slot, key, &body);
    }

    /// The device's own view of its session here: broker name, latest denials, posture.
    fn handle_status(&mut self, slot: PeerSlot, key: &FlowKey) {
        let Some(peer) = self.peers.get(&slot) else {
            return;
        };
        let status = TunnelStatus {
            broker: self.config.name.clone(),
            denials: peer.denials.iter().cloned().collect(),
            posture_expires: peer.posture.as_ref().map(|p| p.exp),
            failing_checks: peer.failing_checks(),
            risk: peer.risk_status.as_deref().cloned(),
        };
        let body = serde_json::to_vec(&status).unwrap_or_default();
        self.answer_service(slot, key, &body);
    }

    /// Sends `body` back through the tunnel of peer `slot` as the UDP answer to the service
    /// request `key`.
    fn answer_service(&mut self, slot: PeerSlot, key: &FlowKey, body: &[u8]) {
        let mut reply = std::mem::take(&mut self.scratch);
        if reply.len() < body.len() + 64 {
            reply.resize(body.len() + 64, 0);
        }
        if let Some(n) = packet::build_udp(key.dst, key.dport, key.src, key.sport, body, &mut reply)
        {
            self.send_to_peer(slot, &reply[..n]);
        }
        self.scratch = reply;
    }

    /// A DNS query for a name in a private zone, from peer `slot`: an application this user
    /// may use gets a synthetic address (bound for the session), one the user may not use
    /// NXDOMAIN, any other name REFUSED (the client then resolves it upstream).
    fn handle_app_dns(&mut self, slot: PeerSlot, key: &FlowKey, pkt: &[u8]) {
        let Some(peer) = self.peers.get_mut(&slot) else {
            return;
        };
        let Some(query) = packet::udp_payload(pkt) else {
            self.counters.app_dns.malformed += 1;
            return;
        };
        let policy = &self.policy;
        let user = policy.device(peer.device).user;
        let mut record = AppDnsRecord {
            event: "app-dns",
            device: policy.device(peer.device).name.clone(),
            user: policy.user_of(peer.device).name.clone(),
            name: String::new(),
            result: "not-an-application",
            application: None,
            address: None,
        };
        let answer = crate::dns::app_answer(query, |name| {
            record.name = name.to_string();
            let Some(app) = policy.app_for_name(name) else {
                return AppName::NotApp;
            };
            let app_name = &policy.applications[app as usize].name;
            record.application = Some(app_name.clone());
            if !policy.user_may_use(user, app) {
                record.result = "nxdomain";
                return AppName::NotEntitled;
            }
            match peer.names.assign(name, app_name) {
                Some(a) => {
                    record.result = "synthetic";
                    record.address = Some(IpAddr::V4(a));
                    AppName::Entitled(vec![IpAddr::V4(a)])
                }
                None => {
                    record.result = "full";
                    AppName::NotEntitled
                }
            }
        });
        let Some(answer) = answer else {
            self.counters.app_dns.malformed += 1;
            return;
        };
        self.counters.app_dns.queries += 1;
        if !record.name.is_empty() {
            self.events.push_back(Event::AppDns(record));
        }
        self.answer_service(slot, key, &answer);
    }
}
