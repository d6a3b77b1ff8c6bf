//! HTTPS client of the control API, shared by the client (enrollment, posture refresh), the
//! connector (enrollment) and the admin CLI.
//!
//! Trust: before enrollment a device has only its enrollment token, which carries the SHA-256
//! of the cluster CA certificate. [`pinned_tls`] accepts a server whose chain contains a CA
//! certificate with that hash and whose leaf that CA signed for the URL's host name or address.
//! After enrollment the CA certificate is on disk and [`ca_tls`] trusts exactly it.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;
use serde::de::DeserializeOwned;

use sekisho_proto::api::ApiError;

pub use reqwest::Method;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach the control API at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the control API refused the request (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    #[error("unexpected answer from the control API: {0}")]
    BadAnswer(String),
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("bad enrollment token: {0}")]
    Token(String),
}

/// SHA-256 of a DER certificate.
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(verifier: Arc<dyn ServerCertVerifier>) -> Result<rustls::ClientConfig, CallError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CallError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Trusts exactly the CA certificate(s) in `ca_pem`.
pub fn ca_tls(ca_pem: &str) -> Result<rustls::ClientConfig, CallError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| CallError::Tls(format!("bad CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| CallError::Tls(format!("bad CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(CallError::Tls("no CA certificate found".into()));
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| CallError::Tls(e.to_string()))?;
    client_config(verifier)
}

/// Trusts a server whose chain includes the CA certificate with this SHA-256.
pub fn pinned_tls(ca_sha256: [u8; 32]) -> Result<rustls::ClientConfig, CallError> {
    client_config(Arc::new(PinnedCa {
        ca_sha256,
        provider: provider(),
    }))
}

#[derive(Debug)]
struct PinnedCa {
    ca_sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| cert_sha256(c) == self.ca_sha256)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's certificate chain does not contain the CA named by the enrollment token"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("bad CA certificate: {e}")))?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A control API client: base URL, TLS trust and an optional bearer credential.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
    bearer: Option<String>,
}

impl ApiClient {
    pub fn new(
        base: &str,
        tls: rustls::ClientConfig,
        bearer: Option<String>,
    ) -> Result<ApiClient, CallError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| CallError::Tls(e.to_string()))?;
        Ok(ApiClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            bearer,
        })
    }

    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Resp, CallError> {
        let bytes = self.call_raw(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| CallError::BadAnswer(e.to_string()))
    }

    /// GET of a non-JSON resource (a blocklist); the body as it came.
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>, CallError> {
        self.call_raw::<()>(reqwest::Method::GET, path, None).await
    }

    async fn call_raw<Req: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Vec<u8>, CallError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(b) = &self.bearer {
            req = req.bearer_auth(b);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|source| CallError::Unreachable {
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| CallError::Unreachable {
                url: url.clone(),
                source,
            })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(300).collect());
            return Err(CallError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        Ok(bytes.to_vec())
    }

    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> Result<Resp, CallError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn get<Resp: DeserializeOwned>(&self, path: &str) -> Result<Resp, CallError> {
        self.call::<(), Resp>(reqwest::Method::GET, path, None)
            .await
    }
}

/// The enrollment token given on a command line (`-` reads it from standard input), checked for
/// shape. Returns its text and the SHA-256 of the CA it pins.
pub fn enrollment_token(arg: &str) -> Result<(String, [u8; 32]), CallError> {
    let text = if arg == "-" {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
            .map_err(|e| CallError::Token(format!("cannot read standard input: {e}")))?;
        t
    } else {
        arg.to_string()
    };
    let text = text.trim().to_string();
    let cred = sekisho_proto::api::Credential::parse(sekisho_proto::api::ENROLL_PREFIX, &text)
        .map_err(|e| CallError::Token(e.to_string()))?;
    let ca = cred
        .ca_sha256
        .ok_or_else(|| CallError::Token("no CA fingerprint".into()))?;
    Ok((text, ca))
}

/// Sends an enrollment request to `server`, trusting only the CA the token pins. Blocking (the
/// enroll commands run before any runtime).
pub fn enroll<Req: Serialize, Resp: DeserializeOwned>(
    server: &str,
    ca_sha256: [u8; 32],
    path: &str,
    request: &Req,
) -> Result<Resp, CallError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CallError::Tls(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async {
        ApiClient::new(server, pinned_tls(ca_sha256)?, None)?
            .post(path, request)
            .await
    })
}

/// Where Debian keeps the system's trusted CA certificates.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The system's trusted CA certificates (PEM), if the bundle can be read.
pub fn system_roots_pem() -> std::io::Result<String> {
    std::fs::read_to_string(SYSTEM_CA_BUNDLE)
}

/// Fetches a public resource (a blocklist URL) over HTTP or HTTPS; HTTPS servers are checked
/// against the system's CA bundle. Fails on any status but 2xx and on bodies over `max` bytes.
pub async fn fetch_public(url: &str, max: usize) -> Result<Vec<u8>, CallError> {
    let tls = match system_roots_pem() {
        Ok(pem) => ca_tls(&pem)?,
        Err(_) if url.starts_with("http://") => pinned_tls([0; 32])?,
        Err(e) => {
            return Err(CallError::Tls(format!(
                "cannot read the system CA bundle {SYSTEM_CA_BUNDLE}: {e}"
            )));
        }
    };
    let client = ApiClient::new(url, tls, None)?;
    let bytes = client.get_bytes("").await?;
    if bytes.len() > max {
        return Err(CallError::BadAnswer(format!(
            "{url} is larger than {max} bytes"
        )));
    }
    Ok(bytes)
}
