//! Trust boundaries, end to end: each component distrusts the others. The connector forwards
//! only inside its own allowlist, whatever a broker's policy grants.

use std::time::Duration;

use sekisho_tests::{Deployment, tcp_probe, udp_probe, wait_until};

const APP: &str = "10.20.0.10";

/// The demo policy plus rules that grant alice's group everything a broker could: every
/// address of the site, every protocol, and every name under corp.example.
fn grant_everything(d: &Deployment) -> std::path::PathBuf {
    let text = std::fs::read_to_string(d.state().join("policy.toml")).unwrap();
    let text = format!(
        "{text}\n[[applications]]\nname = \"whole-site\"\nsite = \"dc1\"\n\
         addresses = [\"10.20.0.0/16\"]\nprotocols = [\"tcp\", \"udp\", \"icmp\"]\n\
         [[applications]]\nname = \"every-name\"\nsite = \"dc1\"\nnames = [\"*.corp.example\"]\n\
         protocols = [\"tcp\"]\n\
         [[rules]]\nname = \"everything\"\naction = \"allow\"\ngroups = [\"engineering\"]\n\
         applications = [\"whole-site\", \"every-name\"]\n"
    );
    let path = d.state().join("policy-everything.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn metric(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A broker whose policy grants everything still reaches only what the connector's allowlist
/// holds: other ports, protocols and hosts of the site, names outside its zones and the
/// connector's own host stay unreachable, and the connector logs and counts each refusal.
/// Forwarding is on for the connector's interfaces only, and the kernel holds the same list.
#[test]
fn the_connector_forwards_only_inside_its_allowlist() {
    // 10.20.0.1 is the connector's own leg on the site network: inside the list on purpose.
    let Some(d) = Deployment::for_test_with(&[(
        "SK_CONNECTOR_ALLOW",
        "10.20.0.0/24:80,9000 wiki.corp.example",
    )]) else {
        return;
    };
    let path = grant_everything(&d);
    let (ok, out, err) = d.admin(&["policy", "apply", path.to_str().unwrap()]);
    assert!(ok, "{out}{err}");

    // Inside the list: HTTP and the load port of the app, and the wiki by name.
    let (ok, body, err) = d.sh("laptop", &format!("curl -sS -m 10 http://{APP}/"));
    assert!(ok && body.contains("Hello"), "HTTP to the app: {err}");
    let r = d.py("laptop", &tcp_probe(APP, 9000));
    assert!(r.starts_with("connected"), "9000: {r}");
    let (ok, _, err) = d.sh("laptop", "curl -sS -m 10 http://wiki.corp.example/");
    assert!(ok, "the wiki by name: {err}");

    // Outside it, though the broker allows them: UDP echo, ICMP, the site's DNS server, a
    // name outside the zone, and the connector host itself.
    let (_, listener, _) = d.sh(
        "site",
        "timeout 40 python3 -c \"import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('10.20.0.1',80));s.listen(5);[s.accept() for _ in range(5)]\" >/dev/null 2>&1 & echo started",
    );
    assert!(listener.contains("started"));
    std::thread::sleep(Duration::from_millis(300));
    let refused_before = d.log("connector").matches("refused").count();
    let r = d.py("laptop", &udp_probe(APP, 7, "sekisho-echo"));
    assert!(
        !r.starts_with("reply:"),
        "UDP echo outside the list answered: {r}"
    );
    let (ok, out, _) = d.sh("laptop", &format!("ping -c 2 -i 0.2 -W 2 {APP}"));
    assert!(!ok, "ping outside the list answered: {out}");
    let r = d.py("laptop", &udp_probe("10.20.0.53", 53, "x"));
    assert!(
        !r.starts_with("reply:"),
        "the site's DNS server answered: {r}"
    );
    let (ok, _, _) = d.sh("laptop", "curl -sS -m 5 http://build.dev.corp.example/");
    assert!(!ok, "a name outside the allowed zone was reached");
    let r = d.py("laptop", &tcp_probe("10.20.0.1", 80));
    assert!(
        !r.starts_with("connected"),
        "the connector host itself was reached from the tunnel: {r}"
    );

    // Each refusal is logged (with what and why) and counted, in the core and in the kernel.
    let logged = wait_until(Duration::from_secs(5), || {
        d.log("connector").matches("refused").count() >= refused_before + 3
    });
    let log = d.log("connector");
    assert!(logged.is_some(), "refusals not logged:\n{log}");
    assert!(
        log.contains("udp 100.118.0.2 -> 10.20.0.10:7")
            && log.contains("outside the connector's allowlist"),
        "{log}"
    );
    assert!(log.contains("build.dev.corp.example"), "{log}");
    let (_, m, _) = d.sh("site", "curl -s http://127.0.0.1:9465/metrics");
    let not_allowed = metric(&m, "sekisho_connector_dropped_packets", "not_allowed");
    let names = metric(&m, "sekisho_connector_refused_names", "");
    println!("connector refusals: packets {not_allowed}, names {names}");
    assert!(not_allowed >= 4, "{m}");
    assert!(names >= 1, "{m}");
    let to_host = d
        .sh(
            "site",
            "nft -j list counter inet sekisho_sekisho_c0 to_host",
        )
        .1;
    assert!(
        to_host.contains("\"packets\"") && !to_host.contains("\"packets\": 0,"),
        "the kernel counted no packet to the connector host: {to_host}"
    );

    // The kernel's copy of the list, and forwarding per interface, never host-wide.
    let (_, sets, _) = d.sh("site", "nft list set inet sekisho_sekisho_c0 allow_ports4");
    assert!(
        sets.contains("10.20.0.0/24 . 80") && sets.contains("10.20.0.0/24 . 9000"),
        "{sets}"
    );
    let sysctl = |key: &str| {
        d.sh("site", &format!("cat /proc/sys/net/ipv4/{key}"))
            .1
            .trim()
            .to_string()
    };
    assert_eq!(
        sysctl("ip_forward"),
        "0",
        "host-wide forwarding was turned on"
    );
    assert_eq!(sysctl("conf/sekisho-c0/forwarding"), "1");
    assert_eq!(sysctl("conf/priv0/forwarding"), "1");
    assert_eq!(sysctl("conf/eth0/forwarding"), "0");
}
