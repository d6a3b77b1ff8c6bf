//! DNS decisions, without I/O: what the client's stub does with a query (answer it, block it,
//! send it to the broker or resolve it upstream), how answers are built and sized, how the
//! broker answers names of applications, and the per-device table of synthetic addresses.
//!
//! Wire format: hickory-proto. Nothing a query contains can make these functions panic: a
//! message that does not parse gets FORMERR (or is dropped when it has no header to answer).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::Ipv4Net;
use serde::Serialize;

use crate::dnsfilter::{Filter, Verdict};

pub const DNS_PORT: u16 = 53;

/// Classic DNS-over-UDP size limit for a query without EDNS.
pub const UDP_MIN: usize = 512;
/// Largest UDP answer the stub sends, whatever a client's EDNS says (the DNS flag day value:
/// fits every path without fragmentation).
pub const UDP_MAX: usize = 1232;
/// TTL of synthetic and blocked answers.
pub const LOCAL_TTL: u32 = 60;

/// Default range of synthetic application addresses: next to the device range (100.118/16),
/// inside 100.64/10 and outside the ranges other overlays use.
pub const DEFAULT_APP_RANGE: &str = "100.119.0.0/16";

/// How a blocked name is answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum BlockAnswer {
    /// The name does not exist.
    NxDomain,
    /// 0.0.0.0 for A, :: for AAAA.
    Null,
    /// These addresses (a block page): A gets the IPv4 ones, AAAA the IPv6 ones.
    Addresses(Vec<IpAddr>),
}

impl FromStr for BlockAnswer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "nxdomain" => Ok(BlockAnswer::NxDomain),
            "null" | "0.0.0.0" => Ok(BlockAnswer::Null),
            other => other
                .split(',')
                .map(|a| a.trim().parse::<IpAddr>())
                .collect::<Result<Vec<_>, _>>()
                .ok()
                .filter(|v| !v.is_empty())
                .map(BlockAnswer::Addresses)
                .ok_or_else(|| {
                    format!(
                        "{s:?} is not a block answer: \"nxdomain\", \"null\" (0.0.0.0 and ::) or \
                         block-page addresses like \"10.0.0.80\" or \"10.0.0.80,fd00::80\""
                    )
                }),
        }
    }
}

impl From<BlockAnswer> for String {
    fn from(b: BlockAnswer) -> String {
        b.to_string()
    }
}

impl std::fmt::Display for BlockAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockAnswer::NxDomain => f.write_str("nxdomain"),
            BlockAnswer::Null => f.write_str("null"),
            BlockAnswer::Addresses(a) => {
                let s: Vec<String> = a.iter().map(ToString::to_string).collect();
                f.write_str(&s.join(","))
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for BlockAnswer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A query the stub accepted for handling.
#[derive(Debug, Clone)]
pub struct Request {
    pub message: Message,
    pub query: Query,
    /// The question's name: lower case, no trailing dot.
    pub name: String,
    /// Largest answer the asker takes over this transport.
    pub limit: usize,
}

/// What the stub does with a query.
#[derive(Debug)]
pub enum Plan {
    /// Send this answer back.
    Reply(Vec<u8>),
    /// A name in a private zone: relay the query to the broker, which answers for applications.
    Private(Box<Request>),
    /// Resolve upstream and answer with [`answer`].
    Upstream(Box<Request>),
    /// Not worth an answer (no header to answer to, or a response sent to us).
    Drop,
}

/// A blocked query, for the DNS log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockEvent {
    pub name: String,
    pub qtype: String,
    pub list: String,
    pub category: String,
    pub entry: String,
    pub answer: String,
}

/// Largest answer for a query that came over UDP (`udp`) or TCP.
fn answer_limit(message: &Message, udp: bool) -> usize {
    if !udp {
        return usize::from(u16::MAX);
    }
    match &message.edns {
        Some(e) => usize::from(e.max_payload()).clamp(UDP_MIN, UDP_MAX),
        None => UDP_MIN,
    }
}

