//! Self-test of the browser driver (`sekisho_tests::browser`), without any Sekisho binary: a
//! namespace of its own with only `lo`, two throwaway CAs made with openssl, and a small Python
//! HTTPS server in the namespace on 127.0.0.1 (port 8443 with a certificate of the CA the browser
//! trusts, 8444 with one of a CA it does not). Checks navigation, forms, cookies, waiting, the
//! accessibility and overflow checks (a good page passes, a bad one reports each of its
//! problems), full-page screenshots of the asked width, the refusal of the untrusted
//! certificate, that a test panicking with a browser open leaves no process behind, and that
//! what a killed test process left is removed by the next start.
//!
//! Skipped (reason printed) when not root or chromium, chromedriver or certutil are missing,
//! unless `SEKISHO_REQUIRE_BROWSER=1` or `SEKISHO_REQUIRE_CONTAINERS=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use sekisho_tests::browser::{Browser, processes_using, skip_browser};
use sekisho_tests::{unique_tag, wait_until};

const GOOD: &str = "https://127.0.0.1:8443";
const OTHER: &str = "https://127.0.0.1:8444";

/// The test server: fixed pages, a form echo, cookies; serves GOOD and OTHER.
const SERVER: &str = r#"
import html, http.server, ssl, sys, threading, urllib.parse

DIR = sys.argv[1]
CSS = """
body { font-family: sans-serif; color: #222; background: #fff; margin: 0 auto; max-width: 40rem; padding: 1rem; }
header { background: #1a3d6d; padding: .5rem; }
header a { color: #fff; }
label { display: block; margin-top: .5rem; }
input, textarea, select { width: 100%; box-sizing: border-box; }
"""

def page(title, body, lang='en'):
    return ('<!doctype html><html lang="%s"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<title>%s</title><style>%s</style></head><body>%s</body></html>' % (lang, title, CSS, body))

DOT = 'data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=='

PAGES = {
    '/': page('Home',
        '<header><a href="/">Self-test</a></header><main><h1>Welcome</h1>'
        '<p id="intro">A page that passes the checks.</p><h2>Details</h2>'
        '<p>Some text and <a href="/form">a link to the form</a>.</p>'
        '<p><img src="%s" alt="A dot" width="20" height="20"> '
        '<button type="button" aria-label="Close">&times;</button></p>'
        '<h3>More</h3><p class="muted" style="color:#595959">Quieter text, still readable.</p>'
        '<p style="font-size:24px;color:#949494">Large text needs only 3:1.</p></main>' % DOT),
    '/form': page('Form',
        '<main><h1>Send a note</h1><form id="f" method="post" action="/echo">'
        '<input type="hidden" name="csrf" value="t0ken">'
        '<label for="name">Name</label><input id="name" name="name">'
        '<label for="note">Note</label><textarea id="note" name="note" rows="4"></textarea>'
        '<label>Colour <select id="color" name="color"><option value="red">Red</option>'
        '<option value="green">Green</option><option value="blue">Blue</option></select></label>'
        '<p><button type="submit">Send</button></p></form></main>'),
    '/bad': page('Bad',
        '<h1>First heading</h1><h1>Second heading</h1><h3>Skipped a level</h3>'
        '<input id="unlabeled" type="text">'
        '<p class="faint" style="color:#bbb">Light grey text on white</p>'
        '<img src="%s" width="20" height="20"><button type="button"></button>'
        '<div id="wide" style="width:1000px;background:#eee">A box 1000 pixels wide</div>' % DOT),
    '/late': page('Late',
        '<main><h1>Later</h1><p id="status">loading</p></main><script>setTimeout(function () {'
        'document.getElementById("status").textContent = "ready";'
        'var p = document.createElement("p"); p.id = "late"; p.textContent = "arrived";'
        'document.querySelector("main").append(p); }, 700);</script>'),
    '/long': page('Long', '<main><h1>Long</h1>' + ''.join(
        '<p style="height:100px;margin:0">Line %d</p>' % i for i in range(40)) + '</main>'),
}

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write('%s %s\n' % (self.server.server_address[1], fmt % args))

    def reply(self, body, status=200, cookies=()):
        data = body.replace('</head>', '<meta name="served-by" content="%d"></head>'
                            % self.server.server_address[1]).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'text/html; charset=utf-8')
        self.send_header('Content-Length', str(len(data)))
        for c in cookies:
            self.send_header('Set-Cookie', c)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path not in PAGES:
            return self.reply(page('Not found', '<h1>Not found</h1>'), 404)
        cookies = ()
        if self.path == '/':
            cookies = ('session=s3cr3t; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=3600',
                       'theme=dark; Path=/; SameSite=Lax')
        self.reply(PAGES[self.path], cookies=cookies)

    def do_POST(self):
        n = int(self.headers.get('Content-Length', 0))
        form = urllib.parse.parse_qs(self.rfile.read(n).decode(), keep_blank_values=True)
        get = lambda k: html.escape(form.get(k, [''])[0])
        self.reply(page('Echo', '<main><h1>Received</h1><p>Name: <span id="name">%s</span></p>'
                        '<pre id="note">%s</pre><p>Colour: <span id="color">%s</span></p>'
                        '<p>Token: <span id="csrf">%s</span></p></main>'
                        % (get('name'), get('note'), get('color'), get('csrf'))))

