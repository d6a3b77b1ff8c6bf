//! `sekisho-broker`: terminates clients' WireGuard tunnels, authorizes every new flow against
//! the policy, and forwards allowed packets to the connector of the application's site.

mod admin;
mod api_limits;
mod config;
mod control;
#[cfg(test)]
mod control_tests;
mod dataplane;
mod jose;
mod kek;
mod log;
mod metrics;
mod oidc;
mod pki;
mod risk;
mod ssf;
mod stats;
mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use sekisho_proto::broker::{WorkerConfig, WorkerId};
use sekisho_proto::keys::PrivateKey;
use sekisho_proto::policy::Policy;

use crate::config::BrokerConfig;
use crate::dataplane::DataPlane;
use crate::log::LogLine;

#[derive(Parser)]
#[command(
    name = "sekisho-broker",
    version,
    about = "Sekisho broker: WireGuard termination, per-flow authorization and connector links",
    long_about = "Sekisho broker: terminates the WireGuard tunnels of clients on one UDP socket, \
decides every new flow against the policy (default deny; allow rules; deny rules win), answers \
denied flows at once (TCP RST or ICMP administratively prohibited) and forwards allowed packets \
over QUIC to the connector of the application's site. Every decision is one JSON line in the \
decision log.\n\nSignals: SIGHUP reloads the policy file (a file with errors is rejected and the \
running policy stays); SIGTERM/SIGINT stop the broker."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker with a config file (documented example: deploy/examples/broker.toml).
    Run {
        /// Config file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a policy file and print a summary, or its first error as file:line:column.
    CheckPolicy { policy: PathBuf },
    /// Print the running broker's counters, peers and connector links as JSON.
    Stats {
        /// The broker's control socket (see `control_socket` in the config).
        #[arg(short, long, default_value = "/run/sekisho/broker.sock")]
        socket: PathBuf,
    },
    /// Print a new WireGuard private key (base64).
    Genkey,
    /// Read a private key on standard input and print its public key.
    Pubkey,
    /// The certificate authority for connector links.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Administer the control plane: users, groups, enrollment tokens, devices, connectors,
    /// policy, and "explain" a decision (talks to the control API with an admin token).
    Admin(admin::AdminArgs),
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a CA (ca.pem, ca.key) and the broker's certificate (broker.pem, broker.key) in DIR.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// DNS name(s) connectors use to reach this broker.
        #[arg(long = "name", default_value = "broker.sekisho.internal")]
        names: Vec<String>,
    },
    /// Issue the certificate of one site's connector (connector-SITE.pem/.key) in DIR.
    IssueConnector {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long)]
        site: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run_blocking(&config),
        Command::CheckPolicy { policy } => check_policy(&policy),
        Command::Stats { socket } => stats(&socket),
        Command::Genkey => {
            println!("{}", PrivateKey::generate().to_base64());
            Ok(())
        }
        Command::Pubkey => pubkey(),
        Command::Pki(PkiCommand::Init { dir, names }) => pki::init(&dir, &names),
        Command::Pki(PkiCommand::IssueConnector { dir, site }) => pki::issue_connector(&dir, &site),
        Command::Admin(args) => admin::run(args),
    };
    if let Err(e) = result {
        eprintln!("sekisho-broker: {e:#}");
        std::process::exit(2);
    }
}

fn pubkey() -> Result<()> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
    println!("{}", PrivateKey::parse(&text)?.public());
    Ok(())
}

fn check_policy(path: &Path) -> Result<()> {
    let p = Policy::load(path)?;
    println!(
        "{}: ok: {} users, {} groups, {} devices, {} sites, {} applications, {} rules; device range {}",
        path.display(),
        p.users.len(),
        p.groups.len(),
        p.devices.len(),
        p.sites.len(),
        p.applications.len(),
        p.rules.len(),
        p.device_range
    );
    Ok(())
}

fn stats(socket: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| format!("cannot reach the broker at {}", socket.display()))?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        println!("{out}");
        Ok(())
    })
}

fn run_blocking(config: &Path) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // The control plane, links and egress readers; the data-plane workers run threads of
    // their own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(config))
}

