//! SCIM provisioning end to end: the quickstart deployment (users alice in engineering and bob
//! in finance, both laptops enrolled and connected), a SCIM token made with the admin CLI, and
//! a provisioning client on the internet router (Python's urllib, pinning the cluster CA)
//! talking to https://10.99.2.2:8443/scim/v2 as Entra ID would: users and groups created,
//! a user renamed, membership changes that change access at the next flow decision,
//! deactivation cutting alice's running flow (the time is printed), deletion, and refusals of
//! calls without a token and with a revoked one. On SQLite (the quickstart's default) and on a
//! PostgreSQL started for the test.

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use sekisho_tests::pg::Postgres;
use sekisho_tests::{Deployment, tcp_probe, wait_until};

const APP: &str = "10.20.0.10";
const SCIM: &str = "https://10.99.2.2:8443/scim/v2";

/// A provisioning client's request: METHOD URL TOKEN BODY CA; prints status, content type and
/// body as JSON.
const CLIENT: &str = r#"
import json, ssl, sys, urllib.request, urllib.error
method, url, token, body, ca = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
data = body.encode() if body else None
req = urllib.request.Request(url, data=data, method=method)
req.add_header("Accept", "application/scim+json")
if token:
    req.add_header("Authorization", "Bearer " + token)
if data is not None:
    req.add_header("Content-Type", "application/scim+json; charset=utf-8")
try:
    r = urllib.request.urlopen(req, context=ctx, timeout=10)
    status, ctype, raw = r.status, r.headers.get("Content-Type", ""), r.read()
except urllib.error.HTTPError as e:
    status, ctype, raw = e.code, e.headers.get("Content-Type", ""), e.read()
print(json.dumps({"status": status, "ctype": ctype,
                  "body": json.loads(raw) if raw.strip() else None}))
"#;

/// UDP datagrams to the echo application every 20 ms from one source port (one flow) for
/// ARGV[1] seconds; prints the Unix times of the answers.
const PINGER: &str = r#"
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 40077))
s.connect(("10.20.0.10", 7))
s.settimeout(0.05)
end = time.time() + float(sys.argv[1])
sent, answers = 0, []
while time.time() < end:
    started = time.time()
    sent += 1
    try:
        s.send(b"ping %d" % sent)
        s.recv(2000)
        answers.append(time.time())
    except OSError:
        pass
    time.sleep(max(0.0, 0.02 - (time.time() - started)))
print(json.dumps({"sent": sent, "answers": answers}))
"#;

struct Answer {
    status: u16,
    ctype: String,
    body: Value,
}

