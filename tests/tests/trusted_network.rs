//! The `trusted_network` posture check end to end: alice's laptop (namespace `laptop`) has the
//! quickstart's "internet" router (lan0 on `inet`, 10.99.1.1) as its default gateway and the
//! resolver file `/etc/netns/NS/resolv.conf` (which `ip netns exec` mounts over
//! /etc/resolv.conf, and which her client rewrites to point at its DNS stub). A check on the
//! gateway's MAC address (IPv4, and IPv6 once the router gets an IPv6 address) or on the
//! network's DNS suffix, required by the level-3 echo service, decides whether she reaches it;
//! the broker learns only pass/fail.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use sekisho_tests::{Deployment, udp_probe, wait_until};

const APP: &str = "10.20.0.10";
const CHECK: &str = "office-network";

/// The quickstart's policy with a `trusted_network` check named "office-network" with
/// `params`, required at level 3 (alice's echo service); returns the file.
fn policy_with(d: &Deployment, tag: &str, params: &str) -> PathBuf {
    let text = std::fs::read_to_string(d.state().join("policy.toml")).unwrap();
    let old = "level3 = [\"client-current\", \"edr-running\"]";
    assert!(text.contains(old), "the demo policy's level 3 changed");
    let text = text.replacen(
        old,
        &format!("level3 = [\"client-current\", \"edr-running\", \"{CHECK}\"]"),
        1,
    );
    let path = d.state().join(format!("policy-network-{tag}.toml"));
    std::fs::write(
        &path,
        format!(
            "{text}\n[[posture_checks]]\nname = \"{CHECK}\"\nkind = \"trusted_network\"\n{params}\n"
        ),
    )
    .unwrap();
    path
}

fn apply(d: &Deployment, path: &Path) {
    let (ok, out, err) = d.admin(&["policy", "apply", path.to_str().unwrap()]);
    assert!(ok, "policy apply: {out}\n{err}");
}

/// One UDP exchange with the level-3 echo service on a new flow.
fn echo(d: &Deployment) -> bool {
    d.py(
        "laptop",
        &udp_probe(APP, 7, "net").replace("settimeout(5)", "settimeout(0.5)"),
    )
    .starts_with("reply:net")
}

/// What alice's client last reported for the check (`sekisho-client status --json`).
fn reported(d: &Deployment) -> Option<bool> {
    d.client_status("alice")["posture"]["checks"][CHECK].as_bool()
}

/// Waits until the echo service answers (`allowed`) or no longer does and the client reports
/// the check as `allowed`. A denial also waits until the broker accepts, at `since` or later,
/// a token that says the check fails: the client evaluated it and reported it (a token that
/// does not name the check at all is denied too). Prints the time since `since`.
fn expect_echo(d: &Deployment, since: SystemTime, allowed: bool, what: &str) {
    let done = || {
        echo(d) == allowed
            && reported(d) == Some(allowed)
            && (allowed || broker_saw_failing(d, since))
    };
    if wait_until(Duration::from_secs(30), done).is_none() {
        panic!(
            "{what}: after 30 s echo {}, the check reported {:?}, the broker saw it failing: {} \
             (want allowed = {allowed})",
            if echo(d) { "answers" } else { "is denied" },
            reported(d),
            broker_saw_failing(d, since),
        );
    }
    let took = since.elapsed().unwrap_or_default();
    println!("{what}: {:.1} s", took.as_secs_f64());
}

/// The broker accepted a token from alice's laptop at `since` or later whose failing
/// checks include the check.
fn broker_saw_failing(d: &Deployment, since: SystemTime) -> bool {
    d.decisions().iter().any(|r| {
        r["event"] == "posture"
            && r["device"] == "alice-laptop"
            && r["ts"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .is_some_and(|t| t >= since)
            && r["failing_checks"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c == CHECK))
    })
}

fn last_echo_deny(d: &Deployment) -> Value {
    d.decisions()
        .into_iter()
        .rev()
        .find(|r| r["event"] == "flow" && r["dport"] == 7 && r["decision"] == "deny")
        .expect("a deny for echo in the decision log")
}

