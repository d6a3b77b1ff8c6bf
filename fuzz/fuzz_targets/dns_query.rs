//! The client stub's query path: any bytes that reach the stub (over UDP or TCP) get a plan, and
//! every answer it builds parses, fits UDP's limit and never panics; the broker's application
//! answer likewise. The plan must also agree with the question's labels as they are on the wire:
//! a name in the private zone goes to the broker, a listed name (or one below it) that is not
//! allowlisted is answered at once, anything else is resolved upstream.
#![no_main]
use std::net::IpAddr;
use std::sync::LazyLock;

use hickory_proto::op::{Message, ResponseCode};
use libfuzzer_sys::fuzz_target;
use sekisho_proto::dns::{
    AppName, BlockAnswer, Plan, Request, UDP_MAX, answer, app_answer, blocked_answer, parse,
    plan, servfail,
};
use sekisho_proto::dnsfilter::{Filter, FilterBuilder, ListFormat};

static FILTER: LazyLock<Filter> = LazyLock::new(|| {
    let mut b = FilterBuilder::new();
    b.add_list(
        "fuzz",
        "malware",
        ListFormat::Domains,
        "blocked.example\nbad.example\n*.wild.example\nxn--bcher-kva.example\n",
    );
    b.allow("fine.bad.example");
    b.build()
});
static ZONES: LazyLock<Vec<String>> = LazyLock::new(|| vec!["corp.example".into()]);

fn parses(what: &str, bytes: &[u8], udp: bool, input: &[u8]) {
    if let Err(e) = Message::from_vec(bytes) {
        panic!("{what} does not parse ({e}): answer {bytes:02x?} to query {input:02x?}");
    }
    if udp {
        assert!(
            bytes.len() <= UDP_MAX,
            "{what} over UDP is {} bytes (> {UDP_MAX})",
            bytes.len()
        );
    }
}

fn check_request(req: &Request, udp: bool, input: &[u8]) {
    assert!(req.limit >= 512, "limit {}", req.limit);
    let a = answer(req, ResponseCode::NoError, vec![], vec![]);
    parses("empty answer", &a, udp, input);
    let n = blocked_answer(req, &BlockAnswer::Null);
    parses("null block answer", &n, udp, input);
    let s = servfail(req);
    parses("servfail", &s, udp, input);
}

/// True when the labels end with `suffix` (labels compared as bytes, ASCII case ignored).
fn below(labels: &[Vec<u8>], suffix: &[&str]) -> bool {
    labels.len() >= suffix.len()
        && labels[labels.len() - suffix.len()..]
            .iter()
            .zip(suffix)
            .all(|(l, s)| l.eq_ignore_ascii_case(s.as_bytes()))
}

/// What the stub should do with this question, from its wire labels (the lists above).
fn expected(req: &Request) -> &'static str {
    let labels: Vec<Vec<u8>> = req.query.name().iter().map(<[u8]>::to_vec).collect();
    if below(&labels, &["corp", "example"]) {
        "private"
    } else if below(&labels, &["fine", "bad", "example"]) {
        "upstream"
    } else if [
        &["blocked", "example"][..],
        &["bad", "example"],
        &["wild", "example"],
        &["xn--bcher-kva", "example"],
    ]
    .iter()
    .any(|s| below(&labels, s))
    {
        "reply"
    } else {
        "upstream"
    }
}

fuzz_target!(|data: &[u8]| {
    for udp in [true, false] {
        let want = parse(data, udp).ok().map(|r| (expected(&r), r.query.name().clone()));
        for block in [BlockAnswer::NxDomain, BlockAnswer::Null] {
            let (p, _event) = plan(data, udp, &ZONES, &FILTER, &block);
            let got = match p {
                Plan::Reply(bytes) => {
                    parses("reply", &bytes, udp, data);
                    "reply"
                }
                Plan::Upstream(req) => {
                    check_request(&req, udp, data);
                    "upstream"
                }
                Plan::Private(req) => {
                    check_request(&req, udp, data);
                    "private"
                }
                Plan::Drop => "drop",
            };
            if let Some((want, name)) = &want {
                let labels: Vec<String> =
                    name.iter().map(|l| String::from_utf8_lossy(l).into_owned()).collect();
                assert_eq!(got, *want, "question labels {labels:?} (text {name})");
            }
        }
    }
    let entitled: Vec<IpAddr> = vec!["100.119.0.7".parse().unwrap(), "fd00::7".parse().unwrap()];
    if let Some(a) = app_answer(data, |_| AppName::Entitled(entitled)) {
        parses("app answer", &a, true, data);
    }
});
