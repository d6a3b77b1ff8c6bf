//! The admin console in a real browser: Debian's headless chromium, driven over WebDriver from
//! the admin's machine (the laptop namespace), against a quickstart with sign-in through the
//! OpenID provider, two brokers and two connectors.
//!
//! Screenshots of every page at a laptop and a phone width are saved under
//! `target/console-artifacts/`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use sekisho_tests::browser::{Browser, skip_browser};
use sekisho_tests::{Deployment, wait_until, workspace};

const CONSOLE: &str = "https://10.99.2.2:8443/console/";
const T: Duration = Duration::from_secs(20);

fn artifacts() -> PathBuf {
    workspace().join("target/console-artifacts")
}

/// `sekisho-client login` for alice on her laptop through the scripted browser, then her
/// client started and connected with a posture token.
fn alice_signs_in_her_laptop(d: &Deployment) {
    let browser = format!(
        "python3 {} --ca {} --user alice --password {}",
        workspace().join("tests/tools/oidc_browser.py").display(),
        d.state().join("idp/ca.pem").display(),
        d.idp_password("alice")
    );
    let (ok, _, err) = d.sh(
        "laptop",
        &format!(
            "BROWSER='{browser}' {} login --server https://10.99.2.2:8443 --ca {} \
             --name alice-laptop --dir {} --check-interval 200ms --socket {}",
            d.bin("sekisho-client").display(),
            d.state().join("pki/ca.pem").display(),
            d.state().join("alice").display(),
            d.state().join("alice/client.sock").display(),
        ),
    );
    assert!(ok, "alice's laptop sign-in: {err}");
    d.daemon("client-settings", "alice");
    d.daemon("start", "client-alice");
    let up = wait_until(Duration::from_secs(30), || {
        let s = d.client_status("alice");
        s["state"] == "connected" && s["posture"]["token_expires"].is_u64()
    });
    assert!(up.is_some(), "alice's client: {}", d.client_status("alice"));
}

fn browser(d: &Deployment) -> Browser {
    let (pki, idp) = (d.state().join("pki/ca.pem"), d.state().join("idp/ca.pem"));
    Browser::start(&d.ns("laptop"), &[&pki, &idp], &artifacts()).expect("browser")
}

/// Signs `user` in to the console through the identity provider, as a person would: the
/// console's button, the provider's login form, its consent page, back to the overview.
fn console_sign_in(b: &Browser, d: &Deployment, user: &str) {
    b.goto(CONSOLE).unwrap();
    b.wait_for("#sso", T).expect("the console's sign-in page");
    b.screenshot("login").unwrap();
    b.click("#sso").unwrap();
    b.wait_for("form#login", T)
        .expect("the provider's login form");
    b.fill("form#login input[name=login]", user).unwrap();
    b.fill("form#login input[name=password]", &d.idp_password(user))
        .unwrap();
    b.submit("form#login").unwrap();
    let landed = wait_until(T, || {
        b.exists("form#confirm").unwrap_or(false) || b.exists("header.top .who").unwrap_or(false)
    });
    assert!(landed.is_some(), "after login: {}", b.source().unwrap());
    if b.exists("form#confirm").unwrap() {
        b.submit("form#confirm").unwrap();
    }
    b.wait_for("header.top .who", T)
        .unwrap_or_else(|_| panic!("back in the console: {}", b.source().unwrap()));
    assert!(b.text("header.top .who").unwrap().contains(user));
}

/// A POST from the page with fetch (as a script of the page would): the HTTP status.
fn post_status(b: &Browser, path: &str, body: &str, with_csrf: bool) -> u64 {
    let v = b
        .execute(
            "const [path, body, withCsrf] = arguments;
             const t = document.querySelector('meta[name=csrf-token]').content;
             return fetch(path, {method: 'POST', credentials: 'same-origin',
                 headers: {'Content-Type': 'application/x-www-form-urlencoded'},
                 body: (withCsrf ? '_csrf=' + encodeURIComponent(t) + '&' : '') + body})
               .then(r => r.status);",
            &[json!(path), json!(body), json!(with_csrf)],
        )
        .unwrap();
    v.as_u64().unwrap_or_else(|| panic!("status: {v}"))
}

