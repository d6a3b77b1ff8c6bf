//! The site loop: owns the pure [`ConnectorState`] and moves packets between the links and
//! the TUN device (offloads: coalesced writes, 64 KiB reads). Link tasks, the name resolver
//! and the health checker talk to it through one channel; metrics and the drain read what it
//! publishes. Starts a link task for every broker configured or announced by a broker.

use std::collections::HashMap;
use std::net::{Ipv4Addr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use tracing::{debug, info, warn};

use sekisho_proto::connector::{Allowlist, ConnectorState, Event, Key, LinkParams, Transmit};
use sekisho_proto::link::{HealthCheck, LinkId};
use sekisho_sys::link::{LinkSender, Sent};
use sekisho_sys::tun::{TunReader, TunWriter};
use sekisho_sys::{AsyncDevice, Netlink};

use crate::ConnectorConfig;
use crate::health::State;
use crate::link::{Linked, link_task, send_health};
use crate::names;

/// The TUN device's MTU: packets from devices are at most their own tunnel MTU.
pub const TUN_MTU: u16 = 1500;
/// Events taken at once before the output is flushed.
const EVENTS_PER_TURN: usize = 64;
/// TUN reads taken at once.
const TUN_READS_PER_TURN: usize = 8;
/// How often the state is published for metrics and the drain.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// What a link task (or the health checker) tells the site loop.
pub enum LinkEvent {
    Up {
        broker: String,
        linked: Linked,
    },
    Down {
        broker: String,
        link: LinkId,
        reason: String,
    },
    Packets {
        link: LinkId,
        packets: Vec<Bytes>,
    },
    Name(NameEvent),
    /// A broker's list of every broker now.
    Brokers(Vec<String>),
    /// Draining started or the set of unreachable applications changed: tell every broker.
    HealthChanged,
}

/// Name-translation events, from the tasks that read the broker's messages and resolve names.
pub enum NameEvent {
    Map {
        key: Key,
        name: String,
        /// What the device's deny rules forbid at the site (allowlist syntax).
        deny: Vec<String>,
    },
    Done {
        key: Key,
        name: String,
        result: Result<Ipv4Addr, String>,
    },
}

/// nftables table name for this connector's TUN device.
pub fn nft_table(tun: &str) -> String {
    format!(
        "sekisho_{}",
        tun.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

async fn nft(script: &str) -> Result<()> {
    Ok(sekisho_sys::nft(script).await?)
}

/// The connector's nftables table: source NAT for packets from the tunnel into the site; the
/// kernel's copy of the allowlist (a packet from the tunnel is forwarded only to an allowed
/// network, protocol and port, after destination NAT so names are checked by the address
/// they resolved to; the rest is counted in `refused` and dropped); nothing from the site into
/// the tunnel that is not a reply; nothing from the tunnel to the connector host itself; and,
/// on the site interfaces whose forwarding the connector turned on (`guarded`), nothing
/// forwarded that does not go to the tunnel, so the host routes for Sekisho only.
pub fn nat_script(tun: &str, allow: &Allowlist, guarded: &[String]) -> String {
    let t = nft_table(tun);
    let sets = allow.nft_sets();
    let elements = |v: &[String]| {
        if v.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", v.join(", "))
        }
    };
    let guards: String = guarded
        .iter()
        .map(|i| format!("             iifname \"{i}\" oifname != \"{tun}\" counter drop\n"))
        .collect();
    format!(
        "table inet {t} {{}}\n\
         delete table inet {t}\n\
         table inet {t} {{\n\
           counter refused {{}}\n\
           counter to_host {{}}\n\
           set allow_any4 {{ type ipv4_addr; flags interval; auto-merge;{any4} }}\n\
           set allow_ports4 {{ type ipv4_addr . inet_service; flags interval;{ports4} }}\n\
           set allow_any6 {{ type ipv6_addr; flags interval; auto-merge;{any6} }}\n\
           set allow_ports6 {{ type ipv6_addr . inet_service; flags interval;{ports6} }}\n\
           map synth4 {{ type ipv4_addr . ipv4_addr : ipv4_addr; }}\n\
           chain prerouting {{\n\
             type nat hook prerouting priority dstnat; policy accept;\n\
             iifname \"{tun}\" dnat ip to ip saddr . ip daddr map @synth4\n\
           }}\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             iifname \"{tun}\" oifname != \"{tun}\" masquerade\n\
           }}\n\
           chain input {{\n\
             type filter hook input priority filter; policy accept;\n\
             iifname \"{tun}\" counter name to_host drop\n\
           }}\n\
           chain forward {{\n\
             type filter hook forward priority filter; policy accept;\n\
             oifname \"{tun}\" ct state established,related accept\n\
             oifname \"{tun}\" counter drop\n\
             iifname \"{tun}\" ct state established,related accept\n\
             iifname \"{tun}\" ip daddr @allow_any4 accept\n\
             iifname \"{tun}\" meta l4proto {{ tcp, udp }} ip daddr . th dport @allow_ports4 accept\n\
             iifname \"{tun}\" ip6 daddr @allow_any6 accept\n\
             iifname \"{tun}\" meta l4proto {{ tcp, udp }} ip6 daddr . th dport @allow_ports6 accept\n\
             iifname \"{tun}\" counter name refused drop\n\
{guards}\
           }}\n\
         }}\n",
        any4 = elements(&sets.any4),
        ports4 = elements(&sets.ports4),
        any6 = elements(&sets.any6),
        ports6 = elements(&sets.ports6),
    )
}

pub async fn install_nat(tun: &str, allow: &Allowlist, guarded: &[String]) -> Result<()> {
    nft(&nat_script(tun, allow, guarded)).await
}

pub async fn remove_nat(tun: &str) {
    let t = nft_table(tun);
    if let Err(e) = nft(&sekisho_sys::nft_delete_table("inet", &t)).await {
        warn!("cannot remove nftables table {t}: {e:#}");
    }
}

/// A live link as the loop holds it.
struct LinkHandle {
    broker: String,
    sender: LinkSender,
    socket: Arc<StdUdpSocket>,
}

/// The loop's I/O resources.
pub struct SiteIo<'a> {
    pub tun: &'a AsyncDevice,
    pub tun_name: &'a str,
    pub netlink: &'a Netlink,
    pub index: u32,
}

/// Runs the site side until the connector stops.
pub async fn site_loop(
    config: Arc<ConnectorConfig>,
    io: SiteIo<'_>,
    state: Arc<State>,
    events: tokio::sync::mpsc::Sender<LinkEvent>,
    mut rx: tokio::sync::mpsc::Receiver<LinkEvent>,
) {
    // Brokers from the config are always linked; brokers announced by brokers come and go
    // with the deployment's registry.
    let configured: Vec<String> = std::iter::once(&config.broker)
        .chain(config.brokers.iter())
        .cloned()
        .collect();
    let mut tasks: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let start_link = |b: &str, tasks: &mut HashMap<_, _>| {
        tasks.insert(
            b.to_string(),
            tokio::spawn(link_task(
                config.clone(),
                b.to_string(),
                events.clone(),
                state.clone(),
            )),
        );
    };
    for b in &configured {
        if !tasks.contains_key(b) {
            start_link(b, &mut tasks);
        }
    }
    let (checks_tx, checks_rx) = tokio::sync::watch::channel(Vec::<HealthCheck>::new());
    let resolver = match names::resolver(&config.dns_servers) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            warn!("no DNS resolver for name-based applications: {e:#}");
            None
        }
    };
    {
        let events = events.clone();
        tokio::spawn(crate::health::check_loop(
            state.clone(),
            checks_rx,
            resolver.clone(),
            config.allow.clone(),
            move || {
                let _ = events.try_send(LinkEvent::HealthChanged);
            },
        ));
    }
    let table = nft_table(io.tun_name);
    let mut core = ConnectorState::new(Instant::now(), config.allow.clone());
    for dns in &config.dns_servers {
        core.protect(*dns);
    }
    let mut links: HashMap<LinkId, LinkHandle> = HashMap::new();
    let mut reader = TunReader::new(TUN_MTU);
    let mut writer = TunWriter::default();
    let mut publish = tokio::time::interval(PUBLISH_EVERY);
    // The kernel's drop counts of link sockets that are gone (so the total never goes down).
    let mut retired_drops = 0u64;
    loop {
        let wake = core
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            Some(ev) = rx.recv() => {
                let mut next = Some(ev);
                let mut taken = 0;
                while let Some(ev) = next.take() {
                    match ev {
                        LinkEvent::Packets { link, packets } => {
                            let now = Instant::now();
                            for p in packets {
                                core.handle_link_packet(link, p, now);
                            }
                        }
                        LinkEvent::Up { broker, linked } => {
                            state.set_link(&broker, true);
                            if *checks_tx.borrow() != linked.health_checks {
                                let _ = checks_tx.send(linked.health_checks.clone());
                            }
                            let (draining, unreachable) = (state.draining(), state.unreachable());
                            if draining || !unreachable.is_empty() {
                                tokio::spawn(send_health(linked.sender.clone(), draining, unreachable));
                            }
                            core.protect(linked.sender.connection().remote_address().ip());
                            core.handle_link_up(linked.link, &broker, LinkParams {
                                device_ranges: linked.device_ranges.clone(),
                                app_ranges: linked.app_ranges.clone(),
                                max_datagram: linked.sender.max_datagram(),
                            });
                            for b in &linked.brokers {
                                if !tasks.contains_key(b) {
                                    info!(broker = %b, "a broker announced another broker; linking to it too");
                                    start_link(b, &mut tasks);
                                }
                            }
                            let stale: Vec<LinkId> = links
                                .iter()
                                .filter(|(_, l)| l.broker == broker)
                                .map(|(id, _)| *id)
                                .collect();
                            for id in stale {
                                if let Some(l) = links.remove(&id) {
                                    retire(&mut retired_drops, l);
                                }
                            }
                            links.insert(linked.link, LinkHandle {
                                broker,
                                sender: linked.sender,
                                socket: linked.socket,
                            });
                        }
                        LinkEvent::Down { broker, link, reason } => {
                            debug!(broker = %broker, %reason, "link down");
                            state.set_link(&broker, false);
                            if let Some(l) = links.remove(&link) {
                                retire(&mut retired_drops, l);
                            }
                            core.handle_link_down(link);
                        }
                        LinkEvent::Brokers(list) => {
                            for b in &list {
                                if !tasks.contains_key(b) {
                                    info!(broker = %b, "a broker joined; linking to it");
                                    start_link(b, &mut tasks);
                                }
                            }
                            let gone: Vec<String> = tasks
                                .keys()
                                .filter(|b| !list.contains(b) && !configured.contains(b))
                                .cloned()
                                .collect();
                            for b in gone {
                                info!(broker = %b, "a broker left the deployment; dropping its link");
                                if let Some(t) = tasks.remove(&b) {
                                    t.abort();
                                }
                                let ids: Vec<LinkId> = links
                                    .iter()
                                    .filter(|(_, l)| l.broker == b)
                                    .map(|(id, _)| *id)
                                    .collect();
                                for id in ids {
                                    if let Some(l) = links.remove(&id) {
                                        l.sender.connection().close(0u32.into(), b"broker left");
                                        retire(&mut retired_drops, l);
                                    }
                                    core.handle_link_down(id);
                                }
                                state.forget_link(&b);
                            }
                        }
                        LinkEvent::HealthChanged => {
                            let (draining, unreachable) = (state.draining(), state.unreachable());
                            for l in links.values() {
                                tokio::spawn(send_health(l.sender.clone(), draining, unreachable.clone()));
                            }
                        }
                        LinkEvent::Name(NameEvent::Map { key, name, deny }) => core.handle_map_name(key, name, &deny),
                        LinkEvent::Name(NameEvent::Done { key, name, result }) => {
                            match &result {
                                Ok(real) => names::log_installed(&name, &key, *real),
                                Err(e) => names::log_failed(&name, e),
                            }
                            core.handle_name_resolved(key, name, result.map_err(|_| ()));
                        }
                    }
                    taken += 1;
                    if taken < EVENTS_PER_TURN {
                        next = rx.try_recv().ok();
                    }
                }
            }
            r = reader.recv(io.tun) => match r {
                Ok(_) => {
                    let now = Instant::now();
                    for p in reader.take_packets() {
                        core.handle_site_packet(p, now);
                    }
                    for _ in 1..TUN_READS_PER_TURN {
                        if reader.try_recv(io.tun).is_err() {
                            break;
                        }
                        for p in reader.take_packets() {
                            core.handle_site_packet(p, now);
                        }
                    }
                }
                Err(e) => debug!("TUN read error: {e}"),
            },
            _ = tokio::time::sleep_until(wake.into()) => core.handle_timeout(Instant::now()),
            _ = publish.tick() => {
                // QUIC's path MTU moves (discovery up, black-hole detection down to the floor).
                for (id, l) in &links {
                    core.handle_link_mtu(*id, l.sender.max_datagram());
                }
                publish_state(&core, &links, retired_drops, &state, io.tun_name)
            }
        }
        // Output: packets, then what else the state asks for.
        let mut write_failed = 0u64;
        let (mut congested, mut too_large, mut closed) = (0u64, 0u64, 0u64);
        while let Some(t) = core.poll_transmit() {
            match t {
                Transmit::Site(p) => {
                    writer.push(&p);
                    if writer.full() {
                        write_failed += writer.flush(io.tun).await.failed as u64;
                    }
                }
                Transmit::Link { link, packet } => match links.get(&link) {
                    Some(l) => match l.sender.send(packet) {
                        Sent::Queued => {}
                        Sent::Congested => congested += 1,
                        Sent::TooLarge => too_large += 1,
                        Sent::Closed => closed += 1,
                    },
                    None => closed += 1,
                },
            }
        }
        write_failed += writer.flush(io.tun).await.failed as u64;
        if write_failed + congested + too_large + closed > 0 {
            core.count_drops(|d| {
                d.site_write_failed += write_failed;
                d.link_congested += congested;
                d.too_large += too_large;
                d.link_closed += closed;
            });
        }
        state.set_flows(core.open_flows());
        while let Some(ev) = core.poll_event() {
            match ev {
                Event::Refused { what, why } => {
                    warn!(refused = %what, "refused: {}", why.text());
                    ship_refusal(
                        &state,
                        serde_json::json!({"refused": what.to_string(),
                        "why": why.text()}),
                    );
                }
                Event::RefusedMore(n) => {
                    warn!(
                        count = n,
                        "refused {n} more in the last second (not logged one by one)"
                    );
                    ship_refusal(&state, serde_json::json!({"refused_more": n, "seconds": 1}));
                }
                Event::Unroute(net) => {
                    if let Err(e) = io.netlink.del_route(io.index, net).await {
                        warn!("cannot stop routing {net} into the tunnel: {e}");
                    }
                }
                Event::Route(net) => {
                    if let Err(e) = io.netlink.add_route(io.index, net).await {
                        warn!("cannot route {net} into the tunnel: {e}");
                    }
                }
                Event::Resolve {
                    key,
                    name,
                    previous,
                } => {
                    let Some(resolver) = resolver.clone() else {
                        names::log_failed(&name, "no resolver");
                        core.handle_name_resolved(key, name, Err(()));
                        continue;
                    };
                    let events = events.clone();
                    let table = table.clone();
                    let allow = config.allow.clone();
                    tokio::spawn(async move {
                        let result = match names::resolve(&resolver, &name).await {
                            // Never installed when the address is outside the allowlist.
                            Ok(real) if allow.permits_resolved(real.into()).is_err() => Err(
                                format!("resolved to {real}, outside the connector's allowlist"),
                            ),
                            Ok(real) => {
                                // The core tracks what the kernel holds; should it be wrong,
                                // the other form of the script puts the element in anyway.
                                let first =
                                    nft(&names::map_script(&table, &key, real, previous)).await;
                                let done = match first {
                                    Ok(()) => Ok(()),
                                    Err(_) => {
                                        nft(&names::replace_script(
                                            &table,
                                            &key,
                                            real,
                                            previous.is_none(),
                                        ))
                                        .await
                                    }
                                };
                                done.map(|()| real).map_err(|e| format!("{e:#}"))
                            }
                            Err(e) => Err(e),
                        };
                        let _ = events
                            .send(LinkEvent::Name(NameEvent::Done { key, name, result }))
                            .await;
                    });
                }
            }
        }
    }
}

