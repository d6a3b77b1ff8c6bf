//! The DNS stub's I/O shell: UDP and TCP listeners, the relay to the broker for private zones,
//! upstream resolution (hickory-resolver: UDP with TCP fallback, TCP, DoT, DoH; its cache
//! honours TTLs) and the DNS log. Decisions are in `sekisho_proto::dns`.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::{debug, info, warn};

use sekisho_proto::dns::{
    self, BlockAnswer, BlockEvent, Plan, Request, Transport, Upstream, response_code,
};
use sekisho_proto::dnsfilter::Filter;

/// What the stub decides with; replaced as a whole when settings or lists change.
pub struct View {
    pub filter: Filter,
    pub zones: Vec<String>,
    pub block: BlockAnswer,
}

impl View {
    pub fn empty() -> View {
        View {
            filter: Filter::empty(),
            zones: Vec::new(),
            block: BlockAnswer::NxDomain,
        }
    }
}

#[derive(Default, Serialize)]
pub struct Counters {
    pub queries: AtomicU64,
    pub blocked: AtomicU64,
    pub private: AtomicU64,
    pub upstream: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub bad_queries: AtomicU64,
}

pub struct Stub {
    view: RwLock<Arc<View>>,
    resolver: RwLock<(Vec<String>, Arc<TokioResolver>)>,
    /// The broker's DNS service, reached through the tunnel.
    broker: Option<SocketAddr>,
    log: Mutex<Box<dyn Write + Send>>,
    pub counters: Counters,
    /// Names excluded from the full tunnel: their answers' addresses go direct.
    direct: Option<Arc<crate::killswitch::DirectNames>>,
    /// Blocked names per category since the control plane was last told (its risk engine
    /// gets the counts, never the names).
    pub block_counts: Arc<BlockCounts>,
}

/// Blocked names per category, taken (and reset) with each posture request.
#[derive(Default)]
pub struct BlockCounts(Mutex<std::collections::BTreeMap<String, u64>>);

impl BlockCounts {
    pub fn add(&self, category: &str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: categories come from the admin's lists, a few.
        if m.len() < 64 || m.contains_key(category) {
            *m.entry(category.to_string()).or_insert(0) += 1;
        }
    }

    pub fn take(&self) -> std::collections::BTreeMap<String, u64> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Counts a request did not deliver go back for the next one.
    pub fn restore(&self, counts: std::collections::BTreeMap<String, u64>) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in counts {
            *m.entry(k).or_insert(0) += v;
        }
    }
}

/// Idle TCP connections are closed after this.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long the broker has to answer for a private name.
const BROKER_WAIT: Duration = Duration::from_millis(1500);

impl Stub {
    pub fn new(
        resolver: (Vec<String>, TokioResolver),
        broker: Option<SocketAddr>,
        log: Box<dyn Write + Send>,
    ) -> Stub {
        Stub {
            view: RwLock::new(Arc::new(View::empty())),
            resolver: RwLock::new((resolver.0, Arc::new(resolver.1))),
            broker,
            log: Mutex::new(log),
            counters: Counters::default(),
            direct: None,
            block_counts: Arc::default(),
        }
    }

    pub fn set_direct(&mut self, direct: Arc<crate::killswitch::DirectNames>) {
        self.direct = Some(direct);
    }

