//! A client's first bytes (TLS ClientHello, HTTP request, anything): reading the host name
//! must not panic, and a name found is one (it goes into a CONNECT request line). Reading more
//! of the same bytes never takes a name back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transproxy::sniff::{Name, Sniffed, sniff};

fuzz_target!(|data: &[u8]| {
    let whole = sniff(data);
    if let Sniffed::Name(name) = &whole {
        assert_eq!(Name::parse(name.as_str()).as_ref(), Some(name));
        assert!(!name.as_str().contains(['\r', '\n', ' ', ':', '/']));
    }
    // A prefix that already tells a name tells the same one.
    for cut in [1, data.len() / 2] {
        if let Some(prefix) = data.get(..cut)
            && let (Sniffed::Name(early), Sniffed::Name(late)) = (sniff(prefix), &whole)
        {
            assert_eq!(&early, late);
        }
    }
});