/// Header-only error answer to a query that may not parse: the ID and opcode come from the first
/// bytes. None when there is not even a header.
fn error_for_bytes(bytes: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    if bytes.len() < 12 {
        return None;
    }
    // QR set means this is a response: never answer one (no loops, no reflection).
    if bytes[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    let op = OpCode::from_u8((bytes[2] >> 3) & 0x0f);
    let mut m = Message::error_msg(id, op, code);
    m.metadata.recursion_desired = bytes[2] & 0x01 != 0;
    m.metadata.recursion_available = true;
    m.to_vec().ok()
}

/// Error answer to a query that parsed: its ID, opcode and flags, its question section as it
/// came (RFC 1035 4.1.1 lets a server echo it; resolvers match answers on it), and an OPT
/// record of version 0 when the query had one (RFC 6891 7).
fn error_for_message(message: &Message, code: ResponseCode) -> Plan {
    let mut m = Message::error_msg(message.metadata.id, message.metadata.op_code, code);
    m.metadata.recursion_desired = message.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(message.queries.iter().cloned());
    if message.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_MAX as u16);
        m.set_edns(edns);
    }
    match m.to_vec() {
        Ok(b) if b.len() <= UDP_MIN => Plan::Reply(b),
        // Too long to echo within the smallest UDP answer: header only.
        _ => {
            let mut m = Message::error_msg(message.metadata.id, message.metadata.op_code, code);
            m.metadata.recursion_desired = message.metadata.recursion_desired;
            m.metadata.recursion_available = true;
            m.to_vec().map_or(Plan::Drop, Plan::Reply)
        }
    }
}

/// Parses and checks a query. Err carries the plan for a bad one (FORMERR, NOTIMP, BADVERS,
/// REFUSED or drop).
pub fn parse(bytes: &[u8], udp: bool) -> Result<Request, Plan> {
    let message = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => {
            return Err(
                error_for_bytes(bytes, ResponseCode::FormErr).map_or(Plan::Drop, Plan::Reply)
            );
        }
    };
    let reply = |code| Err(error_for_message(&message, code));
    if message.metadata.message_type != MessageType::Query {
        return Err(Plan::Drop);
    }
    if message.metadata.op_code != OpCode::Query {
        return reply(ResponseCode::NotImp);
    }
    if message.queries.len() != 1 || !message.answers.is_empty() {
        return reply(ResponseCode::FormErr);
    }
    // EDNS versions above 0 are not spoken here: BADVERS, so the asker falls back (RFC 6891 6.1.3).
    if message.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return reply(ResponseCode::BADVERS);
    }
    let query = message.queries[0].clone();
    if query.query_class() != DNSClass::IN {
        return reply(ResponseCode::NotImp);
    }
    if matches!(
        query.query_type(),
        RecordType::AXFR | RecordType::IXFR | RecordType::ANY
    ) {
        return reply(ResponseCode::NotImp);
    }
    // A dot inside a label would read as a label boundary in the text form that zones, lists
    // and application names are matched on ("x.fine" under "bad.example" would pass for
    // "x.fine.bad.example"): no host name has one, so such questions are refused.
    if query.name().iter().any(|label| label.contains(&b'.')) {
        return reply(ResponseCode::Refused);
    }
    let mut name = query.name().to_ascii();
    if name.ends_with('.') {
        name.pop();
    }
    name.make_ascii_lowercase();
    let limit = answer_limit(&message, udp);
    Ok(Request {
        message,
        query,
        name,
        limit,
    })
}

/// True when `name` is `zone` or below it (both lower case, without trailing dots).
pub fn in_zone(name: &str, zone: &str) -> bool {
    name == zone
        || (name.len() > zone.len()
            && name.ends_with(zone)
            && name.as_bytes()[name.len() - zone.len() - 1] == b'.')
}

/// The stub's decision for one query: private zones go to the broker (the DNS filter does not
/// apply to the company's own applications), blocked names get `block` at once, the rest is
/// resolved upstream.
pub fn plan(
    bytes: &[u8],
    udp: bool,
    private_zones: &[String],
    filter: &Filter,
    block: &BlockAnswer,
) -> (Plan, Option<BlockEvent>) {
    let req = match parse(bytes, udp) {
        Ok(r) => r,
        Err(p) => return (p, None),
    };
    if private_zones.iter().any(|z| in_zone(&req.name, z)) {
        return (Plan::Private(Box::new(req)), None);
    }
    match filter_query(&req, filter, block) {
        Some((answer, event)) => (Plan::Reply(answer), Some(event)),
        None => (Plan::Upstream(Box::new(req)), None),
    }
}

