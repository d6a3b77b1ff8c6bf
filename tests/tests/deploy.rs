//! The deployment files in `deploy/`, checked against the binaries they deploy:
//!
//! - the container entrypoints (`deploy/container/*-entrypoint.sh`) run outside a container with
//!   the built binaries: the connector's enrolls against a quickstart broker, links, carries a
//!   flow, and does not enroll again after a restart; the broker's generates its config, key and
//!   CA, answers the admin CLI, keeps its state across a restart, and runs the Helm chart's own
//!   broker.toml as a StatefulSet pod would (ordinal from the host name);
//! - the Helm chart (`deploy/helm/sekisho-broker`) is rendered (with `helm`, or Helm's engine
//!   from the `helm_python` module, or else `deploy/helm/render.py`, a stand-in for the Go
//!   template subset the chart uses, compared with Helm whenever Helm is there) and the objects
//!   are checked: kinds, ports, probes, Secret references, security contexts, that every
//!   Service's selector and target ports meet the pods, that the broker.toml in the ConfigMap
//!   parses and its policy passes `sekisho-broker check-policy`, and that bad values fail;
//! - the systemd units pass `systemd-analyze verify` (with ExecStart pointing at the built
//!   binaries) and their command lines are accepted by the binaries;
//! - the compose file gives the connectors CAP_NET_ADMIN and /dev/net/tun and nothing more
//!   (and passes `docker compose config` where compose is installed);
//! - deploy/README.md documents every environment variable, chart value and compose variable.
//!
//! Needs python3 (3.11+, for tomllib) with PyYAML (Debian: python3-yaml).

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use sekisho_tests::{Deployment, binaries, skip_netns, unique_tag, wait_until, workspace};

// ---------------------------------------------------------------------------------------------
// Helpers

fn deploy() -> PathBuf {
    workspace().join("deploy")
}

fn chart() -> PathBuf {
    deploy().join("helm/sekisho-broker")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// Runs a command; returns (success, stdout, stderr).
fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn have(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A python3 with PyYAML and tomllib.
fn python() -> &'static str {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| {
        for p in ["python3", "/usr/bin/python3"] {
            if have(p, &["-c", "import yaml, tomllib"]) {
                return p.to_string();
            }
        }
        panic!(
            "the deploy tests need python3 (3.11+) with PyYAML: apt-get install python3-yaml \
             (or pip install pyyaml)"
        )
    })
}

