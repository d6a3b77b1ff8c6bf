//! Datagrams on the broker's WireGuard socket from anyone on the internet.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sekisho_proto::keys::PrivateKey;
use sekisho_proto::wg::Responder;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    static R: OnceLock<Mutex<(Responder, Instant)>> = OnceLock::new();
    let r = R.get_or_init(|| Mutex::new((Responder::new(PrivateKey::generate()), Instant::now())));
    let mut g = r.lock().unwrap();
    let (responder, now) = &mut *g;
    let mut cookie = [0u8; 256];
    let _ = responder.route([192, 0, 2, 1].into(), data, &mut cookie, *now);
});
