//! IP packet inspection and the replies a broker sends for denied flows.
//!
//! Everything here works on borrowed byte slices and writes into caller buffers: no allocation,
//! no panics on any input (checked by the property tests and the fuzz target).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// The identity of a flow as seen from the client side: who talks to what.
///
/// For ICMP echo the identifier stands in for both ports, so that a reply maps to the same flow
/// as its request once reversed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

impl FlowKey {
    /// The same flow seen from the other end.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
        }
    }

    pub fn is_icmp(&self) -> bool {
        self.proto == PROTO_ICMP || self.proto == PROTO_ICMPV6
    }

    pub fn proto_name(&self) -> &'static str {
        proto_name(self.proto)
    }
}

pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_ICMP => "icmp",
        PROTO_ICMPV6 => "icmpv6",
        _ => "other",
    }
}

/// What a packet is, for the flow table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    /// A packet of the flow `key` (TCP, UDP, ICMP echo, or another protocol with ports 0).
    Flow(FlowKey),
    /// An ICMP error about a packet of flow `about` (as the erring packet carried it: from the
    /// receiver of this error to its sender). It belongs to that flow, reversed.
    IcmpError { outer: FlowKey, about: FlowKey },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet too short")]
    Truncated,
    #[error("not an IPv4 or IPv6 packet")]
    BadVersion,
    #[error("IP header length field is invalid")]
    BadHeader,
    #[error("fragment without transport header")]
    Fragment,
}

/// Source and destination addresses of an IP packet.
pub fn addresses(pkt: &[u8]) -> Result<(IpAddr, IpAddr), PacketError> {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => {
            if pkt.len() < 20 {
                return Err(PacketError::Truncated);
            }
            Ok((ipv4_at(pkt, 12).into(), ipv4_at(pkt, 16).into()))
        }
        Some(6) => {
            if pkt.len() < 40 {
                return Err(PacketError::Truncated);
            }
            Ok((ipv6_at(pkt, 8).into(), ipv6_at(pkt, 24).into()))
        }
        Some(_) => Err(PacketError::BadVersion),
        None => Err(PacketError::Truncated),
    }
}

fn ipv4_at(p: &[u8], i: usize) -> Ipv4Addr {
    Ipv4Addr::new(p[i], p[i + 1], p[i + 2], p[i + 3])
}

fn ipv6_at(p: &[u8], i: usize) -> Ipv6Addr {
    let mut b = [0u8; 16];
    b.copy_from_slice(&p[i..i + 16]);
    Ipv6Addr::from(b)
}

fn be16(p: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([p[i], p[i + 1]])
}

/// The IP header: (protocol, header length, src, dst, is a non-first fragment).
struct IpHeader {
    proto: u8,
    header_len: usize,
    src: IpAddr,
    dst: IpAddr,
    later_fragment: bool,
}

fn ip_header(pkt: &[u8]) -> Result<IpHeader, PacketError> {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => {
            if pkt.len() < 20 {
                return Err(PacketError::Truncated);
            }
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if ihl < 20 || ihl > pkt.len() {
                return Err(PacketError::BadHeader);
            }
            let frag_offset = be16(pkt, 6) & 0x1fff;
            Ok(IpHeader {
                proto: pkt[9],
                header_len: ihl,
                src: ipv4_at(pkt, 12).into(),
                dst: ipv4_at(pkt, 16).into(),
                later_fragment: frag_offset != 0,
            })
        }
        Some(6) => {
            if pkt.len() < 40 {
                return Err(PacketError::Truncated);
            }
            // Walk the common extension headers to the transport header.
            let mut next = pkt[6];
            let mut off = 40;
            let mut later_fragment = false;
            loop {
                match next {
                    0 | 43 | 60 => {
                        if pkt.len() < off + 8 {
                            return Err(PacketError::Truncated);
                        }
                        next = pkt[off];
                        off += (usize::from(pkt[off + 1]) + 1) * 8;
                    }
                    44 => {
                        if pkt.len() < off + 8 {
                            return Err(PacketError::Truncated);
                        }
                        next = pkt[off];
                        later_fragment = be16(pkt, off + 2) & 0xfff8 != 0;
                        off += 8;
                    }
                    _ => break,
                }
                if off > pkt.len() {
                    return Err(PacketError::Truncated);
                }
            }
            Ok(IpHeader {
                proto: next,
                header_len: off,
                src: ipv6_at(pkt, 8).into(),
                dst: ipv6_at(pkt, 24).into(),
                later_fragment,
            })
        }
        Some(_) => Err(PacketError::BadVersion),
        None => Err(PacketError::Truncated),
    }
}

