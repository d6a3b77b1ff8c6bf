//! What a new flow costs the broker: checking the device's posture token, evaluating the policy
//! (a large one: 10,000 rules over 1,000 applications) and looking the flow up in a table that
//! already holds 1,000,000 flows.
//!
//! Run: `cargo bench -p sekisho-proto --bench per_flow`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use sekisho_proto::flow::{FlowEntry, FlowTable, IdleTimeouts};
use sekisho_proto::keys::PublicKeyBytes;
use sekisho_proto::packet::{FlowKey, PROTO_TCP, PROTO_UDP};
use sekisho_proto::policy::{Action, Facts, Policy, Reason};
use sekisho_proto::posture::{PostureClaims, TokenSigner, TokenVerifier};
use sekisho_proto::risk::Level;

const GROUPS: usize = 100;
const USERS: usize = 100;
const APPS: usize = 1_000;
const RULES: usize = 10_000;
/// The application only the last rule allows: the worst case for an allowed flow.
const TARGET_APP: usize = APPS - 1;
const NOW: u64 = 1_700_000_000;

/// A device key made of one repeated byte (any 32 bytes are a valid WireGuard public key).
fn device_key(i: usize) -> PublicKeyBytes {
    PublicKeyBytes([i as u8 + 1; 32])
}

/// Application `i`'s address: even ones are /24s in 10.0-3.x, odd ones /32s in 10.100-103.x.
fn app_address(i: usize) -> String {
    if i.is_multiple_of(2) {
        format!("10.{}.{}.0/24", i / 256, i % 256)
    } else {
        format!("10.{}.{}.10", 100 + i / 256, i % 256)
    }
}

/// The policy as an admin would write it.
fn policy_text() -> String {
    let mut t = String::with_capacity(2 << 20);
    for g in 0..GROUPS {
        writeln!(t, "[[groups]]\nname = \"g{g:03}\"").unwrap();
    }
    // Each user is in two groups.
    for u in 0..USERS {
        writeln!(
            t,
            "[[users]]\nname = \"u{u:03}\"\ngroups = [\"g{u:03}\", \"g{:03}\"]",
            (u + 7) % GROUPS
        )
        .unwrap();
    }
    for u in 0..USERS {
        writeln!(
            t,
            "[[devices]]\nname = \"d{u:03}\"\nuser = \"u{u:03}\"\npublic_key = \"{}\"\naddress = \"100.118.1.{}\"",
            device_key(u),
            u + 1
        )
        .unwrap();
    }
    t.push_str("[[sites]]\nname = \"dc1\"\n[[sites]]\nname = \"dc2\"\n");
    for a in 0..APPS {
        let protocols = match a % 3 {
            0 => "[\"tcp\"]",
            1 => "[\"tcp\", \"udp\"]",
            _ => "[\"udp\", \"icmp\"]",
        };
        writeln!(
            t,
            "[[applications]]\nname = \"app{a:04}\"\nsite = \"dc{}\"\naddresses = [\"{}\"]\nprotocols = {protocols}\nports = [443, \"8000-8100\"]\nsensitivity = {}",
            a % 2 + 1,
            app_address(a),
            if a == TARGET_APP { 3 } else { a % 3 + 1 }
        )
        .unwrap();
    }
    // Rules 0..RULES-1: every 10th a deny, the others allows; half name groups, half users; each
    // names three applications, never the target one. The last rule allows the target.
    for r in 0..RULES - 1 {
        let action = if r % 10 == 9 { "deny" } else { "allow" };
        let subject = if r.is_multiple_of(2) {
            format!(
                "groups = [\"g{:03}\", \"g{:03}\"]",
                r % GROUPS,
                (r / 2) % GROUPS
            )
        } else {
            format!("users = [\"u{:03}\"]", (r / 3) % USERS)
        };
        let apps: Vec<String> = (0..3)
            .map(|j| format!("\"app{:04}\"", (r * 7 + j * 331) % (APPS - 1)))
            .collect();
        writeln!(
            t,
            "[[rules]]\nname = \"r{r:05}\"\naction = \"{action}\"\n{subject}\napplications = [{}]",
            apps.join(", ")
        )
        .unwrap();
    }
    writeln!(
        t,
        "[[rules]]\nname = \"r{:05}\"\naction = \"allow\"\ngroups = [\"g000\"]\napplications = [\"app{TARGET_APP:04}\"]",
        RULES - 1
    )
    .unwrap();
    t.push_str(
        r#"
[[posture_checks]]
name = "client"
kind = "min_client_version"
version = "0.1"
[[posture_checks]]
name = "disk"
kind = "disk_encryption"
[[posture_checks]]
name = "firewall"
kind = "firewall_active"
[[posture_checks]]
name = "edr"
kind = "process_running"
process = "edr-agent"

[sensitivity]
level1 = ["client"]
level2 = ["client", "disk"]
level3 = ["client", "disk", "firewall", "edr"]
"#,
    );
    t
}

