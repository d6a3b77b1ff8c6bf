//! The overlay end to end: laptop → broker → connector → private app, every flow authorized.
//! Real binaries, network namespaces (see `deploy/quickstart.sh` for the hosts and addresses).

use std::time::Duration;

use sekisho_tests::{Deployment, tcp_probe, udp_probe, udp_probe_from, wait_until};
use serde_json::Value;

const APP: &str = "10.20.0.10";

fn find<'a>(log: &'a [Value], user: &str, dport: u64) -> Option<&'a Value> {
    log.iter()
        .rev()
        .find(|r| r["event"] == "flow" && r["user"] == user && r["dport"] == dport)
}

/// The outcome word and the seconds it took, from a probe's output.
fn outcome(s: &str) -> (&str, f64) {
    let mut it = s.rsplitn(2, ' ');
    let secs = it.next().and_then(|t| t.parse().ok()).unwrap_or(f64::NAN);
    (it.next().unwrap_or(""), secs)
}

#[test]
fn allowed_apps_work_over_tcp_udp_and_icmp() {
    let Some(d) = Deployment::for_test() else {
        return;
    };

    let (ok, body, err) = d.sh("laptop", &format!("curl -sS -m 10 http://{APP}/"));
    assert!(ok, "HTTP GET failed: {err}");
    assert!(body.contains("Hello from the private app"), "{body}");

    // 10 MB download; its checksum matches the file on the app host.
    let want = std::process::Command::new("sha256sum")
        .arg(d.state().join("www/10mb.bin"))
        .output()
        .unwrap();
    let want = String::from_utf8_lossy(&want.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    let (ok, got, err) = d.sh(
        "laptop",
        &format!("curl -sS -m 60 http://{APP}/10mb.bin | sha256sum"),
    );
    assert!(ok, "download failed: {err}");
    assert_eq!(
        got.split_whitespace().next(),
        Some(want.as_str()),
        "checksum of the 10 MB download"
    );

    let r = d.py("laptop", &udp_probe(APP, 7, "sekisho-echo"));
    assert_eq!(outcome(&r).0, "reply:sekisho-echo", "UDP echo: {r}");

    let (ok, out, _) = d.sh("laptop", &format!("ping -c 3 -i 0.2 -W 3 {APP}"));
    assert!(ok && out.contains("3 received"), "ping: {out}");

    let log = d.decisions();
    let web = find(&log, "alice", 80).expect("decision for alice:80");
    assert_eq!(web["decision"], "allow");
    assert_eq!(web["rule"], "engineering-intranet");
    assert_eq!(web["application"], "intranet-web");
    assert_eq!(web["device"], "alice-laptop");
    for field in ["ts", "src", "sport", "dst", "proto"] {
        assert!(
            !web[field].is_null(),
            "decision record lacks {field}: {web}"
        );
    }
    // Each flow is decided once, not per packet: the 10 MB download is one decision.
    let alice_80 = log
        .iter()
        .filter(|r| r["event"] == "flow" && r["user"] == "alice" && r["dport"] == 80)
        .count();
    assert!(
        alice_80 <= 2,
        "{alice_80} decisions for two HTTP connections"
    );
}

#[test]
fn denied_flows_fail_fast_with_the_deciding_rule_logged() {
    let Some(d) = Deployment::for_test() else {
        return;
    };

    // A port the policy denies explicitly on an allowed host.
    let r = d.py("laptop", &tcp_probe(APP, 5432));
    let (what, secs) = outcome(&r);
    println!("alice -> {APP}:5432: {what} after {secs} s");
    assert_eq!(what, "refused", "{r}");
    let rec = find(&d.decisions(), "alice", 5432)
        .cloned()
        .expect("decision for 5432");
    assert_eq!(rec["decision"], "deny");
    assert_eq!(rec["rule"], "no-database-from-laptops");

    // A port no application covers: default deny.
    let r = d.py("laptop", &tcp_probe(APP, 8080));
    assert_eq!(outcome(&r).0, "refused", "{r}");
    let rec = find(&d.decisions(), "alice", 8080)
        .cloned()
        .expect("decision for 8080");
    assert_eq!(rec["decision"], "deny");
    assert!(rec["rule"].is_null());
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("default deny"),
        "{rec}"
    );

    // ICMP to an address outside every application: "administratively prohibited". Enrolled
    // devices only route their own applications into the tunnel, so route this one by hand,
    // as a hand-configured or full-tunnel device would: the broker decides, not the routes.
    let (_, out, _) = d.sh(
        "laptop",
        "ip route add 10.20.0.200/32 dev sekisho0 && ping -c 1 -W 5 10.20.0.200",
    );
    assert!(
        out.contains("Packet filtered"),
        "ping to a denied host: {out}"
    );

    // Two users, same app, different answers.
    let (ok, body, _) = d.sh("laptop", &format!("curl -sS -m 10 http://{APP}/"));
    assert!(ok && body.contains("Hello"), "alice: {body}");
    let r = d.py("laptop2", &tcp_probe(APP, 80));
    let (what, secs) = outcome(&r);
    println!("bob -> {APP}:80: {what} after {secs} s");
    assert_eq!(what, "refused", "bob must be refused: {r}");
    let rec = find(&d.decisions(), "bob", 80)
        .cloned()
        .expect("decision for bob:80");
    assert_eq!(rec["decision"], "deny");
    assert_eq!(rec["application"], "intranet-web");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("default deny"),
        "{rec}"
    );
    // Bob's UDP to the echo service: ICMP administratively prohibited, seen as "no route".
    let r = d.py("laptop2", &udp_probe(APP, 7, "x"));
    assert!(r.starts_with("OSError:[Errno 113]"), "bob's UDP: {r}");
    // Bob may ping.
    let (ok, out, _) = d.sh("laptop2", &format!("ping -c 1 -W 3 {APP}"));
    assert!(ok, "bob's ping: {out}");
}

