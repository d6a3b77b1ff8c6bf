//! DNS end to end: the client's stub on alice's and bob's laptops, name-based applications
//! answered by the broker and translated by the connector, DNS filtering with the demo lists,
//! upstream resolution through the "internet" dnsmasq, and the system's DNS setting in the
//! laptop namespace. Queries are made with `dig` and `kdig` as a user would.

use std::time::Duration;

use sekisho_tests::{Deployment, wait_until};

/// `dig` (or kdig) in a laptop namespace through the system's resolver; returns its output.
fn ask(d: &Deployment, host: &str, tool: &str, args: &str) -> String {
    let limits = if tool == "kdig" {
        "+timeout=3 +retry=0"
    } else {
        "+time=3 +tries=1"
    };
    let (_, out, err) = d.sh(host, &format!("{tool} {limits} {args}"));
    format!("{out}{err}")
}

fn status(out: &str) -> &str {
    for s in [
        "NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR", "NOTIMP", "BADVERS",
    ] {
        if out.contains(&format!("status: {s}")) {
            return s;
        }
    }
    "none"
}

fn short(d: &Deployment, host: &str, name: &str) -> Vec<String> {
    ask(d, host, "dig", &format!("+short {name}"))
        .lines()
        .filter(|l| !l.starts_with(";;"))
        .map(str::to_string)
        .collect()
}

fn in_app_range(a: &str) -> bool {
    a.starts_with("100.119.")
}

/// Lines of the client's DNS log (blocked queries).
fn dns_log(d: &Deployment, client: &str) -> Vec<serde_json::Value> {
    d.log(client)
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "dns")
        .collect()
}

