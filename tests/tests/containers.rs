//! Containers built and run for real (issue 20): the connector image, built with podman from
//! `deploy/container/Dockerfile.connector`, runs in the quickstart's site namespace with only
//! `NET_ADMIN` and `/dev/net/tun`, enrolls with a one-time token, links to the broker and carries
//! alice's flow to the app; a restart keeps its enrollment (state volume).
//!
//! What these machines have (`../shared/FIELD-NOTES.md`): Debian's podman with runc
//! (`--runtime runc`; crun refuses the hybrid cgroups), process limits given explicitly
//! (`--ulimit`), and no registry serving images: the runtime stage's base is
//! `localhost/debian:bookworm-slim`, made once per machine by `tests/tools/base-image.sh`
//! (debootstrap + `podman import`, kept between runs), and the binary is the one the tests built
//! (build argument `BINARIES=prebuilt`), since the Rust stage cannot pull `rust:1-bookworm`.
//!
//! Skipped, with the reason printed, where podman is missing (set
//! `SEKISHO_REQUIRE_CONTAINERS=1` to fail instead, as `.ci/run` does) or namespace tests are
//! skipped. Everything the test makes (containers, volumes, images, all labelled
//! `sekisho-e2e=<pid>`) is removed at the end, also after a failure; what a killed run left is
//! removed by the next one.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use sekisho_tests::{Deployment, binaries, skip_netns, unique_tag, wait_until, workspace};

/// The base image the test builds on (made by tests/tools/base-image.sh when missing).
const BASE: &str = "localhost/debian:bookworm-slim";
/// The label on everything the test makes; its value is the test process's pid.
const LABEL: &str = "sekisho-e2e";
/// Process limits runc needs on these machines (podman's defaults are refused).
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nproc=1000:1000",
    "--ulimit",
    "nofile=20000:20000",
];

