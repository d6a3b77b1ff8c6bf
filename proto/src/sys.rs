//! TUN devices and netlink (addresses, routes) for the client and the connector.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{Handle, RouteMessageBuilder};

pub use tun_rs::AsyncDevice;

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error(
        "cannot create TUN device {name:?}: {source} (is /dev/net/tun present, and do we have CAP_NET_ADMIN?)"
    )]
    Tun {
        name: String,
        source: std::io::Error,
    },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("no network interface named {0:?}")]
    NoSuchLink(String),
}

/// Creates a TUN device (no packet-information header), sets its MTU and brings it up.
pub fn create_tun(name: &str, mtu: u16) -> Result<AsyncDevice, SysError> {
    tun_rs::DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .enable(true)
        .build_async()
        .map_err(|source| SysError::Tun {
            name: name.to_string(),
            source,
        })
}

/// A netlink connection for addresses and routes.
pub struct Netlink {
    handle: Handle,
}

fn nl(e: rtnetlink::Error) -> SysError {
    SysError::Netlink(e.to_string())
}

impl Netlink {
    /// Opens a netlink socket; must be called inside a tokio runtime.
    pub fn open() -> Result<Self, SysError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| SysError::Netlink(e.to_string()))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn link_index(&self, name: &str) -> Result<u32, SysError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) | Err(_) => Err(SysError::NoSuchLink(name.to_string())),
        }
    }

    /// Adds `addr/prefix` to the interface (an existing identical address is fine).
    pub async fn add_address(&self, index: u32, addr: IpAddr, prefix: u8) -> Result<(), SysError> {
        match self
            .handle
            .address()
            .add(index, addr, prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -EEXIST => Ok(()),
            Err(e) => Err(nl(e)),
        }
    }

    fn route_message(index: u32, net: IpNet) -> rtnetlink::packet_route::route::RouteMessage {
        match net {
            IpNet::V4(n) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(index)
                .build(),
            IpNet::V6(n) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(index)
                .build(),
        }
    }

    /// Routes `net` into the interface (replacing an existing route to the same prefix).
    pub async fn add_route(&self, index: u32, net: IpNet) -> Result<(), SysError> {
        self.handle
            .route()
            .add(Self::route_message(index, net.trunc()))
            .replace()
            .execute()
            .await
            .map_err(nl)
    }

    pub async fn del_route(&self, index: u32, net: IpNet) -> Result<(), SysError> {
        self.handle
            .route()
            .del(Self::route_message(index, net.trunc()))
            .execute()
            .await
            .map_err(nl)
    }
}

/// errno EEXIST; netlink reports errors as negative errno values.
const EEXIST: i32 = 17;