#[test]
fn names_filtering_and_upstreams_from_the_laptop() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    // The laptop's system resolver is the stub on alice's overlay address.
    let (_, resolv, _) = d.sh("laptop", "cat /etc/resolv.conf");
    assert!(resolv.contains("nameserver 100.118.0.2"), "{resolv}");

    // An application by name: a synthetic address, the same from dig and kdig, and a web page
    // through the connector (which resolved the real name with the site's DNS).
    let wiki = short(&d, "laptop", "wiki.corp.example");
    assert!(wiki.len() == 1 && in_app_range(&wiki[0]), "{wiki:?}");
    let k = ask(&d, "laptop", "kdig", "wiki.corp.example");
    assert!(k.contains(&wiki[0]) && status(&k) == "NOERROR", "{k}");
    let (ok, body, err) = d.sh("laptop", "curl -sS -m 10 http://wiki.corp.example/");
    assert!(ok && body.contains("Hello"), "wiki: {body}{err}");
    let decided = d.decisions();
    let flow = decided
        .iter()
        .rev()
        .find(|r| r["event"] == "flow" && r["dst"] == wiki[0].as_str())
        .expect("a decision for the wiki flow");
    assert_eq!(flow["application"], "wiki", "{flow}");
    assert_eq!(flow["rule"], "engineering-by-name", "{flow}");
    assert!(
        d.log("connector").contains("name translation installed"),
        "{}",
        d.log("connector")
    );
    // A wildcard application.
    let build = short(&d, "laptop", "build.dev.corp.example");
    assert!(build.len() == 1 && in_app_range(&build[0]), "{build:?}");
    assert_ne!(build, wiki);
    let (ok, body, _) = d.sh("laptop", "curl -sS -m 10 http://build.dev.corp.example/");
    assert!(ok && body.contains("Hello"), "wildcard: {body}");
    // Another port of the same name is not the application: refused at once.
    let (ok, _, _) = d.sh("laptop", "curl -sS -m 5 http://wiki.corp.example:5432/");
    assert!(!ok);

    // payroll is finance's: alice gets NXDOMAIN, exactly as for a name that does not exist;
    // bob gets an address.
    let p = ask(&d, "laptop", "kdig", "payroll.corp.example");
    assert_eq!(status(&p), "NXDOMAIN", "{p}");
    let none = ask(&d, "laptop", "dig", "nothing.corp.example");
    assert_eq!(status(&none), "NXDOMAIN", "{none}");
    let bob = short(&d, "laptop2", "payroll.corp.example");
    assert!(bob.len() == 1 && in_app_range(&bob[0]), "{bob:?}");
    let app_dns: Vec<serde_json::Value> = d
        .decisions()
        .into_iter()
        .filter(|r| r["event"] == "app-dns" && r["name"] == "payroll.corp.example")
        .collect();
    assert!(
        app_dns
            .iter()
            .any(|r| r["user"] == "alice" && r["result"] == "nxdomain"),
        "{app_dns:?}"
    );

    // Filtering: alice's group gets NXDOMAIN for the demo list's entry and its subdomains,
    // bob's group 0.0.0.0; each block is logged with the list and the entry that matched.
    for name in ["blocked.example", "www.blocked.example"] {
        let a = ask(&d, "laptop", "dig", name);
        assert_eq!(status(&a), "NXDOMAIN", "{name}: {a}");
    }
    assert_eq!(short(&d, "laptop2", "blocked.example"), ["0.0.0.0"]);
    let k6 = ask(&d, "laptop2", "kdig", "AAAA blocked.example");
    assert!(k6.contains("::"), "{k6}");
    // The adblock-format list (a real scam list) blocks too.
    let scam = ask(&d, "laptop", "kdig", "0-google.com");
    assert_eq!(status(&scam), "NXDOMAIN", "{scam}");
    let logged = wait_until(Duration::from_secs(5), || {
        let log = dns_log(&d, "client-alice");
        log.iter().any(|l| {
            l["name"] == "www.blocked.example"
                && l["list"] == "demo"
                && l["entry"] == "blocked.example"
        }) && log
            .iter()
            .any(|l| l["name"] == "0-google.com" && l["list"] == "scam" && l["category"] == "scam")
    });
    assert!(logged.is_some(), "{:?}", dns_log(&d, "client-alice"));
    // On a list but allowlisted: resolves. A public name resolves through the upstream.
    assert_eq!(short(&d, "laptop", "partner.example"), ["10.99.5.80"]);
    assert_eq!(short(&d, "laptop", "www.public.example"), ["10.99.5.80"]);
    let k = ask(&d, "laptop", "kdig", "www.public.example");
    assert!(k.contains("10.99.5.80"), "{k}");
    // Not on any list: the upstream's NXDOMAIN comes through, and nothing is logged as blocked.
    let gone = ask(&d, "laptop", "dig", "google.com");
    assert_eq!(status(&gone), "NXDOMAIN", "{gone}");
    assert!(
        !dns_log(&d, "client-alice")
            .iter()
            .any(|l| l["name"] == "google.com")
    );

    // A large answer (100 addresses): truncated over UDP, whole over TCP.
    let big = ask(&d, "laptop", "dig", "big.public.example");
    assert!(big.contains("Truncated, retrying in TCP mode"), "{big}");
    assert!(big.contains("ANSWER: 100"), "{big}");
    let big_tcp = ask(&d, "laptop", "kdig", "+tcp big.public.example");
    assert!(
        big_tcp.contains("ANSWER: 100") && big_tcp.contains("(TCP)"),
        "{big_tcp}"
    );

    // Malformed, truncated and oversized queries: FORMERR or silence, and the stub keeps
    // answering correct queries.
    let report = d.py(
        "laptop",
        r#"
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
def send(b):
    s.sendto(b, ("100.118.0.2", 53))
    try: return s.recv(4096)
    except socket.timeout: return None
q = bytes.fromhex("abcd01000001000000000000") + b"\x03www\x06public\x07example\x00\x00\x01\x00\x01"
out = []
r = send(q[:15]); out.append("trunc:" + ("none" if r is None else str(r[3] & 15) + ":" + r[:2].hex()))
r = send(b"\x01\x02\x03"); out.append("tiny:" + ("none" if r is None else "answer"))
r = send(bytes(range(256)) * 12); out.append("garbage:" + ("none" if r is None else str(r[3] & 15)))
r = send(q[:12] + b"\x3f" + b"a" * 63 + b"\xff" * 200); out.append("labels:" + ("none" if r is None else str(r[3] & 15)))
r = send(bytes([0xab, 0xcd, 0x81, 0x80]) + q[4:]); out.append("response:" + ("none" if r is None else "answer"))
t = socket.create_connection(("100.118.0.2", 53), 2); t.settimeout(2)
t.sendall(struct.pack(">H", 65535) + b"x" * 100); t.close()
r = send(q); out.append("good:" + ("none" if r is None else str(r[3] & 15) + ":" + str(struct.unpack(">H", r[6:8])[0])))
print(" ".join(out))
"#,
    );
    assert!(
        report.contains("trunc:1:abcd"),
        "FORMERR with the query's ID: {report}"
    );
    assert!(report.contains("tiny:none"), "{report}");
    assert!(
        report.contains("response:none"),
        "a response is never answered: {report}"
    );
    assert!(
        report.contains("good:0:1"),
        "a correct query still answered: {report}"
    );
    assert_eq!(short(&d, "laptop", "www.public.example"), ["10.99.5.80"]);

    // DNS conformance as resolvers check it: an EDNS version the stub does not speak gets
    // BADVERS (and an OPT of version 0); the question's letter case comes back as asked, in
    // the question and in the answers (0x20 randomisation), for an application name and for
    // a public one; ANY gets NOTIMP with the question echoed.
    let out = ask(
        &d,
        "laptop",
        "dig",
        "+edns=1 +noednsnegotiation www.public.example",
    );
    assert!(out.contains("status: BADVERS"), "{out}");
    assert!(out.contains("EDNS: version: 0"), "{out}");
    for name in ["WiKi.CoRp.ExAmPlE", "wWw.PuBlIc.ExAmPlE"] {
        let out = ask(
            &d,
            "laptop",
            "dig",
            &format!("+noall +question +answer {name}"),
        );
        assert!(out.contains(&format!(";{name}.")), "question case: {out}");
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{name}."))),
            "answer case for {name}: {out}"
        );
    }
    let out = ask(&d, "laptop", "dig", "ANY ExAmPlE.org");
    assert!(
        out.contains("status: NOTIMP") && out.contains(";ExAmPlE.org."),
        "{out}"
    );
}

