//! Connector links at the broker: the QUIC endpoint (mutual TLS; connectors dial in), the
//! hello and its checks, reading each link's datagrams into the workers, liveness and MTU
//! watching, and the requests connectors send on their own streams.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::FutureExt;
use ipnet::IpNet;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tracing::{debug, info, warn};

use sekisho_proto::broker::{LinkId, WorkerId};
use sekisho_proto::link::{
    ALPN, BrokerWelcome, ConnectorHello, MAX_CONTROL_MESSAGE, SiteMessage, connector_cert_name,
};
use sekisho_proto::policy::Policy;
use sekisho_sys::link::LinkSender;

use super::{DataPlane, LinkEntry, WorkerInput};
use crate::config::BrokerConfig;
use crate::{control, load_certs, pki};

/// Datagrams read from a link at once.
const READ_BATCH: usize = 256;

/// The QUIC endpoint connectors dial (mutual TLS), on a socket made here with sized buffers;
/// also returns another handle on that socket, for its drop counter.
pub fn quic_endpoint(config: &BrokerConfig) -> Result<(quinn::Endpoint, Arc<std::net::UdpSocket>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(&config.tls.ca)? {
        roots.add(ca).context("bad CA certificate")?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("cannot build the connector certificate verifier")?;
    let key = PrivateKeyDer::from_pem_file(&config.tls.key)
        .with_context(|| format!("cannot read private key {}", config.tls.key.display()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&config.tls.cert)?, key)
        .context("broker certificate and key do not match")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let transport = sekisho_sys::link::transport(
        config.overlay_mtu,
        Duration::from_secs(2),
        config.connectors.idle_timeout,
    )?;
    let mut transport = transport;
    // Connectors open the streams (hello, renewal, health); the broker opens unidirectional
    // ones for its messages.
    transport.max_concurrent_uni_streams(0u32.into());
    server.transport_config(Arc::new(transport));
    let socket = std::net::UdpSocket::bind(config.listen_connectors)
        .with_context(|| format!("cannot bind connector QUIC {}", config.listen_connectors))?;
    socket.set_nonblocking(true)?;
    sekisho_sys::udp::set_buffers(&socket, sekisho_sys::link::SOCKET_BUFFER);
    let watch = Arc::new(socket.try_clone()?);
    let runtime = quinn::default_runtime().context("no async runtime")?;
    let (reset_key, cid_key) = restart_keys(config)?;
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let endpoint = quinn::Endpoint::new(endpoint_config, Some(server), socket, runtime)?;
    Ok((endpoint, watch))
}

/// The keys of QUIC stateless resets and of connection IDs, derived from the broker's WireGuard
/// private key so that they survive a restart: a restarted broker recognises the connection IDs
/// of links it no longer knows as its own and answers them with a reset their connector accepts,
/// and the connector links again at once instead of waiting out its idle timeout (8 s). quinn's
/// defaults are random per process: after a restart, packets of old links are dropped as bearing
/// foreign connection IDs and no reset is ever sent.
fn restart_keys(config: &BrokerConfig) -> Result<(ring::hmac::Key, u64)> {
    let secret = std::fs::read(&config.private_key_file).with_context(|| {
        format!(
            "cannot read private key {}",
            config.private_key_file.display()
        )
    })?;
    let derive = |label: &[u8]| {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, label);
        ring::hmac::sign(&k, secret.trim_ascii())
    };
    let reset = derive(b"sekisho quic stateless reset v1");
    let cid = derive(b"sekisho quic connection id v1");
    let cid_key = u64::from_le_bytes(cid.as_ref()[..8].try_into().expect("32-byte tag"));
    Ok((
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref()),
        cid_key,
    ))
}