/// Device 0's claims: user u000, every check passing.
fn claims() -> PostureClaims {
    PostureClaims {
        device: "d000".into(),
        device_key: device_key(0).to_string(),
        user: "u000".into(),
        groups: vec!["g000".into(), "g007".into()],
        checks: ["client", "disk", "firewall", "edr"]
            .iter()
            .map(|c| (c.to_string(), true))
            .collect(),
        iat: NOW,
        exp: NOW + 300,
        kid: String::new(),
        auth_time: None,
    }
}

fn tcp_from_device0(dst: IpAddr, dport: u16) -> FlowKey {
    FlowKey {
        proto: PROTO_TCP,
        src: IpAddr::from([100, 118, 1, 1]),
        dst,
        sport: 40000,
        dport,
    }
}

fn posture_token_verify(c: &mut Criterion) {
    let signer = TokenSigner::from_seed([7; 32]);
    let verifier = TokenVerifier::from_signer(&signer);
    let key = device_key(0);
    let token = signer.issue(claims());
    assert!(verifier.verify(&token, NOW + 10, &key).is_ok());
    c.bench_function("posture_token_verify", |b| {
        b.iter(|| {
            verifier
                .verify(black_box(&token), black_box(NOW + 10), black_box(&key))
                .unwrap()
        })
    });
}

fn policy_evaluate(c: &mut Criterion) {
    let text = policy_text();
    let started = Instant::now();
    let policy = Policy::parse(Path::new("bench.toml"), &text).expect("generated policy parses");
    eprintln!(
        "policy: {} KiB of TOML, {} rules, {} applications, parsed in {:?}",
        text.len() / 1024,
        policy.rules.len(),
        policy.applications.len(),
        started.elapsed()
    );
    let device = policy.device_by_key(&device_key(0)).unwrap();
    let claims = claims();
    // The target application is a /32 on TCP with sensitivity 3 (all four checks).
    let target: IpAddr = app_address(TARGET_APP).parse().unwrap();
    let allowed = tcp_from_device0(target, 443);
    let unmatched = tcp_from_device0(IpAddr::from([10, 250, 0, 1]), 443);

    let d = policy.evaluate(device, &allowed, &Facts::new(Some(&claims), 0));
    assert_eq!(
        (d.action, d.reason),
        (Action::Allow, Reason::Rule(RULES as u32 - 1))
    );
    assert_eq!(policy.required_checks(d.application.unwrap()).len(), 4);
    let d = policy.evaluate(device, &unmatched, &Facts::new(Some(&claims), 0));
    assert_eq!((d.action, d.reason), (Action::Deny, Reason::DefaultDeny));

    let mut g = c.benchmark_group("policy_evaluate_10k_rules_1k_apps");
    g.bench_function("allow_by_last_rule", |b| {
        b.iter(|| {
            policy.evaluate(
                black_box(device),
                black_box(&allowed),
                black_box(&Facts::new(Some(&claims), 0)),
            )
        })
    });
    g.bench_function("default_deny", |b| {
        b.iter(|| {
            policy.evaluate(
                black_box(device),
                black_box(&unmatched),
                black_box(&Facts::new(Some(&claims), 0)),
            )
        })
    });
    // The risk engine's part of a decision: the device's level (a field of its peer) against
    // the application's grade. With `log` at high risk the allowed flow takes the whole path.
    let graded = Policy::parse(
        Path::new("bench.toml"),
        &format!("{text}\n[risk]\nlevel3 = {{ max = \"low\", above = \"log\" }}\n"),
    )
    .expect("graded policy parses");
    let high = Facts::new(Some(&claims), 0).at_risk(Level::High);
    let d = graded.evaluate(device, &allowed, &high);
    assert!(d.allowed() && d.risk_logged, "{d:?}");
    g.bench_function("allow_by_last_rule_at_high_risk_logged", |b| {
        b.iter(|| graded.evaluate(black_box(device), black_box(&allowed), black_box(&high)))
    });
    // The straightforward evaluation (every rule in order), for comparison.
    let user = policy.device(device).user;
    g.bench_function("allow_by_last_rule_scan", |b| {
        b.iter(|| {
            policy.decide_scan(
                black_box(user),
                black_box(&allowed),
                black_box(&Facts::new(Some(&claims), 0)),
                None,
            )
        })
    });
    g.finish();
    decision_percentiles(&policy, &claims);

    let signer = TokenSigner::from_seed([7; 32]);
    let verifier = TokenVerifier::from_signer(&signer);
    let key = device_key(0);
    let token = signer.issue(claims.clone());
    c.bench_function("new_flow_verify_plus_evaluate", |b| {
        b.iter(|| {
            let claims = verifier
                .verify(black_box(&token), black_box(NOW + 10), black_box(&key))
                .unwrap();
            policy.evaluate(
                black_box(device),
                black_box(&allowed),
                &Facts::new(Some(&claims), 0),
            )
        })
    });
}

