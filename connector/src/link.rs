//! The links to brokers: one task per broker dials (a connected UDP socket, so nothing
//! listens), keeps the link up with backoff, reads its datagrams in batches and its messages,
//! and renews the connector certificate over it.

use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::FutureExt;
use ipnet::IpNet;
use rand::Rng;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{debug, info, warn};

use sekisho_proto::link::{
    ALPN, BrokerWelcome, ConnectorHello, HealthCheck, LinkAnswer, LinkId, LinkRequest,
    MAX_CONTROL_MESSAGE, SiteMessage,
};
use sekisho_sys::link::LinkSender;

use crate::health::{State, add};
use crate::site::{LinkEvent, NameEvent};
use crate::{ConnectorConfig, TlsConfig, new_key_and_csr, write_atomic};

/// Datagrams handed to the site loop at once.
const READ_BATCH: usize = 256;

pub(crate) fn tls_client_config(c: &TlsConfig, overlay_mtu: u16) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&c.ca)
        .with_context(|| format!("cannot read {}", c.ca.display()))?
    {
        roots
            .add(ca.context("bad PEM in CA file")?)
            .context("bad CA certificate")?;
    }
    let chain = CertificateDer::pem_file_iter(&c.cert)
        .with_context(|| format!("cannot read {}", c.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .context("bad PEM in certificate file")?;
    let key = PrivateKeyDer::from_pem_file(&c.key)
        .with_context(|| format!("cannot read {}", c.key.display()))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("connector certificate and key do not match")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    // Brokers take a link that stays silent for a second (default) as stale and send new
    // flows to the site's other connectors: keep it talking.
    let transport = sekisho_sys::link::transport(overlay_mtu, KEEPALIVE, IDLE_TIMEOUT)?;
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// QUIC keepalive on every link.
const KEEPALIVE: Duration = Duration::from_millis(300);
/// A link that hears nothing for this long is closed (and dialled again).
const IDLE_TIMEOUT: Duration = Duration::from_secs(8);

/// Validity of the certificate in `path` (Unix seconds).
fn cert_validity(path: &Path) -> Result<(i64, i64)> {
    let der = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .next()
        .context("no certificate")??;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("bad certificate {}: {e}", path.display()))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// When the certificate should be renewed: two thirds into its lifetime.
fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before) * 2 / 3
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Renews the certificate over the live link when it is due; the new key and certificate are
/// used from the next connection on (the running one stays).
async fn renew_loop(link: LinkSender, tls: &TlsConfig) {
    let conn = link.connection().clone();
    // Every link runs this loop; one renewal at a time, so two links never write different
    // keys and certificates over each other.
    static RENEWING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    loop {
        let (nb, na) = match cert_validity(&tls.cert) {
            Ok(v) => v,
            Err(e) => {
                warn!("certificate renewal disabled: {e:#}");
                return std::future::pending().await;
            }
        };
        let wait = (renew_at(nb, na) - unix_now()).max(0) as u64;
        if wait > 0 {
            tokio::time::sleep(Duration::from_secs(wait.min(3600))).await;
            continue;
        }
        let guard = RENEWING.lock().await;
        // Another link may have renewed while this one waited.
        if cert_validity(&tls.cert).is_ok_and(|(nb2, na2)| (nb2, na2) != (nb, na)) {
            continue;
        }
        let attempt = link.control(async {
            let (key_pem, csr_pem) = new_key_and_csr()?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&serde_json::to_vec(&LinkRequest::Renew { csr_pem })?)
                .await?;
            send.finish()?;
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                recv.read_to_end(MAX_CONTROL_MESSAGE),
            )
            .await
            .context("no answer")??;
            match serde_json::from_slice::<LinkAnswer>(&answer)? {
                LinkAnswer::Renewed { certificate_pem } => {
                    write_atomic(&tls.key, &key_pem, 0o600)?;
                    write_atomic(&tls.cert, &certificate_pem, 0o644)?;
                    let (_, na) = cert_validity(&tls.cert)?;
                    info!(
                        valid_until = %humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_secs(na.max(0) as u64)),
                        "connector certificate renewed"
                    );
                    anyhow::Ok(())
                }
                LinkAnswer::Refused { reason } => bail!("the broker refused: {reason}"),
                LinkAnswer::Noted => bail!("unexpected answer to a renewal"),
            }
        });
        let result = attempt.await;
        drop(guard);
        match result {
            // Never renew in a tight loop, whatever the certificate says.
            Ok(()) => tokio::time::sleep(Duration::from_secs(5)).await,
            Err(e) => {
                warn!("certificate renewal failed, retrying in 30 s: {e:#}");
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
}

/// Tells the broker on `conn` whether this connector drains and what it cannot reach.
pub(crate) async fn send_health(link: LinkSender, draining: bool, unreachable: Vec<String>) {
    let conn = link.connection().clone();
    let sent = link.control(async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let req = LinkRequest::Health {
            draining,
            unreachable,
        };
        send.write_all(&serde_json::to_vec(&req)?).await?;
        send.finish()?;
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            recv.read_to_end(MAX_CONTROL_MESSAGE),
        )
        .await
        .context("no answer")??;
        match serde_json::from_slice::<LinkAnswer>(&answer)? {
            LinkAnswer::Noted => Ok(()),
            other => bail!("unexpected answer {other:?}"),
        }
    });
    if let Err(e) = sent.await {
        warn!("cannot tell the broker this connector's health: {e:#}");
    }
}

