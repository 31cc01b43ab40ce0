//! The interception decision: does this destination go through the proxy?
//!
//! Semantics follow `NO_PROXY` habits: a connection is intercepted when it matches an include
//! (or there are no includes) and matches no exclude. Built-in exclusions (loopback, link-local,
//! multicast, the proxy itself) arrive from userspace as ordinary exclude rules.

use aya_ebpf::maps::lpm_trie::Key;
use transproxy_common::{MAX_PORT_RULES, PortRules, verdict};

use crate::maps::{HAS_INCLUDES, RULES_V4};

/// Whether a connect to `ip_be:port` (address in network byte order) is to be tunnelled.
#[inline(always)]
pub fn intercepts_v4(ip_be: u32, port: u16) -> bool {
    let key = Key::new(32, ip_be.to_ne_bytes());
    let default = HAS_INCLUDES.load() == 0;
    match RULES_V4.get(&key) {
        Some(rules) => decide(rules, port, default),
        None => default,
    }
}

/// Applies the port rules of the longest matching prefix. `default` is the verdict when no
/// include matches: true when the user gave no include at all.
#[inline(always)]
fn decide(rules: &PortRules, port: u16, default: bool) -> bool {
    let mut included = default;
    let len = rules.len as usize;
    // Bounded by a constant so the verifier sees a finite loop.
    for i in 0..MAX_PORT_RULES {
        if i >= len {
            break;
        }
        let rule = &rules.rules[i];
        if port < rule.first || port > rule.last {
            continue;
        }
        if rule.verdict == verdict::EXCLUDE {
            return false;
        }
        if rule.verdict == verdict::INCLUDE {
            included = true;
        }
    }
    included
}
