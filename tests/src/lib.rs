//! End-to-end test harness: real binaries in network namespaces.
//!
//! A [`Deployment`] is the quickstart (`deploy/quickstart.sh up`) run with a per-test name prefix
//! and state folder, so tests run in parallel and test exactly what a person gets. Dropping it
//! runs `down`, also after a failed assertion; after a failure the logs are printed and the state
//! folder is kept for a look.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub mod browser;
/// The workspace root.
pub mod pg;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Builds the three binaries once per test process (same profile and target folder as the
/// tests) and returns their folder.
pub fn binaries() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // The test executable lives in <target>/<profile>/deps/.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("profile folder")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target folder");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace())
            .args(["build", "--bins", "-q", "--target-dir"])
            .arg(target_dir)
            .args([
                "--profile",
                if profile == "debug" { "dev" } else { profile },
            ]);
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        profile_dir
    })
}

/// Whether namespace tests are to be skipped (explicitly, on machines without root).
pub fn skip_netns() -> bool {
    if std::env::var("SEKISHO_SKIP_NETNS").is_ok_and(|v| v == "1") {
        eprintln!("SEKISHO_SKIP_NETNS=1: skipping a network-namespace test");
        return true;
    }
    false
}

fn check_can_netns() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "end-to-end tests need root to create network namespaces; run them as root, or set \
         SEKISHO_SKIP_NETNS=1 to skip them explicitly"
    );
}

/// Removes namespaces of earlier test runs whose process is gone (a killed run cannot clean up).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("skt") else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            let pids = Command::new("ip").args(["netns", "pids", name]).output();
            if let Ok(p) = pids {
                for pid in String::from_utf8_lossy(&p.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
        }
    }
}

pub struct Deployment {
    prefix: String,
    /// Process name of this deployment's stand-in EDR agent (processes are machine-wide).
    pub edr: String,
    /// Extra settings for the quickstart (SK_* variables).
    env: Vec<(String, String)>,
    state: PathBuf,
    bin: PathBuf,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test of any run uses at the same time: `skt<pid>x<n>`, the form deployment
/// prefixes have. Namespaces named with it are swept up when their test process is gone.
pub fn unique_tag() -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("skt{}x{n}", std::process::id())
}

impl Deployment {
    /// A deployment for one test, or None when namespace tests are explicitly skipped.
    pub fn for_test() -> Option<Deployment> {
        Deployment::for_test_with(&[])
    }

    /// As [`Deployment::for_test`], with extra quickstart settings (like `SK_CERT_LIFETIME`).
    pub fn for_test_with(env: &[(&str, &str)]) -> Option<Deployment> {
        if skip_netns() {
            return None;
        }
        Some(
            Deployment::up_with(env)
                .unwrap_or_else(|e| panic!("cannot bring the deployment up: {e:#}")),
        )
    }

    /// Brings a whole deployment up (namespaces, keys, certificates, configs, daemons) and waits
    /// until the connector is linked and both clients completed their handshakes.
    pub fn up() -> Result<Deployment> {
        Deployment::up_with(&[])
    }

