//! Connects in network namespaces the daemon does not serve yet, as the programs report them
//! (`UNSERVED`, one event per namespace until the daemon clears it from `UNSERVED_SEEN`).

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use transproxy_common::Unserved;

/// The events and the set that keeps them to one per namespace.
pub(crate) struct UnservedEvents {
    ring: RingBuf<MapData>,
    seen: HashMap<MapData, u64, u8>,
}

/// One report: a process of the cgroup tree connected in a namespace with no listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnservedConnect {
    pub(crate) netns: u64,
    pub(crate) pid: u32,
}

impl UnservedEvents {
    pub(crate) fn new(ring: Map, seen: Map) -> anyhow::Result<Self> {
        Ok(Self {
            ring: RingBuf::try_from(ring).context("the UNSERVED map has an unexpected type")?,
            seen: HashMap::try_from(seen)
                .context("the UNSERVED_SEEN map has an unexpected type")?,
        })
    }

    /// Splits into the event reader (for a task) and the set (to clear entries from).
    pub(crate) fn split(self) -> anyhow::Result<(UnservedReader, UnservedSeen)> {
        Ok((
            UnservedReader {
                // SAFETY: the AsyncFd owns the ring, which owns its descriptor, so the
                // descriptor stays open for as long as it is registered.
                ring: unsafe {
                    AsyncFd::register_with_interest(self.ring, tokio::io::Interest::READABLE)
                }
                .map_err(std::io::Error::from)
                .context("cannot watch the UNSERVED ring")?,
            },
            UnservedSeen { seen: self.seen },
        ))
    }
}

/// Reads the reports as they come. Needs a runtime.
pub(crate) struct UnservedReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl UnservedReader {
    /// The reports that arrived since the last call, waiting for at least one.
    pub(crate) async fn next(&mut self) -> Vec<UnservedConnect> {
        loop {
            let Ok(mut guard) = self.ring.readable_mut().await else {
                return Vec::new();
            };
            let mut found = Vec::new();
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<Unserved>() {
                    // SAFETY: the program writes exactly one `Unserved` per item (checked
                    // long enough above); unaligned, so read as such.
                    let event = unsafe { item.as_ptr().cast::<Unserved>().read_unaligned() };
                    found.push(UnservedConnect {
                        netns: event.netns,
                        pid: event.pid,
                    });
                }
            }
            guard.clear_ready();
            if !found.is_empty() {
                return found;
            }
        }
    }
}

/// The namespaces reported already.
pub(crate) struct UnservedSeen {
    seen: HashMap<MapData, u64, u8>,
}

impl UnservedSeen {
    /// Lets the next connect in `netns` be reported again.
    pub(crate) fn clear(&mut self, netns: u64) {
        let _ = self.seen.remove(&netns);
    }
}
