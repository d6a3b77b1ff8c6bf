//! Containers built and run for real (issue 20), with podman, in the quickstart's namespaces:
//!
//! - the connector image (`deploy/container/Dockerfile.connector`) in the site namespace with
//!   only `NET_ADMIN` and `/dev/net/tun`: it enrolls with a one-time token, links to the broker
//!   and carries alice's flow to the app; a restart keeps its enrollment (state volume);
//! - the broker image (`deploy/container/Dockerfile.broker`) in place of the quickstart's broker,
//!   with its CA, certificate, WireGuard key and store: on SQLite (the store moved into the
//!   container's state folder; no capability at all, uid 10001) and on PostgreSQL (the URL from
//!   a secret file; root with `NET_ADMIN` alone and the TUN device, for internet egress), each
//!   serving alice; its health check follows the store;
//! - `deploy/compose/site-connector.yaml` started by Debian's podman-compose: both connectors
//!   enroll, link and carry flows; one stopped, alice still reaches the app through the other.
//!
//! What these machines have (`../shared/FIELD-NOTES.md`): Debian's podman with runc
//! (`--runtime runc`; crun refuses the hybrid cgroups), process limits given explicitly
//! (`--ulimit`), and no registry serving images: the runtime stage's base is
//! `localhost/debian:bookworm-slim`, made once per machine by `tests/tools/base-image.sh`
//! (debootstrap + `podman import`, kept between runs), and the binaries are the ones the tests
//! built (build argument `BINARIES=prebuilt`, stripped of their debug information when copied
//! into the build context), since the Rust stage cannot pull `rust:1-bookworm`.
//!
//! Nothing here may change the machine's own network namespace: images are built with
//! `--network host` (no build network), containers join the test's namespaces
//! (`--network ns:/run/netns/NAME`), no podman network (a CNI bridge, which turns on IPv4
//! forwarding and adds firewall tables in the root namespace) is made or used, no port is
//! published; each test fails if the root namespace's forwarding, nftables tables or podman
//! networks changed.
//!
//! Skipped, with the reason printed, where podman (or podman-compose, for the compose test) is
//! missing (set `SEKISHO_REQUIRE_CONTAINERS=1` to fail instead, as `.ci/run` does) or namespace
//! tests are skipped. Each image is built once per test process and shared by its tests; it is
//! removed when the process exits. Everything else the tests make (containers, volumes) is
//! removed when its test ends, also after a failure. All of it is labelled `sekisho-e2e=<pid>`:
//! what a killed run left is removed by the next one. The base image is kept.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use sekisho_tests::pg::Postgres;
use sekisho_tests::{
    Deployment, binaries, count_from, skip_netns, unique_tag, wait_until, workspace,
};

/// The base image the tests build on (made by tests/tools/base-image.sh when missing).
const BASE: &str = "localhost/debian:bookworm-slim";
/// The label on everything the tests make; its value is the test process's pid.
const LABEL: &str = "sekisho-e2e";
/// Process limits runc needs on these machines (podman's defaults are refused).
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nproc=1000:1000",
    "--ulimit",
    "nofile=20000:20000",
];
/// CAP_NET_ADMIN's bit in /proc/PID/status.
const NET_ADMIN: u64 = 1 << 12;

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

/// True when the test is to be skipped because of `why` (printed); panics instead when
/// SEKISHO_REQUIRE_CONTAINERS=1.
fn skip_because(why: Option<String>) -> bool {
    let Some(why) = why else {
        return false;
    };
    assert!(
        std::env::var("SEKISHO_REQUIRE_CONTAINERS").as_deref() != Ok("1"),
        "SEKISHO_REQUIRE_CONTAINERS=1, but {why}"
    );
    eprintln!(
        "skipping the container test: {why} (apt-get install podman runc debootstrap podman-compose)"
    );
    true
}

/// True when the test is to be skipped (reason printed).
fn skip_containers() -> bool {
    skip_netns() || skip_because(cannot_run())
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
    // Compose projects' volumes (project sekisho-e2e-<pid>; podman-compose 1.0.3 labels them
    // with the project only).
    let (_, out, _) = podman(&[
        "volume",
        "ls",
        "--filter",
        "label=io.podman.compose.project",
        "--format",
        "{{.Name}} {{index .Labels \"io.podman.compose.project\"}}",
    ]);
    for l in out.lines() {
        let Some((name, project)) = l.split_once(' ') else {
            continue;
        };
        let pid = project
            .strip_prefix("sekisho-e2e-")
            .and_then(|p| p.parse().ok());
        if pid.is_some_and(|p| !pid_alive(p)) {
            podman(&["volume", "rm", "-f", name]);
        }
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

/// What every container test does first: stale leftovers removed, the base image there, the
/// harness's binaries built (one cargo build per test process; deployments use them too).
fn prepare() {
    sweep_stale();
    ensure_base_image();
    binaries();
}

/// The images this test process built, as (Dockerfile, tag): each built once and shared by the
/// tests, removed when the process exits (an `atexit` handler: the test harness exits through
/// `exit` whether tests passed or failed).
static IMAGES: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The image of `deploy/container/<dockerfile>`, built on first use.
fn image(dockerfile: &str, name: &str) -> String {
    let mut images = IMAGES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, tag)) = images.iter().find(|(f, _)| f == dockerfile) {
        println!("{tag}: built earlier in this run, used again");
        return tag.clone();
    }
    if images.is_empty() {
        // SAFETY: registers a function without arguments that does not unwind.
        let rc = unsafe { libc::atexit(remove_images_at_exit) };
        assert_eq!(rc, 0, "atexit");
    }
    let tag = build_image(dockerfile, name);
    images.push((dockerfile.to_string(), tag.clone()));
    tag
}

/// Removes the images this process built, with every intermediate image of their builds (they
/// carry the label too). Runs at exit: nothing in it may panic.
extern "C" fn remove_images_at_exit() {
    let rm = |args: &[&str]| {
        let _ = Command::new("podman")
            .args(["--runtime", "runc"])
            .args(args)
            .output();
    };
    let tags: Vec<String> = IMAGES
        .lock()
        .map(|i| i.iter().map(|(_, t)| t.clone()).collect())
        .unwrap_or_default();
    let mut args = vec!["rmi", "-f"];
    args.extend(tags.iter().map(String::as_str));
    rm(&args);
    let filter = format!("label={LABEL}={}", std::process::id());
    if let Ok(out) = Command::new("podman")
        .args(["image", "ls", "-a", "-q", "--filter", &filter])
        .output()
    {
        let ids = String::from_utf8_lossy(&out.stdout).to_string();
        if !ids.trim().is_empty() {
            let mut args = vec!["rmi", "-f"];
            args.extend(ids.split_whitespace());
            rm(&args);
        }
    }
}

