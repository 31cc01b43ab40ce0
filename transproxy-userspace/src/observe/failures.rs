//! The last failures, by destination, for status: why tunnels to where did not open or broke,
//! how often, and which process tried last. Bounded: the oldest destination makes room.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Mutex, PoisonError},
    time::SystemTime,
};

use super::{Outcome, TunnelEntry};
use crate::kernel::Process;

/// How many destinations are remembered.
const DESTINATIONS: usize = 256;

/// The last failure to one destination.
#[derive(Clone)]
pub(super) struct Failure {
    pub(super) dst: SocketAddr,
    pub(super) outcome: Outcome,
    pub(super) status: Option<u16>,
    pub(super) detail: Option<String>,
    pub(super) count: u64,
    pub(super) last: SystemTime,
    pub(super) process: Process,
}

#[derive(Default)]
pub(super) struct RecentFailures {
    by_dst: Mutex<HashMap<SocketAddr, Failure>>,
}

impl RecentFailures {
    pub(super) fn record(
        &self,
        entry: &TunnelEntry,
        outcome: Outcome,
        status: Option<u16>,
        detail: Option<&str>,
    ) {
        let mut by_dst = self.by_dst.lock().unwrap_or_else(PoisonError::into_inner);
        let count = by_dst.get(&entry.dst).map_or(0, |f| f.count) + 1;
        if count == 1 && by_dst.len() >= DESTINATIONS {
            let oldest = by_dst.values().min_by_key(|f| f.last).map(|f| f.dst);
            if let Some(oldest) = oldest {
                by_dst.remove(&oldest);
            }
        }
        by_dst.insert(
            entry.dst,
            Failure {
                dst: entry.dst,
                outcome,
                status,
                detail: detail.map(str::to_owned),
                count,
                last: SystemTime::now(),
                process: entry.process,
            },
        );
    }

    /// The failures, the latest first.
    pub(super) fn all(&self) -> Vec<Failure> {
        let mut all: Vec<Failure> = self
            .by_dst
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|f| std::cmp::Reverse(f.last));
        all
    }
}
