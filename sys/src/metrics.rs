//! The Prometheus endpoint of the broker and the connector.
//!
//! The daemons keep their own counters (plain integers in their cores); at every scrape they
//! fill a [`Snapshot`], which prometheus-client renders as OpenMetrics text. [`serve`] answers
//! `GET /metrics`, `GET /healthz` (the process serves) and `GET /readyz` (the daemon can do
//! its work, as its [`Source`] says).

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The content type of OpenMetrics text, which Prometheus asks for first.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(Cow<'static, str>, String)>;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Value {
    Counter(u64),
    Gauge(f64),
}

#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    samples: Vec<(Labels, Value)>,
}

/// The metrics of one scrape. Counters are named without `_total`: the encoder adds it.
#[derive(Debug, Default)]
pub struct Snapshot {
    prefix: &'static str,
    families: Vec<Family>,
}

impl Snapshot {
    /// Names get `prefix` and an underscore in front (`sekisho_broker`, say).
    pub fn new(prefix: &'static str) -> Self {
        Snapshot {
            prefix,
            families: Vec::new(),
        }
    }

    fn push(&mut self, name: &'static str, help: &'static str, labels: &[(&str, &str)], v: Value) {
        let labels: Labels = labels
            .iter()
            .map(|(k, v)| (Cow::Owned(k.to_string()), v.to_string()))
            .collect();
        match self.families.iter_mut().find(|f| f.name == name) {
            Some(f) => f.samples.push((labels, v)),
            None => self.families.push(Family {
                name,
                help,
                samples: vec![(labels, v)],
            }),
        }
    }

    pub fn counter(&mut self, name: &'static str, help: &'static str, value: u64) {
        self.push(name, help, &[], Value::Counter(value));
    }

    pub fn gauge(&mut self, name: &'static str, help: &'static str, value: f64) {
        self.push(name, help, &[], Value::Gauge(value));
    }

    /// One sample of a labelled counter; samples of one name form one family.
    pub fn counter_with(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: u64,
    ) {
        self.push(name, help, labels, Value::Counter(value));
    }

    pub fn gauge_with(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        self.push(name, help, labels, Value::Gauge(value));
    }

    /// The OpenMetrics text of this snapshot.
    pub fn render(self) -> String {
        let mut registry = Registry::with_prefix(self.prefix);
        registry.register_collector(Box::new(Rendered(self.families)));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[derive(Debug)]
struct Rendered(Vec<Family>);

impl Collector for Rendered {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let kind = match f.samples.first() {
                Some((_, Value::Counter(_))) => MetricType::Counter,
                _ => MetricType::Gauge,
            };
            let mut family = encoder.encode_descriptor(f.name, f.help, None, kind)?;
            if let [(labels, value)] = f.samples.as_slice()
                && labels.is_empty()
            {
                match *value {
                    Value::Counter(v) => ConstCounter::new(v).encode(family)?,
                    Value::Gauge(v) => ConstGauge::new(v).encode(family)?,
                }
                continue;
            }
            for (labels, value) in &f.samples {
                let labels: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(k, v)| (k.as_ref(), v.as_str()))
                    .collect();
                let sample = family.encode_family(&labels)?;
                match *value {
                    Value::Counter(v) => ConstCounter::new(v).encode(sample)?,
                    Value::Gauge(v) => ConstGauge::new(v).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

/// Whether a daemon is ready; `Err` says why not.
pub type Readiness<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// A snapshot on its way (a daemon may have to ask its workers).
pub type Snapshotting<'a> = Pin<Box<dyn Future<Output = Snapshot> + Send + 'a>>;

/// What the endpoint asks the daemon for.
pub trait Source: Send + Sync + 'static {
    fn snapshot(&self) -> Snapshotting<'_>;
    fn ready(&self) -> Readiness<'_>;
}

async fn metrics(State(s): State<Arc<dyn Source>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        s.snapshot().await.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<dyn Source>>) -> (StatusCode, String) {
    match s.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Whether `header` (an `Authorization` value) carries `token` as a bearer token. Digests are
/// compared, so the time taken says nothing about how much of the token was right.
fn bearer_matches(header: Option<&header::HeaderValue>, token: &str) -> bool {
    let Some(given) = header
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
    else {
        return false;
    };
    let digest = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
    digest(given.trim().as_bytes()).as_ref() == digest(token.as_bytes()).as_ref()
}

/// The endpoint's routes. With `bearer`, `/metrics` answers only requests carrying
/// `Authorization: Bearer <token>` (401 otherwise); `/healthz` and `/readyz` stay open for
/// orchestrators' probes and say nothing but ready or not and why.
pub fn router(source: Arc<dyn Source>, bearer: Option<String>) -> Router {
    let bearer: Option<Arc<str>> = bearer.map(Arc::from);
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let bearer = bearer.clone();
                async move {
                    if let Some(token) = bearer
                        && !bearer_matches(req.headers().get(header::AUTHORIZATION), &token)
                    {
                        return (
                            StatusCode::UNAUTHORIZED,
                            [(header::WWW_AUTHENTICATE, "Bearer")],
                            "a bearer token is required\n",
                        )
                            .into_response();
                    }
                    next.run(req).await
                }
            },
        ));
    guarded
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(source)
}

/// Reads a bearer token file (one line; surrounding white space ignored). Errors name the file.
pub fn read_bearer_token(path: &std::path::Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot read the metrics bearer token {}: {e}",
                path.display()
            ),
        )
    })?;
    let token = text.trim().to_string();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: the metrics bearer token must be one word on one line",
                path.display()
            ),
        ));
    }
    Ok(token)
}

