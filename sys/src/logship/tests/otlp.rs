//! The OTLP sink against a loopback axum server that decodes the protobuf with the same types.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use serde_json::json;

use super::{rec, wait_for};
use crate::logship::otlp::retry_after;
use crate::logship::{Record, RecordKind, Severity, Shipper, SinkConfig, SinkKind};

/// One scripted answer: status, Retry-After, rejected records in a partial success.
type Answer = (u16, Option<&'static str>, i64);

#[derive(Default)]
struct Server {
    /// Answers to give, in order; then 200.
    script: Mutex<VecDeque<Answer>>,
    /// Every request: when, its content type, and what it decoded to.
    requests: Mutex<Vec<(Instant, String, ExportLogsServiceRequest)>>,
}

async fn export(State(s): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let Ok(req) = ExportLogsServiceRequest::decode(body.as_ref()) else {
        return (StatusCode::BAD_REQUEST, "not an ExportLogsServiceRequest").into_response();
    };
    s.requests
        .lock()
        .unwrap()
        .push((Instant::now(), content_type, req));
    let (status, retry, rejected) = s
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((200, None, 0));
    let mut resp = if rejected > 0 {
        let r = ExportLogsServiceResponse {
            partial_success: Some(ExportLogsPartialSuccess {
                rejected_log_records: rejected,
                error_message: "too old".into(),
            }),
        };
        r.encode_to_vec().into_response()
    } else {
        "".into_response()
    };
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/x-protobuf".parse().unwrap(),
    );
    if let Some(r) = retry {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, r.parse().unwrap());
    }
    resp
}

/// A collector on 127.0.0.1; returns its URL.
async fn collector(script: Vec<Answer>) -> (String, Arc<Server>) {
    let server = Arc::new(Server::default());
    server.script.lock().unwrap().extend(script);
    let app = Router::new()
        .route("/v1/logs", post(export))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1/logs"), server)
}

fn shipper(url: &str) -> Shipper {
    Shipper::start(
        &[SinkConfig::new(SinkKind::Otlp, url)],
        "sekisho-broker",
        "gw-1",
        Path::new("/"),
    )
    .unwrap()
}

