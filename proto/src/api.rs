//! The control API's messages (HTTPS + JSON) and its credentials.
//!
//! Four kinds of secrets travel here, each `PREFIX.ID.SECRET` so the server finds the record by
//! its id and compares a SHA-256 of the secret:
//! - enrollment tokens `SKE1.<id>.<secret>.<ca>`: one-time, expiring, bound to a user or a site;
//!   `<ca>` is the SHA-256 of the cluster CA certificate, so a device that has nothing else can
//!   still check that it talks to the right control plane (certificate pinning);
//! - device credentials `SKD1.<id>.<secret>`: given to a device at enrollment, used for posture
//!   refresh; they authorize nothing else;
//! - admin tokens `SKA1.<id>.<secret>`: for the admin CLI;
//! - SCIM tokens `SKS1.<id>.<secret>`: for an identity provider's provisioning client, on
//!   `/scim/v2` only.

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::policy::{Action, CheckKind, Protocol, TestOutcome};

pub const ENROLL_PREFIX: &str = "SKE1";
pub const DEVICE_PREFIX: &str = "SKD1";
pub const ADMIN_PREFIX: &str = "SKA1";
pub const SCIM_PREFIX: &str = "SKS1";

/// Why a credential string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CredentialError(pub &'static str);

/// A parsed `PREFIX.ID.SECRET[.CA]` credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub id: String,
    pub secret: String,
    /// Only enrollment tokens: SHA-256 of the CA certificate (DER).
    pub ca_sha256: Option<[u8; 32]>,
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

impl Credential {
    /// Reads a credential with the given prefix. Enrollment tokens carry the CA hash.
    pub fn parse(prefix: &str, text: &str) -> Result<Credential, CredentialError> {
        let text = text.trim();
        let mut parts = text.split('.');
        if parts.next() != Some(prefix) {
            return Err(CredentialError(match prefix {
                ENROLL_PREFIX => "not an enrollment token (they start with \"SKE1.\")",
                DEVICE_PREFIX => "not a device credential (they start with \"SKD1.\")",
                SCIM_PREFIX => "not a SCIM token (they start with \"SKS1.\")",
                _ => "not an admin token (they start with \"SKA1.\")",
            }));
        }
        let id = parts.next().unwrap_or_default();
        let secret = parts.next().unwrap_or_default();
        if id.is_empty()
            || secret.len() < 16
            || !id.chars().all(is_token_char)
            || !secret.chars().all(is_token_char)
        {
            return Err(CredentialError("malformed token: bad id or secret"));
        }
        let ca_sha256 = if prefix == ENROLL_PREFIX {
            let ca = parts.next().unwrap_or_default();
            let bytes = URL_SAFE_NO_PAD
                .decode(ca)
                .map_err(|_| CredentialError("malformed token: bad CA fingerprint"))?;
            Some(
                bytes
                    .try_into()
                    .map_err(|_| CredentialError("malformed token: bad CA fingerprint"))?,
            )
        } else {
            None
        };
        if parts.next().is_some() {
            return Err(CredentialError("malformed token: too many parts"));
        }
        Ok(Credential {
            id: id.to_string(),
            secret: secret.to_string(),
            ca_sha256,
        })
    }

    pub fn format(prefix: &str, id: &str, secret: &str, ca_sha256: Option<&[u8; 32]>) -> String {
        match ca_sha256 {
            Some(ca) => format!("{prefix}.{id}.{secret}.{}", URL_SAFE_NO_PAD.encode(ca)),
            None => format!("{prefix}.{id}.{secret}"),
        }
    }
}

/// An error answer: `{"error": "..."}` with a 4xx/5xx status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// A device check as the client receives it: what to evaluate, never how it came out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    pub name: String,
    pub kind: CheckKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// `trusted_network`: the gateway MAC addresses (lowercase, colons) of trusted networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateway_mac: Vec<String>,
    /// `trusted_network`: the DNS suffixes (lowercase) of trusted networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_suffix: Vec<String>,
}

