//! DNS blocklists: reads lists in the usual formats (hosts, adblock, plain domains) and answers
//! "is this name blocked, by which list, because of which entry" for a DNS filter in the agent.
//!
//! Matching is by suffix at label boundaries: the entry `example.com` blocks `example.com` and
//! `a.b.example.com`, but neither `com` nor `notexample.com`. Names are ASCII case-insensitive and
//! a trailing dot is ignored. An allowlist (explicit entries and adblock `@@` exception rules)
//! wins over every list.
//!
//! # Structure
//!
//! Real lists reach a million domains, so the set must load fast and stay compact: there is no
//! heap object per domain. A [`DomainSet`] keeps
//! - `bytes`: every distinct entry, lowercased, concatenated into one `Vec<u8>`;
//! - `offsets`: one `u32` per entry (plus an end sentinel) giving where it starts in `bytes`;
//! - `tags`: one `u16` per entry, the list it came from (the first list that had it).
//!
//! Entries are sorted by their *reversed* bytes (`moc.elpmaxe` for `example.com`), so an entry
//! and all the names it covers share a prefix in that order. A lookup binary-searches the query
//! name and then each of its suffixes that starts after a `.`; the comparison walks both byte
//! strings backwards and lowercases the query on the fly, so it allocates nothing. The entries are
//! stored forwards (only compared backwards) so a verdict can point at them as `&str`.
//!
//! That is about `len + 6` bytes per entry (≈ 26 bytes for typical names), against well over
//! 60 bytes for a `HashSet<String>`. Building sorts one compact index vector (8 bytes per entry)
//! and then copies the entries into their final, exactly sized buffers, dropping duplicates.

use std::cmp::Ordering;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest domain name in text form (without the trailing dot).
const MAX_NAME: usize = 253;
/// Longest label.
const MAX_LABEL: usize = 63;

/// Names that hosts files map to a loopback or broadcast address for the system's own sake; they
/// are not blocklist entries.
const HOSTS_SPECIAL: &[&str] = &[
    "localhost",
    "localhost.localdomain",
    "local",
    "broadcasthost",
    "ip6-localhost",
    "ip6-loopback",
    "ip6-localnet",
    "ip6-mcastprefix",
    "ip6-allnodes",
    "ip6-allrouters",
    "ip6-allhosts",
    "0.0.0.0",
];

/// The text format of a blocklist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListFormat {
    /// One domain per line; `#` comments (whole line, or after whitespace); `*.example.com` and
    /// `.example.com` mean the same as `example.com`.
    Domains,
    /// Hosts file: `0.0.0.0 name [name…]` (any address); `#` comments.
    Hosts,
    /// Adblock/AdGuard rules; only plain domain rules `||example.com^` (block) and
    /// `@@||example.com^` (allow) are used, other rules are skipped.
    Adblock,
}

impl ListFormat {
    /// Guesses the format from the first lines that are not comments.
    pub fn detect(text: &str) -> ListFormat {
        let (mut hosts, mut adblock, mut domains) = (0usize, 0usize, 0usize);
        let mut bang_comments = false;
        let mut seen = 0;
        for line in lines(text) {
            if line.starts_with("[Adblock") || line.starts_with("[AdGuard") {
                return ListFormat::Adblock;
            }
            if line.starts_with('!') {
                bang_comments = true;
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with("||") || line.starts_with("@@") || line.starts_with('|') {
                adblock += 1;
            } else {
                let mut tokens = line.split_whitespace();
                let first = tokens.next().unwrap_or("");
                if first.parse::<IpAddr>().is_ok() && tokens.next().is_some() {
                    hosts += 1;
                } else {
                    domains += 1;
                }
            }
            seen += 1;
            if seen == 64 {
                break;
            }
        }
        if seen == 0 {
            return if bang_comments {
                ListFormat::Adblock
            } else {
                ListFormat::Domains
            };
        }
        if adblock > hosts && adblock > domains {
            ListFormat::Adblock
        } else if hosts > domains {
            ListFormat::Hosts
        } else {
            ListFormat::Domains
        }
    }

    /// The name used in configuration (`domains`, `hosts`, `adblock`).
    pub fn as_str(self) -> &'static str {
        match self {
            ListFormat::Domains => "domains",
            ListFormat::Hosts => "hosts",
            ListFormat::Adblock => "adblock",
        }
    }
}

impl fmt::Display for ListFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A list format name that is not one of `domains`, `hosts`, `adblock`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown blocklist format {0:?}: expected \"domains\", \"hosts\" or \"adblock\"")]
pub struct UnknownListFormat(pub String);

impl FromStr for ListFormat {
    type Err = UnknownListFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "domains" => Ok(ListFormat::Domains),
            "hosts" => Ok(ListFormat::Hosts),
            "adblock" => Ok(ListFormat::Adblock),
            _ => Err(UnknownListFormat(s.to_owned())),
        }
    }
}

/// What was read from one list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ListStats {
    /// Block entries read (duplicates included).
    pub entries: usize,
    /// Lines or names not used: invalid names, unsupported rules, hosts-file special names.
    pub skipped: usize,
    /// Allow entries read (adblock `@@` exception rules).
    pub allow_entries: usize,
}