fn string(v: &Option<AnyValue>) -> &str {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s,
        other => panic!("not a string: {other:?}"),
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> &'a str {
    let kv = attrs
        .iter()
        .find(|kv| kv.key == key)
        .unwrap_or_else(|| panic!("no attribute {key}"));
    string(&kv.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exports_one_protobuf_batch_with_every_field() {
    let (url, server) = collector(vec![]).await;
    let s = shipper(&url);
    let records = [
        Record {
            kind: RecordKind::Flows,
            time_ms: 1_714_564_800_123,
            severity: Severity::Info,
            msgid: "flow".into(),
            body: json!({"class_uid": 4001, "src": "10.0.0.1"}),
        },
        Record {
            kind: RecordKind::Audit,
            time_ms: 1_714_564_800_456,
            severity: Severity::Notice,
            msgid: "sign_in".into(),
            body: json!({"user": "ana"}),
        },
        Record {
            kind: RecordKind::Risk,
            time_ms: 1_714_564_800_789,
            severity: Severity::Emergency,
            msgid: "risk".into(),
            body: json!({"score": 99}),
        },
    ];
    let before_ns = super::super::now_ms() * 1_000_000;
    for r in &records {
        s.send(Arc::new(r.clone()));
    }
    let st = wait_for(&s, Duration::from_secs(10), |s| s.delivered == 3).await;
    assert!(st.connected && st.last_error.is_none(), "{st:#?}");
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), 1, "one batch");
    let (_, content_type, req) = &requests[0];
    assert_eq!(content_type, "application/x-protobuf");
    assert_eq!(req.resource_logs.len(), 1);
    let rl = &req.resource_logs[0];
    let resource = rl.resource.as_ref().unwrap();
    assert_eq!(attr(&resource.attributes, "service.name"), "sekisho-broker");
    assert_eq!(attr(&resource.attributes, "host.name"), "gw-1");
    assert_eq!(rl.scope_logs.len(), 1);
    assert_eq!(rl.scope_logs[0].scope.as_ref().unwrap().name, "sekisho");
    let logs = &rl.scope_logs[0].log_records;
    assert_eq!(logs.len(), 3);
    for (lr, r) in logs.iter().zip(&records) {
        assert_eq!(lr.time_unix_nano, r.time_ms * 1_000_000);
        assert!(lr.observed_time_unix_nano >= before_ns);
        assert_eq!(lr.severity_text, r.severity.as_str());
        let body: serde_json::Value = serde_json::from_str(string(&lr.body)).unwrap();
        assert_eq!(body, r.body);
        assert_eq!(attr(&lr.attributes, "sekisho.kind"), r.kind.as_str());
        assert_eq!(attr(&lr.attributes, "event.name"), r.msgid);
        assert_eq!(lr.event_name, r.msgid);
    }
    assert_eq!(
        logs.iter().map(|l| l.severity_number).collect::<Vec<_>>(),
        vec![9, 10, 21],
        "INFO, INFO2, FATAL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_batches_hold_at_most_512_records() {
    let (url, server) = collector(vec![]).await;
    let s = shipper(&url);
    for i in 0..1200 {
        s.send(rec(RecordKind::Dns, i));
    }
    s.flush(Duration::from_secs(10)).await;
    let st = super::stats(&s);
    assert_eq!((st.delivered, st.queued), (1200, 0), "{st:#?}");
    let requests = server.requests.lock().unwrap();
    let sizes: Vec<usize> = requests
        .iter()
        .map(|(_, _, r)| r.resource_logs[0].scope_logs[0].log_records.len())
        .collect();
    assert!(sizes.iter().all(|&n| n <= 512), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 1200);
    let seqs: Vec<u64> = requests
        .iter()
        .flat_map(|(_, _, r)| r.resource_logs[0].scope_logs[0].log_records.clone())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(string(&l.body)).unwrap();
            v["seq"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(seqs, (0..1200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_retries_after_503_honouring_retry_after() {
    let (url, server) = collector(vec![(503, Some("1"), 0)]).await;
    let s = shipper(&url);
    s.send(rec(RecordKind::Posture, 7));
    let st = wait_for(&s, Duration::from_secs(10), |s| s.delivered == 1).await;
    assert_eq!(st.dropped_undeliverable, 0);
    assert_eq!(st.reconnects, 1, "one recovery");
    assert!(st.last_error.as_deref().unwrap().contains("503"), "{st:#?}");
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].0 - requests[0].0;
    assert!(
        gap >= Duration::from_millis(900),
        "Retry-After: 1 honoured, waited {gap:?}"
    );
    // The same record both times (only the observed time is stamped anew).
    let logs = |i: usize| {
        let mut l = requests[i].2.resource_logs[0].scope_logs[0]
            .log_records
            .clone();
        l.iter_mut().for_each(|l| l.observed_time_unix_nano = 0);
        l
    };
    assert_eq!(logs(0), logs(1));
    assert_eq!(logs(0).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_drops_a_batch_the_server_calls_bad_and_counts_partial_rejections() {
    let (url, server) = collector(vec![(400, None, 0), (200, None, 1)]).await;
    let s = shipper(&url);
    s.send(rec(RecordKind::Admin, 1));
    s.send(rec(RecordKind::Admin, 2));
    let st = wait_for(&s, Duration::from_secs(10), |s| {
        s.dropped_undeliverable == 2
    })
    .await;
    assert_eq!(st.delivered, 0);
    assert!(st.last_error.as_deref().unwrap().contains("400"), "{st:#?}");
    // The next batch of two: the server takes one and rejects one.
    s.send(rec(RecordKind::Admin, 3));
    s.send(rec(RecordKind::Admin, 4));
    let st = wait_for(&s, Duration::from_secs(10), |s| {
        s.queued == 0 && s.accepted == 4
    })
    .await;
    assert_eq!((st.delivered, st.dropped_undeliverable), (1, 3), "{st:#?}");
    assert!(
        st.last_error.as_deref().unwrap().contains("too old"),
        "{st:#?}"
    );
    assert_eq!(server.requests.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_keeps_records_while_the_collector_is_unreachable() {
    let port = super::free_port().await;
    let s = shipper(&format!("http://127.0.0.1:{port}/v1/logs"));
    for i in 0..5 {
        s.send(rec(RecordKind::Flows, i));
    }
    let st = wait_for(&s, Duration::from_secs(10), |s| s.last_error.is_some()).await;
    assert!(!st.connected);
    assert_eq!(
        (st.queued, st.delivered, st.dropped_undeliverable),
        (5, 0, 0)
    );
}

#[test]
fn retry_after_is_seconds_bounded_to_30() {
    assert_eq!(retry_after(Some("2")), Some(Duration::from_secs(2)));
    assert_eq!(retry_after(Some(" 0 ")), Some(Duration::ZERO));
    assert_eq!(retry_after(Some("3600")), Some(Duration::from_secs(30)));
    assert_eq!(retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
    assert_eq!(retry_after(Some("-1")), None);
    assert_eq!(retry_after(None), None);
}
