//! How long and how often each figure is measured: the full run and the quick one.

use std::time::Duration;

/// The knobs of one benchmark run, chosen once from `--quick`.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// `--quick`: numbers for development, not for publishing.
    pub quick: bool,
    /// Samples per figure and contender; each repetition visits every figure and contender.
    pub repetitions: usize,
    /// Seconds of each wrk run (connection rate, latency, non-matching traffic).
    pub load_seconds: u32,
    /// Idle tunnels held open for the memory figure.
    pub idle_tunnels: usize,
    /// RLIMIT_NOFILE of every process of the benchmark (set by
    /// [`Plan::fit_descriptor_limit`]).
    pub descriptor_limit: u64,
    /// Size of the large file downloaded for the throughput figure.
    pub download_bytes: u64,
    /// Pause between two samples, so one contender's closing connections do not overlap the
    /// next one's measurement.
    pub settle: Duration,
}

/// 1 GiB, the unit of the throughput and CPU figures.
pub(crate) const GIB: u64 = 1 << 30;

impl Plan {
    /// The numbers to publish: three samples of everything, about eight minutes on 2 cores.
    pub(crate) fn full() -> Self {
        Self {
            quick: false,
            repetitions: 3,
            load_seconds: 5,
            idle_tunnels: 10_000,
            descriptor_limit: 1024,
            download_bytes: GIB,
            settle: Duration::from_millis(500),
        }
    }

    /// Tunnels one process can hold within the descriptor limit: the busiest processes (the
    /// interceptors, the fast proxy) may hold two sockets and two pipes per tunnel.
    pub(crate) fn tunnels_per_process(&self) -> u64 {
        /// Two sockets, and a pipe (two descriptors) per direction.
        const PER_TUNNEL: u64 = 6;
        /// Listeners, logs, maps and the runtime.
        const SPARE: u64 = 256;
        self.descriptor_limit.saturating_sub(SPARE) / PER_TUNNEL
    }

    /// Records the descriptor limit and lowers the idle-tunnel count to what it allows, in
    /// hundreds; returns a note for the report when it had to.
    pub(crate) fn fit_descriptor_limit(&mut self, descriptor_limit: u64) -> Option<String> {
        self.descriptor_limit = descriptor_limit;
        let fits = self.tunnels_per_process() / 100 * 100;
        let fits = usize::try_from(fits).unwrap_or(usize::MAX);
        if fits >= self.idle_tunnels {
            return None;
        }
        let note = format!(
            "idle tunnels: {} instead of {}, the most that the descriptor limit of {descriptor_limit} allows at 6 descriptors per tunnel (raising the hard limit needs CAP_SYS_RESOURCE)",
            fits, self.idle_tunnels
        );
        self.idle_tunnels = fits;
        Some(note)
    }

    /// `--quick`: everything once, briefly; under two minutes.
    pub(crate) fn quick() -> Self {
        Self {
            quick: true,
            repetitions: 1,
            load_seconds: 2,
            idle_tunnels: 1_000,
            descriptor_limit: 1024,
            download_bytes: GIB,
            settle: Duration::from_millis(200),
        }
    }
}
