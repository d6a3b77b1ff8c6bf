//! Enrollment, posture tokens and continuous authorization, end to end: real binaries in
//! network namespaces (see `deploy/quickstart.sh`, which enrolls both laptops and the connector
//! with one-time tokens through the admin CLI).

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::Value;

use sekisho_proto::posture::{PostureClaims, TokenSigner};
use sekisho_tests::{Deployment, tcp_probe, udp_probe, udp_probe_from, wait_until};

const APP: &str = "10.20.0.10";

fn audit(d: &Deployment) -> Vec<Value> {
    std::fs::read_to_string(d.state().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs `sekisho-client enroll` on alice's laptop into a fresh folder.
fn enroll(d: &Deployment, token: &str, dir: &str) -> (bool, String) {
    let dir = d.state().join(dir);
    let out = d.exec(
        "laptop",
        &[
            d.bin("sekisho-client").to_str().unwrap(),
            "enroll",
            "--server",
            "https://10.99.2.2:8443",
            "--token",
            token,
            "--name",
            "spare-laptop",
            "--dir",
            dir.to_str().unwrap(),
        ],
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn devices_and_connector_enroll_from_nothing_and_bad_tokens_create_nothing() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    // Enrolled from nothing: traffic flows.
    let (ok, body, _) = d.sh("laptop", "curl -s -m 5 http://10.20.0.10/");
    assert!(ok && body.contains("Hello"), "alice: {body}");
    let (ok, devices, err) = d.admin(&["device", "list", "--json"]);
    assert!(ok, "{err}");
    let devices: Value = serde_json::from_str(&devices).unwrap();
    assert_eq!(devices.as_array().unwrap().len(), 2, "{devices}");
    let (ok, connectors, _) = d.admin(&["connector", "list", "--json"]);
    assert!(ok);
    assert!(connectors.contains("\"site\": \"dc1\""), "{connectors}");

    // The private key was made on the device, is readable by root only, and never left it.
    let key_file = d.state().join("alice/private.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let private = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_string();
    let connector_key = std::fs::read_to_string(d.state().join("connector/connector.key")).unwrap();
    let records = audit(&d);
    let requests: Vec<&Value> = records
        .iter()
        .filter(|r| {
            ["enroll_device", "posture", "enroll_connector"]
                .contains(&r["event"].as_str().unwrap_or(""))
        })
        .filter_map(|r| r["detail"].get("request"))
        .collect();
    assert!(requests.len() >= 5, "{records:?}");
    let all = serde_json::to_string(&records).unwrap();
    assert!(
        !all.contains(&private),
        "the device's private key reached the control plane"
    );
    let key_body: String = connector_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(
        !all.contains(&key_body[..40]),
        "the connector's key reached the control plane"
    );
    for r in &requests {
        let obj = r.as_object().unwrap();
        if let Some(checks) = obj.get("checks") {
            // Posture refresh: pass/fail per check and nothing else.
            assert_eq!(obj.len(), 1, "{r}");
            assert!(
                checks.as_object().unwrap().values().all(Value::is_boolean),
                "{r}"
            );
        } else if obj.contains_key("public_key") {
            let mut keys: Vec<&String> = obj.keys().collect();
            keys.sort();
            assert_eq!(keys, ["name", "public_key", "token"], "{r}");
        }
    }
    println!("{} enrollment and posture requests checked", requests.len());

    // A used token: clear error, nothing written, nothing enrolled.
    let used = std::fs::read_to_string(d.state().join("tokens/alice.token")).unwrap();
    let (ok, err) = enroll(&d, used.trim(), "reuse");
    assert!(
        !ok && err.contains("enrollment token was already used"),
        "{err}"
    );
    assert!(
        !d.state().join("reuse/private.key").exists(),
        "a refused enrollment left a key"
    );
    // An expired one.
    let (ok, short, e) = d.admin(&["token", "create", "--user", "alice", "--ttl", "1s"]);
    assert!(ok, "{e}");
    std::thread::sleep(Duration::from_millis(2100));
    let (ok, err) = enroll(&d, &short, "expired");
    assert!(!ok && err.contains("enrollment token has expired"), "{err}");
    // A made-up one (right shape and CA, unknown id), and garbage.
    let ca = short.rsplit('.').next().unwrap();
    let (ok, err) = enroll(
        &d,
        &format!("SKE1.madeup.0123456789abcdefghijklmnop.{ca}"),
        "madeup",
    );
    assert!(!ok && err.contains("unknown enrollment token"), "{err}");
    let (ok, err) = enroll(&d, "let-me-in", "garbage");
    assert!(!ok && err.contains("bad enrollment token"), "{err}");
    let (_, after, _) = d.admin(&["device", "list", "--json"]);
    let after: Value = serde_json::from_str(&after).unwrap();
    assert_eq!(
        after.as_array().unwrap().len(),
        2,
        "bad tokens created a device: {after}"
    );

    // Admin calls without a token, or with a device's credential, are refused.
    let cred = std::fs::read_to_string(d.state().join("alice/credential")).unwrap();
    let ca_file = d.state().join("alice/ca.pem");
    let curl = |auth: &str| {
        d.sh(
            "laptop",
            &format!(
                "curl -s -o /dev/null -w '%{{http_code}}' --cacert {} {auth} https://10.99.2.2:8443/v1/admin/devices",
                ca_file.display()
            ),
        )
        .1
    };
    assert_eq!(curl(""), "401");
    assert_eq!(
        curl(&format!("-H 'Authorization: Bearer {}'", cred.trim())),
        "403"
    );
}

/// Presents a token to the broker's posture service from a laptop; returns the answer.
fn present(d: &Deployment, host: &str, token: &str) -> Value {
    let out = d.py(
        host,
        &format!(
            "import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n\
             s.sendto({token:?}.encode(), ('100.118.0.1', 7443))\nprint(s.recvfrom(4096)[0].decode())"
        ),
    );
    serde_json::from_str(&out)
        .unwrap_or_else(|_| panic!("no answer from the posture service: {out:?}"))
}

/// A fresh token for alice's device from the control API, with her device credential.
fn alice_token(d: &Deployment) -> String {
    let (ok, out, err) = d.sh(
        "laptop",
        &format!(
            "curl -s --cacert {dir}/ca.pem -H \"Authorization: Bearer $(cat {dir}/credential)\" \
             -H 'content-type: application/json' -d '{{\"checks\":{{\"client-current\":true,\"edr-running\":true}}}}' \
             https://10.99.2.2:8443/v1/posture",
            dir = d.state().join("alice").display()
        ),
    );
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    v["token"].as_str().unwrap().to_string()
}

#[test]
fn forged_edited_expired_and_borrowed_posture_tokens_are_refused_and_logged() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    let good = alice_token(&d);
    let a = present(&d, "laptop", &good);
    assert_eq!(a["accepted"], true, "{a}");

    let (body, sig) = good.split_once('.').unwrap();
    // Forged signature: the signature of other bytes.
    let mut forged_sig = B64.decode(sig).unwrap();
    forged_sig[10] ^= 0x55;
    let forged = format!("{body}.{}", B64.encode(&forged_sig));
    // Edited claims: claim a passing check on a token that said it failed... or simply become
    // someone else; the signature no longer matches.
    let mut claims: Value = serde_json::from_slice(&B64.decode(body).unwrap()).unwrap();
    claims["user"] = "mallory".into();
    let edited = format!("{}.{sig}", B64.encode(serde_json::to_vec(&claims).unwrap()));
    // Expired: correctly signed with the cluster's key (read from the broker's database), but
    // its lifetime is over.
    let row = d.py(
        "broker",
        &format!(
            "import sqlite3\nr=sqlite3.connect({:?}).execute('select kid, seed from signing_keys').fetchone()\nprint(r[0]); print(r[1])",
            d.state().join("broker.db").display().to_string()
        ),
    );
    let (kid, sealed) = row.trim().split_once('\n').unwrap();
    // The database alone holds the seed sealed, not in the clear; the key-encryption key (a
    // file beside the CA key on the broker) opens it.
    assert!(
        sealed.starts_with("kek1."),
        "the signing key is stored in the clear: {sealed}"
    );
    let kek_text = std::fs::read_to_string(d.state().join("pki/signing-keys.kek")).unwrap();
    let kek: [u8; 32] = B64.decode(kek_text.trim()).unwrap().try_into().unwrap();
    let body = B64.decode(sealed.splitn(3, '.').nth(2).unwrap()).unwrap();
    let (nonce, ct) = body.split_at(ring::aead::NONCE_LEN);
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &kek).unwrap(),
    );
    let mut buf = ct.to_vec();
    let plain = key
        .open_in_place(
            ring::aead::Nonce::try_assume_unique_for_key(nonce).unwrap(),
            ring::aead::Aad::from(kid.trim().as_bytes()),
            &mut buf,
        )
        .expect("the key-encryption key opens the seed");
    let seed: [u8; 32] = plain.try_into().unwrap();
    let mut old: PostureClaims = serde_json::from_value(claims.clone()).unwrap();
    old.user = "alice".into();
    old.iat -= 900;
    old.exp = old.iat + 300;
    let expired = TokenSigner::from_seed(seed).issue(old);

    for (name, token, host, kind) in [
        (
            "forged signature",
            forged.as_str(),
            "laptop",
            "bad-signature",
        ),
        ("edited claims", edited.as_str(), "laptop", "bad-signature"),
        ("expired", expired.as_str(), "laptop", "expired"),
        (
            "alice's token presented by bob's device",
            good.as_str(),
            "laptop2",
            "wrong-device",
        ),
    ] {
        let a = present(&d, host, token);
        println!("{name}: {a}");
        assert_eq!(a["accepted"], false, "{name}: {a}");
        let logged = d.decisions().into_iter().rev().find(|r| {
            r["event"] == "posture"
                && r["result"] == "refused"
                && r["reason"].as_str().is_some_and(|s| s.starts_with(kind))
        });
        assert!(
            logged.is_some(),
            "{name}: no refusal with reason {kind} in the decision log"
        );
    }
    // Alice's access was not disturbed by the refused tokens.
    let r = d.py("laptop", &udp_probe(APP, 7, "still"));
    assert!(r.starts_with("reply:still"), "{r}");
}

#[test]
fn failing_check_cuts_level3_app_keeps_level1_and_recovery_restores_it() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    // One UDP flow (fixed source port) to the level-3 echo app, and the level-1 web app.
    let probe = udp_probe_from(40007, APP, 7, "ping");
    let r = d.py("laptop", &probe);
    assert!(r.starts_with("reply:ping"), "before: {r}");

    let start = Instant::now();
    let stopped_at = std::time::SystemTime::now();
    d.signal("edr", 15); // SIGTERM
    let cut = wait_until(Duration::from_secs(30), || {
        !d.py(
            "laptop",
            &udp_probe_from(40007, APP, 7, "ping").replace("settimeout(5)", "settimeout(0.3)"),
        )
        .starts_with("reply:")
    })
    .map(|_| start.elapsed())
    .expect("the level-3 flow was not cut within 30 s of the check failing");
    println!(
        "level-3 flow cut {:.3} s after the EDR agent stopped (probe granularity included)",
        cut.as_secs_f64()
    );
    // The broker's own record: when it accepted the token that says the check fails. From then
    // on the flow's next packet is denied.
    let accepted = d
        .decisions()
        .into_iter()
        .find(|r| {
            r["event"] == "posture"
                && r["device"] == "alice-laptop"
                && r["failing_checks"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c == "edr-running"))
        })
        .expect("the broker accepted a token with the failing check");
    let at = humantime::parse_rfc3339(accepted["ts"].as_str().unwrap()).unwrap();
    let detect = at.duration_since(stopped_at).unwrap_or_default();
    println!(
        "broker had the failing check {:.3} s after the EDR agent stopped (checks every 200 ms)",
        detect.as_secs_f64()
    );
    assert!(cut < Duration::from_secs(15), "cut took {cut:?}");
    let rec = d
        .decisions()
        .into_iter()
        .rev()
        .find(|r| r["event"] == "flow" && r["dport"] == 7 && r["decision"] == "deny")
        .expect("a deny for echo");
    assert_eq!(rec["check"], "edr-running", "{rec}");
    assert_eq!(rec["reason"], "posture check failed", "{rec}");
    // Level 1 keeps working, on a new connection.
    let (ok, body, _) = d.sh("laptop", "curl -s -m 5 http://10.20.0.10/");
    assert!(
        ok && body.contains("Hello"),
        "web during the failing check: {body}"
    );

    let start = Instant::now();
    d.daemon("start", "edr");
    let back = wait_until(Duration::from_secs(30), || {
        d.py(
            "laptop",
            &udp_probe(APP, 7, "back").replace("settimeout(5)", "settimeout(0.3)"),
        )
        .starts_with("reply:back")
    })
    .expect("access did not come back after the check recovered");
    println!(
        "access restored {:.3} s after the EDR agent restarted",
        (start.elapsed()).as_secs_f64()
    );
    let _ = back;
}

