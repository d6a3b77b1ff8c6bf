//! `sekisho-broker admin …`: the admin CLI. `admin init` works on the database directly (it
//! creates the first admin token); every other command calls the control API over HTTPS with
//! an admin token, so it works from any machine that has the CA certificate and the token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde::de::DeserializeOwned;

use sekisho_proto::api;
use sekisho_proto::policy::{Action, Protocol, parse_destination};
use sekisho_sys::http::{ApiClient, ca_tls};

use crate::config::BrokerConfig;
use crate::store::{Store, now_unix};

#[derive(Args)]
pub struct AdminArgs {
    /// Broker config: the API URL, CA certificate and admin token file are taken from it.
    #[arg(
        short,
        long,
        value_name = "FILE",
        env = "SEKISHO_BROKER_CONFIG",
        global = true
    )]
    config: Option<PathBuf>,
    /// Control API URL (overrides the config's `control.url`).
    #[arg(long, env = "SEKISHO_SERVER", global = true)]
    server: Option<String>,
    /// CA certificate (PEM) the API's certificate chains to (overrides the config's `tls.ca`).
    #[arg(long, env = "SEKISHO_CA", global = true)]
    ca: Option<PathBuf>,
    /// File with the admin token (overrides the config's `control.admin_token_file`).
    #[arg(long, env = "SEKISHO_ADMIN_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Print answers as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create the first admin token (on the broker host; opens the database directly) and
    /// write it to the config's `control.admin_token_file` (mode 0600).
    Init {
        /// Name recorded with the token in the audit log.
        #[arg(long, default_value = "admin")]
        name: String,
        /// Replace an existing token file.
        #[arg(long)]
        force: bool,
    },
    /// Users of the directory.
    #[command(subcommand)]
    User(UserCommand),
    /// Groups of the directory.
    #[command(subcommand)]
    Group(GroupCommand),
    /// One-time enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Enrolled connectors.
    #[command(subcommand)]
    Connector(ConnectorCommand),
    /// The policy in force.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The keys that sign posture tokens and override codes.
    #[command(subcommand)]
    SigningKey(SigningKeyCommand),
    /// Admin tokens: named, with a role and an expiry, listed and revoked (admin role only).
    #[command(subcommand)]
    AdminToken(AdminTokenCommand),
    /// SCIM tokens: what an identity provider's provisioning client calls /scim/v2 with
    /// (admin role only).
    #[command(subcommand)]
    ScimToken(ScimTokenCommand),
    /// Sign in through the company's identity provider (a code to enter in a browser on any
    /// device) and write the admin token you get to the token file (mode 0600). The role
    /// comes from your groups through the policy's `[identity] admin_roles`; the token
    /// expires after the control plane's `oidc.admin_session`.
    Login {
        /// Use the system browser with a return to 127.0.0.1 instead of a code.
        #[arg(long)]
        browser: bool,
    },
    /// Explain a decision: can USER's (or DEVICE's) traffic reach ADDRESS:PORT, and which
    /// rule says so? Exit code 0 when allowed, 1 when denied.
    Explain {
        #[arg(long, conflicts_with = "device", required_unless_present = "device")]
        user: Option<String>,
        #[arg(long)]
        device: Option<String>,
        /// Destination, ADDRESS:PORT (or ADDRESS for ICMP).
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "tcp")]
        protocol: String,
        /// With --user: assume this posture check fails (repeatable).
        #[arg(long = "failing-check")]
        failing_checks: Vec<String>,
        /// With --user: assume this risk (low, medium, high); a device's is the risk engine's.
        #[arg(long, value_parser = parse_level)]
        risk: Option<sekisho_proto::risk::Level>,
    },
}

