//! Test tool for Sekisho's Shared Signals support: a stand-in SSF transmitter (a key, its JWK
//! set served over HTTP, CAEP SETs pushed per RFC 8935, some of them tampered with) and a
//! stand-in push receiver that checks the SETs Sekisho sends and writes them down.
//! `ssf-tool --help` lists the subcommands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use clap::{Parser, ValueEnum};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

const CAEP: &str = "https://schemas.openid.net/secevent/caep/event-type/";

#[derive(Parser)]
#[command(
    name = "ssf-tool",
    about = "Stand-in Shared Signals transmitter and receiver for testing Sekisho"
)]
enum Cli {
    /// Writes an EC P-256 key (DIR/key.pem, PKCS#8) and its public JWK set (DIR/jwks.json,
    /// kid "t1").
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Serves DIR/jwks.json at GET /jwks.json over plain HTTP until killed.
    ServeJwks {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Pushes one CAEP SET signed ES256 with DIR/key.pem (RFC 8935) and prints
    /// "STATUS BODY"; exits 0 whatever the status, 1 when the URL cannot be reached.
    Push(Box<PushArgs>),
    /// A push receiver over plain HTTP: checks every SET POSTed against the JWK set at
    /// --jwks-url, appends a JSON line per SET to --out and answers 202 or 400 (RFC 8935).
    Receive(ReceiveArgs),
}

#[derive(clap::Args)]
#[command(group(
    clap::ArgGroup::new("subject").required(true).multiple(true).args(["device", "user"])
))]
struct PushArgs {
    /// The folder keygen wrote.
    #[arg(long)]
    dir: PathBuf,
    /// The receiver's push endpoint.
    #[arg(long)]
    url: String,
    /// CA certificate (PEM) for an https:// URL (default: the system's).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The SET's issuer (the transmitter's, as the receiver has it configured).
    #[arg(long)]
    iss: String,
    /// The SET's audience (the receiver's).
    #[arg(long)]
    aud: String,
    #[arg(long, value_enum)]
    event: EventArg,
    /// The device (its name in Sekisho): a complex subject with a device member.
    #[arg(long)]
    device: Option<String>,
    /// The user: an email subject when it has an @, else opaque (with --device: the
    /// complex subject's user member).
    #[arg(long)]
    user: Option<String>,
    /// Compliance: the current status (the previous one is the opposite).
    #[arg(long, value_enum, default_value = "not-compliant")]
    status: Status,
    /// Risk: the current level.
    #[arg(long, value_enum, default_value = "high")]
    level: LevelArg,
    #[arg(long, value_enum, default_value = "none")]
    tamper: Tamper,
    /// Added to iat (negative: in the past).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    iat_offset: i64,
    /// The kid in the header.
    #[arg(long, default_value = "t1")]
    kid: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum EventArg {
    Compliance,
    Risk,
    SessionRevoked,
    CredentialChange,
    Assurance,
}

#[derive(Clone, Copy, ValueEnum)]
enum Status {
    Compliant,
    NotCompliant,
}

#[derive(Clone, Copy, ValueEnum)]
enum LevelArg {
    Low,
    Medium,
    High,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Tamper {
    None,
    /// One bit of the signature flipped.
    Signature,
    /// iat a day ago.
    IatStale,
    /// Signed by a key made on the spot, under the same kid.
    OtherKey,
}

#[derive(clap::Args, Clone)]
struct ReceiveArgs {
    #[arg(long)]
    listen: SocketAddr,
    /// The transmitter's JWK set (fetched for every SET).
    #[arg(long)]
    jwks_url: String,
    /// CA certificate (PEM) for an https:// JWK set URL (default: the system's).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The audience SETs must be for.
    #[arg(long)]
    aud: String,
    /// The issuer SETs must be from.
    #[arg(long)]
    iss: String,
    /// JSON lines: {"verified", "error", "claims", "header", "content_type", "authorization"}.
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                match cli {
                    Cli::Keygen { out } => keygen(&out),
                    Cli::ServeJwks { dir, listen } => serve_jwks(dir, listen).await,
                    Cli::Push(a) => push(*a).await,
                    Cli::Receive(a) => receive(a).await,
                }
            })
        });
    if let Err(e) = result {
        eprintln!("ssf-tool: {e:#}");
        std::process::exit(1);
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// A new P-256 key: PKCS#8 DER and its public JWK.
fn new_key(kid: &str) -> Result<(Vec<u8>, Value)> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("cannot make a key"))?
        .as_ref()
        .to_vec();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
        .map_err(|_| anyhow::anyhow!("cannot read the key made"))?;
    let point = pair.public_key().as_ref();
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])});
    Ok((pkcs8, jwk))
}