#[test]
fn revoking_a_device_cuts_its_flows_and_others_keep_theirs() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    let r = d.py("laptop", &tcp_probe(APP, 80));
    assert!(r.starts_with("connected"), "{r}");
    let start = Instant::now();
    let (ok, out, err) = d.admin(&["device", "revoke", "alice-laptop"]);
    assert!(ok, "{err}");
    println!("{out}");
    let cut = wait_until(Duration::from_secs(30), || {
        !d.py(
            "laptop",
            &udp_probe(APP, 7, "x").replace("settimeout(5)", "settimeout(0.3)"),
        )
        .starts_with("reply:")
    })
    .map(|_| start.elapsed())
    .expect("revocation did not cut alice's traffic");
    println!("revoked device cut after {:.3} s", cut.as_secs_f64());
    assert!(cut < Duration::from_secs(15));
    assert_eq!(
        d.stats()["peers"].as_array().unwrap().len(),
        1,
        "the peer is gone"
    );
    // Bob's device is untouched.
    let (ok, out, _) = d.sh("laptop2", "ping -c 1 -W 3 10.20.0.10");
    assert!(ok, "bob: {out}");
    // And alice's credential no longer gets posture tokens.
    let (_, code, _) = d.sh(
        "laptop",
        &format!(
            "curl -s -o /dev/null -w '%{{http_code}}' --cacert {dir}/ca.pem -H \"Authorization: Bearer $(cat {dir}/credential)\" \
             -H 'content-type: application/json' -d '{{\"checks\":{{}}}}' https://10.99.2.2:8443/v1/posture",
            dir = d.state().join("alice").display()
        ),
    );
    assert_eq!(code, "401");
}

