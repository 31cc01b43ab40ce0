//! One measurement of one contender: what is run, and which figures it yields.

use std::time::Duration;

use anyhow::{Context as _, bail};
use transproxy_tests::wait_for;

use crate::{
    contender::Contender,
    figure::Figure,
    interrupt,
    lineup::Lineup,
    load::{self, HoldClient, Wrk},
    plan::GIB,
    procfs,
    tools::{CURL, WRK},
    upstream::Upstream,
};

/// What the benchmark measures, in the order each repetition visits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// wrk, 32 connections, 2 threads, `Connection: close`: connections/s and CPU per 10k.
    ConnectionRate,
    /// wrk, 1 connection, 1 thread, the same request: p50 and p99.
    Latency,
    /// curl, the large file: throughput and CPU per GiB.
    Download,
    /// tp-client hold, N connections: resident memory per idle tunnel.
    IdleTunnels,
    /// wrk like [`Step::ConnectionRate`], to the address no rule names.
    NonMatching,
}

/// The figures one step produced, and anything odd about them.
#[derive(Default)]
pub(crate) struct Measured {
    /// Each figure's sample from this measurement.
    pub values: Vec<(Figure, f64)>,
    /// Errors the load generator counted, for the report's notes.
    pub problems: Vec<String>,
}

impl Step {
    /// In the order each repetition runs them.
    pub(crate) const ALL: [Step; 5] = [
        Step::ConnectionRate,
        Step::Latency,
        Step::Download,
        Step::IdleTunnels,
        Step::NonMatching,
    ];

    /// For progress lines and notes.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Step::ConnectionRate => "connection rate",
            Step::Latency => "latency",
            Step::Download => "download",
            Step::IdleTunnels => "idle tunnels",
            Step::NonMatching => "non-matching rate",
        }
    }

    /// Idle tunnels: through the fast upstream only (squid caps its connections), and only
    /// where there is an interceptor to weigh. Non-matching traffic never reaches an upstream,
    /// so one run measures it.
    pub(crate) fn applies(self, upstream: Upstream, contender: Contender) -> bool {
        match self {
            Step::IdleTunnels => upstream == Upstream::Fast && contender != Contender::Direct,
            Step::NonMatching => upstream == Upstream::Fast,
            Step::ConnectionRate | Step::Latency | Step::Download => true,
        }
    }

    /// Measures `contender` once.
    pub(crate) fn run(self, lineup: &mut Lineup, contender: Contender) -> anyhow::Result<Measured> {
        match self {
            Step::ConnectionRate => connection_rate(lineup, contender, false),
            Step::NonMatching => connection_rate(lineup, contender, true),
            Step::Latency => latency(lineup, contender),
            Step::Download => download(lineup, contender),
            Step::IdleTunnels => idle_tunnels(lineup, contender),
        }
    }
}

/// The interceptor's CPU seconds so far (`None` for direct).
fn cpu(lineup: &Lineup, contender: Contender) -> anyhow::Result<Option<f64>> {
    lineup
        .interceptor_pid(contender)
        .map(procfs::cpu_seconds)
        .transpose()
}

/// wrk with a new connection per request; to the intercepted origin (connections/s and the
/// interceptor's CPU per 10,000) or to the address no rule names.
fn connection_rate(
    lineup: &Lineup,
    contender: Contender,
    unmatched: bool,
) -> anyhow::Result<Measured> {
    let stage = lineup.stage;
    let _armed = lineup.arm(contender)?;
    let wrk = Wrk {
        connections: 32,
        threads: 2,
        seconds: stage.plan.load_seconds,
        latency: false,
    };
    let url = if unmatched {
        stage.nginx.unmatched_url()
    } else {
        stage.nginx.small_url()
    };
    let before = cpu(lineup, contender)?;
    let report = wrk.run(lineup.client(contender, WRK), &url)?;
    let after = cpu(lineup, contender)?;
    let mut measured = Measured::default();
    if unmatched {
        measured.values.push((
            Figure::NonMatchingConnectionsPerSecond,
            report.ok_per_second,
        ));
    } else {
        measured
            .values
            .push((Figure::ConnectionsPerSecond, report.ok_per_second));
        if let (Some(before), Some(after)) = (before, after)
            && report.requests > 0
        {
            measured.values.push((
                Figure::CpuPer10kConnections,
                (after - before) / report.requests as f64 * 10_000.0,
            ));
        }
    }
    measured.problems.extend(report.problems());
    Ok(measured)
}