#[test]
fn spoofed_sources_are_dropped_and_the_app_is_private() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    let before = d.counter("drops.spoofed_source");
    // Alice's laptop sends with bob's overlay address.
    let (ok, _, err) = d.sh(
        "laptop",
        &format!("ip addr add 100.118.0.3/32 dev lo && curl -sS -m 3 --interface 100.118.0.3 http://{APP}/"),
    );
    assert!(!ok, "a spoofed request must not get through");
    assert!(
        err.contains("timed out") || err.contains("Timeout"),
        "{err}"
    );
    let after = d.counter("drops.spoofed_source");
    println!("dropped_spoofed_source: {before} -> {after}");
    assert!(after > before, "spoofed packets are counted");
    assert!(
        !d.log("app").contains("100.118.0.3"),
        "nothing reached the app"
    );
    assert!(d.decisions().iter().all(|r| r["src"] != "100.118.0.3"));

    // The connector listens on nothing but its metrics endpoint on loopback.
    let (ok, out, _) = d.sh("site", "ss -lntuH");
    assert!(ok);
    let open: Vec<&str> = out
        .lines()
        .filter(|l| !l.contains("127.0.0.1:9465"))
        .collect();
    assert!(
        open.is_empty(),
        "listening sockets in the connector's namespace:\n{out}"
    );
    assert!(
        out.contains("127.0.0.1:9465"),
        "the metrics endpoint on loopback: {out}"
    );
    let (_, out, _) = d.sh("site", "ss -ntuH");
    assert!(
        out.contains("10.99.2.2:4433"),
        "the connector's link to the broker: {out}"
    );

    // The app host is unreachable except through Sekisho: not from the internet router, not
    // from the laptop's own uplink.
    let (ok, _, _) = d.sh("inet", &format!("curl -sS -m 3 http://{APP}/"));
    assert!(!ok, "the internet namespace reached the app");
    let (ok, _, _) = d.sh(
        "laptop",
        &format!("curl -sS -m 3 --interface eth0 http://{APP}/"),
    );
    assert!(!ok, "the laptop reached the app outside the tunnel");

    // The connector's link was made after a QUIC Retry (address validation): the broker did
    // no TLS work for an address that had not shown it receives there.
    let retries = d.stats()["quic_retries"].as_u64().unwrap_or(0);
    assert!(retries >= 1, "no QUIC Retry counted");

    // The broker's metrics listen on its loopback, not on its internet-facing address.
    let (ok, _, _) = d.sh("inet", "curl -sS -m 3 http://10.99.2.2:9464/metrics");
    assert!(!ok, "the broker's metrics answered on its public address");
    let (ok, out, _) = d.sh("broker", "curl -sS -m 3 http://127.0.0.1:9464/metrics");
    assert!(
        ok && out.contains("sekisho_broker"),
        "metrics on loopback: {out}"
    );
}