/// Every page at a laptop and a phone width: a screenshot, the accessibility smoke check and
/// no sideways scrolling.
fn check_pages(b: &mut Browser, pages: &[(&str, &str)]) {
    let mut problems = Vec::new();
    for (w, h) in [(1366, 900), (390, 844)] {
        b.set_size(w, h).unwrap();
        for (name, path) in pages {
            b.goto(&format!("https://10.99.2.2:8443{path}")).unwrap();
            b.wait_for("main h1", T).unwrap();
            let shot = b.screenshot(name).unwrap();
            assert!(shot.exists());
            for p in b.a11y_problems().unwrap() {
                problems.push(format!("{name} at {w}px: {p}"));
            }
            for p in b.overflow_problems().unwrap() {
                problems.push(format!("{name} at {w}px scrolls sideways: {p}"));
            }
        }
    }
    b.set_size(1366, 900).unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
}

fn reaches(d: &Deployment, what: &str) -> bool {
    match what {
        "http" => {
            d.sh("laptop", "curl -sf -m 3 -o /dev/null http://10.20.0.10/")
                .0
        }
        "ping" => d.sh("laptop", "ping -c1 -W2 10.20.0.10 >/dev/null").0,
        _ => unreachable!(),
    }
}

#[test]
fn the_console_in_a_browser() {
    if skip_browser() {
        return;
    }
    let Some(d) = Deployment::for_test_with(&[
        ("SK_SSO", "1"),
        ("SK_BROKERS", "2"),
        ("SK_CONNECTORS", "2"),
        // Posture requests (which carry the DNS block counts) every 10 s.
        ("SK_TOKEN_LIFETIME", "20s"),
    ]) else {
        return;
    };
    alice_signs_in_her_laptop(&d);
    // Traffic for the charts and a denial for the top reasons.
    assert!(reaches(&d, "http"));
    assert!(reaches(&d, "ping"));
    let (denied, _, _) = d.sh("laptop", "curl -s -m 2 http://10.20.0.10:5432/");
    assert!(!denied);
    // Two names the DNS filter blocks (category malware): counted on the laptop, reported with
    // its next posture request.
    for _ in 0..2 {
        let (_, out, _) = d.sh("laptop", "dig +time=2 +tries=1 blocked.example");
        assert!(out.contains("NXDOMAIN"), "{out}");
    }

    let mut b = browser(&d);
    console_sign_in(&b, &d, "alice");
    // The session cookie: Secure, HttpOnly, SameSite=Strict, expiring; nothing else kept.
    let cookies = b.cookies().unwrap();
    let session = cookies
        .iter()
        .find(|c| c.name == "__Host-sekisho-console")
        .unwrap_or_else(|| panic!("{cookies:?}"));
    assert!(session.secure && session.http_only, "{session:?}");
    assert_eq!(session.same_site.as_deref(), Some("Strict"));
    assert!(session.expiry.is_some(), "{session:?}");

    // Overview: both brokers, both connectors linked, charts with data.
    let charted = wait_until(Duration::from_secs(40), || {
        b.goto(CONSOLE).unwrap();
        b.exists("#chart-decisions path.series").unwrap()
            && b.exists("#chart-throughput path.series").unwrap()
    });
    assert!(charted.is_some(), "charts: {}", b.source().unwrap());
    // Not a flat line: the highest rate of decisions is above zero.
    let label = b
        .execute(
            "return document.querySelector('#chart-decisions svg').getAttribute('aria-label');",
            &[],
        )
        .unwrap();
    assert!(!label.as_str().unwrap().contains("highest 0 /s"), "{label}");
    let brokers = b.texts("#broker-table tbody tr").unwrap();
    assert_eq!(brokers.len(), 2, "{brokers:?}");
    assert!(
        brokers.iter().any(|r| r.contains("region-2")),
        "{brokers:?}"
    );
    let links = b.texts("#link-table tbody tr").unwrap();
    assert_eq!(links.len(), 2, "{links:?}");
    assert!(links.iter().all(|l| l.contains(" up")), "{links:?}");
    assert!(
        b.text("#denial-table").unwrap().contains("rule"),
        "{}",
        b.text("main").unwrap()
    );

    // DNS blocks: alice's laptop, two in malware (the names stay on the laptop).
    let blocks = wait_until(Duration::from_secs(30), || {
        b.goto(&format!("{CONSOLE}dns")).unwrap();
        b.text("#dns-table")
            .is_ok_and(|t| t.contains("alice-laptop") && t.contains("malware: 2"))
    });
    assert!(blocks.is_some(), "{}", b.text("main").unwrap());
    assert!(!b.text("main").unwrap().contains("blocked.example"));

    // Live decisions, denied only: alice's database attempt with its rule; a new one appears
    // without reloading (the page's script refreshes the rows).
    b.goto(&format!("{CONSOLE}decisions?denied=on&user=alice"))
        .unwrap();
    let rows = || b.texts("#decision-table tbody tr").unwrap();
    let before = rows();
    assert!(
        before
            .iter()
            .any(|r| r.contains("10.20.0.10:5432") && r.contains("no-database-from-laptops")),
        "{before:?}"
    );
    assert!(before.iter().all(|r| r.contains("deny")), "{before:?}");
    let (denied, _, _) = d.sh("laptop", "curl -s -m 2 http://10.20.0.10:5432/");
    assert!(!denied);
    let live = wait_until(Duration::from_secs(15), || rows().len() > before.len());
    assert!(live.is_some(), "no new row without a reload: {:?}", rows());

    // Devices: alice's laptop with its posture.
    b.goto(&format!("{CONSOLE}devices?q=alice")).unwrap();
    let row = "tr[data-device='alice-laptop']";
    b.wait_for(row, T).unwrap();
    assert_eq!(b.text(&format!("{row} td.posture")).unwrap(), "passes");
    b.goto(&format!("{CONSOLE}devices/alice-laptop")).unwrap();
    let posture = b.text("#posture-table").unwrap();
    assert!(
        posture.contains("edr-running") && !posture.contains("fails"),
        "{posture}"
    );

    // Why? alice to the database names the deny rule.
    b.goto(&format!("{CONSOLE}why")).unwrap();
    b.fill("#user", "alice").unwrap();
    b.fill("#to", "10.20.0.10:5432").unwrap();
    b.submit("form.filters").unwrap();
    b.wait_for("#why-rule", T).unwrap();
    assert_eq!(b.text("#why-rule").unwrap(), "no-database-from-laptops");
    assert!(b.text(".verdict").unwrap().starts_with("deny"));
    // A name works too (an application known by its DNS name).
    b.goto(&format!("{CONSOLE}why?user=alice&to=wiki.corp.example"))
        .unwrap();
    assert_eq!(b.text("#why-rule").unwrap(), "engineering-by-name");

    // Users: bob (who has not signed in yet) made in the console, in finance; the policy's
    // tests name him.
    b.goto(&format!("{CONSOLE}users")).unwrap();
    b.fill("#new-user", "bob").unwrap();
    b.fill("#new-groups", "finance").unwrap();
    b.submit("form[action='/console/users/new/create']")
        .unwrap();
    b.wait_text("p.flash", "User bob created", T).unwrap();
    assert!(b.text("#user-table").unwrap().contains("finance"));

    // Policy: an edit whose policy test fails is refused with the test's message (checked as
    // it is typed too); a good one applies and takes effect; rollback brings the old back.
    b.goto(&format!("{CONSOLE}policy")).unwrap();
    let original = b
        .execute("return document.getElementById('policy-text').value", &[])
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let deny_rule = "[[rules]]\nname = \"no-database-from-laptops\"\naction = \"deny\"\n\
                     groups = [\"engineering\", \"finance\"]\napplications = [\"database\"]\n";
    assert!(original.contains(deny_rule));
    let set_text = |text: &str| {
        b.execute(
            "const t = document.getElementById('policy-text'); t.value = arguments[0];
             t.dispatchEvent(new Event('input', {bubbles: true}));",
            &[json!(text)],
        )
        .unwrap();
    };
    // Someone opens the database to laptops: the policy's own test says no.
    set_text(&original.replace(
        deny_rule,
        &deny_rule.replace("action = \"deny\"", "action = \"allow\""),
    ));
    b.wait_text("#policy-result", "policy tests fail", T)
        .expect("checked as typed");
    b.submit("#apply").unwrap();
    b.wait_for("#policy-result .error", T).unwrap();
    let refused = b.text("#policy-result").unwrap();
    assert!(refused.contains("1 of"), "{refused}");
    assert!(refused.contains("no database from laptops"), "{refused}");
    assert!(
        b.text("#policy-result tr.fail").unwrap().contains("allow"),
        "the failing test says what it got: {refused}"
    );
    let version = |b: &Browser| -> u64 {
        b.goto(&format!("{CONSOLE}policy")).unwrap();
        b.text("#policy-version").unwrap().parse().unwrap()
    };
    let before = version(&b);
    let good = original.replace(
        "applications = [\"intranet-web\", \"echo\", \"app-net-ping\"]",
        "applications = [\"intranet-web\", \"echo\"]",
    );
    assert_ne!(good, original);
    set_text(&good);
    b.wait_text("#policy-result", "policy tests pass", T)
        .unwrap();
    assert!(
        b.text("#policy-result pre.diff")
            .unwrap()
            .contains("-applications")
    );
    b.submit("#apply").unwrap();
    b.wait_text("p.flash", "is in force", T).unwrap();
    assert_eq!(version(&b), before + 1);
    let cut = wait_until(Duration::from_secs(10), || !reaches(&d, "ping"));
    assert!(cut.is_some(), "alice still pings the app network");
    assert!(reaches(&d, "http"));
    b.submit(&format!(
        "form[action='/console/policy/rollback/{before}'] button"
    ))
    .unwrap();
    b.wait_text("p.flash", &format!("Rolled back to version {before}"), T)
        .unwrap();
    let back = wait_until(Duration::from_secs(10), || reaches(&d, "ping"));
    assert!(back.is_some(), "the rollback did not bring ping back");

    // Drain one of the site's two connectors: its links on both brokers take no new flows,
    // alice's new flows go through the other; resume brings it back.
    b.goto(&format!("{CONSOLE}connectors")).unwrap();
    let names = b
        .execute(
            "return [...document.querySelectorAll('#connector-table tr[data-connector]')]
                 .map(r => r.dataset.connector);",
            &[],
        )
        .unwrap();
    let names: Vec<String> = serde_json::from_value(names).unwrap();
    assert_eq!(names.len(), 2, "{names:?}");
    let drained = &names[0];
    b.submit(&format!(
        "form[action='/console/connectors/{drained}/drain'] button"
    ))
    .unwrap();
    b.wait_text("p.flash", "drained", T).unwrap();
    let held = |d: &Deployment, sock: &str| -> Vec<(String, bool, String)> {
        let out = std::process::Command::new(d.bin("sekisho-broker"))
            .args(["stats", "--socket"])
            .arg(d.state().join(format!("{sock}.sock")))
            .output()
            .unwrap()
            .stdout;
        let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
        v["connectors"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|l| {
                (
                    l["connector"].as_str().unwrap_or("").to_string(),
                    l["held"].as_bool().unwrap_or(false),
                    l["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    // Both brokers hold it (the second one learns it from the store).
    for broker in ["broker", "broker2"] {
        let ok = wait_until(Duration::from_secs(10), || {
            let links = held(&d, broker);
            links.len() == 2
                && links
                    .iter()
                    .all(|(n, h, st)| (n == drained) == *h && (n == drained) == (st == "draining"))
        });
        assert!(ok.is_some(), "{broker}: {:?}", held(&d, broker));
    }
    assert!(reaches(&d, "http"), "the other connector carries new flows");
    b.goto(CONSOLE).unwrap();
    assert!(b.text("#link-table").unwrap().contains("draining"));
    b.goto(&format!("{CONSOLE}connectors")).unwrap();
    assert!(
        b.text("#connector-table")
            .unwrap()
            .contains("drained by an admin")
    );
    b.submit(&format!(
        "form[action='/console/connectors/{drained}/resume'] button"
    ))
    .unwrap();
    b.wait_text("p.flash", "takes new flows again", T).unwrap();
    let resumed = wait_until(Duration::from_secs(10), || {
        ["broker", "broker2"].iter().all(|broker| {
            let links = held(&d, broker);
            links.len() == 2 && links.iter().all(|(_, h, st)| !h && st == "up")
        })
    });
    assert!(resumed.is_some());

    // CSRF: a POST without the form's token is refused.
    b.goto(&format!("{CONSOLE}devices")).unwrap();
    assert_eq!(
        post_status(&b, "/console/devices/alice-laptop/revoke", "", false),
        403
    );

    // Every page, both widths (before alice's device is revoked).
    check_pages(
        &mut b,
        &[
            ("overview", "/console/"),
            ("users", "/console/users"),
            ("devices", "/console/devices"),
            ("device", "/console/devices/alice-laptop"),
            ("connectors", "/console/connectors"),
            ("policy", "/console/policy"),
            ("why", "/console/why?user=alice&to=10.20.0.10%3A5432"),
            ("decisions", "/console/decisions"),
            ("dns", "/console/dns"),
            ("audit", "/console/audit"),
        ],
    );

    // Revoking alice's laptop in the console cuts her traffic.
    b.goto(&format!("{CONSOLE}devices/alice-laptop")).unwrap();
    b.submit("form[action='/console/devices/alice-laptop/revoke'] button")
        .unwrap();
    b.wait_text("p.flash", "revoked", T).unwrap();
    let cut = wait_until(Duration::from_secs(10), || !reaches(&d, "http"));
    assert!(
        cut.is_some(),
        "alice still reaches the app after the revoke"
    );
    // Audited like the CLI's revoke, by the admin who clicked.
    let audit = std::fs::read_to_string(d.state().join("audit.jsonl")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"device_revoked\"")
            && l.contains("alice-laptop")
            && l.contains("sso:alice")),
        "{audit}"
    );
    drop(b);

    // An auditor sees everything and can change nothing.
    let mut b = browser(&d);
    check_pages(&mut b, &[("login", "/console/login")]);
    console_sign_in(&b, &d, "carol");
    assert!(b.text("header.top .who").unwrap().contains("auditor"));
    for page in ["devices", "users", "connectors", "policy"] {
        b.goto(&format!("{CONSOLE}{page}")).unwrap();
        b.wait_for("main h1", T).unwrap();
        let buttons = b.texts("main form[method=post] button").unwrap();
        // Checking a policy text changes nothing: the only button an auditor gets.
        let allowed: &[&str] = if page == "policy" { &["Check"] } else { &[] };
        assert_eq!(buttons, allowed, "{page}");
    }
    b.goto(&format!("{CONSOLE}policy")).unwrap();
    assert!(!b.exists("#apply").unwrap());
    assert!(b.text("#policy-text").is_ok());
    // Why? is read-only: the auditor may ask it.
    b.goto(&format!("{CONSOLE}why?user=alice&to=10.20.0.10:5432"))
        .unwrap();
    assert_eq!(b.text("#why-rule").unwrap(), "no-database-from-laptops");
    b.goto(&format!("{CONSOLE}devices")).unwrap();
    for (path, body) in [
        ("/console/devices/alice-laptop/class", "class=personal"),
        ("/console/policy/apply", "text=x"),
        ("/console/connectors/x/revoke", ""),
        ("/console/users/alice/disable", ""),
    ] {
        assert_eq!(post_status(&b, path, body, true), 403, "{path}");
    }
    let audit = std::fs::read_to_string(d.state().join("audit.jsonl")).unwrap();
    let refused = audit
        .lines()
        .filter(|l| l.contains("\"admin_refused\"") && l.contains("sso:carol"))
        .count();
    assert!(refused >= 4, "{audit}");

    drop(b);

    // Break-glass with a helpdesk's admin token: a console session of its own (the token
    // itself is not kept by the browser), devices only; sign-out ends the session.
    let (ok, out, err) = d.admin(&[
        "--json",
        "admin-token",
        "create",
        "desk",
        "--role",
        "helpdesk",
    ]);
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let token = created["token"].as_str().unwrap();
    let b = browser(&d);
    b.goto(&format!("{CONSOLE}login")).unwrap();
    b.click("details summary").unwrap();
    b.fill("#token", token).unwrap();
    b.submit("form[action='/console/login/token']").unwrap();
    b.wait_for("#device-table", T)
        .unwrap_or_else(|_| panic!("helpdesk lands on devices: {}", b.source().unwrap()));
    assert_eq!(b.texts("header.top nav a").unwrap(), ["Devices"]);
    assert!(b.text("header.top .who").unwrap().contains("helpdesk"));
    let cookies = b.cookies().unwrap();
    let session = cookies
        .iter()
        .find(|c| c.name == "__Host-sekisho-console")
        .unwrap();
    assert_ne!(session.value, token);
    for (page, api) in [
        ("users", "GET /v1/admin/users"),
        ("audit", "GET /v1/admin/audit"),
        ("decisions", "GET /v1/admin/decisions"),
        ("policy", "GET /v1/admin/policy"),
        (
            "why?user=alice&to=10.20.0.10:5432",
            "POST /v1/admin/explain",
        ),
    ] {
        b.goto(&format!("{CONSOLE}{page}")).unwrap();
        let main = b.text("main").unwrap();
        assert!(
            main.contains(&format!("the helpdesk role may not {api}")),
            "{page}: {main}"
        );
    }
    // Devices, without what the API gives only through explain (posture, risk, sign-in).
    b.goto(&format!("{CONSOLE}devices/alice-laptop")).unwrap();
    let main = b.text("main").unwrap();
    assert!(
        !b.exists("#posture-table").unwrap() && !main.contains("Risk"),
        "{main}"
    );
    b.submit("form.signout button").unwrap();
    b.wait_text("p.flash", "Signed out", T).unwrap();
    b.goto(&format!("{CONSOLE}devices")).unwrap();
    b.wait_for("#sso", T).expect("back at the sign-in page");
    let audit = std::fs::read_to_string(d.state().join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"admin_sign_out\""), "{audit}");
    // The signed-out session's cookie, replayed, is worth nothing.
    let replay = |cookie: &str| -> String {
        let (_, out, _) = d.sh(
            "laptop",
            &format!(
                "curl -sk -o /dev/null -w '%{{http_code}} %{{redirect_url}}' \
                 -b '__Host-sekisho-console={cookie}' {CONSOLE}devices"
            ),
        );
        out
    };
    assert!(
        replay(&session.value).starts_with("303 "),
        "{}",
        replay(&session.value)
    );
    assert!(replay(&session.value).ends_with("/console/login"));
    // A session ends with the token it was made from.
    b.goto(&format!("{CONSOLE}login")).unwrap();
    b.click("details summary").unwrap();
    b.fill("#token", token).unwrap();
    b.submit("form[action='/console/login/token']").unwrap();
    b.wait_for("#device-table", T).unwrap();
    let (ok, _, err) = d.admin(&["admin-token", "revoke", created["id"].as_str().unwrap()]);
    assert!(ok, "{err}");
    b.goto(&format!("{CONSOLE}devices")).unwrap();
    b.wait_for("#sso", T)
        .expect("the session ended with its token");
    assert!(b.text("p.flash").unwrap().contains("no longer valid"));
    // The provider's words in a crafted callback link are not shown.
    b.goto(&format!(
        "{CONSOLE}callback?error=access_denied&error_description=Call%20555-0100%20now"
    ))
    .unwrap();
    b.wait_for("#sso", T).unwrap();
    let main = b.text("main").unwrap();
    assert!(!main.contains("555"), "{main}");
    assert!(main.contains("not started in this browser"), "{main}");

    // The console's views lose nothing yet; their counters are in stats and the metrics.
    assert_eq!(d.stats()["console_forgotten"]["decisions"], 0);
    let (_, metrics, _) = d.sh("broker", "curl -s http://127.0.0.1:9464/metrics");
    assert!(
        metrics.contains("console_forgotten") && metrics.contains("ring=\"decisions\""),
        "{metrics}"
    );
}
