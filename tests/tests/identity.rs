//! Sign-in through the company's identity provider, end to end: a real OpenID provider
//! (oidc-provider on Node, tests/tools/oidc) on host idp with TLS, the control plane as its
//! relying party, and a scripted browser (tests/tools/oidc_browser.py) that posts the
//! provider's own login and consent forms, or enters the device code, as the user would.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sekisho_tests::pg::Postgres;
use sekisho_tests::{Deployment, tcp_probe, udp_probe, wait_until, workspace};
use serde_json::Value;

const APP: &str = "10.20.0.10";
const API: &str = "https://10.99.2.2:8443";

/// The `$BROWSER` command that signs `user` in (with `extra` options of the script).
fn browser(d: &Deployment, user: &str, extra: &str) -> String {
    format!(
        "python3 {} --ca {} --user {user} --password {} {extra}",
        workspace().join("tests/tools/oidc_browser.py").display(),
        d.state().join("idp/ca.pem").display(),
        d.idp_password(user)
    )
}

/// `sekisho-client login` on `host` for `who`'s folder through the browser; (ok, out, err).
fn login(
    d: &Deployment,
    host: &str,
    who: &str,
    user: &str,
    browser_extra: &str,
) -> (bool, String, String) {
    d.sh(
        host,
        &format!(
            "BROWSER='{}' {} login --server {API} --ca {} --name {who}-laptop --dir {} \
             --check-interval 200ms --socket {}",
            browser(d, user, browser_extra),
            d.bin("sekisho-client").display(),
            d.state().join("pki/ca.pem").display(),
            d.state().join(who).display(),
            d.state().join(format!("{who}/client.sock")).display(),
        ),
    )
}

/// Runs `command` (a login that prints a device code) on `host`, enters the code as `user`
/// with the scripted browser, and waits for the command; (ok, out, err).
fn device_code_login(
    d: &Deployment,
    host: &str,
    command: &str,
    user: &str,
) -> (bool, String, String) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &d.ns(host), "bash", "-c", command])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let (url, code) = loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let err = std::io::read_to_string(child.stderr.take().unwrap()).unwrap_or_default();
            let _ = child.wait();
            return (false, printed, err);
        }
        printed += &line;
        // "To sign in, visit URL and enter the code CODE"
        if let Some(rest) = line.trim().strip_prefix("To sign in, visit ") {
            let (url, code) = rest.split_once(" and enter the code ").unwrap();
            break (url.to_string(), code.to_string());
        }
    };
    assert!(url.starts_with("https://idp.example/"), "{url}");
    let (ok, _, err) = d.sh(
        host,
        &format!("{} --device --code '{code}' '{url}'", browser(d, user, "")),
    );
    assert!(ok, "the user could not enter the device code: {err}");
    let rest = std::io::read_to_string(&mut out).unwrap_or_default();
    let err = std::io::read_to_string(child.stderr.take().unwrap()).unwrap_or_default();
    let status = child.wait().unwrap();
    (status.success(), printed + &rest, err)
}