/// wrk at one connection: the latency distribution of the same request.
fn latency(lineup: &Lineup, contender: Contender) -> anyhow::Result<Measured> {
    let stage = lineup.stage;
    let _armed = lineup.arm(contender)?;
    let wrk = Wrk {
        connections: 1,
        threads: 1,
        seconds: stage.plan.load_seconds,
        latency: true,
    };
    let report = wrk.run(lineup.client(contender, WRK), &stage.nginx.small_url())?;
    let (Some(p50), Some(p99)) = (report.p50_us, report.p99_us) else {
        bail!("wrk printed no latency distribution");
    };
    Ok(Measured {
        values: vec![(Figure::LatencyP50, p50), (Figure::LatencyP99, p99)],
        problems: report.problems().into_iter().collect(),
    })
}

/// curl fetching the large file: throughput and the interceptor's CPU per GiB.
fn download(lineup: &Lineup, contender: Contender) -> anyhow::Result<Measured> {
    let stage = lineup.stage;
    let _armed = lineup.arm(contender)?;
    let before = cpu(lineup, contender)?;
    let bytes_per_second = load::download(
        lineup.client(contender, CURL),
        &stage.nginx.large_url(),
        stage.plan.download_bytes,
    )?;
    let after = cpu(lineup, contender)?;
    let mut measured = Measured::default();
    measured
        .values
        .push((Figure::Throughput, bytes_per_second / (1 << 20) as f64));
    if let (Some(before), Some(after)) = (before, after) {
        let gib = stage.plan.download_bytes as f64 / GIB as f64;
        measured
            .values
            .push((Figure::CpuPerGib, (after - before) / gib));
    }
    Ok(measured)
}

/// A fresh interceptor, its RSS, then N idle tunnels through it to the holder, its RSS again.
/// The interceptor is restarted first: after earlier load, freed memory the allocator kept
/// would hide what the tunnels cost.
fn idle_tunnels(lineup: &mut Lineup, contender: Contender) -> anyhow::Result<Measured> {
    lineup.restart(contender)?;
    let lineup = &*lineup;
    let stage = lineup.stage;
    let holder = &stage.holder;
    let n = stage.plan.idle_tunnels;
    let pid = lineup
        .interceptor_pid(contender)
        .context("idle tunnels need an interceptor")?;
    holder.release();
    let _armed = lineup.arm(contender)?;
    std::thread::sleep(stage.plan.settle);
    let sockets = procfs::socket_count(pid)?;
    let before = procfs::rss_bytes(pid)?;
    let hold = HoldClient::open(
        lineup.client(contender, &stage.tools.client),
        &holder.addr().to_string(),
        n,
        Duration::from_secs(120),
    )?;
    let all_through = wait_for(Duration::from_secs(60), || {
        (holder.held() >= n || interrupt::requested()).then_some(())
    });
    let reached = holder.held();
    // Let the last tunnels' buffers and tasks settle before reading.
    std::thread::sleep(Duration::from_secs(1));
    let during = procfs::rss_bytes(pid)?;
    drop(hold);
    holder.release();
    // The next measurement should not pay for this one's ten thousand closes.
    let _ = wait_for(Duration::from_secs(30), || {
        procfs::socket_count(pid)
            .is_ok_and(|s| s <= sockets + 2)
            .then_some(())
    });
    if all_through.is_none() || reached < n {
        bail!("only {reached} of {n} idle tunnels reached the origin within 60 s");
    }
    Ok(Measured {
        values: vec![(
            Figure::RssPerIdleTunnel,
            during.saturating_sub(before) as f64 / n as f64 / 1024.0,
        )],
        problems: Vec::new(),
    })
}
