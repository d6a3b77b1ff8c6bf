//! Sekisho's shared language: the policy model and its evaluation, IP packet inspection, the flow
//! table, keys, the connector link messages and the WireGuard engine wrapper. Everything here
//! is pure: no sockets, no threads, no clocks (time comes in as an argument).

pub mod api;
pub mod config;
pub mod dns;
pub mod dnsfilter;
pub mod flow;
pub mod keys;
pub mod link;
pub mod packet;
pub mod policy;
pub mod posture;
pub mod select;
pub mod tunnel;
pub mod wg;

/// OS glue for the client and the connector: TUN devices, addresses and routes (netlink).
#[cfg(feature = "sys")]
pub mod sys;

/// HTTPS client of the control API (enrollment, posture refresh, admin CLI).
#[cfg(feature = "http")]
pub mod http;

#[cfg(feature = "metrics")]
pub mod metrics;