/// Builds `deploy/container/<dockerfile>` on the local base, with the tests' binaries as the
/// prebuilt ones: the build context is a temporary folder holding only what the Dockerfile's
/// COPY lines name (the workspace, target folder aside, is large). The binaries are stripped of
/// their debug information on the way in (`strip --strip-debug`: function names stay for
/// backtraces), as deploy/README.md tells users to do with theirs.
fn build_image(dockerfile: &str, name: &str) -> String {
    let pid = std::process::id();
    let tag = format!("localhost/{name}:e2e-{pid}");
    let context = std::env::temp_dir().join(format!("sekisho-image-{}", unique_tag()));
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
        let dst = context.join(f);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        let Some(bin) = f.strip_prefix("prebuilt/") else {
            let src = workspace().join(f);
            std::fs::copy(&src, &dst)
                .unwrap_or_else(|e| panic!("{} -> {}: {e}", src.display(), dst.display()));
            continue;
        };
        let src = binaries().join(bin);
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let stripped = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&dst)
            .arg(&src)
            .output()
            .is_ok_and(|o| o.status.success());
        if !stripped {
            std::fs::copy(&src, &dst)
                .unwrap_or_else(|e| panic!("{} -> {}: {e}", src.display(), dst.display()));
            println!("NOTE: no strip (binutils) here: {bin} goes into the image as built");
        }
        std::fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        println!(
            "{f}: the tests' build of {bin}, {:.1} MB; {:.1} MB stripped of debug information",
            size(&src) as f64 / 1e6,
            size(&dst) as f64 / 1e6
        );
    }
    assert!(
        files.iter().any(|f| f.starts_with("prebuilt/")),
        "{rel} has no prebuilt stage: {files:?}"
    );

    // The binary that must end up in the image.
    let prebuilt = files
        .iter()
        .find(|f| f.starts_with("prebuilt/"))
        .expect("a prebuilt binary");
    let want = sha256(&context.join(prebuilt));
    let bin = prebuilt.strip_prefix("prebuilt/").unwrap();

    let label = format!("{LABEL}={pid}");
    let base = format!("BASE={BASE}");
    let file = context.join(&rel).display().to_string();
    let context_arg = context.display().to_string();
    let build = |cache: bool| {
        let start = Instant::now();
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
        if !cache {
            args.push("--no-cache");
        }
        args.extend(ULIMITS);
        args.extend(["-f", &file, "-t", &tag, &context_arg]);
        let (ok, out, err) = podman(&args);
        assert!(ok, "podman build {dockerfile} failed:\n{out}\n{err}");
        println!(
            "built {tag} from {rel} in {:.1} s{}: {:.1} MB (podman image inspect: {} bytes)",
            start.elapsed().as_secs_f64(),
            if cache {
                ""
            } else {
                " without its layer cache"
            },
            image_size(&tag) as f64 / 1e6,
            image_size(&tag)
        );
    };
    build(true);
    // buildah (podman build) caches a RUN step by its text, not by what it mounts from
    // another stage (the connector's RUN --mount=type=bind,from=binaries): a layer cached from
    // an earlier build would carry an earlier binary. The binary in the image is checked; when
    // it is not this one, the image is built again without the cache.
    if binary_sha(&tag, bin) != want {
        println!("{tag}: a cached layer held another {bin}: building again without the cache");
        build(false);
    }
    let _ = std::fs::remove_dir_all(&context);
    assert_eq!(binary_sha(&tag, bin), want, "{tag}: not the tests' {bin}");
    runtime_only(&tag);
    tag
}

/// The SHA-256 of a file, as sha256sum prints it.
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// The SHA-256 of /usr/local/bin/<bin> in an image.
fn binary_sha(tag: &str, bin: &str) -> String {
    let path = format!("/usr/local/bin/{bin}");
    let mut args = vec![
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "/usr/bin/sha256sum",
    ];
    args.extend(ULIMITS);
    args.extend([tag, &path]);
    let (ok, out, err) = podman(&args);
    assert!(ok, "sha256sum in {tag}: {err}");
    out.split_whitespace().next().unwrap_or("").to_string()
}

fn image_size(tag: &str) -> u64 {
    let (_, size, _) = podman(&["image", "inspect", "--format", "{{.Size}}", tag]);
    size.parse().unwrap_or(0)
}

/// The image holds no build tools: no compiler, linker, assembler, make, cargo or binutils,
/// as programs or as Debian packages.
fn runtime_only(tag: &str) {
    let script = "for t in cc gcc c++ g++ cpp ld as make cargo rustc strip objcopy; do \
                    command -v $t; done; \
                  dpkg-query -W -f '${Package}\\n' | \
                    grep -xE '(gcc|g\\+\\+|cpp)(-[0-9]+)?|binutils(-[a-z0-9_-]+)?|make|libc6-dev|linux-libc-dev|rustc|cargo|build-essential|dpkg-dev|lib(gcc|stdc\\+\\+)-[0-9]+-dev' ; \
                  echo \"packages: $(dpkg-query -W | wc -l), Debian $(cat /etc/debian_version)\"";
    let mut args = vec![
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "/bin/sh",
    ];
    args.extend(ULIMITS);
    args.extend([tag, "-c", script]);
    let (ok, out, err) = podman(&args);
    assert!(ok, "podman run {tag} sh: {err}");
    let found: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with("packages: "))
        .collect();
    assert!(found.is_empty(), "build tools in {tag}: {found:?}");
    println!(
        "{tag}: no build tools; {}",
        out.lines().last().unwrap_or("")
    );
}

/// A container (with a state volume, or not), removed (with the volume) when dropped; after a
/// failure its log is printed first.
struct Container {
    name: String,
    volume: Option<String>,
    /// A folder of the test's own (made on demand), removed with the container.
    scratch: Option<PathBuf>,
}

