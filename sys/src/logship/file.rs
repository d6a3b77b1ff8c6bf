//! The file sink: JSON lines `{"time", "kind", "msgid", "severity", "record"}`, appended.
//!
//! Before a line would take the file past `max_bytes`, or once the file is older than
//! `max_age`, the file rotates: FILE.<keep-1> → FILE.<keep> … FILE.1 → FILE.2, FILE → FILE.1,
//! older ones deleted, and a new FILE is opened. The blocking writes run on tokio's blocking
//! pool, a batch at a time.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;

use super::{Counters, FieldError, Origin, Record, RecordKind, Severity, SinkConfig, tls};

pub(super) const DEFAULT_MAX_BYTES: u64 = 64 << 20;
pub(super) const DEFAULT_KEEP: usize = 5;
const MAX_KEEP: usize = 1000;
/// Records written per blocking call at most.
const BATCH: usize = 1024;

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    kind: RecordKind,
    msgid: &'a str,
    severity: Severity,
    record: &'a serde_json::Value,
}

/// One JSON line, with its newline.
pub(super) fn json_line(r: &Record) -> Vec<u8> {
    let line = Line {
        time: super::syslog::rfc3339_millis(r.time_ms),
        kind: r.kind,
        msgid: &r.msgid,
        severity: r.severity,
        record: &r.body,
    };
    let mut out = serde_json::to_vec(&line).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out
}

/// A checked file sink.
#[derive(Debug, Clone)]
pub(super) struct Target {
    path: PathBuf,
    max_bytes: u64,
    max_age: Option<Duration>,
    keep: usize,
}

impl Target {
    pub(super) fn new(config: &SinkConfig, origin: &Origin<'_>) -> Result<Target, FieldError> {
        tls::no_tls_files(
            config.ca.as_deref(),
            config.cert.as_deref(),
            config.key.as_deref(),
            "a file sink has no TLS",
        )?;
        if config.url.is_empty() {
            return Err(FieldError::new("url", "is empty: want a file path"));
        }
        let path = origin.base_dir.join(&config.url);
        if path.is_dir() {
            return Err(FieldError::new(
                "url",
                format!("{} is a directory", path.display()),
            ));
        }
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(FieldError::new(
                "url",
                format!("directory {} does not exist", parent.display()),
            ));
        }
        // Opening now shows a permission problem at start rather than at the first record.
        open(&path)
            .map_err(|e| FieldError::new("url", format!("cannot open {}: {e}", path.display())))?;
        let max_bytes = config.max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
        if max_bytes == 0 {
            return Err(FieldError::new("max_bytes", "must be more than 0"));
        }
        let max_age = match &config.max_age {
            None => None,
            Some(s) => {
                let d = humantime::parse_duration(s).map_err(|e| {
                    FieldError::new("max_age", format!("{s:?}: {e} (e.g. \"1d\", \"12h\")"))
                })?;
                if d.is_zero() {
                    return Err(FieldError::new("max_age", "must be more than 0"));
                }
                Some(d)
            }
        };
        let keep = config.keep.unwrap_or(DEFAULT_KEEP);
        if keep > MAX_KEEP {
            return Err(FieldError::new("keep", format!("at most {MAX_KEEP}")));
        }
        Ok(Target {
            path,
            max_bytes,
            max_age,
            keep,
        })
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The open file and what rotation needs to know about it.
struct Writer {
    target: Target,
    file: Option<File>,
    size: u64,
    opened: SystemTime,
    /// Whether a write failed since the file was last opened (to count reopenings).
    failed: bool,
    /// Only regular files rotate (not /dev/null, a FIFO or a terminal).
    regular: bool,
}

/// What one batch came to.
#[derive(Debug, Default)]
struct Outcome {
    delivered: usize,
    undeliverable: usize,
    reopened: bool,
    error: Option<String>,
}

impl Writer {
    fn new(target: Target) -> Writer {
        Writer {
            target,
            file: None,
            size: 0,
            opened: SystemTime::now(),
            failed: false,
            regular: true,
        }
    }

    fn ensure_open(&mut self, out: &mut Outcome) -> Result<(), String> {
        if self.file.is_some() {
            return Ok(());
        }
        let path = &self.target.path;
        let file = open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let meta = file.metadata().ok();
        self.size = meta.as_ref().map_or(0, |m| m.len());
        self.regular = meta.as_ref().is_none_or(|m| m.is_file());
        // An existing file is as old as its creation time, where the filesystem keeps it.
        self.opened = meta
            .filter(|m| m.len() > 0)
            .and_then(|m| m.created().ok())
            .unwrap_or_else(SystemTime::now);
        self.file = Some(file);
        if self.failed {
            self.failed = false;
            out.reopened = true;
        }
        Ok(())
    }