/// The DNS filter's decision for `req`: the block answer and its log event, or None when the
/// name may be resolved (not listed, or allowlisted).
pub fn filter_query(
    req: &Request,
    filter: &Filter,
    block: &BlockAnswer,
) -> Option<(Vec<u8>, BlockEvent)> {
    let Verdict::Blocked {
        list,
        category,
        entry,
    } = filter.check(&req.name)
    else {
        return None;
    };
    let event = BlockEvent {
        name: req.name.clone(),
        qtype: req.query.query_type().to_string(),
        list: list.to_string(),
        category: category.to_string(),
        entry,
        answer: block.to_string(),
    };
    Some((blocked_answer(req, block), event))
}

/// A response to `req` with these sections, cut to the asker's size limit (truncated answers
/// carry TC so the asker retries over TCP).
pub fn answer(
    req: &Request,
    code: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
) -> Vec<u8> {
    let mut m = Message::response(req.message.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = req.message.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = code;
    m.add_query(req.query.clone());
    // Records for the question's own name carry its letter case, as the asker wrote it
    // (upstream resolvers and our own tables may have it in lower case; 0x20 randomisation
    // compares it).
    let asked = req.query.name();
    m.add_answers(answers.into_iter().map(|mut r| {
        if r.name.eq_case(asked) || r.name != *asked {
            return r;
        }
        r.name = asked.clone();
        r
    }));
    m.add_authorities(authorities);
    if let Some(e) = &req.message.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_MAX as u16);
        edns.set_dnssec_ok(e.flags().dnssec_ok);
        m.set_edns(edns);
    }
    let bytes = m.to_vec().unwrap_or_default();
    if bytes.len() <= req.limit && !bytes.is_empty() {
        return bytes;
    }
    let mut t = m.truncate();
    t.metadata.truncation = true;
    t.to_vec().unwrap_or_default()
}

/// SERVFAIL for `req` (upstream unreachable, broker silent).
pub fn servfail(req: &Request) -> Vec<u8> {
    answer(req, ResponseCode::ServFail, Vec::new(), Vec::new())
}

/// Address records for `name` of the query's type (A gets IPv4, AAAA IPv6; other types none).
fn address_records(req: &Request, addrs: &[IpAddr], ttl: u32) -> Vec<Record> {
    let qtype = req.query.query_type();
    addrs
        .iter()
        .filter_map(|a| match (a, qtype) {
            (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
            (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
            _ => None,
        })
        .map(|rdata| Record::from_rdata(req.query.name().clone(), ttl, rdata))
        .collect()
}

/// The answer for a blocked name.
pub fn blocked_answer(req: &Request, block: &BlockAnswer) -> Vec<u8> {
    match block {
        BlockAnswer::NxDomain => answer(req, ResponseCode::NXDomain, Vec::new(), Vec::new()),
        BlockAnswer::Null => {
            let null = [
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ];
            answer(
                req,
                ResponseCode::NoError,
                address_records(req, &null, LOCAL_TTL),
                Vec::new(),
            )
        }
        BlockAnswer::Addresses(a) => answer(
            req,
            ResponseCode::NoError,
            address_records(req, a, LOCAL_TTL),
            Vec::new(),
        ),
    }
}

/// What the broker knows about a name asked in a private zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppName {
    /// An application this user may use, at these synthetic addresses.
    Entitled(Vec<IpAddr>),
    /// An application, but not this user's: answered NXDOMAIN, like a name that does not exist,
    /// so the catalogue does not leak.
    NotEntitled,
    /// Not an application: REFUSED, and the client resolves it upstream.
    NotApp,
}

/// The broker's answer to a query for an application name (the in-tunnel DNS service).
/// `lookup` decides the name (lower case, no trailing dot).
pub fn app_answer(bytes: &[u8], lookup: impl FnOnce(&str) -> AppName) -> Option<Vec<u8>> {
    let req = match parse(bytes, true) {
        Ok(r) => r,
        Err(Plan::Reply(b)) => return Some(b),
        Err(_) => return None,
    };
    Some(match lookup(&req.name) {
        AppName::Entitled(addrs) => answer(
            &req,
            ResponseCode::NoError,
            address_records(&req, &addrs, LOCAL_TTL),
            Vec::new(),
        ),
        AppName::NotEntitled => answer(&req, ResponseCode::NXDomain, Vec::new(), Vec::new()),
        AppName::NotApp => answer(&req, ResponseCode::Refused, Vec::new(), Vec::new()),
    })
}

/// The response code of a DNS message, if it parses as a response.
pub fn response_code(bytes: &[u8]) -> Option<ResponseCode> {
    let m = Message::from_vec(bytes).ok()?;
    (m.metadata.message_type == MessageType::Response).then_some(m.metadata.response_code)
}

/// One device's synthetic addresses: a name gets an address from the application range the
/// first time it is asked and keeps it for the session. Addresses are derived from a hash of
/// the name (probing on collision), so the same name usually gets the same address on every
/// broker and in every session.
#[derive(Debug, Clone)]
pub struct SyntheticMap {
    range: Ipv4Net,
    by_name: HashMap<String, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, Binding>,
    capacity: usize,
}

/// A synthetic address's name and the application it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub name: String,
    pub app: String,
}

