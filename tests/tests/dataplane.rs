//! The data path under the shapes users create: several downloads at once, and a lossy link
//! between connector and broker. What a user would see: the bytes arrive whole, and afterwards
//! full-size packets still cross (no path MTU black hole), with the counters explaining what
//! was lost on the way.

use std::time::{Duration, Instant};

use sekisho_tests::Deployment;

const APP: &str = "10.20.0.10";
/// The largest ICMP payload of a full 1,360-byte overlay packet (IPv4 + ICMP headers: 28).
const FULL_PING: u32 = 1332;

/// A file of `mb` random megabytes on the app host; returns its SHA-256.
fn random_file(d: &Deployment, name: &str, mb: usize) -> String {
    let path = d.state().join("www").join(name);
    let mut data = vec![0u8; mb << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ mb as u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&path, &data).unwrap();
    sha256(&path)
}

fn sha256(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Downloads `name` `n` times at once from the laptop; returns each download's SHA-256 and
/// the seconds they took together.
fn parallel_downloads(d: &Deployment, name: &str, n: usize, timeout: u32) -> (Vec<String>, f64) {
    let dir = d.state().join("downloads");
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        "for i in $(seq {n}); do (curl -sS -m {timeout} http://{APP}/{name} | sha256sum > {dir}/$i.sum) & done; wait",
        dir = dir.display()
    );
    let t0 = Instant::now();
    let (ok, _, err) = d.sh("laptop", &script);
    let secs = t0.elapsed().as_secs_f64();
    assert!(ok, "downloads: {err}");
    let sums = (1..=n)
        .map(|i| {
            std::fs::read_to_string(dir.join(format!("{i}.sum")))
                .unwrap_or_default()
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    (sums, secs)
}

/// `count` pings of `size` bytes with "don't fragment": how many came back.
fn full_size_pings(d: &Deployment, size: u32, count: u32) -> u32 {
    let (_, out, _) = d.sh(
        "laptop",
        &format!("ping -c {count} -i 0.2 -W 2 -s {size} -M do {APP}"),
    );
    out.lines()
        .find_map(|l| {
            let l = l.trim();
            let rest = l.split(" packets transmitted, ").nth(1)?;
            rest.split(' ').next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// The broker's drop counters that are not zero, and the kernel's.
fn drops(d: &Deployment) -> String {
    let s = d.stats();
    let mut out: Vec<String> = s["counters"]["drops"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect()
        })
        .unwrap_or_default();
    out.push(format!("kernel={}", s["kernel"]));
    out.join(" ")
}

/// The connector's metrics (it serves them on its host's loopback).
fn connector_metric(d: &Deployment, name: &str) -> Vec<String> {
    let (_, text, _) = d.sh("site", "curl -s http://127.0.0.1:9465/metrics");
    text.lines()
        .filter(|l| l.starts_with(name))
        .map(str::to_string)
        .collect()
}

#[test]
fn four_parallel_downloads_complete_and_full_size_packets_still_cross() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    let want = random_file(&d, "20mb.bin", 20);
    assert_eq!(
        full_size_pings(&d, FULL_PING, 3),
        3,
        "full-size ping before"
    );
    let (sums, secs) = parallel_downloads(&d, "20mb.bin", 4, 120);
    println!(
        "four parallel 20 MB downloads: {secs:.2} s, {:.0} Mbit/s together",
        4.0 * 20.0 * 8.388_608 / secs
    );
    println!("broker drops: {}", drops(&d));
    for (i, s) in sums.iter().enumerate() {
        assert_eq!(s, &want, "download {} checksum", i + 1);
    }
    // No black hole afterwards: a full overlay packet crosses, and so does a full download.
    assert_eq!(
        full_size_pings(&d, FULL_PING, 3),
        3,
        "a {FULL_PING}-byte ping after the parallel downloads"
    );
    let (sums, _) = parallel_downloads(&d, "20mb.bin", 1, 60);
    assert_eq!(sums[0], want, "a full download afterwards");
    for link in connector_metric(&d, "sekisho_connector_link_max_datagram_bytes") {
        println!("{link}");
        let max: f64 = link.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            max >= 1360.0,
            "the link carries a full overlay packet: {link}"
        );
    }
}

#[test]
fn bulk_traffic_recovers_from_a_lossy_link_between_connector_and_broker() {
    let Some(d) = Deployment::for_test_with(&[("SK_LINK_RELAY", "2 0")]) else {
        return;
    };
    let want = random_file(&d, "8mb.bin", 8);
    let loss_file = d.state().join("link-loss");
    // A lossy period: 3 % of the datagrams in each direction between connector and broker.
    std::fs::write(&loss_file, "0.03").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (sums, secs) = parallel_downloads(&d, "8mb.bin", 2, 240);
    println!("two 8 MB downloads through a link losing 3 %: {secs:.2} s");
    assert_eq!(
        sums,
        vec![want.clone(), want.clone()],
        "checksums under loss"
    );
    println!("broker drops after random loss: {}", drops(&d));
    // Then a path that drops every large datagram for a while (small ones pass): what makes
    // QUIC's black-hole detection shrink the link. A download is under way meanwhile.
    let dl = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &d.ns("laptop"),
            "curl",
            "-sS",
            "-m",
            "60",
            "-o",
            "/dev/null",
        ])
        .arg(format!("http://{APP}/8mb.bin"))
        .spawn()
        .expect("curl");
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&loss_file, "1 above 1200").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    for link in connector_metric(&d, "sekisho_connector_link_max_datagram_bytes") {
        println!("while large datagrams are lost: {link}");
    }
    // The lossy period ends: full-size packets pass at once and bulk traffic is back.
    std::fs::write(&loss_file, "0").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut dl = dl;
    let status = dl.wait().unwrap();
    println!("the download across the black-hole period: {status}");
    assert_eq!(
        full_size_pings(&d, FULL_PING, 5),
        5,
        "{FULL_PING}-byte pings after the lossy period"
    );
    let (sums, secs) = parallel_downloads(&d, "8mb.bin", 1, 60);
    println!("one 8 MB download after the lossy period: {secs:.2} s");
    assert_eq!(sums[0], want, "a full download after the lossy period");
    let relay = d.log("link-relay");
    println!(
        "relay: {}",
        relay
            .lines()
            .rev()
            .find(|l| l.contains("mappings="))
            .unwrap_or("")
    );
    for link in connector_metric(&d, "sekisho_connector_link_max_datagram_bytes") {
        println!("{link}");
        let max: f64 = link.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            max >= 1360.0,
            "the link still carries a full overlay packet: {link}"
        );
    }
    let links = d.stats()["connectors"].clone();
    assert!(
        links.as_array().is_some_and(|l| !l.is_empty()),
        "the connector stays linked: {links}"
    );
}
