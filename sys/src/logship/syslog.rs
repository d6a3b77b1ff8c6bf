//! The syslog sink: RFC 5424 messages, octet-counting framing ("LEN SP MSG", RFC 6587 section
//! 3.4.1 and RFC 5425 section 4.3) over TCP or TLS.
//!
//! A message is `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [sekisho@32473 kind="…"] MSG`
//! with the record's body as compact JSON for MSG (UTF-8, no BOM).

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{Backoff, Counters, FieldError, Origin, Record, SinkConfig, give_up, past_grace, tls};

/// The SD-ID of Sekisho's structured data element: a private name under an enterprise number
/// (RFC 5424 section 7.2.2).
pub(super) const SD_ID: &str = "sekisho@32473";

/// Header field limits of RFC 5424 section 6.
pub(super) const HOSTNAME_MAX: usize = 255;
pub(super) const APP_NAME_MAX: usize = 48;
pub(super) const PROCID_MAX: usize = 128;
pub(super) const MSGID_MAX: usize = 32;

/// Records written to the connection in one go at most.
const BATCH: usize = 512;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A receiver that takes nothing for this long is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Facility names and codes (RFC 5424 section 6.2.1, with the usual names of BSD syslog).
const FACILITIES: &[(&str, u8)] = &[
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("ntp", 12),
    ("security", 13),
    ("audit", 13),
    ("console", 14),
    ("clock", 15),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

/// The code of a facility name ("local0", "auth"…), ignoring case.
pub(super) fn facility_code(name: &str) -> Option<u8> {
    FACILITIES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|&(_, c)| c)
}

/// PRI = facility × 8 + severity.
pub(super) fn pri(facility: u8, severity: super::Severity) -> u16 {
    u16::from(facility) * 8 + u16::from(severity.code())
}

/// A header field as RFC 5424 allows it: printable US-ASCII without spaces (anything else
/// becomes `_`), at most `max` characters, NILVALUE "-" when empty.
pub(super) fn header_field(s: &str, max: usize) -> String {
    let out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    if out.is_empty() { "-".to_string() } else { out }
}

/// A PARAM-VALUE with `"`, `\` and `]` escaped by a backslash (RFC 5424 section 6.3.3).
pub(super) fn sd_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Unix milliseconds as an RFC 3339 UTC timestamp with milliseconds,
/// e.g. "2024-05-01T12:00:00.123Z". Times past year 9999 are written as its last millisecond.
pub(super) fn rfc3339_millis(ms: u64) -> String {
    const MAX_MS: u64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let ms = ms.min(MAX_MS);
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        ms % 1000
    )
}

/// Year, month and day of a day count since 1970-01-01 (proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

/// The fixed part of every message of one sink.
#[derive(Debug, Clone)]
pub(super) struct Header {
    facility: u8,
    /// "HOSTNAME APP-NAME PROCID", each sanitized.
    origin: String,
}

impl Header {
    pub(super) fn new(facility: u8, hostname: &str, app_name: &str, procid: &str) -> Header {
        Header {
            facility,
            origin: format!(
                "{} {} {}",
                header_field(hostname, HOSTNAME_MAX),
                header_field(app_name, APP_NAME_MAX),
                header_field(procid, PROCID_MAX)
            ),
        }
    }
}

/// Appends the RFC 5424 message of `record` to `out`.
pub(super) fn append_message(h: &Header, record: &Record, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "<{}>1 {} {} {} [{SD_ID} kind=\"{}\"] ",
        pri(h.facility, record.severity),
        rfc3339_millis(record.time_ms),
        h.origin,
        header_field(&record.msgid, MSGID_MAX),
        sd_escape(record.kind.as_str()),
    );
    if serde_json::to_writer(&mut *out, &record.body).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// Appends "LEN SP MSG" (octet counting) to `out`.
pub(super) fn append_frame(msg: &[u8], out: &mut Vec<u8>) {
    let _ = write!(out, "{} ", msg.len());
    out.extend_from_slice(msg);
}

/// A checked syslog sink.
pub(super) struct Target {
    url: String,
    host: String,
    port: u16,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    header: Header,
}

