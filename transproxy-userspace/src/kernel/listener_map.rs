//! The programs' `LISTENERS` map, held by the daemon: its listeners are put there at start, and
//! those it opens in other network namespaces (containers) while it runs.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use anyhow::Context as _;
use aya::maps::{Map, MapData, SockHash};
use transproxy_common::{ListenerKey, family, service};

/// The `LISTENERS` sockhash. The kernel drops an entry when its socket closes, so the daemon
/// only ever adds: closing a namespace's listener is what removes it.
pub(crate) struct ListenerMap {
    map: SockHash<MapData, ListenerKey>,
}

impl ListenerMap {
    pub(crate) fn new(map: Map) -> anyhow::Result<Self> {
        Ok(Self {
            map: SockHash::try_from(map).context("the LISTENERS map has an unexpected type")?,
        })
    }

    /// Registers `socket` as the listener of `family` and `service` in namespace `netns`.
    pub(crate) fn register(
        &mut self,
        netns: u64,
        family: u32,
        service: u32,
        socket: BorrowedFd<'_>,
    ) -> anyhow::Result<()> {
        let key = ListenerKey {
            netns,
            family,
            service,
        };
        Ok(self.map.insert(key, socket.as_raw_fd(), 0)?)
    }

    /// Registers the tunnel listeners of namespace `netns`: from now on its intercepted
    /// connects go to them.
    pub(crate) fn serve(
        &mut self,
        netns: u64,
        v4: BorrowedFd<'_>,
        v6: Option<BorrowedFd<'_>>,
    ) -> anyhow::Result<()> {
        self.register(netns, family::V4, service::TUNNEL, v4)
            .context("cannot register a namespace's IPv4 listener with the programs")?;
        if let Some(v6) = v6 {
            self.register(netns, family::V6, service::TUNNEL, v6)
                .context("cannot register a namespace's IPv6 listener with the programs")?;
        }
        Ok(())
    }
}
