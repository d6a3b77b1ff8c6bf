//! Trust boundaries, end to end: each component distrusts the others. The connector forwards
//! only inside its own allowlist, whatever a broker's policy grants.

use std::time::Duration;

use sekisho_tests::{Deployment, tcp_probe, udp_probe, wait_until};

const APP: &str = "10.20.0.10";

/// The demo policy plus rules that grant alice's group everything a broker could: all of
/// 10.0.0.0/8 (which covers the broker's own address 10.99.2.2: the client routes it without
/// that address, or its tunnel would loop into itself), every protocol, and every name under
/// corp.example.
fn grant_everything(d: &Deployment) -> std::path::PathBuf {
    let text = std::fs::read_to_string(d.state().join("policy.toml")).unwrap();
    let text = format!(
        "{text}\n[[applications]]\nname = \"whole-site\"\nsite = \"dc1\"\n\
         addresses = [\"10.0.0.0/8\"]\nprotocols = [\"tcp\", \"udp\", \"icmp\"]\n\
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
    // A clean stop (SIGINT: no drain) turns the forwarding it turned on off again.
    d.signal("connector", 2);
    let off = wait_until(Duration::from_secs(10), || {
        sysctl("conf/priv0/forwarding") == "0"
    });
    assert!(off.is_some(), "forwarding left on after stop");
}

/// alice's client status.
fn status(d: &Deployment) -> serde_json::Value {
    d.client_status("alice")
}

/// A full tunnel whose firewall cannot be installed (nftables refuses the kill switch's
/// table here) never leaves the laptop open: every packet is routed into the tunnel instead,
/// the client says why, and with every broker down nothing leaves the laptop but towards
/// the broker.
#[test]
fn a_kill_switch_that_cannot_be_installed_never_leaves_the_laptop_open() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    // alice's client again, with an `nft` that refuses the kill switch's table.
    d.daemon("stop", "client-alice");
    let shim = d.state().join("shim");
    std::fs::create_dir_all(&shim).unwrap();
    let real = d.sh("laptop", "command -v nft").1.trim().to_string();
    std::fs::write(
        shim.join("nft"),
        format!(
            "#!/bin/sh\nif [ \"$1\" = -f ]; then\n  script=$(cat)\n  case \"$script\" in\n    \
             *sekisho_client*) echo 'Error: simulated: the kill switch table is refused' >&2; exit 1 ;;\n  \
             esac\n  printf '%s\\n' \"$script\" | exec {real} \"$@\"\nfi\nexec {real} \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        shim.join("nft"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let st = d.state().display().to_string();
    let (ok, _, err) = d.sh(
        "laptop",
        &format!(
            "PATH={}:$PATH setsid {} run --config {st}/alice/client.toml >>{st}/client-alice.log 2>&1 </dev/null & echo $! >{st}/client-alice.pid",
            shim.display(),
            d.bin("sekisho-client").display()
        ),
    );
    assert!(ok, "{err}");
    assert!(
        wait_until(Duration::from_secs(20), || status(&d)["state"]
            == "connected")
        .is_some(),
        "{:#}",
        status(&d)
    );

    // The admin puts alice's group on a full tunnel.
    let path = d.full_tunnel_policy("local_network = \"block\"\n");
    let (ok, out, err) = d.admin(&["policy", "apply", path.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let degraded = wait_until(Duration::from_secs(30), || {
        status(&d)["tunnel"]["kill_switch"] == "routing-only"
    });
    let s = status(&d);
    assert!(degraded.is_some(), "{s:#}");
    assert!(
        s["tunnel"]["kill_switch_error"]
            .as_str()
            .unwrap_or("")
            .contains("simulated"),
        "{s:#}"
    );
    assert!(
        d.log("client-alice").contains("routing-only kill switch"),
        "the client did not say why"
    );
    // The internet goes through the broker, not around it.
    let (_, body, _) = d.sh("laptop", "curl -s -m 5 http://web.public.example/");
    assert!(body.contains("public web server"), "{body}");
    let web = d.log("web");
    let last = web
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("http "))
        .and_then(|r| r.split(' ').next())
        .unwrap_or("");
    assert_eq!(last, "10.99.2.2", "the laptop went around the tunnel");

    // With every broker down, nothing leaves the laptop but towards the broker.
    let (ok, _, err) = d.sh(
        "inet",
        "nft -f - <<'EOF'\ntable bridge kscheck {\n chain check_fwd { type filter hook forward priority 0; \
         iifname \"to-laptop\" ip daddr != 10.99.2.2 counter; }\n chain check_in { type filter hook input \
         priority 0; iifname \"to-laptop\" ip daddr != 10.99.2.2 counter; }\n}\nEOF",
    );
    assert!(ok, "{err}");
    d.daemon("stop", "broker");
    assert!(
        wait_until(Duration::from_secs(10), || status(&d)["state"] == "down").is_some(),
        "{:#}",
        status(&d)
    );
    let leaked = || -> u64 {
        let (_, out, _) = d.sh("inet", "nft list table bridge kscheck");
        out.lines()
            .filter_map(|l| l.split("packets ").nth(1))
            .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    let before = leaked();
    d.sh(
        "laptop",
        "curl -s -m 2 http://203.0.113.80/; curl -s -m 2 http://10.99.1.50/; \
         dig +time=1 +tries=1 @10.99.0.53 www.public.example; ping -c 2 -W 1 10.99.1.1; true",
    );
    assert_eq!(
        leaked(),
        before,
        "packets left the laptop with every broker down"
    );
}

/// Runs `sekisho-client override CODE` on alice's laptop: (succeeded, stderr).
fn use_override(d: &Deployment, code: &str) -> (bool, String) {
    let out = std::process::Command::new(d.bin("sekisho-client"))
        .args(["override", code, "--socket"])
        .arg(d.state().join("alice/client.sock"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An override code: (id, code).
fn issue_override(d: &Deployment, secs: u32) -> (String, String) {
    let (ok, out, err) = d.admin(&[
        "--json",
        "device",
        "override",
        "alice-laptop",
        "--for",
        &format!("{secs}s"),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("override JSON");
    (
        v["id"].as_str().unwrap().to_string(),
        v["code"].as_str().unwrap().to_string(),
    )
}

/// An override code opens a device once: used again (after a client restart closed the
/// device) it is refused; an admin can revoke a code before it is used, and revoking one in
/// use closes the device at its next configuration refresh.
#[test]
fn an_override_code_works_once_and_can_be_revoked() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    let path = d.full_tunnel_policy("");
    let (ok, out, err) = d.admin(&["policy", "apply", path.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let closed = || status(&d)["tunnel"]["kill_switch"] == "closed";
    assert!(wait_until(Duration::from_secs(30), closed).is_some());

    // Used once, the client restarts (the window is gone), the same code is refused.
    let (_, a) = issue_override(&d, 120);
    let (ok, err) = use_override(&d, &a);
    assert!(ok, "{err}");
    assert_eq!(status(&d)["state"], "open");
    // Being used is not being revoked: the window stays open across configuration refreshes.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(
        status(&d)["state"],
        "open",
        "a used override code closed its own window at the next refresh"
    );
    d.daemon("stop", "client-alice");
    d.daemon("start", "client-alice");
    assert!(
        wait_until(Duration::from_secs(30), closed).is_some(),
        "{:#}",
        status(&d)
    );
    let (ok, err) = use_override(&d, &a);
    assert!(!ok, "a used override code opened the device again");
    assert!(
        err.contains("already used") || err.contains("revoked"),
        "{err}"
    );

    // Revoked before use: refused once the device has refreshed its configuration.
    let (b_id, b) = issue_override(&d, 120);
    let (ok, out, err) = d.admin(&["device", "revoke-override", &b_id]);
    assert!(ok, "{out}{err}");
    std::thread::sleep(Duration::from_secs(7)); // one configuration refresh (5 s here)
    let (ok, err) = use_override(&d, &b);
    assert!(!ok, "a revoked override code opened the device");
    assert!(err.contains("revoked"), "{err}");

    // Revoked while in use: the device closes at its next refresh.
    let (c_id, c) = issue_override(&d, 120);
    let (ok, err) = use_override(&d, &c);
    assert!(ok, "{err}");
    assert_eq!(status(&d)["state"], "open");
    let (ok, out, err) = d.admin(&["device", "revoke-override", &c_id]);
    assert!(ok, "{out}{err}");
    let shut = wait_until(Duration::from_secs(20), closed);
    println!("an override revoked in use closed the device after {shut:?}");
    assert!(shut.is_some(), "{:#}", status(&d));
    assert!(d.log("client-alice").contains("override code revoked"));
    let audit = std::fs::read_to_string(d.state().join("audit.jsonl")).unwrap_or_default();
    assert!(audit.contains("override_revoked"), "{audit}");
}