/// An accepted link and what the broker said with it.
pub(crate) struct Linked {
    pub link: LinkId,
    pub sender: LinkSender,
    /// The link's UDP socket (another handle on it), for its drop counter.
    pub socket: Arc<StdUdpSocket>,
    pub device_ranges: Vec<IpNet>,
    pub app_ranges: Vec<IpNet>,
    /// Every broker of the deployment (connector endpoints).
    pub brokers: Vec<String>,
    /// The site's applications to check.
    pub health_checks: Vec<HealthCheck>,
}

/// Keeps one link to the broker at `broker` up: connects, reads, and reconnects with
/// jittered exponential backoff, forever. Packets and messages go to the site loop.
pub(crate) async fn link_task(
    config: Arc<ConnectorConfig>,
    broker: String,
    events: tokio::sync::mpsc::Sender<LinkEvent>,
    state: Arc<State>,
) {
    let max = Duration::from_secs(config.max_backoff_secs.max(1));
    let mut backoff = Duration::from_millis(250);
    loop {
        let started = Instant::now();
        add(&state.link_attempts, 1);
        let attempt = async {
            let client_config = tls_client_config(&config.tls, config.overlay_mtu)?;
            connect(&config, &broker, &client_config).await
        };
        match attempt.await {
            Ok(linked) => {
                backoff = Duration::from_millis(250);
                let sender = linked.sender.clone();
                let link = linked.link;
                let conn = sender.connection().clone();
                info!(site = %config.site, broker = %broker, remote = %conn.remote_address(), max_datagram = sender.max_datagram(), "linked to broker");
                if events
                    .send(LinkEvent::Up {
                        broker: broker.clone(),
                        linked,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                let reason = tokio::select! {
                    r = read_link(&conn, link, &events) => r,
                    _ = renew_loop(sender, &config.tls) => "renewal stopped".into(),
                };
                warn!(site = %config.site, broker = %broker, "link to broker lost: {reason}");
                let _ = events
                    .send(LinkEvent::Down {
                        broker: broker.clone(),
                        link,
                        reason,
                    })
                    .await;
            }
            Err(e) => warn!("cannot link to broker {broker}: {e:#}"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(250);
        }
        let jitter = rand::thread_rng().gen_range(0.8..1.2);
        let wait = backoff.mul_f64(jitter);
        debug!(?wait, broker = %broker, "reconnecting after backoff");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(max);
    }
}

/// Reads datagrams (in batches: what is waiting goes together) and broker messages of one
/// link until it ends.
async fn read_link(
    conn: &quinn::Connection,
    link: LinkId,
    events: &tokio::sync::mpsc::Sender<LinkEvent>,
) -> String {
    loop {
        tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(first) => {
                    let mut packets = Vec::with_capacity(16);
                    packets.push(first);
                    let mut ended = None;
                    while packets.len() < READ_BATCH {
                        match conn.read_datagram().now_or_never() {
                            Some(Ok(p)) => packets.push(p),
                            Some(Err(e)) => {
                                ended = Some(e.to_string());
                                break;
                            }
                            None => break,
                        }
                    }
                    if events.send(LinkEvent::Packets { link, packets }).await.is_err() {
                        return "connector stopping".into();
                    }
                    if let Some(e) = ended {
                        return e;
                    }
                }
                Err(e) => return e.to_string(),
            },
            s = conn.accept_uni() => match s {
                Ok(mut recv) => {
                    let events = events.clone();
                    tokio::spawn(async move {
                        let Ok(bytes) = recv.read_to_end(MAX_CONTROL_MESSAGE).await else { return };
                        match serde_json::from_slice::<SiteMessage>(&bytes) {
                            Ok(SiteMessage::MapName { device, synthetic, name, deny }) => {
                                let ev = NameEvent::Map { key: (device, synthetic), name, deny };
                                let _ = events.send(LinkEvent::Name(ev)).await;
                            }
                            Ok(SiteMessage::Brokers { brokers }) => {
                                let _ = events.send(LinkEvent::Brokers(brokers)).await;
                            }
                            Err(e) => warn!("malformed message from the broker: {e}"),
                        }
                    });
                }
                Err(e) => return e.to_string(),
            },
        }
    }
}

/// One link attempt: a fresh UDP socket *connected* to the broker (so it accepts nothing from
/// anyone else and is not a listening socket), QUIC with mutual TLS, then the hello exchange.
async fn connect(
    config: &ConnectorConfig,
    endpoint_name: &str,
    client_config: &quinn::ClientConfig,
) -> Result<Linked> {
    let broker: SocketAddr = tokio::net::lookup_host(endpoint_name)
        .await
        .with_context(|| format!("cannot resolve {endpoint_name:?}"))?
        .next()
        .context("broker name has no address")?;
    let bind: SocketAddr = if broker.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let socket = StdUdpSocket::bind(bind)?;
    socket.connect(broker)?;
    socket.set_nonblocking(true)?;
    sekisho_sys::udp::set_buffers(&socket, sekisho_sys::link::SOCKET_BUFFER);
    // A second handle on the same socket, to read the kernel's drop counter of it.
    let watch = Arc::new(socket.try_clone()?);
    let runtime = quinn::default_runtime().context("no async runtime")?;
    let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)?;
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        endpoint.connect_with(client_config.clone(), broker, &config.broker_name)?,
    )
    .await
    .context("QUIC handshake timed out")?
    .context("QUIC handshake failed")?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = ConnectorHello {
        site: config.site.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    send.write_all(&serde_json::to_vec(&hello)?).await?;
    send.finish()?;
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        recv.read_to_end(MAX_CONTROL_MESSAGE),
    )
    .await
    .context("no answer from broker")??;
    match serde_json::from_slice::<BrokerWelcome>(&answer)
        .context("malformed answer from broker")?
    {
        BrokerWelcome::Accepted {
            device_ranges,
            app_ranges,
            brokers,
            health_checks,
            ..
        } => {
            let link = LinkId(conn.stable_id() as u64);
            let sender = LinkSender::new(conn);
            if sender.max_datagram() < usize::from(config.overlay_mtu) {
                warn!(
                    max_datagram = sender.max_datagram(),
                    overlay_mtu = config.overlay_mtu,
                    "the link carries less than a full overlay packet"
                );
            }
            Ok(Linked {
                link,
                sender,
                socket: watch,
                device_ranges,
                app_ranges,
                brokers,
                health_checks,
            })
        }
        BrokerWelcome::Refused { reason } => bail!("broker refused this connector: {reason}"),
    }
}
