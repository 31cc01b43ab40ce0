//! The load generators: wrk for rates and latency, curl for the download, `tp-client hold` for
//! idle tunnels. Each takes a command already placed in the contender's cgroup.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::process::{Guarded, output_within};

/// How a wrk run loads the origin.
pub(crate) struct Wrk {
    /// Connections open at once (`-c`).
    pub connections: u32,
    /// Threads (`-t`).
    pub threads: u32,
    /// Duration (`-d`).
    pub seconds: u32,
    /// Ask for the latency distribution.
    pub latency: bool,
}

/// What a wrk run reports.
#[derive(Debug)]
pub(crate) struct WrkReport {
    /// Responses received, whatever their status.
    pub requests: u64,
    /// Responses with a 2xx or 3xx status, per second.
    pub ok_per_second: f64,
    /// Answers with another status.
    pub non_2xx: u64,
    /// Connect, read, write errors and timeouts.
    pub socket_errors: u64,
    /// Latency percentiles in microseconds, with `--latency`.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

impl Wrk {
    /// Every request on a new connection (`Connection: close`), so each one is a new tunnel.
    pub(crate) fn run(&self, mut cmd: Command, url: &str) -> anyhow::Result<WrkReport> {
        cmd.args([
            "-t",
            &self.threads.to_string(),
            "-c",
            &self.connections.to_string(),
            "-d",
            &format!("{}s", self.seconds),
            "--timeout",
            "5s",
            "-H",
            "Connection: close",
        ]);
        if self.latency {
            cmd.arg("--latency");
        }
        cmd.arg(url);
        let limit = Duration::from_secs(u64::from(self.seconds) + 30);
        let out = output_within(cmd, limit, "wrk")?;
        parse_wrk(&String::from_utf8_lossy(&out.stdout))
    }
}

impl WrkReport {
    /// Requests that did not get a good answer, as a note for the report (`None` if all did).
    pub(crate) fn problems(&self) -> Option<String> {
        (self.non_2xx + self.socket_errors > 0).then(|| {
            format!(
                "{} socket errors and {} non-2xx answers besides {} responses",
                self.socket_errors, self.non_2xx, self.requests
            )
        })
    }
}

/// Reads wrk's summary: request count, rate, errors, and the latency percentiles if asked.
fn parse_wrk(text: &str) -> anyhow::Result<WrkReport> {
    let number = |s: &str| s.trim().trim_end_matches(',').parse::<f64>().ok();
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
    let per_second = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(number)
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let non_2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(number)
        .unwrap_or(0.0) as u64;
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let socket_errors = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|l| l.split_whitespace().filter_map(number).sum::<f64>())
        .unwrap_or(0.0) as u64;
    let percentile = |p: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .and_then(|v| duration_us(v.trim()))
    };
    let ok_share = if requests == 0 {
        0.0
    } else {
        requests.saturating_sub(non_2xx) as f64 / requests as f64
    };
    Ok(WrkReport {
        requests,
        ok_per_second: per_second * ok_share,
        non_2xx,
        socket_errors,
        p50_us: percentile("50%"),
        p99_us: percentile("99%"),
    })
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.00s`, `1.00m`.
fn duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(value * scale)
}

/// One download with curl (told to use no proxy of its own); returns the bytes per second,
/// after checking that all `expected` bytes arrived.
pub(crate) fn download(mut cmd: Command, url: &str, expected: u64) -> anyhow::Result<f64> {
    cmd.args([
        "--noproxy",
        "*",
        "--silent",
        "--show-error",
        "--max-time",
        "300",
        "--output",
        "/dev/null",
        "--write-out",
        "%{size_download} %{speed_download}",
        url,
    ]);
    let out = output_within(cmd, Duration::from_secs(330), "curl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    let (Some(Some(size)), Some(Some(speed))) = (fields.next(), fields.next()) else {
        bail!("curl wrote {text:?}");
    };
    if size as u64 != expected {
        bail!("curl received {size} bytes of {expected}");
    }
    Ok(speed)
}

/// `tp-client hold ADDR N` running: N idle connections open until this is dropped.
pub(crate) struct HoldClient {
    process: Guarded,
}

impl HoldClient {
    /// Starts the client and waits (up to `limit`) until it says all N connections are open.
    pub(crate) fn open(
        mut cmd: Command,
        addr: &str,
        n: usize,
        limit: Duration,
    ) -> anyhow::Result<Self> {
        cmd.args(["hold", addr, &n.to_string()])
            .stdin(Stdio::piped());
        let mut process = Guarded::spawn(cmd, "tp-client hold")?;
        let line = process.first_line(limit)?;
        if line != "ready" {
            bail!("tp-client hold said {line:?}");
        }
        Ok(Self { process })
    }
}

impl Drop for HoldClient {
    fn drop(&mut self) {
        // End of stdin is its signal to close everything and exit; the guard then reaps it.
        drop(self.process.child().stdin.take());
        let _ = transproxy_tests::wait_for(Duration::from_secs(5), || {
            (!self.process.alive()).then_some(())
        });
    }
}