impl SyntheticMap {
    /// `capacity` bounds the names one device can bind (a wildcard application would otherwise
    /// let a client use up the range).
    pub fn new(range: Ipv4Net, capacity: usize) -> Self {
        SyntheticMap {
            range,
            by_name: HashMap::new(),
            by_addr: HashMap::new(),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// The address of `name` (bound to `app`), assigning one if needed. None when the map is
    /// full or the range has no free address.
    pub fn assign(&mut self, name: &str, app: &str) -> Option<Ipv4Addr> {
        if let Some(&a) = self.by_name.get(name) {
            if let Some(b) = self.by_addr.get_mut(&a) {
                // The policy may have moved the name to another application.
                b.app = app.to_string();
            }
            return Some(a);
        }
        let size = 1u64 << (32 - u32::from(self.range.prefix_len()));
        // Usable hosts: not the network address, not the broadcast address.
        let hosts = size.saturating_sub(2);
        if hosts == 0 || self.by_addr.len() >= self.capacity || self.by_addr.len() as u64 >= hosts {
            return None;
        }
        let base = u32::from(self.range.network());
        let mut i = fnv1a(name.as_bytes()) % hosts;
        loop {
            let addr = Ipv4Addr::from(base + 1 + i as u32);
            if let std::collections::hash_map::Entry::Vacant(slot) = self.by_addr.entry(addr) {
                slot.insert(Binding {
                    name: name.to_string(),
                    app: app.to_string(),
                });
                self.by_name.insert(name.to_string(), addr);
                return Some(addr);
            }
            i = (i + 1) % hosts;
        }
    }

    pub fn lookup(&self, addr: IpAddr) -> Option<&Binding> {
        match addr {
            IpAddr::V4(a) => self.by_addr.get(&a),
            IpAddr::V6(_) => None,
        }
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        matches!(addr, IpAddr::V4(a) if self.range.contains(&a))
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// An application name pattern: an exact name or `*.zone` (any name below the zone).
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(zone) => name.len() > zone.len() && in_zone(name, zone),
        None => pattern == name,
    }
}

/// Checks and normalizes an application name pattern: lower case, no trailing dot, a valid
/// host name, optionally starting with `*.`.
pub fn normalize_pattern(text: &str) -> Result<String, String> {
    let t = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let host = t.strip_prefix("*.").unwrap_or(&t);
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.contains('.')
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(t)
    } else {
        Err(format!(
            "{text:?} is not a name pattern: a host name like \"wiki.corp.example\" or a \
             wildcard like \"*.corp.example\""
        ))
    }
}

/// The zone a pattern puts under the broker's DNS: the pattern's parent for an exact name
/// (`wiki.corp.example` → `corp.example`), the zone itself for a wildcard. Clients learn only
/// zones, not the application names in them.
pub fn private_zone(pattern: &str) -> String {
    match pattern.strip_prefix("*.") {
        Some(zone) => zone.to_string(),
        None => pattern
            .split_once('.')
            .map_or(pattern.to_string(), |(_, parent)| parent.to_string()),
    }
}

/// An upstream resolver of the stub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub transport: Transport,
    pub addr: std::net::SocketAddr,
    /// TLS server name (DoT, DoH).
    pub server_name: Option<String>,
    /// DoH path.
    pub path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP, with TCP when an answer is truncated.
    Udp,
    Tcp,
    Tls,
    Https,
}

