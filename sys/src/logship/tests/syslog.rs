//! The syslog sink against loopback receivers, plain and TLS.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::abnf::{Message, parse, take_frames};
use super::{free_port, rec, stats, wait_for};
use crate::logship::{RecordKind, Shipper, SinkConfig, SinkKind};

const APP: &str = "sekisho-test";
const HOST: &str = "test-host";

/// What a loopback syslog receiver got.
#[derive(Default)]
struct Got {
    messages: Vec<Message>,
    errors: Vec<String>,
    connections: usize,
}

type Shared = Arc<Mutex<Got>>;

/// A syslog receiver on `listener`, reading one connection at a time (as the sink uses one),
/// plain or behind `tls`. Dropping the task (abort) closes the listener and the connection.
fn receiver(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    got: Shared,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let mut stream: Box<dyn AsyncRead + Unpin + Send> = match &tls {
                None => Box::new(tcp),
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(s) => Box::new(s),
                    Err(e) => {
                        got.lock().unwrap().errors.push(format!("handshake: {e}"));
                        continue;
                    }
                },
            };
            got.lock().unwrap().connections += 1;
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                let n = match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                let mut g = got.lock().unwrap();
                match take_frames(&mut buf) {
                    Ok(frames) => {
                        for f in frames {
                            match parse(&f) {
                                Ok(m) => g.messages.push(m),
                                Err(e) => g
                                    .errors
                                    .push(format!("{e}: {}", String::from_utf8_lossy(&f))),
                            }
                        }
                    }
                    Err(e) => {
                        g.errors.push(e);
                        break;
                    }
                }
            }
            if !buf.is_empty() {
                got.lock().unwrap().errors.push(format!(
                    "connection ended inside a frame: {} bytes left",
                    buf.len()
                ));
            }
        }
    })
}

async fn stop(task: JoinHandle<()>) {
    task.abort();
    let _ = task.await;
}

fn seq(m: &Message) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&m.msg).unwrap();
    v["seq"].as_u64().unwrap()
}

fn seqs(got: &Shared) -> Vec<u64> {
    got.lock().unwrap().messages.iter().map(seq).collect()
}

