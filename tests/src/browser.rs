//! A real browser for end-to-end tests: Debian's headless `chromium`, driven through
//! `chromedriver` (WebDriver) with a synchronous API for plain `#[test]` functions.
//!
//! # How it works
//!
//! The test hosts are network namespaces, and the root namespace (where the test process runs)
//! has no route to them; none is added. So both browser processes run *inside* the host's
//! namespace: `ip netns exec NS chromedriver --port=P` (which also gives them the host's
//! `/etc/netns/NS/resolv.conf`), and chromedriver starts chromium there. The test process talks
//! WebDriver to that chromedriver through [fantoccini] with a connector of its own
//! (`NetnsConnector`): each TCP connection to chromedriver is made by a short-lived thread that
//! has first entered the namespace with `setns(2)` (`/run/netns/NS`). A socket stays in the
//! namespace it was created in, so the connected socket is then handed to the test's tokio
//! runtime like any other. Nothing is added to the root namespace: no route, no veth, not even a
//! listening forwarder port on its 127.0.0.1 (which any local process could use to reach into
//! the namespace); and only the one thread that makes a connection ever changes namespace.
//!
//! TLS: chromium on Linux trusts, besides its own Chrome Root Store, the certificate authorities
//! in the user's NSS database `$HOME/.pki/nssdb`. [`Browser::start`] makes a temporary HOME with
//! a fresh NSS database holding exactly the CA certificates it is given (`certutil -A -t C,,`),
//! and starts chromedriver (hence chromium) with that HOME. No flag turns certificate checks off
//! (no `--ignore-certificate-errors`, `acceptInsecureCerts: false`): a server whose certificate
//! is not from one of these CAs gets chromium's real refusal (chromedriver 156 ends the
//! navigation on chromium's "Privacy error" page; other versions answer "insecure certificate").
//!
//! Viewport: headless chromium draws no browser frame but still counts one (143 px of height
//! here), so [`Browser::set_size`] sizes the window and corrects it until `window.innerWidth`
//! and `innerHeight` are what was asked. Scrollbars are hidden (`--hide-scrollbars`; overlay
//! scrollbars, as on phones), so the layout is as wide as the viewport, long page or not.
//!
//! Everything a browser makes is in one temporary folder (`sekisho-browser-<pid>-<n>`: HOME,
//! profile, logs), and the processes it starts carry `SEKISHO_BROWSER_DIR=<that folder>` in
//! their environment: chromedriver, chromium and its crash handlers (in sessions of their own);
//! chromium's zygotes, renderers and helpers get a clean environment but stay in chromedriver's
//! process group ([`processes_using`] finds both kinds). Dropping the [`Browser`] (also while a
//! failed test unwinds) ends the WebDriver session, lets chromium exit, kills whatever is left,
//! and removes the folder; after a failure, the chromedriver log is copied to the artifacts
//! folder first. A test process killed outright cannot clean up: the next [`Browser::start`]
//! removes what browsers of dead test processes left.
//!
//! Every call has a time limit (page loads and scripts 30 s, any WebDriver command 60 s).
//!
//! # Use
//!
//! (`tests/tests/browser.rs` is a complete, compiled example.)
//!
//! ```ignore
//! use sekisho_tests::browser::{Browser, skip_browser};
//!
//! if skip_browser() {
//!     return;
//! }
//! let d = Deployment::up()?;
//! let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
//! let mut b = Browser::start(&d.ns("laptop"), &[&d.state().join("pki/ca.pem")], &artifacts)?;
//! b.goto("https://10.99.2.2:8443/console/")?;
//! b.fill("#username", "alice")?;
//! b.submit("form#login")?;
//! b.wait_text("h1", "Devices", Duration::from_secs(5))?;
//! assert_eq!(b.a11y_problems()?, Vec::<String>::new());
//! b.set_size(390, 844)?;
//! assert_eq!(b.overflow_problems()?, Vec::<String>::new());
//! b.screenshot("devices")?; // <artifacts>/devices-390.png
//! ```
//!
//! Not for use inside an async context (it runs its own tokio runtime).

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// The environment variable marking every process of a browser (value: its temporary folder).
const MARK: &str = "SEKISHO_BROWSER_DIR";
/// Page loads and scripts.
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Any one WebDriver command (a page load included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Chromedriver listening, and the session (chromium) started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Debian's chromium binary; `/usr/bin/chromium` is a shell wrapper that adds flags of its own
/// (`--enable-remote-extensions`, `--load-extension=...`) and then execs this.
const CHROMIUM: &str = "/usr/lib/chromium/chromium";

/// The page checks (accessibility smoke check, sideways overflow), run in the page.
const PAGE_CHECKS: &str = include_str!("../tools/a11y.js");

/// A cookie as the browser holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    pub name: String,
    pub value: String,
    pub domain: String,
    pub path: String,
    pub secure: bool,
    pub http_only: bool,
    /// "Strict", "Lax" or "None", as chromedriver reports it.
    pub same_site: Option<String>,
    /// Seconds since the epoch; None for a session cookie.
    pub expiry: Option<u64>,
}

