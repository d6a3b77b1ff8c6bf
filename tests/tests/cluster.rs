//! Broker clusters on PostgreSQL and connector high availability, end to end: two brokers
//! sharing a PostgreSQL started by the test, two connectors for site dc1 on the same private
//! network. Flows spread over both connectors; a broker dies and clients carry on through the
//! other with both connectors; a connector dies and new flows go to the other (the time is
//! printed); a connector drains (existing download finishes, new flows avoid it, it exits).
//! Changes made at one broker take effect at the other (delays printed), a revocation at one
//! cuts the device at the other, the posture signing key rotates under connected clients, and
//! the Prometheus endpoints serve valid OpenMetrics text whose counters follow the traffic.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use sekisho_tests::pg::Postgres;
use sekisho_tests::{Deployment, count_from, udp_probe, wait_until};

/// The stats of broker `name` ("broker" or "broker2") from its control socket.
fn stats(d: &Deployment, name: &str) -> Value {
    let out = Command::new(d.bin("sekisho-broker"))
        .args(["stats", "--socket"])
        .arg(d.state().join(format!("{name}.sock")))
        .output()
        .expect("sekisho-broker stats");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Connector links of site dc1 a broker has, with their states.
fn dc1_links(d: &Deployment, broker: &str) -> Vec<(String, String)> {
    stats(d, broker)["connectors"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|l| l["site"] == "dc1")
                .map(|l| {
                    (
                        l["connector"].as_str().unwrap_or("").to_string(),
                        l["state"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A client's status (`sekisho-client status --json`).
fn client_status(d: &Deployment, who: &str) -> Value {
    d.client_status(who)
}

/// `n` new flows at once from alice's laptop (curl); how many succeeded.
fn curls(d: &Deployment, n: usize, timeout_s: u32) -> usize {
    let script = format!(
        "for i in $(seq {n}); do (curl -s -m {timeout_s} -o /dev/null -w '%{{http_code}}\\n' \
         http://10.20.0.10/ || true) & done; wait"
    );
    let (_, out, _) = d.sh("laptop", &script);
    out.lines().filter(|l| l.trim() == "200").count()
}

/// The metrics text at `url`, fetched inside `host`, checked with the OpenMetrics parser of
/// the Prometheus Python client (it rejects anything that is not valid exposition text).
fn scrape(d: &Deployment, host: &str, url: &str) -> String {
    let (ok, text, err) = d.sh(host, &format!("curl -sS -m 5 {url}"));
    assert!(ok, "scrape {url}: {err}");
    let check = Command::new("python3")
        .args([
            "-c",
            "import sys\n\
             from prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
             n = sum(len(f.samples) for f in p(sys.stdin.read()))\n\
             print(n)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(text.as_bytes())?;
            c.wait_with_output()
        })
        .expect("python3 with prometheus_client (.ci/run installs it)");
    assert!(
        check.status.success(),
        "{url} is not valid OpenMetrics text: {}\n{text}",
        String::from_utf8_lossy(&check.stderr)
    );
    text
}

/// Sum of the samples of `name` whose label text contains every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Downloads /big.bin from the app in alice's namespace, slowly (several seconds); prints
/// the bytes it got.
fn start_download(d: &Deployment) -> Child {
    let code = r#"
import socket, time
s = socket.create_connection(("10.20.0.10", 80), timeout=30)
s.sendall(b"GET /big.bin HTTP/1.0\r\nHost: x\r\n\r\n")
n = 0
while True:
    d = s.recv(65536)
    if not d: break
    n += len(d)
    time.sleep(0.05)
print(n)
"#;
    Command::new("ip")
        .args(["netns", "exec", &d.ns("laptop"), "python3", "-c", code])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3")
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(") ").next().unwrap_or("");
            !state.starts_with(['Z', 'X', 'x'])
        })
        .unwrap_or(false)
}

const BIG: u64 = 8 * 1024 * 1024;

#[test]
fn broker_and_connector_failures_drain_and_metrics() {
    if sekisho_tests::skip_netns() {
        return;
    }
    let pg = Postgres::start().expect("a local PostgreSQL for the brokers");
    let url = pg.url();
    let Some(d) = Deployment::for_test_with(&[
        ("SK_BROKERS", "2"),
        ("SK_CONNECTORS", "2"),
        ("SK_DATABASE", &url),
    ]) else {
        return;
    };
    // Every connector links to every broker (the second broker is learned from the first).
    let both = wait_until(Duration::from_secs(30), || {
        dc1_links(&d, "broker").len() == 2 && dc1_links(&d, "broker2").len() == 2
    });
    assert!(
        both.is_some(),
        "links: {:?} / {:?}",
        dc1_links(&d, "broker"),
        dc1_links(&d, "broker2")
    );
    let b1 = "http://127.0.0.1:9464/metrics";
    let b2 = "http://127.0.0.1:9464/metrics";
    let c1 = "http://127.0.0.1:9465/metrics";
    let before = [
        scrape(&d, "broker", b1),
        scrape(&d, "broker2", b2),
        scrape(&d, "site", c1),
        scrape(&d, "site2", c1),
    ];

    // New flows spread over both connectors (each masquerades to its own address).
    let mark = d.app_requests(0).len();
    assert_eq!(curls(&d, 8, 5), 8);
    let seen = d.app_requests(mark);
    let (one, two) = (
        count_from(&seen, "10.20.0.1"),
        count_from(&seen, "10.20.0.2"),
    );
    println!("8 new flows: {one} through connector 1, {two} through connector 2");
    assert!(one >= 2 && two >= 2, "flows were not spread: {seen:?}");

    // The metrics follow the traffic.
    std::fs::write(d.state().join("www/big.bin"), vec![7u8; BIG as usize]).unwrap();
    let dl = start_download(&d);
    let got: u64 = String::from_utf8_lossy(&dl.wait_with_output().unwrap().stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(got > BIG, "download got {got} bytes");
    let after = [
        scrape(&d, "broker", b1),
        scrape(&d, "broker2", b2),
        scrape(&d, "site", c1),
        scrape(&d, "site2", c1),
    ];
    let sum = |texts: &[String], name: &str, labels: &[&str]| -> f64 {
        texts.iter().map(|t| metric(t, name, labels)).sum()
    };
    let brokers = |t: &[String; 4]| t[..2].to_vec();
    let conns = |t: &[String; 4]| t[2..].to_vec();
    for (name, labels) in [
        (
            "sekisho_broker_bytes_total",
            &["direction=\"from_connectors\""][..],
        ),
        ("sekisho_broker_decisions_total", &["result=\"allow\""][..]),
        ("sekisho_broker_packets_total", &["from_clients"][..]),
    ] {
        let (x, y) = (
            sum(&brokers(&before), name, labels),
            sum(&brokers(&after), name, labels),
        );
        println!("{name}{labels:?}: {x} -> {y}");
        assert!(y > x, "{name} did not move");
    }
    let moved = sum(
        &brokers(&after),
        "sekisho_broker_bytes_total",
        &["from_connectors"],
    ) - sum(
        &brokers(&before),
        "sekisho_broker_bytes_total",
        &["from_connectors"],
    );
    assert!(
        moved >= BIG as f64,
        "bytes from connectors grew by {moved} only"
    );
    let (x, y) = (
        sum(
            &conns(&before),
            "sekisho_connector_bytes_total",
            &["from_site"],
        ),
        sum(
            &conns(&after),
            "sekisho_connector_bytes_total",
            &["from_site"],
        ),
    );
    println!("connector bytes from the site: {x} -> {y}");
    assert!(y - x >= BIG as f64);
    for t in &after[..2] {
        assert_eq!(metric(t, "sekisho_broker_store_up", &[]), 1.0, "{t}");
        assert_eq!(metric(t, "sekisho_broker_store_notify_connected", &[]), 1.0);
        assert_eq!(
            metric(t, "sekisho_broker_connector_link", &["state=\"up\""]),
            2.0
        );
    }
    for t in &after[2..] {
        assert_eq!(metric(t, "sekisho_connector_link_up", &[]), 2.0, "{t}");
    }
    assert!(metric(&after[0], "sekisho_broker_handshakes_total", &[]) >= 1.0);
    let (ok, _, _) = d.sh("broker", "curl -sf -m 3 http://127.0.0.1:9464/readyz");
    assert!(ok, "broker 1 is ready");
    let (ok, _, _) = d.sh("site", "curl -sf -m 3 http://127.0.0.1:9465/readyz");
    assert!(ok, "connector 1 is ready");

    // The broker alice uses dies: she fails over to the other, and both connectors still
    // carry her new flows there.
    let used = client_status(&d, "alice")["broker"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let (dead, alive_broker) = if used == "region-1" {
        ("broker", "broker2")
    } else {
        ("broker2", "broker")
    };
    println!("alice uses {used}; killing {dead}");
    d.signal(dead, 9);
    let t0 = Instant::now();
    let back = wait_until(Duration::from_secs(30), || curls(&d, 1, 2) == 1);
    println!(
        "broker failover: alice's new flows work again after {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(back.is_some(), "no new flow worked after the broker died");
    let mark = d.app_requests(0).len();
    assert_eq!(curls(&d, 8, 5), 8);
    let seen = d.app_requests(mark);
    assert!(
        count_from(&seen, "10.20.0.1") >= 1 && count_from(&seen, "10.20.0.2") >= 1,
        "both connectors serve through the surviving broker: {seen:?}"
    );

    // A connector dies: new flows go to the other one.
    d.signal("connector", 9);
    let t0 = Instant::now();
    let mut took = None;
    while t0.elapsed() < Duration::from_secs(40) {
        if curls(&d, 4, 8) == 4 {
            took = Some(t0.elapsed());
            break;
        }
    }
    let took = took.expect("new flows never all worked after a connector died");
    println!(
        "connector failure: 4 new flows in parallel all completed {:.2} s after the kill",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let mark = d.app_requests(0).len();
    assert_eq!(curls(&d, 6, 5), 6);
    assert_eq!(count_from(&d.app_requests(mark), "10.20.0.2"), 6);

    // Drain: bring connector 1 back, put a slow download on one connector, drain that one.
    d.daemon("start", "connector");
    // (The killed connector's link stays listed, stale, until the QUIC idle timeout.)
    let relinked = wait_until(Duration::from_secs(30), || {
        dc1_links(&d, alive_broker)
            .iter()
            .filter(|(_, s)| s == "up")
            .count()
            == 2
    });
    assert!(relinked.is_some(), "connector 1 did not come back");
    let (draining, daemon, other) = {
        let mark = d.app_requests(0).len();
        let dl = start_download(&d);
        let first = wait_until(Duration::from_secs(10), || {
            d.app_requests(mark).iter().any(|l| l.contains("big.bin"))
        });
        assert!(first.is_some(), "the download did not start");
        let line = d
            .app_requests(mark)
            .into_iter()
            .find(|l| l.contains("big.bin"))
            .unwrap();
        let via = if line.starts_with("http 10.20.0.1 ") {
            ("connector", "10.20.0.2")
        } else {
            ("connector2", "10.20.0.1")
        };
        (dl, via.0, via.1)
    };
    println!("the download runs through {daemon}; draining it (SIGTERM)");
    let pid = d.pid(daemon);
    d.signal(daemon, 15);
    let marked = wait_until(Duration::from_secs(10), || {
        dc1_links(&d, alive_broker)
            .iter()
            .any(|(_, s)| s == "draining")
    });
    assert!(marked.is_some(), "{:?}", dc1_links(&d, alive_broker));
    let mark = d.app_requests(0).len();
    assert_eq!(curls(&d, 6, 5), 6);
    let seen = d.app_requests(mark);
    assert_eq!(
        count_from(&seen, other),
        6,
        "new flows avoid the draining connector: {seen:?}"
    );
    assert!(alive(pid), "the draining connector waits for its flow");
    let got: u64 = String::from_utf8_lossy(&draining.wait_with_output().unwrap().stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        got > BIG,
        "the download through the draining connector got {got} bytes"
    );
    let gone = wait_until(Duration::from_secs(20), || !alive(pid));
    assert!(gone.is_some(), "the drained connector did not stop");
    let log = d.log(daemon);
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("drained: no open flows left"), "{log}");
}

#[test]
fn changes_propagate_between_brokers_and_the_signing_key_rotates() {
    if sekisho_tests::skip_netns() {
        return;
    }
    let pg = Postgres::start().expect("a local PostgreSQL for the brokers");
    let url = pg.url();
    // Region 2 is 30 ms away: both laptops use region 1.
    let Some(d) = Deployment::for_test_with(&[
        ("SK_BROKERS", "2"),
        ("SK_DATABASE", &url),
        ("SK_BROKER_DELAY_MS", "0 30"),
        ("SK_TOKEN_LIFETIME", "40s"),
    ]) else {
        return;
    };
    for who in ["alice", "bob"] {
        let on_one = wait_until(Duration::from_secs(30), || {
            client_status(&d, who)["broker"] == "region-1"
        });
        assert!(on_one.is_some(), "{who}: {}", client_status(&d, who));
    }
    let at2 = |args: &[&str]| {
        let mut all = vec!["--server", "https://10.99.8.2:8443"];
        all.extend_from_slice(args);
        d.admin(&all)
    };

    // A policy change made through broker 1 takes effect at broker 2.
    let (_, out, err) = at2(&["explain", "--user", "bob", "--to", "10.20.0.10:80"]);
    assert!(out.starts_with("DENY"), "{out}{err}");
    let generation = |b: &str| stats(&d, b)["policy_generation"].as_u64().unwrap_or(0);
    let g2 = generation("broker2");
    let policy = d.state().join("policy.toml");
    let text = std::fs::read_to_string(&policy).unwrap();
    let changed = text
        .replace(
            "applications = [\"app-net-ping\"]",
            "applications = [\"app-net-ping\", \"intranet-web\"]",
        )
        .replace(
            "name = \"finance has no intranet\"\nuser = \"bob\"\ndestination = \"10.20.0.10:80\"\nexpect = \"deny\"",
            "name = \"finance has the intranet\"\nuser = \"bob\"\ndestination = \"10.20.0.10:80\"\nexpect = \"allow\"",
        );
    assert!(changed.contains("finance has the intranet"));
    assert_ne!(text, changed, "the demo policy's finance rule moved");
    let new_policy = d.state().join("policy-finance-web.toml");
    std::fs::write(&new_policy, changed).unwrap();
    let started = Instant::now();
    let (ok, out, err) = d.admin(&["policy", "apply", new_policy.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let t0 = Instant::now();
    let seen = wait_until(Duration::from_secs(10), || generation("broker2") > g2);
    println!(
        "policy change at broker 1 in force at broker 2 {:.0} ms after the admin command \
         returned ({:.0} ms after it started)",
        t0.elapsed().as_secs_f64() * 1000.0,
        started.elapsed().as_secs_f64() * 1000.0
    );
    assert!(seen.is_some(), "broker 2 never got the new policy");
    let (_, out, err) = at2(&["explain", "--user", "bob", "--to", "10.20.0.10:80"]);
    assert!(out.starts_with("ALLOW"), "{out}{err}");
    let (ok, _, _) = d.sh("laptop2", "curl -sf -m 4 -o /dev/null http://10.20.0.10/");
    assert!(ok, "bob reaches the web app after the change");

    // A revocation made through broker 2 cuts bob's device at broker 1.
    let peers = |b: &str| -> Vec<String> {
        stats(&d, b)["peers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["device"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(peers("broker").contains(&"bob-laptop".to_string()));
    let started = Instant::now();
    let (ok, out, err) = at2(&["device", "revoke", "bob-laptop"]);
    assert!(ok, "{out}{err}");
    let t0 = Instant::now();
    let cut = wait_until(Duration::from_secs(10), || {
        !peers("broker").contains(&"bob-laptop".to_string())
    });
    println!(
        "revocation at broker 2 cut bob's device at broker 1 {:.0} ms after the admin command \
         returned ({:.0} ms after it started)",
        t0.elapsed().as_secs_f64() * 1000.0,
        started.elapsed().as_secs_f64() * 1000.0
    );
    assert!(cut.is_some(), "broker 1 still has bob's device");
    let (ok, _, _) = d.sh("laptop2", "curl -sf -m 3 -o /dev/null http://10.20.0.10/");
    assert!(!ok, "bob's revoked laptop still reaches the app");
    let (ok, _, _) = d.sh("laptop", "curl -sf -m 3 -o /dev/null http://10.20.0.10/");
    assert!(ok, "alice is not affected");

    // The posture signing key rotates while alice is connected: the echo app (sensitivity 3,
    // needs an accepted token) keeps answering through token refreshes signed by the new key.
    let refused = |b: &str| stats(&d, b)["counters"]["posture"]["refused"].as_u64();
    let refused_before = (refused("broker"), refused("broker2"));
    let (ok, out, err) = at2(&["signing-key", "rotate"]);
    assert!(ok, "{out}{err}");
    println!("{out}");
    let (ok, list, _) = d.admin(&["signing-key", "list"]);
    assert!(
        ok && list.contains("active") && list.contains("previous"),
        "{list}"
    );
    let accepted = |b: &str| {
        stats(&d, b)["counters"]["posture"]["accepted"]
            .as_u64()
            .unwrap_or(0)
    };
    let accepted_before = accepted("broker");
    let t0 = Instant::now();
    let mut answers = 0;
    while t0.elapsed() < Duration::from_secs(25) {
        let r = d.py("laptop", &udp_probe("10.20.0.10", 7, "still-here"));
        assert!(
            r.starts_with("reply:still-here"),
            "echo failed {:.1} s after the rotation: {r}",
            t0.elapsed().as_secs_f64()
        );
        answers += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "{answers} echo answers over 25 s after the rotation; tokens accepted at broker 1: {} -> {}",
        accepted_before,
        accepted("broker")
    );
    assert!(
        accepted("broker") > accepted_before,
        "no token refresh was accepted"
    );
    assert_eq!((refused("broker"), refused("broker2")), refused_before);
}
