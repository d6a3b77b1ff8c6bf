//! The OTLP sink: OTLP/HTTP with protobuf (`POST`, `Content-Type: application/x-protobuf`),
//! one `ExportLogsServiceRequest` per batch of up to 512 records or 200 ms.
//!
//! Resource attributes `service.name` (the app name) and `host.name`; scope "sekisho"; each
//! LogRecord has the event's time, the time it was sent as observed time, the severity mapped
//! per the OpenTelemetry data model, the body as a string (the record's compact JSON), and the
//! attributes `sekisho.kind` and `event.name` (also set as the record's `event_name`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use tokio::sync::{Notify, mpsc};

use super::{
    Backoff, Counters, FieldError, Origin, Record, SinkConfig, give_up, now_ms, past_grace, tls,
};

/// Records in one export at most.
pub(super) const MAX_BATCH: usize = 512;
/// How long a batch waits to fill.
pub(super) const LINGER: Duration = Duration::from_millis(200);
/// The longest Retry-After honoured.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) const CONTENT_TYPE: &str = "application/x-protobuf";

fn string_value(s: impl Into<String>) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(any_value::Value::StringValue(s.into())),
    })
}

fn attribute(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: string_value(value),
        ..Default::default()
    }
}

/// The LogRecord of one record.
pub(super) fn log_record(r: &Record, observed_unix_nano: u64) -> LogRecord {
    LogRecord {
        time_unix_nano: r.time_ms.saturating_mul(1_000_000),
        observed_time_unix_nano: observed_unix_nano,
        severity_number: r.severity.otel_number(),
        severity_text: r.severity.as_str().to_string(),
        body: string_value(serde_json::to_string(&r.body).unwrap_or_else(|_| "null".into())),
        attributes: vec![
            attribute("sekisho.kind", r.kind.as_str()),
            attribute("event.name", r.msgid.clone()),
        ],
        event_name: r.msgid.clone(),
        ..Default::default()
    }
}

/// The export request of a batch.
pub(super) fn request<'a>(
    resource: &Resource,
    records: impl Iterator<Item = &'a Arc<Record>>,
    observed_unix_nano: u64,
) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource.clone()),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "sekisho".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                log_records: records.map(|r| log_record(r, observed_unix_nano)).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

pub(super) fn resource(app_name: &str, hostname: &str) -> Resource {
    Resource {
        attributes: vec![
            attribute("service.name", app_name),
            attribute("host.name", hostname),
        ],
        ..Default::default()
    }
}

/// A checked OTLP sink.
pub(super) struct Target {
    url: String,
    client: reqwest::Client,
    resource: Resource,
}

impl Target {
    pub(super) fn new(config: &SinkConfig, origin: &Origin<'_>) -> Result<Target, FieldError> {
        let url = url::Url::parse(&config.url).map_err(|e| {
            FieldError::new(
                "url",
                format!("{e}: want http://host:port/v1/logs or https://…"),
            )
        })?;
        let tls = match url.scheme() {
            "https" => tls::client_config(
                config.ca.as_deref(),
                config.cert.as_deref(),
                config.key.as_deref(),
            )?,
            "http" => {
                tls::no_tls_files(
                    config.ca.as_deref(),
                    config.cert.as_deref(),
                    config.key.as_deref(),
                    "http:// is not TLS (use https://)",
                )?;
                tls::plain_config()?
            }
            other => {
                return Err(FieldError::new(
                    "url",
                    format!("unknown scheme {other:?} for otlp: want http:// or https://"),
                ));
            }
        };
        if url.host_str().is_none_or(str::is_empty) {
            return Err(FieldError::new("url", "has no host"));
        }
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // A redirect could carry the records elsewhere, or from https to http.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("sekisho/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FieldError::new("url", format!("HTTP client set-up: {e}")))?;
        Ok(Target {
            url: config.url.clone(),
            client,
            resource: resource(origin.app_name, origin.hostname),
        })
    }
}

/// What became of one export.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// 2xx; how many records the server rejected in a partial success, and why.
    Done { rejected: u64, message: String },
    /// 400: the server will never take this batch.
    Refused(String),
    /// 413: the batch is too large.
    TooLarge,
    /// Anything else: try again after the backoff or the server's Retry-After. `answered`:
    /// the server gave an HTTP answer.
    Retry {
        message: String,
        after: Option<Duration>,
        answered: bool,
    },
}