#[test]
fn lists_refresh_without_a_gap_and_the_system_setting_comes_back() {
    let Some(d) = Deployment::for_test_with(&[("SK_DNS_REFRESH", "1s")]) else {
        return;
    };
    assert_eq!(short(&d, "laptop", "later.example"), ["10.99.5.80"]);
    // The admin adds a domain to a list on the broker; while clients pick it up (and build a
    // new filter), resolution goes on: a public name is asked between every check.
    let list = d.state().join("lists/demo.domains");
    let mut text = std::fs::read_to_string(&list).unwrap();
    text.push_str("later.example\n");
    std::fs::write(&list, text).unwrap();
    let mut asked = 0;
    let mut misses = 0;
    let took = wait_until(Duration::from_secs(20), || {
        asked += 1;
        if short(&d, "laptop", "www.public.example") != ["10.99.5.80"] {
            misses += 1;
        }
        status(&ask(&d, "laptop", "dig", "later.example")) == "NXDOMAIN"
    })
    .expect("the new list entry reaches the laptop");
    println!(
        "list change blocked on the laptop after {:.2} s; {misses} of {asked} queries in between failed",
        took.as_secs_f64()
    );
    assert_eq!(misses, 0);
    let log = dns_log(&d, "client-alice");
    assert!(
        log.iter()
            .any(|l| l["name"] == "later.example" && l["entry"] == "later.example"),
        "{log:?}"
    );

    // The system's DNS setting in the laptop namespace: restored on a normal stop...
    let resolv = std::path::PathBuf::from(format!("/etc/netns/{}/resolv.conf", d.ns("laptop")));
    let original = "nameserver 10.99.0.53\n";
    let ours = std::fs::read_to_string(&resolv).unwrap();
    assert!(ours.contains("nameserver 100.118.0.2"), "{ours}");
    d.daemon("stop", "client-alice");
    assert_eq!(std::fs::read_to_string(&resolv).unwrap(), original);
    // ... and after kill -9, on the next start.
    d.daemon("start", "client-alice");
    assert!(
        wait_until(Duration::from_secs(15), || {
            std::fs::read_to_string(&resolv)
                .unwrap_or_default()
                .contains("100.118.0.2")
        })
        .is_some()
    );
    d.daemon("kill", "client-alice");
    let left = std::fs::read_to_string(&resolv).unwrap();
    assert!(
        left.contains("100.118.0.2"),
        "a killed client cannot restore: {left}"
    );
    d.daemon("start", "client-alice");
    assert!(
        wait_until(Duration::from_secs(15), || d
            .log("client-alice")
            .contains("the last run did not restore the DNS setting"))
        .is_some(),
        "{}",
        d.log("client-alice")
    );
    d.daemon("stop", "client-alice");
    assert_eq!(std::fs::read_to_string(&resolv).unwrap(), original);
}