/// A headless chromium in a network namespace (see the module documentation).
pub struct Browser {
    rt: tokio::runtime::Runtime,
    /// None once closed (in drop).
    client: Option<Client>,
    driver: Child,
    netns: String,
    dir: PathBuf,
    artifacts: PathBuf,
    /// Whether the viewport is currently set through CDP device-metrics emulation.
    emulated: bool,
    /// What the window takes beyond the viewport (width, height), as last measured.
    frame: (u32, u32),
}

/// Whether browser tests are to be skipped here; prints the reason. Skipped when network
/// namespace tests are skipped (`SEKISHO_SKIP_NETNS=1`), when not root, or when chromium,
/// chromedriver or certutil are missing; but with `SEKISHO_REQUIRE_BROWSER=1` or
/// `SEKISHO_REQUIRE_CONTAINERS=1` (as `.ci/run` sets) a missing piece fails the test instead.
pub fn skip_browser() -> bool {
    if crate::skip_netns() {
        return true;
    }
    let Some(why) = cannot_run() else {
        return false;
    };
    for var in ["SEKISHO_REQUIRE_BROWSER", "SEKISHO_REQUIRE_CONTAINERS"] {
        assert!(
            std::env::var(var).as_deref() != Ok("1"),
            "{var}=1, but {why}"
        );
    }
    eprintln!("skipping a browser test: {why}");
    true
}

/// Why a browser cannot run here, or None.
fn cannot_run() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (the browser runs in a network namespace)".into());
    }
    for (program, package) in [
        ("chromedriver", "chromium-driver"),
        ("chromium", "chromium"),
        ("certutil", "libnss3-tools"),
        ("ip", "iproute2"),
    ] {
        if find_program(program).is_none() {
            return Some(format!(
                "`{program}` is not installed (apt-get install {package})"
            ));
        }
    }
    None
}