def serve(port, name):
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain('%s/%s.pem' % (DIR, name), '%s/%s.key' % (DIR, name))
    # Handshakes in the handler threads, so one stuck client does not hold the others.
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

serve(8443, 'good')
serve(8444, 'other')
open(DIR + '/ready', 'w').close()
threading.Event().wait()
"#;

/// A network namespace with `lo` up, deleted on drop (with anything still running in it).
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        // unique_tag's form (skt<pid>x<n>): what a killed run leaves is swept by later runs.
        let name = format!("{}br", unique_tag());
        run("ip", &["netns", "add", &name]);
        let ns = Netns(name);
        run("ip", &["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespace, the CAs and certificates, and the server. Field order is drop order: the
/// server goes before its namespace.
struct Site {
    server: Child,
    dir: PathBuf,
    ns: Netns,
}

impl Site {
    fn start() -> Site {
        let ns = Netns::new();
        let dir = std::env::temp_dir().join(format!("sekisho-browser-test-{}", ns.0));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Two CAs; a server certificate for 127.0.0.1 from each.
        let script = r#"
set -e
for name in good other; do
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout $name-ca.key -out $name-ca.pem -subj "/CN=Sekisho browser self-test $name CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $name.key \
    -out $name.csr -subj /CN=127.0.0.1
  printf '%s\n' subjectAltName=IP:127.0.0.1 basicConstraints=critical,CA:FALSE \
    keyUsage=critical,digitalSignature extendedKeyUsage=serverAuth subjectKeyIdentifier=hash \
    authorityKeyIdentifier=keyid > $name.ext
  openssl x509 -req -in $name.csr -CA $name-ca.pem -CAkey $name-ca.key -set_serial 0x$(openssl rand -hex 8) \
    -days 2 -extfile $name.ext -out $name.pem
done
"#;
        let out = Command::new("bash")
            .args(["-c", script])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(dir.join("server.py"), SERVER).unwrap();
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let server = Command::new("ip")
            .args(["netns", "exec", &ns.0, "python3"])
            .arg(dir.join("server.py"))
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let site = Site { server, dir, ns };
        let ready = wait_until(Duration::from_secs(10), || site.dir.join("ready").exists());
        assert!(
            ready.is_some(),
            "the test server did not start: {}",
            std::fs::read_to_string(site.dir.join("server.log")).unwrap_or_default()
        );
        site
    }

    fn ca(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-ca.pem"))
    }

    fn browser(&self, artifacts: &Path) -> Browser {
        let t = Instant::now();
        let b = Browser::start(&self.ns.0, &[&self.ca("good")], artifacts)
            .unwrap_or_else(|e| panic!("cannot start the browser: {e:#}"));
        eprintln!("browser started in {:?}", t.elapsed());
        b
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        if std::thread::panicking() {
            eprintln!(
                "test server log:\n{}",
                std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Screenshots and logs of a test: kept in the target folder for a look.
fn artifacts(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("browser-selftest")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Whether process `pid` exists and is not a zombie (whose parent has yet to reap it).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Width and height of a PNG file, from its IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(
        &data[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is no PNG",
        path.display()
    );
    assert_eq!(&data[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn navigation_forms_cookies_waiting_and_trust() {
    if skip_browser() {
        return;
    }
    let started = Instant::now();
    let site = Site::start();
    let b = site.browser(&artifacts("navigation"));

    // Navigation, title, texts.
    b.goto(&format!("{GOOD}/")).unwrap();
    assert_eq!(b.title().unwrap(), "Home");
    assert_eq!(b.current_url().unwrap(), format!("{GOOD}/"));
    assert_eq!(b.text("h1").unwrap(), "Welcome");
    assert_eq!(b.texts("h2, h3").unwrap(), ["Details", "More"]);
    assert!(b.exists("#intro").unwrap());
    assert!(!b.exists("#nothing-like-this").unwrap());
    assert!(b.text("#nothing-like-this").is_err());
    assert!(b.source().unwrap().contains("<h1>Welcome</h1>"));

    // Cookies, with their attributes.
    let cookies = b.cookies().unwrap();
    let session = cookies.iter().find(|c| c.name == "session").unwrap();
    assert_eq!(session.value, "s3cr3t");
    assert!(session.secure && session.http_only);
    assert_eq!(session.same_site.as_deref(), Some("Strict"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry = session.expiry.expect("session has Max-Age");
    assert!((now + 3500..=now + 3700).contains(&expiry), "{expiry}");
    let theme = cookies.iter().find(|c| c.name == "theme").unwrap();
    assert!(!theme.secure && !theme.http_only && theme.expiry.is_none());
    assert_eq!(theme.same_site.as_deref(), Some("Lax"));

    // A link, then a form: filled (twice: fill clears), a multi-line textarea, a select by
    // value and by label, submitted as a form; the echo is the next page.
    b.click("a[href='/form']").unwrap();
    b.wait_for("form#f", Duration::from_secs(5)).unwrap();
    assert_eq!(b.title().unwrap(), "Form");
    let name = "Ada <Lovelace> & Co. «ünïcødé»";
    let note = "line one\nline two\n  indented\r\nlast";
    b.fill("#name", "first try").unwrap();
    b.fill("#name", name).unwrap();
    b.fill("#note", note).unwrap();
    b.select("#color", "Blue").unwrap();
    assert_eq!(
        b.execute("return document.querySelector('#color').value;", &[])
            .unwrap(),
        "blue"
    );
    b.select("#color", "green").unwrap();
    b.submit("form#f").unwrap();
    assert_eq!(b.title().unwrap(), "Echo");
    assert_eq!(b.text("#name").unwrap(), name);
    let echoed = b
        .execute("return document.querySelector('#note').textContent;", &[])
        .unwrap();
    assert_eq!(echoed, note.replace("\r\n", "\n"));
    assert_eq!(b.text("#color").unwrap(), "green");
    assert_eq!(b.text("#csrf").unwrap(), "t0ken");

    // Submitting by its button, a one-line input given a newline (set by script).
    b.goto(&format!("{GOOD}/form")).unwrap();
    b.fill("#name", "two\nlines").unwrap();
    b.submit("button[type=submit]").unwrap();
    assert_eq!(b.title().unwrap(), "Echo");
    // An input drops newlines from its value, as it would from pasted text.
    assert_eq!(b.text("#name").unwrap(), "twolines");

    // Waiting for what a script adds later.
    b.goto(&format!("{GOOD}/late")).unwrap();
    assert!(!b.exists("#late").unwrap());
    let t = Instant::now();
    b.wait_for("#late", Duration::from_secs(5)).unwrap();
    b.wait_text("#status", "ready", Duration::from_secs(5))
        .unwrap();
    eprintln!("#late appeared after {:?}", t.elapsed());
    let t = Instant::now();
    let err = b
        .wait_for("#never", Duration::from_millis(300))
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(err.to_string().contains("#never"), "{err}");
    assert!(
        b.wait_text("#status", "never", Duration::from_millis(300))
            .is_err()
    );

    // Scripts with arguments.
    assert_eq!(
        b.execute("return arguments[0] + arguments[1];", &[json!(2), json!(3)])
            .unwrap(),
        json!(5)
    );

    // A certificate from a CA not given to the browser: refused, the page never shown.
    let refused = b.goto(&format!("{OTHER}/"));
    let source = b.source().unwrap_or_default();
    eprintln!(
        "untrusted certificate: goto -> {:?}; title {:?}",
        refused.as_ref().map_err(|e| e.to_string()),
        b.title().unwrap_or_default()
    );
    assert!(
        !source.contains(r#"content="8444""#),
        "the page behind the untrusted certificate was shown"
    );
    match refused {
        Err(e) => assert!(e.to_string().contains("insecure certificate"), "{e}"),
        Ok(()) => assert_ne!(b.title().unwrap(), "Home"),
    }
    // The trusted server still works after the refusal.
    b.goto(&format!("{GOOD}/")).unwrap();
    assert!(b.source().unwrap().contains(r#"content="8443""#));

    eprintln!("navigation test took {:?}", started.elapsed());
}

#[test]
fn page_checks_and_screenshots() {
    if skip_browser() {
        return;
    }
    let started = Instant::now();
    let site = Site::start();
    let art = artifacts("checks");
    let mut b = site.browser(&art);

    // A good page: no problems at desktop and phone widths; screenshots of those widths.
    b.goto(&format!("{GOOD}/")).unwrap();
    for (w, h) in [(1366, 768), (390, 844)] {
        b.set_size(w, h).unwrap();
        assert_eq!(b.viewport().unwrap(), (w, h));
        assert_eq!(b.a11y_problems().unwrap(), Vec::<String>::new(), "at {w}px");
        assert_eq!(
            b.overflow_problems().unwrap(),
            Vec::<String>::new(),
            "at {w}px"
        );
        let shot = b.screenshot("good").unwrap();
        assert_eq!(shot, art.join(format!("good-{w}.png")));
        let (pw, ph) = png_size(&shot);
        assert_eq!(pw, w, "{}", shot.display());
        assert!(ph >= h, "{}: height {ph}", shot.display());
    }
    // The form page too (labels of all three kinds of field).
    b.goto(&format!("{GOOD}/form")).unwrap();
    assert_eq!(b.a11y_problems().unwrap(), Vec::<String>::new());
    assert_eq!(b.overflow_problems().unwrap(), Vec::<String>::new());

    // A full-page screenshot is as tall as the page, not the viewport.
    b.goto(&format!("{GOOD}/long")).unwrap();
    let widths = b
        .execute(
            "return [innerWidth, document.documentElement.clientWidth];",
            &[],
        )
        .unwrap();
    assert_eq!(widths, json!([390, 390]), "no scrollbar takes layout width");
    let (pw, ph) = png_size(&b.screenshot("long").unwrap());
    assert_eq!(pw, 390);
    assert!(ph > 4000, "a 4,000px page shot {ph}px tall");

    // A bad page: each problem reported, naming its element; nothing else.
    b.goto(&format!("{GOOD}/bad")).unwrap();
    b.set_size(1366, 768).unwrap();
    let problems = b.a11y_problems().unwrap();
    eprintln!("problems of the bad page:\n  {}", problems.join("\n  "));
    let expect = [
        "input#unlabeled: form field without an accessible name",
        "2 <h1> elements, expected exactly one: h1 \"First heading\", h1 \"Second heading\"",
        "h3 \"Skipped a level\": heading level skipped (h1 → h3)",
        "p.faint \"Light grey text on white\": contrast 1.92:1, below 4.5:1 (text rgb(187, 187, \
         187) on rgb(255, 255, 255), 16px)",
        "img (src data:image/png",
        "button: button without text or aria-label",
    ];
    for e in expect {
        assert!(
            problems.iter().any(|p| p.starts_with(e)),
            "no problem starting {e:?} in {problems:#?}"
        );
    }
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
    assert_eq!(b.overflow_problems().unwrap(), Vec::<String>::new());
    b.set_size(390, 844).unwrap();
    let overflow = b.overflow_problems().unwrap();
    eprintln!("overflow of the bad page:\n  {}", overflow.join("\n  "));
    assert!(
        overflow[0].starts_with("the page scrolls sideways at 390px"),
        "{overflow:?}"
    );
    assert!(
        overflow
            .iter()
            .any(|p| p.starts_with("div#wide \"A box 1000 pixels wide\": 1000px wide")),
        "{overflow:?}"
    );
    let (pw, _) = png_size(&b.screenshot("bad").unwrap());
    assert_eq!(pw, 390);

    // Missing lang and title are caught too.
    b.goto("data:text/html,<h1>No title</h1>").unwrap();
    let problems = b.a11y_problems().unwrap();
    assert_eq!(
        problems,
        ["<html> has no lang attribute", "the page has no <title>"]
    );

    eprintln!("checks test took {:?}", started.elapsed());
}

#[test]
fn a_failed_test_leaves_no_browser_behind() {
    if skip_browser() {
        return;
    }
    let ns = Netns::new();
    let art = artifacts("panic");

    // What a killed test process left (its folder and a process with its mark) is removed by
    // the next start.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let stale = std::env::temp_dir().join(format!("sekisho-browser-{dead_pid}-0"));
    std::fs::create_dir_all(&stale).unwrap();
    let mut leftover = Command::new("sleep")
        .arg("300")
        .env("SEKISHO_BROWSER_DIR", &stale)
        .spawn()
        .unwrap();
    assert_eq!(processes_using(&stale), [leftover.id() as i32]);

    let (tx, rx) = std::sync::mpsc::channel();
    let art2 = art.clone();
    let name = ns.0.clone();
    let t = Instant::now();
    let result = std::thread::Builder::new()
        .name("deliberately-panicking-test".into())
        .spawn(move || {
            let b = Browser::start(&name, &[], &art2).unwrap();
            b.goto("data:text/html,<title>t</title>").unwrap();
            tx.send((b.temp_dir().to_path_buf(), b.processes()))
                .unwrap();
            panic!("a deliberate failure with the browser open");
        })
        .unwrap()
        .join();
    assert!(result.is_err());
    let swept = leftover.try_wait().unwrap().is_some();
    let _ = leftover.kill();
    let _ = leftover.wait();
    assert!(swept, "the leftover process ran on");
    assert!(!stale.exists(), "{} was not swept", stale.display());

    let (dir, pids) = rx.recv().unwrap();
    eprintln!(
        "browser processes {pids:?} gone {:?} after starting",
        t.elapsed()
    );
    // chromedriver, chromium and its helpers.
    assert!(pids.len() >= 3, "{pids:?}");
    assert_eq!(processes_using(&dir), Vec::<i32>::new());
    for pid in pids {
        assert!(!running(pid), "process {pid} is still running");
    }
    assert!(!dir.exists(), "{} is still there", dir.display());
    // The chromedriver log was kept for a look.
    let kept = std::fs::read_dir(&art).unwrap().flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .ends_with("chromedriver.log")
    });
    assert!(kept, "no chromedriver log in {}", art.display());
}