/// Binds `listen` (errors name it) and serves the endpoint until the process ends.
pub async fn serve(
    listen: SocketAddr,
    source: Arc<dyn Source>,
    bearer: Option<String>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind the metrics endpoint {listen}: {e}"),
        )
    })?;
    axum::serve(listener, router(source, bearer)).await
}

/// The log sinks' counters (`[[log_sinks]]`): records delivered and lost per sink and why,
/// what waits in each queue, whether each is connected.
pub fn log_sink_metrics(m: &mut Snapshot, sinks: &[crate::logship::SinkStats]) {
    for s in sinks {
        let sink = s.name.as_str();
        for (outcome, n) in [
            ("delivered", s.delivered),
            ("dropped_queue_full", s.dropped_queue_full),
            ("dropped_undeliverable", s.dropped_undeliverable),
        ] {
            m.counter_with(
                "log_records",
                "Records for the SIEM by sink and outcome (delivered, or lost and why).",
                &[("sink", sink), ("outcome", outcome)],
                n,
            );
        }
        m.gauge_with(
            "log_sink_queued",
            "Records waiting in a log sink's queue.",
            &[("sink", sink)],
            s.queued as f64,
        );
        m.gauge_with(
            "log_sink_connected",
            "Whether a log sink's connection is up (1) or not (0).",
            &[("sink", sink)],
            if s.connected { 1.0 } else { 0.0 },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Source for Fixed {
        fn snapshot(&self) -> Snapshotting<'_> {
            Box::pin(async {
                let mut s = Snapshot::new("sekisho_test");
                s.counter("packets", "Packets seen.", 7);
                s
            })
        }
        fn ready(&self) -> Readiness<'_> {
            Box::pin(async { Ok(()) })
        }
    }

    /// One GET through a real socket; returns the status code.
    async fn get_status(addr: SocketAddr, path: &str, auth: Option<&str>) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out[9..12].parse().unwrap()
    }

    #[tokio::test]
    async fn a_bearer_token_guards_metrics_but_not_the_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(Arc::new(Fixed), Some("s3cret".into()));
        tokio::spawn(async move { axum::serve(listener, app).await });
        assert_eq!(get_status(addr, "/metrics", None).await, 401);
        assert_eq!(
            get_status(addr, "/metrics", Some("Bearer wrong")).await,
            401
        );
        assert_eq!(
            get_status(addr, "/metrics", Some("Basic czNjcmV0")).await,
            401
        );
        assert_eq!(
            get_status(addr, "/metrics", Some("Bearer s3cret")).await,
            200
        );
        assert_eq!(get_status(addr, "/healthz", None).await, 200);
        assert_eq!(get_status(addr, "/readyz", None).await, 200);
        // Without a token the endpoint is open (it listens on loopback by default).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(Arc::new(Fixed), None)).await });
        assert_eq!(get_status(addr, "/metrics", None).await, 200);
    }

    #[test]
    fn snapshot_renders_counters_gauges_and_labelled_families() {
        let mut s = Snapshot::new("sekisho_test");
        s.counter("packets", "Packets seen.", 7);
        s.gauge("peers", "Peers now.", 2.0);
        s.counter_with(
            "decisions",
            "Decisions.",
            &[("result", "allow"), ("reason", "rule")],
            3,
        );
        s.counter_with(
            "decisions",
            "Decisions.",
            &[("result", "deny"), ("reason", "a \"q\"")],
            1,
        );
        let text = s.render();
        assert!(
            text.contains("# TYPE sekisho_test_packets counter\n"),
            "{text}"
        );
        assert!(text.contains("sekisho_test_packets_total 7\n"), "{text}");
        assert!(text.contains("# TYPE sekisho_test_peers gauge\n"), "{text}");
        assert!(text.contains("sekisho_test_peers 2.0\n"), "{text}");
        assert!(
            text.contains("sekisho_test_decisions_total{result=\"allow\",reason=\"rule\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("reason=\"a \\\"q\\\"\"} 1\n"), "{text}");
        assert_eq!(text.matches("# TYPE sekisho_test_decisions").count(), 1);
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