/// Keeps the drop count of a link's socket that goes away.
/// An allowlist refusal for the SIEM (`events` records): what a broker asked and why not.
fn ship_refusal(state: &State, detail: serde_json::Value) {
    use sekisho_sys::logship::{Record, RecordKind, Severity, now_ms};
    let Some(s) = state.shipper.get() else {
        return;
    };
    if !s.wants(RecordKind::Events) {
        return;
    }
    let t = now_ms();
    s.send(std::sync::Arc::new(Record {
        kind: RecordKind::Events,
        time_ms: t,
        severity: Severity::Warning,
        msgid: "refused".into(),
        body: sekisho_proto::ocsf::connector_refusal(&detail, t),
    }));
}

fn retire(total: &mut u64, l: LinkHandle) {
    *total += sekisho_sys::udp::socket_drops(l.socket.as_ref()).unwrap_or(0);
}

/// Publishes counters, flows and links for metrics, stats and the drain.
fn publish_state(
    core: &ConnectorState,
    links: &HashMap<LinkId, LinkHandle>,
    retired_drops: u64,
    state: &State,
    tun_name: &str,
) {
    let mut view = crate::health::DataView {
        counters: core.counters(),
        links: core.links(),
        tun: sekisho_sys::tun::interface_drops(tun_name),
        socket_drops: retired_drops,
    };
    for l in links.values() {
        view.socket_drops += sekisho_sys::udp::socket_drops(l.socket.as_ref()).unwrap_or(0);
    }
    state.publish(view);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is valid nftables, checked by `nft -c` when it can run here (root).
    #[test]
    fn nft_accepts_the_table_with_and_without_entries() {
        use std::io::Write;
        for (items, guarded) in [
            (
                &[
                    "10.20.0.0/24",
                    "10.20.0.10",
                    "10.20.1.0/24:80",
                    "10.20.1.10:80,443",
                    "10.20.1.10:80,443,8000-8100",
                    "[fd00::5]:443",
                    "fd00:1::/64",
                    "corp.example",
                ][..],
                vec!["eth0".to_string()],
            ),
            (&["corp.example"][..], vec![]),
        ] {
            let allow = Allowlist::parse(items).unwrap();
            let script = nat_script("sekisho0", &allow, &guarded);
            assert!(script.contains("counter name refused drop"), "{script}");
            let Ok(mut child) = std::process::Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
            else {
                return;
            };
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Operation not permitted") {
                return;
            }
            assert!(out.status.success(), "{err}\n{script}");
        }
    }
}