/// `podman --runtime runc ARGS`: (success, stdout, stderr).
fn podman(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("podman")
        .args(["--runtime", "runc"])
        .args(args)
        .output()
        .expect("run podman");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// Why the container tests cannot run here, or None when they can.
fn cannot_run() -> Option<String> {
    let works = Command::new("podman")
        .args([
            "--runtime",
            "runc",
            "info",
            "--format",
            "{{.Host.OCIRuntime.Name}}",
        ])
        .output();
    match works {
        Err(e) => Some(format!("podman is not installed ({e})")),
        Ok(o) if !o.status.success() => Some(format!(
            "`podman --runtime runc info` fails: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// True when the test is to be skipped (reason printed); panics instead when
/// SEKISHO_REQUIRE_CONTAINERS=1.
fn skip_containers() -> bool {
    if skip_netns() {
        return true;
    }
    let Some(why) = cannot_run() else {
        return false;
    };
    assert!(
        std::env::var("SEKISHO_REQUIRE_CONTAINERS").as_deref() != Ok("1"),
        "SEKISHO_REQUIRE_CONTAINERS=1, but {why}"
    );
    eprintln!("skipping the container test: {why} (apt-get install podman runc debootstrap)");
    true
}

fn pid_alive(pid: i32) -> bool {
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Removes containers, volumes and images (in that order) labelled by test processes that are
/// gone: a killed run cannot clean up after itself.
fn sweep_stale() {
    let filter = format!("label={LABEL}");
    let fmt = format!("{{{{.ID}}}} {{{{index .Labels \"{LABEL}\"}}}}");
    let stale = |args: &[&str]| -> Vec<String> {
        let (_, out, _) = podman(args);
        out.lines()
            .filter_map(|l| {
                let (id, pid) = l.split_once(' ')?;
                let pid: i32 = pid.trim().parse().ok()?;
                (!pid_alive(pid)).then(|| id.to_string())
            })
            .collect()
    };
    let c = stale(&["ps", "-a", "--filter", &filter, "--format", &fmt]);
    if !c.is_empty() {
        let mut args = vec!["rm", "-f", "-t", "0"];
        args.extend(c.iter().map(String::as_str));
        podman(&args);
    }
    let vfmt = format!("{{{{.Name}}}} {{{{index .Labels \"{LABEL}\"}}}}");
    let v = stale(&["volume", "ls", "--filter", &filter, "--format", &vfmt]);
    if !v.is_empty() {
        let mut args = vec!["volume", "rm", "-f"];
        args.extend(v.iter().map(String::as_str));
        podman(&args);
    }
    let i = stale(&["image", "ls", "-a", "--filter", &filter, "--format", &fmt]);
    if !i.is_empty() {
        let mut args = vec!["rmi", "-f"];
        args.extend(i.iter().map(String::as_str));
        podman(&args);
    }
}

/// The base image, made once per machine (kept between runs).
fn ensure_base_image() {
    if podman(&["image", "exists", BASE]).0 {
        return;
    }
    let start = Instant::now();
    let out = Command::new(workspace().join("tests/tools/base-image.sh"))
        .output()
        .expect("run tests/tools/base-image.sh");
    assert!(
        out.status.success(),
        "tests/tools/base-image.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "made the base image {BASE} in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

/// An image built by this test: removed, with every intermediate image of its build (they carry
/// the label too), and its build context, when dropped.
struct Image {
    tag: String,
    context: PathBuf,
}

impl Image {
    /// Builds `deploy/container/<dockerfile>` on the local base, with the tests' binaries as the
    /// prebuilt ones: the build context is a temporary folder holding only what the
    /// Dockerfile's COPY lines name (the workspace, target folder aside, is large).
    fn build(dockerfile: &str, name: &str) -> Image {
        let pid = std::process::id();
        let image = Image {
            tag: format!("localhost/{name}:e2e-{pid}"),
            context: std::env::temp_dir().join(format!("sekisho-image-{}", unique_tag())),
        };
        let rel = format!("deploy/container/{dockerfile}");
        let text = std::fs::read_to_string(workspace().join(&rel)).unwrap();
        let mut files = vec![rel.clone()];
        let mut stage = String::new();
        for line in text.lines() {
            if let Some(from) = line.strip_prefix("FROM ") {
                stage = from.to_string();
                continue;
            }
            // The Rust stage (COPY . .) is not built with BINARIES=prebuilt.
            let Some(args) = line.strip_prefix("COPY ") else {
                continue;
            };
            if args.contains("--from=") || stage.ends_with(" AS build") {
                continue;
            }
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            files.extend(words[..words.len() - 1].iter().map(|w| w.to_string()));
        }
        for f in &files {
            let src = match f.strip_prefix("prebuilt/") {
                Some(bin) => binaries().join(bin),
                None => workspace().join(f),
            };
            let dst = image.context.join(f);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(&src, &dst)
                .unwrap_or_else(|e| panic!("{} -> {}: {e}", src.display(), dst.display()));
        }
        assert!(
            files.iter().any(|f| f.starts_with("prebuilt/")),
            "{rel} has no prebuilt stage: {files:?}"
        );

        let start = Instant::now();
        let label = format!("{LABEL}={pid}");
        let base = format!("BASE={BASE}");
        let file = image.context.join(&rel).display().to_string();
        let context = image.context.display().to_string();
        let mut args = vec![
            "build",
            // The build's RUN steps use the machine's own network: podman's default bridge
            // network (CNI) would create a bridge, firewall rules and turn on IPv4 forwarding
            // in the root namespace, which tests must never change.
            "--network",
            "host",
            // HEALTHCHECK is kept in the docker format only (OCI images have none).
            "--format",
            "docker",
            "--label",
            &label,
            "--build-arg",
            &base,
            "--build-arg",
            "BINARIES=prebuilt",
        ];
        args.extend(ULIMITS);
        args.extend(["-f", &file, "-t", &image.tag, &context]);
        let (ok, out, err) = podman(&args);
        assert!(ok, "podman build {dockerfile} failed:\n{out}\n{err}");
        let (_, size, _) = podman(&["image", "ls", "--format", "{{.Size}}", &image.tag]);
        println!(
            "built {} from {rel} in {:.1} s: {size}",
            image.tag,
            start.elapsed().as_secs_f64()
        );
        image
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let pid = std::process::id().to_string();
        let (_, ids, _) = podman(&[
            "image",
            "ls",
            "-a",
            "-q",
            "--filter",
            &format!("label={LABEL}={pid}"),
        ]);
        let mut args = vec!["rmi", "-f", &self.tag];
        args.extend(ids.lines());
        podman(&args);
        let _ = std::fs::remove_dir_all(&self.context);
    }
}

/// A container and its state volume, removed (with the volume) when dropped; after a failure
/// its log is printed first.
struct Container {
    name: String,
    volume: String,
    /// A folder of the test's own (made on demand), removed with the container.
    scratch: Option<PathBuf>,
}

impl Container {
    fn new(what: &str) -> Container {
        let tag = unique_tag();
        let c = Container {
            name: format!("sekisho-{what}-{tag}"),
            volume: format!("sekisho-{what}-{tag}-state"),
            scratch: None,
        };
        let label = format!("{LABEL}={}", std::process::id());
        let (ok, _, err) = podman(&["volume", "create", "--label", &label, &c.volume]);
        assert!(ok, "podman volume create: {err}");
        c
    }

    fn scratch(&mut self) -> PathBuf {
        let dir = self
            .scratch
            .get_or_insert_with(|| std::env::temp_dir().join(format!("{}-files", self.name)));
        std::fs::create_dir_all(&*dir).unwrap();
        dir.clone()
    }

    fn logs(&self) -> String {
        let (_, out, err) = podman(&["logs", &self.name]);
        format!("{out}{err}")
    }

    /// `podman exec` in the container: (success, stdout, stderr).
    fn exec(&self, cmd: &[&str]) -> (bool, String, String) {
        let mut args = vec!["exec", &self.name];
        args.extend_from_slice(cmd);
        podman(&args)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- podman logs {} (last lines)", self.name);
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
        podman(&["rm", "-f", "-t", "0", &self.name]);
        podman(&["volume", "rm", "-f", &self.volume]);
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The names of the dc1 connectors linked to the broker.
fn dc1_links(d: &Deployment) -> Vec<String> {
    d.stats()["connectors"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|l| l["site"] == "dc1")
                .map(|l| l["connector"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn connectors(d: &Deployment) -> Vec<Value> {
    let (ok, out, err) = d.admin(&["connector", "list", "--json"]);
    assert!(ok, "connector list: {err}");
    serde_json::from_str::<Value>(&out)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_else(|| panic!("not a JSON list: {out}"))
}

/// Listening sockets (`ss -Hltnu`), one "proto local-address" per line.
fn listening(lines: &str) -> Vec<String> {
    lines
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 5).then(|| format!("{} {}", w[0], w[4]))
        })
        .collect()
}

fn capabilities(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// Fails the test (when it would otherwise pass) if the root namespace's IPv4 forwarding
/// changed or a podman bridge appeared there.
struct RootUnchanged(String);

impl Drop for RootUnchanged {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let now = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
        assert_eq!(now, self.0, "the root namespace's ip_forward changed");
        let links = std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap();
        let links = String::from_utf8_lossy(&links.stdout);
        assert!(
            !links.contains("cni-podman"),
            "a podman bridge appeared in the root namespace: {links}"
        );
    }
}

#[test]
fn connector_image_runs_in_the_site_with_net_admin_only() {
    if skip_containers() {
        return;
    }
    let started = Instant::now();
    let at = |what: &str| println!("[{:5.1} s] {what}", started.elapsed().as_secs_f64());
    // The root namespace's forwarding and links before: nothing here may change them.
    let root_forwarding = || std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let forwarding_before = root_forwarding();
    let _root_unchanged = RootUnchanged(forwarding_before.clone());
    sweep_stale();
    ensure_base_image();
    at("base image there");
    // The harness's binaries (one cargo build per test process; the deployment uses them too).
    binaries();
    at("binaries built");
    let image = Image::build("Dockerfile.connector", "sekisho-connector");
    at("image built");

    let Some(d) = Deployment::for_test() else {
        return;
    };
    at("deployment up");
    // The quickstart's native connector gives way: the container serves dc1 alone.
    d.daemon("stop", "connector");
    assert!(
        wait_until(Duration::from_secs(20), || dc1_links(&d).is_empty()).is_some(),
        "the quickstart's connector is still linked: {}",
        d.stats()
    );
    at("native connector stopped");
    let before = connectors(&d).len();
    let (ok, token, err) = d.admin(&["token", "create", "--site", "dc1", "--ttl", "10m"]);
    assert!(ok, "token create: {err}");
    at("token created");

    // Declared after the deployment: removed before the deployment's namespaces go.
    let mut c = Container::new("connector");
    let netns = format!("ns:/run/netns/{}", d.ns("site"));
    let label = format!("{LABEL}={}", std::process::id());
    let volume = format!("{}:/var/lib/sekisho", c.volume);
    let token_env = format!("SEKISHO_ENROLL_TOKEN={token}");
    let run_args = |device: &str| -> Vec<String> {
        let mut args = vec![
            "--label",
            &label,
            "--network",
            &netns,
            "--cap-drop",
            "ALL",
            "--cap-add",
            "NET_ADMIN",
            "--device",
            device,
            "--sysctl",
            "net.ipv4.ip_forward=1",
            // As in deploy/compose/site-connector.yaml: nothing but the volume is writable.
            "--read-only",
            "-e",
            "SEKISHO_SERVER=https://10.99.2.2:8443",
            "-e",
            &token_env,
            // The quickstart connector's settings (deploy/quickstart.sh, enroll_connectors):
            // the site's DNS server, the allowlist, metrics on loopback only.
            "-e",
            "SEKISHO_DNS_SERVERS=10.20.0.53",
            "-e",
            "SEKISHO_ALLOW=10.20.0.0/24 corp.example",
            "-e",
            "SEKISHO_METRICS_LISTEN=127.0.0.1:9465",
            "-e",
            "SEKISHO_DRAIN_TIMEOUT=5s",
        ];
        args.extend(ULIMITS);
        args.into_iter().map(String::from).collect()
    };

    // The TUN device node comes into the container with the host's owner and mode. Where no
    // udev made it 0666 (these machines: 0600 root), uid 10001 cannot open it: the entrypoint
    // says so before enrolling (the token stays unused), and the test hands the container a
    // 0666 node of its own (same device, 10:200) instead of changing the host's.
    let host_mode = std::fs::metadata("/dev/net/tun")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or(0);
    let device = if host_mode & 0o006 == 0o006 {
        "/dev/net/tun".to_string()
    } else {
        let mut args: Vec<String> = ["run", "--rm"].map(String::from).to_vec();
        args.extend(run_args("/dev/net/tun"));
        args.push(image.tag.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = podman(&args);
        assert!(
            !ok,
            "started with a TUN device it cannot open: {out}\n{err}"
        );
        assert!(
            err.contains("/dev/net/tun is not readable and writable by uid 10001"),
            "{err}"
        );
        assert_eq!(connectors(&d).len(), before, "enrolled before failing");
        println!(
            "/dev/net/tun is {host_mode:o} here: the entrypoint refused it before enrolling; \
             the container gets a 0666 node of its own"
        );
        let node = c.scratch().join("tun");
        let path = std::ffi::CString::new(node.display().to_string()).unwrap();
        let rc =
            unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(10, 200)) };
        assert_eq!(rc, 0, "mknod {}", node.display());
        // mknod applies the umask.
        std::fs::set_permissions(&node, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .unwrap();
        format!("{}:/dev/net/tun", node.display())
    };

    let mut args: Vec<String> = ["run", "-d", "--name", &c.name, "-v", &volume]
        .map(String::from)
        .to_vec();
    args.extend(run_args(&device));
    args.push(image.tag.clone());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run_started = Instant::now();
    let (ok, out, err) = podman(&args);
    assert!(ok, "podman run: {out}\n{err}");
    at("container started");

    // It enrolls (one connector more) and links.
    let linked = wait_until(Duration::from_secs(60), || dc1_links(&d).len() == 1);
    assert!(
        linked.is_some(),
        "no dc1 link from the container: {}\n{}",
        d.stats(),
        c.logs()
    );
    let name = dc1_links(&d).remove(0);
    println!(
        "container linked as {name} {:.1} s after podman run",
        run_started.elapsed().as_secs_f64()
    );
    assert_eq!(connectors(&d).len(), before + 1, "not enrolled once");
    assert!(
        !c.logs().contains(&token),
        "the entrypoint printed the enrollment token"
    );

    // Alice reaches the app through it.
    let (ok, body, err) = d.sh("laptop", "curl -sS -m 10 http://10.20.0.10/");
    assert!(
        ok && body.contains("Hello"),
        "alice through the container: {body} {err}\n{}",
        c.logs()
    );
    at("alice reached the app");

    // The connector is the container's first process (the entrypoint exec'd it), runs as uid
    // 10001 with CAP_NET_ADMIN alone (from its file capability), and nothing else is allowed.
    let (ok, id, err) = c.exec(&["id"]);
    assert!(ok, "podman exec id: {err}");
    assert!(
        id.starts_with("uid=10001(sekisho) gid=10001(sekisho)"),
        "{id}"
    );
    let (ok, top, err) = podman(&["top", &c.name, "pid", "user", "comm"]);
    assert!(ok, "podman top: {err}");
    println!("podman top:\n{top}");
    let first = top.lines().nth(1).unwrap_or("");
    let w: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(w, ["1", "sekisho", "sekisho-connect"], "{top}");
    let (ok, status, err) = c.exec(&["cat", "/proc/1/status"]);
    assert!(ok, "{err}");
    let net_admin = 1u64 << 12;
    assert_eq!(capabilities(&status, "CapEff:"), net_admin, "{status}");
    assert_eq!(capabilities(&status, "CapBnd:"), net_admin, "{status}");
    let (_, inspect, _) = podman(&[
        "inspect",
        "--format",
        "{{.HostConfig.Privileged}} {{.HostConfig.CapAdd}} {{.Config.User}}",
        &c.name,
    ]);
    println!("podman inspect (privileged, added capabilities, user): {inspect}");
    assert!(inspect.starts_with("false "), "{inspect}");

    // Listening sockets, from inside: the metrics endpoint (loopback) at most.
    let (ok, ss, err) = c.exec(&["ss", "-Hltnu"]);
    assert!(ok, "ss: {err}");
    println!("ss -Hltnu in the container:\n{ss}");
    let (_, ss_host, _) = d.sh("site", "ss -Hltnup");
    println!("ss -Hltnup in the site namespace (from the host):\n{ss_host}");
    let socks = listening(&ss);
    let others: Vec<&String> = socks
        .iter()
        .filter(|s| *s != "tcp 127.0.0.1:9465")
        .collect();
    assert!(
        others.is_empty(),
        "listening besides the metrics port: {others:?}\n{ss}"
    );

    // The image's health check: GET /readyz on the metrics endpoint, 200 with a broker link up
    // (run by hand: podman runs it from systemd timers, and there is no systemd here). It
    // needs the metrics listener: without one it can only fail.
    let healthy = wait_until(Duration::from_secs(20), || {
        podman(&["healthcheck", "run", &c.name]).0
    });
    let (_, hc_out, hc_err) = podman(&["healthcheck", "run", &c.name]);
    assert!(
        healthy.is_some(),
        "podman healthcheck run: {hc_out} {hc_err}"
    );
    println!(
        "podman healthcheck run: healthy ({hc_out}) after {:.1} s",
        healthy.unwrap().as_secs_f64()
    );
    let (ok, _, err) = podman(&[
        "exec",
        "-e",
        "SEKISHO_METRICS_LISTEN=",
        &c.name,
        "sekisho-healthcheck",
    ]);
    assert!(!ok && err.contains("metrics are off"), "{err}");
    // It means the link: with the broker gone the container turns unhealthy, and healthy
    // again once the broker is back and the link is up.
    let gone = Instant::now();
    d.daemon("stop", "broker");
    let unhealthy = wait_until(Duration::from_secs(30), || {
        !podman(&["healthcheck", "run", &c.name]).0
    });
    assert!(
        unhealthy.is_some(),
        "still healthy 30 s after the broker stopped"
    );
    let (_, _, why) = podman(&["exec", &c.name, "sekisho-healthcheck", "/readyz"]);
    println!(
        "broker stopped: unhealthy after {:.1} s ({why})",
        gone.elapsed().as_secs_f64()
    );
    d.daemon("start", "broker");
    let back = wait_until(Duration::from_secs(60), || {
        dc1_links(&d) == [name.clone()] && podman(&["healthcheck", "run", &c.name]).0
    });
    assert!(
        back.is_some(),
        "not linked and healthy again after the broker came back: {}\n{}",
        d.stats(),
        c.logs()
    );
    println!(
        "broker back: linked and healthy after {:.1} s",
        back.unwrap().as_secs_f64()
    );

    // A restart keeps the enrollment: same connector, no new one, no token needed.
    let restarted = Instant::now();
    let (ok, _, err) = podman(&["restart", "-t", "60", &c.name]);
    assert!(ok, "podman restart: {err}");
    let relinked = wait_until(Duration::from_secs(60), || dc1_links(&d) == [name.clone()]);
    assert!(
        relinked.is_some(),
        "no dc1 link after the restart: {}\n{}",
        d.stats(),
        c.logs()
    );
    println!(
        "restarted and linked again in {:.1} s",
        restarted.elapsed().as_secs_f64()
    );
    assert!(c.logs().contains("already enrolled"), "{}", c.logs());
    assert_eq!(connectors(&d).len(), before + 1, "enrolled again");
    let (ok, body, err) = d.sh("laptop", "curl -sS -m 10 http://10.20.0.10/");
    assert!(
        ok && body.contains("Hello"),
        "alice after the restart: {body} {err}"
    );
    let (_, id, _) = c.exec(&["id", "-u"]);
    assert_eq!(id, "10001");

    println!(
        "connector image: enrolled once, linked twice, flows carried, uid 10001, NET_ADMIN only \
         ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    );
}