fn is_icmp_error(proto: u8, icmp_type: u8) -> bool {
    match proto {
        PROTO_ICMP => matches!(icmp_type, 3 | 4 | 5 | 11 | 12),
        PROTO_ICMPV6 => icmp_type < 128,
        _ => false,
    }
}

fn is_echo(proto: u8, icmp_type: u8) -> bool {
    match proto {
        PROTO_ICMP => matches!(icmp_type, 0 | 8),
        PROTO_ICMPV6 => matches!(icmp_type, 128 | 129),
        _ => false,
    }
}

/// Flow key of a packet, reading only as much as the transport header needs. `allow_short`
/// accepts a transport header cut after 8 bytes (as inside ICMP errors).
fn key_of(pkt: &[u8], h: &IpHeader) -> Result<FlowKey, PacketError> {
    let t = &pkt[h.header_len..];
    let (sport, dport) = match h.proto {
        PROTO_TCP | PROTO_UDP => {
            if h.later_fragment {
                return Err(PacketError::Fragment);
            }
            if t.len() < 4 {
                return Err(PacketError::Truncated);
            }
            (be16(t, 0), be16(t, 2))
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if h.later_fragment {
                return Err(PacketError::Fragment);
            }
            if t.len() < 8 {
                return Err(PacketError::Truncated);
            }
            if is_echo(h.proto, t[0]) {
                let id = be16(t, 4);
                (id, id)
            } else {
                (0, 0)
            }
        }
        _ => (0, 0),
    };
    Ok(FlowKey {
        proto: h.proto,
        src: h.src,
        dst: h.dst,
        sport,
        dport,
    })
}

/// Classifies an IP packet for the flow table.
pub fn classify(pkt: &[u8]) -> Result<PacketKind, PacketError> {
    let h = ip_header(pkt)?;
    let outer = key_of(pkt, &h)?;
    if outer.is_icmp() {
        let t = &pkt[h.header_len..];
        if is_icmp_error(h.proto, t[0]) {
            let inner = &t[8..];
            let ih = ip_header(inner)?;
            let about = key_of(inner, &ih)?;
            return Ok(PacketKind::IcmpError { outer, about });
        }
    }
    Ok(PacketKind::Flow(outer))
}

/// Internet checksum over `data`, continuing from `sum`.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut s = 0;
    match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            s = sum16(s, &a.octets());
            s = sum16(s, &b.octets());
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            s = sum16(s, &a.octets());
            s = sum16(s, &b.octets());
        }
        _ => {}
    }
    s + u32::from(proto) + len as u32
}

/// Writes an IP header for a packet from `src` to `dst` carrying `payload_len` bytes of `proto`;
/// returns the header length.
fn write_ip_header(
    out: &mut [u8],
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    payload_len: usize,
) -> usize {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + payload_len;
            out[..20].fill(0);
            out[0] = 0x45;
            out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            out[6] = 0x40; // don't fragment
            out[8] = 64;
            out[9] = proto;
            out[12..16].copy_from_slice(&s.octets());
            out[16..20].copy_from_slice(&d.octets());
            let c = fold(sum16(0, &out[..20]));
            out[10..12].copy_from_slice(&c.to_be_bytes());
            20
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out[..40].fill(0);
            out[0] = 0x60;
            out[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
            out[6] = proto;
            out[7] = 64;
            out[8..24].copy_from_slice(&s.octets());
            out[24..40].copy_from_slice(&d.octets());
            40
        }
        _ => 0,
    }
}

