//! The proxy's reply to CONNECT comes from the network: whatever it is, parsing must not panic,
//! and a reply taken as complete must not claim more bytes than arrived.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transproxy::upstream::parse_reply;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(header_len)) = parse_reply(data) {
        assert!(header_len <= data.len());
    }
});
