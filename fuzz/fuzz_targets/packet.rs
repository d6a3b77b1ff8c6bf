//! Every byte string a client or connector can send: classification and deny replies.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sekisho_proto::packet::{addresses, classify, deny_reply};

fuzz_target!(|data: &[u8]| {
    let _ = classify(data);
    let _ = addresses(data);
    let mut out = [0u8; 1500];
    if let Some(n) = deny_reply(data, &mut out) {
        assert!(n <= out.len());
        // A reply is itself a well-formed packet.
        assert!(classify(&out[..n]).is_ok());
    }
});