    pub fn set_view(&self, view: View) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }

    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The upstreams the resolver was built for.
    pub fn upstreams(&self) -> Vec<String> {
        self.resolver
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    pub fn set_resolver(&self, upstreams: Vec<String>, resolver: TokioResolver) {
        *self.resolver.write().unwrap_or_else(|e| e.into_inner()) = (upstreams, Arc::new(resolver));
    }

    fn log_block(&self, ev: &BlockEvent) {
        self.block_counts.add(&ev.category);
        #[derive(Serialize)]
        struct Line<'a> {
            ts: String,
            event: &'static str,
            result: &'static str,
            #[serde(flatten)]
            ev: &'a BlockEvent,
        }
        let line = Line {
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event: "dns",
            result: "blocked",
            ev,
        };
        if let Ok(mut text) = serde_json::to_string(&line) {
            text.push('\n');
            let mut out = self.log.lock().unwrap_or_else(|e| e.into_inner());
            let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
        }
    }

    /// Answers one query (None: no answer is due).
    pub async fn handle(&self, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        let view = self.view();
        let (plan, event) = dns::plan(bytes, udp, &view.zones, &view.filter, &view.block);
        let blocked = event.is_some();
        if let Some(ev) = event {
            self.counters.blocked.fetch_add(1, Ordering::Relaxed);
            self.log_block(&ev);
        }
        match plan {
            Plan::Reply(b) => {
                // A reply that is no block answer is an error answer to a bad query.
                if !blocked {
                    self.counters.bad_queries.fetch_add(1, Ordering::Relaxed);
                }
                Some(b)
            }
            Plan::Drop => {
                self.counters.bad_queries.fetch_add(1, Ordering::Relaxed);
                None
            }
            Plan::Private(req) => {
                self.counters.private.fetch_add(1, Ordering::Relaxed);
                match self.ask_broker(bytes, &req).await {
                    Some(resp) if response_code(&resp) != Some(ResponseCode::Refused) => Some(resp),
                    // Not an application: an ordinary name, filtered and resolved upstream.
                    Some(_) => Some(self.filtered_upstream(&req, &view).await),
                    None => Some(dns::servfail(&req)),
                }
            }
            Plan::Upstream(req) => Some(self.upstream(&req).await),
        }
    }

    async fn filtered_upstream(&self, req: &Request, view: &View) -> Vec<u8> {
        if let Some((answer, event)) = dns::filter_query(req, &view.filter, &view.block) {
            self.counters.blocked.fetch_add(1, Ordering::Relaxed);
            self.log_block(&event);
            return answer;
        }
        self.upstream(req).await
    }

    /// Relays a query for a private zone to the broker through the tunnel.
    async fn ask_broker(&self, bytes: &[u8], req: &Request) -> Option<Vec<u8>> {
        let broker = self.broker?;
        let sock = UdpSocket::bind(SocketAddr::new(
            if broker.is_ipv4() {
                IpAddr::from([0, 0, 0, 0])
            } else {
                IpAddr::from([0u16; 8])
            },
            0,
        ))
        .await
        .ok()?;
        sock.connect(broker).await.ok()?;
        let mut buf = vec![0u8; 4096];
        for _ in 0..2 {
            sock.send(bytes).await.ok()?;
            match tokio::time::timeout(BROKER_WAIT, sock.recv(&mut buf)).await {
                Ok(Ok(n)) if n >= 2 && buf[..2] == req.message.metadata.id.to_be_bytes() => {
                    return Some(buf[..n].to_vec());
                }
                _ => continue,
            }
        }
        warn!("the broker's DNS service did not answer (tunnel down?)");
        None
    }

    /// Resolves upstream (through the resolver's cache) and answers.
    async fn upstream(&self, req: &Request) -> Vec<u8> {
        self.counters.upstream.fetch_add(1, Ordering::Relaxed);
        let resolver = self
            .resolver
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone();
        let mut name = req.query.name().clone();
        name.set_fqdn(true);
        let lookup_name = name.to_ascii();
        match resolver.lookup(name, req.query.query_type()).await {
            Ok(lookup) => {
                // An excluded name: its addresses go direct before the app gets them.
                if let Some(d) = &self.direct
                    && d.matches(&lookup_name)
                {
                    let ips: Vec<IpAddr> = lookup
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            hickory_proto::rr::RData::A(a) => Some(IpAddr::V4(a.0)),
                            hickory_proto::rr::RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                            _ => None,
                        })
                        .collect();
                    let ttl = lookup.answers().iter().map(|r| r.ttl).min().unwrap_or(60);
                    crate::killswitch::add_direct(&ips, ttl).await;
                }
                // The cache keeps answers for their TTL; tell the asker what is left of it.
                let left = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now())
                    .as_secs()
                    .min(u64::from(u32::MAX)) as u32;
                let answers = lookup
                    .answers()
                    .iter()
                    .cloned()
                    .map(|mut r| {
                        r.ttl = r.ttl.min(left);
                        r
                    })
                    .collect();
                dns::answer(
                    req,
                    ResponseCode::NoError,
                    answers,
                    lookup.authorities().to_vec(),
                )
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(NoRecords {
                response_code, soa, ..
            }))) => {
                let authorities = soa
                    .map(|s| vec![(*s).into_record_of_rdata()])
                    .unwrap_or_default();
                dns::answer(req, response_code, Vec::new(), authorities)
            }
            Err(e) => {
                self.counters
                    .upstream_failures
                    .fetch_add(1, Ordering::Relaxed);
                debug!("upstream resolution failed: {e}");
                dns::servfail(req)
            }
        }
    }
}