#[test]
fn connector_certificate_renews_itself_over_the_link() {
    // A 30 s certificate: renewal is due after about 20 s.
    let Some(d) = Deployment::for_test_with(&[("SK_CERT_LIFETIME", "30s")]) else {
        return;
    };
    let serial = |d: &Deployment| {
        let (ok, out, err) = d.admin(&["connector", "list", "--json"]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        v[0]["serial"].as_str().unwrap().to_string()
    };
    let before = serial(&d);
    let pem_before = std::fs::read_to_string(d.state().join("connector/connector.pem")).unwrap();
    let took = wait_until(Duration::from_secs(60), || {
        d.log("connector").contains("connector certificate renewed")
    })
    .expect("the connector did not renew its certificate");
    println!(
        "certificate renewed {:.1} s into the test",
        took.as_secs_f64()
    );
    let after = serial(&d);
    assert_ne!(
        before, after,
        "the control plane records the new certificate"
    );
    let pem_after = std::fs::read_to_string(d.state().join("connector/connector.pem")).unwrap();
    assert_ne!(pem_before, pem_after);
    // The running link was not disturbed, and a new link uses the renewed certificate.
    let (ok, body, _) = d.sh("laptop", "curl -s -m 5 http://10.20.0.10/");
    assert!(ok && body.contains("Hello"), "{body}");
    d.daemon("stop", "connector");
    d.daemon("start", "connector");
    let relinked = wait_until(Duration::from_secs(30), || {
        d.sh("laptop", "curl -s -m 2 http://10.20.0.10/")
            .1
            .contains("Hello")
    });
    assert!(
        relinked.is_some(),
        "no traffic after the connector restarted with its new certificate"
    );
}