    pub fn up_with(env: &[(&str, &str)]) -> Result<Deployment> {
        check_can_netns();
        let bin = binaries().to_path_buf();
        sweep_stale();
        // Same counter as unique_tag(): names never collide within a test process.
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let d = Deployment {
            prefix: format!("skt{pid}x{n}-"),
            edr: format!("edr{}x{n}", pid % 1_000_000),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: std::env::temp_dir().join(format!("sekisho-e2e-{pid}-{n}")),
            bin,
        };
        let out = d.script(&["up"])?;
        if !out.status.success() {
            let logs = d.logs();
            let _ = d.script(&["down"]);
            bail!(
                "quickstart up failed: {}\n{}\n{logs}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(d)
    }

    fn script(&self, args: &[&str]) -> Result<Output> {
        Command::new(workspace().join("deploy/quickstart.sh"))
            .args(args)
            .env("SK_PREFIX", &self.prefix)
            .env("SK_STATE", &self.state)
            .env("SK_BIN", &self.bin)
            .env("SK_SKIP_PACKAGES", "1")
            .env("SK_EDR_NAME", &self.edr)
            .env("SK_CHECK_INTERVAL", "200ms")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .context("cannot run deploy/quickstart.sh")
    }

    /// Starts, stops (SIGTERM) or kills (SIGKILL) one daemon: broker, connector, client-alice,
    /// client-bob, app.
    pub fn daemon(&self, action: &str, name: &str) {
        let out = self.script(&[action, name]).expect("quickstart.sh");
        assert!(
            out.status.success(),
            "{action} {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}{}", self.prefix, host)
    }

    pub fn state(&self) -> &Path {
        &self.state
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// Runs a command inside a host's namespace.
    pub fn exec(&self, host: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// Runs a shell script inside a host's namespace; returns (success, stdout, stderr).
    pub fn sh(&self, host: &str, script: &str) -> (bool, String, String) {
        let out = self.exec(host, &["bash", "-c", script]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a Python snippet inside a host's namespace; returns its stdout, trimmed.
    pub fn py(&self, host: &str, code: &str) -> String {
        let out = self.exec(host, &["python3", "-c", code]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs the admin CLI on the broker host; returns (success, stdout, stderr).
    pub fn admin(&self, args: &[&str]) -> (bool, String, String) {
        let mut all = vec!["admin"];
        all.extend_from_slice(args);
        let out = self.script(&all).expect("quickstart.sh admin");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    }

    /// A client's status, as `sekisho-client status --json` prints it (`who`: alice, bob).
    pub fn client_status(&self, who: &str) -> Value {
        let out = Command::new(self.bin("sekisho-client"))
            .args(["status", "--json", "--socket"])
            .arg(self.state.join(format!("{who}/client.sock")))
            .output()
            .expect("sekisho-client status");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// The demo policy with alice's group (engineering) on a full tunnel, DNS upstreams set,
    /// and `extra` lines appended to the `[[tunnels]]` entry; returns the file, ready for
    /// `admin policy apply`.
    pub fn full_tunnel_policy(&self, extra: &str) -> PathBuf {
        let text = std::fs::read_to_string(self.state.join("policy.toml")).unwrap();
        let text = text.replacen("[dns]\n", "[dns]\nupstreams = [\"udp://10.99.0.53\"]\n", 1);
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = self.state.join(format!("policy-full-{n}.toml"));
        std::fs::write(
            &path,
            format!(
                "{text}\n[[tunnels]]\nname = \"engineering-full\"\ngroups = [\"engineering\"]\n\
                 mode = \"full\"\n{extra}"
            ),
        )
        .unwrap();
        path
    }

    /// The password the test OpenID provider (SK_IDP=1) gave `user` (`idp/users.json`).
    pub fn idp_password(&self, user: &str) -> String {
        let users: Value = serde_json::from_str(
            &std::fs::read_to_string(self.state.join("idp/users.json"))
                .expect("idp/users.json (SK_IDP=1)"),
        )
        .expect("users.json");
        users
            .as_array()
            .and_then(|a| a.iter().find(|u| u["username"] == user))
            .and_then(|u| u["password"].as_str())
            .unwrap_or_else(|| panic!("no {user} in idp/users.json"))
            .to_string()
    }

    /// The app host's HTTP log lines ("http CLIENT-ADDRESS REQUEST …") from the `from`-th on.
    pub fn app_requests(&self, from: usize) -> Vec<String> {
        self.log("app")
            .lines()
            .filter(|l| l.starts_with("http "))
            .skip(from)
            .map(str::to_string)
            .collect()
    }

    /// The broker's counters, peers and links (from its control socket).
    pub fn stats(&self) -> Value {
        let out = Command::new(self.bin("sekisho-broker"))
            .args(["stats", "--socket"])
            .arg(self.state.join("broker.sock"))
            .output()
            .expect("sekisho-broker stats");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// One of the broker's counters by its path, like `drops.spoofed_source` or
    /// `from_clients.packets`.
    pub fn counter(&self, path: &str) -> u64 {
        let stats = self.stats();
        let mut v = &stats["counters"];
        for part in path.split('.') {
            v = &v[part];
        }
        v.as_u64().unwrap_or(0)
    }

    /// Every line of the decision log.
    pub fn decisions(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state.join("decisions.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The latest flow decision of `user` to port `dport` in the decision log.
    pub fn last_decision(&self, user: &str, dport: u64) -> Option<Value> {
        self.decisions()
            .into_iter()
            .rev()
            .find(|r| r["event"] == "flow" && r["user"] == user && r["dport"] == dport)
    }

    pub fn pid(&self, daemon: &str) -> i32 {
        std::fs::read_to_string(self.state.join(format!("{daemon}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("{daemon} has no pid file"))
    }

    pub fn signal(&self, daemon: &str, sig: i32) {
        let rc = unsafe { libc::kill(self.pid(daemon), sig) };
        assert_eq!(rc, 0, "cannot signal {daemon}");
    }

    pub fn log(&self, daemon: &str) -> String {
        std::fs::read_to_string(self.state.join(format!("{daemon}.log"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for d in ["broker", "connector", "client-alice", "client-bob", "app"] {
            let log = self.log(d);
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            s += &format!("--- {d}.log (last lines)\n");
            for l in tail.iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            eprintln!(
                "test failed; logs of {}:\n{}",
                self.state.display(),
                self.logs()
            );
        }
        let mut cmd = Command::new(workspace().join("deploy/quickstart.sh"));
        cmd.arg("down")
            .env("SK_PREFIX", &self.prefix)
            .env("SK_STATE", &self.state)
            .env("SK_BIN", &self.bin)
            .env("SK_KEEP_STATE", if failed { "1" } else { "0" });
        let _ = cmd.output();
    }
}

/// Polls `f` until it returns true; returns how long it took, or None after `limit`.
/// How many of the app host's request lines (see [`Deployment::app_requests`]) came from
/// `addr`.
pub fn count_from(lines: &[String], addr: &str) -> usize {
    let prefix = format!("http {addr} ");
    lines.iter().filter(|l| l.starts_with(&prefix)).count()
}

pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Python that opens a TCP connection and prints "connected", "refused" or the error's name,
/// then the seconds it took.
pub fn tcp_probe(addr: &str, port: u16) -> String {
    format!(
        "import socket,time\n\
         t=time.time()\n\
         s=socket.socket(); s.settimeout(8)\n\
         try:\n  s.connect(('{addr}',{port})); r='connected'\n\
         except ConnectionRefusedError: r='refused'\n\
         except Exception as e: r=type(e).__name__+':'+str(e)\n\
         print(r, round(time.time()-t,3))"
    )
}

/// Python that sends one UDP datagram and prints the answer or the error, then the seconds.
pub fn udp_probe(addr: &str, port: u16, payload: &str) -> String {
    udp_probe_from(0, addr, port, payload)
}

/// As [`udp_probe`], from a fixed local port (0: any), so that probes share one 5-tuple.
pub fn udp_probe_from(local_port: u16, addr: &str, port: u16, payload: &str) -> String {
    udp_probe_within(local_port, addr, port, payload, 5)
}

/// As [`udp_probe_from`], waiting at most `timeout` seconds for the answer.
pub fn udp_probe_within(
    local_port: u16,
    addr: &str,
    port: u16,
    payload: &str,
    timeout: u32,
) -> String {
    format!(
        "import socket,time\n\
         t=time.time()\n\
         s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout({timeout})\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0',{local_port})); s.connect(('{addr}',{port}))\n\
         try:\n  s.send(b'{payload}'); r='reply:'+s.recv(2000).decode()\n\
         except Exception as e: r=type(e).__name__+':'+str(e)\n\
         print(r, round(time.time()-t,3))"
    )
}
