//! Shared Signals end to end: a transmitter the test runs (an MDM, say: `ssf-tool`, ES256
//! keys, its JWK set over HTTP) pushes CAEP Security Event Tokens to the broker
//! (`POST /v1/ssf/events`, RFC 8935); a device-compliance-change cuts that device's level 3
//! within a second; forged, foreign, misaddressed and stale SETs are refused and logged; and
//! Sekisho's own risk-level-change reaches a receiver the test runs, which verifies it against
//! Sekisho's published JWK set.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sekisho_tests::{Deployment, udp_probe_within, wait_until};
use serde_json::Value;

const APP: &str = "10.20.0.10";
const MDM: &str = "https://mdm.example";
const BROKER_URL: &str = "https://10.99.2.2:8443";

fn tool() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ssf-tool"))
}

/// One UDP echo to the level-3 application from a fixed port (one flow).
fn echo(d: &Deployment) -> bool {
    d.py("laptop", &udp_probe_within(40008, APP, 7, "ping", 1))
        .starts_with("reply:ping ")
}

/// Pushes one SET from the broker host (where the test's transmitter lives); returns
/// (HTTP status, body).
fn push(d: &Deployment, args: &[&str]) -> (u16, String) {
    let dir = d.state().join("mdm");
    let ca = d.state().join("pki/ca.pem");
    let mut all: Vec<String> = vec![
        tool().display().to_string(),
        "push".into(),
        "--dir".into(),
        dir.display().to_string(),
        "--url".into(),
        format!("{BROKER_URL}/v1/ssf/events"),
        "--ca".into(),
        ca.display().to_string(),
    ];
    let has = |k: &str| args.contains(&k);
    if !has("--iss") {
        all.extend(["--iss".into(), MDM.into()]);
    }
    if !has("--aud") {
        all.extend(["--aud".into(), BROKER_URL.into()]);
    }
    all.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = d.exec("broker", &refs);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "ssf-tool push: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = text.split_once(' ').unwrap_or((&text, ""));
    (status.parse().unwrap_or(0), body.to_string())
}

/// A device-compliance-change for alice's laptop with `status`, and extra arguments.
fn compliance(d: &Deployment, status: &str, extra: &[&str]) -> (u16, String) {
    let mut args = vec![
        "--event",
        "compliance",
        "--device",
        "alice-laptop",
        "--status",
        status,
    ];
    args.extend_from_slice(extra);
    push(d, &args)
}

fn audit(d: &Deployment) -> Vec<Value> {
    std::fs::read_to_string(d.state().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A background process in a namespace, stopped (and waited for) when dropped.
struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

fn background(d: &Deployment, host: &str, args: &[String], log: &str) -> Background {
    let log = std::fs::File::create(d.state().join(log)).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &d.ns(host)])
        .args(args)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start a helper in a namespace");
    Background(child)
}

