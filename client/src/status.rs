//! The client's local control socket (a Unix socket, root only): `status`, `override CODE`
//! and `captive-portal` talk to the running client through it. One JSON request per
//! connection, one JSON answer.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::dataplane::{Snapshot, SnapshotRef};
use crate::killswitch::{GuardCmd, GuardView};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Override {
        code: String,
    },
    CaptivePortal,
    /// Ask the control plane for a new posture token now (after `login`).
    Refresh,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// Posture as the client last evaluated and reported it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PostureView {
    pub checks: std::collections::BTreeMap<String, bool>,
    pub token_expires: Option<u64>,
    pub last_refresh: Option<String>,
    pub last_error: Option<String>,
    /// When the user last signed in through the identity provider (Unix seconds).
    pub signed_in_at: Option<u64>,
}

/// What the device may reach, from the latest configuration.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DeviceView {
    pub device: String,
    pub user: String,
    pub address: Option<IpAddr>,
    pub routes: Vec<IpNet>,
    pub applications: Vec<String>,
}

/// Everything `status` shows.
#[derive(Clone)]
pub struct Views {
    pub data: SnapshotRef,
    pub guard: Arc<Mutex<GuardView>>,
    pub posture: Arc<Mutex<PostureView>>,
    pub device: Arc<Mutex<DeviceView>>,
    /// Wakes the posture loop for a refresh now.
    pub refresh: Arc<tokio::sync::Notify>,
}

#[derive(Serialize)]
struct Full<'a> {
    /// connected | connecting | down (every broker silent) | open (an override or the
    /// captive-portal grace is in force)
    state: &'static str,
    #[serde(flatten)]
    device: &'a DeviceView,
    tunnel: &'a GuardView,
    broker: Option<String>,
    rtt_ms: Option<f64>,
    #[serde(flatten)]
    data: &'a Snapshot,
    posture: &'a PostureView,
}

fn status_json(v: &Views) -> serde_json::Value {
    let data = v.data.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let guard = v.guard.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let posture = v.posture.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let device = v.device.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let any_session = data
        .brokers
        .iter()
        .any(|b| b.state == "up" || b.state == "connecting");
    let state = if guard.open.is_some() {
        "open"
    } else if data.connected {
        "connected"
    } else if any_session && data.switches.is_empty() {
        "connecting"
    } else {
        "down"
    };
    let active = data.brokers.iter().find(|b| b.active);
    serde_json::to_value(Full {
        state,
        device: &device,
        tunnel: &guard,
        broker: active.map(|b| b.name.clone()),
        rtt_ms: active.and_then(|b| b.rtt_ms),
        data: &data,
        posture: &posture,
    })
    .unwrap_or_default()
}

/// Serves the control socket at `path` (mode 0600).
pub async fn serve(path: &Path, views: Views, guard: mpsc::Sender<GuardCmd>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("control socket: {e}");
                continue;
            }
        };
        let views = views.clone();
        let guard = guard.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, views, guard).await {
                warn!("control socket request failed: {e:#}");
            }
        });
    }
}

async fn answer(stream: UnixStream, views: Views, guard: mpsc::Sender<GuardCmd>) -> Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r.take(64 * 1024))
        .read_line(&mut line)
        .await?;
    let answer = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Status) => Answer {
            ok: true,
            message: String::new(),
            status: Some(status_json(&views)),
        },
        Ok(Request::Override { code }) => {
            let (tx, rx) = oneshot::channel();
            let _ = guard.send(GuardCmd::Override { code, reply: tx }).await;
            reply_of(rx.await)
        }
        Ok(Request::CaptivePortal) => {
            let (tx, rx) = oneshot::channel();
            let _ = guard.send(GuardCmd::Captive { reply: tx }).await;
            reply_of(rx.await)
        }
        Ok(Request::Refresh) => {
            views.refresh.notify_one();
            Answer {
                ok: true,
                message: "posture token refresh asked for".into(),
                status: None,
            }
        }
        Err(e) => Answer {
            ok: false,
            message: format!("bad request: {e}"),
            status: None,
        },
    };
    w.write_all(&serde_json::to_vec(&answer)?).await?;
    w.write_all(b"\n").await?;
    Ok(())
}

fn reply_of(r: Result<Result<String, String>, oneshot::error::RecvError>) -> Answer {
    match r {
        Ok(Ok(message)) => Answer {
            ok: true,
            message,
            status: None,
        },
        Ok(Err(message)) => Answer {
            ok: false,
            message,
            status: None,
        },
        Err(_) => Answer {
            ok: false,
            message: "the client is stopping".into(),
            status: None,
        },
    }
}

use tokio::io::AsyncReadExt;