/// Accepts connector links for as long as the endpoint is open.
pub async fn accept_connectors(
    endpoint: quinn::Endpoint,
    dp: DataPlane,
    control: Option<Arc<control::Control>>,
    stale_after: Duration,
    retries: Arc<std::sync::atomic::AtomicU64>,
) {
    while let Some(incoming) = endpoint.accept().await {
        // Address validation first: a connection attempt from an address that has not shown
        // it can receive there gets a Retry (a token bound to its address) and costs no TLS
        // work, so spoofed sources cannot make the broker handshake or amplify.
        if !incoming.remote_address_validated() {
            retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = incoming.retry() {
                debug!("QUIC retry refused: {e}");
            }
            continue;
        }
        let (dp, control) = (dp.clone(), control.clone());
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if let Err(e) = serve_connector(incoming, dp, control, stale_after).await {
                warn!(%remote, "connector link ended: {e:#}");
            }
        });
    }
}

/// Checks that the connector's certificate is valid for the site it claims and that the
/// policy knows the site.
fn check_connector(
    conn: &quinn::Connection,
    hello: &ConnectorHello,
    policy: &Policy,
) -> Result<(), String> {
    let leaf = peer_leaf(conn).ok_or("no client certificate")?;
    let leaf = CertificateDer::from(leaf);
    let cert =
        webpki::EndEntityCert::try_from(&leaf).map_err(|e| format!("bad certificate: {e}"))?;
    let name = ServerName::try_from(connector_cert_name(&hello.site))
        .map_err(|_| "bad site name".to_string())?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("certificate is not valid for site {:?}", hello.site))?;
    if !policy.sites.contains(&hello.site) {
        return Err(format!("site {:?} is not in the policy", hello.site));
    }
    Ok(())
}

/// The DER leaf certificate a connector presented.
pub(crate) fn peer_leaf(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| c.to_vec())
}

/// With a control plane, a connector's certificate must belong to an enrolled, unrevoked
/// connector of the site it claims. Returns the connector's name.
async fn check_enrolled(
    conn: &quinn::Connection,
    site: &str,
    control: &control::Control,
) -> Result<String, String> {
    let serial = peer_leaf(conn)
        .and_then(|der| pki::cert_serial(&der))
        .ok_or("cannot read the certificate serial")?;
    match control.store.connector_by_serial(&serial).await {
        Ok(Some((name, enrolled_site))) if enrolled_site == site => Ok(name),
        Ok(Some((name, other))) => Err(format!(
            "certificate of connector {name} is for site {other:?}, not {site:?}"
        )),
        Ok(None) => Err(
            "certificate is not the current one of an enrolled connector (revoked, or replaced by a renewal)"
                .into(),
        ),
        Err(e) => Err(format!("store unavailable: {e:#}")),
    }
}

