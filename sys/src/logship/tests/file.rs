//! The file sink: JSON lines, rotation by size and age, files kept.

use std::path::Path;
use std::time::Duration;

use super::{rec, stats};
use crate::logship::{RecordKind, Shipper, SinkConfig, SinkKind};

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn seq(v: &serde_json::Value) -> u64 {
    v["record"]["seq"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_rotates_by_size_and_keeps_the_newest_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SinkConfig::new(SinkKind::File, "logs/sekisho.jsonl");
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    config.max_bytes = Some(1000);
    config.keep = Some(2);
    // Relative to the base directory.
    let s = Shipper::start(&[config], "sekisho-broker", "h", dir.path()).unwrap();
    let path = dir.path().join("logs/sekisho.jsonl");
    for i in 0..100 {
        s.send(rec(RecordKind::Flows, i));
        if i % 10 == 9 {
            // Several batches, so rotation happens between and within them.
            s.flush(Duration::from_secs(5)).await;
        }
    }
    s.flush(Duration::from_secs(5)).await;
    let st = stats(&s);
    assert_eq!(
        (st.delivered, st.queued, st.dropped_undeliverable),
        (100, 0, 0),
        "{st:#?}"
    );
    assert!(st.connected);
    let numbered = |n: usize| dir.path().join(format!("logs/sekisho.jsonl.{n}"));
    assert!(numbered(1).exists() && numbered(2).exists());
    assert!(!numbered(3).exists(), "only 2 rotated files kept");
    let mut seqs = Vec::new();
    for p in [numbered(2), numbered(1), path.clone()] {
        let size = std::fs::metadata(&p).unwrap().len();
        assert!(size <= 1000, "{} is {size} bytes", p.display());
        let ls = lines(&p);
        assert!(!ls.is_empty());
        for l in &ls {
            assert_eq!(l["kind"], "flows");
            assert_eq!(l["msgid"], "flow");
            assert!(l["time"].as_str().unwrap().ends_with('Z'));
            assert!(l["severity"] == "info" || l["severity"] == "warning");
        }
        seqs.extend(ls.iter().map(seq));
    }
    // The kept files hold the newest records, in order, up to the last one.
    let first = seqs[0];
    assert_eq!(seqs, (first..100).collect::<Vec<_>>());
    assert!(first > 0, "older files were deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_rotates_by_age_and_appends_to_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, "{\"old\":true}\n").unwrap();
    let mut config = SinkConfig::new(SinkKind::File, path.to_str().unwrap());
    config.max_age = Some("1s".into());
    let s = Shipper::start(&[config], "a", "h", Path::new("/nonexistent")).unwrap();
    s.send(rec(RecordKind::Events, 1));
    s.flush(Duration::from_secs(5)).await;
    let now = lines(&path);
    // The file is new enough: the record is appended after what was there.
    assert_eq!(now.len(), 2);
    assert_eq!(now[0]["old"], true);
    assert_eq!(seq(&now[1]), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.send(rec(RecordKind::Events, 2));
    s.flush(Duration::from_secs(5)).await;
    let current = lines(&path);
    assert_eq!(current.len(), 1);
    assert_eq!(seq(&current[0]), 2);
    let rotated = lines(&dir.path().join("events.jsonl.1"));
    assert_eq!(seq(rotated.last().unwrap()), 1);
    assert_eq!(stats(&s).delivered, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_write_errors_are_counted_and_the_file_is_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let mut config = SinkConfig::new(SinkKind::File, "sub/x.jsonl");
    config.max_bytes = Some(200);
    config.keep = Some(1);
    let s = Shipper::start(&[config], "a", "h", dir.path()).unwrap();
    s.send(rec(RecordKind::Dns, 0));
    s.flush(Duration::from_secs(5)).await;
    assert_eq!(stats(&s).delivered, 1);
    // The directory disappears: rotation and reopening fail, records are counted as lost.
    std::fs::remove_dir_all(&sub).unwrap();
    for i in 1..4 {
        s.send(rec(RecordKind::Dns, i));
    }
    s.flush(Duration::from_secs(5)).await;
    let st = stats(&s);
    assert_eq!(st.delivered + st.dropped_undeliverable, 4, "{st:#?}");
    assert!(st.dropped_undeliverable >= 2, "{st:#?}");
    assert!(st.last_error.is_some());
    // It comes back: writing resumes.
    std::fs::create_dir(&sub).unwrap();
    s.send(rec(RecordKind::Dns, 9));
    s.flush(Duration::from_secs(5)).await;
    let st = stats(&s);
    assert_eq!(st.delivered + st.dropped_undeliverable, 5, "{st:#?}");
    assert_eq!(seq(lines(&sub.join("x.jsonl")).last().unwrap()), 9);
    assert!(st.connected && st.reconnects >= 1, "{st:#?}");
}