/// A broker a device may connect to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    /// WireGuard endpoint, `host:port`.
    pub endpoint: String,
    /// The broker's WireGuard public key (base64).
    pub public_key: String,
    /// The broker's name (its region, say), for status and logs.
    #[serde(default)]
    pub name: String,
    /// The broker's control API URL: devices fall back to it when their own is down.
    #[serde(default)]
    pub api_url: String,
}

/// `POST /v1/enroll/device`. Holds the public key only: the private key never leaves the device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollDeviceRequest {
    pub token: String,
    pub public_key: String,
    pub name: String,
}

/// What a device needs to run: its address, its brokers, its routes and checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceConfig {
    pub device: String,
    pub user: String,
    pub address: IpAddr,
    pub device_range: IpNet,
    pub brokers: Vec<BrokerInfo>,
    /// Split-tunnel routes: the networks of the applications the user may reach.
    pub routes: Vec<IpNet>,
    pub checks: Vec<CheckSpec>,
    /// DNS: private zones, filter settings (`GET /v1/device/dns` has the lists' digests).
    #[serde(default)]
    pub dns: crate::policy::UserDns,
    /// Split or full tunnel, exclusions, local network, lock: the admin's, not the user's.
    #[serde(default)]
    pub tunnel: crate::tunnel::UserTunnel,
    /// Keys admin override codes are signed with (checked offline on the device).
    #[serde(default)]
    pub override_keys: Vec<crate::tunnel::OverrideKey>,
    /// Ids of this device's override codes an admin revoked (unexpired ones only): refused,
    /// and a window one of them opened closes.
    #[serde(default)]
    pub revoked_overrides: Vec<String>,
    /// Ids of this device's override codes already used once (unexpired ones only): refused
    /// if presented again (a window one of them opened stays open).
    #[serde(default)]
    pub used_overrides: Vec<String>,
    /// The applications the user may use, described for the status (name and targets).
    #[serde(default)]
    pub applications: Vec<String>,
}

/// `POST /v1/admin/devices/{name}/override` (admin): a code that opens the device's kill
/// switch for `seconds` (at most a day).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideRequest {
    pub seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OverrideIssued {
    pub code: String,
    pub id: String,
    pub device: String,
    pub not_after: u64,
}

/// `POST /v1/device/override-used` (device credential): the device reports that it used a code.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideUsed {
    pub id: String,
    pub not_after: u64,
    pub by: String,
}

/// In-tunnel status service of a broker (UDP, at the device range's first address): a device
/// asks with any datagram and gets a [`TunnelStatus`] in JSON.
pub const STATUS_PORT: u16 = 7444;

/// A flow the broker denied to this device (the latest few are kept per device and session).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// Unix seconds.
    pub at: u64,
    pub application: Option<String>,
    pub proto: String,
    pub dst: IpAddr,
    pub dport: u16,
    pub rule: Option<String>,
    pub reason: String,
    /// The posture check that failed, when that decided.
    pub check: Option<String>,
}

/// What a broker tells a device about its session there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// The broker's name.
    pub broker: String,
    /// Latest denials, oldest first.
    pub denials: Vec<Denial>,
    /// Expiry of the posture token the broker holds for this device (Unix seconds).
    pub posture_expires: Option<u64>,
    /// Checks failing according to that token.
    pub failing_checks: Vec<String>,
    /// The risk the broker's risk engine sees for this device and why, and what it watches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<RiskStatus>,
}

/// A device's risk as its user may see it: the level, the reasons (largest first, a few) and
/// what is collected to judge it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RiskStatus {
    pub level: crate::risk::Level,
    pub reasons: Vec<String>,
    pub collected: Vec<String>,
}

/// `GET /v1/device/dns` (device credential): the user's DNS settings and the blocklists to load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSettingsResponse {
    pub settings: crate::policy::UserDns,
    pub lists: Vec<ListMeta>,
}