fn parse_level(s: &str) -> Result<sekisho_proto::risk::Level, String> {
    sekisho_proto::risk::Level::parse(s).ok_or_else(|| "low, medium or high".to_string())
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user, optionally in groups (created as needed).
    Add {
        name: String,
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    List,
    /// Disable a user: their flows are cut and new ones denied.
    Disable {
        name: String,
    },
    Enable {
        name: String,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    Add { name: String },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a one-time enrollment token for a user's device (--user) or a site's connector
    /// (--site). Prints the token.
    Create {
        #[arg(long, conflicts_with = "site", required_unless_present = "site")]
        user: Option<String>,
        #[arg(long)]
        site: Option<String>,
        /// How long the token stays valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// With --user: the class of the device it enrolls, managed (default) or personal.
        #[arg(long, value_parser = parse_class)]
        class: Option<sekisho_proto::policy::DeviceClass>,
    },
}

fn parse_class(s: &str) -> Result<sekisho_proto::policy::DeviceClass, String> {
    sekisho_proto::policy::DeviceClass::parse(s).ok_or_else(|| "managed or personal".to_string())
}

#[derive(Subcommand)]
enum DeviceCommand {
    List,
    /// Revoke a device: its tunnel and flows are cut at once and its key cannot come back.
    Revoke {
        name: String,
    },
    /// Set a device's class (managed or personal), as an MDM would: levels above what the
    /// class may use (`[device_classes]` in the policy) close at once.
    Class {
        name: String,
        #[arg(value_parser = parse_class)]
        class: sekisho_proto::policy::DeviceClass,
    },
    /// Issue an override code: `sekisho-client override CODE` on that device opens its kill
    /// switch (full tunnel) for the code's lifetime. Issue and use are audited.
    Override {
        name: String,
        /// How long the code (and the opening) lasts, at most 24h.
        #[arg(long = "for", default_value = "15m", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Revoke an override code by its id (printed when it was issued): the device drops it
    /// at its next configuration refresh and closes a window it opened. A code also works
    /// only once.
    RevokeOverride {
        /// The code's id (it may start with "-").
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
}

#[derive(Subcommand)]
enum ConnectorCommand {
    List,
    /// Revoke a connector: its link is closed and its certificate refused.
    Revoke {
        name: String,
    },
    /// Drain a connector for maintenance: on every broker its links take no new flows (the
    /// site's other connectors do); open flows go on. It stays enrolled and linked.
    Drain {
        name: String,
    },
    /// Let a drained connector take new flows again.
    Resume {
        name: String,
    },
}

#[derive(Subcommand)]
enum AdminTokenCommand {
    /// Every admin token: id, name, role, created, expires, revoked (never the secret).
    List,
    /// A new admin token, printed once. Roles: admin (everything), operator (devices, users,
    /// groups, enrollment tokens; read everything), helpdesk (devices: list, revoke,
    /// override codes), auditor (read-only).
    Create {
        name: String,
        #[arg(long, default_value = "admin", value_parser = clap::value_parser!(sekisho_proto::roles::Role))]
        role: sekisho_proto::roles::Role,
        /// Lifetime, like 30d or 8h; without it the token lasts until revoked.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Revoke an admin token by its id: it stops working at once.
    Revoke {
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
}

#[derive(Subcommand)]
enum ScimTokenCommand {
    /// A new SCIM token for a provisioning client (Entra ID, Okta, …), printed once: the
    /// client's secret token for https://BROKER:PORT/scim/v2.
    Create {
        /// Recorded with the token; SCIM changes are audited as scim:NAME.
        #[arg(long)]
        name: String,
    },
    /// Every SCIM token: id, name, created, last used, revoked (never the secret).
    List,
    /// Revoke a SCIM token by its id: it stops working at once.
    Revoke {
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
}

#[derive(Subcommand)]
enum SigningKeyCommand {
    /// Every signing key, newest first: active (signs), previous (still verifies tokens
    /// issued before the last rotation, until the time shown) or retired.
    List,
    /// Make a new key the active one on every broker. Tokens and override codes signed
    /// with the previous key stay valid for the posture token lifetime (plus a minute),
    /// then that key is retired.
    Rotate,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check a policy file against the directory, run its tests and, if all pass, put it in
    /// force.
    Apply { file: PathBuf },
    /// Print the policy in force.
    Show,
}

struct Conn {
    config: Option<BrokerConfig>,
    server: Option<String>,
    ca: Option<PathBuf>,
    token_file: Option<PathBuf>,
}

impl Conn {
    /// The API URL, its CA certificate and the admin token file.
    fn endpoints(&self) -> Result<(String, PathBuf, PathBuf)> {
        let ctl = self.config.as_ref().and_then(|c| c.control.as_ref());
        let server = self
            .server
            .clone()
            .or_else(|| ctl.map(|c| c.url.clone()))
            .context("no API URL: pass --server or --config")?;
        let ca = self
            .ca
            .clone()
            .or_else(|| self.config.as_ref().map(|c| c.tls.ca.clone()))
            .context("no CA certificate: pass --ca or --config")?;
        let token_file = self
            .token_file
            .clone()
            .or_else(|| ctl.map(|c| c.admin_token_file.clone()))
            .context("no admin token file: pass --token-file or --config")?;
        Ok((server, ca, token_file))
    }

    fn client(&self) -> Result<ApiClient> {
        let (server, ca, token_file) = self.endpoints()?;
        let ca_pem = std::fs::read_to_string(&ca)
            .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("cannot read the admin token {}", token_file.display()))?;
        Ok(ApiClient::new(
            &server,
            ca_tls(&ca_pem)?,
            Some(token.trim().to_string()),
        )?)
    }
}

pub fn run(args: AdminArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

/// [`run`] on the caller's runtime.
pub(crate) async fn run_async(args: AdminArgs) -> Result<()> {
    let config = args.config.as_deref().map(BrokerConfig::load).transpose()?;
    let conn = Conn {
        config,
        server: args.server,
        ca: args.ca,
        token_file: args.token_file,
    };
    dispatch(conn, args.command, args.json).await
}

fn print<T: Serialize>(json: bool, value: &T, text: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{}", text(value));
    }
    Ok(())
}

async fn post<Req: Serialize, Resp: DeserializeOwned>(
    conn: &Conn,
    path: &str,
    body: &Req,
) -> Result<Resp> {
    Ok(conn.client()?.post(path, body).await?)
}

async fn get<Resp: DeserializeOwned>(conn: &Conn, path: &str) -> Result<Resp> {
    Ok(conn.client()?.get(path).await?)
}

fn when(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// The signing keys as a table, newest first.
pub(crate) fn signing_keys_text(keys: &[api::SigningKeyInfo]) -> String {
    let mut lines = vec![format!(
        "{:<14} {:<9} {:<22} NOTE",
        "KID", "STATE", "CREATED"
    )];
    for k in keys {
        let note = match k.state {
            api::SigningKeyState::Active => "signs new tokens and override codes".to_string(),
            api::SigningKeyState::Previous => match k.verifies_until {
                Some(t) => format!("verifies until {}", when(t)),
                None => "verifies".to_string(),
            },
            api::SigningKeyState::Retired => match k.retired_at {
                Some(t) => format!("retired {}", when(t)),
                None => "window passed, retired on the next check".to_string(),
            },
        };
        lines.push(format!(
            "{:<14} {:<9} {:<22} {note}",
            k.kid,
            k.state.as_str(),
            when(k.created_at)
        ));
    }
    lines.join("\n")
}

/// What a rotation did, in words.
pub(crate) fn rotated_text(r: &api::SigningKeyRotated) -> String {
    let mut s = format!(
        "signing key {} is now active on every broker of this store",
        r.active
    );
    for k in &r.keys {
        if k.state == api::SigningKeyState::Previous {
            s += &format!(
                "\nkey {} still verifies what it signed{}",
                k.kid,
                k.verifies_until
                    .map(|t| format!(" until {}", when(t)))
                    .unwrap_or_default()
            );
        }
    }
    s
}

async fn dispatch(conn: Conn, command: AdminCommand, json: bool) -> Result<()> {
    match command {
        AdminCommand::Init { name, force } => init(&conn, &name, force).await,
        AdminCommand::Login { browser } => login(&conn, browser, json).await,
        AdminCommand::User(UserCommand::Add { name, groups }) => {
            let u: api::UserInfo =
                post(&conn, "/v1/admin/users", &api::CreateUser { name, groups }).await?;
            print(json, &u, |u| {
                format!("user {} created (groups: {})", u.name, u.groups.join(", "))
            })
        }
        AdminCommand::User(UserCommand::List) => {
            let users: Vec<api::UserInfo> = get(&conn, "/v1/admin/users").await?;
            print(json, &users, |us| {
                us.iter()
                    .map(|u| {
                        format!(
                            "{:<20} {:<30} {}",
                            u.name,
                            u.groups.join(","),
                            if u.disabled { "disabled" } else { "active" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        AdminCommand::User(UserCommand::Disable { name }) => {
            let u: api::UserInfo =
                post(&conn, &format!("/v1/admin/users/{name}/disable"), &()).await?;
            print(json, &u, |u| format!("user {} disabled", u.name))
        }
        AdminCommand::User(UserCommand::Enable { name }) => {
            let u: api::UserInfo =
                post(&conn, &format!("/v1/admin/users/{name}/enable"), &()).await?;
            print(json, &u, |u| format!("user {} enabled", u.name))
        }
        AdminCommand::Group(GroupCommand::Add { name }) => {
            let g: api::CreateGroup =
                post(&conn, "/v1/admin/groups", &api::CreateGroup { name }).await?;
            print(json, &g, |g| format!("group {} created", g.name))
        }
        AdminCommand::Token(TokenCommand::Create {
            user,
            site,
            ttl,
            class,
        }) => {
            let t: api::EnrollmentTokenInfo = post(
                &conn,
                "/v1/admin/enrollment-tokens",
                &api::CreateEnrollmentToken {
                    user,
                    site,
                    ttl_secs: ttl.as_secs().max(1),
                    class,
                },
            )
            .await?;
            // The bare token on stdout, so scripts can capture it.
            print(json, &t, |t| t.token.clone())
        }
        AdminCommand::Device(DeviceCommand::List) => {
            let ds: Vec<api::DeviceInfo> = get(&conn, "/v1/admin/devices").await?;
            print(json, &ds, |ds| {
                ds.iter()
                    .map(|d| {
                        format!(
                            "{:<20} {:<12} {:<16} {:<8} {} {}",
                            d.name,
                            d.user,
                            d.address,
                            d.class.as_str(),
                            d.public_key,
                            match d.revoked_at {
                                Some(t) => format!("revoked {}", when(t)),
                                None => format!("enrolled {}", when(d.created_at)),
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        AdminCommand::Device(DeviceCommand::Revoke { name }) => {
            let d: serde_json::Value =
                post(&conn, &format!("/v1/admin/devices/{name}/revoke"), &()).await?;
            print(json, &d, |d| {
                d["done"].as_str().unwrap_or_default().to_string()
            })
        }
        AdminCommand::Device(DeviceCommand::Class { name, class }) => {
            let d: serde_json::Value = post(
                &conn,
                &format!("/v1/admin/devices/{name}/class"),
                &api::SetDeviceClass { class },
            )
            .await?;
            print(json, &d, |d| {
                d["done"].as_str().unwrap_or_default().to_string()
            })
        }
        AdminCommand::Device(DeviceCommand::RevokeOverride { id }) => {
            let d: serde_json::Value =
                post(&conn, &format!("/v1/admin/overrides/{id}/revoke"), &()).await?;
            print(json, &d, |d| {
                d["done"].as_str().unwrap_or_default().to_string()
            })
        }
        AdminCommand::Device(DeviceCommand::Override { name, duration }) => {
            let seconds = duration.as_secs().max(1);
            let d: api::OverrideIssued = post(
                &conn,
                &format!("/v1/admin/devices/{name}/override"),
                &api::OverrideRequest { seconds },
            )
            .await?;
            print(json, &d, |d| {
                format!(
                    "override code for {} (id {}, valid {}):\n{}",
                    d.device,
                    d.id,
                    humantime::format_duration(Duration::from_secs(seconds)),
                    d.code
                )
            })
        }
        AdminCommand::Connector(ConnectorCommand::List) => {
            let cs: Vec<api::ConnectorInfo> = get(&conn, "/v1/admin/connectors").await?;
            print(json, &cs, |cs| {
                cs.iter()
                    .map(|c| {
                        format!(
                            "{:<22} site {:<12} cert {} until {} {}",
                            c.name,
                            c.site,
                            c.serial,
                            when(c.not_after),
                            if c.revoked_at.is_some() {
                                "revoked"
                            } else if c.drained_at.is_some() {
                                "drained"
                            } else {
                                "active"
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        AdminCommand::Connector(
            c @ (ConnectorCommand::Revoke { .. }
            | ConnectorCommand::Drain { .. }
            | ConnectorCommand::Resume { .. }),
        ) => {
            let (action, name) = match c {
                ConnectorCommand::Drain { name } => ("drain", name),
                ConnectorCommand::Resume { name } => ("resume", name),
                ConnectorCommand::Revoke { name } => ("revoke", name),
                ConnectorCommand::List => unreachable!("listed above"),
            };
            let d: serde_json::Value =
                post(&conn, &format!("/v1/admin/connectors/{name}/{action}"), &()).await?;
            print(json, &d, |d| {
                d["done"].as_str().unwrap_or_default().to_string()
            })
        }
        AdminCommand::AdminToken(AdminTokenCommand::List) => {
            let list: Vec<api::AdminTokenInfo> = get(&conn, "/v1/admin/admin-tokens").await?;
            print(json, &list, |l| {
                l.iter()
                    .map(|t| {
                        format!(
                            "{}  {:<16} {:<9} created {}  expires {}{}",
                            t.id,
                            t.name,
                            t.role,
                            unix_text(t.created_at),
                            t.expires_at.map_or("never".to_string(), unix_text),
                            t.revoked_at
                                .map_or(String::new(), |r| format!("  revoked {}", unix_text(r)))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        AdminCommand::AdminToken(AdminTokenCommand::Create { name, role, ttl }) => {
            let t: api::AdminTokenCreated = post(
                &conn,
                "/v1/admin/admin-tokens",
                &api::CreateAdminToken {
                    name,
                    role,
                    ttl_secs: ttl.map(|d| d.as_secs().max(1)),
                },
            )
            .await?;
            print(json, &t, |t| {
                format!(
                    "admin token {} for {} ({}; expires {}), shown once:\n{}",
                    t.id,
                    t.name,
                    t.role,
                    t.expires_at.map_or("never".to_string(), unix_text),
                    t.token
                )
            })
        }
        AdminCommand::AdminToken(AdminTokenCommand::Revoke { id }) => {
            let d: serde_json::Value =
                post(&conn, &format!("/v1/admin/admin-tokens/{id}/revoke"), &()).await?;
            print(json, &d, |d| {
                d["done"].as_str().unwrap_or_default().to_string()
            })
        }
        AdminCommand::ScimToken(ScimTokenCommand::Create { name }) => {
            let t: api::ScimTokenCreated = post(
                &conn,
                "/v1/admin/scim-tokens",
                &api::CreateScimToken { name },
            )
            .await?;
            print(json, &t, |t| {
                format!(
                    "SCIM token {} for {}, shown once (the provisioning client's secret token):\n{}",
                    t.id, t.name, t.token
                )
            })
        }
        AdminCommand::ScimToken(ScimTokenCommand::List) => {
            let list: Vec<api::ScimTokenInfo> = get(&conn, "/v1/admin/scim-tokens").await?;
            print(json, &list, |l| {
                l.iter()
                    .map(|t| {
                        format!(
                            "{}  {:<16} created {}  last used {}{}",
                            t.id,
                            t.name,
                            unix_text(t.created_at),
                            t.used_at.map_or("never".to_string(), unix_text),
                            t.revoked_at
                                .map_or(String::new(), |r| format!("  revoked {}", unix_text(r)))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        AdminCommand::ScimToken(ScimTokenCommand::Revoke { id }) => {
            let d: serde_json::Value =
                post(&conn, &format!("/v1/admin/scim-tokens/{id}/revoke"), &()).await?;
            print(json, &d, |d| {
                d["done"].as_str().unwrap_or_default().to_string()
            })
        }
        AdminCommand::SigningKey(SigningKeyCommand::List) => {
            let keys: Vec<api::SigningKeyInfo> = get(&conn, "/v1/admin/signing-keys").await?;
            print(json, &keys, |ks| signing_keys_text(ks))
        }
        AdminCommand::SigningKey(SigningKeyCommand::Rotate) => {
            let r: api::SigningKeyRotated =
                post(&conn, "/v1/admin/signing-keys/rotate", &()).await?;
            print(json, &r, rotated_text)
        }
        AdminCommand::Policy(PolicyCommand::Apply { file }) => apply(&conn, &file, json).await,
        AdminCommand::Policy(PolicyCommand::Show) => {
            let p: api::ApplyPolicy = get(&conn, "/v1/admin/policy").await?;
            print!("{}", p.text);
            Ok(())
        }
        AdminCommand::Explain {
            user,
            device,
            to,
            protocol,
            failing_checks,
            risk,
        } => {
            let protocol: Protocol =
                serde_json::from_value(serde_json::Value::String(protocol.to_lowercase()))
                    .context("--protocol is tcp, udp or icmp")?;
            let (address, port) = parse_destination(&to, protocol)
                .context("--to is ADDRESS:PORT (or ADDRESS for ICMP)")?;
            let e: api::Explanation = post(
                &conn,
                "/v1/admin/explain",
                &api::ExplainRequest {
                    user,
                    device,
                    address,
                    port,
                    protocol,
                    failing_checks,
                    risk,
                    application: None,
                },
            )
            .await?;
            let allowed = e.decision == Action::Allow;
            print(json, &e, |e| {
                let mut s = format!("{}: {}", if allowed { "ALLOW" } else { "DENY" }, e.reason);
                if let Some(r) = &e.rule {
                    s += &format!(" (rule {r:?})");
                }
                if let Some(c) = &e.check {
                    s += &format!(" (check {c:?})");
                }
                if let Some(a) = &e.application {
                    s += &format!("\napplication: {a}");
                }
                if !e.required_checks.is_empty() {
                    s += &format!(
                        "\nrequired posture checks: {}",
                        e.required_checks.join(", ")
                    );
                }
                s += &format!("\nposture: {}", e.posture);
                if !e.class.is_empty() {
                    s += &format!("\ndevice class: {}", e.class);
                }
                if let Some(r) = &e.risk {
                    s += &format!(
                        "\nrisk: {} (score {}, {})",
                        r.level.as_str(),
                        r.score,
                        r.source
                    );
                    if let Some(resp) = &r.response {
                        s += &format!(" -> {resp} at this sensitivity");
                    }
                    for x in &r.reasons {
                        s += &format!("\n  {:>5.1}  {}: {}", x.score, x.signal, x.detail);
                    }
                }
                s
            })?;
            if !allowed {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// Unix seconds as an RFC 3339 time (UTC), for people.
fn unix_text(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

async fn apply(conn: &Conn, file: &Path, json: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    // Check syntax locally first, so errors name the admin's own file and line; users and
    // groups may live in the control plane's directory, which resolves them.
    sekisho_proto::policy::Policy::check_syntax(file, &text).map_err(anyhow::Error::from)?;
    let answer: Result<api::PolicyApplied, _> = conn
        .client()?
        .call(
            sekisho_sys::http::Method::PUT,
            "/v1/admin/policy",
            Some(&api::ApplyPolicy { text }),
        )
        .await;
    match answer {
        Ok(applied) => print(json, &applied, |a| {
            let mut s = format!("policy version {} in force", a.version);
            for t in &a.tests {
                s += &format!("\n  ok    {}: {}", t.name, t.detail);
            }
            s
        }),
        Err(e) => bail!("policy not applied: {e}"),
    }
}

/// `admin login`: an admin token by signing in through the identity provider.
async fn login(conn: &Conn, browser: bool, json: bool) -> Result<()> {
    let (server, ca, token_file) = conn.endpoints()?;
    let ca_pem = std::fs::read_to_string(&ca)
        .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
    let api = ApiClient::new(&server, ca_tls(&ca_pem)?, None)?;
    let method = if browser {
        sekisho_sys::login::Method::Browser
    } else {
        sekisho_sys::login::Method::DeviceCode
    };
    let r = sekisho_sys::login::sign_in(&api, "admin", method, None).await?;
    let token = r
        .admin_token
        .as_deref()
        .context("the control plane sent no admin token")?;
    if let Some(dir) = token_file.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    crate::pki::write_private(&token_file, &format!("{token}\n"))?;
    let out = serde_json::json!({"user": r.user, "role": r.role, "expires_at": r.expires_at,
        "token_file": token_file});
    print(json, &out, |_| {
        format!(
            "signed in as {:?} with role {}; admin token written to {} (expires {})",
            r.user.as_deref().unwrap_or("?"),
            r.role.map(|r| r.to_string()).unwrap_or_default(),
            token_file.display(),
            r.expires_at.map(when).unwrap_or_default()
        )
    })
}

async fn init(conn: &Conn, name: &str, force: bool) -> Result<()> {
    let config = conn
        .config
        .as_ref()
        .context("admin init needs --config (the broker's config file)")?;
    let ctl = config
        .control
        .as_ref()
        .context("the broker config has no [control] section")?;
    let out = conn
        .token_file
        .clone()
        .unwrap_or(ctl.admin_token_file.clone());
    if out.exists() && !force {
        bail!(
            "{} already exists (pass --force to create another token and replace it)",
            out.display()
        );
    }
    let store = Store::open(&ctl.database).await?;
    let (id, secret) = store.create_admin_token(name, now_unix()).await?;
    let token = api::Credential::format(api::ADMIN_PREFIX, &id, &secret, None);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    crate::pki::write_private(&out, &format!("{token}\n"))?;
    println!("admin token for {name:?} written to {}", out.display());
    Ok(())
}
