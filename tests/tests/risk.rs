//! The risk engine end to end: behaviour (a bulk download at an unusual hour) raises alice's
//! risk; access degrades by sensitivity (level 3 cut, level 2 allowed and recorded with `log`,
//! level 1 untouched); her status says why; the risk decays and access returns by itself.
//! Device classes: a personal device does not reach level 3.
//!
//! The risk engine's clock is shifted through its documented test-only setting
//! (`[risk_engine] test_clock_offset_file`), so "Monday 10:00" and "Sunday 03:00" come within
//! seconds; the rest of the broker keeps real time.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sekisho_tests::{Deployment, udp_probe_within, wait_until};
use serde_json::Value;

const APP: &str = "10.20.0.10";

/// Fast decay and small thresholds, so the test sees a whole rise and fall in about a minute.
const ENGINE: &str = "[risk_engine]\n\
half_life = \"20s\"\n\
volume = 100.0\n\
off_hours = 40.0\n\
volume_floor_mib = 5\n\
learned_hours = 3\n";

fn unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The demo policy with the intranet at sensitivity 2 (echo is 3, ping 1) and graded risk.
fn risk_policy(d: &Deployment) -> std::path::PathBuf {
    let text = std::fs::read_to_string(d.state().join("policy.toml")).unwrap();
    let text = text.replacen(
        "name = \"intranet-web\"",
        "name = \"intranet-web\"\nsensitivity = 2",
        1,
    );
    let text = format!(
        "{text}\n[risk]\nlevel3 = {{ max = \"low\", above = \"deny\" }}\n\
         level2 = {{ max = \"medium\", above = \"log\" }}\nmonitor_from = 2\n"
    );
    let path = d.state().join("policy-risk.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Fetches `path` from the app over HTTP from alice's laptop; prints "BYTES END_UNIX".
fn download(d: &Deployment, path: &str) -> (u64, f64) {
    let out = d.py(
        "laptop",
        &format!(
            "import urllib.request,time\n\
             b=urllib.request.urlopen('http://{APP}{path}',timeout=20).read()\n\
             print(len(b), time.time())"
        ),
    );
    let mut it = out.split_whitespace();
    let n = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let t = it.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
    (n, t)
}

fn ping(d: &Deployment) -> bool {
    d.sh("laptop", &format!("ping -c 1 -W 2 {APP}")).0
}

/// One UDP echo to the level-3 application, always from the same port: every probe is the
/// same flow, so a refusal after an answer is a running flow cut.
fn echo(d: &Deployment) -> bool {
    d.py("laptop", &udp_probe_within(40007, APP, 7, "ping", 1))
        .starts_with("reply:ping ")
}

/// The file the broker's risk engine reads its test-only clock offset from.
fn clock_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sekisho-e2e-{}-risk-clock", std::process::id()))
}

/// Sets the risk engine's clock to `target` (Unix seconds) and waits for it to be read.
fn set_engine_clock(target: u64) {
    let offset = target as i64 - unix() as i64;
    std::fs::write(clock_path(), offset.to_string()).unwrap();
    std::thread::sleep(Duration::from_millis(600));
}

/// `admin explain` for alice's laptop to the level-3 echo: (denied?, text).
fn explain_echo(d: &Deployment) -> (bool, String, String) {
    d.admin(&[
        "explain",
        "--device",
        "alice-laptop",
        "--to",
        &format!("{APP}:7"),
        "--protocol",
        "udp",
    ])
}

/// The latest risk record of a device in the decision log.
fn risk_records(d: &Deployment) -> Vec<Value> {
    d.decisions()
        .into_iter()
        .filter(|r| r["event"] == "risk")
        .collect()
}

#[test]
fn a_bulk_download_at_an_unusual_hour_degrades_access_by_sensitivity_then_decays() {
    std::fs::write(clock_path(), "0").unwrap();
    let Some(d) = Deployment::for_test_with(&[(
        "SK_BROKER_EXTRA",
        &format!(
            "{ENGINE}test_clock_offset_file = \"{}\"\n",
            clock_path().display()
        ),
    )]) else {
        return;
    };

    let (ok, _, err) = d.admin(&["policy", "apply", risk_policy(&d).to_str().unwrap()]);
    assert!(ok, "policy with [risk]: {err}");
    // Level 1 is not watched (monitor_from = 2): this leaves nothing in the engine.
    assert!(ping(&d), "level 1 (ping) works");

    // Alice's usual hours: Monday 10, 11 and 12 (UTC) of next week (the engine's clock only
    // moves forward), a small page each; an hour is learned when the next one begins.
    let now = unix();
    let how = ((now / 86_400 + 3) % 7) * 24 + (now % 86_400) / 3600; // hour of the week
    let monday_10 = now - how * 3600 - now % 3600 + 10 * 3600 + 7 * 86_400;
    for h in 0..3 {
        set_engine_clock(monday_10 + h * 3600 + 60);
        let (n, _) = download(&d, "/index.html");
        assert!(n > 0, "a small page at Monday {}:00", 10 + h);
        std::thread::sleep(Duration::from_millis(300));
    }
    // Her level-3 flow, open from Monday on.
    assert!(echo(&d), "level 3 (echo) works at low risk");
    // Sunday 03:00, never seen: 10 MB from the level-2 intranet (floor 5 MiB, no usual bytes).
    set_engine_clock(monday_10 + (6 * 24 + 17) * 3600 + 60);
    let (n, _) = download(&d, "/10mb.bin");
    assert_eq!(n, 10 << 20, "the bulk download completed");
    let done_at = Instant::now();

    // High risk: level 3 cut within a second (printed; fails only past a generous bound).
    let cut = wait_until(Duration::from_secs(10), || !echo(&d))
        .expect("level 3 (echo) is cut at high risk");
    let records = risk_records(&d);
    let high = records
        .iter()
        .find(|r| r["user"] == "alice" && r["level"] == "high")
        .unwrap_or_else(|| panic!("a risk record of alice at high: {records:?}"));
    let reasons = high["reasons"].to_string();
    assert!(
        reasons.contains("volume") && reasons.contains("off_hours"),
        "{high}"
    );
    eprintln!(
        "risk high after the download; level 3 refused within {:.2} s of its end",
        cut.as_secs_f64()
    );
    let _ = done_at;
    assert!(cut < Duration::from_secs(5), "cut took {cut:?}");

    // The denial names the risk.
    let denial = d.last_decision("alice", 7).expect("a decision for echo");
    assert_eq!(denial["decision"], "deny", "{denial}");
    assert_eq!(
        denial["reason"], "risk too high for this application's sensitivity",
        "{denial}"
    );
    assert_eq!(denial["risk"]["level"], "high", "{denial}");

    // Level 2 continues, its records say `log`; level 1 continues.
    let (n, _) = download(&d, "/index.html");
    assert!(n > 0, "level 2 (intranet) still serves at high risk");
    let logged = d
        .last_decision("alice", 80)
        .expect("a decision for the intranet");
    assert_eq!(logged["decision"], "allow", "{logged}");
    assert_eq!(logged["risk"]["response"], "log", "{logged}");
    wait_until(Duration::from_secs(15), || {
        d.decisions().iter().any(|r| {
            r["event"] == "traffic"
                && r["user"] == "alice"
                && r["dport"] == 80
                && r["risk"]["response"] == "log"
        })
    })
    .expect("the intranet flow's traffic record says `log`");
    assert!(ping(&d), "level 1 (ping) continues at high risk");

    // Alice sees why (her client asks the broker every 2 s).
    let mut status = Value::Null;
    wait_until(Duration::from_secs(6), || {
        status = d.client_status("alice");
        status["broker_status"]["risk"]["level"] == "high"
    });
    let risk = &status["broker_status"]["risk"];
    assert_eq!(risk["level"], "high", "{status}");
    let why = risk["reasons"].to_string();
    assert!(
        why.contains("MB this hour") && why.contains("unusual hour"),
        "{risk}"
    );
    assert!(!risk["collected"].as_array().unwrap().is_empty(), "{risk}");
    let (_, text, _) = d.sh(
        "laptop",
        &format!(
            "{} status --socket {}",
            d.bin("sekisho-client").display(),
            d.state().join("alice/client.sock").display()
        ),
    );
    assert!(
        text.contains("Risk: high") && text.contains("because:"),
        "{text}"
    );

    // The admin sees the same through explain.
    let (_, explained, _) = explain_echo(&d);
    assert!(
        explained.contains("risk: high") && explained.contains("volume"),
        "{explained}"
    );
    let stats = d.stats();
    assert_eq!(stats["risk"]["devices_high"], 1, "{}", stats["risk"]);
    assert_eq!(stats["risk"]["inputs_dropped"], 0, "{}", stats["risk"]);

    // Nobody acts: the signals decay (half-life 20 s) and level 3 comes back.
    let back = wait_until(Duration::from_secs(150), || echo(&d))
        .expect("level 3 returns as the risk decays");
    eprintln!(
        "level 3 back {:.1} s later, without anyone acting",
        back.as_secs_f64()
    );
    let records = risk_records(&d);
    assert!(
        records
            .iter()
            .any(|r| r["user"] == "alice" && r["level"] == "low" && r["previous"] != Value::Null),
        "a record of the fall back to low: {records:?}"
    );
    let _ = std::fs::remove_file(clock_path());
}

#[test]
fn a_personal_device_does_not_reach_level_3() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    assert!(echo(&d), "level 3 (echo) from a managed device");
    let (ok, out, err) = d.admin(&["device", "class", "alice-laptop", "personal"]);
    assert!(ok, "{out} {err}");
    let (_, list, _) = d.admin(&["device", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("alice-laptop") && l.contains("personal")),
        "{list}"
    );
    let refused = wait_until(Duration::from_secs(5), || !echo(&d));
    assert!(refused.is_some(), "a personal device loses level 3");
    let rec = d.last_decision("alice", 7).expect("a decision");
    assert_eq!(rec["decision"], "deny", "{rec}");
    assert_eq!(
        rec["reason"], "personal device: this sensitivity level needs a managed one",
        "{rec}"
    );
    assert!(ping(&d), "level 1 from a personal device");
    let (ok, out, _) = explain_echo(&d);
    assert!(
        !ok && out.contains("personal device") && out.contains("device class: personal"),
        "{out}"
    );
    // Audited like every change.
    let audit = std::fs::read_to_string(d.state().join("audit.jsonl")).unwrap_or_default();
    assert!(audit.contains("device_class_set"), "{audit}");
    // Managed again: level 3 returns.
    let (ok, _, _) = d.admin(&["device", "class", "alice-laptop", "managed"]);
    assert!(ok);
    assert!(wait_until(Duration::from_secs(5), || echo(&d)).is_some());
}