impl Container {
    /// A container to be, with a named state volume.
    fn new(what: &str) -> Container {
        let mut c = Container::without_volume(what);
        let volume = format!("{}-state", c.name);
        let label = format!("{LABEL}={}", std::process::id());
        let (ok, _, err) = podman(&["volume", "create", "--label", &label, &volume]);
        assert!(ok, "podman volume create: {err}");
        c.volume = Some(volume);
        c
    }

    /// A container to be, whose state is a folder of the test's (`scratch`).
    fn without_volume(what: &str) -> Container {
        Container {
            name: format!("sekisho-{what}-{}", unique_tag()),
            volume: None,
            scratch: None,
        }
    }

    fn scratch(&mut self) -> PathBuf {
        let dir = self
            .scratch
            .get_or_insert_with(|| std::env::temp_dir().join(format!("{}-files", self.name)));
        std::fs::create_dir_all(&*dir).unwrap();
        dir.clone()
    }

    fn logs(&self) -> String {
        logs(&self.name)
    }

    /// `podman exec` in the container: (success, stdout, stderr).
    fn exec(&self, cmd: &[&str]) -> (bool, String, String) {
        let mut args = vec!["exec", &self.name];
        args.extend_from_slice(cmd);
        podman(&args)
    }

    /// Whether the image's health check passes now.
    fn healthy(&self) -> bool {
        podman(&["healthcheck", "run", &self.name]).0
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_logs(&self.name);
        }
        podman(&["rm", "-f", "-t", "0", &self.name]);
        if let Some(v) = &self.volume {
            podman(&["volume", "rm", "-f", v]);
        }
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn logs(name: &str) -> String {
    let (_, out, err) = podman(&["logs", name]);
    format!("{out}\n{err}")
}

/// The last lines of a container's log, on stderr (after a failure).
fn print_logs(name: &str) {
    eprintln!("--- podman logs {name} (last lines)");
    let logs = logs(name);
    let lines: Vec<&str> = logs.lines().collect();
    for l in &lines[lines.len().saturating_sub(40)..] {
        eprintln!("{l}");
    }
}

/// `/proc/1/status` in a container: (uid line, effective and bounding capability sets).
fn first_process(c: &Container) -> (String, u64, u64) {
    let (ok, status, err) = c.exec(&["cat", "/proc/1/status"]);
    assert!(ok, "{err}");
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or("")
        .to_string();
    (
        uid,
        capabilities(&status, "CapEff:"),
        capabilities(&status, "CapBnd:"),
    )
}

/// The names of the dc1 connectors linked to a broker, from its stats.
fn dc1_links(stats: &Value) -> Vec<String> {
    stats["connectors"]
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

/// The sockets listening in a container's network namespace (`ss -Hltnu` inside) three times,
/// 0.3 s apart: those seen each time, and the last output. (A UDP socket of a name lookup,
/// unconnected while its query is out, shows as listening for a moment.)
fn steady_listening(c: &Container) -> (Vec<String>, String) {
    let mut seen: Option<Vec<String>> = None;
    let mut last = String::new();
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        let (ok, ss, err) = c.exec(&["ss", "-Hltnu"]);
        assert!(ok, "ss: {err}");
        let now = listening(&ss);
        seen = Some(match seen {
            None => now,
            Some(before) => before.into_iter().filter(|s| now.contains(s)).collect(),
        });
        last = ss;
    }
    (seen.unwrap_or_default(), last)
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

/// The root namespace's IPv4 forwarding, nftables tables and podman networks.
fn root_state() -> (String, String, String) {
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    };
    (
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        run("nft", &["list", "tables"]),
        run("podman", &["network", "ls", "--format", "{{.Name}}"]),
    )
}

/// Fails the test (when it would otherwise pass) if the root namespace's IPv4 forwarding,
/// nftables tables or podman networks changed, or a podman bridge appeared there.
struct RootUnchanged((String, String, String));

impl RootUnchanged {
    fn now() -> RootUnchanged {
        RootUnchanged(root_state())
    }
}

impl Drop for RootUnchanged {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let (forwarding, tables, networks) = root_state();
        assert_eq!(
            forwarding, self.0.0,
            "the root namespace's ip_forward changed"
        );
        assert_eq!(
            tables, self.0.1,
            "the root namespace's nftables tables changed"
        );
        assert_eq!(networks, self.0.2, "podman's networks changed");
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        let links = String::from_utf8_lossy(&links.stdout);
        assert!(
            !links.contains("cni-podman"),
            "a podman bridge appeared in the root namespace: {links}"
        );
    }
}

/// A device node for /dev/net/tun (10:200) that uid 10001 can open, for containers: None where
/// the host's is 0666 already (udev makes it so); else a 0666 node of the test's own in `dir`
/// (these machines have no udev: 0600 root), rather than changing the host's.
fn tun_node_for_uid_10001(dir: &Path) -> Option<PathBuf> {
    let host_mode = std::fs::metadata("/dev/net/tun")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or(0);
    if host_mode & 0o006 == 0o006 {
        return None;
    }
    let node = dir.join("tun");
    let path = std::ffi::CString::new(node.display().to_string()).unwrap();
    let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(10, 200)) };
    assert_eq!(rc, 0, "mknod {}", node.display());
    // mknod applies the umask.
    std::fs::set_permissions(&node, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    println!(
        "/dev/net/tun is {host_mode:o} here: containers running as uid 10001 get a 0666 node of \
         the test's own ({})",
        node.display()
    );
    Some(node)
}

