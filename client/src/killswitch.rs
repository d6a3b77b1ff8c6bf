//! Full tunnel and kill switch: policy routing sends everything into the TUN device except
//! packets carrying the client's firewall mark (its WireGuard socket, excluded destinations),
//! and an nftables table lets nothing else leave the device: fail closed, also while the
//! tunnel is down and after the client stopped (unless the admin's policy allows disabling).
//!
//! Layout, per address family:
//! - rule `PRIO_SUPPRESS`: `lookup main suppress_prefixlength 0` — only when the local network
//!   is allowed: connected networks (and any other specific route) stay direct;
//! - rule `PRIO_TUNNEL`: `not fwmark MARK lookup TABLE`, where TABLE has a default route into
//!   the TUN device;
//! - nftables `inet sekisho_client`: a route hook marks packets to excluded networks and
//!   excluded names' addresses (so they are routed direct), and the output filter drops what
//!   is neither loopback, nor the tunnel, nor marked, nor DHCP, nor an allowed local network,
//!   counting it in the named counter `blocked`.
//!
//! Overrides (an admin's code, the captive-portal grace) open the device for their lifetime:
//! the table and rules are removed and put back when the time is up.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use sekisho_proto::tunnel::{LocalNetwork, OverrideKey, TunnelMode, UserTunnel, verify_override};
use sekisho_sys::{Netlink, Rule, nft, nft_delete_table};

pub const TABLE: &str = "sekisho_client";
const PRIO_SUPPRESS: u32 = 21320;
const PRIO_TUNNEL: u32 = 21321;

/// Where and how the guard works.
pub struct GuardConfig {
    pub tun: String,
    pub tun_index: u32,
    /// The device's overlay address (the source of rerouted packets, NATed when they go
    /// direct).
    pub device: IpAddr,
    /// The control APIs (HTTPS): reached direct, like the brokers' WireGuard endpoints.
    pub api: Vec<SocketAddr>,
    pub mark: u32,
    pub table: u32,
    /// The last tunnel settings and override keys, kept so a restart without network (boot)
    /// closes the device at once.
    pub state_file: PathBuf,
}

/// What the guard last knew from the control plane (also the state file's content).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Settings {
    /// This device's name (override codes name it).
    pub device: String,
    pub tunnel: UserTunnel,
    pub override_keys: Vec<OverrideKey>,
    /// Override codes an admin revoked (the control plane's word).
    #[serde(default)]
    pub revoked_overrides: Vec<String>,
    /// Override codes the control plane knows were used (here or elsewhere).
    #[serde(default)]
    pub used_elsewhere: Vec<String>,
    /// Override codes used here (kept until they expire): each works once.
    #[serde(default)]
    pub used_overrides: Vec<UsedOverride>,
}

/// An override code this device used, until it expires.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsedOverride {
    pub id: String,
    pub not_after: u64,
}

/// Why a verified override code may not open the device now, if it may not.
pub fn override_refusal(settings: &Settings, id: &str) -> Option<&'static str> {
    if settings.used_overrides.iter().any(|u| u.id == id)
        || settings.used_elsewhere.iter().any(|u| u == id)
    {
        Some("this override code was already used (each works once)")
    } else if settings.revoked_overrides.iter().any(|r| r == id) {
        Some("this override code was revoked by an admin")
    } else {
        None
    }
}

/// An open window: the kill switch is off until `until` (Unix seconds).
#[derive(Debug, Clone, Serialize)]
pub struct Open {
    pub until: u64,
    /// "override" or "captive-portal".
    pub reason: String,
    /// The override code's id, for the audit log.
    pub id: Option<String>,
}

/// The guard as `status` shows it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct GuardView {
    pub mode: String,
    pub tunnel_policy: String,
    /// "closed" (full tunnel, kill switch in place), "routing-only" (full tunnel, its firewall
    /// could not be installed: every packet is routed into the tunnel instead, and the
    /// firewall is retried), "open" (an override), "off" (split tunnel).
    pub kill_switch: String,
    /// Why the kill switch is not complete, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kill_switch_error: Option<String>,
    pub open: Option<Open>,
    pub local_network: String,
    pub exclude: Vec<IpNet>,
    pub exclude_domains: Vec<String>,
    pub allow_disable: bool,
    pub captive_grace_secs: u64,
}