/// A blocklist the client loads from `GET /v1/device/dns/lists/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListMeta {
    pub name: String,
    pub category: String,
    /// `domains`, `hosts` or `adblock`; None: detect.
    pub format: Option<String>,
    /// SHA-256 of the content (hex): a client downloads a list again only when it changed.
    pub sha256: String,
    pub bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollDeviceResponse {
    pub config: DeviceConfig,
    /// The device's credential for posture refresh (`SKD1.…`).
    pub credential: String,
    /// The cluster CA certificate (PEM), for later calls.
    pub ca_pem: String,
}

/// `POST /v1/posture` (device credential): pass/fail per check, nothing else.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostureRequest {
    pub checks: BTreeMap<String, bool>,
    /// Names the device's DNS filter blocked since its last request, counted per category
    /// (the names stay on the device): a signal for the risk engine.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dns_blocks: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostureResponse {
    /// The signed token to present to the broker (in the tunnel, UDP 7443).
    pub token: String,
    pub expires_at: u64,
    /// Seconds after which the device should ask for a new one.
    pub refresh_after: u64,
    /// The current device configuration (routes and checks follow policy changes).
    pub config: DeviceConfig,
    /// When the user last signed in through the identity provider on this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_in_at: Option<u64>,
}

/// `POST /v1/enroll/connector`: a PKCS#10 request; the key stays on the connector.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollConnectorRequest {
    pub token: String,
    pub csr_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollConnectorResponse {
    pub site: String,
    pub connector: String,
    pub certificate_pem: String,
    pub ca_pem: String,
    /// Broker QUIC endpoints `host:port`.
    pub brokers: Vec<String>,
    /// The name the brokers' certificates carry.
    pub broker_name: String,
}

/// `POST /v1/admin/users`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
    pub disabled: bool,
}

/// `POST /v1/admin/groups`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    pub name: String,
}

/// `POST /v1/admin/enrollment-tokens`: exactly one of `user` or `site`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentToken {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub site: Option<String>,
    pub ttl_secs: u64,
    /// A device token: the class of the device it enrolls (managed when absent).
    #[serde(default)]
    pub class: Option<crate::policy::DeviceClass>,
}

/// `POST /v1/admin/devices/{name}/class`: an MDM's or an admin's word on a device's class.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetDeviceClass {
    pub class: crate::policy::DeviceClass,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollmentTokenInfo {
    pub token: String,
    pub expires_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub name: String,
    pub user: String,
    pub address: IpAddr,
    pub public_key: String,
    pub created_at: u64,
    pub revoked_at: Option<u64>,
    #[serde(default)]
    pub class: crate::policy::DeviceClass,
}

/// `POST /v1/admin/devices` (admin): devices whose keys were made elsewhere, registered in
/// bulk for one user (fleet tooling, load tests). Each gets an address and a credential, as
/// enrollment would give it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterDevices {
    pub user: String,
    pub devices: Vec<NewDevice>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    pub name: String,
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisteredDevice {
    pub name: String,
    pub address: IpAddr,
    /// The device's credential for posture refresh (`SKD1.…`).
    pub credential: String,
}

/// The most devices one bulk registration takes.
pub const MAX_BULK_DEVICES: usize = 20_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectorInfo {
    pub name: String,
    pub site: String,
    pub serial: String,
    pub not_after: u64,
    pub created_at: u64,
    pub revoked_at: Option<u64>,
    /// When an admin drained it: no new flows through it on any broker until resumed.
    #[serde(default)]
    pub drained_at: Option<u64>,
}

/// `PUT /v1/admin/policy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyPolicy {
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyApplied {
    pub version: u64,
    pub tests: Vec<TestOutcome>,
}

/// A stored policy version (`GET /v1/admin/policy/history`, newest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    pub version: u64,
    pub applied_at: u64,
    pub applied_by: String,
    /// Size of its text.
    pub bytes: u64,
}

