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

use sekisho_proto::link::connector_cert_name;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

fn validity(params: &mut CertificateParams, days: u64) {
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(days * 86400)).into();
}

fn write_private(path: &Path, text: &str) -> Result<()> {
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
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params.distinguished_name.push(
        DnType::CommonName,
        dns_names.first().cloned().unwrap_or_default(),
    );
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
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
