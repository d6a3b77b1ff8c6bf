//! Signing in through the company's identity provider via the control plane's `/v1/login`:
//! `sekisho-client login` (a device: enrolled the first time, re-authenticated later) and
//! `sekisho-broker admin login` (an admin token).
//!
//! With a browser: authorization code with PKCE (RFC 7636) through the system browser, which
//! comes back to a one-shot HTTP listener on 127.0.0.1 (RFC 8252 §7.3). The verifier never
//! leaves this process until the code is redeemed. Without one: the device authorization grant
//! (RFC 8628), a code to enter on another screen.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sekisho_proto::api::{
    LoginDevice, LoginFinishRequest, LoginFinishResponse, LoginStartRequest, LoginStartResponse,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::http::{ApiClient, CallError};

/// How long the browser may take to come back.
const BROWSER_WAIT: Duration = Duration::from_secs(300);

/// How the user signs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Browser,
    DeviceCode,
}

impl Method {
    /// The browser where there is one (`$BROWSER`, or a desktop session with xdg-open),
    /// else the device code.
    pub fn detect() -> Method {
        let desktop =
            std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
        if std::env::var_os("BROWSER").is_some_and(|b| !b.is_empty()) || desktop {
            Method::Browser
        } else {
            Method::DeviceCode
        }
    }
}

/// A PKCE verifier (32 random bytes, base64url: 43 characters) and its S256 challenge.
pub fn pkce() -> (String, String) {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("system randomness");
    let verifier = URL_SAFE_NO_PAD.encode(bytes);
    let challenge = URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ));
    (verifier, challenge)
}

/// Opens `url` in the system browser: `$BROWSER` (a command; `%s` stands for the URL, else
/// it is appended), else xdg-open. Not waited for.
fn open_browser(url: &str) -> Result<()> {
    let quoted = format!("'{}'", url.replace('\'', "'\\''"));
    let command = match std::env::var("BROWSER") {
        Ok(b) if !b.trim().is_empty() => {
            // $BROWSER may list several commands separated by ':'; the first is used.
            let first = b.split(':').next().unwrap_or(&b).to_string();
            if first.contains("%s") {
                first.replace("%s", &quoted)
            } else {
                format!("{first} {quoted}")
            }
        }
        _ => format!("xdg-open {quoted}"),
    };
    std::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start the browser ({command})"))?;
    Ok(())
}

/// What came back on the loopback redirect.
#[derive(Debug, PartialEq, Eq)]
pub enum Callback {
    Code { code: String, state: String },
    Error { error: String, description: String },
}

/// Parses the request line of the browser's return (`GET /callback?code=…&state=… HTTP/1.1`).
/// None for other paths (a favicon).
pub fn parse_callback(request_line: &str) -> Option<Callback> {
    let target = request_line.split_whitespace().nth(1)?;
    let url = url::Url::parse(&format!("http://127.0.0.1{target}")).ok()?;
    if url.path() != "/callback" {
        return None;
    }
    let get = |k: &str| {
        url.query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    };
    if let Some(error) = get("error") {
        return Some(Callback::Error {
            error,
            description: get("error_description").unwrap_or_default(),
        });
    }
    Some(Callback::Code {
        code: get("code")?,
        state: get("state").unwrap_or_default(),
    })
}

async fn reply(s: &mut TcpStream, status: &str, text: &str) {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Sekisho</title></head>\
         <body><p>{}</p></body></html>",
        text.replace('&', "&amp;").replace('<', "&lt;")
    );
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(answer.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// Waits for the browser on `listener` (its request line only; 8 KiB is plenty for a code
/// and a state). Other paths (a favicon) get a 404.
async fn wait_for_browser(listener: &TcpListener) -> Result<(Callback, TcpStream)> {
    let wait = async {
        loop {
            let (mut stream, _) = listener.accept().await?;
            let mut line = String::new();
            let read = tokio::time::timeout(
                Duration::from_secs(10),
                BufReader::new((&mut stream).take(8192)).read_line(&mut line),
            )
            .await;
            if !matches!(read, Ok(Ok(_))) {
                continue;
            }
            match parse_callback(&line) {
                Some(cb) => return Ok::<_, anyhow::Error>((cb, stream)),
                None => reply(&mut stream, "404 Not Found", "Not here.").await,
            }
        }
    };
    tokio::time::timeout(BROWSER_WAIT, wait)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the browser did not come back within {} s",
                BROWSER_WAIT.as_secs()
            )
        })?
}

fn refused(e: CallError) -> anyhow::Error {
    match e {
        CallError::Refused { message, .. } => anyhow::anyhow!("sign-in refused: {message}"),
        e => anyhow::Error::new(e),
    }
}