/// `POST /v1/admin/policy/check`: a policy checked and its tests run against the directory,
/// without applying it; and how it differs from the policy in force (a unified diff).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyChecked {
    /// The error (file:line:column field: message), when it does not parse.
    pub error: Option<String>,
    pub tests: Vec<TestOutcome>,
    pub diff: String,
}

/// Refused policy: the error (file:line:column field: message) or the failing tests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyRejected {
    pub error: String,
    #[serde(default)]
    pub tests: Vec<TestOutcome>,
}

/// `POST /v1/admin/explain`: "can this user's (or device's) traffic reach this destination?"
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub device: Option<String>,
    pub address: IpAddr,
    #[serde(default)]
    pub port: u16,
    pub protocol: Protocol,
    /// Checks assumed failing (with `user`; a device's own last posture is used otherwise).
    #[serde(default)]
    pub failing_checks: Vec<String>,
    /// Risk assumed (with `user`; a device's own current risk is used otherwise).
    #[serde(default)]
    pub risk: Option<crate::risk::Level>,
    /// A flow to a name of this application (applications known by DNS names have no fixed
    /// address; `address` is then only the flow's stand-in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<String>,
}

/// A device's risk in an explanation: level, score and every reason with its points now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExplainedRisk {
    pub level: crate::risk::Level,
    pub score: f64,
    /// Where the level came from: "assumed" or "engine".
    pub source: String,
    pub reasons: Vec<ExplainedReason>,
    /// What the application's sensitivity level makes of it: "allow", "log" or "deny"
    /// (None: tolerated).
    pub response: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExplainedReason {
    pub signal: String,
    pub detail: String,
    pub score: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explanation {
    pub decision: Action,
    pub application: Option<String>,
    pub rule: Option<String>,
    pub reason: String,
    pub check: Option<String>,
    pub required_checks: Vec<String>,
    /// Where the posture came from: "assumed", "token" or "none".
    pub posture: String,
    /// The device's class ("managed", "personal"; assumed managed for a user).
    #[serde(default)]
    pub class: String,
    #[serde(default)]
    pub risk: Option<ExplainedRisk>,
}

/// Where a posture signing key stands in its rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SigningKeyState {
    /// Signs new tokens and override codes (the newest key).
    Active,
    /// Replaced, still verifies tokens issued before the rotation until `verifies_until`.
    Previous,
    /// Verifies nothing any more; its private key is erased.
    Retired,
}

impl SigningKeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            SigningKeyState::Active => "active",
            SigningKeyState::Previous => "previous",
            SigningKeyState::Retired => "retired",
        }
    }
}

/// A posture signing key (`GET /v1/admin/signing-keys`, newest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKeyInfo {
    pub kid: String,
    pub created_at: u64,
    pub state: SigningKeyState,
    /// A previous key: until when it verifies (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifies_until: Option<u64>,
    /// A retired key: when it was retired, if a broker recorded it yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<u64>,
}

/// `POST /v1/admin/signing-keys/rotate`: the new active key and every key's state after it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SigningKeyRotated {
    pub active: String,
    pub keys: Vec<SigningKeyInfo>,
}

