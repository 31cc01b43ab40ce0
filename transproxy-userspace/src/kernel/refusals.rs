//! Refused stays refused.
//!
//! A transparent proxy accepts the client's handshake before it asks the proxy, so a refused or
//! unreachable destination normally looks like a connection that opened and then broke, and a
//! client with several addresses never tries the next one. When the proxy reports such a
//! destination, it is written to a kernel map with a short time-to-live; until then, connect4
//! and connect6 fail connects to it with `ECONNREFUSED` at once, exactly as a direct connect
//! would have failed, and the client moves on.

use std::{net::SocketAddr, sync::Mutex, time::Duration};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData};
use nix::{
    sys::time::TimeSpec,
    time::{ClockId, clock_gettime},
};
use tracing::{debug, info};
use transproxy_common::Endpoint;

use super::original_dst::endpoint;

/// The kernel's list of destinations to refuse.
pub(crate) struct Refusals {
    map: Mutex<HashMap<MapData, Endpoint, u64>>,
    ttl: Duration,
}

impl Refusals {
    pub(crate) fn new(map: Map, ttl: Duration) -> anyhow::Result<Self> {
        let map = HashMap::try_from(map).context("the REFUSED map has an unexpected type")?;
        Ok(Self {
            map: Mutex::new(map),
            ttl,
        })
    }

    /// Refuses connects to `dst` for the time-to-live, starting now. A zero TTL disables it.
    pub(crate) fn record(&self, dst: SocketAddr) {
        if self.ttl.is_zero() {
            return;
        }
        // The kernel compares against bpf_ktime_get_ns, which is CLOCK_MONOTONIC.
        let expiry =
            monotonic_ns().saturating_add(self.ttl.as_nanos().min(u128::from(u64::MAX)) as u64);
        let Ok(mut map) = self.map.lock() else { return };
        match map.insert(endpoint(dst), expiry, 0) {
            Ok(()) => info!(
                "{dst}: refused or unreachable; connects to it fail at once for {:?}",
                self.ttl
            ),
            Err(err) => debug!("{dst}: cannot remember the refusal: {err}"),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).unwrap_or_else(|_| TimeSpec::new(0, 0));
    (now.tv_sec() as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec() as u64)
}
