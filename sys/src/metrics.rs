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

/// The endpoint's routes.
pub fn router(source: Arc<dyn Source>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(source)
}

/// Binds `listen` (errors name it) and serves the endpoint until the process ends.
pub async fn serve(listen: SocketAddr, source: Arc<dyn Source>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind the metrics endpoint {listen}: {e}"),
        )
    })?;
    axum::serve(listener, router(source)).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