/// The delay a `Retry-After` header asks for (seconds; an HTTP date is not honoured), bounded.
pub(super) fn retry_after(value: Option<&str>) -> Option<Duration> {
    let secs: u64 = value?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(RETRY_AFTER_MAX))
}

async fn export(t: &Target, body: Vec<u8>) -> Outcome {
    let resp = match t
        .client
        .post(&t.url)
        .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
        .body(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Retry {
                message: format!("POST {}: {}", t.url, error_chain(&e)),
                after: None,
                answered: false,
            };
        }
    };
    let status = resp.status();
    let after = retry_after(
        resp.headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
    );
    let bytes = resp.bytes().await.unwrap_or_default();
    if status.is_success() {
        // An empty body or one that is not protobuf is a full success.
        let partial = ExportLogsServiceResponse::decode(bytes.as_ref())
            .ok()
            .and_then(|r| r.partial_success);
        return match partial {
            Some(p) => Outcome::Done {
                rejected: p.rejected_log_records.max(0) as u64,
                message: p.error_message,
            },
            None => Outcome::Done {
                rejected: 0,
                message: String::new(),
            },
        };
    }
    let text: String = String::from_utf8_lossy(&bytes).chars().take(200).collect();
    let message = format!("POST {}: HTTP {status} {}", t.url, text.trim());
    match status.as_u16() {
        400 => Outcome::Refused(message),
        413 => Outcome::TooLarge,
        429 | 503 => Outcome::Retry {
            message,
            after,
            answered: true,
        },
        _ => Outcome::Retry {
            message,
            after: None,
            answered: true,
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

pub(super) async fn run(
    t: Target,
    mut rx: mpsc::Receiver<Arc<Record>>,
    c: Arc<Counters>,
    wake: Arc<Notify>,
) {
    let mut pending: VecDeque<Arc<Record>> = VecDeque::new();
    let mut max_batch = MAX_BATCH;
    let mut backoff = Backoff::new();
    let mut failing = false;
    let mut closed_at: Option<Instant> = None;
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(r) => pending.push_back(r),
                None => return,
            }
            // Let the batch fill for a while, unless a flush asks for it now.
            let linger = tokio::time::sleep(LINGER);
            tokio::pin!(linger);
            while pending.len() < max_batch {
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(r) => pending.push_back(r),
                        None => {
                            closed_at.get_or_insert_with(Instant::now);
                            break;
                        }
                    },
                    _ = &mut linger => break,
                    _ = wake.notified() => break,
                }
            }
        }
        while pending.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => pending.push_back(r),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed_at.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        if past_grace(closed_at) {
            give_up(&mut pending, &mut rx, &c);
            return;
        }

        let n = pending.len().min(max_batch);
        let body = request(
            &t.resource,
            pending.iter().take(n),
            now_ms().saturating_mul(1_000_000),
        )
        .encode_to_vec();
        match export(&t, body).await {
            Outcome::Done { rejected, message } => {
                let rejected = (rejected as usize).min(n);
                c.delivered(n - rejected);
                c.undeliverable(rejected);
                if rejected > 0 {
                    c.error(format!(
                        "{}: the server rejected {rejected} record(s): {message}",
                        t.url
                    ));
                }
                pending.drain(..n);
                c.set_connected(true);
                if failing {
                    c.reconnected();
                    failing = false;
                }
                backoff.reset();
            }
            Outcome::Refused(message) => {
                c.undeliverable(n);
                pending.drain(..n);
                c.set_connected(true);
                c.error(message);
            }
            Outcome::TooLarge => {
                c.set_connected(true);
                if n > 1 {
                    max_batch = n / 2;
                    c.error(format!(
                        "{}: HTTP 413, batches now hold at most {max_batch} records",
                        t.url
                    ));
                } else {
                    c.undeliverable(1);
                    pending.pop_front();
                    c.error(format!("{}: HTTP 413 for a single record", t.url));
                }
            }
            Outcome::Retry {
                message,
                after,
                answered,
            } => {
                failing = true;
                c.set_connected(answered);
                c.error(message);
                let delay = backoff.next_delay();
                // Retry-After never shortens the backoff (a "0" would make a tight loop).
                tokio::time::sleep(after.map_or(delay, |a| a.max(delay))).await;
            }
        }
    }
}