/// TCP flag bits as they appear in the header's flags byte.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

/// The flags byte of a TCP segment (FIN, SYN, RST, ...); None for anything else, fragments and
/// segments too short to carry it.
pub fn tcp_flags(pkt: &[u8]) -> Option<u8> {
    let h = ip_header(pkt).ok()?;
    if h.proto != PROTO_TCP || h.later_fragment {
        return None;
    }
    pkt.get(h.header_len + 13).copied()
}

/// The payload of a UDP packet (checked against the UDP length field).
pub fn udp_payload(pkt: &[u8]) -> Option<&[u8]> {
    let h = ip_header(pkt).ok()?;
    if h.proto != PROTO_UDP || h.later_fragment {
        return None;
    }
    let t = pkt.get(h.header_len..)?;
    let len = usize::from(be16(t.get(..8)?, 4));
    t.get(8..len.max(8))
}

/// Writes a UDP packet from `src`:`sport` to `dst`:`dport` into `out`; returns its length, or
/// None when `out` is too small or the families differ.
pub fn build_udp(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    payload: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let hl = if src.is_ipv4() { 20 } else { 40 };
    let udp_len = 8 + payload.len();
    if src.is_ipv4() != dst.is_ipv4()
        || out.len() < hl + udp_len
        || udp_len > usize::from(u16::MAX) - hl
    {
        return None;
    }
    write_ip_header(out, src, dst, PROTO_UDP, udp_len);
    let u = &mut out[hl..hl + udp_len];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    u[6..8].fill(0);
    u[8..].copy_from_slice(payload);
    let c = fold(sum16(pseudo_sum(src, dst, PROTO_UDP, udp_len), u));
    // A computed zero is sent as all ones (zero means "no checksum" in IPv4).
    let c = if c == 0 { 0xffff } else { c };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    Some(hl + udp_len)
}

/// An ICMP or ICMPv6 echo request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo<'a> {
    pub request: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub id: u16,
    pub seq: u16,
    pub payload: &'a [u8],
}

/// Reads an echo request or reply (ICMP for IPv4, ICMPv6 for IPv6); None for anything else.
pub fn echo(pkt: &[u8]) -> Option<Echo<'_>> {
    let h = ip_header(pkt).ok()?;
    if h.later_fragment {
        return None;
    }
    let ip_len = match h.src {
        IpAddr::V4(_) => usize::from(be16(pkt, 2)),
        IpAddr::V6(_) => 40 + usize::from(be16(pkt, 4)),
    };
    let t = pkt.get(h.header_len..ip_len.min(pkt.len()))?;
    if t.len() < 8 {
        return None;
    }
    let request = match (h.proto, t[0]) {
        (PROTO_ICMP, 8) | (PROTO_ICMPV6, 128) => true,
        (PROTO_ICMP, 0) | (PROTO_ICMPV6, 129) => false,
        _ => return None,
    };
    Some(Echo {
        request,
        src: h.src,
        dst: h.dst,
        id: be16(t, 4),
        seq: be16(t, 6),
        payload: &t[8..],
    })
}

/// Writes an echo request or reply from `src` to `dst` into `out`; returns its length, or None
/// when `out` is too small or the families differ.
pub fn build_echo(
    src: IpAddr,
    dst: IpAddr,
    request: bool,
    id: u16,
    seq: u16,
    payload: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let v4 = src.is_ipv4();
    let hl = if v4 { 20 } else { 40 };
    let len = 8 + payload.len();
    if v4 != dst.is_ipv4() || out.len() < hl + len || len > usize::from(u16::MAX) - hl {
        return None;
    }
    let proto = if v4 { PROTO_ICMP } else { PROTO_ICMPV6 };
    write_ip_header(out, src, dst, proto, len);
    let m = &mut out[hl..hl + len];
    m[0] = match (v4, request) {
        (true, true) => 8,
        (true, false) => 0,
        (false, true) => 128,
        (false, false) => 129,
    };
    m[1] = 0;
    m[2..4].fill(0);
    m[4..6].copy_from_slice(&id.to_be_bytes());
    m[6..8].copy_from_slice(&seq.to_be_bytes());
    m[8..].copy_from_slice(payload);
    let start = if v4 {
        0
    } else {
        pseudo_sum(src, dst, proto, len)
    };
    let c = fold(sum16(start, m));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    Some(hl + len)
}

