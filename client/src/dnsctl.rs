//! The client's DNS service: starts the stub, takes over the system's DNS setting, and keeps
//! the filter and upstreams in line with what the control plane says for this user.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::{info, warn};

use sekisho_proto::api::{DnsSettingsResponse, ListMeta};
use sekisho_proto::dns::{BlockAnswer, DNS_PORT};
use sekisho_proto::dnsfilter::{FilterBuilder, ListFormat};
use sekisho_proto::policy::UserDns;

use crate::resolvconf::SystemDns;
use crate::stub::{self, Stub, View};
use crate::{ClientConfig, DnsConfig, PostureSetup};

/// The running DNS service; `stop` puts the system's setting back.
pub struct DnsRunning {
    system: Option<SystemDns>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Blocked names per category, for the posture requests.
    pub block_counts: Arc<crate::stub::BlockCounts>,
}

impl DnsRunning {
    pub fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(s) = &self.system
            && let Err(e) = s.restore()
        {
            warn!("cannot restore the system's DNS setting: {e:#}");
        }
    }
}

fn dns_log(path: &Path) -> Result<Box<dyn std::io::Write + Send>> {
    if path == Path::new("-") {
        return Ok(Box::new(std::io::stdout()));
    }
    Ok(Box::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the DNS log {}", path.display()))?,
    ))
}

/// TLS trust for DoT/DoH upstreams: the system's CA bundle plus `extra`.
fn upstream_tls(extra: Option<&Path>) -> Result<Option<rustls::ClientConfig>> {
    let mut pem = sekisho_sys::http::system_roots_pem().unwrap_or_default();
    if let Some(p) = extra {
        pem.push('\n');
        pem.push_str(
            &std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        );
    }
    if pem.trim().is_empty() {
        return Ok(None);
    }
    let mut tls = sekisho_sys::http::ca_tls(&pem)?;
    // Resolvers pick the ALPN per transport (dot, h2) themselves.
    tls.alpn_protocols.clear();
    Ok(Some(tls))
}

/// Name servers as upstream URLs (plain DNS, TCP when an answer is truncated).
fn udp_upstreams(servers: impl IntoIterator<Item = IpAddr>) -> Vec<String> {
    servers
        .into_iter()
        .map(|ip| format!("udp://{}", SocketAddr::new(ip, DNS_PORT)))
        .collect()
}

/// Starts the stub on the device's overlay address and points the system at it.
pub async fn start_dns(
    d: &DnsConfig,
    config: &ClientConfig,
    direct: Arc<crate::killswitch::DirectNames>,
    records: crate::records::Local,
) -> Result<DnsRunning> {
    let listen = d
        .listen
        .unwrap_or(SocketAddr::new(config.interface.address, DNS_PORT));
    let system = SystemDns {
        path: d.resolv_conf.clone(),
        backup: d.backup_file.clone(),
    };
    if d.manage_system_dns {
        system.recover()?;
    }
    // Until the policy names upstreams, the ones the system used before.
    let fallback = udp_upstreams(
        system
            .current_servers()
            .into_iter()
            .filter(|ip| *ip != listen.ip()),
    );
    let tls = upstream_tls(d.upstream_ca_file.as_deref())?;
    let resolver = stub::build_resolver(&fallback, tls.clone())?;
    let broker = config.control.as_ref().map(|c| {
        SocketAddr::new(
            sekisho_proto::posture::service_address(&c.device_range),
            DNS_PORT,
        )
    });
    let log = Box::new(crate::records::TeeLines {
        inner: dns_log(&d.log)?,
        local: records,
        pending: Vec::new(),
    });
    let mut stub = Stub::new((fallback.clone(), resolver), broker, log);
    stub.set_direct(direct);
    let stub = Arc::new(stub);
    let block_counts = stub.block_counts.clone();
    let serve = stub::serve(stub.clone(), listen);
    let mut tasks = vec![tokio::spawn(async move {
        if let Err(e) = serve.await {
            warn!("DNS stub stopped: {e:#}");
        }
    })];
    // Give the sockets a moment to bind before the system is pointed at them.
    tokio::time::sleep(Duration::from_millis(50)).await;
    if let Some(ctl) = &config.control {
        let setup = PostureSetup::load(ctl)?;
        tasks.push(tokio::spawn(settings_loop(stub, setup, fallback, tls)));
    }
    let system = if d.manage_system_dns {
        system.take_over(listen.ip())?;
        Some(system)
    } else {
        None
    };
    Ok(DnsRunning {
        system,
        tasks,
        block_counts,
    })
}

/// A list as last downloaded.
struct Loaded {
    meta: ListMeta,
    text: Arc<String>,
}

/// Builds the filter from the lists and the allowlist (CPU work: run it off the async threads).
fn build_filter(
    lists: &[(ListMeta, Arc<String>)],
    allow: &[String],
) -> sekisho_proto::dnsfilter::Filter {
    let mut b = FilterBuilder::new();
    for (meta, text) in lists {
        let format = meta
            .format
            .as_deref()
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| ListFormat::detect(text));
        let stats = b.add_list(&meta.name, &meta.category, format, text);
        info!(list = %meta.name, category = %meta.category, entries = stats.entries, skipped = stats.skipped, "blocklist read");
    }
    for a in allow {
        b.allow(a);
    }
    b.build()
}