#[test]
fn connector_image_runs_in_the_site_with_net_admin_only() {
    if skip_containers() {
        return;
    }
    let started = Instant::now();
    let at = |what: &str| println!("[{:5.1} s] {what}", started.elapsed().as_secs_f64());
    // Nothing here may change the root namespace.
    let _root_unchanged = RootUnchanged::now();
    prepare();
    at("base image there, binaries built");
    let image = image("Dockerfile.connector", "sekisho-connector");
    at("image there");

    let Some(d) = Deployment::for_test() else {
        return;
    };
    at("deployment up");
    // The quickstart's native connector gives way: the container serves dc1 alone.
    d.daemon("stop", "connector");
    assert!(
        wait_until(Duration::from_secs(20), || dc1_links(&d.stats()).is_empty()).is_some(),
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
    let volume = format!("{}:/var/lib/sekisho", c.volume.as_deref().unwrap());
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
    let dir = c.scratch();
    let device = match tun_node_for_uid_10001(&dir) {
        None => "/dev/net/tun".to_string(),
        Some(node) => {
            let mut args: Vec<String> = ["run", "--rm"].map(String::from).to_vec();
            args.extend(run_args("/dev/net/tun"));
            args.push(image.clone());
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
            println!("with the host's node, the entrypoint refused it before enrolling");
            format!("{}:/dev/net/tun", node.display())
        }
    };

    let mut args: Vec<String> = ["run", "-d", "--name", &c.name, "-v", &volume]
        .map(String::from)
        .to_vec();
    args.extend(run_args(&device));
    args.push(image.clone());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run_started = Instant::now();
    let (ok, out, err) = podman(&args);
    assert!(ok, "podman run: {out}\n{err}");
    at("container started");

    // It enrolls (one connector more) and links.
    let linked = wait_until(Duration::from_secs(60), || dc1_links(&d.stats()).len() == 1);
    assert!(
        linked.is_some(),
        "no dc1 link from the container: {}\n{}",
        d.stats(),
        c.logs()
    );
    let name = dc1_links(&d.stats()).remove(0);
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
    let (uid, eff, bnd) = first_process(&c);
    assert!(uid.starts_with("Uid:\t10001\t"), "{uid}");
    assert_eq!(
        (eff, bnd),
        (NET_ADMIN, NET_ADMIN),
        "capabilities (effective, bounding)"
    );
    let (_, inspect, _) = podman(&[
        "inspect",
        "--format",
        "{{.HostConfig.Privileged}} {{.HostConfig.CapAdd}} {{.Config.User}}",
        &c.name,
    ]);
    println!("podman inspect (privileged, added capabilities, user): {inspect}");
    assert!(inspect.starts_with("false "), "{inspect}");

    // Listening sockets, from inside: the metrics endpoint (loopback) at most.
    let (socks, ss) = steady_listening(&c);
    println!("ss -Hltnu in the container:\n{ss}");
    let (_, ss_host, _) = d.sh("site", "ss -Hltnup");
    println!("ss -Hltnup in the site namespace (from the host):\n{ss_host}");
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
    let healthy = wait_until(Duration::from_secs(20), || c.healthy());
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
    let unhealthy = wait_until(Duration::from_secs(30), || !c.healthy());
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
        dc1_links(&d.stats()) == [name.clone()] && c.healthy()
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
    let relinked = wait_until(Duration::from_secs(60), || {
        dc1_links(&d.stats()) == [name.clone()]
    });
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

/// How the broker image is run in place of the quickstart's broker.
struct BrokerRun {
    /// Internet egress on (`SEKISHO_EGRESS_UPLINK`): as root with CAP_NET_ADMIN alone, the TUN
    /// device and forwarding; else no capability at all, as uid 10001.
    egress: bool,
    /// Files put into /etc/sekisho/secrets (name, content), like a database URL.
    secrets: Vec<(&'static str, String)>,
    /// The quickstart's SQLite store moves into the container's state folder.
    sqlite: bool,
    /// More `podman run` options.
    args: Vec<String>,
}

/// The stats of the broker listening on control socket `sock`.
fn broker_stats(d: &Deployment, sock: &Path) -> Value {
    let out = Command::new(d.bin("sekisho-broker"))
        .args(["stats", "--socket"])
        .arg(sock)
        .output()
        .expect("sekisho-broker stats");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The quickstart's broker moved into the broker image: the native broker is stopped and the
/// container takes its place in the broker namespace with what an existing broker brings along
/// (the way one would move a broker into a container): the cluster CA, its key and the broker
/// certificate (with the key-encryption key next to them) and the policy with its lists,
/// mounted read-only at /etc/sekisho; the WireGuard key (and, on SQLite, the store) in its
/// state folder. The entrypoint generates the config from the environment. Returns the
/// container once its health check (GET /readyz: store answers, policy loaded) passes.
fn broker_container(d: &Deployment, image: &str, run: BrokerRun) -> Container {
    d.daemon("stop", "broker");
    let native_sock = d.state().join("broker.sock");
    assert!(
        wait_until(Duration::from_secs(10), || broker_stats(d, &native_sock)
            .is_null())
        .is_some(),
        "the quickstart's broker still answers"
    );
    let mut c = Container::without_volume("broker");
    let dir = c.scratch();
    let (etc, state) = (dir.join("etc"), dir.join("state"));
    let copy_dir = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy_dir(&d.state().join("pki"), &etc.join("pki"));
    copy_dir(&d.state().join("lists"), &etc.join("lists"));
    std::fs::copy(d.state().join("policy.toml"), etc.join("policy.toml")).unwrap();
    std::fs::create_dir_all(etc.join("secrets")).unwrap();
    for (name, content) in &run.secrets {
        std::fs::write(etc.join("secrets").join(name), content).unwrap();
    }
    std::fs::create_dir_all(&state).unwrap();
    std::fs::copy(d.state().join("broker.key"), state.join("broker.key")).unwrap();
    if run.sqlite {
        for f in ["broker.db", "broker.db-wal", "broker.db-shm"] {
            if d.state().join(f).exists() {
                std::fs::copy(d.state().join(f), state.join(f)).unwrap();
            }
        }
    }
    // Owned by the user the broker runs as; private, as the entrypoint makes its own files.
    let uid = if run.egress { "0" } else { "10001" };
    let status = Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}")])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("chmod")
        .args(["-R", "go-rwx"])
        .arg(&etc)
        .arg(&state)
        .status()
        .unwrap();
    assert!(status.success());

    let label = format!("{LABEL}={}", std::process::id());
    let netns = format!("ns:/run/netns/{}", d.ns("broker"));
    let etc_mount = format!("{}:/etc/sekisho:ro", etc.display());
    let state_mount = format!("{}:/var/lib/sekisho", state.display());
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        &c.name,
        "--label",
        &label,
        "--network",
        &netns,
        "--cap-drop",
        "ALL",
        "--read-only",
        "-v",
        &etc_mount,
        "-v",
        &state_mount,
        // Devices and connectors reach it where they reached the quickstart's broker, under the
        // same name in the registry.
        "-e",
        "SEKISHO_PUBLIC_HOST=10.99.2.2",
        "-e",
        "SEKISHO_NAME=region-1",
        "-e",
        "SEKISHO_TLS_CA=/etc/sekisho/pki/ca.pem",
        "-e",
        "SEKISHO_TLS_CERT=/etc/sekisho/pki/broker.pem",
        "-e",
        "SEKISHO_TLS_KEY=/etc/sekisho/pki/broker.key",
        "-e",
        "SEKISHO_CA_KEY=/etc/sekisho/pki/ca.key",
    ]
    .map(String::from)
    .to_vec();
    if run.egress {
        // Internet egress: a TUN device, a route and the nftables masquerade table in the
        // broker's network namespace need CAP_NET_ADMIN, which a process of uid 10001 could only
        // get from a file capability; the broker binary carries none (the image would not start
        // without the capability), so it runs as root, with that capability alone.
        args.extend(
            [
                "--user",
                "0",
                "--cap-add",
                "NET_ADMIN",
                "--device",
                "/dev/net/tun",
                "--sysctl",
                "net.ipv4.ip_forward=1",
                "-e",
                "SEKISHO_EGRESS_UPLINK=eth0",
            ]
            .map(String::from),
        );
    }
    args.extend(ULIMITS.map(String::from));
    args.extend(run.args);
    args.push(image.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let (ok, out, err) = podman(&args);
    assert!(ok, "podman run {image}: {out}\n{err}");
    let healthy = wait_until(Duration::from_secs(60), || c.healthy());
    assert!(
        healthy.is_some(),
        "the broker container is not healthy after 60 s:\n{}",
        c.logs()
    );
    println!(
        "broker container {} healthy {:.1} s after podman run",
        c.name,
        started.elapsed().as_secs_f64()
    );
    c
}

/// alice reaches the app through the broker container: the quickstart's connector links to it
/// again, alice's client hands it the flow, and its decision log (standard output) has it.
/// Returns the broker's stats.
fn alice_through(d: &Deployment, c: &Container, sock: &Path) -> Value {
    let start = Instant::now();
    let linked = wait_until(Duration::from_secs(60), || {
        !dc1_links(&broker_stats(d, sock)).is_empty()
    });
    assert!(
        linked.is_some(),
        "the connector did not link to the broker container: {}",
        broker_stats(d, sock)
    );
    let mut body = String::new();
    let reached = wait_until(Duration::from_secs(60), || {
        let (ok, out, _) = d.sh("laptop", "curl -sS -m 5 http://10.20.0.10/");
        body = out;
        ok && body.contains("Hello from the private app")
    });
    assert!(
        reached.is_some(),
        "alice does not reach the app through the broker container: {body}\n{}",
        broker_stats(d, sock)
    );
    println!(
        "connector linked after {:.1} s, alice reached the app {:.1} s after the broker \
         container was healthy",
        linked.unwrap().as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    let decided = c.logs().lines().any(|l| {
        serde_json::from_str::<Value>(l).is_ok_and(|r| {
            r["event"] == "flow"
                && r["user"] == "alice"
                && r["dport"] == 80
                && r["decision"] == "allow"
        })
    });
    assert!(
        decided,
        "no decision for alice's flow in the container's log:\n{}",
        c.logs()
    );
    broker_stats(d, sock)
}

/// The broker's listening sockets, from inside its container: the four ports of the image.
fn broker_listens_on_its_ports_only(c: &Container) {
    let (socks, ss) = steady_listening(c);
    let mut ports: Vec<String> = socks
        .iter()
        .map(|s| {
            let (proto, addr) = s.split_once(' ').unwrap();
            format!("{proto} {}", addr.rsplit(':').next().unwrap())
        })
        .collect();
    ports.sort();
    ports.dedup();
    assert_eq!(
        ports,
        ["tcp 8443", "tcp 9464", "udp 4433", "udp 51820"],
        "{ss}"
    );
}

/// nftables tables in a namespace of the deployment.
fn nft_tables(d: &Deployment, host: &str) -> String {
    d.sh(host, "nft list tables").1
}

#[test]
fn broker_image_serves_a_laptop_on_sqlite_without_privileges() {
    if skip_containers() {
        return;
    }
    let started = Instant::now();
    let at = |what: &str| println!("[{:5.1} s] {what}", started.elapsed().as_secs_f64());
    let _root_unchanged = RootUnchanged::now();
    prepare();
    let image = image("Dockerfile.broker", "sekisho-broker");
    at("image there");
    let Some(d) = Deployment::for_test() else {
        return;
    };
    at("deployment up");
    let c = broker_container(
        &d,
        &image,
        BrokerRun {
            egress: false,
            secrets: vec![],
            sqlite: true,
            args: vec![],
        },
    );
    at("broker container healthy");
    let sock = c.scratch.as_ref().unwrap().join("state/broker.sock");
    let tables_before = nft_tables(&d, "broker");
    let logs = c.logs();
    assert!(
        logs.contains("config: generated /var/lib/sekisho/broker.toml")
            && logs.contains("store sqlite"),
        "{logs}"
    );
    let stats = alice_through(&d, &c, &sock);
    at("alice reached the app through the broker container");
    let peers: Vec<&str> = stats["peers"]
        .as_array()
        .map(|p| p.iter().filter_map(|x| x["device"].as_str()).collect())
        .unwrap_or_default();
    assert!(peers.contains(&"alice-laptop"), "{stats}");

    // No privilege at all: uid 10001, no capability, not privileged; the handshake shield
    // (nftables) is left to the workers, as its warning says; nothing was added to nftables.
    let (uid, eff, bnd) = first_process(&c);
    assert!(uid.starts_with("Uid:\t10001\t"), "{uid}");
    assert_eq!((eff, bnd), (0, 0), "capabilities (effective, bounding)");
    let (ok, top, err) = podman(&["top", &c.name, "pid", "user", "comm"]);
    assert!(ok, "{err}");
    let first: Vec<&str> = top
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(first, ["1", "sekisho", "sekisho-broker"], "{top}");
    assert!(
        c.logs().contains("cannot install the handshake shield"),
        "{}",
        c.logs()
    );
    assert_eq!(nft_tables(&d, "broker"), tables_before);
    broker_listens_on_its_ports_only(&c);
    // The store is the container's own now: the admin CLI (through the API) sees alice's
    // laptop in it.
    let (ok, out, err) = d.admin(&["device", "list"]);
    assert!(ok && out.contains("alice-laptop"), "{out}{err}");
    println!(
        "broker image on SQLite: uid 10001, no capability, alice served ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    );
}

/// The test's PostgreSQL server stopped (`stop`) or started again (`start`): its socket folder
/// is the URL's host, its data in `data` there (tests/src/pg.rs).
fn pg_ctl(url: &str, action: &str) {
    let dir = url
        .split("host=")
        .nth(1)
        .expect("a socket folder in the URL");
    let mut bins: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path().join("bin/pg_ctl")))
        .filter(|p| p.exists())
        .collect();
    bins.sort();
    let pg_ctl = bins.pop().expect("pg_ctl").display().to_string();
    let data = format!("{dir}/data");
    let opts = format!("-k {dir} -c listen_addresses= -c fsync=off");
    let log = format!("{dir}/server.log");
    let mut args = vec!["-u", "postgres", "--", &pg_ctl, "-D", &data, "-w"];
    match action {
        "stop" => args.extend(["-m", "fast", "stop"]),
        _ => args.extend(["-o", &opts, "-l", &log, "start"]),
    }
    let out = Command::new("runuser").args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "pg_ctl {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn broker_image_serves_a_laptop_on_postgresql_with_egress() {
    if skip_containers() {
        return;
    }
    let started = Instant::now();
    let at = |what: &str| println!("[{:5.1} s] {what}", started.elapsed().as_secs_f64());
    let _root_unchanged = RootUnchanged::now();
    prepare();
    let image = image("Dockerfile.broker", "sekisho-broker");
    at("image there");
    let pg = Postgres::start().expect("a local PostgreSQL for the broker");
    let url = pg.url();
    let Some(d) = Deployment::for_test_with(&[("SK_DATABASE", &url)]) else {
        return;
    };
    at("deployment up on PostgreSQL");
    // PostgreSQL listens on a Unix socket only, in its own folder: mounted at the same path. The
    // URL comes from a secret file, not the environment.
    let socket_dir = url.split("host=").nth(1).unwrap().to_string();
    let c = broker_container(
        &d,
        &image,
        BrokerRun {
            egress: true,
            secrets: vec![("database-url", url.clone())],
            sqlite: false,
            args: vec![
                "-v".into(),
                format!("{socket_dir}:{socket_dir}:ro"),
                "-e".into(),
                "SEKISHO_DATABASE_URL_FILE=/etc/sekisho/secrets/database-url".into(),
            ],
        },
    );
    at("broker container healthy");
    let sock = c.scratch.as_ref().unwrap().join("state/broker.sock");
    let logs = c.logs();
    assert!(logs.contains("store postgres"), "{logs}");
    assert!(!logs.contains(&url), "the database URL is in the log");
    alice_through(&d, &c, &sock);
    at("alice reached the app through the broker container");

    // Root with CAP_NET_ADMIN alone: the egress interface and its table, and the handshake
    // shield, are in the broker's namespace.
    let (uid, eff, bnd) = first_process(&c);
    assert!(uid.starts_with("Uid:\t0\t"), "{uid}");
    assert_eq!(
        (eff, bnd),
        (NET_ADMIN, NET_ADMIN),
        "capabilities (effective, bounding)"
    );
    let tables = nft_tables(&d, "broker");
    assert!(
        tables.contains("sekisho_wg_51820") && tables.contains("sekisho_sekisho_egress"),
        "{tables}"
    );
    assert!(
        c.logs().contains("handshake shield installed"),
        "{}",
        c.logs()
    );
    broker_listens_on_its_ports_only(&c);

    // Internet egress through the container: alice on a full tunnel reaches a public web
    // server, which sees the broker's address.
    let path = d.full_tunnel_policy("");
    let (ok, out, err) = d.admin(&["policy", "apply", path.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let full = wait_until(Duration::from_secs(30), || {
        d.client_status("alice")["tunnel"]["kill_switch"] == "closed"
    });
    assert!(full.is_some(), "{:#}", d.client_status("alice"));
    let mut body = String::new();
    let out_there = wait_until(Duration::from_secs(20), || {
        body = d.sh("laptop", "curl -s -m 4 http://203.0.113.80/").1;
        body.contains("Hello from a public web server")
    });
    assert!(out_there.is_some(), "alice through egress: {body}");
    let last = d
        .log("web")
        .lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("http ")
                .map(|r| r.split(' ').next().unwrap().to_string())
        })
        .unwrap_or_default();
    assert_eq!(
        last, "10.99.2.2",
        "the web server saw alice's request from {last}"
    );
    at("alice reached the internet through the container's egress");

    // The health check means the store: PostgreSQL stopped, the container turns unhealthy;
    // started again, healthy.
    let gone = Instant::now();
    pg_ctl(&url, "stop");
    let unhealthy = wait_until(Duration::from_secs(60), || !c.healthy());
    let (_, _, why) = c.exec(&["sekisho-healthcheck", "/readyz"]);
    pg_ctl(&url, "start");
    assert!(
        unhealthy.is_some(),
        "still healthy 60 s after PostgreSQL stopped"
    );
    println!(
        "PostgreSQL stopped: unhealthy after {:.1} s ({why})",
        gone.elapsed().as_secs_f64()
    );
    let back = Instant::now();
    assert!(
        wait_until(Duration::from_secs(60), || c.healthy()).is_some(),
        "not healthy again 60 s after PostgreSQL came back:\n{}",
        c.logs()
    );
    println!(
        "PostgreSQL back: healthy after {:.1} s",
        back.elapsed().as_secs_f64()
    );

    // SIGTERM reaches the broker (the entrypoint exec'd it): it stops at once and cleanly,
    // taking its interface and tables out of the namespace.
    let stopping = Instant::now();
    let (ok, _, err) = podman(&["stop", "-t", "30", &c.name]);
    assert!(ok, "podman stop: {err}");
    let (_, code, _) = podman(&["inspect", "--format", "{{.State.ExitCode}}", &c.name]);
    assert_eq!(code, "0", "exit code after SIGTERM\n{}", c.logs());
    println!(
        "podman stop: exited 0 after {:.1} s",
        stopping.elapsed().as_secs_f64()
    );
    let tables = nft_tables(&d, "broker");
    assert!(!tables.contains("sekisho"), "left behind: {tables}");
    let (_, links, _) = d.sh("broker", "ip -o link");
    assert!(!links.contains("sekisho-egress"), "left behind: {links}");
    drop(c);
    drop(d);
    drop(pg);
    println!(
        "broker image on PostgreSQL: root with NET_ADMIN only, egress, alice served ({:.1} s in \
         all)",
        started.elapsed().as_secs_f64()
    );
}

/// A compose project started by podman-compose with deploy/compose/site-connector.yaml and an
/// override file of the test's; `down -v` when dropped (containers and volumes), after a
/// failure the containers' logs first.
struct ComposeProject {
    project: String,
    /// The override file, the podman call log and the TUN node, removed when dropped.
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl ComposeProject {
    /// `podman-compose --podman-path tests/tools/podman-for-compose.sh -p PROJECT -f
    /// deploy/compose/site-connector.yaml -f OVERRIDE ARGS`: (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("podman-compose")
            .arg("--podman-path")
            .arg(workspace().join("tests/tools/podman-for-compose.sh"))
            .args(["-p", &self.project, "-f"])
            .arg(workspace().join("deploy/compose/site-connector.yaml"))
            .arg("-f")
            .arg(self.dir.join("override.yaml"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run podman-compose");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.project)
    }

    /// What podman-compose asked podman, and what the wrapper changed.
    fn podman_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("podman.log")).unwrap_or_default()
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in ["connector-a", "connector-b"] {
                print_logs(&self.container(s));
            }
            eprintln!("--- podman calls of podman-compose:\n{}", self.podman_log());
        }
        self.run(&["down", "-v", "-t", "0"]);
        // Whatever down left (it stops at the first error).
        let filter = format!("label=io.podman.compose.project={}", self.project);
        let (_, ids, _) = podman(&["ps", "-a", "-q", "--filter", &filter]);
        for id in ids.split_whitespace() {
            podman(&["rm", "-f", "-t", "0", id]);
        }
        let (_, vols, _) = podman(&["volume", "ls", "-q", "--filter", &filter]);
        for v in vols.split_whitespace() {
            podman(&["volume", "rm", "-f", v]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` new flows at once from alice's laptop (curl); how many succeeded.
fn curls(d: &Deployment, n: usize) -> usize {
    let script = format!(
        "for i in $(seq {n}); do (curl -s -m 5 -o /dev/null -w '%{{http_code}}\\n' \
         http://10.20.0.10/ || true) & done; wait"
    );
    let (_, out, _) = d.sh("laptop", &script);
    out.lines().filter(|l| l.trim() == "200").count()
}

#[test]
fn compose_file_starts_two_connectors_with_podman_compose() {
    if skip_containers() {
        return;
    }
    let version = Command::new("podman-compose").arg("version").output();
    let missing = match &version {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`podman-compose version` fails: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("podman-compose is not installed ({e})")),
    };
    if skip_because(missing) {
        return;
    }
    let version = String::from_utf8_lossy(&version.unwrap().stdout).to_string();
    println!(
        "podman-compose: {}",
        version
            .lines()
            .find(|l| l.starts_with("podman-compose"))
            .unwrap_or("?")
    );
    let started = Instant::now();
    let at = |what: &str| println!("[{:5.1} s] {what}", started.elapsed().as_secs_f64());
    let _root_unchanged = RootUnchanged::now();
    prepare();
    let image = image("Dockerfile.connector", "sekisho-connector");
    at("image there");
    // Two connector hosts on the site's private network (site, site2): each connector its own
    // network namespace, as compose's default network gives each container.
    let Some(d) = Deployment::for_test_with(&[("SK_CONNECTORS", "2")]) else {
        return;
    };
    at("deployment up");
    d.daemon("stop", "connector");
    d.daemon("stop", "connector2");
    assert!(
        wait_until(Duration::from_secs(20), || dc1_links(&d.stats()).is_empty()).is_some(),
        "the quickstart's connectors are still linked: {}",
        d.stats()
    );
    let before = connectors(&d).len();
    let mut tokens = vec![];
    for _ in 0..2 {
        let (ok, token, err) = d.admin(&["token", "create", "--site", "dc1", "--ttl", "10m"]);
        assert!(ok, "token create: {err}");
        tokens.push(token);
    }

    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("sekisho-compose-{}", unique_tag()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("podman.log").display().to_string();
    let project = ComposeProject {
        project: format!("sekisho-e2e-{pid}"),
        dir: dir.clone(),
        env: [
            ("SEKISHO_SERVER", "https://10.99.2.2:8443"),
            ("SEKISHO_ENROLL_TOKEN_A", tokens[0].as_str()),
            ("SEKISHO_ENROLL_TOKEN_B", tokens[1].as_str()),
            ("SEKISHO_DNS_SERVERS", "10.20.0.53"),
            ("SEKISHO_ALLOW", "10.20.0.0/24 corp.example"),
            ("SEKISHO_CONNECTOR_IMAGE", image.as_str()),
            ("SEKISHO_PODMAN_LOG", log.as_str()),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    };
    // The test's override: each connector into its host's namespace, the test's label (the
    // sweep of a killed run finds the containers), these machines' process limits, a short drain, and
    // where uid 10001 cannot open the host's TUN node, one it can (the list of devices is
    // merged: the later entry for /dev/net/tun wins).
    let tun = tun_node_for_uid_10001(&dir);
    let mut services = String::new();
    for (service, host) in [("connector-a", "site"), ("connector-b", "site2")] {
        services += &format!(
            "  {service}:\n\
             \x20   network_mode: \"ns:/run/netns/{ns}\"\n\
             \x20   labels:\n\
             \x20     {LABEL}: \"{pid}\"\n\
             \x20   ulimits:\n\
             \x20     nproc: 1000\n\
             \x20     nofile: {{soft: 20000, hard: 20000}}\n\
             \x20   environment:\n\
             \x20     SEKISHO_DRAIN_TIMEOUT: 5s\n",
            ns = d.ns(host)
        );
        if let Some(node) = &tun {
            services += &format!(
                "    devices:\n\
                 \x20     - {}:/dev/net/tun\n",
                node.display()
            );
        }
    }
    // (Its volumes carry podman-compose's project label only: podman-compose 1.0.3 cannot merge
    // labels into the file's volume entries, which are empty. The project name holds the pid.)
    let override_yaml = format!(
        "# Written by tests/tests/containers.rs: the test's additions to site-connector.yaml.\n\
         services:\n{services}"
    );
    std::fs::write(dir.join("override.yaml"), &override_yaml).unwrap();

    let up = Instant::now();
    let (ok, out, err) = project.run(&["up", "-d"]);
    println!(
        "podman-compose up -d: {:.1} s (exit {ok})",
        up.elapsed().as_secs_f64()
    );
    // podman-compose 1.0.3 exits 0 even when podman refused a container: the log says.
    let calls = project.podman_log();
    // (The one-time tokens left out of what is printed.)
    let shown: String = calls
        .lines()
        .filter(|l| {
            l.starts_with("asked: podman run ")
                || l.starts_with("ran: podman --runtime runc run ")
                || !(l.starts_with("asked: ") || l.starts_with("ran: "))
        })
        .map(|l| {
            tokens
                .iter()
                .fold(l.to_string(), |l, t| l.replace(t.as_str(), "SKE1.…"))
        })
        .collect::<Vec<_>>()
        .join("\n");
    println!("podman calls (\"asked\": from podman-compose; \"ran\": what podman got):\n{shown}");
    assert!(ok, "podman-compose up: {out}\n{err}");
    assert!(!calls.contains("refused:"), "{calls}\n{out}\n{err}");
    for s in ["connector-a", "connector-b"] {
        let name = project.container(s);
        let (_, state, _) = podman(&["inspect", "--format", "{{.State.Status}}", &name]);
        assert_eq!(state, "running", "{name}: {out}\n{err}\n{}", logs(&name));
    }
    // What the wrapper had to change, and nothing else: the project network podman-compose
    // would add beside network_mode. The sysctl reaches podman whole (the file's list form).
    for s in ["connector-a", "connector-b"] {
        assert!(
            calls.contains(&format!(
                "dropped: --network-alias {s} (the container joins ns:/run/netns/"
            )),
            "{calls}"
        );
    }
    assert!(!calls.contains("completed: --sysctl"), "{calls}");
    assert_eq!(
        calls.matches("--sysctl net.ipv4.ip_forward=1").count(),
        4,
        "asked and ran, for both connectors: {calls}"
    );
    assert!(
        calls.contains(&format!(
            "answered: network {}_default exists",
            project.project
        )),
        "{calls}"
    );
    at("podman-compose up -d");

    // Both enroll (two connectors more), link and pass the health check as podman-compose
    // translated it.
    let linked = wait_until(Duration::from_secs(60), || dc1_links(&d.stats()).len() == 2);
    assert!(linked.is_some(), "links: {}", d.stats());
    assert_eq!(connectors(&d).len(), before + 2, "not enrolled once each");
    for s in ["connector-a", "connector-b"] {
        let name = project.container(s);
        let healthy = wait_until(Duration::from_secs(30), || {
            podman(&["healthcheck", "run", &name]).0
        });
        assert!(healthy.is_some(), "{name} is not healthy");
        let l = logs(&name);
        assert!(
            !tokens.iter().any(|t| l.contains(t)),
            "a token in {name}'s log"
        );
    }
    at("both connectors linked and healthy");
    // (podman-compose prints the merged files first, tokens included: the table only.)
    let (_, ps, _) = project.run(&["ps"]);
    let table: Vec<&str> = ps
        .lines()
        .filter(|l| l.starts_with("CONTAINER ID") || l.contains("_connector-"))
        .filter(|l| !l.contains("podman-for-compose"))
        .collect();
    println!("podman-compose ps:\n{}", table.join("\n"));

    // Both carry flows: each masquerades to its own address on the site network.
    let mark = d.app_requests(0).len();
    assert_eq!(curls(&d, 8), 8, "alice's flows through the two connectors");
    let seen = d.app_requests(mark);
    let (a, b) = (
        count_from(&seen, "10.20.0.1"),
        count_from(&seen, "10.20.0.2"),
    );
    println!("8 new flows: {a} through connector-a, {b} through connector-b");
    assert!(a >= 1 && b >= 1, "flows were not spread: {seen:?}");
    at("flows through both");

    // One stopped, alice still reaches the app, through the other.
    let links = dc1_links(&d.stats());
    let (ok, _, err) = project.run(&["stop", "connector-a"]);
    assert!(ok, "podman-compose stop: {err}");
    let one = wait_until(Duration::from_secs(30), || dc1_links(&d.stats()).len() == 1);
    assert!(one.is_some(), "{}", d.stats());
    let mark = d.app_requests(0).len();
    assert_eq!(curls(&d, 4), 4, "alice with connector-a stopped");
    let seen = d.app_requests(mark);
    assert_eq!(count_from(&seen, "10.20.0.2"), 4, "{seen:?}");
    at("connector-a stopped: alice through connector-b");

    // Started again, it links again with its enrollment (its volume): no third connector.
    let (ok, _, err) = project.run(&["start", "connector-a"]);
    assert!(ok, "podman-compose start: {err}");
    let again = wait_until(Duration::from_secs(60), || {
        let mut now = dc1_links(&d.stats());
        now.sort();
        let mut was = links.clone();
        was.sort();
        now == was
    });
    assert!(again.is_some(), "{} / {links:?}", d.stats());
    assert_eq!(connectors(&d).len(), before + 2, "enrolled again");
    at("connector-a started again: linked as before");

    let down = Instant::now();
    let (ok, _, err) = project.run(&["down", "-v"]);
    assert!(ok, "podman-compose down -v: {err}");
    println!(
        "podman-compose down -v: {:.1} s",
        down.elapsed().as_secs_f64()
    );
    let filter = format!("label=io.podman.compose.project={}", project.project);
    assert_eq!(podman(&["ps", "-a", "-q", "--filter", &filter]).1, "");
    assert_eq!(podman(&["volume", "ls", "-q", "--filter", &filter]).1, "");
    println!(
        "compose file with podman-compose: two connectors, flows through both ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    );
}