/// A program on the PATH.
fn find_program(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

impl Browser {
    /// Starts chromedriver and chromium in network namespace `netns` (a name under /run/netns),
    /// trusting exactly the CA certificates in `trusted_ca_pems` (PEM files, each may hold
    /// several) besides chromium's own root store, and saving screenshots and logs under
    /// `artifacts` (created when needed). The viewport starts at 1366 x 768.
    pub fn start(netns: &str, trusted_ca_pems: &[&Path], artifacts: &Path) -> Result<Browser> {
        if !Path::new("/run/netns").join(netns).exists() {
            bail!("no network namespace {netns} (/run/netns/{netns})");
        }
        sweep_stale();
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sekisho-browser-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("home"))?;
        std::fs::create_dir_all(dir.join("profile"))?;
        std::fs::create_dir_all(artifacts)
            .with_context(|| format!("cannot create {}", artifacts.display()))?;
        // From here on, a failure must clean up what was made: the guard removes the folder
        // (and kills whatever carries its mark) unless disarmed.
        let guard = DirGuard(Some(dir.clone()));
        trust_cas(&dir.join("home"), trusted_ca_pems)?;

        let port = in_netns(netns, || {
            TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())
        })??
        .port();
        let log = std::fs::File::create(dir.join("chromedriver.out"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, "chromedriver"])
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.join("chromedriver.log").display()
            ))
            .env("HOME", dir.join("home"))
            .env(MARK, &dir)
            .env("TMPDIR", &dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        for proxy in ["http_proxy", "https_proxy", "all_proxy", "no_proxy"] {
            cmd.env_remove(proxy).env_remove(proxy.to_uppercase());
        }
        let driver = cmd
            .spawn()
            .context("cannot run ip netns exec chromedriver")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut b = Browser {
            rt,
            client: None,
            driver,
            netns: netns.to_string(),
            dir,
            artifacts: artifacts.to_path_buf(),
            emulated: false,
            frame: (0, 0),
        };
        // The browser's drop cleans up from now on.
        std::mem::forget(guard);
        b.wait_listening(port)?;

        let caps = capabilities(&b.dir.join("profile"));
        let connector = NetnsConnector {
            netns: Arc::from(netns),
        };
        let url = format!("http://127.0.0.1:{port}");
        let client =
            b.rt.block_on(async {
                tokio::time::timeout(
                    START_TIMEOUT,
                    ClientBuilder::new(connector)
                        .capabilities(caps)
                        .connect(&url),
                )
                .await
            })
            .map_err(|_| anyhow!("chromium did not start within {START_TIMEOUT:?}"))
            .and_then(|r| r.map_err(|e| anyhow!("cannot start a WebDriver session: {e}")))
            .map_err(|e| anyhow!("{e:#}\n{}", b.driver_log_tail()))?;
        b.client = Some(client);
        b.set_size(1366, 768)?;
        Ok(b)
    }

    /// Waits until chromedriver accepts connections on `port` in the namespace.
    fn wait_listening(&mut self, port: u16) -> Result<()> {
        let start = Instant::now();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            let up = in_netns(&self.netns, || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
            })?;
            if up {
                return Ok(());
            }
            if let Some(status) = self.driver.try_wait()? {
                bail!(
                    "chromedriver exited ({status}) before listening\n{}",
                    self.driver_log_tail()
                );
            }
            if start.elapsed() > START_TIMEOUT {
                bail!(
                    "chromedriver did not listen on port {port} within {START_TIMEOUT:?}\n{}",
                    self.driver_log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The browser's temporary folder (HOME, profile, logs); gone after drop.
    pub fn temp_dir(&self) -> &Path {
        &self.dir
    }

    /// Process ids of chromedriver and all of chromium's processes.
    pub fn processes(&self) -> Vec<i32> {
        processes_using(&self.dir)
    }

    /// The chromedriver log so far.
    pub fn driver_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("chromedriver.log")).unwrap_or_default()
    }

    fn driver_log_tail(&self) -> String {
        let mut s = String::new();
        for f in ["chromedriver.out", "chromedriver.log"] {
            let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s += &format!("--- {f} (last lines)\n");
            for l in &lines[lines.len().saturating_sub(25)..] {
                s += l;
                s.push('\n');
            }
        }
        s
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("browser session open")
    }

    /// Runs one WebDriver interaction with the command time limit.
    fn run<T, E: std::fmt::Display>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T> {
        match self
            .rt
            .block_on(async { tokio::time::timeout(COMMAND_TIMEOUT, fut).await })
        {
            Err(_) => bail!("{what}: no answer from chromedriver within {COMMAND_TIMEOUT:?}"),
            Ok(Err(e)) => bail!("{what}: {e}"),
            Ok(Ok(v)) => Ok(v),
        }
    }

    fn find(&self, css: &str) -> Result<fantoccini::elements::Element> {
        self.run(
            &format!("find `{css}`"),
            self.client().find(Locator::Css(css)),
        )
    }

    fn find_all(&self, css: &str) -> Result<Vec<fantoccini::elements::Element>> {
        self.run(
            &format!("find all `{css}`"),
            self.client().find_all(Locator::Css(css)),
        )
    }

    /// Opens `url` and waits until the page has loaded. A server with an untrusted certificate
    /// leaves the browser on chromium's "Privacy error" page (or, with some chromedriver
    /// versions, makes this an "insecure certificate" error).
    pub fn goto(&self, url: &str) -> Result<()> {
        self.run(&format!("goto {url}"), self.client().goto(url))
    }

    pub fn current_url(&self) -> Result<String> {
        self.run("current url", self.client().current_url())
            .map(|u| u.to_string())
    }

    pub fn title(&self) -> Result<String> {
        self.run("title", self.client().title())
    }

    /// The page's HTML as it is now (after scripts).
    pub fn source(&self) -> Result<String> {
        self.run("page source", self.client().source())
    }

    /// The visible text of the first element matching `css`; an error if none does.
    pub fn text(&self, css: &str) -> Result<String> {
        let el = self.find(css)?;
        self.run(&format!("text of `{css}`"), el.text())
    }

    /// The visible texts of all elements matching `css`, in document order.
    pub fn texts(&self, css: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for el in self.find_all(css)? {
            out.push(self.run(&format!("text of `{css}`"), el.text())?);
        }
        Ok(out)
    }

    /// Whether any element matches `css`.
    pub fn exists(&self, css: &str) -> Result<bool> {
        Ok(!self.find_all(css)?.is_empty())
    }

    /// Clears the input or textarea `css` and types `value` into it (newlines included, for a
    /// textarea). Where typing cannot give the exact value (a newline in a one-line input,
    /// characters chromedriver cannot type), the value is set by script with `input` and
    /// `change` events, as typing would fire them.
    pub fn fill(&self, css: &str, value: &str) -> Result<()> {
        let el = self.find(css)?;
        let what = format!("fill `{css}`");
        let tag = self.run(&what, el.tag_name())?.to_lowercase();
        let value = value.replace("\r\n", "\n");
        self.run(&what, el.clear())?;
        if tag == "textarea" || !value.contains('\n') {
            self.run(&what, el.send_keys(&value))?;
        }
        let got = self.run(&what, el.prop("value"))?.unwrap_or_default();
        if got != value {
            self.execute(
                "const [el, v] = arguments; el.value = v; \
                 el.dispatchEvent(new Event('input', {bubbles: true})); \
                 el.dispatchEvent(new Event('change', {bubbles: true}));",
                &[element_arg(&el)?, json!(value)],
            )?;
        }
        Ok(())
    }

    /// Chooses the option of select `css` whose value is `value`, or else whose text is.
    pub fn select(&self, css: &str, value: &str) -> Result<()> {
        let el = self.find(css)?;
        let what = format!("select `{value}` in `{css}`");
        if self.run(&what, el.select_by_value(value)).is_ok() {
            return Ok(());
        }
        self.run(&what, el.select_by_label(value))
    }

    /// Clicks the first element matching `css` (an error if something covers it).
    pub fn click(&self, css: &str) -> Result<()> {
        let el = self.find(css)?;
        self.run(&format!("click `{css}`"), el.click())
    }

    /// Submits a form: `css` names the form (submitted as its submit button would, validation
    /// and submit handlers included) or a button of it (clicked). Returns once the next page
    /// has loaded; an error if no new page came within 30 s (for forms that scripts handle
    /// without navigating, use [`Browser::click`] and [`Browser::wait_text`]).
    pub fn submit(&self, css: &str) -> Result<()> {
        let el = self.find(css)?;
        let what = format!("submit `{css}`");
        let tag = self.run(&what, el.tag_name())?.to_lowercase();
        self.execute("window.__sekishoOldPage = true;", &[])?;
        if tag == "form" {
            self.execute("arguments[0].requestSubmit();", &[element_arg(&el)?])?;
        } else {
            self.run(&what, el.click())?;
        }
        let start = Instant::now();
        while start.elapsed() < PAGE_TIMEOUT {
            let loaded = self
                .execute(
                    "return !window.__sekishoOldPage && document.readyState === 'complete';",
                    &[],
                )
                .map(|v| v == Value::Bool(true))
                .unwrap_or(false);
            if loaded {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{what}: no new page within {PAGE_TIMEOUT:?} (still {})",
            self.current_url().unwrap_or_default()
        )
    }

    /// Waits until an element matches `css`.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.exists(css).unwrap_or(false) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "no `{css}` within {timeout:?} on {} ({:?})",
                    self.current_url().unwrap_or_default(),
                    self.title().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until an element matching `css` has visible text containing `contains`.
    pub fn wait_text(&self, css: &str, contains: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let texts = self.texts(css).unwrap_or_default();
            if texts.iter().any(|t| t.contains(contains)) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "no `{css}` with text {contains:?} within {timeout:?} on {}; its texts: {texts:?}",
                    self.current_url().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `js` as the body of a function in the page (`arguments` are `args`; `return` gives
    /// the result).
    pub fn execute(&self, js: &str, args: &[Value]) -> Result<Value> {
        self.run("execute script", self.client().execute(js, args.to_vec()))
    }

    /// Runs a Chrome DevTools Protocol command (chromedriver's `goog/cdp/execute`).
    pub fn cdp(&self, method: &str, params: Value) -> Result<Value> {
        let cmd = SessionCommand {
            method: http::Method::POST,
            path: "goog/cdp/execute".into(),
            body: Some(json!({"cmd": method, "params": params})),
        };
        self.run(&format!("CDP {method}"), self.client().issue_cmd(cmd))
    }

    /// The viewport size (`window.innerWidth`, `window.innerHeight`).
    pub fn viewport(&self) -> Result<(u32, u32)> {
        let v = self.execute("return [window.innerWidth, window.innerHeight];", &[])?;
        let n = |i: usize| v[i].as_u64().unwrap_or(0) as u32;
        Ok((n(0), n(1)))
    }

    /// Makes the viewport `width` x `height` CSS pixels (checked with `window.innerWidth` and
    /// `innerHeight`): the window is resized, corrected by what its frame takes, and where the
    /// window cannot get that size, the viewport is emulated (CDP device metrics).
    pub fn set_size(&mut self, width: u32, height: u32) -> Result<()> {
        if self.emulated {
            self.cdp("Emulation.clearDeviceMetricsOverride", json!({}))?;
            self.emulated = false;
        }
        // Start from what the window's frame took last time (headless chromium simulates a
        // browser frame: 143 px of height here), then correct by what is still off.
        let (mut w, mut h) = (width + self.frame.0, height + self.frame.1);
        for _ in 0..3 {
            self.run("set window size", self.client().set_window_rect(0, 0, w, h))?;
            let (iw, ih) = self.viewport()?;
            if (iw, ih) == (width, height) {
                self.frame = (w - width, h - height);
                return Ok(());
            }
            w = (w + width).saturating_sub(iw).max(width);
            h = (h + height).saturating_sub(ih).max(height);
        }
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )?;
        self.emulated = true;
        let got = self.viewport()?;
        if got != (width, height) {
            bail!(
                "asked for a {width}x{height} viewport, got {}x{}",
                got.0,
                got.1
            );
        }
        Ok(())
    }

    /// Saves a PNG of the whole page (the viewport's width, the page's full height) as
    /// `<artifacts>/<name>-<width>.png` and returns its path.
    pub fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let dims = self.execute(
            "return [window.innerWidth, Math.max(document.documentElement.scrollHeight, \
             document.body ? document.body.scrollHeight : 0, window.innerHeight)];",
            &[],
        )?;
        let width = dims[0].as_u64().unwrap_or(0);
        // Chromium cannot capture taller than its largest texture.
        let height = dims[1].as_u64().unwrap_or(0).min(16_000);
        let shot = self.cdp(
            "Page.captureScreenshot",
            json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            }),
        )?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .context("screenshot: not base64")?;
        std::fs::create_dir_all(&self.artifacts)?;
        let path = self.artifacts.join(format!("{name}-{width}.png"));
        std::fs::write(&path, png).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// The cookies the browser holds for the current page.
    pub fn cookies(&self) -> Result<Vec<Cookie>> {
        let cmd = SessionCommand {
            method: http::Method::GET,
            path: "cookie".into(),
            body: None,
        };
        let list = self.run("cookies", self.client().issue_cmd(cmd))?;
        let s = |c: &Value, k: &str| c[k].as_str().unwrap_or_default().to_string();
        Ok(list
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|c| Cookie {
                name: s(c, "name"),
                value: s(c, "value"),
                domain: s(c, "domain"),
                path: s(c, "path"),
                secure: c["secure"].as_bool().unwrap_or(false),
                http_only: c["httpOnly"].as_bool().unwrap_or(false),
                same_site: c["sameSite"].as_str().map(str::to_string),
                expiry: c["expiry"].as_u64(),
            })
            .collect())
    }

    /// An accessibility smoke check of the current page (not a full audit), one line per
    /// problem naming the element: every visible form field (but hidden, submit, button, reset
    /// and image inputs) has an accessible name (`<label for>`, a wrapping `<label>`,
    /// `aria-label` or `aria-labelledby`); exactly one `<h1>`; heading levels do not skip (h1 →
    /// h3); every `<img>` has `alt`; buttons and links have text (or `aria-label`,
    /// `aria-labelledby`, an image's alt text); `<html lang>` and `<title>` are set; and each
    /// element with visible text of its own has a WCAG contrast ratio of at least 4.5 against
    /// the first opaque background up the tree (white if none), or 3 for large text (24px, or
    /// 18.66px bold). Text over a background image is not judged. See tests/tools/a11y.js.
    pub fn a11y_problems(&self) -> Result<Vec<String>> {
        strings(self.execute(PAGE_CHECKS, &[json!("a11y")])?)
    }

    /// Whether the page scrolls sideways at the current size (`scrollWidth > innerWidth + 1`):
    /// empty if not, else a line saying so and the widest elements sticking out (not counting
    /// those inside a scrolling or clipping box).
    pub fn overflow_problems(&self) -> Result<Vec<String>> {
        strings(self.execute(PAGE_CHECKS, &[json!("overflow")])?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let pids = self.processes();
        let driver = self.driver.id() as i32;
        // End the session: chromedriver closes chromium. Then give chromium's processes a
        // moment to end, so that each is reaped by its own parent.
        if let Some(client) = self.client.take() {
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), client.close()).await
            });
        }
        wait_until_gone(Duration::from_secs(3), || {
            self.processes().into_iter().all(|p| p == driver)
        });
        if failed {
            let prefix = self.dir.file_name().unwrap_or_default().to_string_lossy();
            for f in ["chromedriver.log", "chromedriver.out"] {
                let _ = std::fs::copy(
                    self.dir.join(f),
                    self.artifacts.join(format!("{prefix}-{f}")),
                );
            }
            eprintln!(
                "browser logs kept in {} ({prefix}-chromedriver.log)",
                self.artifacts.display()
            );
        }
        kill_marked(&self.dir);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        // What was orphaned is reaped by init: wait a moment for that, so that no zombie of
        // ours shows in `ps` once the test is over.
        wait_until_gone(Duration::from_secs(2), || {
            pids.iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        });
    }
}

