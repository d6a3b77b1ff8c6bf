//! `[[log_sinks]]` as users write it, and the errors `Shipper::start` gives.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::rec;
use crate::logship::{Record, RecordKind, Shipper, SinkConfig, SinkKind};

#[derive(Deserialize)]
struct Daemon {
    log_sinks: Vec<SinkConfig>,
}

fn sinks(text: &str) -> Vec<SinkConfig> {
    toml::from_str::<Daemon>(text).unwrap().log_sinks
}

#[test]
fn log_sinks_parse_from_toml_with_defaults() {
    let s = sinks(
        r#"
        [[log_sinks]]
        kind = "syslog"
        url = "tls://siem.example.com:6514"
        ca = "/etc/sekisho/siem-ca.pem"
        facility = "auth"
        records = ["flows", "dns", "audit"]

        [[log_sinks]]
        kind = "otlp"
        url = "https://otel.example.com/v1/logs"
        name = "otel"
        queue = 500

        [[log_sinks]]
        kind = "file"
        url = "logs/sekisho.jsonl"
        max_bytes = 1048576
        max_age = "1d"
        keep = 3
        "#,
    );
    assert_eq!(s.len(), 3);
    assert_eq!(s[0].kind, SinkKind::Syslog);
    assert_eq!(
        s[0].records,
        vec![RecordKind::Flows, RecordKind::Dns, RecordKind::Audit]
    );
    assert_eq!(s[0].queue, 10_000);
    assert_eq!(s[0].display_name(), "syslog tls://siem.example.com:6514");
    assert_eq!(s[1].records, RecordKind::ALL.to_vec());
    assert_eq!(s[1].queue, 500);
    assert_eq!(s[1].display_name(), "otel");
    assert_eq!(s[2].max_age.as_deref(), Some("1d"));
    assert_eq!(s[2].keep, Some(3));

    for bad in [
        "[[log_sinks]]\nkind = \"syslog\"\nurl = \"tcp://a:1\"\nport = 5",
        "[[log_sinks]]\nkind = \"udp\"\nurl = \"x\"",
        "[[log_sinks]]\nkind = \"file\"\nurl = \"x\"\nrecords = [\"flow\"]",
    ] {
        assert!(toml::from_str::<Daemon>(bad).is_err(), "{bad}");
    }
}

/// The error `start` gives for one sink.
fn error(config: SinkConfig) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let ok = SinkConfig::new(SinkKind::File, "/dev/null");
    Shipper::start(&[ok, config], "a", "h", Path::new("/"))
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

fn with(kind: SinkKind, url: &str, f: impl FnOnce(&mut SinkConfig)) -> SinkConfig {
    let mut c = SinkConfig::new(kind, url);
    f(&mut c);
    c
}

#[test]
fn start_names_the_sink_and_field_of_a_bad_config() {
    let missing = "/nonexistent/ca.pem";
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let cases: Vec<(SinkConfig, &str)> = vec![
        (
            SinkConfig::new(SinkKind::Syslog, "udp://h:514"),
            "url: unknown scheme \"udp\"",
        ),
        (
            SinkConfig::new(SinkKind::Syslog, "tcp://h"),
            "url: has no port",
        ),
        (SinkConfig::new(SinkKind::Syslog, "not a url"), "url:"),
        (
            SinkConfig::new(SinkKind::Otlp, "tcp://h:1/v1/logs"),
            "url: unknown scheme",
        ),
        (
            with(SinkKind::Syslog, "tls://h:6514", |c| {
                c.ca = Some(missing.into())
            }),
            "ca: cannot read /nonexistent/ca.pem",
        ),
        (
            with(SinkKind::Otlp, "https://h/v1/logs", |c| {
                c.ca = Some(garbage.clone())
            }),
            "ca: no certificate in",
        ),
        (
            with(SinkKind::Syslog, "tcp://h:514", |c| {
                c.ca = Some(missing.into())
            }),
            "ca: not used: tcp:// is not TLS",
        ),
        (
            with(SinkKind::Syslog, "tls://h:6514", |c| {
                c.ca = Some(garbage.clone());
                c.cert = Some(garbage.clone());
            }),
            "ca: no certificate",
        ),
        (
            with(SinkKind::Syslog, "tcp://h:514", |c| {
                c.facility = Some("local9".into())
            }),
            "facility: unknown facility \"local9\"",
        ),
        (
            with(SinkKind::Syslog, "tcp://h:514", |c| c.queue = 0),
            "queue: must be 1 to",
        ),
        (
            with(SinkKind::Syslog, "tcp://h:514", |c| c.records.clear()),
            "records: is empty",
        ),
        (
            with(SinkKind::File, "/tmp/x.jsonl", |c| {
                c.facility = Some("auth".into())
            }),
            "facility: applies to syslog sinks only",
        ),
        (
            with(SinkKind::Otlp, "http://h/v1/logs", |c| c.keep = Some(2)),
            "keep: applies to file sinks only",
        ),
        (
            SinkConfig::new(SinkKind::File, "/nonexistent/dir/x.jsonl"),
            "url: directory /nonexistent/dir does not exist",
        ),
        (
            with(SinkKind::File, "/tmp/x.jsonl", |c| {
                c.max_age = Some("soon".into())
            }),
            "max_age: \"soon\"",
        ),
        (
            with(SinkKind::File, "/tmp/x.jsonl", |c| c.max_bytes = Some(0)),
            "max_bytes: must be more than 0",
        ),
    ];
    for (config, want) in cases {
        let name = config.display_name();
        let e = error(config);
        assert!(
            e.starts_with(&format!("log_sinks[1] ({name}): ")),
            "{e:?} should name the sink"
        );
        assert!(e.contains(want), "{e:?} should contain {want:?}");
    }
}

