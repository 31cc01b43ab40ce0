//! Config files and proxy URLs are user input: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transproxy::{config, upstream::ProxyUrl};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = config::check_text(text);
    let _ = ProxyUrl::parse(text, "fuzz");
});
