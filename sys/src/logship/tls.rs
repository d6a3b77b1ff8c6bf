//! TLS client settings of the syslog (tls://) and OTLP (https://) sinks: TLS 1.2 and 1.3 with
//! rustls' ring provider, the sink's CA or the system's roots, an optional client certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::FieldError;

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, FieldError> {
    std::fs::read(path)
        .map_err(|e| FieldError::new(field, format!("cannot read {}: {e}", path.display())))
}

fn certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, FieldError> {
    let pem = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FieldError::new(field, format!("bad PEM in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(FieldError::new(
            field,
            format!("no certificate in {}", path.display()),
        ));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client configuration of a sink that speaks TLS.
pub(super) fn client_config(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<rustls::ClientConfig, FieldError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for c in certs("ca", path)? {
                roots.add(c).map_err(|e| {
                    FieldError::new(
                        "ca",
                        format!("bad CA certificate in {}: {e}", path.display()),
                    )
                })?;
            }
        }
        None => {
            let pem = crate::http::system_roots_pem().map_err(|e| {
                FieldError::new(
                    "ca",
                    format!("not given, and the system CA bundle cannot be read: {e}"),
                )
            })?;
            let found = CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok);
            roots.add_parsable_certificates(found);
            if roots.is_empty() {
                return Err(FieldError::new(
                    "ca",
                    "not given, and the system CA bundle holds no usable certificate",
                ));
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| FieldError::new("url", format!("TLS set-up: {e}")))?
        .with_root_certificates(roots);
    match (cert, key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = certs("cert", cert)?;
            let pem = read("key", key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                FieldError::new("key", format!("no private key in {}: {e}", key.display()))
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| FieldError::new("key", format!("does not fit `cert`: {e}")))
        }
        (Some(_), None) => Err(FieldError::new("key", "missing: `cert` needs its `key`")),
        (None, Some(_)) => Err(FieldError::new("cert", "missing: `key` needs its `cert`")),
    }
}

/// A configuration for plain http:// OTLP: reqwest wants one, and nothing here is verified.
pub(super) fn plain_config() -> Result<rustls::ClientConfig, FieldError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| FieldError::new("url", format!("TLS set-up: {e}")))?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth())
}

/// Refuses TLS files on a sink that does not speak TLS.
pub(super) fn no_tls_files(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    why: &str,
) -> Result<(), FieldError> {
    for (field, set) in [
        ("ca", ca.is_some()),
        ("cert", cert.is_some()),
        ("key", key.is_some()),
    ] {
        if set {
            return Err(FieldError::new(field, format!("not used: {why}")));
        }
    }
    Ok(())
}