async fn run(config_path: &Path) -> Result<()> {
    let config = BrokerConfig::load(config_path)?;
    let key = PrivateKey::read_file(&config.private_key_file)?;
    let (policy, opened) = match &config.control {
        Some(ctl) => {
            let (policy, opened) =
                control::Control::open(ctl, &config.policy, &config.tls.ca).await?;
            (policy, Some((ctl, opened)))
        }
        None => (Policy::load(&config.policy)?, None),
    };
    let name = match &config.control {
        Some(c) => c
            .name
            .clone()
            .unwrap_or_else(|| c.wireguard_endpoint.clone()),
        None => config.listen_wireguard.to_string(),
    };
    info!(public_key = %key.public(), "broker identity");
    log_policy_summary(&policy);
    let broker_key = key.public().to_string();
    let egress = match &config.egress {
        Some(e) => Some(Arc::new(
            dataplane::egress::egress_up(e, policy.device_range)
                .await
                .context("cannot set up internet egress")?,
        )),
        None => None,
    };
    // Records for the SIEM: sinks start now (a bad sink stops the broker with the reason);
    // the decision log's writer and the audit log hand them over, never the packet path.
    let shipper = sekisho_sys::logship::Shipper::start(
        &config.log_sinks,
        "sekisho-broker",
        &name,
        config_path.parent().unwrap_or(Path::new(".")),
    )
    .with_context(|| format!("{}: log_sinks", config_path.display()))?;
    let (log_tx, log_rx) = mpsc::channel(log::QUEUE);
    let (risk_feed, risk_rx) = risk::RiskFeed::channel();
    let console_feed = Arc::new(control::console::feed::Feed::default());
    tokio::spawn(log::decision_writer(
        config.decision_log.clone(),
        log_rx,
        shipper.clone(),
        risk_feed.clone(),
        console_feed.clone(),
    ));
    let mut kernel = stats::KernelSources {
        egress_interface: config.egress.as_ref().map(|e| e.interface.clone()),
        ..Default::default()
    };
    let egress_tx = match &egress {
        Some(tun) => {
            let (tx, rx) = mpsc::channel(dataplane::egress::EGRESS_QUEUE);
            tokio::spawn(dataplane::egress::write_loop(
                tun.clone(),
                rx,
                kernel.egress_write_failed.clone(),
            ));
            Some(tx)
        }
        None => None,
    };
    if config.dataplane.handshake_shield {
        kernel.handshake_shield = dataplane::shield::install(config.listen_wireguard.port()).await;
    }
    let workers = config
        .dataplane
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()) as u16);
    let dp = DataPlane::start(
        dataplane::Settings {
            key,
            listen: config.listen_wireguard,
            workers,
            worker: WorkerConfig {
                worker: WorkerId(0),
                name,
                timeouts: config.flows.timeouts(),
                max_flows: config.flows.max_flows,
                max_flows_per_device: config.flows.max_flows_per_device,
                overlay_mtu: config.overlay_mtu,
            },
        },
        policy,
        dataplane::Outputs {
            log: log_tx.clone(),
            egress: egress_tx,
            runtime: tokio::runtime::Handle::current(),
        },
    )?;
    let risk = risk::RiskService::start(
        &config.risk_engine,
        risk_feed,
        risk_rx,
        dp.clone(),
        log_tx.clone(),
    );
    let control = match opened {
        Some((ctl, opened)) => {
            let control = control::Control::new(opened, dp.clone(), ctl.clone(), broker_key)?;
            control.ship_to(shipper.clone());
            control.use_risk(risk.clone());
            control.use_feed(console_feed.clone());
            tokio::spawn(control::console::sample_loop(
                dp.clone(),
                console_feed.clone(),
            ));
            control.transmit_risk(&risk);
            let tls = &config.tls;
            // With admin_listen, the admin API has its own address (a management network,
            // loopback) and the public listener serves devices and enrollment only.
            let public_scope = match ctl.admin_listen {
                Some(admin) => {
                    control::serve(
                        control.clone(),
                        admin,
                        control::Scope::Admin,
                        &tls.cert,
                        &tls.ca,
                        &tls.key,
                    )
                    .await?;
                    control::Scope::Public
                }
                None => control::Scope::All,
            };
            control::serve(
                control.clone(),
                ctl.listen,
                public_scope,
                &tls.cert,
                &tls.ca,
                &tls.key,
            )
            .await?;
            tokio::spawn(control.clone().registry_loop(Duration::from_secs(2)));
            Some(control)
        }
        None => None,
    };
    let (endpoint, link_socket) = dataplane::links::quic_endpoint(&config)?;
    kernel.link_socket = Some(link_socket);
    if let Some(m) = &config.metrics {
        let source = Arc::new(metrics::BrokerMetrics {
            dp: dp.clone(),
            control: control.clone(),
            kernel: kernel.clone(),
            shipper: shipper.clone(),
            risk: risk.clone(),
        });
        let bearer = m
            .bearer_token_file
            .as_deref()
            .map(sekisho_sys::metrics::read_bearer_token)
            .transpose()?;
        let listener = tokio::net::TcpListener::bind(m.listen)
            .await
            .with_context(|| format!("cannot bind the metrics endpoint {}", m.listen))?;
        info!(addr = %m.listen, bearer_token = bearer.is_some(), "metrics endpoint listening (/metrics, /healthz, /readyz)");
        let router = sekisho_sys::metrics::router(source, bearer);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                error!("metrics endpoint stopped: {e}");
            }
        });
    }
    if let Some(c) = control.clone() {
        tokio::spawn(dataplane::links::announce_brokers(dp.clone(), c));
    }
    info!(addr = %config.listen_connectors, "connector QUIC listening");
    if let Some(tun) = egress.clone() {
        tokio::spawn(dataplane::egress::read_loop(tun, dp.clone()));
    }
    tokio::spawn(dataplane::links::accept_connectors(
        endpoint.clone(),
        dp.clone(),
        control.clone(),
        config.connectors.stale_after,
        kernel.quic_retries.clone(),
    ));
    let kernel_shield = kernel.handshake_shield.is_some();
    let control_socket = stats::serve(
        &config.control_socket,
        dp.clone(),
        kernel,
        shipper.clone(),
        risk.clone(),
        control.clone(),
    )?;

    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hup.recv() => match &control {
                Some(c) => apply_policy_file(c, &config.policy, &log_tx).await,
                None => reload_policy(&config.policy, &dp, &log_tx),
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    info!("stopping");
    if let Some(e) = &config.egress {
        let table = dataplane::egress::egress_table(&e.interface);
        if let Err(e) = sekisho_sys::nft(&sekisho_sys::nft_delete_table("ip", &table)).await {
            warn!("cannot remove nftables table {table}: {e}");
        }
    }
    if kernel_shield {
        dataplane::shield::remove(config.listen_wireguard.port()).await;
    }
    endpoint.close(0u32.into(), b"broker stopping");
    control_socket.abort();
    // What the sinks still hold gets a moment to leave.
    shipper.flush(Duration::from_secs(3)).await;
    let _ = std::fs::remove_file(&config.control_socket);
    Ok(())
}

