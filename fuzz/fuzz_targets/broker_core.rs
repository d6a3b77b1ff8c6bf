//! The broker's data plane (`BrokerState`) driven by any sequence of operations: packets from
//! a real WireGuard client (raw or built: TCP, UDP, echo, ICMP errors, fragments, spoofed
//! sources, the service address), from connector links and from internet egress, time, link
//! and policy changes, handshakes and replays. Every output is checked with the policy as the
//! oracle: nothing reaches a site, the internet or the device unless `Policy::evaluate` allows
//! its flow (see `sekisho_proto::broker::oracle`, which the property test in
//! `proto/src/broker/tests.rs` runs too).
//!
//! The checks that find known, unfixed bugs are left out (`Options::WITHOUT_KNOWN_BUGS`);
//! `SEKISHO_FUZZ_ALL=1` puts them back.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sekisho_proto::broker::oracle::{Options, run};

fuzz_target!(|data: &[u8]| {
    static OPTIONS: OnceLock<Options> = OnceLock::new();
    let options = *OPTIONS.get_or_init(|| {
        if std::env::var_os("SEKISHO_FUZZ_ALL").is_some_and(|v| v == "1") {
            Options::ALL
        } else {
            Options::WITHOUT_KNOWN_BUGS
        }
    });
    run(data, options);
});