impl Target {
    pub(super) fn new(config: &SinkConfig, origin: &Origin<'_>) -> Result<Target, FieldError> {
        let url = url::Url::parse(&config.url).map_err(|e| {
            FieldError::new(
                "url",
                format!("{e}: want tcp://host:port or tls://host:port"),
            )
        })?;
        let secure = match url.scheme() {
            "tcp" => false,
            "tls" => true,
            other => {
                return Err(FieldError::new(
                    "url",
                    format!("unknown scheme {other:?} for syslog: want tcp:// or tls://"),
                ));
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(FieldError::new("url", "has a user name or password"));
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(FieldError::new(
                "url",
                "want only tcp://host:port or tls://host:port",
            ));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| FieldError::new("url", "has no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = match url.port() {
            Some(p) => p,
            None if secure => 6514,
            None => {
                return Err(FieldError::new(
                    "url",
                    "has no port (syslog over TCP has none by default)",
                ));
            }
        };
        let tls = if secure {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| FieldError::new("url", format!("bad server name {host:?}: {e}")))?;
            let config = tls::client_config(
                config.ca.as_deref(),
                config.cert.as_deref(),
                config.key.as_deref(),
            )?;
            Some((Arc::new(config), name))
        } else {
            tls::no_tls_files(
                config.ca.as_deref(),
                config.cert.as_deref(),
                config.key.as_deref(),
                "tcp:// is not TLS (use tls://)",
            )?;
            None
        };
        let facility = match &config.facility {
            None => 16,
            Some(name) => facility_code(name).ok_or_else(|| {
                FieldError::new(
                    "facility",
                    format!("unknown facility {name:?} (kern, user, … auth, authpriv, … local0 to local7)"),
                )
            })?,
        };
        Ok(Target {
            url: config.url.clone(),
            host,
            port,
            tls,
            header: Header::new(
                facility,
                origin.hostname,
                origin.app_name,
                &std::process::id().to_string(),
            ),
        })
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(t: &Target) -> Result<Box<dyn Io>, String> {
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((t.host.as_str(), t.port)),
    )
    .await
    .map_err(|_| format!("connect to {}: timed out", t.url))?
    .map_err(|e| format!("connect to {}: {e}", t.url))?;
    let _ = tcp.set_nodelay(true);
    let Some((config, name)) = &t.tls else {
        return Ok(Box::new(tcp));
    };
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(config.clone()).connect(name.clone(), tcp),
    )
    .await
    .map_err(|_| format!("TLS handshake with {}: timed out", t.url))?
    .map_err(|e| format!("TLS handshake with {}: {e}", t.url))?;
    Ok(Box::new(tls))
}

/// Whether the peer is still there: a read that would wait means yes; end of stream or an
/// error (a receiver that closed or restarted) means no. Whatever the receiver sent is ignored.
fn still_open(io: &mut Box<dyn Io>) -> bool {
    let mut scratch = [0u8; 1024];
    for _ in 0..64 {
        match io.read(&mut scratch).now_or_never() {
            None => return true,
            Some(Ok(0)) | Some(Err(_)) => return false,
            Some(Ok(_)) => continue,
        }
    }
    true
}

/// Writes `buf`; on failure, how many bytes the connection took before it failed.
async fn write_all(io: &mut Box<dyn Io>, buf: &[u8]) -> Result<(), (usize, String)> {
    let mut done = 0;
    while done < buf.len() {
        match tokio::time::timeout(WRITE_TIMEOUT, io.write(&buf[done..])).await {
            Ok(Ok(0)) => return Err((done, "the connection takes no more data".into())),
            Ok(Ok(n)) => done += n,
            Ok(Err(e)) => return Err((done, e.to_string())),
            Err(_) => return Err((done, "write timed out".into())),
        }
    }
    match tokio::time::timeout(WRITE_TIMEOUT, io.flush()).await {
        Ok(Ok(())) => Ok(()),
        // Flushing failed after every byte was taken: the last record is the one in doubt.
        Ok(Err(e)) => Err((done.saturating_sub(1), e.to_string())),
        Err(_) => Err((done.saturating_sub(1), "flush timed out".into())),
    }
}

pub(super) async fn run(t: Target, mut rx: mpsc::Receiver<Arc<Record>>, c: Arc<Counters>) {
    let mut pending: VecDeque<Arc<Record>> = VecDeque::new();
    let mut conn: Option<Box<dyn Io>> = None;
    let mut backoff = Backoff::new();
    let mut ever_connected = false;
    let mut closed_at: Option<Instant> = None;
    let mut buf = Vec::new();
    let mut msg = Vec::new();
    let mut ends = Vec::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(r) => pending.push_back(r),
                None => return,
            }
        }
        while pending.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => pending.push_back(r),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed_at.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        if past_grace(closed_at) {
            give_up(&mut pending, &mut rx, &c);
            return;
        }

        // A receiver that closed (or restarted) since the last batch: reconnect before
        // writing, so nothing is written into a dead connection.
        if let Some(io) = conn.as_mut()
            && !still_open(io)
        {
            conn = None;
            c.set_connected(false);
            c.error(format!("{} closed the connection", t.url));
        }
        let io = match conn.as_mut() {
            Some(io) => io,
            None => match connect(&t).await {
                Ok(io) => {
                    if ever_connected {
                        c.reconnected();
                    }
                    ever_connected = true;
                    c.set_connected(true);
                    conn.insert(io)
                }
                Err(e) => {
                    c.set_connected(false);
                    c.error(e);
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            },
        };

        buf.clear();
        ends.clear();
        for r in &pending {
            msg.clear();
            append_message(&t.header, r, &mut msg);
            append_frame(&msg, &mut buf);
            ends.push(buf.len());
        }
        match write_all(io, &buf).await {
            Ok(()) => {
                c.delivered(pending.len());
                pending.clear();
                backoff.reset();
            }
            Err((written, e)) => {
                // Frames the connection took whole count as delivered; the one it took part
                // of is lost (resending it could duplicate it); the rest are sent again.
                let whole = ends.iter().take_while(|&&end| end <= written).count();
                c.delivered(whole);
                pending.drain(..whole);
                let started = if whole == 0 { 0 } else { ends[whole - 1] };
                if written > started && !pending.is_empty() {
                    pending.pop_front();
                    c.undeliverable(1);
                }
                conn = None;
                c.set_connected(false);
                c.error(format!("write to {}: {e}", t.url));
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}