#[test]
fn sighup_reloads_policy_and_a_broken_file_changes_nothing() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    let policy_path = d.state().join("policy.toml");
    let original = std::fs::read_to_string(&policy_path).unwrap();
    let policy_events = |d: &Deployment| {
        d.decisions()
            .into_iter()
            .filter(|r| r["event"] == "policy")
            .collect::<Vec<_>>()
    };

    // An allowed UDP flow, open across the reload.
    // (Same source port each time: the same 5-tuple, so the same cached flow.)
    let r = d.py("laptop", &udp_probe_from(40777, APP, 7, "one"));
    assert_eq!(outcome(&r).0, "reply:one", "{r}");
    let (ok, _, _) = d.sh("laptop", &format!("curl -sS -m 5 http://{APP}/"));
    assert!(ok);

    // New policy: a deny rule for alice on the web app.
    let edited = format!(
        "{original}\n[[rules]]\nname = \"web-maintenance\"\naction = \"deny\"\nusers = [\"alice\"]\napplications = [\"intranet-web\"]\n"
    );
    std::fs::write(&policy_path, edited).unwrap();
    d.signal("broker", libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || policy_events(&d)
            .iter()
            .any(|e| e["result"] == "applied"))
        .is_some()
    );
    let r = d.py("laptop", &tcp_probe(APP, 80));
    assert_eq!(outcome(&r).0, "refused", "after the reload: {r}");
    let rec = find(&d.decisions(), "alice", 80).cloned().unwrap();
    assert_eq!(rec["rule"], "web-maintenance");
    // The UDP flow the new policy still allows keeps working (same 5-tuple).
    let r = d.py("laptop", &udp_probe_from(40777, APP, 7, "two"));
    assert_eq!(outcome(&r).0, "reply:two", "{r}");

    // A broken file: rejected with file:line, the running policy stays.
    let broken = format!(
        "{original}\n[[rules]]\nname = \"typo\"\naction = \"alow\"\ngroups = [\"engineering\"]\napplications = [\"echo\"]\n"
    );
    let bad_line = broken.lines().position(|l| l.contains("\"alow\"")).unwrap() + 1;
    std::fs::write(&policy_path, broken).unwrap();
    d.signal("broker", libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || policy_events(&d)
            .iter()
            .any(|e| e["result"] == "rejected"))
        .is_some()
    );
    let rejected = policy_events(&d)
        .into_iter()
        .find(|e| e["result"] == "rejected")
        .unwrap();
    let detail = rejected["detail"].as_str().unwrap_or("");
    println!("rejected: {detail}");
    assert!(
        detail.contains(&format!("policy.toml:{bad_line}:")),
        "{detail}"
    );
    let typo_index = original.matches("[[rules]]").count();
    assert!(
        detail.contains(&format!("rules[{typo_index}].action")),
        "{detail}"
    );
    assert!(d.log("broker").contains("policy reload rejected"));
    // Still the edited policy: alice refused on 80 by web-maintenance, echo still allowed.
    let r = d.py("laptop", &tcp_probe(APP, 80));
    assert_eq!(outcome(&r).0, "refused");
    let r = d.py("laptop", &udp_probe(APP, 7, "still"));
    assert_eq!(outcome(&r).0, "reply:still", "{r}");
}