async fn serve_connector(
    incoming: quinn::Incoming,
    dp: DataPlane,
    control: Option<Arc<control::Control>>,
    stale_after: Duration,
) -> Result<()> {
    let conn = incoming.await.context("handshake failed")?;
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .context("no hello within 10 s")??;
    let hello_bytes = recv
        .read_to_end(MAX_CONTROL_MESSAGE)
        .await
        .context("reading hello")?;
    let hello: ConnectorHello = serde_json::from_slice(&hello_bytes).context("malformed hello")?;
    let (check, ranges, app_ranges, health_checks) = {
        let p = dp.policy();
        let p = &*p;
        (
            check_connector(&conn, &hello, p),
            vec![p.device_range],
            vec![IpNet::V4(p.dns.app_range)],
            health_checks(p, &hello.site),
        )
    };
    // The connector's name: the enrolled name, else (no control plane) its address.
    let check = match (check, &control) {
        (Ok(()), Some(c)) => check_enrolled(&conn, &hello.site, c).await,
        (Ok(()), None) => Ok(conn.remote_address().to_string()),
        (Err(e), _) => Err(e),
    };
    let welcome = match &check {
        Ok(_) => BrokerWelcome::Accepted {
            site: hello.site.clone(),
            device_ranges: ranges,
            app_ranges,
            brokers: control
                .as_ref()
                .map(|c| c.connector_endpoints())
                .unwrap_or_default(),
            health_checks,
        },
        Err(reason) => BrokerWelcome::Refused {
            reason: reason.clone(),
        },
    };
    send.write_all(&serde_json::to_vec(&welcome)?).await?;
    send.finish()?;
    let name = match check {
        Ok(name) => name,
        Err(reason) => {
            // Give the refusal time to arrive before closing.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(1u32.into(), reason.as_bytes());
            bail!("refused connector for site {:?}: {reason}", hello.site);
        }
    };
    let site = hello.site;
    let id = LinkId(conn.stable_id() as u64);
    let sender = LinkSender::new(conn.clone());
    info!(site = %site, connector = %name, version = %hello.version, remote = %conn.remote_address(), max_datagram = sender.max_datagram(), "connector linked");
    if sender.max_datagram() < usize::from(dp.overlay_mtu()) {
        warn!(
            connector = %name,
            max_datagram = sender.max_datagram(),
            "the link carries less than a full overlay packet; larger packets are answered with ICMP"
        );
    }
    dp.link_up(
        id,
        LinkEntry {
            site: site.clone(),
            connector: name.clone(),
            sender: sender.clone(),
        },
    );
    let requests = tokio::spawn(serve_link_requests(
        sender.clone(),
        site.clone(),
        dp.clone(),
        control,
    ));
    let watch = tokio::spawn(watch_link(conn.clone(), dp.clone(), stale_after));
    let result = read_link(&conn, id, &dp).await;
    requests.abort();
    watch.abort();
    dp.link_down(id);
    info!(site = %site, connector = %name, "connector link closed: {result}");
    Ok(())
}

/// Reads the link's datagrams (in batches: what is waiting goes together) and hands each to
/// the worker of the device it is for, until the link ends.
async fn read_link(
    conn: &quinn::Connection,
    link: LinkId,
    dp: &DataPlane,
) -> quinn::ConnectionError {
    let mut assignment = dp.assignment();
    let workers = dp.workers();
    let mut per_worker: Vec<Vec<Bytes>> = vec![Vec::new(); workers];
    loop {
        let first = match conn.read_datagram().await {
            Ok(p) => p,
            Err(e) => return e,
        };
        let mut ended = None;
        {
            let a = assignment.borrow_and_update();
            let mut route = |p: Bytes| {
                let w = sekisho_proto::packet::addresses(&p)
                    .ok()
                    .and_then(|(_, dst)| a.owner_of_address(dst))
                    .map_or(0, |w| w.0 as usize);
                per_worker[w.min(workers - 1)].push(p);
            };
            route(first);
            for _ in 1..READ_BATCH {
                match conn.read_datagram().now_or_never() {
                    Some(Ok(p)) => route(p),
                    Some(Err(e)) => {
                        ended = Some(e);
                        break;
                    }
                    None => break,
                }
            }
        }
        for (w, packets) in per_worker.iter_mut().enumerate() {
            if packets.is_empty() {
                continue;
            }
            let packets = std::mem::take(packets);
            dp.input(WorkerId(w as u16), WorkerInput::Link { link, packets })
                .await;
        }
        if let Some(e) = ended {
            return e;
        }
    }
}

/// The applications of `site` a connector checks it can reach: one host (an address or a
/// plain name) and one TCP port each. Ranges and wildcard names have no single host to try.
fn health_checks(p: &Policy, site: &str) -> Vec<sekisho_proto::link::HealthCheck> {
    let Some(site_id) = p.sites.iter().position(|s| s == site) else {
        return Vec::new();
    };
    p.applications
        .iter()
        .filter(|a| a.site as usize == site_id)
        .filter(|a| {
            a.protocols.is_empty() || a.protocols.contains(&sekisho_proto::policy::Protocol::Tcp)
        })
        .filter_map(|a| {
            let port = a.ports.first().map(|r| r.0)?;
            let host = a
                .networks
                .iter()
                .find(|n| n.prefix_len() == n.max_prefix_len())
                .map(|n| n.addr().to_string())
                .or_else(|| a.names.iter().find(|n| !n.contains('*')).cloned())?;
            Some(sekisho_proto::link::HealthCheck {
                application: a.name.clone(),
                host,
                port,
            })
        })
        .collect()
}

