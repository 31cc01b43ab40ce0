//! Rules come from flags, config files and NO_PROXY: parsing must not panic, and a rule that
//! parses must print back to text that parses to the same rule.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transproxy::policy::{NoProxy, Rule};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(rule) = text.parse::<Rule>() {
        let again: Rule = rule.to_string().parse().expect("a displayed rule parses");
        assert_eq!(again, rule);
    }
    let _ = NoProxy::parse(text);
});