/// Signs in for `purpose` (`device` with `device`, or `admin`) and returns the control plane's
/// answer once done.
pub async fn sign_in(
    api: &ApiClient,
    purpose: &str,
    method: Method,
    device: Option<LoginDevice>,
) -> Result<LoginFinishResponse> {
    match method {
        Method::Browser => {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .context("cannot listen on 127.0.0.1 for the browser's return")?;
            let redirect_uri = format!(
                "http://127.0.0.1:{}/callback",
                listener.local_addr()?.port()
            );
            let (verifier, challenge) = pkce();
            let start: LoginStartResponse = api
                .post(
                    "/v1/login/start",
                    &LoginStartRequest {
                        purpose: purpose.into(),
                        method: "code".into(),
                        redirect_uri: Some(redirect_uri),
                        code_challenge: Some(challenge),
                    },
                )
                .await
                .map_err(refused)?;
            let url = start
                .authorization_url
                .clone()
                .context("the control plane gave no authorization URL")?;
            println!("Opening your browser to sign in. If it does not open, visit:\n  {url}");
            if let Err(e) = open_browser(&url) {
                eprintln!("sekisho-client: {e:#}");
            }
            let (callback, mut stream) = wait_for_browser(&listener).await?;
            let (code, state) = match callback {
                Callback::Code { code, state } => (code, state),
                Callback::Error { error, description } => {
                    reply(&mut stream, "200 OK", "Sign-in failed; see the terminal.").await;
                    bail!("the identity provider refused the sign-in: {error} {description}");
                }
            };
            // The state must be this sign-in's: another one's return (a forged link) stops here.
            if Some(&state) != start.state.as_ref() {
                reply(
                    &mut stream,
                    "400 Bad Request",
                    "Sign-in refused: wrong state.",
                )
                .await;
                bail!(
                    "sign-in refused: the browser came back with another sign-in's state \
                     (a forged or stale link?); nothing was changed"
                );
            }
            let done = api
                .post::<_, LoginFinishResponse>(
                    "/v1/login/finish",
                    &LoginFinishRequest {
                        login_id: start.login_id,
                        code: Some(code),
                        state: Some(state),
                        code_verifier: Some(verifier),
                        device,
                    },
                )
                .await;
            match &done {
                Ok(_) => {
                    reply(
                        &mut stream,
                        "200 OK",
                        "Signed in to Sekisho. You may close this window.",
                    )
                    .await
                }
                Err(e) => reply(&mut stream, "200 OK", &format!("Sign-in failed: {e}")).await,
            }
            done.map_err(refused)
        }
        Method::DeviceCode => {
            let start: LoginStartResponse = api
                .post(
                    "/v1/login/start",
                    &LoginStartRequest {
                        purpose: purpose.into(),
                        method: "device".into(),
                        redirect_uri: None,
                        code_challenge: None,
                    },
                )
                .await
                .map_err(refused)?;
            println!(
                "To sign in, visit {} and enter the code {}",
                start.verification_uri.as_deref().unwrap_or("?"),
                start.user_code.as_deref().unwrap_or("?")
            );
            if let Some(full) = &start.verification_uri_complete {
                println!("(or open {full})");
            }
            let _ = std::io::stdout().flush();
            let deadline = Instant::now() + Duration::from_secs(start.expires_in);
            let mut interval = start.interval.max(1);
            loop {
                tokio::time::sleep(Duration::from_secs(interval)).await;
                if Instant::now() > deadline {
                    bail!("the code expired before the sign-in was finished: run login again");
                }
                let r: LoginFinishResponse = api
                    .post(
                        "/v1/login/finish",
                        &LoginFinishRequest {
                            login_id: start.login_id.clone(),
                            code: None,
                            state: None,
                            code_verifier: None,
                            device: device.clone(),
                        },
                    )
                    .await
                    .map_err(refused)?;
                if r.status == "done" {
                    return Ok(r);
                }
                interval = r.interval.max(1);
            }
        }
    }
}

/// The CA the control API's certificate chains to: the enrolled folder's, `--ca`, or a pin.
pub fn api_tls(
    dir: &Path,
    ca: Option<&Path>,
    ca_pin: Option<&str>,
) -> Result<rustls::ClientConfig> {
    if let Some(pin) = ca_pin {
        let bytes: Vec<u8> = (0..pin.len())
            .step_by(2)
            .filter_map(|i| u8::from_str_radix(pin.get(i..i + 2)?, 16).ok())
            .collect();
        let pin: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("--ca-pin is the CA certificate's SHA-256 in hex"))?;
        return Ok(crate::http::pinned_tls(pin)?);
    }
    let file = match ca {
        Some(f) => f.to_path_buf(),
        None if dir.join("ca.pem").exists() => dir.join("ca.pem"),
        None => {
            let pem = crate::http::system_roots_pem()
                .context("no --ca given and the system's CA bundle cannot be read")?;
            return Ok(crate::http::ca_tls(&pem)?);
        }
    };
    let pem = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read the CA certificate {}", file.display()))?;
    Ok(crate::http::ca_tls(&pem)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_is_s256_of_the_verifier() {
        let (v, c) = pkce();
        assert_eq!(v.len(), 43);
        assert_eq!(c.len(), 43);
        let want =
            URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, v.as_bytes()));
        assert_eq!(c, want);
        assert_ne!(pkce().0, v);
    }

    #[test]
    fn callbacks_parse() {
        assert_eq!(
            parse_callback("GET /callback?code=abc&state=s%2B1 HTTP/1.1\r\n"),
            Some(Callback::Code {
                code: "abc".into(),
                state: "s+1".into()
            })
        );
        assert_eq!(
            parse_callback("GET /callback?error=access_denied&error_description=no HTTP/1.1"),
            Some(Callback::Error {
                error: "access_denied".into(),
                description: "no".into()
            })
        );
        assert_eq!(parse_callback("GET /favicon.ico HTTP/1.1"), None);
        assert_eq!(parse_callback("GET /callback?state=x HTTP/1.1"), None);
        assert_eq!(parse_callback(""), None);
        assert_eq!(parse_callback("\u{0}\u{1} garbage"), None);
    }
}