fn admin_json(d: &Deployment, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = d.admin(&all);
    assert!(ok, "admin {args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

fn user_groups(d: &Deployment, user: &str) -> Option<Vec<String>> {
    admin_json(d, &["user", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == user)
        .map(|u| {
            u["groups"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g.as_str().unwrap().to_string())
                .collect()
        })
}

fn device_names(d: &Deployment) -> Vec<String> {
    admin_json(d, &["device", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

/// Starts `who`'s client (folder written by `login`) and waits for its posture token.
fn run_client(d: &Deployment, who: &str) {
    d.daemon("client-settings", who);
    d.daemon("start", &format!("client-{who}"));
    let up = wait_until(Duration::from_secs(30), || {
        let s = d.client_status(who);
        s["state"] == "connected" && s["posture"]["token_expires"].is_u64()
    });
    assert!(
        up.is_some(),
        "{who}'s client did not connect: {}",
        d.client_status(who)
    );
}

/// alice signs in from a laptop with nothing on it (browser, authorization code + PKCE),
/// bob with the device code; each gets a device, their provider groups, their access.
fn alice_and_bob_sign_in(d: &Deployment) {
    assert!(!d.state().join("alice").exists());
    let (ok, out, err) = login(d, "laptop", "alice", "alice", "");
    assert!(ok, "alice's login failed: {out}\n{err}");
    assert!(out.contains("signed in as \"alice\""), "{out}");
    assert!(out.contains("enrolled \"alice-laptop\""), "{out}");
    // The key was made on the laptop and stays there (only its public half was sent).
    let key = d.state().join("alice/private.key");
    assert!(key.exists());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(user_groups(d, "alice").unwrap(), ["engineering"]);
    run_client(d, "alice");
    let r = d.py("laptop", &tcp_probe(APP, 80));
    assert!(
        r.starts_with("connected"),
        "alice reaches the intranet: {r}"
    );
    let s = d.client_status("alice");
    assert_eq!(s["user"], "alice");
    assert!(s["posture"]["signed_in_at"].is_u64(), "{s}");

    let (ok, out, err) = device_code_login(
        d,
        "laptop2",
        &format!(
            "{} login --device-code --server {API} --ca {} --name bob-laptop --dir {} \
             --check-interval 200ms",
            d.bin("sekisho-client").display(),
            d.state().join("pki/ca.pem").display(),
            d.state().join("bob").display()
        ),
        "bob",
    );
    assert!(ok, "bob's device-code login failed: {out}\n{err}");
    assert!(out.contains("signed in as \"bob\""), "{out}");
    assert_eq!(user_groups(d, "bob").unwrap(), ["finance"]);
    run_client(d, "bob");
    // Finance has no intranet (the policy's own test says so); bob's sign-in made him finance.
    let r = d.py("laptop2", &tcp_probe(APP, 80));
    assert!(
        !r.starts_with("connected"),
        "bob must not reach the intranet: {r}"
    );
    let mut devices = device_names(d);
    devices.sort();
    assert_eq!(devices, ["alice-laptop", "bob-laptop"]);
    let audit = std::fs::read_to_string(d.state().join("audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .filter(|l| l.contains("\"sign_in\"") && l.contains("enrolled"))
            .count()
            >= 2,
        "{audit}"
    );
}

/// Each way an ID token or a return can be wrong is refused with a clear error, and nothing is
/// created: no user, no device, nothing written on the laptop.
fn refusals_create_nothing(d: &Deployment) {
    let before = device_names(d);
    let tamper = d.state().join("idp/tamper");
    for (mode, says) in [
        ("bad-signature", "signature does not verify"),
        ("audience", "for another audience"),
        ("issuer", "is from issuer \"https://evil.example\""),
        ("expired", "expired"),
        ("nonce", "nonce is not the one this sign-in sent"),
    ] {
        std::fs::write(&tamper, mode).unwrap();
        let (ok, out, err) = login(d, "laptop", "carol", "carol", "");
        assert!(!ok, "{mode}: a tampered ID token was accepted: {out}");
        assert!(
            err.contains(says),
            "{mode}: the error should say {says:?}: {err}"
        );
        assert!(err.contains("sign-in refused"), "{mode}: {err}");
        println!("{mode}: {}", err.trim());
    }
    std::fs::remove_file(&tamper).unwrap();
    // The browser comes back with another sign-in's state: refused before any exchange.
    let (ok, out, err) = login(d, "laptop", "carol", "carol", "--rewrite-state forged");
    assert!(!ok, "a forged state was accepted: {out}");
    assert!(err.contains("another sign-in's state"), "{err}");
    assert_eq!(user_groups(d, "carol"), None, "carol must not exist");
    assert_eq!(device_names(d), before);
    let carol = d.state().join("carol");
    for f in ["client.toml", "private.key", "credential"] {
        assert!(
            !carol.join(f).exists(),
            "{f} was written for a refused sign-in"
        );
    }
    let audit = std::fs::read_to_string(d.state().join("audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .filter(|l| l.contains("\"sign_in\"") && l.contains("refused"))
            .count()
            >= 5,
        "each refusal is audited"
    );
}

/// A replayed authorization code: the same sign-in finished twice, and the code carried into
/// another sign-in (which has its own PKCE verifier and state): both refused.
fn replayed_code_is_refused(d: &Deployment) {
    let script = format!(
        r#"
import base64, hashlib, json, os, ssl, subprocess, urllib.parse, urllib.request, urllib.error
ctx = ssl.create_default_context(cafile={ca:?})
def post(path, body):
    req = urllib.request.Request({api:?} + path, data=json.dumps(body).encode(),
        headers={{"Content-Type": "application/json"}})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
def pkce():
    v = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    c = base64.urlsafe_b64encode(hashlib.sha256(v.encode()).digest()).rstrip(b"=").decode()
    return v, c
def start():
    v, c = pkce()
    s, r = post("/v1/login/start", {{"purpose": "device", "method": "code",
        "redirect_uri": "http://127.0.0.1:39999/callback", "code_challenge": c}})
    assert s == 200, r
    return v, r
dev = {{"public_key": base64.b64encode(os.urandom(32)).decode(), "name": "replay-laptop"}}
v, r = start()
saved = "/tmp/replay-callback-" + str(os.getpid())
subprocess.run({browser:?} + " --save-callback " + saved + " '" + r["authorization_url"] + "'",
    shell=True, capture_output=True)
q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(open(saved).read().strip()).query))
os.remove(saved)
fin = {{"login_id": r["login_id"], "code": q["code"], "state": q["state"], "code_verifier": v,
    "device": dev}}
first = post("/v1/login/finish", fin)
again = post("/v1/login/finish", fin)
v2, r2 = start()
other = post("/v1/login/finish", {{"login_id": r2["login_id"], "code": q["code"],
    "state": r2["state"], "code_verifier": v2, "device": dev}})
print(json.dumps({{"first": first, "again": again, "other": other}}))
"#,
        ca = d.state().join("pki/ca.pem").display().to_string(),
        api = API,
        browser = browser(d, "carol", ""),
    );
    let out = d.py("laptop", &script);
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("replay script: {out}"));
    assert_eq!(r["first"][0], 200, "{r}");
    assert_eq!(r["first"][1]["user"], "carol");
    assert_eq!(r["again"][0], 401, "{r}");
    assert!(
        r["again"][1]["error"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{r}"
    );
    assert_eq!(r["other"][0], 401, "{r}");
    assert!(
        r["other"][1]["error"]
            .as_str()
            .unwrap()
            .contains("invalid_grant"),
        "the provider refuses a code it already redeemed: {r}"
    );
    // Exactly one device came of it.
    assert_eq!(
        device_names(d)
            .iter()
            .filter(|n| *n == "replay-laptop")
            .count(),
        1
    );
}

/// Level 3 wants a sign-in at most 20 s old: past it the echo service (level 3) is denied with
/// "sign-in too old" while the intranet (level 1) goes on; `login` brings it back.
fn stale_sign_in_denies_level_3_until_login(d: &Deployment) {
    let text = std::fs::read_to_string(d.state().join("policy.toml")).unwrap();
    let path = d.state().join("policy-fresh.toml");
    std::fs::write(
        &path,
        format!("{text}\n[sensitivity.sign_in_max_age]\nlevel3 = \"20s\"\n"),
    )
    .unwrap();
    let (ok, _, err) = d.admin(&["policy", "apply", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    // A fresh sign-in (re-authentication: same device, same key) and the echo answers.
    let (ok, out, err) = login(d, "laptop", "alice", "alice", "");
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("signed in again as \"alice\""), "{out}");
    let signed_in = Instant::now();
    let echo = || d.py("laptop", &udp_probe(APP, 7, "fresh"));
    let fresh = wait_until(Duration::from_secs(15), || {
        echo().starts_with("reply:fresh")
    });
    assert!(fresh.is_some(), "level 3 after a fresh sign-in: {}", echo());
    // Past 20 s (plus the token's way), level 3 is refused, level 1 is not.
    let stale = wait_until(Duration::from_secs(60), || !echo().starts_with("reply:"));
    assert!(
        stale.is_some(),
        "level 3 should end once the sign-in is too old"
    );
    println!(
        "level 3 refused {:.1} s after the sign-in (max age 20 s)",
        signed_in.elapsed().as_secs_f64()
    );
    assert!(signed_in.elapsed() >= Duration::from_secs(19));
    let r = d.py("laptop", &tcp_probe(APP, 80));
    assert!(r.starts_with("connected"), "level 1 keeps working: {r}");
    let denied = d
        .decisions()
        .into_iter()
        .rev()
        .find(|l| l["event"] == "flow" && l["decision"] == "deny" && l["dport"] == 7);
    assert_eq!(
        denied.as_ref().map(|l| l["reason"].clone()),
        Some(Value::from("sign-in too old")),
        "{denied:?}"
    );
    // `status` says so (the client asks the broker for its view every 2 s).
    let status = || {
        d.sh(
            "laptop",
            &format!(
                "{} status --socket {}",
                d.bin("sekisho-client").display(),
                d.state().join("alice/client.sock").display()
            ),
        )
        .1
    };
    wait_until(Duration::from_secs(10), || {
        status().contains("sign-in too old")
    });
    let status = status();
    assert!(status.contains("sign-in too old"), "{status}");
    assert!(status.contains("sekisho-client login"), "{status}");
    // `login` fixes it without restarting anything.
    let (ok, out, err) = login(d, "laptop", "alice", "alice", "");
    assert!(ok, "{out}\n{err}");
    let pid = d.pid("client-alice");
    let back = wait_until(Duration::from_secs(15), || {
        echo().starts_with("reply:fresh")
    });
    println!("level 3 back {back:?} after login");
    assert!(back.is_some(), "level 3 after login: {}", echo());
    assert_eq!(d.pid("client-alice"), pid, "the client was not restarted");
}

/// Admins sign in through the provider (device code): carol's group maps to the auditor role
/// (reads, changes nothing), alice's to admin.
fn admins_sign_in(d: &Deployment) {
    let admin_cli = |token: &str, args: &str| {
        format!(
            "{} admin --server {API} --ca {} --token-file {} {args}",
            d.bin("sekisho-broker").display(),
            d.state().join("pki/ca.pem").display(),
            d.state().join(token).display()
        )
    };
    let (ok, out, err) =
        device_code_login(d, "laptop", &admin_cli("carol.admin", "login"), "carol");
    assert!(ok, "carol's admin login: {out}\n{err}");
    assert!(out.contains("role auditor"), "{out}");
    let (ok, out, err) = d.sh("laptop", &admin_cli("carol.admin", "user list"));
    assert!(ok && out.contains("alice"), "an auditor reads: {out}{err}");
    let (ok, out, err) = d.sh("laptop", &admin_cli("carol.admin", "group add sso-made"));
    assert!(!ok, "an auditor must not change anything: {out}");
    assert!(err.contains("403") || err.contains("auditor"), "{err}");
    let (ok, out, err) =
        device_code_login(d, "laptop", &admin_cli("alice.admin", "login"), "alice");
    assert!(ok, "alice's admin login: {out}\n{err}");
    assert!(out.contains("role admin"), "{out}");
    let (ok, out, err) = d.sh("laptop", &admin_cli("alice.admin", "group add sso-made"));
    assert!(ok, "an admin changes things: {out}{err}");
    // An admin deactivated in the directory (here by an admin; SCIM does the same) loses
    // the token from `admin login` at once.
    let (ok, _, err) = d.admin(&["user", "disable", "carol"]);
    assert!(ok, "{err}");
    let (ok, out, err) = d.sh("laptop", &admin_cli("carol.admin", "user list"));
    assert!(!ok, "a disabled admin's token still works: {out}");
    assert!(err.contains("401"), "{err}");
    // bob's groups map to no admin role.
    let (ok, _, err) = device_code_login(d, "laptop", &admin_cli("bob.admin", "login"), "bob");
    assert!(!ok);
    assert!(err.contains("admin role"), "{err}");
}

/// The provider rotates its signing key: the next sign-in names a key not seen yet, and the
/// control plane fetches the keys again.
fn provider_key_rotation(d: &Deployment) {
    d.daemon("stop", "idp");
    std::fs::remove_file(d.state().join("idp/jwks.json")).unwrap();
    d.daemon("start", "idp");
    let ready = wait_until(Duration::from_secs(20), || {
        d.sh(
            "laptop",
            &format!(
                "curl -sf --noproxy '*' -m 2 --cacert {} https://idp.example/jwks",
                d.state().join("idp/ca.pem").display()
            ),
        )
        .0
    });
    assert!(ready.is_some(), "the provider came back");
    let (ok, out, err) = login(d, "laptop", "alice", "alice", "");
    assert!(
        ok,
        "sign-in after the provider's key rotation: {out}\n{err}"
    );
    assert!(
        d.log("broker")
            .contains("identity provider keys fetched again")
    );
}

#[test]
fn sign_in_through_the_identity_provider_sqlite() {
    let Some(d) = Deployment::for_test_with(&[("SK_SSO", "1")]) else {
        return;
    };
    alice_and_bob_sign_in(&d);
    refusals_create_nothing(&d);
    replayed_code_is_refused(&d);
    admins_sign_in(&d);
    provider_key_rotation(&d);
    stale_sign_in_denies_level_3_until_login(&d);
}

#[test]
fn sign_in_through_the_identity_provider_postgres() {
    if sekisho_tests::skip_netns() {
        return;
    }
    let pg = Postgres::start().expect("a local PostgreSQL for the broker");
    let url = pg.url();
    let Some(d) = Deployment::for_test_with(&[("SK_SSO", "1"), ("SK_DATABASE", &url)]) else {
        return;
    };
    alice_and_bob_sign_in(&d);
    refusals_create_nothing(&d);
    admins_sign_in(&d);
}
