//! The pure formatting of the syslog and file sinks.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::json;

use super::abnf::{parse, take_frames};
use crate::logship::syslog::{
    Header, append_frame, append_message, facility_code, header_field, pri, rfc3339_millis,
    sd_escape,
};
use crate::logship::{Record, RecordKind, Severity, file};

fn message(h: &Header, r: &Record) -> Vec<u8> {
    let mut out = Vec::new();
    append_message(h, r, &mut out);
    out
}

#[test]
fn a_message_follows_the_rfc_5424_abnf() {
    let h = Header::new(16, "gw-1.example.net", "sekisho-broker", "4242");
    let body =
        json!({"class_uid": 4001, "src": {"ip": "10.0.0.1"}, "note": "a \"quoted\" ]\n line"});
    let r = Record {
        kind: RecordKind::Flows,
        time_ms: 1_714_564_800_123,
        severity: Severity::Info,
        msgid: "flow".into(),
        body: body.clone(),
    };
    let bytes = message(&h, &r);
    let m = parse(&bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)));
    assert_eq!(m.pri, 134, "local0 (16) × 8 + info (6)");
    assert_eq!(m.version, 1);
    assert_eq!(m.timestamp, "2024-05-01T12:00:00.123Z");
    assert_eq!(m.hostname, "gw-1.example.net");
    assert_eq!(m.app_name, "sekisho-broker");
    assert_eq!(m.procid, "4242");
    assert_eq!(m.msgid, "flow");
    assert_eq!(
        m.sd,
        vec![(
            "sekisho@32473".into(),
            vec![("kind".into(), "flows".into())]
        )]
    );
    // MSG: the body as compact JSON, UTF-8 without a BOM, on one line.
    assert!(!m.msg.starts_with(&[0xEF, 0xBB, 0xBF]));
    assert!(!m.msg.contains(&b'\n'));
    assert_eq!(m.msg, serde_json::to_vec(&body).unwrap());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&m.msg).unwrap(),
        body
    );
}

#[test]
fn every_kind_and_severity_makes_a_valid_message() {
    let h = Header::new(facility_code("authpriv").unwrap(), "h", "a", "1");
    for kind in RecordKind::ALL {
        for (code, severity) in [
            Severity::Emergency,
            Severity::Alert,
            Severity::Critical,
            Severity::Error,
            Severity::Warning,
            Severity::Notice,
            Severity::Info,
            Severity::Debug,
        ]
        .into_iter()
        .enumerate()
        {
            let r = Record {
                kind,
                time_ms: 0,
                severity,
                msgid: String::new(),
                body: json!({}),
            };
            let m = parse(&message(&h, &r)).unwrap();
            assert_eq!(m.pri, 10 * 8 + code as u16);
            assert_eq!(m.msgid, "-", "an empty MSGID is NILVALUE");
            assert_eq!(m.timestamp, "1970-01-01T00:00:00.000Z");
            assert_eq!(m.sd[0].1[0].1, kind.as_str());
        }
    }
}

#[test]
fn pri_is_facility_times_eight_plus_severity() {
    assert_eq!(pri(0, Severity::Emergency), 0);
    assert_eq!(pri(4, Severity::Warning), 36);
    assert_eq!(pri(16, Severity::Notice), 133);
    assert_eq!(pri(23, Severity::Debug), 191);
    assert_eq!(facility_code("local0"), Some(16));
    assert_eq!(facility_code("LOCAL7"), Some(23));
    assert_eq!(facility_code("auth"), Some(4));
    assert_eq!(facility_code("kern"), Some(0));
    assert_eq!(facility_code("local8"), None);
    assert_eq!(facility_code(""), None);
}