#[test]
fn broker_restart_is_survived_without_touching_client_or_connector() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    let (ok, _, _) = d.sh("laptop", &format!("curl -sS -m 5 http://{APP}/"));
    assert!(ok);
    let client_pid = d.pid("client-alice");
    let connector_pid = d.pid("connector");
    let (_, devices_before, _) = d.admin(&["device", "list"]);
    let (_, policy_before, _) = d.admin(&["policy", "show"]);
    let (_, users_before, _) = d.admin(&["user", "list"]);

    d.daemon("kill", "broker");
    let (ok, _, _) = d.sh("laptop", &format!("curl -sS -m 2 http://{APP}/"));
    assert!(!ok, "nothing answers while the broker is down");
    d.daemon("start", "broker");

    let took = wait_until(Duration::from_secs(90), || {
        d.sh("laptop", &format!("curl -sS -m 2 http://{APP}/")).0
    });
    println!("traffic resumed {took:?} after the broker restarted");
    assert!(
        took.is_some(),
        "traffic did not resume after a broker restart"
    );
    assert_eq!(
        d.pid("client-alice"),
        client_pid,
        "the client was not restarted"
    );
    assert_eq!(
        d.pid("connector"),
        connector_pid,
        "the connector was not restarted"
    );
    assert!(
        d.log("connector").matches("linked to broker").count() >= 2,
        "the connector re-linked"
    );
    // The control plane's state came back from its SQLite file: devices, users, the applied
    // policy, and the signing key (the clients' new tokens verify, so traffic resumed).
    assert_eq!(d.admin(&["device", "list"]).1, devices_before);
    assert_eq!(d.admin(&["user", "list"]).1, users_before);
    assert_eq!(d.admin(&["policy", "show"]).1, policy_before);
    assert!(devices_before.contains("alice-laptop") && devices_before.contains("bob-laptop"));
}

/// A rule with hours: outside them the flow it would allow is denied, with that reason and
/// the rule's name; inside them it passes. (Policy tests ignore hours: the policy applies.)
#[test]
fn a_rule_outside_its_hours_denies_and_says_why() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    let now_hour = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600)
        % 24;
    let apply = |from: u64, to: u64| {
        let text = std::fs::read_to_string(d.state().join("policy.toml")).unwrap();
        let text = text.replacen(
            "name = \"engineering-intranet\"",
            &format!("name = \"engineering-intranet\"\nhours = \"{from:02}:00-{to:02}:00\""),
            1,
        );
        let path = d.state().join(format!("policy-hours-{from}.toml"));
        std::fs::write(&path, text).unwrap();
        let (ok, _, err) = d.admin(&["policy", "apply", path.to_str().unwrap()]);
        assert!(ok, "policy with hours: {err}");
    };
    // Two hours from now until three hours from now (UTC): not now.
    apply((now_hour + 2) % 24, (now_hour + 3) % 24);
    let r = d.py("laptop", &tcp_probe(APP, 80));
    assert!(!r.starts_with("connected"), "outside the rule's hours: {r}");
    let rec = find(&d.decisions(), "alice", 80)
        .cloned()
        .expect("a decision");
    assert_eq!(rec["decision"], "deny", "{rec}");
    assert_eq!(rec["reason"], "outside the rule's hours", "{rec}");
    assert_eq!(rec["rule"], "engineering-intranet", "{rec}");
    // From an hour ago to two hours from now: now.
    apply((now_hour + 23) % 24, (now_hour + 2) % 24);
    let r = d.py("laptop", &tcp_probe(APP, 80));
    assert!(r.starts_with("connected"), "inside the rule's hours: {r}");
}