fn keygen(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (pkcs8, jwk) = new_key("t1")?;
    let b64 = STANDARD.encode(&pkcs8);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    );
    std::fs::write(out.join("key.pem"), pem).context("cannot write key.pem")?;
    let jwks = json!({"keys": [jwk]});
    std::fs::write(out.join("jwks.json"), format!("{jwks:#}\n"))
        .context("cannot write jwks.json")?;
    println!("{}", out.join("jwks.json").display());
    Ok(())
}

async fn serve_jwks(dir: PathBuf, listen: SocketAddr) -> Result<()> {
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let file = dir.join("jwks.json");
            async move {
                match tokio::fs::read(&file).await {
                    Ok(body) => {
                        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
                    }
                    Err(e) => (StatusCode::NOT_FOUND, format!("{}: {e}\n", file.display()))
                        .into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("ssf-tool: serving /jwks.json on {listen}");
    axum::serve(listener, app).await.context("serve")
}

/// An HTTP client trusting `ca` (or the system's CAs) for https://.
fn http_client(url: &str, ca: Option<&Path>) -> Result<reqwest::Client> {
    let tls = match ca {
        Some(ca) => sekisho_sys::http::ca_tls(
            &std::fs::read_to_string(ca)
                .with_context(|| format!("cannot read {}", ca.display()))?,
        )?,
        None if url.starts_with("http://") => sekisho_sys::http::pinned_tls([0; 32])?,
        None => sekisho_sys::http::ca_tls(&sekisho_sys::http::system_roots_pem()?)?,
    };
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(std::time::Duration::from_secs(10))
        .build()?)
}

/// A user subject identifier (RFC 9493).
fn user_id(user: &str) -> Value {
    if user.contains('@') {
        json!({"format": "email", "email": user})
    } else {
        json!({"format": "opaque", "id": user})
    }
}

/// The SET's claims for `a`, issued at `iat`.
fn claims(a: &PushArgs, iat: u64) -> Value {
    let sub_id = match (&a.device, &a.user) {
        (Some(d), user) => {
            let mut s = json!({"format": "complex", "device": {"format": "opaque", "id": d}});
            if let Some(u) = user {
                s["user"] = user_id(u);
            }
            s
        }
        (None, Some(u)) => user_id(u),
        (None, None) => unreachable!("clap requires one"),
    };
    let t = now();
    let (name, body) = match a.event {
        EventArg::Compliance => {
            let (cur, prev) = match a.status {
                Status::Compliant => ("compliant", "not-compliant"),
                Status::NotCompliant => ("not-compliant", "compliant"),
            };
            (
                "device-compliance-change",
                json!({"current_status": cur, "previous_status": prev,
                    "initiating_entity": "policy",
                    "reason_admin": {"en": "ssf-tool: compliance changed"}}),
            )
        }
        EventArg::Risk => {
            let level = match a.level {
                LevelArg::Low => "LOW",
                LevelArg::Medium => "MEDIUM",
                LevelArg::High => "HIGH",
            };
            let principal = if a.user.is_some() && a.device.is_none() {
                "USER"
            } else {
                "DEVICE"
            };
            (
                "risk-level-change",
                json!({"current_level": level, "principal": principal,
                    "risk_reason": "ssf-tool"}),
            )
        }
        EventArg::SessionRevoked => (
            "session-revoked",
            json!({"initiating_entity": "admin", "reason_admin": {"en": "ssf-tool: revoked"}}),
        ),
        EventArg::CredentialChange => (
            "credential-change",
            json!({"credential_type": "password", "change_type": "update",
                "initiating_entity": "user"}),
        ),
        EventArg::Assurance => (
            "assurance-level-change",
            json!({"namespace": "NIST-AAL", "current_level": "nist-aal1",
                "previous_level": "nist-aal2", "change_direction": "decrease"}),
        ),
    };
    let mut body = body;
    body["event_timestamp"] = t.into();
    let jti = URL_SAFE_NO_PAD.encode(rand_bytes());
    json!({"iss": a.iss, "aud": a.aud, "iat": iat, "jti": jti, "sub_id": sub_id,
        "events": {format!("{CAEP}{name}"): body}})
}

fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system randomness");
    b
}

async fn push(a: PushArgs) -> Result<()> {
    let mut iat = now().saturating_add_signed(a.iat_offset);
    if a.tamper == Tamper::IatStale {
        iat -= 86_400;
    }
    let claims = claims(&a, iat);
    let pkcs8 = match a.tamper {
        Tamper::OtherKey => new_key(&a.kid)?.0,
        _ => {
            let pem = std::fs::read_to_string(a.dir.join("key.pem"))
                .with_context(|| format!("cannot read {}/key.pem", a.dir.display()))?;
            let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            STANDARD.decode(b64).context("key.pem is not PEM")?
        }
    };
    let mut h = Header::new(Algorithm::ES256);
    h.typ = Some("secevent+jwt".into());
    h.kid = Some(a.kid.clone());
    let mut token = jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ec_der(&pkcs8))?;
    if a.tamper == Tamper::Signature {
        let (input, sig) = token.rsplit_once('.').expect("a JWS has dots");
        let mut sig = URL_SAFE_NO_PAD.decode(sig)?;
        sig[0] ^= 1;
        token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
    }
    let resp = http_client(&a.url, a.ca.as_deref())?
        .post(&a.url)
        .header(header::CONTENT_TYPE, "application/secevent+jwt")
        .header(header::ACCEPT, "application/json")
        .body(token)
        .send()
        .await
        .with_context(|| format!("POST {}", a.url))?;
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    println!("{status} {}", body.trim());
    Ok(())
}

