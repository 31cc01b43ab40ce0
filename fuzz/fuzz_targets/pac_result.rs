//! What a PAC script returns (`PROXY host:port; DIRECT`): written by whoever wrote the PAC
//! file. Reading it must not panic, and what it accepts must show again as it was read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transproxy::pac::result;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(hops) = result::parse(text)
    {
        assert!(!hops.is_empty());
        for hop in hops {
            let _ = hop.to_string();
        }
    }
});