/// The checks a policy asks devices to evaluate.
pub fn check_specs(policy: &crate::policy::Policy) -> Vec<CheckSpec> {
    policy
        .posture_checks
        .iter()
        .map(|c| CheckSpec {
            name: c.name.clone(),
            kind: c.kind,
            version: c.version.clone(),
            process: c.process.clone(),
            gateway_mac: c.gateway_mac.clone(),
            dns_suffix: c.dns_suffix.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_and_reject_garbage() {
        let ca = [7u8; 32];
        let t = Credential::format(ENROLL_PREFIX, "ab12", "s3cr3t-s3cr3t-s3cr3t", Some(&ca));
        let c = Credential::parse(ENROLL_PREFIX, &t).unwrap();
        assert_eq!(c.id, "ab12");
        assert_eq!(c.ca_sha256, Some(ca));
        assert!(Credential::parse(DEVICE_PREFIX, &t).is_err());
        assert!(Credential::parse(ENROLL_PREFIX, "SKE1.ab12.short.AAAA").is_err());
        assert!(Credential::parse(ENROLL_PREFIX, "made-up-token").is_err());
        let d = Credential::format(DEVICE_PREFIX, "d1", "0123456789abcdefXYZ", None);
        assert_eq!(
            Credential::parse(DEVICE_PREFIX, &d).unwrap().secret,
            "0123456789abcdefXYZ"
        );
        assert!(Credential::parse(DEVICE_PREFIX, &format!("{d}.x")).is_err());
    }
}

/// An admin token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTokenInfo {
    pub id: String,
    pub name: String,
    pub role: crate::roles::Role,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
}

/// `POST /v1/admin/admin-tokens`: a named admin token with a role and, optionally, a lifetime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateAdminToken {
    pub name: String,
    pub role: crate::roles::Role,
    /// Seconds until it expires; none: it lasts until revoked.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A new admin token: shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTokenCreated {
    pub id: String,
    pub name: String,
    pub role: crate::roles::Role,
    pub expires_at: Option<u64>,
    pub token: String,
}

/// A SCIM token as listed (never its secret): what an identity provider's provisioning client
/// calls `/scim/v2` with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScimTokenInfo {
    pub id: String,
    pub name: String,
    pub created_at: u64,
    pub revoked_at: Option<u64>,
    /// When it last authenticated a SCIM request (to the minute).
    pub used_at: Option<u64>,
}

/// `POST /v1/admin/scim-tokens`: a named SCIM token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateScimToken {
    pub name: String,
}

/// A new SCIM token: shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScimTokenCreated {
    pub id: String,
    pub name: String,
    pub token: String,
}

/// `POST /v1/login/start`: a sign-in through the identity provider begins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginStartRequest {
    /// `device` (enroll or re-authenticate this device) or `admin` (an admin token).
    pub purpose: String,
    /// `code`: authorization code with PKCE, the browser coming back to `redirect_uri` (a
    /// loopback address of the device); `device`: the device authorization grant (a code
    /// the user enters on another screen).
    pub method: String,
    #[serde(default)]
    pub redirect_uri: Option<String>,
    /// base64url(SHA-256(verifier)), for `code`: only the device knows the verifier.
    #[serde(default)]
    pub code_challenge: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginStartResponse {
    pub login_id: String,
    /// `code`: where the browser goes, and the `state` it must come back with.
    #[serde(default)]
    pub authorization_url: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    /// `device`: what the user enters where.
    #[serde(default)]
    pub user_code: Option<String>,
    #[serde(default)]
    pub verification_uri: Option<String>,
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    /// Seconds between polls of `/v1/login/finish` (device grant).
    #[serde(default)]
    pub interval: u64,
    pub expires_in: u64,
}

/// The device a sign-in enrolls or re-authenticates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginDevice {
    pub public_key: String,
    pub name: String,
}

/// `POST /v1/login/finish`: the browser came back (code), or a poll (device grant).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginFinishRequest {
    pub login_id: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub code_verifier: Option<String>,
    /// For purpose `device`.
    #[serde(default)]
    pub device: Option<LoginDevice>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginFinishResponse {
    /// `pending` (device grant: poll again after `interval`) or `done`.
    pub status: String,
    #[serde(default)]
    pub interval: u64,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// When the sign-in happened at the provider (Unix seconds).
    #[serde(default)]
    pub signed_in_at: Option<u64>,
    /// Purpose `device`: the device's configuration; a credential and the CA only for a
    /// device enrolled by this sign-in (a re-authenticated one keeps its own).
    #[serde(default)]
    pub config: Option<DeviceConfig>,
    #[serde(default)]
    pub credential: Option<String>,
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// Purpose `admin`: the admin token, its role and expiry.
    #[serde(default)]
    pub admin_token: Option<String>,
    #[serde(default)]
    pub role: Option<crate::roles::Role>,
    #[serde(default)]
    pub expires_at: Option<u64>,
}