impl Upstream {
    /// `IP`, `udp://IP[:PORT]`, `tcp://IP[:PORT]`, `tls://IP[:PORT]#NAME`,
    /// `https://IP[:PORT][/PATH]#NAME` (IPv6 in brackets).
    pub fn parse(text: &str) -> Result<Upstream, String> {
        let bad = || {
            format!(
                "{text:?} is not an upstream: \"udp://10.0.0.53\", \"tcp://10.0.0.53\", \
                 \"tls://9.9.9.9#dns.quad9.net\" or \"https://1.1.1.1/dns-query#cloudflare-dns.com\""
            )
        };
        let t = text.trim();
        let (scheme, rest) = t.split_once("://").unwrap_or(("udp", t));
        let (transport, port) = match scheme {
            "udp" => (Transport::Udp, 53),
            "tcp" => (Transport::Tcp, 53),
            "tls" => (Transport::Tls, 853),
            "https" => (Transport::Https, 443),
            _ => return Err(bad()),
        };
        let (rest, server_name) = match rest.split_once('#') {
            Some((r, n)) if !n.is_empty() => (r, Some(n.to_string())),
            Some(_) => return Err(bad()),
            None => (rest, None),
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(rest[i..].to_string())),
            None => (rest, None),
        };
        let addr = hostport
            .parse::<std::net::SocketAddr>()
            .or_else(|_| {
                hostport
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .map(|ip| std::net::SocketAddr::new(ip, port))
            })
            .map_err(|_| bad())?;
        let needs_name = matches!(transport, Transport::Tls | Transport::Https);
        if needs_name != server_name.is_some() || (path.is_some() && transport != Transport::Https)
        {
            return Err(bad());
        }
        Ok(Upstream {
            transport,
            addr,
            server_name,
            path,
        })
    }
}