/// Sends one request to the running client.
pub fn ask(path: &Path, req: &Request) -> Result<Answer> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut s = UnixStream::connect(path).await.with_context(|| {
            format!(
                "the Sekisho client is not running (no control socket at {}); start it, e.g. \
                 `systemctl start sekisho-client`",
                path.display()
            )
        })?;
        let mut text = serde_json::to_vec(req)?;
        text.push(b'\n');
        s.write_all(&text).await?;
        let mut out = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            s.read_to_string(&mut out),
        )
        .await
        .context("the client did not answer")??;
        serde_json::from_str(&out).context("malformed answer from the client")
    })
}

/// The status for a person.
pub fn human(s: &serde_json::Value) -> String {
    let mut o = String::new();
    let str_of = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    o.push_str(&format!(
        "Sekisho: {}  (device {}, user {}, address {})\n",
        str_of(&s["state"]),
        str_of(&s["device"]),
        str_of(&s["user"]),
        str_of(&s["address"])
    ));
    let t = &s["tunnel"];
    o.push_str(&format!(
        "Tunnel:  {} mode{}, kill switch {}, local network {}\n",
        str_of(&t["mode"]),
        match t["tunnel_policy"].as_str() {
            Some(n) if !n.is_empty() => format!(" (policy {n})"),
            _ => String::new(),
        },
        str_of(&t["kill_switch"]),
        str_of(&t["local_network"]),
    ));
    if let Some(open) = t["open"].as_object() {
        o.push_str(&format!(
            "         OPEN by {} until {}\n",
            open.get("reason").and_then(|v| v.as_str()).unwrap_or("-"),
            open.get("until")
                .and_then(|v| v.as_u64())
                .map(|u| humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(u)
                )
                .to_string())
                .unwrap_or_default()
        ));
    }
    o.push_str("Brokers:\n");
    for b in s["brokers"].as_array().into_iter().flatten() {
        o.push_str(&format!(
            "  {} {:<20} {:<22} {:<10} rtt {}\n",
            if b["active"].as_bool() == Some(true) {
                "*"
            } else {
                " "
            },
            str_of(&b["name"]),
            str_of(&b["endpoint"]),
            str_of(&b["state"]),
            b["rtt_ms"]
                .as_f64()
                .map(|r| format!("{r:.1} ms"))
                .unwrap_or_else(|| "-".into())
        ));
    }
    let p = &s["posture"];
    let checks: Vec<String> = p["checks"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            format!(
                "{k} {}",
                if v.as_bool() == Some(true) {
                    "ok"
                } else {
                    "FAILING"
                }
            )
        })
        .collect();
    o.push_str(&format!(
        "Posture: {}\n",
        if checks.is_empty() {
            "-".into()
        } else {
            checks.join(", ")
        }
    ));
    o.push_str(&format!(
        "Sign-in: {}\n",
        match p["signed_in_at"].as_u64() {
            Some(t) => humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)
            )
            .to_string(),
            None => "never through the identity provider (enrolled with a token)".into(),
        }
    ));
    let apps: Vec<String> = s["applications"]
        .as_array()
        .into_iter()
        .flatten()
        .map(str_of)
        .collect();
    o.push_str(&format!(
        "Applications: {}\n",
        if apps.is_empty() {
            "-".into()
        } else {
            apps.join(", ")
        }
    ));
    let denials = s["broker_status"]["denials"].as_array();
    match denials {
        Some(d) if !d.is_empty() => {
            o.push_str("Latest denials:\n");
            for d in d.iter().rev().take(5) {
                o.push_str(&format!(
                    "  {} {}:{} {} — {}{}\n",
                    str_of(&d["proto"]),
                    str_of(&d["dst"]),
                    d["dport"].as_u64().unwrap_or(0),
                    d["application"].as_str().unwrap_or("(no application)"),
                    str_of(&d["reason"]),
                    d["rule"]
                        .as_str()
                        .map(|r| format!(" (rule {r})"))
                        .unwrap_or_default()
                ));
            }
        }
        _ => o.push_str("Latest denials: none\n"),
    }
    let too_old = denials.into_iter().flatten().any(|d| {
        d["reason"]
            .as_str()
            .is_some_and(|r| r.contains("sign-in too old"))
    });
    if too_old {
        o.push_str(
            "Sign-in too old for some applications: run `sekisho-client login` to sign in again.\n",
        );
    }
    let risk = &s["broker_status"]["risk"];
    if risk.is_object() {
        o.push_str(&format!("Risk: {}\n", str_of(&risk["level"])));
        for r in risk["reasons"].as_array().into_iter().flatten() {
            o.push_str(&format!("  because: {}\n", str_of(r)));
        }
        let collected: Vec<String> = risk["collected"]
            .as_array()
            .into_iter()
            .flatten()
            .map(str_of)
            .collect();
        if !collected.is_empty() {
            o.push_str("What the broker collects to judge it:\n");
            for c in collected {
                o.push_str(&format!("  - {c}\n"));
            }
        }
    } else if s["broker_status"].is_object() {
        o.push_str("Risk: low (nothing held against this device)\n");
    }
    o
}