pub enum GuardCmd {
    Settings(Settings),
    Override {
        code: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    Captive {
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// Names whose addresses go direct (full tunnel), shared with the DNS stub.
#[derive(Default)]
pub struct DirectNames {
    domains: RwLock<Vec<String>>,
}

impl DirectNames {
    /// True when `name` is excluded from the tunnel.
    pub fn matches(&self, name: &str) -> bool {
        let d = self.domains.read().unwrap_or_else(|e| e.into_inner());
        sekisho_proto::tunnel::in_any_zone(name, &d)
    }

    fn set(&self, domains: Vec<String>) {
        *self.domains.write().unwrap_or_else(|e| e.into_inner()) = domains;
    }
}

/// Lets `ips` (answers for an excluded name) go direct for `ttl` (at least a minute).
pub async fn add_direct(ips: &[IpAddr], ttl: u32) {
    let ttl = ttl.clamp(60, 86400);
    let (v4, v6) = by_family(ips, |i| i.is_ipv6(), |i| format!("{i} timeout {ttl}s"));
    let mut script = String::new();
    if !v4.is_empty() {
        script.push_str(&format!(
            "add element inet {TABLE} direct4 {{ {} }}\n",
            v4.join(", ")
        ));
    }
    if !v6.is_empty() {
        script.push_str(&format!(
            "add element inet {TABLE} direct6 {{ {} }}\n",
            v6.join(", ")
        ));
    }
    if !script.is_empty()
        && let Err(e) = nft(&script).await
    {
        warn!("cannot let an excluded name's addresses go direct: {e}");
    }
}

/// `items` as nftables set elements, split into IPv4 and IPv6.
fn by_family<T>(
    items: &[T],
    is_v6: impl Fn(&T) -> bool,
    element: impl Fn(&T) -> String,
) -> (Vec<String>, Vec<String>) {
    let (v6, v4): (Vec<&T>, Vec<&T>) = items.iter().partition(|i| is_v6(i));
    (
        v4.into_iter().map(&element).collect(),
        v6.into_iter().map(&element).collect(),
    )
}

/// The nftables table of a closed full tunnel. Pure: tests read it.
pub fn ruleset(
    tun: &str,
    mark: u32,
    device: IpAddr,
    exclude: &[IpNet],
    brokers: &[SocketAddr],
    api: &[SocketAddr],
    local: Option<&[IpNet]>,
) -> String {
    let nets = |n: &[IpNet]| by_family(n, |n| matches!(n, IpNet::V6(_)), |n| n.trunc().to_string());
    let pairs =
        |a: &[SocketAddr]| by_family(a, |a| a.is_ipv6(), |a| format!("{} . {}", a.ip(), a.port()));
    let elems = |e: Vec<String>| {
        if e.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", e.join(", "))
        }
    };
    let (broker4, broker6) = pairs(brokers);
    let (api4, api6) = pairs(api);
    let (ex4, ex6) = nets(exclude);
    let saddr = if device.is_ipv4() {
        "ip saddr"
    } else {
        "ip6 saddr"
    };
    let local_rules = match local {
        Some(local) => {
            let (l4, l6) = nets(local);
            format!(
                "    set local4 {{ type ipv4_addr; flags interval;{} }}\n\
                 \x20   set local6 {{ type ipv6_addr; flags interval;{} }}\n",
                elems(l4),
                elems(l6)
            )
        }
        None => String::new(),
    };
    let local_accept = if local.is_some() {
        "        ip daddr @local4 accept\n        ip6 daddr @local6 accept\n"
    } else {
        ""
    };
    format!(
        "{delete}table inet {TABLE} {{\n\
         \x20   set exclude4 {{ type ipv4_addr; flags interval;{ex4} }}\n\
         \x20   set exclude6 {{ type ipv6_addr; flags interval;{ex6} }}\n\
         \x20   set direct4 {{ type ipv4_addr; flags timeout; }}\n\
         \x20   set direct6 {{ type ipv6_addr; flags timeout; }}\n\
         \x20   set brokers4 {{ type ipv4_addr . inet_service;{b4} }}\n\
         \x20   set brokers6 {{ type ipv6_addr . inet_service;{b6} }}\n\
         \x20   set api4 {{ type ipv4_addr . inet_service;{a4} }}\n\
         \x20   set api6 {{ type ipv6_addr . inet_service;{a6} }}\n\
         {local_rules}\
         \x20   counter blocked {{ }}\n\
         \x20   chain route_out {{\n\
         \x20       type route hook output priority mangle; policy accept;\n\
         \x20       ip daddr @exclude4 meta mark set {mark}\n\
         \x20       ip6 daddr @exclude6 meta mark set {mark}\n\
         \x20       ip daddr @direct4 meta mark set {mark}\n\
         \x20       ip6 daddr @direct6 meta mark set {mark}\n\
         \x20       udp sport 68 udp dport 67 meta mark set {mark}\n\
         \x20       ip daddr . tcp dport @api4 meta mark set {mark}\n\
         \x20       ip6 daddr . tcp dport @api6 meta mark set {mark}\n\
         \x20   }}\n\
         \x20   chain nat_out {{\n\
         \x20       type nat hook postrouting priority srcnat; policy accept;\n\
         \x20       meta mark {mark} {saddr} {device} oifname != \"{tun}\" masquerade\n\
         \x20   }}\n\
         \x20   chain out {{\n\
         \x20       type filter hook output priority filter; policy drop;\n\
         \x20       oifname \"lo\" accept\n\
         \x20       oifname \"{tun}\" accept\n\
         \x20       meta mark {mark} accept\n\
         \x20       ip daddr . udp dport @brokers4 accept\n\
         \x20       ip6 daddr . udp dport @brokers6 accept\n\
         \x20       udp sport 68 udp dport 67 accept\n\
         \x20       icmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }} accept\n\
         {local_accept}\
         \x20       counter name blocked drop\n\
         \x20   }}\n\
         }}\n",
        delete = nft_delete_table("inet", TABLE),
        ex4 = elems(ex4),
        ex6 = elems(ex6),
        b4 = elems(broker4),
        b6 = elems(broker6),
        a4 = elems(api4),
        a6 = elems(api6),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What is installed now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Installed {
    tunnel: UserTunnel,
    brokers: Vec<SocketAddr>,
    local: Vec<IpNet>,
}

pub struct Guard {
    cfg: GuardConfig,
    netlink: Netlink,
    settings: Settings,
    open: Option<Open>,
    installed: Option<Installed>,
    /// The firewall part of the kill switch failed (the routing part holds): why.
    degraded: Option<String>,
    brokers: Vec<SocketAddr>,
    captive_used: Option<u64>,
    view: Arc<Mutex<GuardView>>,
    direct: Arc<DirectNames>,
    report: mpsc::UnboundedSender<sekisho_proto::api::OverrideUsed>,
}

impl Guard {
    pub fn new(
        cfg: GuardConfig,
        netlink: Netlink,
        view: Arc<Mutex<GuardView>>,
        direct: Arc<DirectNames>,
        report: mpsc::UnboundedSender<sekisho_proto::api::OverrideUsed>,
    ) -> Guard {
        let settings = std::fs::read(&cfg.state_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Settings>(&b).ok())
            .unwrap_or_default();
        Guard {
            cfg,
            netlink,
            settings,
            open: None,
            installed: None,
            degraded: None,
            brokers: Vec::new(),
            captive_used: None,
            view,
            direct,
            report,
        }
    }

    fn persist(&self) {
        let Ok(text) = serde_json::to_vec_pretty(&self.settings) else {
            return;
        };
        let tmp = self.cfg.state_file.with_extension("tmp");
        if let Err(e) =
            std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.cfg.state_file))
        {
            warn!(
                "cannot save the tunnel settings to {}: {e}",
                self.cfg.state_file.display()
            );
        }
    }

    /// Brings what is installed in line with the settings, the open window, the brokers and
    /// the local networks.
    async fn sync(&mut self) {
        let t = &self.settings.tunnel;
        let want_full = t.mode == TunnelMode::Full && self.open.is_none();
        if !want_full {
            if self.installed.take().is_some() {
                self.remove().await;
            }
        } else {
            let local = if t.local_network == LocalNetwork::Allow {
                let nets = self
                    .netlink
                    .local_networks(self.cfg.tun_index)
                    .await
                    .unwrap_or_default();
                sekisho_proto::tunnel::clamp_local_networks(
                    &nets,
                    t.local_network_max_prefix,
                    t.local_network_max_prefix_v6,
                )
            } else {
                Vec::new()
            };
            let want = Installed {
                tunnel: t.clone(),
                brokers: self.brokers.clone(),
                local,
            };
            if self.installed.as_ref() == Some(&want) && self.degraded.is_some() {
                // Routing-only: retry the firewall alone (the routing stays as it is, with no
                // gap); once it is in, the full install below adds what routing-only left out.
                if self.firewall(&want).await.is_ok() {
                    self.installed = None;
                }
            }
            if self.installed.as_ref() != Some(&want) {
                match self.install(&want).await {
                    Ok(None) => {
                        if self.installed.is_none() || self.degraded.is_some() {
                            info!(policy = %t.name, local_network = ?t.local_network, local = ?want.local, "full tunnel: kill switch in place");
                        }
                        self.degraded = None;
                        self.installed = Some(want);
                    }
                    Ok(Some(why)) => {
                        if self.degraded.as_deref() != Some(why.as_str()) {
                            error!(
                                policy = %t.name,
                                "the kill switch's firewall cannot be installed ({why}); every packet \
                                 is routed into the tunnel instead (routing-only kill switch), and the \
                                 firewall is retried every second"
                            );
                        }
                        self.degraded = Some(why);
                        self.installed = Some(want);
                    }
                    Err(e) if self.installed.is_none() => {
                        // Neither the firewall nor the routing could close the device: running
                        // on would leave it open while the policy says full tunnel.
                        error!(
                            policy = %t.name,
                            "refusing to run open: the full tunnel's kill switch cannot be installed: {e:#}"
                        );
                        eprintln!(
                            "sekisho-client: refusing to run open: the full tunnel's kill switch \
                             cannot be installed: {e:#}"
                        );
                        std::process::exit(3);
                    }
                    Err(e) => {
                        warn!("cannot update the kill switch (the one in place stays): {e:#}")
                    }
                }
            }
        }
        self.direct.set(if want_full {
            t.exclude_domains.clone()
        } else {
            Vec::new()
        });
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        *v = GuardView {
            mode: match t.mode {
                TunnelMode::Full => "full".into(),
                TunnelMode::Include => "include".into(),
            },
            tunnel_policy: t.name.clone(),
            kill_switch: if self.open.is_some() {
                "open".into()
            } else if self.installed.is_some() && self.degraded.is_some() {
                "routing-only".into()
            } else if self.installed.is_some() {
                "closed".into()
            } else {
                "off".into()
            },
            kill_switch_error: self.degraded.clone(),
            open: self.open.clone(),
            local_network: match t.local_network {
                LocalNetwork::Allow => "allow".into(),
                LocalNetwork::Block => "block".into(),
            },
            exclude: t.exclude.clone(),
            exclude_domains: t.exclude_domains.clone(),
            allow_disable: t.allow_disable,
            captive_grace_secs: t.captive_grace_secs,
        };
    }

    /// Installs the kill switch: its firewall (nftables) and its routing (everything not
    /// marked into the tunnel). The routing is installed even when the firewall fails, so the
    /// device is never left open: `Ok(Some(why))` says the firewall is missing. `Err` when the
    /// routing could not be installed either.
    /// The kill switch's firewall (nftables) for `w`.
    async fn firewall(&self, w: &Installed) -> Result<(), sekisho_sys::SysError> {
        let local = (w.tunnel.local_network == LocalNetwork::Allow).then_some(&w.local[..]);
        nft(&ruleset(
            &self.cfg.tun,
            self.cfg.mark,
            self.cfg.device,
            &w.tunnel.exclude,
            &w.brokers,
            &self.cfg.api,
            local,
        ))
        .await
    }

    async fn install(&self, w: &Installed) -> Result<Option<String>> {
        let local = (w.tunnel.local_network == LocalNetwork::Allow).then_some(&w.local[..]);
        let firewall = self.firewall(w).await.err().map(|e| e.to_string());
        for net in ["0.0.0.0/0", "::/0"] {
            let net: IpNet = net.parse()?;
            if let Err(e) = self
                .netlink
                .add_table_route(self.cfg.tun_index, net, self.cfg.table)
                .await
            {
                // IPv6 may be off here; its traffic is then dropped by the firewall. Without
                // the firewall nothing would stop it: that is no kill switch.
                if net.addr().is_ipv4() || firewall.is_some() {
                    return Err(e.into());
                }
            }
        }
        self.netlink
            .del_rules(&[PRIO_SUPPRESS, PRIO_TUNNEL])
            .await?;
        for v6 in [false, true] {
            // The local network goes direct only under the firewall, which narrows it to the
            // admin's maximum prefix; routing alone would follow whatever routes DHCP gave.
            if local.is_some() && firewall.is_none() {
                self.netlink
                    .add_rule(&Rule {
                        priority: PRIO_SUPPRESS,
                        table: 254,
                        v6,
                        not_fwmark: None,
                        suppress_prefixlength: Some(0),
                    })
                    .await?;
            }
            self.netlink
                .add_rule(&Rule {
                    priority: PRIO_TUNNEL,
                    table: self.cfg.table,
                    v6,
                    not_fwmark: Some(self.cfg.mark),
                    suppress_prefixlength: None,
                })
                .await?;
        }
        Ok(firewall)
    }

    async fn remove(&self) {
        if let Err(e) = self.netlink.del_rules(&[PRIO_SUPPRESS, PRIO_TUNNEL]).await {
            warn!("cannot remove the full-tunnel routing rules: {e}");
        }
        if let Err(e) = nft(&nft_delete_table("inet", TABLE)).await {
            warn!("cannot remove the kill switch table: {e}");
        }
        info!("kill switch removed");
    }

    fn try_override(&mut self, code: &str) -> Result<String, String> {
        let now = unix_now();
        let claims = verify_override(
            &self.settings.override_keys,
            code,
            &self.settings.device,
            now,
        )
        .map_err(|e| {
            warn!(event = "override", result = "refused", error = %e, "override code refused");
            format!("override code refused: {e}")
        })?;
        if let Some(why) = override_refusal(&self.settings, &claims.id) {
            warn!(event = "override", result = "refused", id = %claims.id, error = why, "override code refused");
            return Err(format!("override code refused: {why}"));
        }
        self.settings.used_overrides.retain(|u| u.not_after > now);
        self.settings.used_overrides.push(UsedOverride {
            id: claims.id.clone(),
            not_after: claims.not_after,
        });
        self.persist();
        info!(
            event = "override",
            result = "used",
            id = %claims.id,
            issued_by = %claims.by,
            until = claims.not_after,
            "override code used: the kill switch is open until it expires"
        );
        let _ = self.report.send(sekisho_proto::api::OverrideUsed {
            id: claims.id.clone(),
            not_after: claims.not_after,
            by: claims.by.clone(),
        });
        self.open = Some(Open {
            until: claims.not_after,
            reason: "override".into(),
            id: Some(claims.id.clone()),
        });
        Ok(format!(
            "override {} accepted: the device is open for {} s",
            claims.id,
            claims.not_after.saturating_sub(now)
        ))
    }

    fn try_captive(&mut self, tunnel_up: bool) -> Result<String, String> {
        let t = &self.settings.tunnel;
        let now = unix_now();
        if t.mode != TunnelMode::Full {
            return Err("not needed: this device is not in full-tunnel mode".into());
        }
        if t.captive_grace_secs == 0 {
            return Err("the admin's policy allows no captive-portal grace".into());
        }
        if tunnel_up {
            return Err("the tunnel is up: no captive portal is in the way".into());
        }
        // Once per grace period and one more: a grace cannot be chained into an open device.
        if let Some(used) = self.captive_used
            && now < used + 2 * t.captive_grace_secs
        {
            return Err(format!(
                "the captive-portal grace was used {} s ago; try again later",
                now - used
            ));
        }
        self.captive_used = Some(now);
        self.open = Some(Open {
            until: now + t.captive_grace_secs,
            reason: "captive-portal".into(),
            id: None,
        });
        info!(
            event = "captive-portal",
            result = "open",
            seconds = t.captive_grace_secs,
            "captive-portal grace: the kill switch is open so a portal can be signed in to"
        );
        Ok(format!(
            "open for {} s: sign in to the portal now",
            t.captive_grace_secs
        ))
    }

    /// Runs until the command channel closes; then applies the stop rule.
    pub async fn run(
        mut self,
        mut cmds: mpsc::Receiver<GuardCmd>,
        mut brokers: watch::Receiver<Vec<SocketAddr>>,
        connected: Arc<dyn Fn() -> bool + Send + Sync>,
        mut stop: oneshot::Receiver<()>,
    ) {
        if self.settings.tunnel.mode != TunnelMode::Full {
            // Leftovers of an earlier full-tunnel run whose policy changed meanwhile.
            let _ = self.netlink.del_rules(&[PRIO_SUPPRESS, PRIO_TUNNEL]).await;
            let _ = nft(&nft_delete_table("inet", TABLE)).await;
        }
        self.sync().await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                c = cmds.recv() => match c {
                    Some(GuardCmd::Settings(mut s)) => {
                        // What was used here stays known here, whatever the control plane says.
                        let now = unix_now();
                        s.used_overrides = self.settings.used_overrides.clone();
                        s.used_overrides.retain(|u| u.not_after > now);
                        if let Some(o) = &self.open
                            && let Some(id) = &o.id
                            && s.revoked_overrides.contains(id)
                            && o.reason == "override"
                        {
                            info!(event = "override", result = "revoked", id = %id, "override code revoked by an admin: kill switch back in place");
                            self.open = None;
                        }
                        if s != self.settings {
                            if s.tunnel != self.settings.tunnel {
                                info!(policy = %s.tunnel.name, mode = ?s.tunnel.mode, "tunnel settings from the policy");
                            }
                            self.settings = s;
                            self.persist();
                        }
                    }
                    // Answered once the change is in place, so what the user sees next is true.
                    Some(GuardCmd::Override { code, reply }) => {
                        let r = self.try_override(&code);
                        self.sync().await;
                        let _ = reply.send(r);
                    }
                    Some(GuardCmd::Captive { reply }) => {
                        let up = connected();
                        let r = self.try_captive(up);
                        self.sync().await;
                        let _ = reply.send(r);
                    }
                    None => break,
                },
                r = brokers.changed() => {
                    if r.is_err() { break; }
                    self.brokers = brokers.borrow().clone();
                }
                _ = tick.tick() => {
                    if let Some(o) = &self.open && unix_now() >= o.until {
                        info!(event = "override", result = "expired", reason = %o.reason, "open window ended: kill switch back in place");
                        self.open = None;
                    }
                }
                _ = &mut stop => break,
            }
            self.sync().await;
        }
        // Stopping: a full tunnel stays closed unless the policy allows disabling.
        if self.installed.is_some() {
            if self.settings.tunnel.allow_disable {
                self.remove().await;
            } else {
                info!(
                    policy = %self.settings.tunnel.name,
                    "client stopping; the kill switch stays in place (the policy does not allow disabling)"
                );
            }
        } else if self.settings.tunnel.mode == TunnelMode::Full
            && self.open.is_some()
            && !self.settings.tunnel.allow_disable
        {
            // Open by an override now, but nobody will close it again: close it.
            self.open = None;
            self.sync().await;
            info!("client stopping during an override: the kill switch is put back");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_code_is_refused_once_used_or_revoked() {
        let mut s = Settings::default();
        assert_eq!(override_refusal(&s, "a"), None);
        s.used_overrides.push(UsedOverride {
            id: "a".into(),
            not_after: 10,
        });
        s.revoked_overrides.push("b".into());
        assert!(override_refusal(&s, "a").unwrap().contains("already used"));
        assert!(override_refusal(&s, "b").unwrap().contains("revoked"));
        assert_eq!(override_refusal(&s, "c"), None);
        // The used list survives the state file.
        let text = serde_json::to_string(&s).unwrap();
        let back: Settings = serde_json::from_str(&text).unwrap();
        assert_eq!(back.used_overrides, s.used_overrides);
        // An older state file without these fields still loads.
        let old: Settings =
            serde_json::from_str(r#"{"device":"d","tunnel":{},"override_keys":[]}"#).unwrap();
        assert!(old.used_overrides.is_empty());
    }

    #[test]
    fn ruleset_lets_only_tunnel_brokers_marks_and_allowed_local_out() {
        let brokers: Vec<SocketAddr> = vec!["10.99.2.2:51820".parse().unwrap()];
        let exclude: Vec<IpNet> = vec!["198.51.100.0/24".parse().unwrap()];
        let local: Vec<IpNet> = vec!["192.168.1.7/24".parse().unwrap()];
        let dev: IpAddr = "100.118.0.2".parse().unwrap();
        let api: Vec<SocketAddr> = vec!["10.99.2.2:8443".parse().unwrap()];
        let open = ruleset(
            "sekisho0",
            0x534b,
            dev,
            &exclude,
            &brokers,
            &api,
            Some(&local),
        );
        assert!(open.contains("policy drop"), "{open}");
        assert!(open.contains("oifname \"sekisho0\" accept"));
        assert!(open.contains("10.99.2.2 . 51820"));
        assert!(open.contains("198.51.100.0/24"));
        assert!(open.contains("192.168.1.0/24"), "local networks by prefix");
        assert!(open.contains("ip daddr @local4 accept"));
        assert!(open.contains("10.99.2.2 . 8443"));
        assert!(open.contains("ip saddr 100.118.0.2"));
        let blocked = ruleset("sekisho0", 0x534b, dev, &exclude, &brokers, &api, None);
        assert!(!blocked.contains("@local4"), "{blocked}");
        assert!(blocked.contains("counter name blocked drop"));
    }
}
