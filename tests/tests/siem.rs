//! Records reach the SIEM as they happen, end to end: a real rsyslog (RFC 5425, TLS) and an
//! OTLP/HTTP receiver that decodes with the OpenTelemetry protobuf definitions, both on host
//! siem (quickstart SK_SIEM=1); the broker, alice's laptop and the connector ship to them.

use std::time::{Duration, Instant};

use sekisho_tests::{Deployment, wait_until, workspace};
use serde_json::Value;

const APP: &str = "10.20.0.10";

/// Every RFC 5424 message rsyslog received over TLS, parsed (and checked) by
/// tests/tools/syslog_check.py; panics on a message that is not valid RFC 5424.
fn syslog(d: &Deployment) -> Vec<Value> {
    let file = d.state().join("siem/syslog-tls.log");
    if !file.exists() {
        return Vec::new();
    }
    let out = std::process::Command::new("python3")
        .arg(workspace().join("tests/tools/syslog_check.py"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "not RFC 5424: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The records' bodies (the OCSF JSON) with the message's MSGID and app name.
fn bodies(messages: &[Value]) -> Vec<(String, String, Value)> {
    messages
        .iter()
        .filter_map(|m| {
            let body: Value = serde_json::from_str(m["msg"].as_str()?).ok()?;
            Some((
                m["app"].as_str()?.to_string(),
                m["msgid"].as_str()?.to_string(),
                body,
            ))
        })
        .collect()
}

fn otlp(d: &Deployment) -> Vec<Value> {
    std::fs::read_to_string(d.state().join("siem/otlp.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn sink<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["log_sinks"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Waits until a syslog record satisfying `want` arrives; returns how long it took.
fn arrives(d: &Deployment, what: &str, want: impl Fn(&str, &str, &Value) -> bool) -> Duration {
    let t = Instant::now();
    let got = wait_until(Duration::from_secs(10), || {
        bodies(&syslog(d))
            .iter()
            .any(|(app, id, b)| want(app, id, b))
    });
    let took = t.elapsed();
    assert!(got.is_some(), "no {what} record reached rsyslog");
    println!("{what}: at rsyslog after {:.2} s", took.as_secs_f64());
    took
}

/// A 20 MiB file on the app host.
fn big_file(d: &Deployment) -> u64 {
    let path = d.state().join("www/20mb.bin");
    let data: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &data).unwrap();
    data.len() as u64
}

#[test]
fn records_reach_the_siem_as_they_happen() {
    let Some(d) = Deployment::for_test_with(&[("SK_SIEM", "1"), ("SK_SIEM_QUEUE", "100")]) else {
        return;
    };
    // A flow, allowed and denied; an application name; an admin change; a refused enrollment.
    let t0 = Instant::now();
    let (ok, _, err) = d.sh(
        "laptop",
        &format!("curl -s -m 5 -o /dev/null http://{APP}/"),
    );
    assert!(ok, "{err}");
    let decided = arrives(&d, "allowed flow decision", |app, id, b| {
        app == "sekisho-broker"
            && id == "flow_decision"
            && b["class_uid"] == 4001
            && b["disposition"] == "Allowed"
            && b["dst_endpoint"]["port"] == 80
    });
    // The curl's TCP flow ended: its traffic record, with bytes both ways and a duration.
    arrives(&d, "flow traffic (broker)", |app, id, b| {
        app == "sekisho-broker"
            && id == "traffic"
            && b["dst_endpoint"]["port"] == 80
            && b["traffic"]["bytes_in"].as_u64() > Some(0)
            && b["traffic"]["bytes_out"].as_u64() > Some(0)
            && b["duration"].is_u64()
    });
    arrives(&d, "flow traffic (laptop)", |app, _, b| {
        app == "sekisho-client" && b["class_uid"] == 4001 && b["dst_endpoint"]["port"] == 80
    });
    let _ = d.sh("laptop", &format!("curl -s -m 3 http://{APP}:5432/"));
    arrives(&d, "denied flow decision", |_, id, b| {
        id == "flow_decision"
            && b["disposition"] == "Blocked"
            && b["unmapped"]["rule"] == "no-database-from-laptops"
    });
    let _ = d.sh("laptop", "dig +short +time=2 +tries=1 wiki.corp.example");
    arrives(&d, "application name", |_, id, b| {
        id == "dns" && b["class_uid"] == 4003 && b["query"]["hostname"] == "wiki.corp.example"
    });
    let (ok, _, err) = d.admin(&["group", "add", "siem-test"]);
    assert!(ok, "{err}");
    let admin_took = arrives(&d, "admin change", |_, id, b| {
        id == "group_created" && b["class_uid"] == 3001
    });
    let _ = d.sh(
        "laptop",
        &format!(
            "{} enroll --server https://10.99.2.2:8443 --token $(cat {}) --dir /tmp/nope-$$",
            d.bin("sekisho-client").display(),
            // alice's token: used already, so refused (and audited) by the control plane.
            d.state().join("tokens/alice.token").display()
        ),
    );
    arrives(&d, "refused enrollment (audit)", |_, id, b| {
        id == "enroll_device" && b["status"] == "Failure"
    });
    arrives(&d, "posture", |_, id, b| {
        id == "posture" && b["class_uid"] == 5019
    });
    // The connector refuses what its allowlist does not hold, whatever the broker allowed:
    // a policy that sends 10.30.0.1 to site dc1, whose connector allows 10.20.0.0/24 only.
    let policy = std::fs::read_to_string(d.state().join("policy.toml")).unwrap()
        + "\n[[applications]]\nname = \"elsewhere\"\nsite = \"dc1\"\naddresses = [\"10.30.0.1\"]\nprotocols = [\"tcp\"]\nports = [80]\n\
           [[rules]]\nname = \"eng-elsewhere\"\naction = \"allow\"\ngroups = [\"engineering\"]\n\
           applications = [\"elsewhere\"]\n";
    let path = d.state().join("policy-elsewhere.toml");
    std::fs::write(&path, policy).unwrap();
    let (ok, _, err) = d.admin(&["policy", "apply", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    // The laptop learns the new route with its next configuration (every few seconds).
    wait_until(Duration::from_secs(15), || {
        let _ = d.sh("laptop", "curl -s -m 1 -o /dev/null http://10.30.0.1/");
        bodies(&syslog(&d))
            .iter()
            .any(|(app, id, _)| app == "sekisho-connector" && id == "refused")
    });
    arrives(&d, "connector refusal", |app, id, b| {
        app == "sekisho-connector"
            && id == "refused"
            && b["disposition"] == "Blocked"
            && b["unmapped"]["refused"]
                .as_str()
                .is_some_and(|r| r.contains("10.30.0.1"))
    });
    println!(
        "first records within {:.1} s of the test start",
        t0.elapsed().as_secs_f64()
    );
    assert!(decided < Duration::from_secs(2) + Duration::from_secs(5));
    assert!(admin_took < Duration::from_secs(2) + Duration::from_secs(5));

    // OTLP: the same records, decoded with the OpenTelemetry protobuf definitions.
    let got = wait_until(Duration::from_secs(10), || {
        let recs = otlp(&d);
        [
            "flow_decision",
            "traffic",
            "dns",
            "group_created",
            "enroll_device",
        ]
        .iter()
        .all(|id| recs.iter().any(|r| r["attributes"]["event.name"] == *id))
    });
    let recs = otlp(&d);
    assert!(
        got.is_some(),
        "OTLP records: {:?}",
        recs.iter().map(|r| &r["attributes"]).collect::<Vec<_>>()
    );
    let one = recs
        .iter()
        .find(|r| r["attributes"]["event.name"] == "traffic")
        .unwrap();
    let body: Value = serde_json::from_str(one["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["class_uid"], 4001);
    assert_eq!(one["service"], "sekisho-broker");
    assert!(one["severity_number"].as_u64().unwrap() >= 9);

    // A sink that trusts the wrong CA never connects: refused, and said so.
    let stats = d.stats();
    let wrong = sink(&stats, "wrong-ca");
    assert_eq!(wrong["connected"], false, "{wrong}");
    assert_eq!(wrong["delivered"], 0, "{wrong}");
    assert!(
        wrong["last_error"]
            .as_str()
            .unwrap_or("")
            .to_lowercase()
            .contains("certificate"),
        "{wrong}"
    );

    // A 20 MiB download is one flow record on each side, with the bytes (within headers).
    let size = big_file(&d);
    let (ok, _, err) = d.sh(
        "laptop",
        &format!("curl -s -m 60 -o /dev/null http://{APP}/20mb.bin"),
    );
    assert!(ok, "download: {err}");
    let big = |app: &'static str| {
        let mut found = None;
        wait_until(Duration::from_secs(20), || {
            found = bodies(&syslog(&d)).into_iter().find(|(a, _, b)| {
                a == app
                    && b["class_uid"] == 4001
                    && b["traffic"]["bytes_in"].as_u64().unwrap_or(0) > size
            });
            found.is_some()
        });
        found
            .unwrap_or_else(|| panic!("no 20 MiB flow record from {app}"))
            .2
    };
    let (at_broker, at_laptop) = (big("sekisho-broker"), big("sekisho-client"));
    let bytes = |b: &Value| b["traffic"]["bytes_in"].as_u64().unwrap();
    println!(
        "20 MiB download: broker counted {} bytes in, {} out; laptop {} in, {} out",
        bytes(&at_broker),
        at_broker["traffic"]["bytes_out"],
        bytes(&at_laptop),
        at_laptop["traffic"]["bytes_out"]
    );
    for b in [&at_broker, &at_laptop] {
        // Payload plus IP and TCP headers (about 52 bytes a segment of at most 1,308).
        assert!(bytes(b) >= size && bytes(b) < size + size / 20, "{b}");
        assert!(b["duration"].as_u64().unwrap() > 0);
    }
    let diff = bytes(&at_broker).abs_diff(bytes(&at_laptop));
    assert!(diff < size / 100, "the two sides differ by {diff} bytes");

    // The SIEM goes away for ten seconds while alice downloads and records keep coming: what
    // fits the queue arrives afterwards, the rest is counted, the download is not slowed.
    let before = {
        let t = Instant::now();
        let (ok, _, _) = d.sh(
            "laptop",
            &format!("curl -s -m 60 -o /dev/null http://{APP}/20mb.bin"),
        );
        assert!(ok);
        t.elapsed()
    };
    let tls_before = sink(&d.stats(), "siem-tls").clone();
    d.daemon("stop", "rsyslog");
    let outage = Instant::now();
    let download = std::thread::scope(|s| {
        let dl = s.spawn(|| {
            let t = Instant::now();
            let (ok, _, _) = d.sh(
                "laptop",
                &format!("curl -s -m 60 -o /dev/null http://{APP}/20mb.bin"),
            );
            (ok, t.elapsed())
        });
        // Records during the outage: application names and flows (more than the queue holds).
        while outage.elapsed() < Duration::from_secs(10) {
            let _ = d.sh(
                "laptop",
                "for i in $(seq 40); do curl -s -m 1 -o /dev/null http://10.20.0.10:5432/; done",
            );
        }
        dl.join().unwrap()
    });
    d.daemon("start", "rsyslog");
    assert!(download.0, "the download during the outage failed");
    println!(
        "download: {:.2} s before the outage, {:.2} s during it",
        before.as_secs_f64(),
        download.1.as_secs_f64()
    );
    assert!(
        download.1 < before * 3 + Duration::from_secs(2),
        "the download slowed down while the SIEM was away"
    );
    let settled = wait_until(Duration::from_secs(30), || {
        let s = sink(&d.stats(), "siem-tls").clone();
        s["connected"] == true && s["queued"] == 0
    });
    assert!(
        settled.is_some(),
        "the sink did not catch up: {}",
        sink(&d.stats(), "siem-tls")
    );
    std::thread::sleep(Duration::from_secs(1));
    let after = sink(&d.stats(), "siem-tls").clone();
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let full = n(&after, "dropped_queue_full") - n(&tls_before, "dropped_queue_full");
    let lost = n(&after, "dropped_undeliverable") - n(&tls_before, "dropped_undeliverable");
    let delivered = n(&after, "delivered");
    let received = syslog(&d)
        .iter()
        .filter(|m| m["app"] == "sekisho-broker")
        .count() as u64;
    // Records go on (posture refreshes, flows): what arrived lies between what the sink had
    // delivered before and after the file was read.
    let delivered_later = n(sink(&d.stats(), "siem-tls"), "delivered");
    println!(
        "outage: {full} records over the queue (counted), {lost} undeliverable, {delivered} \
         delivered in all, {received} at rsyslog; reconnects {}",
        after["reconnects"]
    );
    assert!(
        full > 0,
        "the outage should have overflowed the 100-record queue: {after}"
    );
    assert!(n(&after, "reconnects") >= 1, "{after}");
    // What the sink says it delivered is what rsyslog has (a record written into the dying
    // connection is counted as undeliverable, not delivered).
    assert!(
        delivered <= received && received <= delivered_later,
        "rsyslog has {received}, the sink delivered {delivered} before and {delivered_later} after"
    );
    // The same counters in Prometheus.
    let (_, metrics, _) = d.sh("broker", "curl -s http://127.0.0.1:9464/metrics");
    assert!(
        metrics.contains(
            "sekisho_broker_log_records_total{sink=\"siem-tls\",outcome=\"dropped_queue_full\"}"
        ),
        "{metrics}"
    );
}
