//! The open tunnels, for status: a few shards of entries by id, so that tunnels starting and
//! ending on different workers rarely wait for one another, and a status read holds each shard
//! only while it copies the entries out.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use super::TunnelEntry;

/// How many shards: a power of two above the worker count of any machine this runs on.
const SHARDS: usize = 16;

#[derive(Default)]
pub(super) struct OpenTunnels {
    shards: [Mutex<HashMap<u64, Arc<TunnelEntry>>>; SHARDS],
}

impl OpenTunnels {
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Arc<TunnelEntry>>> {
        &self.shards[id as usize % SHARDS]
    }

    pub(super) fn insert(&self, entry: &Arc<TunnelEntry>) {
        self.shard(entry.id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(entry.id, Arc::clone(entry));
    }

    pub(super) fn remove(&self, entry: &TunnelEntry) {
        self.shard(entry.id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&entry.id);
    }

    /// Every open tunnel, oldest first.
    pub(super) fn all(&self) -> Vec<Arc<TunnelEntry>> {
        let mut all: Vec<Arc<TunnelEntry>> = self
            .shards
            .iter()
            .flat_map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by_key(|entry| entry.id);
        all
    }
}
