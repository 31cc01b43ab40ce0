//! What a proxy sends to authenticate: `Proxy-Authenticate` values (every scheme's challenge)
//! and NTLM CHALLENGE messages. Reading and answering them must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transproxy::upstream::auth::{challenges, ntlm};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for challenge in challenges(text.split('\n')) {
            let _ = challenge.param("realm");
            let _ = challenge.to_string();
        }
    }
    ntlm::check_challenge(data);
});
