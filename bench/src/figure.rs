//! The figures the benchmark reports, with their units and which way is better.

/// One measured quantity, reported per contender and upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Figure {
    /// New connections per second (wrk, 32 connections, `Connection: close`, small file).
    ConnectionsPerSecond,
    /// Median request latency at one connection (same request, so it includes the tunnel set-up).
    LatencyP50,
    /// 99th percentile of the same.
    LatencyP99,
    /// One large download through a single connection.
    Throughput,
    /// Interceptor CPU (user + system) per GiB relayed, from the throughput runs.
    CpuPerGib,
    /// Interceptor CPU per 10,000 connections, from the connection-rate runs.
    CpuPer10kConnections,
    /// Interceptor resident memory per idle tunnel.
    RssPerIdleTunnel,
    /// New connections per second to a destination no interception rule matches.
    NonMatchingConnectionsPerSecond,
}

impl Figure {
    /// In report order.
    pub(crate) const ALL: [Figure; 8] = [
        Figure::ConnectionsPerSecond,
        Figure::LatencyP50,
        Figure::LatencyP99,
        Figure::Throughput,
        Figure::CpuPerGib,
        Figure::CpuPer10kConnections,
        Figure::RssPerIdleTunnel,
        Figure::NonMatchingConnectionsPerSecond,
    ];

    /// The JSON key.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Figure::ConnectionsPerSecond => "connections_per_second",
            Figure::LatencyP50 => "latency_p50",
            Figure::LatencyP99 => "latency_p99",
            Figure::Throughput => "throughput",
            Figure::CpuPerGib => "cpu_per_gib",
            Figure::CpuPer10kConnections => "cpu_per_10k_connections",
            Figure::RssPerIdleTunnel => "rss_per_idle_tunnel",
            Figure::NonMatchingConnectionsPerSecond => "non_matching_connections_per_second",
        }
    }

    /// The row label of the markdown table.
    pub(crate) fn label(self, idle_tunnels: usize) -> String {
        match self {
            Figure::ConnectionsPerSecond => {
                "New connections/s (32 conns, `Connection: close`)".into()
            }
            Figure::LatencyP50 => "Latency p50, 1 conn (µs)".into(),
            Figure::LatencyP99 => "Latency p99, 1 conn (µs)".into(),
            Figure::Throughput => "Download of 1 GiB, 1 conn (MiB/s)".into(),
            Figure::CpuPerGib => "Interceptor CPU per GiB (s)".into(),
            Figure::CpuPer10kConnections => "Interceptor CPU per 10,000 conns (s)".into(),
            Figure::RssPerIdleTunnel => {
                format!(
                    "Interceptor RSS per idle tunnel, {} open (KiB)",
                    crate::report::thousands(idle_tunnels as f64)
                )
            }
            Figure::NonMatchingConnectionsPerSecond => {
                "New connections/s, destination no rule matches".into()
            }
        }
    }

    /// The unit, for the JSON file.
    pub(crate) fn unit(self) -> &'static str {
        match self {
            Figure::ConnectionsPerSecond | Figure::NonMatchingConnectionsPerSecond => {
                "connections/s"
            }
            Figure::LatencyP50 | Figure::LatencyP99 => "µs",
            Figure::Throughput => "MiB/s",
            Figure::CpuPerGib | Figure::CpuPer10kConnections => "s",
            Figure::RssPerIdleTunnel => "KiB",
        }
    }

    /// Rates are better high; latency, CPU and memory low.
    pub(crate) fn higher_is_better(self) -> bool {
        matches!(
            self,
            Figure::ConnectionsPerSecond
                | Figure::Throughput
                | Figure::NonMatchingConnectionsPerSecond
        )
    }
}