#[test]
fn header_fields_are_printable_ascii_truncated_or_nil() {
    assert_eq!(header_field("", 48), "-");
    assert_eq!(header_field("sign in", 32), "sign_in");
    assert_eq!(header_field("tab\there", 32), "tab_here");
    assert_eq!(header_field("hôte", 255), "h_te");
    assert_eq!(header_field("a\u{7f}b", 32), "a_b");
    assert_eq!(header_field(&"m".repeat(40), 32), "m".repeat(32));
    assert_eq!(header_field(&"é".repeat(40), 32), "_".repeat(32));

    // The longest and strangest fields still make a valid message, cut to the RFC's lengths.
    let h = Header::new(16, &"h".repeat(300), &"a p p".repeat(20), "");
    let r = Record {
        kind: RecordKind::Audit,
        time_ms: 1,
        severity: Severity::Notice,
        msgid: "ein sehr langer Ereignisname über 32 Zeichen".into(),
        body: json!({"k": "v"}),
    };
    let m = parse(&message(&h, &r)).unwrap();
    assert_eq!(m.hostname.len(), 255);
    assert_eq!(m.app_name.len(), 48);
    assert_eq!(m.procid, "-");
    assert_eq!(m.msgid, "ein_sehr_langer_Ereignisname__be");
}

#[test]
fn structured_data_values_escape_quote_backslash_and_bracket() {
    assert_eq!(sd_escape(r#"a"b\c]d"#), r#"a\"b\\c\]d"#);
    assert_eq!(sd_escape("plain [x]="), r"plain [x\]=");
    assert_eq!(sd_escape(""), "");
    // And the strict reader gets the value back.
    let raw = format!("<134>1 - h a p m [x@1 v=\"{}\"]", sd_escape(r#"q"b\r]é"#));
    let m = parse(raw.as_bytes()).unwrap();
    assert_eq!(m.sd[0].1[0].1, r#"q"b\r]é"#);
}

#[test]
fn timestamps_are_rfc_3339_utc_with_milliseconds() {
    assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    assert_eq!(
        rfc3339_millis(4_107_542_399_999),
        "2100-02-28T23:59:59.999Z"
    );
    assert_eq!(
        rfc3339_millis(4_107_542_400_000),
        "2100-03-01T00:00:00.000Z"
    );
    assert_eq!(rfc3339_millis(u64::MAX), "9999-12-31T23:59:59.999Z");
    // Against humantime over many instants, leap years and month ends included.
    let mut ms: u64 = 7;
    for _ in 0..20_000 {
        ms = ms
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let t = ms % 253_402_300_800_000;
        let expected = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(t));
        assert_eq!(rfc3339_millis(t), expected.to_string(), "{t}");
    }
}

#[test]
fn frames_are_octet_counted() {
    let h = Header::new(16, "h", "a", "1");
    let mut stream = Vec::new();
    let mut lens = Vec::new();
    for (i, text) in ["short", "ünïcödé 🙂", "x"].into_iter().enumerate() {
        let r = Record {
            kind: RecordKind::Dns,
            time_ms: 1000 * i as u64,
            severity: Severity::Info,
            msgid: "dns".into(),
            body: json!({ "text": text }),
        };
        let msg = message(&h, &r);
        lens.push(msg.len());
        let before = stream.len();
        append_frame(&msg, &mut stream);
        // "MSG-LEN SP SYSLOG-MSG", MSG-LEN counting octets, not characters.
        assert_eq!(
            &stream[before..before + msg.len().to_string().len() + 1],
            format!("{} ", msg.len()).as_bytes()
        );
    }
    let frames = take_frames(&mut stream).unwrap();
    assert!(stream.is_empty());
    assert_eq!(frames.iter().map(Vec::len).collect::<Vec<_>>(), lens);
    let m = parse(&frames[1]).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&m.msg).unwrap();
    assert_eq!(body["text"], "ünïcödé 🙂");
}

#[test]
fn file_lines_are_one_json_object_each() {
    let r = Arc::new(Record {
        kind: RecordKind::Risk,
        time_ms: 1_714_564_800_123,
        severity: Severity::Warning,
        msgid: "risk".into(),
        body: json!({"user": "ana", "text": "two\nlines"}),
    });
    let line = file::json_line(&r);
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(line.iter().filter(|&&c| c == b'\n').count(), 1);
    let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(
        v,
        json!({
            "time": "2024-05-01T12:00:00.123Z",
            "kind": "risk",
            "msgid": "risk",
            "severity": "warning",
            "record": {"user": "ana", "text": "two\nlines"},
        })
    );
}