/// One loaded list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListInfo {
    pub name: String,
    pub category: String,
    pub stats: ListStats,
}

/// The answer for one query name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// No list matched.
    Pass,
    /// The allowlist matched (even if a list also matched); `entry` is the allowlist entry.
    Allowed { entry: &'a str },
    /// Blocked by `list` (its category) because of `entry`, the list entry that matched (e.g.
    /// `example.com` for a query `ads.example.com`). When several entries cover the name, the
    /// longest (most specific) one is reported.
    Blocked {
        list: &'a str,
        category: &'a str,
        entry: String,
    },
}

impl Verdict<'_> {
    pub fn is_blocked(&self) -> bool {
        matches!(self, Verdict::Blocked { .. })
    }
}

/// Collects lists and allow entries, then sorts them into a [`Filter`].
#[derive(Debug, Default)]
pub struct FilterBuilder {
    block: SetBuilder,
    allow: SetBuilder,
    lists: Vec<ListInfo>,
}

impl FilterBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a list's text; returns what was read.
    pub fn add_list(
        &mut self,
        name: &str,
        category: &str,
        format: ListFormat,
        text: &str,
    ) -> ListStats {
        let mut stats = ListStats::default();
        // Entries remember their list in a u16; beyond that many lists, nothing more is read.
        let Ok(tag) = u16::try_from(self.lists.len()) else {
            stats.skipped = lines(text).count();
            return stats;
        };
        match format {
            ListFormat::Domains => self.read_domains(tag, text, &mut stats),
            ListFormat::Hosts => self.read_hosts(tag, text, &mut stats),
            ListFormat::Adblock => self.read_adblock(tag, text, &mut stats),
        }
        self.lists.push(ListInfo {
            name: name.to_owned(),
            category: category.to_owned(),
            stats: stats.clone(),
        });
        stats
    }

    /// One allowlist domain (suffix match, as for lists); returns false if the name is invalid.
    pub fn allow(&mut self, domain: &str) -> bool {
        let domain = domain.trim();
        let domain = strip_wildcard(domain);
        self.allow.push(domain, u16::MAX)
    }

    pub fn build(self) -> Filter {
        Filter {
            block: self.block.build(),
            allow: self.allow.build(),
            lists: self.lists,
        }
    }

    fn read_domains(&mut self, tag: u16, text: &str, stats: &mut ListStats) {
        for line in lines(text) {
            if line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let line = strip_inline_comment(line);
            if line.is_empty() {
                continue;
            }
            if line.contains(char::is_whitespace) {
                stats.skipped += 1;
                continue;
            }
            if self.block.push(strip_wildcard(line), tag) {
                stats.entries += 1;
            } else {
                stats.skipped += 1;
            }
        }
    }

    fn read_hosts(&mut self, tag: u16, text: &str, stats: &mut ListStats) {
        for line in lines(text) {
            let line = match line.find('#') {
                Some(i) => line[..i].trim_end(),
                None => line,
            };
            if line.is_empty() {
                continue;
            }
            let mut tokens = line.split_whitespace();
            let address_ok = tokens.next().is_some_and(|a| a.parse::<IpAddr>().is_ok());
            let mut tokens = tokens.peekable();
            if !address_ok || tokens.peek().is_none() {
                // A line that is not `address name…` counts once, whatever it holds.
                stats.skipped += 1;
                continue;
            }
            for name in tokens {
                let special = HOSTS_SPECIAL
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(name.strip_suffix('.').unwrap_or(name)));
                if !special && self.block.push(name, tag) {
                    stats.entries += 1;
                } else {
                    stats.skipped += 1;
                }
            }
        }
    }

    fn read_adblock(&mut self, tag: u16, text: &str, stats: &mut ListStats) {
        for line in lines(text) {
            if line.starts_with('!') || line.starts_with('[') {
                continue;
            }
            // `# text` is a comment in DNS-oriented lists; `##`, `#@#`, `#?#`… are cosmetic rules.
            if line == "#" || line.starts_with("# ") || line.starts_with("#\t") {
                continue;
            }
            let (rule, allow) = match line.strip_prefix("@@") {
                Some(rest) => (rest, true),
                None => (line, false),
            };
            let Some(domain) = adblock_domain(rule) else {
                stats.skipped += 1;
                continue;
            };
            if allow {
                if self.allow.push(domain, tag) {
                    stats.allow_entries += 1;
                } else {
                    stats.skipped += 1;
                }
            } else if self.block.push(domain, tag) {
                stats.entries += 1;
            } else {
                stats.skipped += 1;
            }
        }
    }
}

/// The domain of a plain adblock domain rule `||example.com^` (also `||*.example.com^`, an
/// empty `$`, a trailing `|`), or `None` for any other rule.
fn adblock_domain(rule: &str) -> Option<&str> {
    let rest = rule.strip_prefix("||")?;
    let rest = match rest.split_once('$') {
        Some((r, "")) => r,
        Some(_) => return None,
        None => rest,
    };
    let rest = rest.strip_suffix('|').unwrap_or(rest);
    let domain = rest.strip_suffix('^')?;
    let domain = domain.strip_prefix("*.").unwrap_or(domain);
    // Anything else (`*`, `/`, `^`, `|`…) is rejected by the name check.
    Some(domain)
}