/// Polls the control plane for this user's DNS settings, downloads lists whose content
/// changed, and swaps in a new filter (resolution goes on with the old one meanwhile).
async fn settings_loop(
    stub: Arc<Stub>,
    setup: PostureSetup,
    fallback: Vec<String>,
    tls: Option<rustls::ClientConfig>,
) {
    let mut lists: HashMap<String, Loaded> = HashMap::new();
    let mut applied: Option<(UserDns, Vec<String>)> = None;
    loop {
        let wait = match refresh(&stub, &setup, &mut lists, &mut applied, &fallback, &tls).await {
            Ok(secs) => Duration::from_secs(secs.max(1)),
            Err(e) => {
                warn!("cannot refresh DNS settings: {e:#}");
                Duration::from_secs(10)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn refresh(
    stub: &Stub,
    setup: &PostureSetup,
    lists: &mut HashMap<String, Loaded>,
    applied: &mut Option<(UserDns, Vec<String>)>,
    fallback: &[String],
    tls: &Option<rustls::ClientConfig>,
) -> Result<u64> {
    let resp: DnsSettingsResponse = setup.api.get("/v1/device/dns").await?;
    for meta in &resp.lists {
        if lists
            .get(&meta.name)
            .is_some_and(|l| l.meta.sha256 == meta.sha256)
        {
            continue;
        }
        let path = format!("/v1/device/dns/lists/{}", meta.name);
        let bytes = setup.api.get_bytes(&path).await?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        lists.insert(
            meta.name.clone(),
            Loaded {
                meta: meta.clone(),
                text: Arc::new(text),
            },
        );
    }
    lists.retain(|name, _| resp.lists.iter().any(|m| &m.name == name));
    let s = resp.settings;
    let digests: Vec<String> = resp
        .lists
        .iter()
        .map(|m| format!("{}:{}", m.name, m.sha256))
        .collect();
    if applied.as_ref() != Some(&(s.clone(), digests.clone())) {
        let input: Vec<(ListMeta, Arc<String>)> = resp
            .lists
            .iter()
            .filter_map(|m| lists.get(&m.name).map(|l| (l.meta.clone(), l.text.clone())))
            .collect();
        let allow = s.allowlist.clone();
        let started = Instant::now();
        let filter = tokio::task::spawn_blocking(move || build_filter(&input, &allow)).await?;
        let block: BlockAnswer = s.block_answer.parse().unwrap_or(BlockAnswer::NxDomain);
        info!(
            lists = resp.lists.len(),
            domains = filter.len(),
            ms = started.elapsed().as_millis() as u64,
            private_zones = s.private_zones.len(),
            block_answer = %block,
            "DNS filter loaded"
        );
        stub.set_view(View {
            filter,
            zones: s.private_zones.clone(),
            block,
        });
        let upstreams = if s.upstreams.is_empty() {
            fallback.to_vec()
        } else {
            s.upstreams.clone()
        };
        if upstreams != stub.upstreams() {
            match stub::build_resolver(&upstreams, tls.clone()) {
                Ok(r) => {
                    info!(?upstreams, "DNS upstreams set");
                    stub.set_resolver(upstreams, r);
                }
                Err(e) => warn!("cannot use the policy's DNS upstreams: {e:#}"),
            }
        }
        *applied = Some((s.clone(), digests));
    }
    Ok(s.refresh_secs)
}

/// `sekisho-client stub`: the stub alone, with local lists.
pub fn run_stub(
    listen: SocketAddr,
    files: &[PathBuf],
    allow: &[String],
    upstreams: Vec<String>,
    block_answer: &str,
    upstream_ca: Option<&Path>,
) -> Result<()> {
    crate::init_tracing();
    let block: BlockAnswer = block_answer.parse().map_err(anyhow::Error::msg)?;
    let upstreams = if upstreams.is_empty() {
        udp_upstreams(crate::resolvconf::nameservers(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        ))
    } else {
        upstreams
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let started = Instant::now();
        let mut input = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let category = f
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            input.push((
                ListMeta {
                    name,
                    category,
                    format: None,
                    sha256: String::new(),
                    bytes: text.len(),
                },
                Arc::new(text),
            ));
        }
        let allow = allow.to_vec();
        let filter = tokio::task::spawn_blocking(move || build_filter(&input, &allow)).await?;
        eprintln!(
            "sekisho-client stub: loaded {} domains from {} lists in {} ms ({} bytes of filter); answering on {listen} (UDP and TCP)",
            filter.len(),
            files.len(),
            started.elapsed().as_millis(),
            filter.heap_bytes()
        );
        let tls = upstream_tls(upstream_ca)?;
        let resolver = stub::build_resolver(&upstreams, tls)?;
        let stub = Arc::new(Stub::new((upstreams, resolver), None, Box::new(std::io::stdout())));
        stub.set_view(View {
            filter,
            zones: Vec::new(),
            block,
        });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = stub::serve(stub, listen) => r,
            _ = term.recv() => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
