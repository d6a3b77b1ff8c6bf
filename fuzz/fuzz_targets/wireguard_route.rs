//! Datagrams on the broker's WireGuard socket from anyone on the internet.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sekisho_proto::keys::PrivateKey;
use sekisho_proto::wg::Responder;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static R: OnceLock<Responder> = OnceLock::new();
    let r = R.get_or_init(|| Responder::new(PrivateKey::generate()));
    let mut cookie = [0u8; 256];
    let _ = r.route([192, 0, 2, 1].into(), data, &mut cookie);
});