async fn wait_received(got: &Shared, n: usize, limit: Duration) {
    let start = Instant::now();
    while got.lock().unwrap().messages.len() < n {
        assert!(
            start.elapsed() < limit,
            "receiver has {} of {n} messages",
            got.lock().unwrap().messages.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn syslog(url: String) -> SinkConfig {
    SinkConfig::new(SinkKind::Syslog, url)
}

fn start(configs: &[SinkConfig]) -> Shipper {
    Shipper::start(configs, APP, HOST, Path::new("/")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_receiver_reads_back_framed_rfc5424_messages() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Shared::default();
    let task = receiver(listener, None, got.clone());
    let shipper = start(&[syslog(format!("tcp://127.0.0.1:{port}"))]);
    for i in 0..20 {
        shipper.send(rec(
            if i < 10 {
                RecordKind::Flows
            } else {
                RecordKind::Dns
            },
            i,
        ));
    }
    let st = wait_for(&shipper, Duration::from_secs(10), |s| s.delivered == 20).await;
    wait_received(&got, 20, Duration::from_secs(10)).await;
    assert!(st.connected);
    assert_eq!(
        (st.queued, st.dropped_queue_full, st.dropped_undeliverable),
        (0, 0, 0)
    );
    assert_eq!(st.name, format!("syslog tcp://127.0.0.1:{port}"));
    assert_eq!(st.kind, "syslog");
    {
        let g = got.lock().unwrap();
        assert!(g.errors.is_empty(), "{:?}", g.errors);
        assert_eq!(g.connections, 1);
        for (i, m) in g.messages.iter().enumerate() {
            assert_eq!(seq(m), i as u64);
            assert_eq!(m.pri, if i % 2 == 0 { 16 * 8 + 6 } else { 16 * 8 + 4 });
            assert_eq!(m.hostname, HOST);
            assert_eq!(m.app_name, APP);
            assert_eq!(m.procid, std::process::id().to_string());
            assert_eq!(m.msgid, "flow");
            let kind = if i < 10 { "flows" } else { "dns" };
            assert_eq!(m.sd[0].1, vec![("kind".to_string(), kind.to_string())]);
            let body: serde_json::Value = serde_json::from_slice(&m.msg).unwrap();
            assert_eq!(body["text"], "hello \"world\" ]");
        }
    }
    stop(task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_receiver_gets_every_record_exactly_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let first = Shared::default();
    let task = receiver(listener, None, first.clone());
    let shipper = start(&[syslog(format!("tcp://127.0.0.1:{port}"))]);
    for i in 0..50 {
        shipper.send(rec(RecordKind::Flows, i));
    }
    wait_received(&first, 50, Duration::from_secs(10)).await;

    // The receiver goes away; records keep coming while it is down.
    stop(task).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 50..150 {
        shipper.send(rec(RecordKind::Flows, i));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let down = stats(&shipper);
    assert!(!down.connected, "{down:#?}");
    assert!(down.last_error.is_some());

    // It comes back on the same port: what was queued arrives, once.
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let second = Shared::default();
    let task = receiver(listener, None, second.clone());
    let st = wait_for(&shipper, Duration::from_secs(15), |s| s.delivered == 150).await;
    wait_received(&second, 100, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut all = seqs(&first);
    all.extend(seqs(&second));
    assert_eq!(
        all,
        (0..150).collect::<Vec<_>>(),
        "each record once, in order"
    );
    assert_eq!(
        (st.dropped_queue_full, st.dropped_undeliverable, st.queued),
        (0, 0, 0)
    );
    assert_eq!(st.reconnects, 1);
    assert!(st.connected);
    assert!(first.lock().unwrap().errors.is_empty());
    assert!(second.lock().unwrap().errors.is_empty());
    stop(task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_queue_counts_its_overflow_and_loses_nothing_else() {
    let port = free_port().await;
    let mut config = syslog(format!("tcp://127.0.0.1:{port}"));
    config.queue = 4;
    let shipper = start(&[config]);
    const SENT: u64 = 100;
    for i in 0..SENT {
        shipper.send(rec(RecordKind::Flows, i));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let got = Shared::default();
    let task = receiver(listener, None, got.clone());
    let st = wait_for(&shipper, Duration::from_secs(15), |s| s.queued == 0).await;
    assert_eq!(
        st.delivered + st.dropped_queue_full + st.dropped_undeliverable,
        SENT,
        "{st:#?}"
    );
    assert!(st.dropped_queue_full > 0 && st.delivered >= 4, "{st:#?}");
    wait_received(&got, st.delivered as usize, Duration::from_secs(5)).await;
    let received = seqs(&got);
    let mut unique = received.clone();
    unique.dedup();
    assert_eq!(unique, received, "no duplicates");
    assert_eq!(received.len() as u64, st.delivered);
    stop(task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_never_blocks_when_the_receiver_is_down() {
    let port = free_port().await;
    let mut config = syslog(format!("tcp://127.0.0.1:{port}"));
    config.queue = 1000;
    let shipper = start(&[config]);
    const SENT: u64 = 100_000;
    let records: Vec<_> = (0..SENT).map(|i| rec(RecordKind::Flows, i)).collect();
    let t0 = Instant::now();
    for r in records {
        shipper.send(r);
    }
    let took = t0.elapsed();
    println!("sending {SENT} records into a sink whose server is down took {took:?}");
    assert!(took < Duration::from_secs(2), "send took {took:?}");
    let st = stats(&shipper);
    assert_eq!(st.accepted + st.dropped_queue_full, SENT, "{st:#?}");
    assert!(st.dropped_queue_full >= SENT - 1000 - 512, "{st:#?}");
    assert_eq!(st.delivered, 0);
}

/// A test PKI: a CA, a server certificate for 127.0.0.1 and localhost, a client certificate,
/// and an unrelated CA.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
    ca_der: CertificateDer<'static>,
}

fn make_ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    (cert, Issuer::new(params, key))
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (ca_cert, issuer) = make_ca("logship test CA");
    let (other_cert, _) = make_ca("some other CA");
    let server_key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &issuer).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["broker.test".to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = params.signed_by(&client_key, &issuer).unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        other_ca: write("other-ca.pem", other_cert.pem()),
        client_cert: write("client.pem", client_cert.pem()),
        client_key: write("client.key", client_key.serialize_pem()),
        server_chain: vec![server_cert.der().clone()],
        server_key: server_key.serialize_der(),
        ca_der: ca_cert.der().clone(),
        _dir: dir,
    }
}

fn acceptor(
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
    client_auth: bool,
) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap();
    let builder = if client_auth {
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key.clone()));
    let config = builder
        .with_single_cert(pki.server_chain.clone(), key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Ships 10 records over TLS to a receiver with these settings; returns what arrived.
async fn over_tls(
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
    client_auth: bool,
    host: &str,
) -> Vec<u64> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Shared::default();
    let task = receiver(
        listener,
        Some(acceptor(pki, versions, client_auth)),
        got.clone(),
    );
    let mut config = syslog(format!("tls://{host}:{port}"));
    config.ca = Some(pki.ca.clone());
    if client_auth {
        config.cert = Some(pki.client_cert.clone());
        config.key = Some(pki.client_key.clone());
    }
    let shipper = start(&[config]);
    for i in 0..10 {
        shipper.send(rec(RecordKind::Audit, i));
    }
    let st = wait_for(&shipper, Duration::from_secs(10), |s| s.delivered == 10).await;
    assert!(st.connected && st.last_error.is_none(), "{st:#?}");
    wait_received(&got, 10, Duration::from_secs(10)).await;
    {
        let g = got.lock().unwrap();
        assert!(g.errors.is_empty(), "{:?}", g.errors);
        assert_eq!(g.messages[0].sd[0].1[0].1, "audit");
    }
    let out = seqs(&got);
    stop(task).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_delivers_over_tls_1_3_and_1_2_and_with_a_client_certificate() {
    let pki = pki();
    let all: Vec<u64> = (0..10).collect();
    assert_eq!(
        over_tls(&pki, &[&rustls::version::TLS13], false, "127.0.0.1").await,
        all
    );
    assert_eq!(
        over_tls(&pki, &[&rustls::version::TLS12], false, "127.0.0.1").await,
        all
    );
    assert_eq!(
        over_tls(&pki, &[&rustls::version::TLS13], true, "localhost").await,
        all
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_wrong_ca_is_refused_and_records_wait_in_the_queue() {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Shared::default();
    let task = receiver(
        listener,
        Some(acceptor(&pki, &[&rustls::version::TLS13], false)),
        got.clone(),
    );
    let mut config = syslog(format!("tls://127.0.0.1:{port}"));
    config.ca = Some(pki.other_ca.clone());
    config.queue = 4;
    let shipper = start(&[config]);
    const SENT: u64 = 1000;
    for i in 0..SENT {
        shipper.send(rec(RecordKind::Admin, i));
    }
    let st = wait_for(&shipper, Duration::from_secs(10), |s| {
        s.last_error.is_some() && s.reconnects == 0
    })
    .await;
    // A few more tries with backoff, still refused.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let st2 = stats(&shipper);
    let error = st2.last_error.clone().unwrap();
    assert!(error.contains("certificate"), "{error}");
    assert!(!st2.connected);
    assert_eq!(st2.delivered, 0);
    assert_eq!(st2.dropped_undeliverable, 0);
    // Everything taken waits (the queue of 4 and the batch in hand); the rest overflowed.
    assert_eq!(st2.queued, st2.accepted, "{st2:#?}");
    assert!(st2.accepted >= 4 && st2.accepted <= 4 + 512, "{st2:#?}");
    assert_eq!(st2.accepted + st2.dropped_queue_full, SENT);
    assert_eq!(st.accepted, st2.accepted);
    {
        let g = got.lock().unwrap();
        assert!(g.messages.is_empty());
        assert!(g.errors.len() >= 2, "handshakes retried: {:?}", g.errors);
    }
    stop(task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_counts_what_could_not_be_delivered() {
    let port = free_port().await;
    let shipper = start(&[syslog(format!("tcp://127.0.0.1:{port}"))]);
    for i in 0..10 {
        shipper.send(rec(RecordKind::Flows, i));
    }
    let counters = shipper.inner.sinks[0].counters.clone();
    let t0 = Instant::now();
    drop(shipper);
    // The sink keeps trying for 5 s, then counts the rest as lost and ends.
    while counters
        .dropped_undeliverable
        .load(std::sync::atomic::Ordering::Relaxed)
        < 10
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "{counters:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(t0.elapsed() >= Duration::from_secs(4), "{:?}", t0.elapsed());
    assert_eq!(counters.queued(), 0);
    assert!(
        counters
            .last_error
            .lock()
            .unwrap()
            .as_deref()
            .unwrap()
            .contains("undelivered")
    );
}