/// Marks the link stale while nothing arrives from the connector (it sends a keepalive every
/// 300 ms), so new flows go to the site's other connectors well before the QUIC idle timeout
/// closes the link.
async fn watch_link(conn: quinn::Connection, dp: DataPlane, stale_after: Duration) {
    let id = LinkId(conn.stable_id() as u64);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last = conn.stats().udp_rx.datagrams;
    let mut heard = Instant::now();
    let mut stale = false;
    let mut mtu = conn.max_datagram_size().unwrap_or(0);
    loop {
        tick.tick().await;
        let now_count = conn.stats().udp_rx.datagrams;
        if now_count != last {
            last = now_count;
            heard = Instant::now();
        }
        let silent = heard.elapsed() > stale_after;
        if silent != stale {
            stale = silent;
            dp.link_stale(id, stale);
        }
        let now_mtu = conn.max_datagram_size().unwrap_or(0);
        if now_mtu != mtu {
            debug!(link = %id, from = mtu, to = now_mtu, "connector link datagram size changed");
            mtu = now_mtu;
            dp.link_mtu(id, mtu);
        }
    }
}

/// Tells every linked connector when the set of brokers changed, so connectors link to a
/// broker that joined and drop one that left.
pub async fn announce_brokers(dp: DataPlane, control: Arc<control::Control>) {
    let mut told = control.connector_endpoints();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = control.connector_endpoints();
        if now == told {
            continue;
        }
        info!(brokers = ?now, "the set of brokers changed; telling the connectors");
        let message = serde_json::to_vec(&SiteMessage::Brokers {
            brokers: now.clone(),
        })
        .unwrap_or_default();
        for (_, link) in dp.links() {
            let message = message.clone();
            tokio::spawn(async move {
                if let Err(e) = link.sender.send_message(&message).await {
                    debug!("cannot send a message to the connector: {e}");
                }
            });
        }
        told = now;
    }
}

/// Requests a linked connector sends on its own streams (certificate renewal, health).
async fn serve_link_requests(
    link: LinkSender,
    site: String,
    dp: DataPlane,
    control: Option<Arc<control::Control>>,
) {
    let conn = link.connection().clone();
    use sekisho_proto::link::{LinkAnswer, LinkRequest};
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let Ok(bytes) = recv.read_to_end(MAX_CONTROL_MESSAGE).await else {
            continue;
        };
        let answer = match serde_json::from_slice::<LinkRequest>(&bytes) {
            Ok(LinkRequest::Renew { csr_pem }) => {
                let serial = peer_leaf(&conn).and_then(|der| pki::cert_serial(&der));
                match (serial, &control) {
                    (Some(serial), Some(control)) => {
                        control.renew_connector(&serial, &site, &csr_pem).await
                    }
                    (None, _) => Err("cannot read the link's certificate".to_string()),
                    (_, None) => Err("this broker has no control plane to renew".to_string()),
                }
                .map(Some)
            }
            Ok(LinkRequest::Health {
                draining,
                unreachable,
            }) => {
                dp.link_health(LinkId(conn.stable_id() as u64), draining, &unreachable);
                Ok(None)
            }
            Err(e) => Err(format!("malformed request: {e}")),
        };
        let answer = match answer {
            Ok(Some(certificate_pem)) => LinkAnswer::Renewed { certificate_pem },
            Ok(None) => LinkAnswer::Noted,
            Err(reason) => {
                warn!(site = %site, "connector renewal refused: {reason}");
                LinkAnswer::Refused { reason }
            }
        };
        if let Ok(bytes) = serde_json::to_vec(&answer) {
            let _ = link
                .control(async {
                    let _ = send.write_all(&bytes).await;
                    let _ = send.finish();
                })
                .await;
        }
    }
}