/// `*.example.com` and `.example.com` → `example.com`.
fn strip_wildcard(name: &str) -> &str {
    name.strip_prefix("*.")
        .or_else(|| name.strip_prefix('.'))
        .unwrap_or(name)
}

/// Cuts a trailing comment introduced by whitespace and `#`.
fn strip_inline_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    for i in 1..bytes.len() {
        if bytes[i] == b'#' && bytes[i - 1].is_ascii_whitespace() {
            return line[..i].trim_end();
        }
    }
    line
}

/// Trimmed, non-empty lines (any line ending, a leading byte-order mark ignored).
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.strip_prefix('\u{feff}')
        .unwrap_or(text)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
}

/// The filter: blocklists and allowlist, sorted for lookup. Immutable, `Send + Sync`; share it
/// behind an `Arc` and swap the `Arc` to reload.
pub struct Filter {
    block: DomainSet,
    allow: DomainSet,
    lists: Vec<ListInfo>,
}

impl Filter {
    /// A filter that blocks nothing.
    pub fn empty() -> Filter {
        FilterBuilder::new().build()
    }

    /// The verdict for a query name (any case, trailing dot or not). Never allocates unless the
    /// name is blocked.
    pub fn check(&self, name: &str) -> Verdict<'_> {
        let query = name.as_bytes();
        let query = query.strip_suffix(b".").unwrap_or(query);
        if query.is_empty() {
            return Verdict::Pass;
        }
        if let Some(i) = self.allow.find(query) {
            return Verdict::Allowed {
                entry: self.allow.entry(i),
            };
        }
        if let Some(i) = self.block.find(query) {
            let list = self.lists.get(usize::from(self.block.tags[i]));
            return Verdict::Blocked {
                list: list.map_or("", |l| l.name.as_str()),
                category: list.map_or("", |l| l.category.as_str()),
                entry: self.block.entry(i).to_owned(),
            };
        }
        Verdict::Pass
    }

    /// Distinct blocked entries.
    pub fn len(&self) -> usize {
        self.block.len()
    }

    pub fn is_empty(&self) -> bool {
        self.block.len() == 0
    }

    /// Distinct allowlist entries.
    pub fn allow_len(&self) -> usize {
        self.allow.len()
    }

    /// Bytes of the structure's heap buffers (capacity), list names included.
    pub fn heap_bytes(&self) -> usize {
        self.block.heap_bytes()
            + self.allow.heap_bytes()
            + self.lists.capacity() * size_of::<ListInfo>()
            + self
                .lists
                .iter()
                .map(|l| l.name.capacity() + l.category.capacity())
                .sum::<usize>()
    }

    /// The loaded lists, in the order they were added.
    pub fn lists(&self) -> &[ListInfo] {
        &self.lists
    }
}

impl Default for Filter {
    fn default() -> Self {
        Filter::empty()
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filter")
            .field("entries", &self.block.len())
            .field("allow_entries", &self.allow.len())
            .field("heap_bytes", &self.heap_bytes())
            .field("lists", &self.lists)
            .finish()
    }
}

/// Where one entry sits in a [`SetBuilder`]'s buffer (8 bytes).
#[derive(Debug, Clone, Copy)]
struct Item {
    start: u32,
    tag: u16,
    len: u8,
}

/// Entries as they are read, in input order.
#[derive(Debug, Default)]
struct SetBuilder {
    bytes: Vec<u8>,
    items: Vec<Item>,
}

impl SetBuilder {
    /// Validates `name`, appends it lowercased; false (and nothing kept) if it is not a valid name.
    fn push(&mut self, name: &str, tag: u16) -> bool {
        let raw = name.as_bytes();
        let raw = raw.strip_suffix(b".").unwrap_or(raw);
        if raw.is_empty() || raw.len() > MAX_NAME {
            return false;
        }
        let Ok(start) = u32::try_from(self.bytes.len()) else {
            return false;
        };
        if u32::try_from(self.bytes.len() + raw.len()).is_err() {
            return false;
        }
        let mut label = 0usize;
        let mut numeric = true;
        for &b in raw {
            let b = b.to_ascii_lowercase();
            match b {
                b'.' => {
                    if label == 0 {
                        return false;
                    }
                    label = 0;
                }
                b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => {
                    label += 1;
                    if label > MAX_LABEL {
                        return false;
                    }
                    numeric &= b.is_ascii_digit();
                }
                _ => return false,
            }
        }
        if label == 0 {
            return false;
        }
        // An IPv4 address in text form is not a domain entry.
        if numeric && std::str::from_utf8(raw).is_ok_and(|s| s.parse::<Ipv4Addr>().is_ok()) {
            return false;
        }
        self.bytes.extend(raw.iter().map(u8::to_ascii_lowercase));
        self.items.push(Item {
            start,
            tag,
            // raw.len() <= MAX_NAME < 256
            len: raw.len() as u8,
        });
        true
    }