fn call(d: &Deployment, token: &str, method: &str, path: &str, body: Option<Value>) -> Answer {
    let url = format!("{SCIM}{path}");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let ca = d.state().join("pki/ca.pem");
    let out = d.exec(
        "inet",
        &[
            "python3",
            "-c",
            CLIENT,
            method,
            &url,
            token,
            &body,
            ca.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "{method} {path}: no answer: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Answer {
        status: v["status"].as_u64().unwrap_or(0) as u16,
        ctype: v["ctype"].as_str().unwrap_or_default().to_string(),
        body: v["body"].clone(),
    }
}

/// A filter as a query parameter.
fn filter(f: &str) -> String {
    let enc: String = f
        .chars()
        .map(|c| match c {
            ' ' => "%20".to_string(),
            '"' => "%22".to_string(),
            '[' => "%5B".to_string(),
            ']' => "%5D".to_string(),
            '@' => "%40".to_string(),
            c => c.to_string(),
        })
        .collect();
    format!("?filter={enc}")
}

fn patch(ops: Value) -> Value {
    json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": ops})
}

fn ok(a: &Answer, status: u16, what: &str) {
    assert_eq!(a.status, status, "{what}: {}", a.body);
    if status != 204 {
        assert!(
            a.ctype.starts_with("application/scim+json"),
            "{what}: content type {:?}",
            a.ctype
        );
    }
}

/// The SCIM id of the user `name` (looked up by filter, as a provisioning client does).
fn user_id(d: &Deployment, token: &str, name: &str) -> String {
    let a = call(
        d,
        token,
        "GET",
        &format!("/Users{}", filter(&format!("userName eq \"{name}\""))),
        None,
    );
    ok(&a, 200, "lookup");
    assert_eq!(a.body["totalResults"], 1, "{name}: {}", a.body);
    a.body["Resources"][0]["id"].as_str().unwrap().to_string()
}

fn group_id(d: &Deployment, token: &str, name: &str) -> String {
    let a = call(
        d,
        token,
        "GET",
        &format!(
            "/Groups{}&excludedAttributes=members",
            filter(&format!("displayName eq \"{name}\""))
        ),
        None,
    );
    ok(&a, 200, "group lookup");
    assert_eq!(a.body["totalResults"], 1, "{name}: {}", a.body);
    a.body["Resources"][0]["id"].as_str().unwrap().to_string()
}

/// Whether bob's laptop gets a new TCP connection to the intranet web app.
fn bob_reaches_web(d: &Deployment) -> bool {
    d.py(
        "laptop2",
        &tcp_probe(APP, 80).replace("settimeout(8)", "settimeout(2)"),
    )
    .starts_with("connected")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn audit(d: &Deployment) -> String {
    std::fs::read_to_string(d.state().join("audit.jsonl")).unwrap_or_default()
}

fn provisioning(d: &Deployment, backend: &str) {
    // The admin makes a SCIM token for the identity provider.
    let (ok_, out, err) = d.admin(&["scim-token", "create", "--name", "entra"]);
    assert!(ok_, "{err}");
    let token = out.lines().last().unwrap().trim().to_string();
    assert!(token.starts_with("SKS1."), "{out}");
    let t = token.as_str();

    // Without a token, or with an admin token: 401 in SCIM's error format.
    let a = call(d, "", "GET", "/Users", None);
    ok(&a, 401, "no token");
    assert_eq!(
        a.body["schemas"][0],
        "urn:ietf:params:scim:api:messages:2.0:Error"
    );
    let admin_token = std::fs::read_to_string(d.state().join("admin.token")).unwrap();
    ok(
        &call(d, admin_token.trim(), "GET", "/Users", None),
        401,
        "admin token",
    );

    let a = call(d, t, "GET", "/ServiceProviderConfig", None);
    ok(&a, 200, "service provider config");
    assert_eq!(a.body["patch"]["supported"], true);
    assert_eq!(a.body["filter"]["supported"], true);

    // The users the quickstart made are there (alice, bob), by userName filter.
    let alice = user_id(d, t, "alice");
    let bob = user_id(d, t, "bob");
    let a = call(d, t, "GET", &format!("/Users/{alice}"), None);
    ok(&a, 200, "alice");
    assert_eq!(a.body["active"], true);
    assert_eq!(a.body["groups"][0]["display"], "engineering");

    // A new user and a group of hers, as Entra ID sends them.
    let a = call(
        d,
        t,
        "POST",
        "/Users",
        Some(json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "externalId": "7f3c", "userName": "carol@example.com", "active": true,
            "displayName": "Carol", "emails": [{"primary": true, "type": "work",
                "value": "carol@example.com"}],
            "name": {"givenName": "Carol", "familyName": "C"},
        })),
    );
    ok(&a, 201, "create carol");
    let carol = a.body["id"].as_str().unwrap().to_string();
    ok(
        &call(
            d,
            t,
            "POST",
            "/Users",
            Some(json!({"userName": "Carol@Example.com"})),
        ),
        409,
        "duplicate userName",
    );
    let a = call(
        d,
        t,
        "POST",
        "/Groups",
        Some(
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "displayName": "Contractors", "members": [{"value": carol}]}),
        ),
    );
    ok(&a, 201, "create group");
    assert_eq!(a.body["members"][0]["display"], "carol@example.com");
    let (_, users, _) = d.admin(&["user", "list"]);
    assert!(
        users
            .lines()
            .any(|l| l.starts_with("carol@example.com") && l.contains("Contractors")),
        "{users}"
    );

    // Rename bob: same id, his device follows, his access (finance) too.
    let a = call(
        d,
        t,
        "PATCH",
        &format!("/Users/{bob}"),
        Some(patch(
            json!([{"op": "Replace", "path": "userName", "value": "bob@example.com"}]),
        )),
    );
    ok(&a, 200, "rename bob");
    assert_eq!(a.body["id"], bob.as_str());
    assert_eq!(user_id(d, t, "BOB@example.com"), bob);
    let (_, devices, _) = d.admin(&["device", "list", "--json"]);
    let devices: Value = serde_json::from_str(&devices).unwrap();
    let laptop = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "bob-laptop")
        .unwrap();
    assert_eq!(laptop["user"], "bob@example.com");
    let (pinged, out, _) = d.sh("laptop2", &format!("ping -c 1 -W 3 {APP}"));
    assert!(pinged, "bob after the rename: {out}");

    // Re-group: bob (finance) may not use the intranet web app; in engineering he may, at the
    // next flow; out of it again, not.
    assert!(!bob_reaches_web(d), "finance has no intranet");
    let eng = group_id(d, t, "engineering");
    let a = call(
        d,
        t,
        "PATCH",
        &format!("/Groups/{eng}"),
        Some(patch(
            json!([{"op": "Add", "path": "members", "value": [{"value": bob}]}]),
        )),
    );
    ok(&a, 200, "add bob to engineering");
    let took = wait_until(Duration::from_secs(10), || bob_reaches_web(d))
        .expect("bob in engineering reaches the intranet");
    println!(
        "[{backend}] membership added: bob's next flow allowed ({:.3} s incl. probe)",
        took.as_secs_f64()
    );
    let a = call(
        d,
        t,
        "PATCH",
        &format!("/Groups/{eng}"),
        Some(patch(
            json!([{"op": "remove", "path": format!("members[value eq \"{bob}\"]")}]),
        )),
    );
    ok(&a, 200, "remove bob from engineering");
    let took = wait_until(Duration::from_secs(10), || !bob_reaches_web(d))
        .expect("bob out of engineering is refused again");
    println!(
        "[{backend}] membership removed: bob's next flow denied ({:.3} s incl. probe)",
        took.as_secs_f64()
    );

    // Deactivate alice while her UDP flow runs: it is cut within a second or so.
    let pinger = Command::new("ip")
        .args([
            "netns",
            "exec",
            &d.ns("laptop"),
            "python3",
            "-c",
            PINGER,
            "6",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    std::thread::sleep(Duration::from_millis(1500));
    let sent_at = unix_now();
    let a = call(
        d,
        t,
        "PATCH",
        &format!("/Users/{alice}"),
        Some(patch(
            json!([{"op": "Replace", "value": {"active": false}}]),
        )),
    );
    let answered_at = unix_now();
    ok(&a, 200, "deactivate alice");
    assert_eq!(a.body["active"], false);
    let run = pinger.wait_with_output().unwrap();
    let run: Value = serde_json::from_slice(&run.stdout).unwrap_or_else(|_| {
        panic!(
            "pinger: {} {}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        )
    });
    let answers: Vec<f64> = run["answers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert!(
        answers.iter().any(|&a| a > sent_at - 0.5 && a < sent_at),
        "alice's flow was not running before the PATCH: {run}"
    );
    let last = answers.iter().copied().fold(0.0, f64::max);
    let cut = (last - sent_at).max(0.0);
    println!(
        "[{backend}] alice deactivated: PATCH answered in {:.3} s; her running flow's last \
         answer {:.3} s after the PATCH was sent ({} datagrams, one every 20 ms)",
        answered_at - sent_at,
        cut,
        run["sent"]
    );
    assert!(
        cut < 5.0,
        "alice's flow still answered {cut:.3} s after the deactivation"
    );
    assert!(
        answers.iter().all(|&a| a < sent_at + 5.0),
        "answers long after the deactivation: {run}"
    );
    let (_, users, _) = d.admin(&["user", "list"]);
    assert!(
        users
            .lines()
            .any(|l| l.starts_with("alice ") && l.ends_with("disabled")),
        "{users}"
    );
    let denied = d.decisions().into_iter().rev().any(|r| {
        r["event"] == "flow" && r["device"] == "alice-laptop" && r["reason"] == "user disabled"
    });
    assert!(denied, "no 'user disabled' decision for alice's laptop");

    // Active again (a string boolean, as Entra ID sends it): her traffic comes back.
    let a = call(
        d,
        t,
        "PATCH",
        &format!("/Users/{alice}"),
        Some(patch(
            json!([{"op": "replace", "path": "active", "value": "True"}]),
        )),
    );
    ok(&a, 200, "reactivate alice");
    assert_eq!(a.body["active"], true);
    let back = wait_until(Duration::from_secs(10), || {
        d.sh("laptop", &format!("curl -s -m 2 http://{APP}/"))
            .1
            .contains("Hello")
    });
    assert!(back.is_some(), "alice's access did not come back");

    // Deleting carol: gone for SCIM and the directory.
    ok(
        &call(d, t, "DELETE", &format!("/Users/{carol}"), None),
        204,
        "delete carol",
    );
    ok(
        &call(d, t, "GET", &format!("/Users/{carol}"), None),
        404,
        "carol deleted",
    );
    let (_, users, _) = d.admin(&["user", "list"]);
    assert!(!users.contains("carol"), "{users}");
    ok(
        &call(
            d,
            t,
            "GET",
            &format!("/Users{}", filter("title eq \"x\"")),
            None,
        ),
        400,
        "unsupported filter",
    );

    // Audited as the token's name; once revoked, the token is refused.
    let log = audit(d);
    assert!(
        log.contains("\"actor\":\"scim:entra\""),
        "no SCIM actor in the audit log"
    );
    let (_, list, _) = d.admin(&["scim-token", "list", "--json"]);
    let list: Value = serde_json::from_str(&list).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert!(list[0]["used_at"].is_u64(), "{list}");
    let (ok_, _, err) = d.admin(&["scim-token", "revoke", &id]);
    assert!(ok_, "{err}");
    ok(&call(d, t, "GET", "/Users", None), 401, "revoked token");
}

#[test]
fn scim_provisioning_on_sqlite() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    provisioning(&d, "sqlite");
}

#[test]
fn scim_provisioning_on_postgres() {
    if sekisho_tests::skip_netns() {
        return;
    }
    if std::env::var_os("SEKISHO_SKIP_POSTGRES").is_some() {
        eprintln!("SEKISHO_SKIP_POSTGRES set: PostgreSQL test skipped");
        return;
    }
    let pg = Postgres::start().expect("a local PostgreSQL for the broker");
    let url = pg.url();
    let Some(d) = Deployment::for_test_with(&[("SK_DATABASE", &url)]) else {
        return;
    };
    provisioning(&d, "postgres");
}
