//! Packet sizes in one place: the overlay MTU (the largest IP packet a device's tunnel
//! carries), what WireGuard adds around it, and the QUIC datagram size a connector link needs
//! to carry it whole. A link never falls below [`quic_min_mtu`]: that floor is what keeps a
//! lossy burst from shrinking the path until full-size packets no longer fit (a black hole
//! TCP cannot get out of).

/// The overlay MTU devices use unless configured otherwise: room for WireGuard over IPv6 and
/// for the QUIC link with the 1,500-byte Ethernet MTU of most paths.
pub const DEFAULT_OVERLAY_MTU: u16 = 1360;
/// The smallest overlay MTU accepted (IPv4's minimum datagram size every host must take).
pub const MIN_OVERLAY_MTU: u16 = 576;
/// What WireGuard adds to an IP packet: message header (16) and authentication tag (16).
pub const WIREGUARD_OVERHEAD: u16 = 32;
/// What a QUIC short-header packet carrying one DATAGRAM frame adds to the datagram's payload
/// (as quinn counts it): flags 1, connection id 8, packet number up to 4, AEAD tag 16, frame
/// type and length up to 9; two bytes to spare.
pub const QUIC_DATAGRAM_OVERHEAD: u16 = 40;
/// QUIC's own minimum UDP payload size.
pub const QUIC_FLOOR: u16 = 1200;
/// IPv4 header (without options) and UDP header.
pub const IPV4_UDP_HEADERS: u16 = 20 + 8;
/// IPv6 header and UDP header.
pub const IPV6_UDP_HEADERS: u16 = 40 + 8;

/// The UDP payload of a WireGuard datagram carrying a full overlay packet.
pub fn wireguard_datagram(overlay_mtu: u16) -> u16 {
    overlay_mtu + WIREGUARD_OVERHEAD
}

/// The smallest UDP payload a connector link must carry so that a full overlay packet fits in
/// one QUIC datagram: QUIC's floor for the link (`min_mtu`) and its starting size.
pub fn quic_min_mtu(overlay_mtu: u16) -> u16 {
    (overlay_mtu + QUIC_DATAGRAM_OVERHEAD).max(QUIC_FLOOR)
}

/// The MSS a TCP SYN may announce for packets of at most `mtu` bytes.
pub fn mss_for(mtu: u16, ipv6: bool) -> u16 {
    mtu.saturating_sub(if ipv6 { 60 } else { 40 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_overlay_fits_a_1500_byte_path_both_ways() {
        assert_eq!(wireguard_datagram(DEFAULT_OVERLAY_MTU), 1392);
        assert!(wireguard_datagram(DEFAULT_OVERLAY_MTU) + IPV6_UDP_HEADERS <= 1500);
        assert_eq!(quic_min_mtu(DEFAULT_OVERLAY_MTU), 1400);
        assert!(quic_min_mtu(DEFAULT_OVERLAY_MTU) + IPV6_UDP_HEADERS <= 1500);
        assert_eq!(quic_min_mtu(600), QUIC_FLOOR);
        assert_eq!(mss_for(1360, false), 1320);
        assert_eq!(mss_for(1360, true), 1300);
    }
}