    fn build(self) -> DomainSet {
        let SetBuilder { bytes, mut items } = self;
        let slice = |it: &Item| &bytes[it.start as usize..it.start as usize + usize::from(it.len)];
        // Input order breaks ties, so the first list that has an entry keeps it.
        items.sort_unstable_by(|a, b| cmp_reversed(slice(a), slice(b)).then(a.start.cmp(&b.start)));
        items.dedup_by(|b, a| slice(a) == slice(b));
        let total: usize = items.iter().map(|it| usize::from(it.len)).sum();
        let mut set = DomainSet {
            bytes: Vec::with_capacity(total),
            offsets: Vec::with_capacity(items.len() + 1),
            tags: Vec::with_capacity(items.len()),
        };
        for it in &items {
            // total <= bytes.len(), which fit in u32 when it was pushed
            set.offsets.push(set.bytes.len() as u32);
            set.bytes.extend_from_slice(slice(it));
            set.tags.push(it.tag);
        }
        set.offsets.push(set.bytes.len() as u32);
        set
    }
}

/// Sorted, deduplicated entries (see the module documentation).
#[derive(Debug)]
struct DomainSet {
    /// Entries, lowercase, concatenated in sorted order.
    bytes: Vec<u8>,
    /// Start of each entry in `bytes`, then the end of the last one.
    offsets: Vec<u32>,
    /// The list each entry came from.
    tags: Vec<u16>,
}

impl DomainSet {
    fn len(&self) -> usize {
        self.tags.len()
    }

    fn heap_bytes(&self) -> usize {
        self.bytes.capacity()
            + self.offsets.capacity() * size_of::<u32>()
            + self.tags.capacity() * size_of::<u16>()
    }

    fn entry_bytes(&self, i: usize) -> &[u8] {
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    fn entry(&self, i: usize) -> &str {
        // Entries are validated ASCII.
        std::str::from_utf8(self.entry_bytes(i)).unwrap_or_default()
    }

    /// The longest entry that is `query` or one of its suffixes at a label boundary.
    fn find(&self, query: &[u8]) -> Option<usize> {
        if self.len() == 0 {
            return None;
        }
        let mut start = 0;
        loop {
            let suffix = &query[start..];
            if !suffix.is_empty()
                && let Some(i) = self.search(suffix)
            {
                return Some(i);
            }
            let dot = suffix.iter().position(|&b| b == b'.')?;
            start += dot + 1;
        }
    }

    /// Exact match of `name` (compared lowercased).
    fn search(&self, name: &[u8]) -> Option<usize> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match cmp_reversed(self.entry_bytes(mid), name) {
                Ordering::Less => lo = mid + 1,
                Ordering::Greater => hi = mid,
                Ordering::Equal => return Some(mid),
            }
        }
        None
    }
}