    /// Whether the file must rotate before `line_len` more bytes, with `pending` bytes not yet
    /// written.
    fn due(&self, pending: u64, line_len: u64) -> bool {
        let size = self.size.saturating_add(pending);
        if size == 0 || !self.regular {
            return false;
        }
        let too_big = size.saturating_add(line_len) > self.target.max_bytes;
        let too_old = self
            .target
            .max_age
            .is_some_and(|age| self.opened.elapsed().is_ok_and(|e| e >= age));
        too_big || too_old
    }

    fn rotate(&mut self) -> Result<(), String> {
        self.file = None;
        let path = &self.target.path;
        let keep = self.target.keep;
        let fail =
            |what: String, e: std::io::Error| format!("rotate {}: {what}: {e}", path.display());
        // Files beyond `keep` (left by a larger `keep` before) go first.
        let mut n = keep.max(1);
        while numbered(path, n).exists() {
            std::fs::remove_file(numbered(path, n))
                .map_err(|e| fail(format!("delete {}", numbered(path, n).display()), e))?;
            n += 1;
        }
        if keep == 0 {
            std::fs::remove_file(path).map_err(|e| fail("delete".into(), e))?;
        } else {
            for i in (1..keep).rev() {
                let from = numbered(path, i);
                if from.exists() {
                    std::fs::rename(&from, numbered(path, i + 1))
                        .map_err(|e| fail(format!("rename {}", from.display()), e))?;
                }
            }
            std::fs::rename(path, numbered(path, 1)).map_err(|e| fail("rename".into(), e))?;
        }
        self.size = 0;
        Ok(())
    }

    /// Writes `buf` holding `n` lines; counts them.
    fn write_out(&mut self, buf: &mut Vec<u8>, n: &mut usize, out: &mut Outcome) {
        if *n == 0 {
            return;
        }
        let result = match self.ensure_open(out) {
            Ok(()) => match self.file.as_mut() {
                Some(f) => f
                    .write_all(buf)
                    .map_err(|e| format!("write {}: {e}", self.target.path.display())),
                None => Err("no file".into()),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.size += buf.len() as u64;
                out.delivered += *n;
            }
            Err(e) => {
                out.undeliverable += *n;
                out.error = Some(e);
                self.file = None;
                self.failed = true;
            }
        }
        buf.clear();
        *n = 0;
    }

    fn write_batch(&mut self, records: &[Arc<Record>]) -> Outcome {
        let mut out = Outcome::default();
        // The size of an existing file is known once it is open; a failure shows in write_out.
        let _ = self.ensure_open(&mut out);
        let mut buf = Vec::new();
        let mut lines = 0;
        for r in records {
            let line = json_line(r);
            if self.due(buf.len() as u64, line.len() as u64) {
                self.write_out(&mut buf, &mut lines, &mut out);
                if let Err(e) = self.rotate() {
                    out.error = Some(e);
                }
            }
            buf.extend_from_slice(&line);
            lines += 1;
        }
        self.write_out(&mut buf, &mut lines, &mut out);
        out
    }
}

pub(super) async fn run(t: Target, mut rx: mpsc::Receiver<Arc<Record>>, c: Arc<Counters>) {
    let mut writer = Some(Writer::new(t.clone()));
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        match rx.recv().await {
            Some(r) => batch.push(r),
            None => return,
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let n = batch.len();
        let mut w = writer.take().unwrap_or_else(|| Writer::new(t.clone()));
        let records = std::mem::take(&mut batch);
        let done = tokio::task::spawn_blocking(move || {
            let out = w.write_batch(&records);
            (w, out, records)
        })
        .await;
        match done {
            Ok((w, out, mut records)) => {
                c.set_connected(w.file.is_some());
                writer = Some(w);
                c.delivered(out.delivered);
                c.undeliverable(out.undeliverable);
                if out.reopened {
                    c.reconnected();
                }
                if let Some(e) = out.error {
                    c.error(e);
                }
                records.clear();
                batch = records;
            }
            Err(e) => {
                c.undeliverable(n);
                c.set_connected(false);
                c.error(format!("file writer failed: {e}"));
            }
        }
    }
}