fn reload_policy(path: &Path, dp: &DataPlane, log: &mpsc::Sender<LogLine>) {
    match Policy::load(path) {
        Ok(policy) => {
            log_policy_summary(&policy);
            dp.set_policy(policy);
            let generation = dp.generation();
            let _ = log.try_send(LogLine::Policy {
                result: "applied",
                detail: format!("generation {generation}"),
            });
        }
        Err(e) => {
            error!("policy reload rejected, the running policy stays in force: {e}");
            let _ = log.try_send(LogLine::Policy {
                result: "rejected",
                detail: e.to_string(),
            });
        }
    }
}

/// SIGHUP with a control plane: the policy file goes through the same checks and tests as
/// `admin policy apply` and becomes the stored policy.
async fn apply_policy_file(c: &control::Control, path: &Path, log: &mpsc::Sender<LogLine>) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            error!("policy reload: cannot read {}: {e}", path.display());
            return;
        }
    };
    match c.apply_policy(path, &text, "sighup").await {
        Ok(applied) => {
            let _ = log.try_send(LogLine::Policy {
                result: "applied",
                detail: format!("version {}", applied.version),
            });
        }
        Err((_, rejected)) => {
            let failed: Vec<String> = rejected
                .tests
                .iter()
                .filter(|t| !t.passed)
                .map(|t| format!("{}: {}", t.name, t.detail))
                .collect();
            error!(
                "policy reload rejected, the running policy stays in force: {} {}",
                rejected.error,
                failed.join("; ")
            );
            let _ = log.try_send(LogLine::Policy {
                result: "rejected",
                detail: format!("{} {}", rejected.error, failed.join("; ")),
            });
        }
    }
}

pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate found", path.display());
    }
    Ok(certs)
}

/// The DER leaf certificate a connector presented.
pub(crate) fn peer_leaf(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| c.to_vec())
}

/// Logs a one-line summary of a policy put in force.
pub(crate) fn log_policy_summary(p: &Policy) {
    info!(
        devices = p.devices.len(),
        applications = p.applications.len(),
        rules = p.rules.len(),
        "policy in force"
    );
}