/// Polls `done` every 20 ms for at most `limit`.
fn wait_until_gone(limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes the folder of a browser whose start failed (and kills what it started).
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            kill_marked(&dir);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The WebDriver capabilities of a session: headless chromium in its own profile, with nothing
/// that talks to the network on its own.
fn capabilities(profile: &Path) -> serde_json::Map<String, Value> {
    let mut args = vec![
        "--headless=new",
        // Tests run as root, where chromium's sandbox cannot start.
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--lang=en-US",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-sync",
        "--disable-extensions",
        "--disable-component-extensions-with-background-pages",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--disable-default-apps",
        "--no-pings",
        "--no-proxy-server",
        "--password-store=basic",
        "--window-size=1366,768",
        // Overlay scrollbars, as on phones: the layout is as wide as the viewport
        // (`innerWidth`), with or without a vertical scrollbar, so the overflow check is exact
        // and screenshots show the page's width.
        "--hide-scrollbars",
        // No upgrading of http:// navigations to https, no translate prompts, no
        // optimization-guide or media-router traffic.
        "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable,Translate,\
         OptimizationHints,MediaRouter,AutofillServerCommunication",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.push(format!("--user-data-dir={}", profile.display()));
    let mut options = json!({
        "args": args,
        "prefs": {
            "intl.accept_languages": "en-US",
            "credentials_enable_service": false,
            "profile.password_manager_enabled": false,
        },
    });
    if Path::new(CHROMIUM).is_file() {
        options["binary"] = json!(CHROMIUM);
    }
    let caps = json!({
        "browserName": "chrome",
        "acceptInsecureCerts": false,
        "pageLoadStrategy": "normal",
        "timeouts": {
            "pageLoad": PAGE_TIMEOUT.as_millis() as u64,
            "script": PAGE_TIMEOUT.as_millis() as u64,
            "implicit": 0,
        },
        "goog:chromeOptions": options,
    });
    match caps {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// Makes an NSS database in `home/.pki/nssdb` trusting the CA certificates in `pems` for TLS
/// servers.
fn trust_cas(home: &Path, pems: &[&Path]) -> Result<()> {
    let db_dir = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db_dir)?;
    let db = format!("sql:{}", db_dir.display());
    certutil(&["-N", "-d", &db, "--empty-password"])?;
    let mut n = 0;
    for pem in pems {
        let text = std::fs::read_to_string(pem)
            .with_context(|| format!("cannot read CA file {}", pem.display()))?;
        let certs: Vec<&str> = text
            .split_inclusive("-----END CERTIFICATE-----")
            .filter_map(|c| {
                c.find("-----BEGIN CERTIFICATE-----")
                    .map(|start| &c[start..])
            })
            .collect();
        if certs.is_empty() {
            bail!("{} holds no PEM certificate", pem.display());
        }
        // certutil -A imports the first certificate of a file only: one file each.
        for cert in certs {
            let file = home.join(format!("ca-{n}.pem"));
            std::fs::write(&file, format!("{cert}\n"))?;
            let nick = format!("sekisho-test-ca-{n}");
            certutil(&[
                "-A",
                "-d",
                &db,
                "-t",
                "C,,",
                "-n",
                &nick,
                "-i",
                &file.to_string_lossy(),
            ])?;
            n += 1;
        }
    }
    Ok(())
}

fn certutil(args: &[&str]) -> Result<String> {
    let out = Command::new("certutil")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run certutil (package libnss3-tools)")?;
    if !out.status.success() {
        bail!(
            "certutil {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn strings(v: Value) -> Result<Vec<String>> {
    serde_json::from_value(v).context("the page check did not return a list of strings")
}

fn element_arg(el: &fantoccini::elements::Element) -> Result<Value> {
    serde_json::to_value(el).context("element as a script argument")
}

/// Runs `f` on a thread of its own that has entered network namespace `netns`.
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(s, || enter_netns(netns).map(|()| f()))?
            .join()
            .map_err(|_| io::Error::other("thread in the namespace panicked"))?
    })
}

/// Moves the calling thread (only) into network namespace `netns`.
fn enter_netns(netns: &str) -> io::Result<()> {
    let file = std::fs::File::open(Path::new("/run/netns").join(netns))?;
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A hyper connector whose TCP connections are made inside a network namespace: each by a new
/// thread that enters the namespace and connects; the connected socket (which stays in that
/// namespace) is then used from the runtime as usual.
#[derive(Clone)]
struct NetnsConnector {
    netns: Arc<str>,
}

impl tower_service::Service<http::Uri> for NetnsConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let netns = self.netns.clone();
        Box::pin(async move {
            let addr: SocketAddr = format!(
                "{}:{}",
                uri.host().unwrap_or_default(),
                uri.port_u16().unwrap_or(80)
            )
            .parse()
            .map_err(|_| io::Error::other(format!("not an address and port: {uri}")))?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("netns-connect".into())
                .spawn(move || {
                    let r = enter_netns(&netns)
                        .and_then(|()| TcpStream::connect_timeout(&addr, Duration::from_secs(10)));
                    let _ = tx.send(r);
                })?;
            let stream = rx
                .await
                .map_err(|_| io::Error::other("connecting thread died"))??;
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
            Ok(TokioIo::new(tokio::net::TcpStream::from_std(stream)?))
        })
    }
}

/// A WebDriver command on the session: `METHOD /session/{id}/{path}` with a JSON body.
#[derive(Debug)]
struct SessionCommand {
    method: http::Method,
    path: String,
    body: Option<Value>,
}

impl WebDriverCompatibleCommand for SessionCommand {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/{}",
            session_id.unwrap_or_default(),
            self.path
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            self.method.clone(),
            self.body.as_ref().map(|b| b.to_string()),
        )
    }
}