#[test]
fn shared_signals_in_and_out() {
    let extra = format!(
        "[control.ssf]\nmax_age = \"5m\"\n\
         [[control.ssf.transmitters]]\nissuer = \"{MDM}\"\n\
         jwks_uri = \"http://127.0.0.1:8090/jwks.json\"\n\
         [[control.ssf.receivers]]\nurl = \"http://127.0.0.1:8091/events\"\n\
         audience = \"https://receiver.example\"\n"
    );
    let Some(d) = Deployment::for_test_with(&[("SK_BROKER_EXTRA", &extra)]) else {
        return;
    };
    // The transmitter's keys, published on the broker host's loopback; the receiver beside it.
    let mdm = d.state().join("mdm");
    let out = Command::new(tool())
        .args(["keygen", "--out"])
        .arg(&mdm)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let _jwks = background(
        &d,
        "broker",
        &[
            tool().display().to_string(),
            "serve-jwks".into(),
            "--dir".into(),
            mdm.display().to_string(),
            "--listen".into(),
            "127.0.0.1:8090".into(),
        ],
        "ssf-jwks.log",
    );
    let received = d.state().join("ssf-received.jsonl");
    let _receiver = background(
        &d,
        "broker",
        &[
            tool().display().to_string(),
            "receive".into(),
            "--listen".into(),
            "127.0.0.1:8091".into(),
            "--jwks-url".into(),
            format!("{BROKER_URL}/v1/ssf/jwks.json"),
            "--ca".into(),
            d.state().join("pki/ca.pem").display().to_string(),
            "--aud".into(),
            "https://receiver.example".into(),
            "--iss".into(),
            BROKER_URL.into(),
            "--out".into(),
            received.display().to_string(),
        ],
        "ssf-receiver.log",
    );
    // Level 3 tolerates only low risk.
    let text = std::fs::read_to_string(d.state().join("policy.toml")).unwrap();
    let path = d.state().join("policy-ssf.toml");
    std::fs::write(
        &path,
        format!("{text}\n[risk]\nlevel3 = {{ max = \"low\", above = \"deny\" }}\n"),
    )
    .unwrap();
    let (ok, _, err) = d.admin(&["policy", "apply", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        wait_until(Duration::from_secs(5), || d
            .sh("broker", "curl -sf http://127.0.0.1:8090/jwks.json")
            .0)
        .is_some(),
        "the transmitter's keys are served"
    );
    assert!(echo(&d), "level 3 works before any signal");

    // Refused, each with its RFC 8935 error, none changing anything.
    let bad: [(&[&str], &str); 5] = [
        (&["--tamper", "signature"], "authentication_failed"),
        (&["--tamper", "other-key"], "authentication_failed"),
        (&["--iss", "https://evil.example"], "invalid_issuer"),
        (
            &["--aud", "https://someone-else.example"],
            "invalid_audience",
        ),
        (&["--tamper", "iat-stale"], "invalid_request"),
    ];
    for (extra, code) in bad {
        let (status, body) = compliance(&d, "not-compliant", extra);
        assert_eq!(status, 400, "{extra:?}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert_eq!(v["err"], code, "{extra:?}: {body}");
    }
    let refusals = audit(&d)
        .into_iter()
        .filter(|r| r["event"] == "ssf_refused")
        .count();
    assert_eq!(refusals, 5, "every refusal is in the audit log");
    assert!(d.log("broker").contains("Shared Signals event refused"));
    assert!(echo(&d), "refused SETs change nothing");

    // A good device-compliance-change: level 3 is cut within a second.
    let (status, body) = compliance(&d, "not-compliant", &[]);
    assert_eq!(status, 202, "{body}");
    let cut = wait_until(Duration::from_secs(10), || !echo(&d)).expect("level 3 cut");
    eprintln!(
        "device-compliance-change: level 3 refused {:.2} s after the push",
        cut.as_secs_f64()
    );
    assert!(cut < Duration::from_secs(5), "{cut:?}");
    assert!(
        d.sh("laptop", &format!("ping -c 1 -W 2 {APP}")).0,
        "level 1 goes on"
    );
    let rec = d.last_decision("alice", 7).unwrap();
    assert_eq!(
        rec["reason"], "risk too high for this application's sensitivity",
        "{rec}"
    );
    assert!(
        audit(&d)
            .iter()
            .any(|r| r["event"] == "ssf_event" && r["detail"]["event"] == "not-compliant"),
        "the applied event is audited"
    );

    // Sekisho's risk-level-change reached the receiver and verified against its JWK set.
    let got = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&received).is_ok_and(|t| t.contains("risk-level-change"))
    });
    let lines = std::fs::read_to_string(&received).unwrap_or_default();
    assert!(got.is_some(), "the receiver got Sekisho's SET: {lines}");
    let set: Value = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| {
            v["claims"]["events"]
                .to_string()
                .contains("risk-level-change")
        })
        .unwrap();
    assert_eq!(set["verified"], true, "{set}");
    assert_eq!(set["header"]["alg"], "EdDSA", "{set}");
    assert_eq!(set["content_type"], "application/secevent+jwt", "{set}");
    let event = set["claims"]["events"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(event["current_level"], "HIGH", "{set}");
    assert_eq!(
        set["claims"]["sub_id"]["device"]["id"], "alice-laptop",
        "{set}"
    );

    // Compliant again (the same transmitter withdraws its signal): level 3 returns.
    let (status, body) = compliance(&d, "compliant", &[]);
    assert_eq!(status, 202, "{body}");
    assert!(
        wait_until(Duration::from_secs(10), || echo(&d)).is_some(),
        "level 3 returns when compliant"
    );
    let stats = d.stats();
    assert!(
        stats["ssf_receivers"][0]["sent"].as_u64().unwrap_or(0) >= 2,
        "{}",
        stats["ssf_receivers"]
    );
}