fn by_gateway_mac(d: &Deployment) {
    let (ok, mac, err) = d.sh("inet", "cat /sys/class/net/lan0/address");
    assert!(ok, "{err}");
    let mac = mac.trim().to_string();
    // The laptop's default gateway and its neighbour entry (what the client looks at).
    let (_, route, _) = d.sh("laptop", "ip -4 route show default");
    assert!(route.contains("via 10.99.1.1 dev eth0"), "{route}");
    let (_, neigh, _) = d.sh("laptop", "ip -4 neigh show 10.99.1.1 dev eth0");
    println!("gateway lan0 {mac}; laptop's entry: {}", neigh.trim());
    assert!(neigh.contains(&mac), "{neigh}");

    // The router's MAC (written in upper case, with dashes: normalized) → allowed.
    let listed = policy_with(
        d,
        "mac",
        &format!(
            "gateway_mac = [\"02:00:5e:00:53:01\", \"{}\"]",
            mac.to_uppercase().replace(':', "-")
        ),
    );
    let since = SystemTime::now();
    apply(d, &listed);
    expect_echo(d, since, true, "the router's MAC is listed: echo allowed");

    // The laptop moves to a gateway with no neighbour entry (another network, as far as the
    // check sees): the client notices on its next check and reports the failure. The broker
    // and the control API stay reachable through the router.
    let since = SystemTime::now();
    let (ok, _, err) = d.sh(
        "laptop",
        "ip route add 10.99.2.0/24 via 10.99.1.1 && ip route replace default via 10.99.1.250 dev eth0",
    );
    assert!(ok, "{err}");
    expect_echo(d, since, false, "the default gateway changed: echo denied");

    // No IPv4 default route at all, an IPv6 one through the router: the gateway's IPv6
    // neighbour entry (read over netlink) has the router's MAC.
    let (ok, _, err) = d.sh("inet", "ip -6 addr add fd00:99:1::1/64 dev lan0 nodad");
    assert!(ok, "{err}");
    let since = SystemTime::now();
    let (ok, out, err) = d.sh(
        "laptop",
        "ip route del default && ip -6 addr add fd00:99:1::2/64 dev eth0 nodad && \
         ip -6 route add default via fd00:99:1::1 dev eth0 && ping -6 -c 1 -W 2 fd00:99:1::1 && \
         ip -6 neigh show fd00:99:1::1",
    );
    assert!(ok, "{out}\n{err}");
    expect_echo(d, since, true, "IPv6 default via the router: echo allowed");

    let since = SystemTime::now();
    let (ok, _, err) = d.sh(
        "laptop",
        "ip -6 route del default && ip route add default via 10.99.1.1 dev eth0 && \
         ip route del 10.99.2.0/24",
    );
    assert!(ok, "{err}");
    expect_echo(d, since, true, "back on the router (IPv4): echo allowed");

    // Another MAC only → denied, the check named.
    let other = policy_with(d, "other-mac", "gateway_mac = [\"02:00:5e:00:53:01\"]");
    let since = SystemTime::now();
    apply(d, &other);
    expect_echo(d, since, false, "only another MAC is listed: echo denied");
    let rec = last_echo_deny(d);
    assert_eq!(rec["check"], CHECK, "{rec}");
    assert_eq!(rec["reason"], "posture check failed", "{rec}");
    let status = d.client_status("alice");
    assert_eq!(status["posture"]["checks"][CHECK], false, "{status}");
    // Level 1 is not affected.
    let (ok, body, _) = d.sh("laptop", "curl -s -m 5 http://10.20.0.10/");
    assert!(ok && body.contains("Hello"), "level 1: {body}");
}

fn by_dns_suffix(d: &Deployment) {
    let resolv = PathBuf::from("/etc/netns")
        .join(d.ns("laptop"))
        .join("resolv.conf");
    let marker = "# Managed by sekisho-client";
    let current = std::fs::read_to_string(&resolv).unwrap();
    assert!(
        current.starts_with(marker),
        "the client points the laptop at its stub: {current}"
    );
    let since = SystemTime::now();
    apply(d, &policy_with(d, "dns", "dns_suffix = [\"Corp.Example\"]"));
    // The network's file (saved by the client) names no search domain.
    expect_echo(d, since, false, "no DNS suffix: echo denied");
    let rec = last_echo_deny(d);
    assert_eq!(rec["check"], CHECK, "{rec}");

    // Joining the office network: a DHCP client writes the resolver file (in place, as the
    // bind mount needs) with the office's search domain. The file is no longer the client's,
    // so it is the network's.
    let office = "nameserver 10.99.0.53\nsearch office.corp.example\n";
    let since = SystemTime::now();
    std::fs::write(&resolv, office).unwrap();
    expect_echo(d, since, true, "search office.corp.example: echo allowed");

    // A client started on that network takes the file over and keeps the network's in its
    // backup, which the check reads.
    d.daemon("stop", "client-alice");
    std::fs::write(&resolv, office).unwrap();
    let since = SystemTime::now();
    d.daemon("start", "client-alice");
    let took_over = wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&resolv).is_ok_and(|t| t.starts_with(marker))
    });
    assert!(
        took_over.is_some(),
        "the restarted client took the file over"
    );
    expect_echo(
        d,
        since,
        true,
        "restarted client, network's file in its backup: echo allowed",
    );

    // A network under another suffix: the client's file gives way to the new network's.
    let since = SystemTime::now();
    std::fs::write(&resolv, "nameserver 10.99.0.53\nsearch notcorp.example\n").unwrap();
    expect_echo(d, since, false, "search notcorp.example: echo denied");
}

#[test]
fn trusted_network_check_by_gateway_mac_and_dns_suffix() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    assert!(echo(&d), "alice reaches echo before any network check");
    by_gateway_mac(&d);
    by_dns_suffix(&d);
}