/// The live processes of the browser whose folder is `dir`: those carrying its mark in their
/// environment (chromedriver, chromium, chromium's crash handlers) and the members of the
/// process groups these lead (chromium's zygotes, renderers and helpers, started with a clean
/// environment, stay in chromedriver's group).
pub fn processes_using(dir: &Path) -> Vec<i32> {
    let mark = format!("{MARK}={}", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    // (pid, process group) of every live (not zombie) process, and whether it is marked.
    let procs: Vec<(i32, i32, bool)> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            if fields.first() == Some(&"Z") {
                return None;
            }
            let pgid = fields.get(2)?.parse().ok()?;
            let marked = std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == mark.as_bytes()));
            Some((pid, pgid, marked))
        })
        .collect();
    let leaders: Vec<i32> = procs
        .iter()
        .filter(|(pid, pgid, marked)| *marked && pid == pgid)
        .map(|p| p.0)
        .collect();
    procs
        .iter()
        .filter(|(_, pgid, marked)| *marked || leaders.contains(pgid))
        .map(|p| p.0)
        .collect()
}

/// Ends every process of the browser whose folder is `dir` ([`processes_using`]): SIGTERM, then
/// SIGKILL for those left after 3 s.
fn kill_marked(dir: &Path) {
    let start = Instant::now();
    let mut signal = libc::SIGTERM;
    loop {
        let pids = processes_using(dir);
        if pids.is_empty() {
            return;
        }
        if start.elapsed() > Duration::from_secs(3) {
            signal = libc::SIGKILL;
        }
        if start.elapsed() > Duration::from_secs(10) {
            eprintln!("browser processes {pids:?} did not end");
            return;
        }
        for pid in pids {
            unsafe { libc::kill(pid, signal) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes what browsers of test processes that are gone left behind (a killed run cannot).
fn sweep_stale() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("sekisho-browser-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if !alive(pid) {
            kill_marked(&e.path());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Whether process `pid` exists.
fn alive(pid: i32) -> bool {
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