/// An unbound server with DNS over TLS (853) and DNS over HTTPS (443) in a namespace of its
/// own, with a certificate from a throwaway CA; removed on drop.
struct Encrypted {
    ns: String,
    dir: std::path::PathBuf,
    unbound: Option<std::process::Child>,
}

impl Drop for Encrypted {
    fn drop(&mut self) {
        if let Some(mut c) = self.unbound.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn dot_and_doh_upstreams_are_checked_against_their_ca() {
    use std::process::{Command, Stdio};
    if sekisho_tests::skip_netns() {
        return;
    }
    let bin = sekisho_tests::binaries();
    let tag = sekisho_tests::unique_tag();
    let mut e = Encrypted {
        ns: format!("{tag}dot"),
        dir: std::env::temp_dir().join(format!("sekisho-{tag}-dot")),
        unbound: None,
    };
    std::fs::create_dir_all(&e.dir).unwrap();
    let run = |args: &[&str]| {
        let ok = Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap()
            .success();
        assert!(ok, "{args:?}");
    };
    run(&["ip", "netns", "add", &e.ns]);
    run(&["ip", "-n", &e.ns, "link", "set", "lo", "up"]);
    run(&[
        "ip",
        "-n",
        &e.ns,
        "addr",
        "add",
        "10.53.9.2/32",
        "dev",
        "lo",
    ]);
    let pki = e.dir.join("pki");
    let pki_s = pki.to_str().unwrap();
    run(&[
        bin.join("sekisho-broker").to_str().unwrap(),
        "pki",
        "init",
        "--dir",
        pki_s,
        "--name",
        "dot.test",
        "--name",
        "10.53.9.2",
    ]);
    // Another CA: a server it did not sign must not be trusted.
    let other = e.dir.join("other");
    run(&[
        bin.join("sekisho-broker").to_str().unwrap(),
        "pki",
        "init",
        "--dir",
        other.to_str().unwrap(),
        "--name",
        "dot.test",
    ]);
    let conf = e.dir.join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  interface: 10.53.9.2@853\n  interface: 10.53.9.2@443\n  tls-port: 853\n  \
             https-port: 443\n  tls-service-key: \"{pki_s}/broker.key\"\n  tls-service-pem: \
             \"{pki_s}/broker.pem\"\n  username: \"\"\n  chroot: \"\"\n  use-syslog: no\n  \
             logfile: \"\"\n  pidfile: \"\"\n  directory: \"{}\"\n  access-control: 0.0.0.0/0 \
             allow\n  local-zone: \"test.\" static\n  local-data: \"www.test. A 10.1.2.3\"\n",
            e.dir.display()
        ),
    )
    .unwrap();
    let unbound = Command::new("ip")
        .args([
            "netns",
            "exec",
            &e.ns,
            "unbound",
            "-d",
            "-c",
            conf.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unbound (Debian package unbound)");
    e.unbound = Some(unbound);
    let query = |e: &Encrypted| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &e.ns,
                "dig",
                "+time=3",
                "+tries=1",
                "-p",
                "5353",
                "@127.0.0.1",
                "www.test",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (upstream, ca, want) in [
        ("tls://10.53.9.2#dot.test", &pki, "10.1.2.3"),
        ("https://10.53.9.2/dns-query#dot.test", &pki, "10.1.2.3"),
        ("tls://10.53.9.2#dot.test", &other, "SERVFAIL"),
        ("https://10.53.9.2/dns-query#dot.test", &other, "SERVFAIL"),
    ] {
        let ca_file = ca.join("ca.pem");
        let mut stub = Command::new("ip")
            .args(["netns", "exec", &e.ns])
            .arg(bin.join("sekisho-client"))
            .args([
                "stub",
                "--listen",
                "127.0.0.1:5353",
                "--upstream",
                upstream,
                "--upstream-ca",
            ])
            .arg(&ca_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut answer = String::new();
        let got = wait_until(Duration::from_secs(10), || {
            answer = query(&e);
            answer.contains(want)
        });
        unsafe { libc::kill(stub.id() as i32, libc::SIGTERM) };
        let _ = stub.wait();
        assert!(
            got.is_some(),
            "{upstream} with {}: want {want}, got {answer}",
            ca_file.display()
        );
    }
}