/// A resolver for `upstreams` (policy syntax, see [`Upstream::parse`]); `tls` checks DoT and DoH
/// servers.
pub fn build_resolver(
    upstreams: &[String],
    tls: Option<rustls::ClientConfig>,
) -> Result<TokioResolver> {
    let mut servers = Vec::new();
    for text in upstreams {
        let u = Upstream::parse(text).map_err(anyhow::Error::msg)?;
        let connections = match u.transport {
            Transport::Udp => vec![
                ConnectionConfig::new(ProtocolConfig::Udp),
                ConnectionConfig::new(ProtocolConfig::Tcp),
            ],
            Transport::Tcp => vec![ConnectionConfig::new(ProtocolConfig::Tcp)],
            Transport::Tls => vec![ConnectionConfig::tls(
                u.server_name.clone().unwrap_or_default().into(),
            )],
            Transport::Https => vec![ConnectionConfig::https(
                u.server_name.clone().unwrap_or_default().into(),
                u.path.clone().map(Into::into),
            )],
        };
        let mut ns = NameServerConfig::udp_and_tcp(u.addr.ip());
        ns.connections = connections
            .into_iter()
            .map(|mut c| {
                c.port = u.addr.port();
                c
            })
            .collect();
        servers.push(ns);
    }
    let mut opts = ResolverOpts::default();
    opts.edns0 = true;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ndots = 0;
    opts.cache_size = 8192;
    opts.timeout = Duration::from_secs(3);
    opts.attempts = 2;
    let mut builder = TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(servers),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts);
    if let Some(tls) = tls {
        builder = builder.with_tls_config(tls);
    }
    builder
        .build()
        .context("cannot build the upstream resolver")
}

/// Serves DNS on UDP and TCP at `listen` until the task is dropped.
pub async fn serve(stub: Arc<Stub>, listen: SocketAddr) -> Result<()> {
    let udp = Arc::new(
        UdpSocket::bind(listen)
            .await
            .with_context(|| format!("cannot listen for DNS on udp {listen}"))?,
    );
    let tcp = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for DNS on tcp {listen}"))?;
    info!(%listen, "DNS stub listening (UDP and TCP)");
    let _tcp = AbortOnDrop(tokio::spawn(serve_tcp(stub.clone(), tcp)));
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                debug!("DNS receive error: {e}");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let stub = stub.clone();
        let udp = udp.clone();
        tokio::spawn(async move {
            if let Some(answer) = stub.handle(&query, true).await {
                let _ = udp.send_to(&answer, from).await;
            }
        });
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve_tcp(stub: Arc<Stub>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(tcp_conn(stub.clone(), conn));
            }
            Err(e) => {
                debug!("DNS accept error: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One TCP connection: length-prefixed queries, answered in order, until idle or closed.
async fn tcp_conn(stub: Arc<Stub>, mut conn: TcpStream) {
    let mut len = [0u8; 2];
    loop {
        match tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let n = usize::from(u16::from_be_bytes(len));
        let mut query = vec![0u8; n];
        match tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let Some(answer) = stub.handle(&query, false).await else {
            continue;
        };
        let Ok(alen) = u16::try_from(answer.len()) else {
            continue;
        };
        let mut out = Vec::with_capacity(answer.len() + 2);
        out.extend_from_slice(&alen.to_be_bytes());
        out.extend_from_slice(&answer);
        if conn.write_all(&out).await.is_err() {
            return;
        }
    }
}
