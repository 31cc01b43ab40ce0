//! The upstream HTTP proxies both interceptors tunnel through.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::Context as _;
use transproxy_tests::{Dante, Squid};

use crate::{process::Guarded, tools::Tools};

/// Which upstream a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Upstream {
    /// Debian's squid (harness configuration: `cache deny all`, loopback only).
    Squid,
    /// tp-fast-proxy: a runtime per core and transproxy's relay, so the upstream is not what
    /// limits the interceptors.
    Fast,
    /// Debian's dante, as a SOCKS5 upstream (no authentication, errors logged only).
    Dante,
}

impl Upstream {
    /// In run order.
    pub(crate) const ALL: [Upstream; 3] = [Upstream::Squid, Upstream::Fast, Upstream::Dante];

    /// The JSON key.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Upstream::Squid => "squid",
            Upstream::Fast => "fast",
            Upstream::Dante => "dante",
        }
    }

    /// The report's heading.
    pub(crate) fn title(self) -> &'static str {
        match self {
            Upstream::Squid => "squid (Debian)",
            Upstream::Fast => "tp-fast-proxy (tokio + splice)",
            Upstream::Dante => "dante (Debian, SOCKS5)",
        }
    }
}

/// A started upstream; stopped on drop.
pub(crate) enum RunningUpstream {
    /// The harness' squid.
    Squid(Squid),
    /// tp-fast-proxy and the address it reported.
    Fast { _proxy: Guarded, addr: SocketAddr },
    /// The harness' dante.
    Dante(Dante),
}

impl RunningUpstream {
    /// Starts it and waits until it accepts.
    pub(crate) fn start(upstream: Upstream, tools: &Tools) -> anyhow::Result<Self> {
        match upstream {
            Upstream::Squid => Ok(Self::Squid(Squid::start(&[]))),
            Upstream::Dante => Ok(Self::Dante(Dante::start_quiet())),
            Upstream::Fast => {
                let mut cmd = Command::new(&tools.fast_proxy);
                cmd.arg("127.0.0.1:0");
                let mut proxy = Guarded::spawn(cmd, "tp-fast-proxy")?;
                let line = proxy.first_line(Duration::from_secs(10))?;
                let addr = line
                    .strip_prefix("listening ")
                    .and_then(|a| a.parse().ok())
                    .with_context(|| format!("tp-fast-proxy said {line:?}"))?;
                Ok(Self::Fast {
                    _proxy: proxy,
                    addr,
                })
            }
        }
    }

    /// Where it listens (127.0.0.1).
    pub(crate) fn addr(&self) -> SocketAddr {
        match self {
            Self::Squid(squid) => squid.addr(),
            Self::Fast { addr, .. } => *addr,
            Self::Dante(dante) => dante.addr(),
        }
    }

    /// The URL given to transproxy's `--proxy`.
    pub(crate) fn url(&self) -> String {
        match self {
            Self::Dante(_) => format!("socks5://{}", self.addr()),
            _ => format!("http://{}", self.addr()),
        }
    }

    /// redsocks' `type` for this upstream.
    pub(crate) fn redsocks_type(&self) -> &'static str {
        match self {
            Self::Dante(_) => "socks5",
            _ => "http-connect",
        }
    }
}