struct Receiving {
    args: ReceiveArgs,
    http: reqwest::Client,
    out: Mutex<tokio::fs::File>,
}

async fn receive(args: ReceiveArgs) -> Result<()> {
    let http = http_client(&args.jwks_url, args.ca.as_deref())?;
    let out = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .await
        .with_context(|| format!("cannot open {}", args.out.display()))?;
    let listen = args.listen;
    let state = Arc::new(Receiving {
        args,
        http,
        out: Mutex::new(out),
    });
    let app = axum::Router::new().fallback(on_push).with_state(state);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("ssf-tool: receiving SETs on {listen}");
    axum::serve(listener, app).await.context("serve")
}

/// Why a SET is refused: the RFC 8935 §2.4 code and a description.
type Refusal = (&'static str, String);

const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

fn check(token: &str, keys: &JwkSet, a: &ReceiveArgs) -> Result<(), Refusal> {
    let bad = |code: &'static str| move |e: jsonwebtoken::errors::Error| (code, e.to_string());
    let h = jsonwebtoken::decode_header(token).map_err(bad("invalid_request"))?;
    if !ASYMMETRIC.contains(&h.alg) {
        return Err(("invalid_key", format!("algorithm {:?}", h.alg)));
    }
    if h.typ.as_deref() != Some("secevent+jwt") {
        return Err(("invalid_request", format!("typ {:?}", h.typ)));
    }
    let kid = h.kid.unwrap_or_default();
    let jwk = keys
        .find(&kid)
        .ok_or_else(|| ("invalid_key", format!("no key {kid:?}")))?;
    let key = DecodingKey::from_jwk(jwk).map_err(bad("invalid_key"))?;
    let mut v = Validation::new(h.alg);
    v.validate_exp = false;
    v.required_spec_claims.clear();
    v.set_issuer(&[&a.iss]);
    v.set_audience(&[&a.aud]);
    let claims = jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        let code = match e.kind() {
            ErrorKind::InvalidIssuer => "invalid_issuer",
            ErrorKind::InvalidAudience => "invalid_audience",
            ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => "authentication_failed",
            _ => "invalid_request",
        };
        (code, e.to_string())
    })?;
    let c = claims.claims;
    for claim in ["iss", "aud", "iat", "jti", "events"] {
        if c.get(claim).is_none() {
            return Err(("invalid_request", format!("no {claim:?} claim")));
        }
    }
    if !c["events"].is_object() {
        return Err(("invalid_request", "\"events\" is not an object".into()));
    }
    Ok(())
}

async fn on_push(
    State(s): State<Arc<Receiving>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let token = String::from_utf8_lossy(&body).trim().to_string();
    // What the token says, verified or not (for the record).
    let part = |i: usize| -> Value {
        token
            .split('.')
            .nth(i)
            .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    };
    let keys: Result<JwkSet> = async {
        let resp = s
            .http
            .get(&s.args.jwks_url)
            .send()
            .await?
            .error_for_status()?;
        Ok(resp.json().await?)
    }
    .await;
    let (status, verdict) = match keys {
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Err(("temporarily_unavailable", format!("JWK set: {e:#}"))),
        ),
        Ok(keys) => match check(&token, &keys, &s.args) {
            Ok(()) => (StatusCode::ACCEPTED, Ok(())),
            Err(r) => (StatusCode::BAD_REQUEST, Err(r)),
        },
    };
    let header_text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let line = json!({
        "verified": verdict.is_ok(),
        "error": verdict.as_ref().err().map(|(code, d)| format!("{code}: {d}")),
        "claims": part(1),
        "header": part(0),
        "content_type": header_text(header::CONTENT_TYPE),
        "authorization": header_text(header::AUTHORIZATION),
    });
    {
        let mut out = s.out.lock().await;
        let written = out.write_all(format!("{line}\n").as_bytes()).await;
        if let Err(e) = written.and(out.flush().await) {
            eprintln!("ssf-tool: cannot write {}: {e}", s.args.out.display());
        }
    }
    match verdict {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err((err, description)) => (
            status,
            axum::Json(json!({"err": err, "description": description})),
        )
            .into_response(),
    }
}