/// Runs Python code with arguments and standard input; returns (success, stdout, stderr).
fn py(code: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every document of a YAML stream, as JSON (empty documents left out).
fn yaml_docs(text: &str) -> Vec<Value> {
    let (ok, out, err) = py(
        "import sys, yaml, json\n\
         print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
        &[],
        text,
    );
    assert!(ok, "not YAML: {err}\n{text}");
    match serde_json::from_str(&out).unwrap() {
        Value::Array(a) => a,
        _ => unreachable!(),
    }
}

fn yaml_file(p: &Path) -> Value {
    let mut d = yaml_docs(&read(p));
    assert_eq!(d.len(), 1, "{}: one document expected", p.display());
    d.remove(0)
}

fn toml_json(text: &str) -> Value {
    let (ok, out, err) = py(
        "import sys, tomllib, json\nprint(json.dumps(tomllib.loads(sys.stdin.read())))",
        &[],
        text,
    );
    assert!(ok, "not TOML: {err}\n{text}");
    serde_json::from_str(&out).unwrap()
}

fn tempdir(what: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sekisho-deploy-{what}-{}", unique_tag()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Removes a folder when dropped, also after a failure (then it prints its logs first).
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    eprintln!("--- {}\n{}", p.display(), read(&p));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn need_root() {
    assert!(
        is_root(),
        "this test creates network namespaces: run it as root, or set SEKISHO_SKIP_NETNS=1 to \
         skip it explicitly"
    );
}

/// A network namespace of our own, removed (with anything still running in it) on drop.
struct Netns(String);
impl Netns {
    fn new() -> Netns {
        let name = unique_tag();
        let (ok, _, err) = run(Command::new("ip").args(["netns", "add", &name]));
        assert!(ok, "ip netns add {name}: {err}");
        let ns = Netns(name);
        let (ok, _, err) = run(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]));
        assert!(ok, "{err}");
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

/// An entrypoint script started in a namespace as a background process; killed on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// `ip netns exec NS [unshare --uts, hostname H] sh SCRIPT` with exactly `env` (and PATH).
    fn start(
        ns: &str,
        hostname: Option<&str>,
        script: &Path,
        env: &[(String, String)],
        log: &Path,
    ) -> Daemon {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        match hostname {
            Some(h) => {
                // A StatefulSet pod's host name, in a UTS namespace of its own.
                cmd.args([
                    "unshare",
                    "--uts",
                    "sh",
                    "-c",
                    "hostname \"$0\" && exec sh \"$1\"",
                ])
                .arg(h)
                .arg(script);
            }
            None => {
                cmd.arg("sh").arg(script);
            }
        }
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd.spawn().expect("start the entrypoint");
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The program the process runs now (after the entrypoint's `exec`).
    fn exe(&self) -> String {
        std::fs::read_link(format!("/proc/{}/exe", self.pid()))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// SIGTERM, then up to `limit` for it to exit; SIGKILL after that. Returns the exit status
    /// if it exited by itself.
    fn stop(&mut self, limit: Duration) -> Option<ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Whether this build of a binary knows a config key. The probe config never gets past
/// parsing: a sentinel key right after the probed one is unknown to every build, so the error
/// names either the probed key (unknown: not supported) or the sentinel (supported), and the
/// binary does nothing else.
fn accepts(binary: &str, config: &str, key: &str) -> bool {
    let dir = TempDir(tempdir("probe"));
    let path = dir.0.join("probe.toml");
    std::fs::write(&path, config).unwrap();
    let (ok, _, err) = run(Command::new(binaries().join(binary))
        .args(["run", "--config"])
        .arg(&path));
    assert!(!ok, "{binary} accepted the probe config");
    if err.contains(&format!("unknown field `{key}`")) {
        false
    } else if err.contains("unknown field `zz_probe_sentinel`") {
        true
    } else {
        panic!("{binary}: unexpected answer to the probe config:\n{config}\n{err}")
    }
}

fn broker_has_metrics() -> bool {
    static M: OnceLock<bool> = OnceLock::new();
    *M.get_or_init(|| {
        let yes = accepts(
            "sekisho-broker",
            "private_key_file = \"missing.key\"\npolicy = \"missing.toml\"\n\
             [tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
             [metrics]\nlisten = \"127.0.0.1:9464\"\nzz_probe_sentinel = 1\n",
            "metrics",
        );
        if !yes {
            eprintln!("NOTE: this sekisho-broker has no [metrics] yet: metrics checks skipped");
        }
        yes
    })
}

const CONNECTOR_PROBE: &str = "site = \"dc1\"\nbroker = \"127.0.0.1:4433\"\n";
const CONNECTOR_PROBE_TLS: &str =
    "[tls]\nca = \"missing-ca.pem\"\ncert = \"missing.pem\"\nkey = \"missing.key\"\n";

fn connector_has_metrics() -> bool {
    static M: OnceLock<bool> = OnceLock::new();
    *M.get_or_init(|| {
        let yes = accepts(
            "sekisho-connector",
            &format!(
                "{CONNECTOR_PROBE}{CONNECTOR_PROBE_TLS}\
                 [metrics]\nlisten = \"127.0.0.1:9465\"\nzz_probe_sentinel = 1\n"
            ),
            "metrics",
        );
        if !yes {
            eprintln!("NOTE: this sekisho-connector has no [metrics] yet: metrics checks skipped");
        }
        yes
    })
}

fn connector_has_drain_timeout() -> bool {
    accepts(
        "sekisho-connector",
        &format!(
            "{CONNECTOR_PROBE}drain_timeout = \"5s\"\nzz_probe_sentinel = 1\n{CONNECTOR_PROBE_TLS}"
        ),
        "drain_timeout",
    )
}

/// HTTP status of GET http://ADDR/PATH from inside a namespace (0: no answer).
fn http_status(ns: &str, addr: &str, path: &str) -> u16 {
    let code = format!(
        "import http.client\n\
         try:\n  c=http.client.HTTPConnection('{}',{},timeout=3); c.request('GET','{path}'); print(c.getresponse().status)\n\
         except Exception: print(0)",
        addr.rsplit_once(':').unwrap().0,
        addr.rsplit_once(':').unwrap().1
    );
    let (_, out, _) = run(Command::new("ip").args(["netns", "exec", ns, python(), "-c", &code]));
    out.trim().parse().unwrap_or(0)
}

/// Links of site dc1 to the deployment's first broker.
fn dc1_links(d: &Deployment) -> usize {
    let s = d.stats();
    if let Some(c) = s["connectors"].as_array() {
        return c.iter().filter(|l| l["site"] == "dc1").count();
    }
    s["connector_links"]
        .as_array()
        .map(|l| l.iter().filter(|x| *x == "dc1").count())
        .unwrap_or(0)
}

fn json_len(text: &str) -> usize {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or_else(|| panic!("not a JSON list: {text}"))
}

fn envs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

// ---------------------------------------------------------------------------------------------
// Container entrypoints, against a quickstart deployment

#[test]
fn connector_entrypoint_enrolls_once_links_and_carries_flows() {
    let Some(d) = Deployment::for_test() else {
        return;
    };
    let script = deploy().join("container/connector-entrypoint.sh");
    let site = d.ns("site");
    // The quickstart's connector gives way: ours serves dc1 alone.
    d.daemon("stop", "connector");
    assert!(
        wait_until(Duration::from_secs(20), || dc1_links(&d) == 0).is_some(),
        "the quickstart's connector is still linked: {}",
        d.stats()
    );
    let (ok, token, err) = d.admin(&["token", "create", "--site", "dc1", "--ttl", "10m"]);
    assert!(ok, "{err}");
    let (ok, before, err) = d.admin(&["connector", "list", "--json"]);
    assert!(ok, "{err}");
    let before = json_len(&before);

    let state = d.state().join("entrypoint-connector");
    let log = d.state().join("entrypoint-connector.log");
    let metrics = connector_has_metrics();
    let mut env = envs(&[
        ("SEKISHO_BIN_DIR", &binaries().display().to_string()),
        ("SEKISHO_STATE_DIR", &state.display().to_string()),
        // Nothing mounted there: the entrypoint enrolls.
        (
            "SEKISHO_CONFIG_DIR",
            &d.state().join("no-such-folder").display().to_string(),
        ),
        ("SEKISHO_SERVER", "https://10.99.2.2:8443"),
        ("SEKISHO_ENROLL_TOKEN", &token),
        ("SEKISHO_DNS_SERVERS", "10.20.0.53"),
        ("SEKISHO_ALLOW", "10.20.0.0/24 corp.example"),
        (
            "SEKISHO_METRICS_LISTEN",
            if metrics { "127.0.0.1:9465" } else { "" },
        ),
        ("RUST_LOG", "info"),
    ]);
    if connector_has_drain_timeout() {
        env.push(("SEKISHO_DRAIN_TIMEOUT".into(), "5s".into()));
    }

    let mut c = Daemon::start(&site, None, &script, &env, &log);
    let linked = wait_until(Duration::from_secs(40), || dc1_links(&d) == 1);
    assert!(
        linked.is_some(),
        "no dc1 link from the entrypoint's connector: {}\n{}",
        d.stats(),
        c.log()
    );
    assert!(
        c.exe().ends_with("/sekisho-connector"),
        "the entrypoint did not exec the connector (pid {} runs {:?})",
        c.pid(),
        c.exe()
    );
    // Enrolled into the state folder: its own key (0600), certificate, CA; and the config it
    // runs with.
    for f in [
        "connector.toml",
        "connector.key",
        "connector.pem",
        "ca.pem",
        "connector.run.toml",
    ] {
        assert!(
            state.join(f).is_file(),
            "{f} missing in {}",
            state.display()
        );
    }
    assert_eq!(mode(&state.join("connector.key")), 0o600);
    let run_cfg = toml_json(&read(&state.join("connector.run.toml")));
    assert_eq!(run_cfg["site"], "dc1", "{run_cfg}");
    assert_eq!(
        run_cfg["dns_servers"],
        serde_json::json!(["10.20.0.53"]),
        "{run_cfg}"
    );
    if metrics {
        assert_eq!(run_cfg["metrics"]["listen"], "127.0.0.1:9465", "{run_cfg}");
    }
    assert!(
        !c.log().contains(&token),
        "the entrypoint printed the enrollment token"
    );
    let (ok, after, err) = d.admin(&["connector", "list", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(json_len(&after), before + 1, "{after}");

    // The connector the entrypoint started carries alice's flow to the app.
    let (ok, body, err) = d.sh("laptop", "curl -s -m 10 http://10.20.0.10/");
    assert!(
        ok && body.contains("Hello"),
        "alice through the entrypoint's connector: {body} {err}\n{}",
        c.log()
    );
    if metrics {
        assert!(
            wait_until(Duration::from_secs(10), || http_status(
                &site,
                "127.0.0.1:9465",
                "/readyz"
            ) == 200)
            .is_some(),
            "connector /readyz is not 200 with a link up"
        );
        let (ok, _, err) = run(Command::new("ip")
            .args(["netns", "exec", &site])
            .arg(deploy().join("container/healthcheck.sh"))
            .args(["/readyz", "127.0.0.1:9465"]));
        assert!(ok, "healthcheck.sh against the connector: {err}");
    }

    // SIGTERM reaches the connector itself (exec): it drains, removes its interface, exits.
    let status = c.stop(Duration::from_secs(60));
    assert!(
        status.is_some(),
        "the connector did not exit within 60 s of SIGTERM\n{}",
        c.log()
    );
    let (ok, _, _) = run(Command::new("ip").args(["-n", &site, "link", "show", "sekisho-c0"]));
    assert!(!ok, "the connector left its TUN device behind");
    assert!(wait_until(Duration::from_secs(20), || dc1_links(&d) == 0).is_some());

    // A restart (same environment, the used token still in it) does not enroll again.
    let mut c = Daemon::start(&site, None, &script, &env, &log);
    assert!(
        wait_until(Duration::from_secs(40), || dc1_links(&d) == 1).is_some(),
        "no dc1 link after the restart: {}\n{}",
        d.stats(),
        c.log()
    );
    assert!(c.log().contains("already enrolled"), "{}", c.log());
    let (_, again, _) = d.admin(&["connector", "list", "--json"]);
    assert_eq!(json_len(&again), before + 1, "enrolled again: {again}");
    let (ok, body, _) = d.sh("laptop", "curl -s -m 10 http://10.20.0.10/");
    assert!(ok && body.contains("Hello"), "after the restart: {body}");
    assert!(c.stop(Duration::from_secs(60)).is_some(), "{}", c.log());
    println!("connector entrypoint: enrolled once, linked twice, flows carried");
}

/// The broker entrypoint from environment variables alone: config, key, CA and SQLite store
/// made on first start and kept across a restart.
#[test]
fn broker_entrypoint_generates_its_config_and_keeps_its_state() {
    if skip_netns() {
        return;
    }
    need_root();
    let ns = Netns::new();
    let dir = TempDir(tempdir("broker"));
    let state = dir.0.join("state");
    let log = dir.0.join("broker.log");
    let script = deploy().join("container/broker-entrypoint.sh");
    let metrics = broker_has_metrics();
    let env = envs(&[
        ("SEKISHO_BIN_DIR", &binaries().display().to_string()),
        ("SEKISHO_STATE_DIR", &state.display().to_string()),
        (
            "SEKISHO_CONFIG_DIR",
            &dir.0.join("etc").display().to_string(),
        ),
        ("SEKISHO_PUBLIC_HOST", "127.0.0.1"),
        ("SEKISHO_API_LISTEN", "127.0.0.1:8443"),
        ("SEKISHO_NAME", "test-region"),
        ("SEKISHO_ADMIN_INIT", "1"),
        (
            "SEKISHO_METRICS_LISTEN",
            if metrics { "127.0.0.1:9464" } else { "" },
        ),
        ("RUST_LOG", "info"),
    ]);
    let config = state.join("broker.toml");
    let admin = |args: &[&str]| {
        run(Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(binaries().join("sekisho-broker"))
            .args(["admin", "--config"])
            .arg(&config)
            .args(args))
    };

    let mut b = Daemon::start(&ns.0, None, &script, &env, &log);
    let up = wait_until(Duration::from_secs(40), || {
        admin(&["user", "add", "carol", "--group", "engineering"]).0
    });
    assert!(up.is_some(), "the broker's API did not answer\n{}", b.log());
    assert!(
        b.exe().ends_with("/sekisho-broker"),
        "the entrypoint did not exec the broker: {:?}",
        b.exe()
    );
    let cfg = toml_json(&read(&config));
    assert_eq!(cfg["control"]["url"], "https://127.0.0.1:8443", "{cfg}");
    assert_eq!(cfg["control"]["wireguard_endpoint"], "127.0.0.1:51820");
    assert_eq!(cfg["control"]["connector_endpoint"], "127.0.0.1:4433");
    assert_eq!(cfg["control"]["name"], "test-region");
    assert_eq!(
        cfg["control"]["database"],
        format!("sqlite://{}/broker.db", state.display())
    );
    assert_eq!(mode(&config), 0o600);
    for f in ["broker.key", "pki/ca.key", "pki/broker.key", "admin.token"] {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }
    let (ok, out, err) = run(Command::new(binaries().join("sekisho-broker"))
        .args(["stats", "--socket"])
        .arg(state.join("broker.sock")));
    assert!(
        ok && out.contains("counters"),
        "stats over the control socket: {err}"
    );
    if metrics {
        assert_eq!(http_status(&ns.0, "127.0.0.1:9464", "/healthz"), 200);
        assert!(
            wait_until(Duration::from_secs(10), || http_status(
                &ns.0,
                "127.0.0.1:9464",
                "/readyz"
            ) == 200)
            .is_some(),
            "broker /readyz is not 200"
        );
    }
    let keep = |f: &str| read(&state.join(f));
    let (key, ca, token) = (keep("broker.key"), keep("pki/ca.pem"), keep("admin.token"));
    assert!(b.stop(Duration::from_secs(20)).is_some(), "{}", b.log());

    // Restart: same key, CA and admin token; the store kept carol.
    let mut b = Daemon::start(&ns.0, None, &script, &env, &log);
    let up = wait_until(Duration::from_secs(40), || {
        let (ok, out, _) = admin(&["user", "list"]);
        ok && out.contains("carol")
    });
    assert!(up.is_some(), "after the restart\n{}", b.log());
    assert_eq!(key, keep("broker.key"), "a new WireGuard key at restart");
    assert_eq!(ca, keep("pki/ca.pem"), "a new CA at restart");
    assert_eq!(token, keep("admin.token"), "a new admin token at restart");
    assert!(b.stop(Duration::from_secs(20)).is_some(), "{}", b.log());
    println!("broker entrypoint: generated config, state kept across a restart");
}

/// The broker.toml of the Helm chart's ConfigMap, run by the entrypoint the way a StatefulSet
/// pod runs it: placeholders filled from the environment, this broker's host picked by the
/// ordinal in the host name, the key made in the volume.
#[test]
fn broker_entrypoint_runs_the_helm_charts_config() {
    if skip_netns() {
        return;
    }
    need_root();
    let dir = TempDir(tempdir("helmcfg"));
    let values = dir.0.join("values.yaml");
    std::fs::write(
        &values,
        "replicaCount: 2\n\
         broker:\n  publicHosts: [192.0.2.7, 127.0.0.1]\n  apiUrl: https://127.0.0.1:8443\n",
    )
    .unwrap();
    let docs = yaml_docs(&render_stand_in(&[&values]).expect("render"));
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let sts = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let pod_name = format!("{}-1", sts["metadata"]["name"].as_str().unwrap());
    let root = dir.0.display().to_string();
    // The pod's mounts, here: /etc/sekisho/config, /etc/sekisho/pki, /var/lib/sekisho.
    let relocate = |s: &str| {
        s.replace("/etc/sekisho", &format!("{root}/etc"))
            .replace("/var/lib/sekisho", &format!("{root}/state"))
    };
    let mut broker_toml = relocate(cm["data"]["broker.toml"].as_str().unwrap());
    if !broker_has_metrics() {
        broker_toml = broker_toml.split("\n[metrics]").next().unwrap().to_string();
    }
    std::fs::create_dir_all(dir.0.join("etc/config")).unwrap();
    std::fs::write(dir.0.join("etc/config/broker.toml"), &broker_toml).unwrap();
    std::fs::write(
        dir.0.join("etc/config/policy.toml"),
        cm["data"]["policy.toml"].as_str().unwrap(),
    )
    .unwrap();
    // The PKI Secret: made as values.yaml says.
    let (ok, _, err) = run(Command::new(binaries().join("sekisho-broker"))
        .args(["pki", "init", "--dir"])
        .arg(dir.0.join("etc/pki"))
        .args(["--name", "broker.sekisho.internal", "--name", "127.0.0.1"]));
    assert!(ok, "{err}");
    // The container's environment, from the StatefulSet (the Secret's value filled in).
    let container = &sts["spec"]["template"]["spec"]["containers"][0];
    let mut env = envs(&[
        ("SEKISHO_BIN_DIR", &binaries().display().to_string()),
        ("RUST_LOG", "info"),
    ]);
    let names: Vec<String> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let value = match name {
            "SEKISHO_DATABASE_URL" => {
                assert!(e["valueFrom"]["secretKeyRef"].is_object(), "{e}");
                format!("sqlite://{root}/state/broker.db")
            }
            "RUST_LOG" => continue,
            _ => relocate(e["value"].as_str().unwrap_or_else(|| panic!("{e}"))),
        };
        env.push((name.to_string(), value));
    }
    for n in [
        "SEKISHO_CONFIG",
        "SEKISHO_STATE_DIR",
        "SEKISHO_PUBLIC_HOSTS",
        "SEKISHO_PRIVATE_KEY_FILE",
    ] {
        assert!(
            names.iter().any(|x| x == n),
            "the pod sets no {n}: {names:?}"
        );
    }

    let ns = Netns::new();
    let script = deploy().join("container/broker-entrypoint.sh");
    let log = dir.0.join("broker.log");
    let mut b = Daemon::start(&ns.0, Some(&pod_name), &script, &env, &log);
    let effective = dir.0.join("state/broker.toml");
    let up = wait_until(Duration::from_secs(40), || {
        run(Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(binaries().join("sekisho-broker"))
            .args(["admin", "--config"])
            .arg(&effective)
            .args(["user", "list"]))
        .0
    });
    assert!(
        up.is_some(),
        "the chart's broker did not answer\n{}",
        b.log()
    );
    assert!(b.exe().ends_with("/sekisho-broker"), "{:?}", b.exe());
    let cfg = toml_json(&read(&effective));
    // Pod ordinal 1 took the second public host.
    assert_eq!(
        cfg["control"]["wireguard_endpoint"], "127.0.0.1:51820",
        "{cfg}"
    );
    assert_eq!(cfg["control"]["connector_endpoint"], "127.0.0.1:4433");
    assert_eq!(
        cfg["control"]["name"],
        format!("{}-1", sts["metadata"]["name"].as_str().unwrap())
    );
    assert_eq!(
        cfg["control"]["database"],
        format!("sqlite://{root}/state/broker.db")
    );
    assert_eq!(
        mode(&effective),
        0o600,
        "the filled-in config holds the database URL"
    );
    assert!(dir.0.join("state/broker.key").is_file());
    assert!(dir.0.join("state/admin.token").is_file());
    if broker_has_metrics() {
        // The chart's probes.
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let path = container[probe]["httpGet"]["path"].as_str().unwrap();
            assert!(
                wait_until(Duration::from_secs(10), || http_status(
                    &ns.0,
                    "127.0.0.1:9464",
                    path
                ) == 200)
                .is_some(),
                "{probe} {path} is not 200"
            );
        }
    }
    assert!(b.stop(Duration::from_secs(20)).is_some(), "{}", b.log());
    println!("broker entrypoint ran the Helm chart's broker.toml as pod {pod_name}");
}

/// What the entrypoints say when something is missing: the variable's name, before anything
/// starts. No namespace needed.
#[test]
fn entrypoints_name_what_is_missing() {
    let dir = TempDir(tempdir("missing"));
    let bin = binaries().display().to_string();
    let entry = |script: &str, env: &[(&str, &str)]| {
        let mut cmd = Command::new("sh");
        cmd.arg(deploy().join("container").join(script))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SEKISHO_STATE_DIR", dir.0.join("state"))
            .env("SEKISHO_CONFIG_DIR", dir.0.join("etc"))
            .envs(env.iter().copied());
        let (ok, _, err) = run(&mut cmd);
        assert!(!ok, "{script} {env:?} succeeded");
        err
    };
    let err = entry(
        "connector-entrypoint.sh",
        &[("SEKISHO_BIN_DIR", "/nonexistent")],
    );
    assert!(err.contains("SEKISHO_BIN_DIR"), "{err}");
    let err = entry("connector-entrypoint.sh", &[("SEKISHO_BIN_DIR", &bin)]);
    assert!(err.contains("SEKISHO_SERVER is not set"), "{err}");
    let err = entry(
        "connector-entrypoint.sh",
        &[
            ("SEKISHO_BIN_DIR", &bin),
            ("SEKISHO_SERVER", "https://127.0.0.1:9"),
        ],
    );
    assert!(err.contains("SEKISHO_ENROLL_TOKEN is not set"), "{err}");
    assert!(
        !dir.0.join("state/connector.toml").exists(),
        "a refused start wrote a config"
    );
    let err = entry(
        "connector-entrypoint.sh",
        &[
            ("SEKISHO_BIN_DIR", &bin),
            ("SEKISHO_SERVER", "https://127.0.0.1:9"),
            ("SEKISHO_ENROLL_TOKEN_FILE", "/nonexistent/token"),
        ],
    );
    assert!(err.contains("SEKISHO_ENROLL_TOKEN_FILE"), "{err}");
    let err = entry(
        "connector-entrypoint.sh",
        &[
            ("SEKISHO_BIN_DIR", &bin),
            ("SEKISHO_SERVER", "https://127.0.0.1:9"),
            ("SEKISHO_ENROLL_TOKEN", "SKE1.x"),
        ],
    );
    assert!(err.contains("SEKISHO_ALLOW is not set"), "{err}");
    let err = entry("broker-entrypoint.sh", &[("SEKISHO_BIN_DIR", &bin)]);
    assert!(err.contains("SEKISHO_PUBLIC_HOST is not set"), "{err}");
    let err = entry(
        "broker-entrypoint.sh",
        &[
            ("SEKISHO_BIN_DIR", &bin),
            ("SEKISHO_PUBLIC_HOSTS", "a.example b.example"),
            ("SEKISHO_ORDINAL", "2"),
        ],
    );
    assert!(
        err.contains("SEKISHO_PUBLIC_HOSTS names 2 host(s)"),
        "{err}"
    );
    // A mounted config whose placeholder has no variable.
    std::fs::create_dir_all(dir.0.join("etc")).unwrap();
    std::fs::write(
        dir.0.join("etc/broker.toml"),
        "policy = \"p\"\nprivate_key_file = \"${SEKISHO_TEST_NO_SUCH_VARIABLE}\"\n",
    )
    .unwrap();
    let err = entry("broker-entrypoint.sh", &[("SEKISHO_BIN_DIR", &bin)]);
    assert!(
        err.contains("SEKISHO_TEST_NO_SUCH_VARIABLE") && err.contains("broker.toml:2"),
        "{err}"
    );
    println!("entrypoints name the missing variable");
}

/// The health check script: 200 passes, anything else (503, nothing listening) fails.
#[test]
fn healthcheck_script_passes_only_on_200() {
    let server = "import http.server, sys\n\
        class H(http.server.BaseHTTPRequestHandler):\n\
        \x20 def do_GET(self):\n\
        \x20   self.send_response(200 if self.path == '/healthz' else 503); self.end_headers()\n\
        \x20 def log_message(self, *a): pass\n\
        s = http.server.HTTPServer(('127.0.0.1', 0), H)\n\
        print(s.server_address[1], flush=True)\n\
        s.serve_forever()\n";
    let mut child = Command::new(python())
        .args(["-c", server])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let check = |path: &str, addr: &str| {
        run(Command::new(deploy().join("container/healthcheck.sh"))
            .args([path, addr])
            .env_remove("SEKISHO_METRICS_LISTEN"))
    };
    let healthz = check("/healthz", &format!("127.0.0.1:{port}"));
    let readyz = check("/readyz", &format!("0.0.0.0:{port}"));
    let _ = child.kill();
    let _ = child.wait();
    let closed = check("/healthz", &format!("127.0.0.1:{port}"));
    assert!(healthz.0, "{healthz:?}");
    assert!(!readyz.0 && readyz.2.contains("503"), "{readyz:?}");
    assert!(
        !closed.0 && closed.2.contains("cannot connect"),
        "{closed:?}"
    );
    // Metrics switched off (set but empty, as the entrypoints read it): the check says so
    // rather than trying the broker's default port.
    let off = run(Command::new(deploy().join("container/healthcheck.sh"))
        .arg("/readyz")
        .env("SEKISHO_METRICS_LISTEN", ""));
    assert!(!off.0 && off.2.contains("metrics are off"), "{off:?}");
}

// ---------------------------------------------------------------------------------------------
// Helm chart

const HELM_PYTHON_RENDER: &str = r#"
import sys, yaml, helm_python as helm
mode, chart, name, ns, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
def merge(b, o):
    for k, v in o.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            merge(b[k], v)
        else:
            b[k] = v
vals = {}
for f in files:
    merge(vals, yaml.safe_load(open(f)) or {})
if mode == "lint":
    r = helm.lint(chart, values=vals)
    bad = list(r.get("errors") or []) + [m for m in r.get("messages") or [] if m.get("severity", 0) >= 2]
    for m in r.get("messages") or []:
        print(m, file=sys.stderr)
    sys.exit(1 if bad else 0)
try:
    with helm.Chart.load(chart) as c:
        out = c.render(vals, name=name, namespace=ns)
except Exception as e:
    print("Error:", e, file=sys.stderr)
    sys.exit(1)
for k in sorted(out):
    if k.endswith("NOTES.txt") or not out[k].strip():
        continue
    print("---\n# Source: " + k)
    print(out[k])
"#;

/// Real Helm, if this machine has it: the helm binary, or Helm's engine in Python.
#[derive(Clone, Copy, Debug)]
enum Helm {
    Binary,
    Python,
}

fn real_helm() -> Option<Helm> {
    static H: OnceLock<Option<Helm>> = OnceLock::new();
    *H.get_or_init(|| {
        if have("helm", &["version"]) {
            Some(Helm::Binary)
        } else if have(python(), &["-c", "import helm_python"]) {
            Some(Helm::Python)
        } else {
            None
        }
    })
}

fn render_stand_in(values: &[&Path]) -> Result<String, String> {
    let mut cmd = Command::new(python());
    cmd.arg(deploy().join("helm/render.py")).arg(chart()).args([
        "--name",
        "sk",
        "--namespace",
        "zt",
    ]);
    for v in values {
        cmd.arg("-f").arg(v);
    }
    let (ok, out, err) = run(&mut cmd);
    if ok { Ok(out) } else { Err(err) }
}

fn render_helm(h: Helm, values: &[&Path]) -> Result<String, String> {
    let mut cmd = match h {
        Helm::Binary => {
            let mut c = Command::new("helm");
            c.args(["template", "sk"])
                .arg(chart())
                .args(["--namespace", "zt"]);
            for v in values {
                c.arg("-f").arg(v);
            }
            c
        }
        Helm::Python => {
            let mut c = Command::new(python());
            c.args(["-c", HELM_PYTHON_RENDER, "render"])
                .arg(chart())
                .args(["sk", "zt"])
                .args(values);
            c
        }
    };
    let (ok, out, err) = run(&mut cmd);
    if ok { Ok(out) } else { Err(err) }
}

fn lint_helm(h: Helm, values: &[&Path]) -> (bool, String) {
    let mut cmd = match h {
        Helm::Binary => {
            let mut c = Command::new("helm");
            c.arg("lint").arg(chart());
            for v in values {
                c.arg("-f").arg(v);
            }
            c
        }
        Helm::Python => {
            let mut c = Command::new(python());
            c.args(["-c", HELM_PYTHON_RENDER, "lint"])
                .arg(chart())
                .args(["sk", "zt"])
                .args(values);
            c
        }
    };
    let (ok, out, err) = run(&mut cmd);
    (ok, out + &err)
}

/// Renders with real Helm where there is one (and checks the stand-in agrees), else with the
/// stand-in. Returns the documents, or the error text.
fn render(values: &[&Path]) -> Result<Vec<Value>, String> {
    let stand_in = render_stand_in(values);
    let Some(h) = real_helm() else {
        return stand_in.map(|t| yaml_docs(&t));
    };
    let real = render_helm(h, values);
    match (&real, &stand_in) {
        (Ok(a), Ok(b)) => {
            let (a, b) = (yaml_docs(a), yaml_docs(b));
            let key = |d: &Value| format!("{}/{}", d["kind"], d["metadata"]["name"]);
            let mut sa: Vec<&Value> = a.iter().collect();
            let mut sb: Vec<&Value> = b.iter().collect();
            sa.sort_by_key(|d| key(d));
            sb.sort_by_key(|d| key(d));
            assert_eq!(
                sa, sb,
                "deploy/helm/render.py renders differently from Helm ({h:?}) with {values:?}"
            );
            Ok(a)
        }
        (Err(a), Err(_)) => Err(a.clone()),
        _ => panic!(
            "Helm ({h:?}) and render.py disagree on success with {values:?}: helm {:?}, \
             render.py {:?}",
            real.as_ref().map(|_| "ok"),
            stand_in.as_ref().map(|_| "ok")
        ),
    }
}

fn by_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn port<'a>(ports: &'a Value, name: &str) -> &'a Value {
    ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no port {name} in {ports}"))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// Checks every rendering shares: names meet, ports and probes are there.
fn check_common(docs: &[Value], replicas: usize, metrics: bool) -> &Value {
    let sts = by_kind(docs, "StatefulSet");
    assert_eq!(sts.len(), 1, "one StatefulSet");
    let sts = sts[0];
    let name = sts["metadata"]["name"].as_str().unwrap();
    assert_eq!(sts["spec"]["replicas"], replicas);
    let pod = &sts["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    assert!(labels_match(
        &sts["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    let c = &pod["spec"]["containers"][0];
    let ports = &c["ports"];
    for (n, num, proto) in [
        ("wireguard", 51820, "UDP"),
        ("connectors", 4433, "UDP"),
        ("api", 8443, "TCP"),
    ] {
        assert_eq!(port(ports, n)["containerPort"], num, "{n}");
        assert_eq!(port(ports, n)["protocol"], proto, "{n}");
    }
    if metrics {
        assert_eq!(port(ports, "metrics")["containerPort"], 9464);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["startupProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        for p in ["livenessProbe", "readinessProbe", "startupProbe"] {
            assert_eq!(c[p]["httpGet"]["port"], "metrics", "{p}");
        }
    } else {
        for p in ["livenessProbe", "readinessProbe", "startupProbe"] {
            assert_eq!(c[p]["tcpSocket"]["port"], "api", "{p}");
        }
    }
    // The database URL comes from the Secret, never from a plain value.
    let env = c["env"].as_array().unwrap();
    let db = env
        .iter()
        .find(|e| e["name"] == "SEKISHO_DATABASE_URL")
        .unwrap();
    assert!(db.get("value").is_none(), "{db}");
    // Every volume mount has its volume.
    let vols: BTreeSet<&str> = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .chain(
            sts["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v["metadata"]["name"].as_str().unwrap()),
        )
        .collect();
    for m in c["volumeMounts"].as_array().unwrap() {
        assert!(vols.contains(m["name"].as_str().unwrap()), "{m}");
    }
    // Services: one per broker (UDP endpoints), the API, the headless one; each selects the
    // pods and targets ports the container has.
    let services = by_kind(docs, "Service");
    assert_eq!(services.len(), replicas + 2, "Services");
    for svc in &services {
        let sel = &svc["spec"]["selector"];
        let mut sel_common = sel.clone();
        sel_common
            .as_object_mut()
            .unwrap()
            .remove("statefulset.kubernetes.io/pod-name");
        assert!(labels_match(&sel_common, pod_labels), "{svc}");
        for p in svc["spec"]["ports"].as_array().unwrap() {
            let target = p["targetPort"].as_str().unwrap();
            assert_eq!(
                port(ports, target)["protocol"],
                p["protocol"],
                "{}",
                svc["metadata"]["name"]
            );
        }
    }
    for i in 0..replicas {
        let svc = services
            .iter()
            .find(|s| s["metadata"]["name"] == format!("{name}-{i}"))
            .unwrap_or_else(|| panic!("no Service {name}-{i}"));
        assert_eq!(
            svc["spec"]["selector"]["statefulset.kubernetes.io/pod-name"],
            format!("{name}-{i}")
        );
        let protos: Vec<(&Value, &Value)> = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (&p["port"], &p["protocol"]))
            .collect();
        assert_eq!(protos.len(), 2);
        assert!(protos.contains(&(&Value::from(51820), &Value::from("UDP"))));
        assert!(protos.contains(&(&Value::from(4433), &Value::from("UDP"))));
    }
    let api = services
        .iter()
        .find(|s| s["metadata"]["name"] == format!("{name}-api"))
        .expect("API Service");
    assert_eq!(api["spec"]["ports"][0]["protocol"], "TCP");
    let headless = services
        .iter()
        .find(|s| s["metadata"]["name"] == sts["spec"]["serviceName"])
        .expect("the StatefulSet's headless Service");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    // The ConfigMap the pods mount.
    let cm = by_kind(docs, "ConfigMap");
    assert_eq!(cm.len(), 1);
    let config_vol = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"].is_object())
        .unwrap();
    assert_eq!(config_vol["configMap"]["name"], cm[0]["metadata"]["name"]);
    let broker_toml = toml_json(cm[0]["data"]["broker.toml"].as_str().unwrap());
    assert_eq!(
        broker_toml["control"]["database"],
        "${SEKISHO_DATABASE_URL}"
    );
    assert_eq!(
        broker_toml["metrics"]["listen"].as_str(),
        metrics.then_some("0.0.0.0:9464"),
        "{broker_toml}"
    );
    // Every path in broker.toml is under a mount.
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for p in [
        &broker_toml["private_key_file"],
        &broker_toml["policy"],
        &broker_toml["control_socket"],
        &broker_toml["tls"]["ca"],
        &broker_toml["tls"]["cert"],
        &broker_toml["tls"]["key"],
        &broker_toml["control"]["ca_key"],
        &broker_toml["control"]["admin_token_file"],
    ] {
        let p = p.as_str().unwrap();
        assert!(
            mounts.iter().any(|m| p.starts_with(&format!("{m}/"))),
            "{p} is under none of {mounts:?}"
        );
    }
    // The policy passes the broker's own check.
    let dir = TempDir(tempdir("policy"));
    let policy = dir.0.join("policy.toml");
    std::fs::write(&policy, cm[0]["data"]["policy.toml"].as_str().unwrap()).unwrap();
    let (ok, out, err) = run(Command::new(binaries().join("sekisho-broker"))
        .arg("check-policy")
        .arg(&policy));
    assert!(ok, "the chart's policy: {out}{err}");
    // The disruption budget selects the brokers.
    for pdb in by_kind(docs, "PodDisruptionBudget") {
        assert!(labels_match(
            &pdb["spec"]["selector"]["matchLabels"],
            pod_labels
        ));
    }
    sts
}

#[test]
fn helm_chart_renders_a_broker_cluster() {
    match real_helm() {
        Some(h) => println!("rendering with Helm ({h:?}) and checking render.py agrees"),
        None => println!(
            "no helm here: rendering with deploy/helm/render.py (Go template subset stand-in)"
        ),
    }
    let example = chart().join("ci/example-values.yaml");
    if let Some(h) = real_helm() {
        let (ok, out) = lint_helm(h, &[&example]);
        assert!(ok, "helm lint: {out}");
    }

    // The example: three brokers, egress through a device plugin's TUN resource.
    let docs = render(&[&example]).unwrap_or_else(|e| panic!("render: {e}"));
    let ex = yaml_file(&example);
    let sts = check_common(&docs, 3, true);
    assert_eq!(by_kind(&docs, "PodDisruptionBudget").len(), 1);
    let name = sts["metadata"]["name"].as_str().unwrap();
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let env = |n: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == n)
            .unwrap_or_else(|| panic!("no {n}"))
            .clone()
    };
    assert_eq!(
        env("SEKISHO_DATABASE_URL")["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "sekisho-db", "key": "postgres-url"})
    );
    assert_eq!(
        env("SEKISHO_PUBLIC_HOSTS")["value"],
        ex["broker"]["publicHosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let pki = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "pki")
        .unwrap();
    assert_eq!(pki["secret"]["secretName"], "sekisho-pki");
    let files: BTreeSet<&str> = pki["secret"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        BTreeSet::from(["ca.pem", "ca.key", "broker.pem", "broker.key"])
    );
    // Egress: CAP_NET_ADMIN and nothing else; the TUN device from the device plugin.
    let sc = &c["securityContext"];
    assert_eq!(sc["capabilities"]["add"], serde_json::json!(["NET_ADMIN"]));
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(sc.get("privileged").is_none_or(|p| p == false));
    assert_eq!(c["resources"]["limits"]["squat.ai/tun"], 1);
    let cm = by_kind(&docs, "ConfigMap")[0];
    let broker_toml = toml_json(cm["data"]["broker.toml"].as_str().unwrap());
    assert_eq!(broker_toml["egress"]["uplink"], "eth0");
    assert_eq!(broker_toml["control"]["url"], ex["broker"]["apiUrl"]);
    assert_eq!(broker_toml["control"]["name"], "eu-west-${SEKISHO_ORDINAL}");
    for (i, ip) in ["203.0.113.10", "203.0.113.11", "203.0.113.12"]
        .iter()
        .enumerate()
    {
        let svc = docs
            .iter()
            .find(|d| d["metadata"]["name"] == format!("{name}-{i}"))
            .unwrap();
        assert_eq!(svc["spec"]["type"], "LoadBalancer");
        assert_eq!(svc["spec"]["loadBalancerIP"], *ip);
        assert_eq!(
            svc["metadata"]["annotations"]["external-dns.alpha.kubernetes.io/hostname"],
            ex["broker"]["publicHosts"][i]
        );
    }

    // The defaults with the required values: no privilege at all, metrics and probes on.
    let dir = TempDir(tempdir("values"));
    let write = |name: &str, text: &str| {
        let p = dir.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let minimal = write(
        "minimal.yaml",
        "broker:\n  publicHosts: [a.example.net, b.example.net]\n  apiUrl: https://api.example.net:8443\n",
    );
    let docs = render(&[&minimal]).unwrap_or_else(|e| panic!("render: {e}"));
    let sts = check_common(&docs, 2, true);
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 10001);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert!(c["securityContext"]["capabilities"].get("add").is_none());
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert!(
        !serde_json::to_string(&docs).unwrap().contains("NET_ADMIN"),
        "NET_ADMIN without egress"
    );
    assert!(sts["spec"]["volumeClaimTemplates"].is_array());
    let anno = &sts["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(anno["checksum/config"].as_str().unwrap().len(), 64);
    assert_eq!(anno["prometheus.io/port"], "9464");

    // Metrics and persistence off: TCP probes on the API port, an emptyDir for the state.
    let plain = write(
        "plain.yaml",
        "replicaCount: 1\nbroker:\n  publicHosts: [a.example.net]\n  apiUrl: https://a.example.net:8443\n\
         metrics:\n  enabled: false\npersistence:\n  enabled: false\npodDisruptionBudget:\n  enabled: false\n",
    );
    let docs = render(&[&plain]).unwrap_or_else(|e| panic!("render: {e}"));
    let sts = check_common(&docs, 1, false);
    assert!(sts["spec"].get("volumeClaimTemplates").is_none());
    assert!(by_kind(&docs, "PodDisruptionBudget").is_empty());

    // Values that cannot work are refused with the key's name.
    for (text, want) in [
        ("", "broker.publicHosts"),
        (
            "replicaCount: 3\nbroker:\n  publicHosts: [a, b]\n  apiUrl: https://a:8443\n",
            "replicaCount is 3, broker.publicHosts has 2",
        ),
        (
            "replicaCount: 1\nbroker:\n  publicHosts: [a]\n",
            "broker.apiUrl is required",
        ),
        (
            "replicaCount: 1\nbroker:\n  publicHosts: [a]\n  apiUrl: http://a:8443\n",
            "broker.apiUrl must start with https://",
        ),
    ] {
        let bad = write("bad.yaml", text);
        let err = render(&[&bad]).expect_err(text);
        assert!(err.contains(want), "{text:?}: {err}");
    }
    println!("chart rendered and checked");
}

/// values.yaml: every key commented, every value used by a template, every template value in
/// values.yaml.
#[test]
fn helm_values_are_commented_used_and_complete() {
    let values_path = chart().join("values.yaml");
    let (ok, out, err) = py(
        r##"
import sys, yaml, json
text = open(sys.argv[1]).read()
lines = text.splitlines()
passthrough = {"resources", "podSecurityContext", "securityContext"}
uncommented, keys = [], []
def walk(n, path):
    if not isinstance(n, yaml.MappingNode):
        return
    for k, v in n.value:
        p = path + [k.value]
        keys.append(".".join(p))
        if len(p) <= 2 and not (len(p) == 2 and p[0] in passthrough):
            ln = k.start_mark.line
            if ln == 0 or not lines[ln - 1].strip().startswith("#"):
                uncommented.append(".".join(p))
        walk(v, p)
walk(yaml.compose(text), [])
print(json.dumps({"uncommented": uncommented, "keys": keys}))
"##,
        &[values_path.to_str().unwrap()],
        "",
    );
    assert!(ok, "{err}");
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        info["uncommented"],
        serde_json::json!([]),
        "values.yaml keys without a comment line above them"
    );
    let values = yaml_file(&values_path);

    // Every .Values.x.y a template uses exists in values.yaml.
    let mut refs = BTreeSet::new();
    for e in std::fs::read_dir(chart().join("templates")).unwrap() {
        let text = read(&e.unwrap().path());
        let mut rest = text.as_str();
        while let Some(i) = rest.find(".Values.") {
            let after = &rest[i + ".Values.".len()..];
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(after.len());
            refs.insert(after[..end].trim_end_matches('.').to_string());
            rest = &after[end..];
        }
    }
    assert!(refs.len() > 30, "{refs:?}");
    for r in &refs {
        let mut v = &values;
        for part in r.split('.') {
            v = v.get(part).unwrap_or_else(|| {
                panic!("templates use .Values.{r}, which values.yaml does not have")
            });
        }
    }
    // Every value is used (a template reads it or a map around it).
    fn leaves(v: &Value, path: String, out: &mut Vec<String>) {
        match v.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, x) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    leaves(x, p, out);
                }
            }
            _ => out.push(path),
        }
    }
    let mut all = Vec::new();
    leaves(&values, String::new(), &mut all);
    for leaf in &all {
        assert!(
            refs.iter()
                .any(|r| leaf == r || leaf.starts_with(&format!("{r}."))),
            "values.yaml has {leaf}, which no template uses"
        );
    }
    // And deploy/README.md documents each (maps passed through whole: their key).
    let readme = read(&deploy().join("README.md"));
    for k in info["keys"].as_array().unwrap() {
        let k = k.as_str().unwrap();
        let parent = k.split('.').next().unwrap();
        if k.contains('.')
            && ["resources", "podSecurityContext", "securityContext"].contains(&parent)
        {
            continue;
        }
        assert!(
            readme.contains(&format!("`{k}`")),
            "deploy/README.md does not document the chart value `{k}`"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// systemd units, compose file, container files, docs

#[test]
fn systemd_units_verify_and_match_the_clis() {
    let units: Vec<PathBuf> = std::fs::read_dir(deploy().join("systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    assert_eq!(units.len(), 3, "{units:?}");
    let bin = binaries();
    let dir = TempDir(tempdir("units"));
    let verify = have("systemd-analyze", &["--version"]);
    if !verify {
        println!("NOTE: no systemd-analyze here: units checked against the CLIs only");
    }
    for unit in &units {
        let name = unit.file_name().unwrap().to_str().unwrap();
        let text = read(unit);
        // The command lines the unit runs, with the installed path replaced by the built one:
        // each must be accepted by the binary (`--help` after them prints help only if every
        // argument before it parses).
        for line in text.lines() {
            let Some(cmdline) = line
                .strip_prefix("ExecStart=")
                .or_else(|| line.strip_prefix("ExecReload="))
            else {
                continue;
            };
            let args: Vec<&str> = cmdline.split_whitespace().collect();
            if let Some(b) = args[0].strip_prefix("/usr/local/bin/") {
                let (ok, _, err) = run(Command::new(bin.join(b)).args(&args[1..]).arg("--help"));
                assert!(ok, "{name}: `{cmdline}` is not accepted by {b}: {err}");
            } else {
                assert!(
                    Path::new(args[0]).exists(),
                    "{name}: {} is missing",
                    args[0]
                );
            }
        }
        if !verify {
            continue;
        }
        let copy = dir.0.join(name);
        std::fs::write(
            &copy,
            text.replace("/usr/local/bin/", &format!("{}/", bin.display())),
        )
        .unwrap();
        let (ok, out, err) = run(Command::new("systemd-analyze").arg("verify").arg(&copy));
        // Warnings (unknown keys, bad values) do not fail the command: any line about our unit
        // does.
        let ours: Vec<&str> = out
            .lines()
            .chain(err.lines())
            .filter(|l| l.contains(name))
            .collect();
        assert!(
            ok && ours.is_empty(),
            "systemd-analyze verify {name}:\n{out}{err}"
        );
    }
    // The connector drains on SIGTERM (up to its drain_timeout, 5 min by default): its unit
    // waits longer than that.
    let connector = read(&deploy().join("systemd/sekisho-connector.service"));
    let timeout = connector
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec in the connector unit");
    let secs = humantime::parse_duration(timeout)
        .map(|d| d.as_secs())
        .or_else(|_| timeout.parse::<u64>())
        .unwrap();
    assert!(
        secs > 300,
        "TimeoutStopSec={timeout} cuts the connector's drain short"
    );
}

#[test]
fn compose_file_gives_connectors_net_admin_and_nothing_more() {
    let file = deploy().join("compose/site-connector.yaml");
    let env_example = deploy().join("compose/site-connector.env.example");
    let doc = yaml_file(&file);
    check_compose(&doc, true);
    // Every variable the compose file uses is in the example env file.
    let text = read(&file);
    let example = read(&env_example);
    for var in text.split("${").skip(1) {
        let name: String = var
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            example.contains(&format!("\n{name}=")),
            "{name} is missing from site-connector.env.example"
        );
    }
    // Compose itself, where it is installed (v2 plugin, or the Debian docker-compose).
    let compose: Option<Vec<&str>> = if have("docker", &["compose", "version"]) {
        Some(vec!["docker", "compose"])
    } else if have("docker-compose", &["version"]) {
        Some(vec!["docker-compose"])
    } else {
        None
    };
    let Some(compose) = compose else {
        println!("NOTE: no docker compose here: the file is checked as YAML only");
        return;
    };
    let config = |env_file: &Path| {
        run(Command::new(compose[0])
            .args(&compose[1..])
            .arg("--env-file")
            .arg(env_file)
            .arg("-f")
            .arg(&file)
            .arg("config")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::temp_dir()))
    };
    let (ok, out, err) = config(&env_example);
    assert!(ok, "{compose:?} config: {err}");
    let resolved = yaml_docs(&out).remove(0);
    check_compose(&resolved, false);
    assert_eq!(
        resolved["services"]["connector-a"]["environment"]["SEKISHO_SERVER"],
        "https://broker.example.net:8443"
    );
    // Without SEKISHO_SERVER compose refuses, naming it.
    let dir = TempDir(tempdir("compose"));
    let empty = dir.0.join("empty.env");
    std::fs::write(&empty, "").unwrap();
    let (ok, _, err) = config(&empty);
    assert!(!ok && err.contains("SEKISHO_SERVER"), "{err}");
    println!("compose file checked with {compose:?}");
}

fn check_compose(doc: &Value, raw: bool) {
    let services = doc["services"].as_object().unwrap();
    assert!(services.len() >= 2, "two connectors for HA");
    let mut volumes = BTreeSet::new();
    let mut tokens = BTreeSet::new();
    for (name, s) in services {
        // Short syntax ("a:b") or compose v2's long one ({source, target}).
        let list = |k: &str| -> Vec<String> {
            s[k].as_array()
                .unwrap_or_else(|| panic!("{name}: no {k}"))
                .iter()
                .map(|x| match x.as_str() {
                    Some(t) => t.to_string(),
                    None => format!(
                        "{}:{}",
                        x["source"].as_str().unwrap_or(""),
                        x["target"].as_str().unwrap_or("")
                    ),
                })
                .collect()
        };
        assert_eq!(list("cap_add"), ["NET_ADMIN"], "{name}");
        assert_eq!(list("cap_drop"), ["ALL"], "{name}");
        assert!(
            list("devices")
                .iter()
                .any(|d| d.starts_with("/dev/net/tun")),
            "{name}: no /dev/net/tun"
        );
        assert!(s.get("privileged").is_none_or(|p| p == false), "{name}");
        assert!(s.get("network_mode").is_none(), "{name}");
        let sec = serde_json::to_string(&s["security_opt"]).unwrap();
        assert!(
            !sec.contains("no-new-privileges"),
            "{name}: no-new-privileges disables the image's file capabilities"
        );
        // The list form (podman-compose 1.0.3 loses the value of the map form).
        assert!(
            s["sysctls"]
                .as_array()
                .is_some_and(|l| l.iter().any(|v| v == "net.ipv4.ip_forward=1")),
            "{name}: sysctls {}",
            s["sysctls"]
        );
        assert!(
            ["always", "unless-stopped", "on-failure"].contains(&s["restart"].as_str().unwrap()),
            "{name}"
        );
        let grace = s["stop_grace_period"].as_str().unwrap();
        if !raw {
            let d = humantime::parse_duration(grace).unwrap();
            assert!(
                d > Duration::from_secs(300),
                "{name}: stop_grace_period {grace}"
            );
        }
        let hc = serde_json::to_string(&s["healthcheck"]["test"]).unwrap();
        assert!(
            hc.contains("sekisho-healthcheck") && hc.contains("/readyz"),
            "{name}: {hc}"
        );
        let vols = list("volumes");
        let state: Vec<&String> = vols
            .iter()
            .filter(|v| v.contains(":/var/lib/sekisho"))
            .collect();
        assert_eq!(state.len(), 1, "{name}: one state volume");
        assert!(volumes.insert(state[0].split(':').next().unwrap().to_string()));
        let token = s["environment"]["SEKISHO_ENROLL_TOKEN"].as_str().unwrap();
        if raw {
            assert!(tokens.insert(token.to_string()), "{name}: shares a token");
        }
        assert!(s["environment"].get("SEKISHO_SERVER").is_some(), "{name}");
    }
    for v in &volumes {
        assert!(doc["volumes"].get(v).is_some(), "volume {v} not declared");
    }
}

#[test]
fn container_files_build_what_the_entrypoints_need() {
    let root = workspace();
    for (file, binary, entry) in [
        (
            "Dockerfile.broker",
            "sekisho-broker",
            "broker-entrypoint.sh",
        ),
        (
            "Dockerfile.connector",
            "sekisho-connector",
            "connector-entrypoint.sh",
        ),
    ] {
        let text = read(&deploy().join("container").join(file));
        let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        // The Rust build, the binary built elsewhere, the choice between them, the runtime.
        assert_eq!(
            froms,
            [
                "FROM docker.io/library/rust:1-bookworm AS build",
                "FROM scratch AS prebuilt",
                "FROM ${BINARIES} AS binaries",
                "FROM ${BASE}",
            ],
            "{file}: stages"
        );
        // Build arguments before the first FROM, with the public defaults.
        let head = &text[..text.find(froms[0]).unwrap()];
        assert!(
            head.contains("\nARG BASE=docker.io/library/debian:bookworm-slim\n"),
            "{file}"
        );
        assert!(head.contains("\nARG BINARIES=build\n"), "{file}");
        for doc in [
            "#   BASE ",
            "#   BINARIES ",
            "--build-arg BINARIES=prebuilt",
        ] {
            assert!(head.contains(doc), "{file}: {doc:?} undocumented");
        }
        assert!(
            text.contains(&format!("cargo build --release --locked -p {binary}")),
            "{file}: release build with --locked"
        );
        assert!(
            text.contains(&format!("COPY prebuilt/{binary} /out/{binary}\n")),
            "{file}: the prebuilt stage takes prebuilt/{binary}"
        );
        let runtime = &text[text.find(froms[3]).unwrap()..];
        // The runtime stage takes the binary from the chosen stage, nothing from the others.
        assert!(runtime.contains("from=binaries"), "{file}");
        assert!(
            !runtime.contains("from=build") && !runtime.contains("from=prebuilt"),
            "{file}"
        );
        for pkg in ["ca-certificates", "iproute2", "nftables"] {
            assert!(runtime.contains(pkg), "{file}: {pkg}");
        }
        assert!(runtime.contains("--no-install-recommends"), "{file}");
        assert!(
            runtime.contains("rm -rf /var/lib/apt/lists/*"),
            "{file}: apt lists left in the image"
        );
        let user = runtime
            .lines()
            .find_map(|l| l.strip_prefix("USER "))
            .unwrap_or_else(|| panic!("{file}: no USER"));
        assert!(
            !user.starts_with("0") && !user.starts_with("root"),
            "{file}: runs as root"
        );
        // Every COPY from the build context exists in the repository.
        for l in runtime.lines() {
            let Some(args) = l.strip_prefix("COPY ") else {
                continue;
            };
            if args.contains("--from=") {
                continue;
            }
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            for src in &words[..words.len() - 1] {
                assert!(root.join(src).exists(), "{file}: COPY {src}: no such file");
            }
        }
        assert!(
            text.contains(&format!("deploy/container/{entry}")),
            "{file}: {entry}"
        );
        assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/"), "{file}");
        assert!(
            !text
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.contains("privileged")),
            "{file}"
        );
    }
    let connector = read(&deploy().join("container/Dockerfile.connector"));
    assert!(connector.contains("setcap cap_net_admin=ep /usr/local/bin/sekisho-connector"));
    assert!(connector.contains("setcap cap_net_admin=ep /usr/sbin/nft"));
    let broker = read(&deploy().join("container/Dockerfile.broker"));
    assert!(!broker.contains("setcap"), "the broker needs no capability");

    // The scripts parse as what their #! says; shellcheck where installed.
    for (script, shell) in [
        ("broker-entrypoint.sh", "sh"),
        ("connector-entrypoint.sh", "sh"),
        ("healthcheck.sh", "bash"),
    ] {
        let p = deploy().join("container").join(script);
        assert!(
            read(&p).starts_with(&format!("#!/bin/{shell}\n")),
            "{script}"
        );
        assert!(mode(&p) & 0o111 != 0, "{script} is not executable");
        let (ok, _, err) = run(Command::new(shell).arg("-n").arg(&p));
        assert!(ok, "{script}: {err}");
        if have("shellcheck", &["--version"]) {
            let (ok, out, err) = run(Command::new("shellcheck").arg("-x").arg(&p));
            assert!(ok, "shellcheck {script}:\n{out}{err}");
        }
    }
    // The functions both entrypoints source (not run by itself, so no #! and no x bit).
    let lib = deploy().join("container/sekisho-entrypoint-lib.sh");
    let (ok, _, err) = run(Command::new("sh").arg("-n").arg(&lib));
    assert!(ok, "sekisho-entrypoint-lib.sh: {err}");
    if have("shellcheck", &["--version"]) {
        let (ok, out, err) = run(Command::new("shellcheck").arg(&lib));
        assert!(ok, "shellcheck sekisho-entrypoint-lib.sh:\n{out}{err}");
    }
}

/// deploy/README.md names every environment variable the entrypoints and images read, and every
/// variable of the compose file.
#[test]
fn deploy_readme_documents_every_setting() {
    let readme = read(&deploy().join("README.md"));
    let mut vars = BTreeSet::new();
    for f in [
        "container/broker-entrypoint.sh",
        "container/connector-entrypoint.sh",
        "container/healthcheck.sh",
        "container/Dockerfile.broker",
        "container/Dockerfile.connector",
        "compose/site-connector.yaml",
    ] {
        let text = read(&deploy().join(f));
        let mut rest = text.as_str();
        while let Some(i) = rest.find("SEKISHO_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            let name = name.trim_end_matches('_').to_string();
            if name != "SEKISHO" {
                vars.insert(name);
            }
        }
    }
    assert!(vars.len() > 30, "{vars:?}");
    let missing: Vec<&String> = vars
        .iter()
        .filter(|v| !readme.contains(&format!("`{v}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/README.md does not document {missing:?}"
    );
    assert!(readme.contains("`RUST_LOG`"), "RUST_LOG");
}
