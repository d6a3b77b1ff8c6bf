//! Policy files: any text is either a policy or a located error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sekisho_proto::policy::Policy;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = Policy::parse(std::path::Path::new("fuzz.toml"), text) {
            let _ = e.to_string();
        }
    }
});