/// p50 and p99 of single decisions over a mix of flows (every device, destinations spread over
/// the applications and beyond, ports that match and ports that do not), compiled and
/// straightforward, each decision timed on its own.
fn decision_percentiles(policy: &Policy, claims: &PostureClaims) {
    let mut flows = Vec::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let device = (x % USERS as u64) as u32;
        let app = ((x >> 8) % (APPS as u64 + 50)) as usize;
        let dst: IpAddr = if app < APPS {
            let net = app_address(app);
            let base: IpAddr = net.split('/').next().unwrap().parse().unwrap();
            match base {
                IpAddr::V4(v) if net.ends_with("/24") => {
                    IpAddr::from((u32::from(v) + 1 + (x >> 20) as u32 % 250).to_be_bytes())
                }
                other => other,
            }
        } else {
            IpAddr::from([10, 250, (x >> 16) as u8, (x >> 24) as u8])
        };
        let dport = [443, 8050, 22, 80][((x >> 32) % 4) as usize];
        let mut key = tcp_from_device0(dst, dport);
        key.src = IpAddr::from([100, 118, 1, device as u8 + 1]);
        flows.push((device, key));
    }
    let time = |f: &dyn Fn(u32, &FlowKey) -> Action| -> (f64, f64, usize) {
        let mut ns: Vec<u128> = Vec::with_capacity(flows.len());
        let mut allowed = 0;
        for (device, key) in &flows {
            let t = Instant::now();
            let a = f(*device, key);
            ns.push(t.elapsed().as_nanos());
            allowed += usize::from(a == Action::Allow);
        }
        ns.sort_unstable();
        let pct = |p: f64| ns[((ns.len() as f64 * p) as usize).min(ns.len() - 1)] as f64 / 1000.0;
        (pct(0.5), pct(0.99), allowed)
    };
    let compiled = time(&|d, k| policy.evaluate(d, k, &Facts::new(Some(claims), 0)).action);
    let scan = time(&|d, k| {
        let u = policy.device(d).user;
        policy
            .decide_scan(u, k, &Facts::new(Some(claims), 0), None)
            .action
    });
    assert_eq!(compiled.2, scan.2, "both allow the same flows");
    eprintln!(
        "decision of a new flow, {} mixed flows ({} allowed), 10,000 rules / 1,000 applications:\n  \
         compiled  p50 {:.2} us  p99 {:.2} us\n  scan      p50 {:.2} us  p99 {:.2} us",
        flows.len(),
        compiled.2,
        compiled.0,
        compiled.1,
        scan.0,
        scan.1
    );
}

