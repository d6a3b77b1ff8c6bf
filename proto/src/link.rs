//! The connector link's control messages (QUIC stream set-up). IP packets themselves travel as
//! QUIC datagrams, unframed.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// ALPN protocol of the connector link.
pub const ALPN: &[u8] = b"sekisho-connector/1";

/// Largest control message accepted on the link.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// First message from a connector on its first bidirectional stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectorHello {
    pub site: String,
    pub version: String,
}

/// The broker's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum BrokerWelcome {
    /// The connector serves `site`; packets from clients in `device_ranges` will come.
    Accepted {
        site: String,
        device_ranges: Vec<IpNet>,
        /// Synthetic addresses of name-based applications: packets to them wait at the
        /// connector until a [`SiteMessage::MapName`] says which name they stand for.
        #[serde(default)]
        app_ranges: Vec<IpNet>,
        /// The connector endpoints (`host:port`) of every broker of the deployment: a
        /// connector links to all of them, so a client's flows survive the loss of one.
        #[serde(default)]
        brokers: Vec<String>,
        /// The site's applications the connector checks it can reach; a connector that cannot
        /// reach one gets no new flows to it while another connector of the site can.
        #[serde(default)]
        health_checks: Vec<HealthCheck>,
    },
    Refused {
        reason: String,
    },
}

/// A TCP connect check of one application from the connector's network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    pub application: String,
    /// An address or a DNS name (resolved with the site's DNS).
    pub host: String,
    pub port: u16,
}

/// DNS name a site's connector certificate must be valid for.
pub fn connector_cert_name(site: &str) -> String {
    format!("{site}.site.sekisho.internal")
}

/// A request a linked connector sends on a new bidirectional stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "lowercase")]
pub enum LinkRequest {
    /// Renew this connector's certificate: a PKCS#10 request for a fresh key.
    Renew { csr_pem: String },
    /// The connector's state: `draining` (finishing its flows before it stops: no new flows
    /// please) and the applications it cannot reach now.
    Health {
        draining: bool,
        unreachable: Vec<String>,
    },
}

/// The broker's answer to a [`LinkRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum LinkAnswer {
    Renewed {
        certificate_pem: String,
    },
    Refused {
        reason: String,
    },
    /// A [`LinkRequest::Health`] was taken into account.
    Noted,
}

/// A message the broker sends a connector on a new unidirectional stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "kebab-case")]
pub enum SiteMessage {
    /// Flows from `device` to `synthetic` are for the host `name`: resolve it with the site's
    /// DNS and translate.
    MapName {
        device: std::net::IpAddr,
        synthetic: std::net::IpAddr,
        name: String,
        /// What the device's address-based deny rules forbid at the site (allowlist syntax):
        /// a resolution or packet landing there is refused.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        deny: Vec<String>,
    },
    /// The connector endpoints of every broker now: link to new ones, drop links to brokers
    /// that left.
    Brokers { brokers: Vec<String> },
}

/// A connector link (the QUIC connection's stable id), as both ends name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct LinkId(pub u64);

impl std::fmt::Display for LinkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