/// Compares `a` (lowercase) and `b` as if both were byte-reversed, lowercasing `b` on the fly.
fn cmp_reversed(a: &[u8], b: &[u8]) -> Ordering {
    let (mut i, mut j) = (a.len(), b.len());
    while i > 0 && j > 0 {
        i -= 1;
        j -= 1;
        let (x, y) = (a[i], b[j].to_ascii_lowercase());
        if x != y {
            return x.cmp(&y);
        }
    }
    // The common part is equal: the shorter one sorts first.
    i.cmp(&j)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    fn filter_of(format: ListFormat, text: &str) -> (Filter, ListStats) {
        let mut b = FilterBuilder::new();
        let stats = b.add_list("test", "testing", format, text);
        (b.build(), stats)
    }

    fn blocked_by<'a>(v: &'a Verdict<'_>) -> Option<&'a str> {
        match v {
            Verdict::Blocked { entry, .. } => Some(entry),
            _ => None,
        }
    }

    #[test]
    fn hosts_format() {
        let text = "\
# a hosts blocklist
127.0.0.1 localhost
127.0.0.1 localhost.localdomain
255.255.255.255 broadcasthost
::1 localhost ip6-localhost ip6-loopback
0.0.0.0 0.0.0.0
0.0.0.0 ads.example.com   # inline comment
0.0.0.0 one.test two.test\tthree.test
127.0.0.1 Tracker.Example.NET.
:: v6sink.test
0.0.0.0 bad_char!.test good.test
example.org
0.0.0.0
not-an-ip evil.test
0.0.0.0 #only a comment
";
        let (f, stats) = filter_of(ListFormat::Hosts, text);
        assert_eq!(
            stats,
            ListStats {
                entries: 7,
                // localhost, localhost.localdomain, broadcasthost, 3 on the ::1 line,
                // 0.0.0.0, bad_char!.test, `example.org`, `0.0.0.0`, `not-an-ip …`, `0.0.0.0 #…`
                skipped: 12,
                allow_entries: 0
            }
        );
        assert_eq!(f.len(), 7);
        for name in [
            "ads.example.com",
            "one.test",
            "two.test",
            "three.test",
            "tracker.example.net",
            "v6sink.test",
            "good.test",
        ] {
            assert_eq!(blocked_by(&f.check(name)), Some(name), "{name}");
        }
        for name in [
            "localhost",
            "example.org",
            "evil.test",
            "example.com",
            "comment",
        ] {
            assert_eq!(f.check(name), Verdict::Pass, "{name}");
        }
    }

    #[test]
    fn adblock_format() {
        let text = "\
[Adblock Plus 2.0]
! Title: test
||ads.example.com^
||TRACKER.example.net^
@@||good.ads.example.com^
||wild.test^|
||*.star.test^
||empty-options.test^$
||options.test^$third-party
||important.test^$important
||path.test/ads^
||path2.test^*/banner
||mid*wild.test^
||no-caret.test
|https://single-pipe.test^
/regex.*/
example.com##.banner
example.com#@#.banner
##.ad
@@||bad exception^
# a comment
plain.test
";
        let (f, stats) = filter_of(ListFormat::Adblock, text);
        assert_eq!(
            stats,
            ListStats {
                entries: 5,
                skipped: 13,
                allow_entries: 1
            }
        );
        assert_eq!(f.len(), 5);
        assert_eq!(f.allow_len(), 1);
        assert_eq!(
            blocked_by(&f.check("x.ads.example.com")),
            Some("ads.example.com")
        );
        assert_eq!(
            blocked_by(&f.check("tracker.example.net")),
            Some("tracker.example.net")
        );
        assert_eq!(blocked_by(&f.check("wild.test")), Some("wild.test"));
        assert_eq!(blocked_by(&f.check("a.star.test")), Some("star.test"));
        assert_eq!(blocked_by(&f.check("star.test")), Some("star.test"));
        assert_eq!(
            blocked_by(&f.check("empty-options.test")),
            Some("empty-options.test")
        );
        assert_eq!(
            f.check("good.ads.example.com"),
            Verdict::Allowed {
                entry: "good.ads.example.com"
            }
        );
        for name in [
            "options.test",
            "important.test",
            "path.test",
            "path2.test",
            "midwild.test",
            "no-caret.test",
            "single-pipe.test",
            "example.com",
            "plain.test",
        ] {
            assert_eq!(f.check(name), Verdict::Pass, "{name}");
        }
    }

    #[test]
    fn domains_format() {
        let long_label = "a".repeat(64);
        let ok_label = "b".repeat(63);
        let (d63, d62, d61) = ("d".repeat(63), "d".repeat(62), "d".repeat(61));
        let long_name = format!("{d63}.{d63}.{d63}.{d62}"); // 254 characters
        let max_name = format!("{d63}.{d63}.{d63}.{d61}"); // 253 characters
        assert_eq!((long_name.len(), max_name.len()), (254, 253));
        let text = format!(
            "\
# comment line
! also a comment

example.com
  Indented.Example.ORG.  
*.wild.test
.dot.test
inline.test # a trailing comment
hash#inside.test
two words.test
a..b.test
.
*.
{long_label}.test
{ok_label}.test
{long_name}
{max_name}
_dmarc.underscore.test
uni\u{e9}.test
192.168.1.1
1.2.3.4.sub.test
crlf.test\r
"
        );
        let (f, stats) = filter_of(ListFormat::Domains, &text);
        assert_eq!(
            stats,
            ListStats {
                entries: 10,
                // hash#inside, two words, a..b, ., *., long label, long name, unicode, 192.168.1.1
                skipped: 9,
                allow_entries: 0
            }
        );
        for (query, entry) in [
            ("example.com", "example.com"),
            ("indented.example.org", "indented.example.org"),
            ("wild.test", "wild.test"),
            ("x.wild.test", "wild.test"),
            ("dot.test", "dot.test"),
            ("inline.test", "inline.test"),
            (&format!("{ok_label}.test"), &format!("{ok_label}.test")),
            (&max_name, &max_name),
            ("_dmarc.underscore.test", "_dmarc.underscore.test"),
            ("1.2.3.4.sub.test", "1.2.3.4.sub.test"),
            ("crlf.test", "crlf.test"),
        ] {
            assert_eq!(blocked_by(&f.check(query)), Some(entry), "{query}");
        }
        for name in [
            "hash",
            "words.test",
            "b.test",
            "test",
            "192.168.1.1",
            "sub.test",
        ] {
            assert_eq!(f.check(name), Verdict::Pass, "{name}");
        }
    }

    #[test]
    fn detect_formats() {
        assert_eq!(
            ListFormat::detect("# hi\n0.0.0.0 a.com\n0.0.0.0 b.com\n"),
            ListFormat::Hosts
        );
        assert_eq!(
            ListFormat::detect("127.0.0.1 a.com b.com\n"),
            ListFormat::Hosts
        );
        assert_eq!(ListFormat::detect("! hi\n||a.com^\n"), ListFormat::Adblock);
        assert_eq!(
            ListFormat::detect("[Adblock Plus 2.0]\na.com\n"),
            ListFormat::Adblock
        );
        assert_eq!(ListFormat::detect("@@||a.com^\n"), ListFormat::Adblock);
        assert_eq!(
            ListFormat::detect("# hi\na.com\nb.com # x\n"),
            ListFormat::Domains
        );
        assert_eq!(ListFormat::detect(""), ListFormat::Domains);
        assert_eq!(ListFormat::detect("! only comments\n"), ListFormat::Adblock);
        // A stray line does not outvote the rest.
        assert_eq!(
            ListFormat::detect("stray.com\n0.0.0.0 a.com\n0.0.0.0 b.com\n"),
            ListFormat::Hosts
        );
    }

    #[test]
    fn format_names() {
        assert_eq!("domains".parse::<ListFormat>(), Ok(ListFormat::Domains));
        assert_eq!("Hosts".parse::<ListFormat>(), Ok(ListFormat::Hosts));
        assert_eq!("adblock".parse::<ListFormat>(), Ok(ListFormat::Adblock));
        let err = "abp".parse::<ListFormat>().unwrap_err().to_string();
        for accepted in ["domains", "hosts", "adblock", "abp"] {
            assert!(err.contains(accepted), "{err}");
        }
        for f in [ListFormat::Domains, ListFormat::Hosts, ListFormat::Adblock] {
            assert_eq!(f.to_string().parse::<ListFormat>(), Ok(f));
        }
    }

    #[test]
    fn suffix_semantics() {
        let (f, _) = filter_of(ListFormat::Domains, "example.com\nbad.example\n");
        for name in [
            "example.com",
            "a.example.com",
            "a.b.example.com",
            "x-y.example.com",
        ] {
            assert_eq!(blocked_by(&f.check(name)), Some("example.com"), "{name}");
        }
        for name in [
            "com",
            "notexample.com",
            "example.com.evil.net",
            "example.co",
            "xample.com",
            "example",
            "example.org",
            "ample.com",
        ] {
            assert_eq!(f.check(name), Verdict::Pass, "{name}");
        }
    }

    #[test]
    fn case_and_trailing_dot() {
        let (f, _) = filter_of(ListFormat::Domains, "Example.COM.\n");
        for name in [
            "example.com",
            "EXAMPLE.COM",
            "Ads.Example.Com.",
            "example.com.",
        ] {
            assert_eq!(blocked_by(&f.check(name)), Some("example.com"), "{name}");
        }
        assert_eq!(f.check("example.com.."), Verdict::Pass);
    }

    #[test]
    fn allowlist_wins() {
        let mut b = FilterBuilder::new();
        b.add_list(
            "ads",
            "advertising",
            ListFormat::Domains,
            "bad.example\nads.test\n",
        );
        b.add_list("more", "malware", ListFormat::Hosts, "0.0.0.0 ads.test\n");
        assert!(b.allow("good.bad.example"));
        assert!(b.allow("*.ads.test"));
        assert!(!b.allow("not valid"));
        assert!(!b.allow(""));
        let f = b.build();
        assert_eq!(
            f.check("good.bad.example"),
            Verdict::Allowed {
                entry: "good.bad.example"
            }
        );
        assert_eq!(
            f.check("deeper.GOOD.bad.example."),
            Verdict::Allowed {
                entry: "good.bad.example"
            }
        );
        assert_eq!(
            f.check("x.bad.example"),
            Verdict::Blocked {
                list: "ads",
                category: "advertising",
                entry: "bad.example".into()
            }
        );
        assert_eq!(blocked_by(&f.check("bad.example")), Some("bad.example"));
        assert_eq!(
            f.check("tracker.ads.test"),
            Verdict::Allowed { entry: "ads.test" }
        );
        assert_eq!(f.check("elsewhere.test"), Verdict::Pass);
    }

    #[test]
    fn adblock_exceptions_beat_other_lists() {
        let mut b = FilterBuilder::new();
        b.add_list(
            "hosts",
            "ads",
            ListFormat::Hosts,
            "0.0.0.0 cdn.example.com\n",
        );
        b.add_list("abp", "ads", ListFormat::Adblock, "@@||example.com^\n");
        let f = b.build();
        assert_eq!(
            f.check("cdn.example.com"),
            Verdict::Allowed {
                entry: "example.com"
            }
        );
        assert_eq!(f.lists()[1].stats.allow_entries, 1);
    }

    #[test]
    fn verdict_names_list_category_and_entry() {
        let mut b = FilterBuilder::new();
        let s1 = b.add_list(
            "first",
            "ads",
            ListFormat::Domains,
            "example.com\nshared.test\n",
        );
        let s2 = b.add_list(
            "second",
            "malware",
            ListFormat::Adblock,
            "||shared.test^\n||evil.example.com^\n||x.test^\n",
        );
        let f = b.build();
        assert_eq!(s1.entries, 2);
        assert_eq!(s2.entries, 3);
        assert_eq!(f.len(), 4, "shared.test counted once");
        assert_eq!(
            f.lists()
                .iter()
                .map(|l| (l.name.as_str(), l.category.as_str(), l.stats.entries))
                .collect::<Vec<_>>(),
            [("first", "ads", 2), ("second", "malware", 3)]
        );
        assert_eq!(
            f.check("ads.example.com"),
            Verdict::Blocked {
                list: "first",
                category: "ads",
                entry: "example.com".into()
            }
        );
        // The most specific entry is reported.
        assert_eq!(
            f.check("a.evil.example.com"),
            Verdict::Blocked {
                list: "second",
                category: "malware",
                entry: "evil.example.com".into()
            }
        );
        // On duplicates, the first list keeps the entry.
        assert_eq!(
            f.check("shared.test"),
            Verdict::Blocked {
                list: "first",
                category: "ads",
                entry: "shared.test".into()
            }
        );
        assert_eq!(
            f.check("y.x.test"),
            Verdict::Blocked {
                list: "second",
                category: "malware",
                entry: "x.test".into()
            }
        );
    }

    #[test]
    fn odd_queries_do_not_panic() {
        let (f, _) = filter_of(ListFormat::Domains, "example.com\n");
        let long = "a.".repeat(1000) + "example.com";
        assert_eq!(blocked_by(&f.check(&long)), Some("example.com"));
        for name in ["", ".", "..", "...com", "é.example.org", "\0", " ", "com."] {
            assert_eq!(f.check(name), Verdict::Pass, "{name:?}");
        }
        assert_eq!(blocked_by(&f.check("é.example.com")), Some("example.com"));
        assert_eq!(blocked_by(&f.check(".example.com")), Some("example.com"));
        let e = Filter::empty();
        assert!(e.is_empty());
        assert_eq!(e.len(), 0);
        assert_eq!(e.check("example.com"), Verdict::Pass);
        assert!(!f.is_empty());
    }

    #[test]
    fn filter_is_shareable() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Filter>();
        assert_eq!(size_of::<Item>(), 8);
    }

    fn testdata(file: &str) -> String {
        let path = format!("{}/testdata/blocklists/{file}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn real_world_lists() {
        let mut b = FilterBuilder::new();
        let mut total = 0;
        for (file, format, category, entries) in [
            ("scam.hosts", ListFormat::Hosts, "scam", 8527),
            ("scam.adblock", ListFormat::Adblock, "scam", 8527),
            ("ransomware.hosts", ListFormat::Hosts, "ransomware", 1904),
        ] {
            let text = testdata(file);
            assert_eq!(ListFormat::detect(&text), format, "{file}");
            let stats = b.add_list(file, category, format, &text);
            assert_eq!(
                stats,
                ListStats {
                    entries,
                    skipped: 0,
                    allow_entries: 0
                },
                "{file}"
            );
            total += entries;
        }
        let f = b.build();
        // The two scam lists hold the same domains.
        assert!(f.len() <= total - 8527 && f.len() > 10_000, "{}", f.len());
        for (query, list, category, entry) in [
            ("0-google.com", "scam.hosts", "scam", "0-google.com"),
            ("www.007-dvd.com", "scam.hosts", "scam", "007-dvd.com"),
            ("ZXCDN.com.", "scam.hosts", "scam", "zxcdn.com"),
            (
                "x.25z5g623wpqpdwis.onion.to",
                "ransomware.hosts",
                "ransomware",
                "25z5g623wpqpdwis.onion.to",
            ),
            (
                "27lelchgcvs2wpm7.bonbestal.asia",
                "ransomware.hosts",
                "ransomware",
                "27lelchgcvs2wpm7.bonbestal.asia",
            ),
        ] {
            assert_eq!(
                f.check(query),
                Verdict::Blocked {
                    list,
                    category,
                    entry: entry.into()
                },
                "{query}"
            );
        }
        for name in [
            "google.com",
            "com",
            "onion.to",
            "bonbestal.asia",
            "github.com",
        ] {
            assert_eq!(f.check(name), Verdict::Pass, "{name}");
        }
    }

    /// The obvious implementation, for comparison.
    struct Naive {
        block: HashMap<String, usize>,
        allow: HashSet<String>,
        lists: Vec<(String, String)>,
    }

    impl Naive {
        fn check(&self, name: &str) -> Verdict<'_> {
            let name = name.to_ascii_lowercase();
            let name = name.strip_suffix('.').unwrap_or(&name);
            let mut suffixes = vec![name];
            let mut rest = name;
            while let Some((_, tail)) = rest.split_once('.') {
                suffixes.push(tail);
                rest = tail;
            }
            if name.is_empty() {
                return Verdict::Pass;
            }
            for s in &suffixes {
                if let Some(a) = self.allow.get(*s) {
                    return Verdict::Allowed { entry: a };
                }
            }
            for s in &suffixes {
                if let Some(&i) = self.block.get(*s) {
                    return Verdict::Blocked {
                        list: &self.lists[i].0,
                        category: &self.lists[i].1,
                        entry: s.to_string(),
                    };
                }
            }
            Verdict::Pass
        }
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        let label = prop::sample::select(vec!["a", "b", "ab", "ba", "x-y", "c0", "_s", "aa"]);
        prop::collection::vec(label, 1..5).prop_map(|l| l.join("."))
    }

    fn query_strategy() -> impl Strategy<Value = String> {
        (name_strategy(), any::<u64>(), any::<bool>()).prop_map(|(n, case, dot)| {
            let mut q: String = n
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if case >> (i % 64) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            if dot {
                q.push('.');
            }
            q
        })
    }

    proptest! {
        #[test]
        fn agrees_with_naive_reference(
            lists in prop::collection::vec(prop::collection::vec(name_strategy(), 0..30), 1..4),
            allow in prop::collection::vec(name_strategy(), 0..4),
            queries in prop::collection::vec(query_strategy(), 1..40),
        ) {
            let mut b = FilterBuilder::new();
            let mut naive = Naive { block: HashMap::new(), allow: HashSet::new(), lists: vec![] };
            for (i, list) in lists.iter().enumerate() {
                let (name, category) = (format!("list{i}"), format!("cat{i}"));
                let stats = b.add_list(&name, &category, ListFormat::Domains, &list.join("\n"));
                prop_assert_eq!(stats.entries, list.len());
                for d in list {
                    naive.block.entry(d.clone()).or_insert(i);
                }
                naive.lists.push((name, category));
            }
            for a in &allow {
                prop_assert!(b.allow(a));
                naive.allow.insert(a.clone());
            }
            let f = b.build();
            prop_assert_eq!(f.len(), naive.block.len());
            let all_names = lists.iter().flatten().chain(&allow);
            for q in queries.iter().chain(all_names) {
                prop_assert_eq!(f.check(q), naive.check(q), "query {}", q);
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in "[ -~\n\té]{0,200}", query in "[ -~é]{0,40}") {
            for format in [ListFormat::Domains, ListFormat::Hosts, ListFormat::Adblock] {
                let mut b = FilterBuilder::new();
                let _ = b.add_list("x", "y", format, &text);
                let _ = b.allow(&query);
                let _ = b.build().check(&query);
            }
            let _ = ListFormat::detect(&text);
        }
    }

    /// Resident memory of this process, in KiB (0 where /proc is not available).
    fn vm_rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    /// Middle labels: all shorter than any generated first label, so no generated name is a
    /// suffix of another.
    const MIDDLE: &[&str] = &["cdn", "api", "mail", "shop", "static", "img", "ads", "m"];
    const TLDS: &[&str] = &["com", "net", "org", "io", "de", "info", "xyz", "ru", "co"];

    /// The `i`th generated name: a random first label ending in a scrambled, fixed-width form of
    /// `i` (so all names differ), an optional middle label and a TLD; 2–3 labels, 12–27 characters (about 19 on average).
    fn generated_name(rng: &mut XorShift, i: u32, out: &mut String) {
        for _ in 0..5 + rng.below(8) {
            out.push(ALNUM[rng.below(36) as usize] as char);
        }
        // A bijection of 0..2^20 (odd multiplier), written in 4 base-36 digits (36^4 > 2^20).
        let mut j = i.wrapping_mul(0x9E37_79B1) & 0xF_FFFF;
        for _ in 0..4 {
            out.push(ALNUM[(j % 36) as usize] as char);
            j /= 36;
        }
        if rng.below(2) == 0 {
            out.push('.');
            out.push_str(MIDDLE[rng.below(MIDDLE.len() as u64) as usize]);
        }
        out.push('.');
        out.push_str(TLDS[rng.below(TLDS.len() as u64) as usize]);
    }

    #[test]
    fn one_million_domains_load_compactly() {
        const N: u32 = 1_000_000;
        let rss_start = vm_rss_kib();
        let mut rng = XorShift(0x5EC1_5E0D_0D15_F17E);
        let mut text = String::with_capacity(N as usize * 24);
        let mut line_ends = Vec::with_capacity(N as usize);
        for i in 0..N {
            generated_name(&mut rng, i, &mut text);
            line_ends.push(text.len());
            text.push('\n');
        }
        let name = |i: usize| {
            let start = if i == 0 { 0 } else { line_ends[i - 1] + 1 };
            &text[start..line_ends[i]]
        };

        let rss_before = vm_rss_kib();
        let started = std::time::Instant::now();
        let mut b = FilterBuilder::new();
        let stats = b.add_list("generated", "test", ListFormat::Domains, &text);
        let f = b.build();
        let elapsed = started.elapsed();
        let rss_after = vm_rss_kib();

        let heap = f.heap_bytes();
        println!(
            "1M domains: text {} bytes, avg name {:.1} chars",
            text.len(),
            (text.len() as f64 / f64::from(N)) - 1.0
        );
        println!("load (add_list + build): {elapsed:?}");
        println!(
            "VmRSS: start {rss_start} KiB, before load {rss_before} KiB, after load {rss_after} KiB, delta {} KiB",
            rss_after as i64 - rss_before as i64
        );
        println!(
            "entries {}, heap_bytes {heap}, {:.1} bytes/entry",
            f.len(),
            heap as f64 / f.len() as f64
        );

        assert_eq!(stats.entries, N as usize);
        assert_eq!(stats.skipped, 0);
        assert_eq!(f.len(), N as usize, "all generated names are distinct");

        for i in (0..N as usize).step_by(1000) {
            let n = name(i);
            assert_eq!(blocked_by(&f.check(n)), Some(n), "{n}");
        }
        for _ in 0..1000 {
            let n = name(rng.below(u64::from(N)) as usize);
            let sub = format!("www{}.{}", rng.below(1000), n.to_ascii_uppercase());
            assert_eq!(blocked_by(&f.check(&sub)), Some(n), "{sub}");
            let (_, parent) = n.split_once('.').unwrap();
            assert_eq!(f.check(parent), Verdict::Pass, "{parent}");
            let (_, tld) = n.rsplit_once('.').unwrap();
            assert_eq!(f.check(tld), Verdict::Pass, "{tld}");
            // Generated names never contain '-'.
            let sibling = format!("x-{n}");
            assert_eq!(f.check(&sibling), Verdict::Pass, "{sibling}");
        }
        assert!(
            heap / (N as usize) < 64,
            "{heap} heap bytes for {N} entries"
        );
    }
}
