//! Sekisho's OS glue, shared by the binaries and kept out of the pure `sekisho-proto`: TUN
//! devices with offloads, batched UDP with GSO/GRO, the kernel's drop counters, netlink
//! (addresses, routes, rules), nftables, the control API's HTTPS client and the Prometheus
//! endpoint.

mod error;
pub mod http;
pub mod link;
pub mod login;
pub mod logship;
pub mod metrics;
mod netlink;
mod nft;
pub mod tun;
pub mod udp;

pub use error::SysError;
pub use netlink::{Neighbour, Netlink, Rule};
pub use nft::{
    counter_packets, disable_ipv4_forwarding_on, enable_ipv4_forwarding, enable_ipv4_forwarding_on,
    nft, nft_delete_table, route_interface,
};
pub use tun::{AsyncDevice, create_tun};
