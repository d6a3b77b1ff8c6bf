//! The cluster's small certificate authority for connector links (mutual TLS).
//!
//! `sekisho-broker pki init` makes a CA and the broker's certificate; `pki issue-connector`
//! makes a certificate for one site's connector, valid for the name
//! `<site>.site.sekisho.internal`, which the broker checks against the site the connector claims.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;

use sekisho_proto::link::connector_cert_name;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

fn validity(params: &mut CertificateParams, days: u64) {
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(days * 86400)).into();
}

pub fn write_private(path: &Path, text: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn write_public(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The CA's name and constraints. Issuing rebuilds the issuer from these and the CA key: the
/// issued certificates name the CA by this subject and are checked against the CA certificate's
/// key, so the CA certificate itself need not be parsed.
fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Sekisho cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Creates `dir/ca.pem`, `dir/ca.key` and a broker certificate for `broker_names`.
pub fn init(dir: &Path, broker_names: &[String]) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if dir.join(CA_KEY).exists() {
        anyhow::bail!(
            "{} already exists: refusing to replace the CA",
            dir.join(CA_KEY).display()
        );
    }
    let ca_key = KeyPair::generate()?;
    let mut params = ca_params()?;
    validity(&mut params, 3650);
    let ca = params.self_signed(&ca_key)?;
    write_public(&dir.join(CA_CERT), &ca.pem())?;
    write_private(&dir.join(CA_KEY), &ca_key.serialize_pem())?;
    issue(
        dir,
        "broker",
        broker_names,
        ExtendedKeyUsagePurpose::ServerAuth,
    )
}

/// A leaf certificate for `names` (DNS names or addresses; the first is also the common name).
fn leaf_params(names: &[String], usage: ExtendedKeyUsagePurpose) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// Issues `dir/<name>.pem` and `dir/<name>.key`, signed by the CA in `dir`.
pub fn issue(
    dir: &Path,
    name: &str,
    dns_names: &[String],
    usage: ExtendedKeyUsagePurpose,
) -> Result<()> {
    let ca_key_pem = fs::read_to_string(dir.join(CA_KEY))
        .with_context(|| format!("no CA key in {}: run `pki init` first", dir.display()))?;
    let issuer = Issuer::new(ca_params()?, KeyPair::from_pem(&ca_key_pem)?);
    let key = KeyPair::generate()?;
    let mut params = leaf_params(dns_names, usage)?;
    validity(&mut params, 365);
    let cert = params.signed_by(&key, &issuer)?;
    write_public(&dir.join(format!("{name}.pem")), &cert.pem())?;
    write_private(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
    Ok(())
}

/// Issues the certificate of the connector of `site`: `dir/connector-<site>.pem/.key`.
pub fn issue_connector(dir: &Path, site: &str) -> Result<()> {
    issue(
        dir,
        &format!("connector-{site}"),
        &[connector_cert_name(site)],
        ExtendedKeyUsagePurpose::ClientAuth,
    )
}

/// The cluster CA, loaded to sign connector certificates at enrollment and renewal.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// SHA-256 of the CA certificate (DER), which enrollment tokens carry.
    pub sha256: [u8; 32],
}

impl Ca {
    pub fn load(cert: &Path, key: &Path) -> Result<Ca> {
        let cert_pem = fs::read_to_string(cert)
            .with_context(|| format!("cannot read the CA certificate {}", cert.display()))?;
        let key_pem = fs::read_to_string(key)
            .with_context(|| format!("cannot read the CA key {}", key.display()))?;
        let der = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .next()
            .context("no certificate in the CA file")?
            .context("bad PEM in the CA file")?;
        Ok(Ca {
            issuer: Issuer::new(ca_params()?, KeyPair::from_pem(&key_pem)?),
            sha256: sekisho_sys::http::cert_sha256(&der),
            cert_pem,
        })
    }

    /// Signs a connector's certificate request for `site`: the subject and names come from
    /// here, only the public key from the request. Returns (PEM, serial hex, not_after).
    pub fn sign_connector(
        &self,
        csr_pem: &str,
        site: &str,
        lifetime: Duration,
    ) -> Result<(String, String, u64)> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .context("bad certificate request (PKCS#10 PEM expected)")?;
        let mut params = leaf_params(
            &[connector_cert_name(site)],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let mut serial = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let now = SystemTime::now();
        // Back-dated a little for clock skew, but never by a large part of a short lifetime:
        // the connector renews after two thirds of not_before..not_after.
        params.not_before = (now - (lifetime / 10).min(Duration::from_secs(300))).into();
        let not_after = now + lifetime;
        params.not_after = not_after.into();
        csr.params = params;
        let cert = csr.signed_by(&self.issuer)?;
        let not_after = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok((cert.pem(), serial_hex(&serial), not_after))
    }
}

pub fn serial_hex(bytes: &[u8]) -> String {
    let trimmed = match bytes.iter().position(|&b| b != 0) {
        Some(i) => &bytes[i..],
        None => &[0],
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

/// The serial number of a DER certificate, hex, as [`Ca::sign_connector`] reports it.
pub fn cert_serial(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(serial_hex(cert.raw_serial()))
}