/// A cached decision, as the broker keeps one per flow.
struct Cached {
    allowed: bool,
    owner: u32,
}

impl FlowEntry for Cached {
    fn allowed(&self) -> bool {
        self.allowed
    }
    fn owner(&self) -> u32 {
        self.owner
    }
}

const FLOWS: u32 = 1_000_000;
const OWNERS: u32 = 1_000;

/// Flow `i`: owner i % 1000 (one device address each), a UDP or TCP flow to one of 256 hosts.
fn flow_key(i: u32) -> FlowKey {
    let owner = i % OWNERS;
    let n = i / OWNERS;
    FlowKey {
        proto: if n.is_multiple_of(2) {
            PROTO_TCP
        } else {
            PROTO_UDP
        },
        src: IpAddr::from([100, 118, (owner / 250) as u8 + 1, (owner % 250) as u8 + 2]),
        dst: IpAddr::from([10, 20, 0, (n % 256) as u8]),
        sport: 10_000 + n as u16,
        dport: 443,
    }
}

fn flow_table_lookup(c: &mut Criterion) {
    let t0 = Instant::now();
    let mut table = FlowTable::new(IdleTimeouts::default(), 2 * FLOWS as usize, FLOWS as usize);
    for i in 0..FLOWS {
        table
            .insert(
                flow_key(i),
                Cached {
                    allowed: i % 16 != 0,
                    owner: i % OWNERS,
                },
                t0,
            )
            .unwrap();
    }
    assert_eq!(table.len(), FLOWS as usize);
    eprintln!("flow table: {FLOWS} flows inserted in {:?}", t0.elapsed());

    let now = t0;
    let existing = flow_key(FLOWS / 2 + 1);
    // Keys spread over the table (a multiplicative stride), so lookups are not all cache-hot.
    let spread: Vec<FlowKey> = (0..4096u32)
        .map(|j| flow_key(j.wrapping_mul(2_654_435_761) % FLOWS))
        .collect();
    let mut missing = existing;
    missing.dport = 444;
    assert!(table.touch(&existing, now).is_some());
    assert!(spread.iter().all(|k| table.touch(k, now).is_some()));
    assert!(table.touch(&missing, now).is_none());

    let mut g = c.benchmark_group("flow_table_lookup_1m");
    g.bench_function("hit", |b| {
        b.iter(|| table.touch(black_box(&existing), now).is_some())
    });
    let mut j = 0;
    g.bench_function("hit_spread", |b| {
        b.iter(|| {
            j = (j + 1) % spread.len();
            table.touch(black_box(&spread[j]), now).is_some()
        })
    });
    g.bench_function("miss", |b| {
        b.iter(|| table.touch(black_box(&missing), now).is_some())
    });
    // A device at its cap: refused in constant time.
    let mut capped = FlowTable::new(IdleTimeouts::default(), 2 * FLOWS as usize, 1000);
    for i in 0..1000u32 {
        capped
            .insert(
                flow_key(i * OWNERS),
                Cached {
                    allowed: true,
                    owner: 0,
                },
                now,
            )
            .unwrap();
    }
    let over = flow_key(1000 * OWNERS);
    g.bench_function("refused_at_device_cap", |b| {
        b.iter(|| capped.room_for(black_box(&over), 0, now).is_err())
    });
    g.finish();
    // Expiry: a second's slot of the wheel, and the whole million going idle at once.
    let t1 = Instant::now();
    let gone = table.expire(now + std::time::Duration::from_secs(1));
    eprintln!(
        "flow table: expiry of a second with nothing due: {:?} ({gone} gone)",
        t1.elapsed()
    );
    let t1 = Instant::now();
    let gone = table.expire(now + std::time::Duration::from_secs(4000));
    eprintln!(
        "flow table: {gone} flows idle at once, expired in {:?} ({} left)",
        t1.elapsed(),
        table.len()
    );
}

criterion_group!(
    benches,
    posture_token_verify,
    policy_evaluate,
    flow_table_lookup
);
criterion_main!(benches);
