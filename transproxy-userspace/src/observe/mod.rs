//! What operators see of the tunnels: the open ones and the recent failures (`transproxy
//! status`, [`status`]), one line per tunnel when it ends (`--access-log`, [`access_log`]),
//! counters and a histogram (`--metrics`, [`metrics`]), and failure lines that a process of the
//! cgroup cannot flood ([`failure_log`]).
//!
//! The data path pays little for it: a tunnel registers an entry when it starts and removes it
//! when it ends (a short lock on one of several shards), its byte counts are atomics the relay
//! bumps, and the counters are atomics. Reading status, scraping metrics and writing the access
//! log happen elsewhere (the main runtime, a writer thread), on copies.

pub(crate) mod access_log;
pub(crate) mod failure_log;
mod failures;
pub(crate) mod metrics;
mod open;
pub(crate) mod status;

use std::{
    fmt,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use self::{
    access_log::AccessLog, failure_log::FailureLog, failures::RecentFailures, metrics::Metrics,
    open::OpenTunnels,
};
use crate::{kernel::Process, relay::Progress, sniff::Name, upstream::TunnelError};

/// Where a tunnel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// Reaching the proxy.
    Connecting = 0,
    /// Waiting for the proxy's answer to the tunnel request.
    Opening = 1,
    /// Relaying bytes.
    Relaying = 2,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Opening => "opening",
            Self::Relaying => "relaying",
        }
    }
}

/// One tunnel, from accept to close, as status shows it.
pub(crate) struct TunnelEntry {
    id: u64,
    /// The client's address as the daemon accepted it.
    pub(crate) client: SocketAddr,
    pub(crate) process: Process,
    pub(crate) dst: SocketAddr,
    /// The proxy address it reached (or the destination, when it goes direct).
    upstream: OnceLock<SocketAddr>,
    /// The host name the tunnel was asked for, once known.
    pub(crate) host: OnceLock<Name>,
    /// The name DNS gave the destination (`--dns`), when known: shown next to `host`, which
    /// the client's own bytes may have set to another name.
    pub(crate) dns_name: OnceLock<Name>,
    started: Instant,
    phase: AtomicU8,
    /// Bytes each way, counted by the relay as they move.
    pub(crate) progress: Progress,
}

impl TunnelEntry {
    /// The proxy connection is up, to `addr`.
    /// The destination for log lines: `198.51.100.7:443 (example.org)` once the name the tunnel
    /// was asked for is known.
    pub(crate) fn target(&self) -> String {
        match self.host.get() {
            Some(name) => format!("{} ({name})", self.dst),
            None => self.dst.to_string(),
        }
    }

    pub(crate) fn reached(&self, addr: SocketAddr) {
        let _ = self.upstream.set(addr);
        self.phase.store(Phase::Opening as u8, Ordering::Relaxed);
    }

    /// The tunnel is open: bytes are relayed now.
    pub(crate) fn relaying(&self) {
        self.phase.store(Phase::Relaying as u8, Ordering::Relaxed);
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Connecting,
            1 => Phase::Opening,
            _ => Phase::Relaying,
        }
    }

    pub(crate) fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

/// How a tunnel ended: a closed set of words, stable for the access log's `outcome` and the
/// metrics' `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Outcome {
    /// Relayed until both ends closed.
    Tunnelled,
    /// The proxy said the destination refused or is unreachable (502, 503, 504).
    Refused,
    /// The proxy denied the tunnel (403, 407, ...).
    Denied,
    /// The proxy could not be reached.
    ProxyUnreachable,
    /// The proxy was not reached, or did not answer, in time.
    Timeout,
    /// The proxy's answer was broken, or talking to it failed.
    ProxyError,
    /// The client went away before the tunnel opened.
    ClientGone,
    /// One end reset mid-transfer.
    Reset,
    /// No traffic for the idle limits.
    Idle,
    /// Cut at the end of the shutdown grace.
    Cut,
    /// To a fake address (`--dns fake`) whose name the daemon does not know: handed out
    /// before it restarted.
    NoName,
}

impl Outcome {
    /// Every outcome, for the metrics' label values.
    pub(crate) const ALL: [Self; 11] = [
        Self::Tunnelled,
        Self::Refused,
        Self::Denied,
        Self::ProxyUnreachable,
        Self::Timeout,
        Self::ProxyError,
        Self::ClientGone,
        Self::Reset,
        Self::Idle,
        Self::Cut,
        Self::NoName,
    ];

