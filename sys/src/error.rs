/// What went wrong in the OS glue.
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
    #[error("cannot run `nft` (install the nftables package): {0}")]
    NftMissing(std::io::Error),
    #[error("nft failed: {0}")]
    Nft(String),
    #[error(
        "cannot enable IPv4 forwarding (in a container, set the sysctl net.ipv4.ip_forward=1): {0}"
    )]
    Forwarding(std::io::Error),
}