/// Builds the answer to the first packet of a denied flow into `out`: a TCP RST for TCP, an ICMP
/// "communication administratively prohibited" for anything else. Returns the reply's length,
/// or `None` when no reply is due (the packet is itself an RST or an ICMP error, or unparsable).
/// `out` should hold at least 1280 bytes.
pub fn deny_reply(pkt: &[u8], out: &mut [u8]) -> Option<usize> {
    // Answer only what we can read whole: a reply must never quote a malformed packet.
    classify(pkt).ok()?;
    let h = ip_header(pkt).ok()?;
    if h.later_fragment {
        return None;
    }
    let t = &pkt[h.header_len..];
    if h.proto == PROTO_TCP {
        if t.len() < 20 || out.len() < 60 {
            return None;
        }
        let flags = t[13];
        if flags & 0x04 != 0 {
            return None; // never answer an RST
        }
        let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
        let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
        let data_off = usize::from(t[12] >> 4) * 4;
        let ip_len = match h.src {
            IpAddr::V4(_) => usize::from(be16(pkt, 2)),
            IpAddr::V6(_) => 40 + usize::from(be16(pkt, 4)),
        };
        let payload = ip_len.saturating_sub(h.header_len).saturating_sub(data_off);
        let (rst_seq, rst_ack, rst_flags) = if flags & 0x10 != 0 {
            (ack, 0, 0x04)
        } else {
            let syn_fin = u32::from(flags & 0x02 != 0) + u32::from(flags & 0x01 != 0);
            (
                0,
                seq.wrapping_add(payload as u32).wrapping_add(syn_fin),
                0x14,
            )
        };
        let hl = write_ip_header(out, h.dst, h.src, PROTO_TCP, 20);
        let tcp = &mut out[hl..hl + 20];
        tcp.fill(0);
        tcp[0..2].copy_from_slice(&t[2..4]);
        tcp[2..4].copy_from_slice(&t[0..2]);
        tcp[4..8].copy_from_slice(&rst_seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&rst_ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = rst_flags;
        let c = fold(sum16(pseudo_sum(h.dst, h.src, PROTO_TCP, 20), tcp));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        return Some(hl + 20);
    }
    icmp_error_reply(pkt, &h, IcmpError::Prohibited, out)
}

/// Which ICMP error to send back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IcmpError {
    /// Destination unreachable, communication administratively prohibited.
    Prohibited,
    /// Fragmentation needed (IPv4) or packet too big (IPv6): the path carries at most `mtu`.
    TooBig { mtu: u16 },
}

/// Builds the answer to a packet too large for the way it must take: ICMP "fragmentation
/// needed" (IPv4, only when the packet forbids fragmenting) or ICMPv6 "packet too big", from
/// the packet's destination, announcing `mtu`. The sender's stack then sends smaller packets
/// to that destination. Returns the length, or `None` when no answer is due (an ICMP error, a
/// later fragment, an IPv4 packet that allows fragmenting, or unparsable). `out` should hold
/// at least 1280 bytes.
pub fn too_big_reply(pkt: &[u8], mtu: u16, out: &mut [u8]) -> Option<usize> {
    classify(pkt).ok()?;
    let h = ip_header(pkt).ok()?;
    if h.later_fragment || (h.src.is_ipv4() && pkt[6] & 0x40 == 0) {
        return None;
    }
    icmp_error_reply(pkt, &h, IcmpError::TooBig { mtu }, out)
}

