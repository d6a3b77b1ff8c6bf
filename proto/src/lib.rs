//! Sekisho's shared language: the policy model and its evaluation, IP packet inspection, the flow
//! table, keys, the connector link messages and the WireGuard engine wrapper. Everything here
//! is pure: no sockets, no threads, no clocks (time comes in as an argument).

pub mod api;
pub mod broker;
pub mod client;
pub mod config;
pub mod connector;
pub mod counters;
pub mod dns;
pub mod dnsfilter;
pub mod flow;
pub mod keys;
pub mod link;
pub mod mtu;
pub mod ocsf;
pub mod packet;
pub mod policy;
pub mod posture;
pub mod ratelimit;
pub mod risk;
pub mod roles;
pub mod select;
pub mod timers;
pub mod transmit;
pub mod tunnel;
pub mod wg;