    pub(crate) fn word(self) -> &'static str {
        match self {
            Self::Tunnelled => "tunnelled",
            Self::Refused => "refused",
            Self::Denied => "denied",
            Self::ProxyUnreachable => "proxy-unreachable",
            Self::Timeout => "timeout",
            Self::ProxyError => "proxy-error",
            Self::ClientGone => "client-gone",
            Self::Reset => "reset",
            Self::Idle => "idle",
            Self::Cut => "cut",
            Self::NoName => "no-name",
        }
    }

    /// The outcome of a tunnel that did not open because of `error`, with the proxy's status
    /// code when it answered.
    pub(crate) fn of(error: &TunnelError) -> (Self, Option<u16>) {
        match error {
            TunnelError::Rejected(rejection) if rejection.destination_unreachable() => {
                (Self::Refused, Some(rejection.code))
            }
            TunnelError::Rejected(rejection) => (Self::Denied, Some(rejection.code)),
            TunnelError::Auth(failure) => (Self::Denied, Some(failure.rejection.code)),
            TunnelError::Socks(failure) if failure.unreachable => (Self::Refused, None),
            TunnelError::Socks(failure) if failure.denied => (Self::Denied, None),
            TunnelError::NoName(_) => (Self::NoName, None),
            TunnelError::Unreachable(_) | TunnelError::Tls(_) => (Self::ProxyUnreachable, None),
            TunnelError::ConnectTimeout(_) | TunnelError::ReplyTimeout(_) => (Self::Timeout, None),
            TunnelError::ClientFailed(_) => (Self::ClientGone, None),
            TunnelError::Io(_)
            | TunnelError::Closed
            | TunnelError::Malformed(_)
            | TunnelError::TooLarge
            | TunnelError::Socks(_)
            | TunnelError::Pac(_)
            | TunnelError::AuthOnNewConnection => (Self::ProxyError, None),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// How a tunnel ended, for [`Observer::closed`].
pub(crate) struct Ending<'a> {
    pub(crate) outcome: Outcome,
    /// The proxy's status code, when it answered the tunnel request with one.
    pub(crate) status: Option<u16>,
    /// One line on what went wrong, for failures.
    pub(crate) detail: Option<&'a dyn fmt::Display>,
    /// Bytes each way, the client's that went ahead of the proxy's reply included.
    pub(crate) up: u64,
    pub(crate) down: u64,
}

/// Everything operators can see, shared by every connection.
pub(crate) struct Observer {
    open: OpenTunnels,
    failures: RecentFailures,
    /// Limits per-connection failure lines.
    pub(crate) log_limit: FailureLog,
    access_log: Option<AccessLog>,
    pub(crate) metrics: Metrics,
    next_id: AtomicU64,
}

impl Observer {
    pub(crate) fn new(access_log: Option<AccessLog>) -> Self {
        Self {
            open: OpenTunnels::default(),
            failures: RecentFailures::default(),
            log_limit: FailureLog::default(),
            access_log,
            metrics: Metrics::default(),
            next_id: AtomicU64::new(1),
        }
    }

    /// A tunnel starts: registered until [`Observer::closed`].
    pub(crate) fn opened(
        &self,
        client: SocketAddr,
        process: Process,
        dst: SocketAddr,
    ) -> Arc<TunnelEntry> {
        let entry = Arc::new(TunnelEntry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            client,
            process,
            dst,
            upstream: OnceLock::new(),
            host: OnceLock::new(),
            dns_name: OnceLock::new(),
            started: Instant::now(),
            phase: AtomicU8::new(Phase::Connecting as u8),
            progress: Progress::default(),
        });
        self.open.insert(&entry);
        self.metrics.opened();
        entry
    }

    /// A tunnel ended: unregistered, counted, logged to the access log, and remembered among
    /// the recent failures if it failed.
    pub(crate) fn closed(&self, entry: &TunnelEntry, ending: &Ending<'_>) {
        self.open.remove(entry);
        self.metrics.closed(ending);
        if !matches!(ending.outcome, Outcome::Tunnelled | Outcome::Cut) {
            let detail = ending.detail.map(ToString::to_string);
            self.failures
                .record(entry, ending.outcome, ending.status, detail.as_deref());
        }
        if let Some(log) = &self.access_log {
            log.write(entry, ending);
        }
    }

    /// Reopens the access log (SIGHUP, after logrotate moved it).
    pub(crate) fn reopen_access_log(&self) {
        if let Some(log) = &self.access_log {
            log.reopen();
        }
    }
}