/// True for an IPv4 packet whose sender allows routers to fragment it (DF clear).
pub fn may_fragment(pkt: &[u8]) -> bool {
    pkt.first().is_some_and(|b| b >> 4 == 4) && pkt.get(6).is_some_and(|f| f & 0x40 == 0)
}

fn icmp_error_reply(pkt: &[u8], h: &IpHeader, kind: IcmpError, out: &mut [u8]) -> Option<usize> {
    let t = &pkt[h.header_len..];
    if (h.proto == PROTO_ICMP || h.proto == PROTO_ICMPV6)
        && (t.is_empty() || is_icmp_error(h.proto, t[0]))
    {
        return None; // never answer an ICMP error with an ICMP error
    }
    let v4 = h.src.is_ipv4();
    let (icmp_proto, ty, code, quote_max) = match (v4, kind) {
        (true, IcmpError::Prohibited) => (PROTO_ICMP, 3u8, 13u8, h.header_len + 8),
        (true, IcmpError::TooBig { .. }) => (PROTO_ICMP, 3, 4, h.header_len + 8),
        (false, IcmpError::Prohibited) => (PROTO_ICMPV6, 1, 1, 1280 - 48),
        (false, IcmpError::TooBig { .. }) => (PROTO_ICMPV6, 2, 0, 1280 - 48),
    };
    let hl_len = if v4 { 20 } else { 40 };
    let quote = pkt
        .len()
        .min(quote_max)
        .min(out.len().saturating_sub(hl_len + 8));
    let icmp_len = 8 + quote;
    let hl = write_ip_header(out, h.dst, h.src, icmp_proto, icmp_len);
    let icmp = &mut out[hl..hl + icmp_len];
    icmp[..8].fill(0);
    icmp[0] = ty;
    icmp[1] = code;
    if let IcmpError::TooBig { mtu } = kind {
        if v4 {
            icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
        } else {
            icmp[4..8].copy_from_slice(&u32::from(mtu).to_be_bytes());
        }
    }
    icmp[8..].copy_from_slice(&pkt[..quote]);
    let start = if icmp_proto == PROTO_ICMPV6 {
        pseudo_sum(h.dst, h.src, PROTO_ICMPV6, icmp_len)
    } else {
        0
    };
    let c = fold(sum16(start, icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Some(hl + icmp_len)
}

/// Lowers the MSS option of a TCP SYN (or SYN-ACK) to at most `mss`, fixing the checksum in
/// place (RFC 1624). True when the packet changed. Anything that is not a readable SYN is left
/// alone.
pub fn clamp_mss(pkt: &mut [u8], mss: u16) -> bool {
    let Ok(h) = ip_header(pkt) else {
        return false;
    };
    if h.proto != PROTO_TCP || h.later_fragment {
        return false;
    }
    let t = h.header_len;
    if pkt.len() < t + 20 || pkt[t + 13] & TCP_SYN == 0 {
        return false;
    }
    let data_off = usize::from(pkt[t + 12] >> 4) * 4;
    if data_off < 20 || pkt.len() < t + data_off {
        return false;
    }
    let mut i = t + 20;
    let end = t + data_off;
    while i < end {
        match pkt[i] {
            0 => return false,
            1 => i += 1,
            kind => {
                let Some(&len) = pkt.get(i + 1) else {
                    return false;
                };
                let len = usize::from(len);
                if len < 2 || i + len > end {
                    return false;
                }
                if kind == 2 && len == 4 {
                    let old = be16(pkt, i + 2);
                    if old <= mss {
                        return false;
                    }
                    pkt[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
                    // HC' = ~(~HC + ~m + m')
                    let hc = be16(pkt, t + 16);
                    let sum = u32::from(!hc) + u32::from(!old) + u32::from(mss);
                    let c = fold(sum);
                    pkt[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

#[cfg(test)]
pub(crate) mod testpkt {
    //! Builders for well-formed test packets.
    use super::*;

    pub fn tcp4(
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        flags: u8,
        seq: u32,
    ) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        write_ip_header(
            &mut p,
            Ipv4Addr::from(src).into(),
            Ipv4Addr::from(dst).into(),
            PROTO_TCP,
            20,
        );
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        p
    }

    pub fn udp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 28 + payload.len()];
        write_ip_header(
            &mut p,
            Ipv4Addr::from(src).into(),
            Ipv4Addr::from(dst).into(),
            PROTO_UDP,
            8 + payload.len(),
        );
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        p
    }

    pub fn echo4(src: [u8; 4], dst: [u8; 4], id: u16, request: bool) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        write_ip_header(
            &mut p,
            Ipv4Addr::from(src).into(),
            Ipv4Addr::from(dst).into(),
            PROTO_ICMP,
            8,
        );
        p[20] = if request { 8 } else { 0 };
        p[24..26].copy_from_slice(&id.to_be_bytes());
        p
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tcp_flags_are_read_from_tcp_segments_only() {
        let syn = testpkt::tcp4([10, 0, 0, 1], 1000, [10, 0, 0, 2], 80, TCP_SYN, 1);
        assert_eq!(tcp_flags(&syn), Some(TCP_SYN));
        let fin = testpkt::tcp4([10, 0, 0, 1], 1000, [10, 0, 0, 2], 80, TCP_FIN | 0x10, 1);
        assert_eq!(tcp_flags(&fin).map(|f| f & TCP_FIN), Some(TCP_FIN));
        let udp = testpkt::udp4([10, 0, 0, 1], 1000, [10, 0, 0, 2], 53, b"x");
        assert_eq!(tcp_flags(&udp), None);
        assert_eq!(tcp_flags(&syn[..25]), None);
    }

    use super::testpkt::*;
    use super::*;
    use proptest::prelude::*;

    fn checksum_ok(data: &[u8]) -> bool {
        fold(sum16(0, data)) == 0
    }

    /// A TCP SYN with an MSS option and a correct checksum.
    fn syn_with_mss(mss: u16) -> Vec<u8> {
        let mut p = vec![0u8; 44];
        let (src, dst) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        write_ip_header(&mut p, src, dst, PROTO_TCP, 24);
        p[20..22].copy_from_slice(&1000u16.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        p[32] = 6 << 4;
        p[33] = TCP_SYN;
        p[40] = 2;
        p[41] = 4;
        p[42..44].copy_from_slice(&mss.to_be_bytes());
        let c = fold(sum16(pseudo_sum(src, dst, PROTO_TCP, 24), &p[20..]));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn tcp_checksum_ok(p: &[u8]) -> bool {
        let (src, dst) = addresses(p).unwrap();
        fold(sum16(
            pseudo_sum(src, dst, PROTO_TCP, p.len() - 20),
            &p[20..],
        )) == 0
    }

    #[test]
    fn mss_is_clamped_with_a_valid_checksum_and_only_downwards() {
        let mut p = syn_with_mss(1460);
        assert!(tcp_checksum_ok(&p));
        assert!(clamp_mss(&mut p, 1320));
        assert_eq!(be16(&p, 42), 1320);
        assert!(tcp_checksum_ok(&p));
        assert!(!clamp_mss(&mut p, 1400), "never raised");
        let mut ack = tcp4([10, 0, 0, 1], 1, [10, 0, 0, 2], 2, 0x10, 0);
        let before = ack.clone();
        assert!(!clamp_mss(&mut ack, 100));
        assert_eq!(ack, before);
        // Broken option lengths are left alone.
        let mut p = syn_with_mss(1460);
        p[41] = 9;
        assert!(!clamp_mss(&mut p, 1000));
    }

    #[test]
    fn too_big_replies_announce_the_mtu_and_quote_the_packet() {
        let mut out = [0u8; 1500];
        let mut big = tcp4([100, 118, 0, 2], 1000, [10, 20, 0, 10], 80, 0x10, 5);
        big[6] |= 0x40; // don't fragment
        let n = too_big_reply(&big, 1360, &mut out).unwrap();
        let r = out[..n].to_vec();
        let r = &r[..];
        assert_eq!(
            addresses(r).unwrap(),
            addresses(&big).map(|(a, b)| (b, a)).unwrap()
        );
        assert_eq!((r[20], r[21]), (3, 4));
        assert_eq!(be16(r, 26), 1360);
        assert!(checksum_ok(&r[20..]));
        let Ok(PacketKind::IcmpError { about, .. }) = classify(r) else {
            panic!("not an ICMP error");
        };
        assert_eq!(about.dport, 80);
        // Fragmenting allowed: no answer (the packet is dropped and counted instead).
        let mut frag_ok = big.clone();
        frag_ok[6] &= !0x40;
        assert!(may_fragment(&frag_ok));
        assert_eq!(too_big_reply(&frag_ok, 1360, &mut out), None);
        // Never about an ICMP error.
        assert_eq!(
            too_big_reply(r.to_vec().as_slice(), 1000, &mut [0u8; 1500]),
            None
        );
    }

    #[test]
    fn echo_round_trip_v4_and_v6() {
        let mut out = [0u8; 200];
        for (a, b) in [
            (
                IpAddr::from([100, 118, 0, 2]),
                IpAddr::from([100, 118, 0, 1]),
            ),
            ("fd00::2".parse().unwrap(), "fd00::1".parse().unwrap()),
        ] {
            let n = build_echo(a, b, true, 7, 65535, b"probe", &mut out).unwrap();
            let e = echo(&out[..n]).unwrap();
            assert_eq!(
                (e.request, e.src, e.dst, e.id, e.seq),
                (true, a, b, 7, 65535)
            );
            assert_eq!(e.payload, b"probe");
            let hl = if a.is_ipv4() { 20 } else { 40 };
            let sum = if a.is_ipv4() {
                fold(sum16(0, &out[hl..n]))
            } else {
                fold(sum16(pseudo_sum(a, b, PROTO_ICMPV6, n - hl), &out[hl..n]))
            };
            assert_eq!(sum, 0, "checksum");
            let PacketKind::Flow(k) = classify(&out[..n]).unwrap() else {
                panic!()
            };
            assert!(k.is_icmp());
        }
        // A TCP packet is no echo; a truncated one neither.
        assert!(echo(&tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2, 0x02, 0)).is_none());
        let n = build_echo(
            IpAddr::from([1, 1, 1, 1]),
            IpAddr::from([2, 2, 2, 2]),
            false,
            1,
            2,
            b"",
            &mut out,
        )
        .unwrap();
        assert!(!echo(&out[..n]).unwrap().request);
        assert!(echo(&out[..n - 1]).is_none());
    }

    #[test]
    fn tcp_key_and_reverse() {
        let p = tcp4([100, 118, 0, 2], 40000, [10, 20, 0, 10], 80, 0x02, 7);
        let PacketKind::Flow(k) = classify(&p).unwrap() else {
            panic!()
        };
        assert_eq!((k.proto, k.sport, k.dport), (PROTO_TCP, 40000, 80));
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.reversed().src, k.dst);
    }

    #[test]
    fn echo_request_and_reply_share_a_flow() {
        let req = echo4([100, 118, 0, 2], [10, 20, 0, 10], 99, true);
        let rep = echo4([10, 20, 0, 10], [100, 118, 0, 2], 99, false);
        let (PacketKind::Flow(a), PacketKind::Flow(b)) =
            (classify(&req).unwrap(), classify(&rep).unwrap())
        else {
            panic!()
        };
        assert_eq!(a, b.reversed());
    }

    #[test]
    fn rst_for_syn_acks_the_syn() {
        let syn = tcp4([100, 118, 0, 2], 40000, [10, 20, 0, 10], 5432, 0x02, 1000);
        let mut out = [0u8; 1500];
        let n = deny_reply(&syn, &mut out).unwrap();
        let r = &out[..n];
        assert_eq!(n, 40);
        assert!(checksum_ok(&r[..20]));
        let PacketKind::Flow(k) = classify(r).unwrap() else {
            panic!()
        };
        assert_eq!(
            (k.src, k.sport, k.dport),
            (IpAddr::from([10, 20, 0, 10]), 5432, 40000)
        );
        assert_eq!(r[33], 0x14, "RST+ACK");
        assert_eq!(u32::from_be_bytes([r[28], r[29], r[30], r[31]]), 1001);
        // TCP checksum including the pseudo header verifies to zero.
        let s = sum16(pseudo_sum(k.src, k.dst, PROTO_TCP, 20), &r[20..]);
        assert_eq!(fold(s), 0);
        // An RST is never answered.
        assert_eq!(deny_reply(r, &mut [0u8; 1500]), None);
    }

    #[test]
    fn udp_gets_admin_prohibited_that_quotes_it() {
        let p = udp4([100, 118, 0, 2], 5000, [10, 20, 0, 10], 53, b"hello world");
        let mut out = [0u8; 1500];
        let n = deny_reply(&p, &mut out).unwrap();
        let r = &out[..n];
        assert!(checksum_ok(&r[..20]));
        assert!(checksum_ok(&r[20..]));
        assert_eq!((r[20], r[21]), (3, 13));
        match classify(r).unwrap() {
            PacketKind::IcmpError { about, .. } => {
                assert_eq!((about.sport, about.dport), (5000, 53));
            }
            other => panic!("{other:?}"),
        }
        // ICMP errors are not answered.
        assert_eq!(deny_reply(r, &mut [0u8; 1500]), None);
    }

    #[test]
    fn udp_build_and_payload_round_trip() {
        let mut out = [0u8; 200];
        let src = IpAddr::from([100, 118, 0, 1]);
        let dst = IpAddr::from([100, 118, 0, 2]);
        let n = build_udp(src, 7443, dst, 40000, b"token-reply", &mut out).unwrap();
        let p = &out[..n];
        assert!(checksum_ok(&p[..20]));
        assert_eq!(
            fold(sum16(pseudo_sum(src, dst, PROTO_UDP, n - 20), &p[20..])),
            0
        );
        assert_eq!(udp_payload(p), Some(&b"token-reply"[..]));
        let PacketKind::Flow(k) = classify(p).unwrap() else {
            panic!()
        };
        assert_eq!((k.sport, k.dport), (7443, 40000));
        assert!(build_udp(src, 1, dst, 2, &[0u8; 300], &mut out).is_none());
        assert_eq!(
            udp_payload(&echo4([1, 1, 1, 1], [2, 2, 2, 2], 1, true)),
            None
        );
    }

    #[test]
    fn truncated_icmp_gets_no_reply() {
        // Found by the packet fuzz target: ICMP with a 5-byte header behind IP options.
        let pkt = [
            0x48, 0x16, 0x16, 0x16, 0x16, 0x16, 0x20, 0x00, 0x01, 0x01, 0xe9, 0x00, 0x5f, 0x29,
            0x29, 0x29, 0x16, 0x16, 0x16, 0x5d, 0x16, 0x16, 0x16, 0x48, 0x16, 0x16, 0x30, 0x16,
            0x16, 0x16, 0x16, 0x30, 0x16, 0x16, 0x16, 0x03, 0x16,
        ];
        assert!(classify(&pkt).is_err());
        assert_eq!(deny_reply(&pkt, &mut [0u8; 1500]), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(classify(&[]).is_err());
        assert!(classify(&[0x45]).is_err());
        assert!(classify(&[0x4f; 20]).is_err());
        assert!(classify(&[0x70; 60]).is_err());
    }

    proptest! {
        #[test]
        fn classify_and_reply_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200), v6 in any::<bool>()) {
            let mut data = data;
            if let Some(b) = data.first_mut() { *b = (*b & 0x0f) | if v6 { 0x60 } else { 0x40 }; }
            let _ = classify(&data);
            let _ = addresses(&data);
            let mut out = [0u8; 1500];
            if let Some(n) = deny_reply(&data, &mut out) {
                prop_assert!(n <= out.len());
                prop_assert!(classify(&out[..n]).is_ok(), "a reply is a well-formed packet");
            }
        }
    }
}
