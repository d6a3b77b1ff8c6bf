//! Addresses, routes, policy routing rules and the IPv6 neighbour table over netlink
//! (rtnetlink).

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::SysError;

/// A policy routing rule (see [`Netlink::add_rule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub priority: u32,
    pub table: u32,
    pub v6: bool,
    pub not_fwmark: Option<u32>,
    pub suppress_prefixlength: Option<u32>,
}

/// An entry of the neighbour table: an address on a link and its link-layer address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub interface: String,
    pub address: IpAddr,
    pub lladdr: Vec<u8>,
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

    /// Routes `net` into the interface in routing table `table`.
    pub async fn add_table_route(
        &self,
        index: u32,
        net: IpNet,
        table: u32,
    ) -> Result<(), SysError> {
        let msg = match net.trunc() {
            IpNet::V4(n) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(index)
                .table_id(table)
                .build(),
            IpNet::V6(n) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(index)
                .table_id(table)
                .build(),
        };
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl)
    }

    /// Adds a policy routing rule at `priority`: packets (of one family) look up `table`;
    /// `not_fwmark`: only those without this mark; `suppress_prefixlength`: ignore routes with
    /// a prefix this short or shorter (0: the default route) found there.
    pub async fn add_rule(&self, rule: &Rule) -> Result<(), SysError> {
        use rtnetlink::packet_route::rule::{RuleAttribute, RuleFlags};
        let base = self
            .handle
            .rule()
            .add()
            .table_id(rule.table)
            .priority(rule.priority);
        let adjust = |msg: &mut rtnetlink::packet_route::rule::RuleMessage| {
            // The request leaves the action unset, which the kernel takes as a rule that
            // fails every lookup.
            msg.header.action = rtnetlink::packet_route::rule::RuleAction::ToTable;
            if let Some(mark) = rule.not_fwmark {
                msg.attributes.push(RuleAttribute::FwMark(mark));
                msg.attributes.push(RuleAttribute::FwMask(0xffff_ffff));
                msg.header.flags |= RuleFlags::Invert;
            }
            if let Some(len) = rule.suppress_prefixlength {
                msg.attributes.push(RuleAttribute::SuppressPrefixLen(len));
            }
        };
        let result = if rule.v6 {
            let mut r = base.v6();
            adjust(r.message_mut());
            r.execute().await
        } else {
            let mut r = base.v4();
            adjust(r.message_mut());
            r.execute().await
        };
        match result {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -EEXIST => Ok(()),
            Err(e) => Err(nl(e)),
        }
    }

    /// Removes every rule (both families) whose priority is in `priorities`.
    pub async fn del_rules(&self, priorities: &[u32]) -> Result<(), SysError> {
        use rtnetlink::IpVersion;
        use rtnetlink::packet_route::rule::RuleAttribute;
        for version in [IpVersion::V4, IpVersion::V6] {
            let mut rules = self.handle.rule().get(version).execute();
            let mut doomed = Vec::new();
            while let Some(r) = rules.try_next().await.map_err(nl)? {
                let prio = r.attributes.iter().find_map(|a| match a {
                    RuleAttribute::Priority(p) => Some(*p),
                    _ => None,
                });
                if prio.is_some_and(|p| priorities.contains(&p)) {
                    doomed.push(r);
                }
            }
            for r in doomed {
                self.handle.rule().del(r).execute().await.map_err(nl)?;
            }
        }
        Ok(())
    }

    /// The addresses with prefix of every interface but `except` (the local networks).
    pub async fn local_networks(&self, except: u32) -> Result<Vec<IpNet>, SysError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut out = Vec::new();
        let mut addrs = self.handle.address().get().execute();
        while let Some(a) = addrs.try_next().await.map_err(nl)? {
            if a.header.index == except {
                continue;
            }
            for attr in &a.attributes {
                if let AddressAttribute::Address(ip) = attr
                    && !ip.is_loopback()
                    && let Ok(net) = IpNet::new(*ip, a.header.prefix_len)
                {
                    out.push(net);
                }
            }
        }
        Ok(out)
    }

    /// The resolved entries of the IPv6 neighbour table (what `ip -6 neigh` lists as
    /// reachable, stale, delay, probe or permanent), with the interface's name.
    pub async fn neighbours6(&self) -> Result<Vec<Neighbour>, SysError> {
        use rtnetlink::packet_route::AddressFamily;
        use rtnetlink::packet_route::link::LinkAttribute;
        use rtnetlink::packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourState,
        };
        let mut names = std::collections::HashMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(l) = links.try_next().await.map_err(nl)? {
            for a in &l.attributes {
                if let LinkAttribute::IfName(n) = a {
                    names.insert(l.header.index, n.clone());
                }
            }
        }
        let mut out = Vec::new();
        let mut entries = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet6)
            .execute();
        while let Some(m) = entries.try_next().await.map_err(nl)? {
            let resolved = matches!(
                m.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
            );
            let Some(interface) = names.get(&m.header.ifindex) else {
                continue;
            };
            let (mut address, mut lladdr) = (None, None);
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                        address = Some(IpAddr::V6(*ip));
                    }
                    NeighbourAttribute::LinkLayerAddress(l) => lladdr = Some(l.clone()),
                    _ => {}
                }
            }
            if let (true, Some(address), Some(lladdr)) = (resolved, address, lladdr) {
                out.push(Neighbour {
                    interface: interface.clone(),
                    address,
                    lladdr,
                });
            }
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading the IPv6 neighbour table needs no privilege; whatever it holds decodes, and
    /// only resolved entries come back, each with its interface's name.
    #[tokio::test]
    async fn the_ipv6_neighbour_table_reads() {
        let nl = Netlink::open().unwrap();
        let all = nl.neighbours6().await.unwrap();
        for n in &all {
            assert!(!n.interface.is_empty() && n.address.is_ipv6(), "{n:?}");
            println!("{} {} {:02x?}", n.interface, n.address, n.lladdr);
        }
    }
}
