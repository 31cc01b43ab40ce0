//! DNS messages from captured clients (queries) and from resolvers (answers to learn from):
//! reading them and answering every way the responder can must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    transproxy::dns::message::check_bytes(data);
});