#[test]
fn a_client_certificate_needs_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let pem = dir.path().join("c.pem");
    std::fs::write(&pem, cert.pem()).unwrap();
    let e = error(with(SinkKind::Syslog, "tls://h:6514", |c| {
        c.ca = Some(pem.clone());
        c.cert = Some(pem.clone());
    }));
    assert!(e.contains("key: missing"), "{e}");
    let e = error(with(SinkKind::Syslog, "tls://h:6514", |c| {
        c.ca = Some(pem.clone());
        c.key = Some(pem.clone());
    }));
    assert!(e.contains("cert: missing"), "{e}");
}

#[test]
fn start_outside_a_runtime_is_an_error_not_a_panic() {
    let e = Shipper::start(
        &[SinkConfig::new(SinkKind::File, "/dev/null")],
        "a",
        "h",
        Path::new("/"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("tokio runtime"), "{e}");
    // No sinks need no runtime.
    assert!(
        Shipper::start(&[], "a", "h", Path::new("/"))
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_take_only_the_kinds_they_ask_for() {
    let dir = tempfile::tempdir().unwrap();
    let mut dns = SinkConfig::new(SinkKind::File, "dns.jsonl");
    dns.records = vec![RecordKind::Dns];
    let mut audit = SinkConfig::new(SinkKind::File, "audit.jsonl");
    audit.records = vec![RecordKind::Audit, RecordKind::Admin];
    let s = Shipper::start(&[dns, audit], "a", "h", dir.path()).unwrap();
    assert!(s.wants(RecordKind::Dns) && s.wants(RecordKind::Audit) && s.wants(RecordKind::Admin));
    assert!(!s.wants(RecordKind::Flows) && !s.wants(RecordKind::Events));
    for kind in RecordKind::ALL {
        s.send(rec(kind, 1));
    }
    s.send(Arc::new(Record::new(
        RecordKind::Dns,
        "dns",
        json!({"q": "example.com"}),
    )));
    s.flush(Duration::from_secs(5)).await;
    let st = s.stats();
    assert_eq!(st[0].delivered, 2);
    assert_eq!(st[1].delivered, 2);
    let text = std::fs::read_to_string(dir.path().join("dns.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.lines().all(|l| l.contains("\"kind\":\"dns\"")));

    let none = Shipper::none();
    assert!(RecordKind::ALL.iter().all(|&k| !none.wants(k)));
    none.send(rec(RecordKind::Flows, 1));
    assert!(none.stats().is_empty());
    none.flush(Duration::from_millis(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_serialize_for_the_metrics_endpoint() {
    let s = Shipper::start(
        &[SinkConfig::new(SinkKind::File, "/dev/null")],
        "a",
        "h",
        Path::new("/"),
    )
    .unwrap();
    s.send(rec(RecordKind::Flows, 1));
    s.flush(Duration::from_secs(5)).await;
    let v = serde_json::to_value(s.stats()).unwrap();
    assert_eq!(v[0]["name"], "file /dev/null");
    assert_eq!(v[0]["kind"], "file");
    assert_eq!(v[0]["delivered"], 1);
    assert_eq!(v[0]["dropped_queue_full"], 0);
}