/// Builds a query (for tests, the benchmark and health checks).
pub fn build_query(id: u16, name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    if let Ok(n) = Name::from_ascii(name) {
        m.add_query(Query::query(n, qtype));
    }
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(UDP_MAX as u16);
        m.set_edns(e);
    }
    m.to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dnsfilter::{FilterBuilder, ListFormat};
    use proptest::prelude::*;

    fn filter() -> Filter {
        let mut b = FilterBuilder::new();
        b.add_list(
            "demo",
            "malware",
            ListFormat::Domains,
            "bad.example\nblocked.example\n",
        );
        b.allow("fine.bad.example");
        b.build()
    }

    fn zones() -> Vec<String> {
        vec!["corp.example".to_string()]
    }

    fn decode(bytes: &[u8]) -> Message {
        Message::from_vec(bytes).expect("answer parses")
    }

    #[test]
    fn blocked_names_get_the_configured_answer_and_an_event() {
        let f = filter();
        let q = build_query(7, "www.Blocked.example.", RecordType::A, false);
        let (p, ev) = plan(&q, true, &zones(), &f, &BlockAnswer::NxDomain);
        let Plan::Reply(b) = p else { panic!("{p:?}") };
        let m = decode(&b);
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let ev = ev.expect("event");
        assert_eq!(ev.list, "demo");
        assert_eq!(ev.entry, "blocked.example");
        assert_eq!(ev.name, "www.blocked.example");

        let (p, _) = plan(&q, true, &zones(), &f, &BlockAnswer::Null);
        let Plan::Reply(b) = p else { panic!() };
        let m = decode(&b);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].data, RData::A(A(Ipv4Addr::UNSPECIFIED)));

        let page: BlockAnswer = "10.9.9.9,fd00::9".parse().unwrap();
        let q6 = build_query(8, "bad.example", RecordType::AAAA, true);
        let (p, _) = plan(&q6, true, &zones(), &f, &page);
        let Plan::Reply(b) = p else { panic!() };
        let m = decode(&b);
        assert_eq!(
            m.answers[0].data,
            RData::AAAA(AAAA("fd00::9".parse().unwrap()))
        );
    }

    #[test]
    fn allowlisted_public_and_private_names_are_routed() {
        let f = filter();
        let block = BlockAnswer::NxDomain;
        for (name, want) in [
            ("fine.bad.example", "upstream"),
            ("example.org", "upstream"),
            ("example", "upstream"),
            ("wiki.corp.example", "private"),
            ("corp.example", "private"),
            ("notcorp.example", "upstream"),
        ] {
            let q = build_query(1, name, RecordType::A, false);
            let got = match plan(&q, true, &zones(), &f, &block).0 {
                Plan::Private(_) => "private",
                Plan::Upstream(_) => "upstream",
                other => panic!("{name}: {other:?}"),
            };
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn bad_queries_get_formerr_notimp_or_nothing() {
        let f = filter();
        let b = BlockAnswer::NxDomain;
        // Too short for a header: dropped.
        assert!(matches!(plan(&[1, 2, 3], true, &[], &f, &b).0, Plan::Drop));
        // A header claiming a question that is not there: FORMERR with the same ID.
        let mut q = build_query(0x4242, "example.org", RecordType::A, false);
        q.truncate(14);
        let Plan::Reply(r) = plan(&q, true, &[], &f, &b).0 else {
            panic!()
        };
        let m = decode(&r);
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // A response sent to the stub: dropped.
        let mut resp = build_query(1, "example.org", RecordType::A, false);
        resp[2] |= 0x80;
        assert!(matches!(plan(&resp, true, &[], &f, &b).0, Plan::Drop));
        // Zone transfer: NOTIMP.
        let axfr = build_query(2, "example.org", RecordType::AXFR, false);
        let Plan::Reply(r) = plan(&axfr, false, &[], &f, &b).0 else {
            panic!()
        };
        assert_eq!(decode(&r).metadata.response_code, ResponseCode::NotImp);
    }

    /// A query with an EDNS OPT record of `version`.
    fn query_with_edns_version(id: u16, name: &str, version: u8) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e.set_version(version);
        m.set_edns(e);
        m.to_vec().unwrap()
    }

    #[test]
    fn an_unknown_edns_version_gets_badvers_with_an_opt_of_version_zero() {
        let q = query_with_edns_version(0x77, "example.org", 1);
        let Plan::Reply(r) = plan(&q, true, &[], &filter(), &BlockAnswer::NxDomain).0 else {
            panic!("EDNS version 1 must get an answer")
        };
        let m = decode(&r);
        assert_eq!(m.metadata.id, 0x77);
        // Code 16 decodes as BADSIG in hickory (BADVERS and BADSIG share it).
        assert_eq!(u16::from(m.metadata.response_code), 16, "BADVERS");
        let edns = m.edns.as_ref().expect("BADVERS travels in an OPT record");
        assert_eq!(edns.version(), 0, "we speak version 0");
        assert_eq!(m.queries.len(), 1, "the question is echoed");
        // The broker's application-name service answers the same way.
        let a = app_answer(&q, |_| AppName::NotApp).expect("answer");
        assert_eq!(u16::from(decode(&a).metadata.response_code), 16);
        // Version 0 is served as before.
        let q0 = query_with_edns_version(0x78, "example.org", 0);
        assert!(matches!(
            plan(&q0, true, &[], &filter(), &BlockAnswer::NxDomain).0,
            Plan::Upstream(_)
        ));
    }

    #[test]
    fn errors_echo_the_question_when_it_parses() {
        let f = filter();
        let b = BlockAnswer::NxDomain;
        for (q, code) in [
            (
                build_query(2, "Example.ORG", RecordType::AXFR, false),
                ResponseCode::NotImp,
            ),
            (
                build_query(3, "Example.ORG", RecordType::ANY, false),
                ResponseCode::NotImp,
            ),
        ] {
            let Plan::Reply(r) = plan(&q, false, &[], &f, &b).0 else {
                panic!()
            };
            let m = decode(&r);
            assert_eq!(m.metadata.response_code, code);
            assert_eq!(m.queries.len(), 1, "{code}: question echoed");
            assert_eq!(m.queries[0].name().to_ascii(), "Example.ORG.");
        }
        // A non-IN class: NOTIMP with the question.
        let mut m = Message::query();
        m.metadata.id = 4;
        let mut q = Query::query(Name::from_ascii("example.org").unwrap(), RecordType::A);
        q.set_query_class(DNSClass::CH);
        m.add_query(q);
        let Plan::Reply(r) = plan(&m.to_vec().unwrap(), true, &[], &f, &b).0 else {
            panic!()
        };
        let m = decode(&r);
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        assert_eq!(m.queries.len(), 1);
        // Two questions: FORMERR; both echoed as they parsed.
        let mut m = Message::query();
        m.metadata.id = 5;
        for n in ["a.example", "b.example"] {
            m.add_query(Query::query(Name::from_ascii(n).unwrap(), RecordType::A));
        }
        let Plan::Reply(r) = plan(&m.to_vec().unwrap(), true, &[], &f, &b).0 else {
            panic!()
        };
        let m = decode(&r);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(m.queries.len(), 2);
    }

    #[test]
    fn answers_keep_the_letter_case_of_the_question() {
        // Resolvers using 0x20 randomisation compare the echoed question byte for byte.
        let f = filter();
        let name = "wWw.BlOcKeD.eXaMpLe.";
        let q = build_query(7, name, RecordType::A, false);
        let (Plan::Reply(r), _) = plan(&q, true, &zones(), &f, &BlockAnswer::Null) else {
            panic!()
        };
        let m = decode(&r);
        assert_eq!(m.queries[0].name().to_ascii(), name);
        assert_eq!(m.answers[0].name.to_ascii(), name);
        let req = parse(&build_query(8, "ExAmPlE.oRg.", RecordType::A, false), true).unwrap();
        assert_eq!(req.name, "example.org", "matching is case-insensitive");
        let upstream = Record::from_rdata(
            Name::from_ascii("example.org.").unwrap(),
            60,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        );
        let m = decode(&answer(&req, ResponseCode::NoError, vec![upstream], vec![]));
        assert_eq!(m.queries[0].name().to_ascii(), "ExAmPlE.oRg.");
        assert_eq!(
            m.answers[0].name.to_ascii(),
            "ExAmPlE.oRg.",
            "an answer for the question's own name carries its case"
        );
        let q = build_query(9, "WiKi.Corp.Example.", RecordType::A, false);
        let a = app_answer(&q, |_| {
            AppName::Entitled(vec!["100.119.0.7".parse().unwrap()])
        })
        .unwrap();
        let m = decode(&a);
        assert_eq!(m.queries[0].name().to_ascii(), "WiKi.Corp.Example.");
        assert_eq!(m.answers[0].name.to_ascii(), "WiKi.Corp.Example.");
    }

    #[test]
    fn a_dot_inside_a_label_is_refused_not_matched_as_a_boundary() {
        // Labels ["x.fine", "bad", "example"]: not below the allowlisted fine.bad.example.
        let q = hex("12340100000100000000000006782e66696e6503626164076578616d706c650000010001");
        let f = filter();
        let Plan::Reply(r) = plan(&q, true, &zones(), &f, &BlockAnswer::NxDomain).0 else {
            panic!()
        };
        assert_eq!(response_code(&r), Some(ResponseCode::Refused));
        let (p, ev) = plan(
            &hex("1234010000010000000000000977696b692e636f7270076578616d706c650000010001"),
            true,
            &zones(),
            &f,
            &BlockAnswer::NxDomain,
        );
        assert!(matches!(p, Plan::Reply(_)) && ev.is_none());
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn large_answers_are_truncated_over_udp_only() {
        let q = build_query(9, "big.example", RecordType::A, false);
        let req = parse(&q, true).unwrap();
        let many: Vec<Record> = (0..100u8)
            .map(|i| {
                Record::from_rdata(
                    req.query.name().clone(),
                    60,
                    RData::A(A(Ipv4Addr::new(10, 0, 0, i))),
                )
            })
            .collect();
        let udp = decode(&answer(&req, ResponseCode::NoError, many.clone(), vec![]));
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        let tcp_req = parse(&q, false).unwrap();
        let tcp = decode(&answer(&tcp_req, ResponseCode::NoError, many, vec![]));
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 100);
    }

    #[test]
    fn app_answers_do_not_tell_foreign_apps_from_missing_names() {
        let q = build_query(3, "wiki.corp.example", RecordType::A, false);
        let a = app_answer(&q, |n| {
            assert_eq!(n, "wiki.corp.example");
            AppName::Entitled(vec!["100.119.0.7".parse().unwrap()])
        })
        .unwrap();
        let m = decode(&a);
        assert_eq!(
            m.answers[0].data,
            RData::A(A(Ipv4Addr::new(100, 119, 0, 7)))
        );
        let no = app_answer(&q, |_| AppName::NotEntitled).unwrap();
        assert_eq!(response_code(&no), Some(ResponseCode::NXDomain));
        let other = app_answer(&q, |_| AppName::NotApp).unwrap();
        assert_eq!(response_code(&other), Some(ResponseCode::Refused));
    }

    #[test]
    fn synthetic_addresses_are_stable_unique_and_bounded() {
        let range: Ipv4Net = "100.119.0.0/29".parse().unwrap();
        let mut m = SyntheticMap::new(range, 100);
        let mut seen = Vec::new();
        for i in 0..6 {
            let a = m.assign(&format!("n{i}.corp.example"), "app").unwrap();
            assert!(range.contains(&a) && a != range.network() && a != range.broadcast());
            assert!(!seen.contains(&a));
            seen.push(a);
        }
        // Six usable addresses in a /29: full now.
        assert_eq!(m.assign("n7.corp.example", "app"), None);
        assert_eq!(m.assign("n2.corp.example", "app"), Some(seen[2]));
        assert_eq!(
            m.lookup(IpAddr::V4(seen[2])).map(|b| b.name.as_str()),
            Some("n2.corp.example")
        );
        let mut small = SyntheticMap::new("100.119.0.0/16".parse().unwrap(), 2);
        assert!(small.assign("a.x", "a").is_some());
        assert!(small.assign("b.x", "a").is_some());
        assert_eq!(small.assign("c.x", "a"), None);
    }

    #[test]
    fn patterns_and_zones() {
        assert!(name_matches("*.corp.example", "git.corp.example"));
        assert!(name_matches("*.corp.example", "a.b.corp.example"));
        assert!(!name_matches("*.corp.example", "corp.example"));
        assert!(!name_matches("*.corp.example", "xcorp.example"));
        assert!(name_matches("wiki.corp.example", "wiki.corp.example"));
        assert_eq!(private_zone("wiki.corp.example"), "corp.example");
        assert_eq!(private_zone("*.dev.corp.example"), "dev.corp.example");
        assert_eq!(
            normalize_pattern("Wiki.Corp.Example.").unwrap(),
            "wiki.corp.example"
        );
        assert!(normalize_pattern("*.").is_err());
        assert!(normalize_pattern("wiki").is_err());
        assert!(normalize_pattern("a..b").is_err());
        assert!(normalize_pattern("a b.c").is_err());
    }

    #[test]
    fn upstreams_parse() {
        let u = Upstream::parse("10.0.0.53").unwrap();
        assert_eq!((u.transport, u.addr.port()), (Transport::Udp, 53));
        let u = Upstream::parse("tls://9.9.9.9#dns.quad9.net").unwrap();
        assert_eq!((u.transport, u.addr.port()), (Transport::Tls, 853));
        assert_eq!(u.server_name.as_deref(), Some("dns.quad9.net"));
        let u = Upstream::parse("https://[2001:db8::1]:8443/dns-query#doh.example").unwrap();
        assert_eq!(u.addr.port(), 8443);
        assert_eq!(u.path.as_deref(), Some("/dns-query"));
        for bad in [
            "tls://9.9.9.9",
            "ftp://1.2.3.4",
            "udp://name.example",
            "udp://1.2.3.4#x",
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_bytes_are_handled_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let f = filter();
            let (p, _) = plan(&bytes, true, &zones(), &f, &BlockAnswer::Null);
            if let Plan::Reply(r) = p {
                prop_assert!(r.len() <= UDP_MAX);
            }
            let _ = app_answer(&bytes, |_| AppName::NotApp);
        }

        #[test]
        fn mutated_queries_are_handled_without_panic(pos in 0usize..40, val in any::<u8>(), cut in 12usize..60) {
            let mut q = build_query(5, "www.blocked.example", RecordType::A, true);
            if pos < q.len() { q[pos] = val; }
            q.truncate(cut);
            let f = filter();
            let _ = plan(&q, true, &zones(), &f, &BlockAnswer::NxDomain);
        }
    }
}
