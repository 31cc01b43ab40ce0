//! `--access-log PATH|-`: one JSON object per line for each tunnel when it ends.
//!
//! JSON lines, because scripts and log shippers read them without a parser of our own; the
//! fields are stable (new ones may be added, none renamed or removed):
//! `time` (RFC 3339, UTC, when the tunnel ended), `pid`, `command`, `uid`, `cgroup` (path, or
//! null once the cgroup is gone), `client`, `destination`, `host` (the name the tunnel was asked
//! for, or null), `dns_name` (the name DNS gave the destination with `--dns`, or null: it may
//! differ from `host`, which the client's own bytes tell), `upstream` (the proxy address reached, the destination itself when NO_PROXY
//! sent it direct, or null), `outcome` (`tunnelled`, `refused`,
//! `denied`, `timeout`, `reset`, `proxy-unreachable`, `proxy-error`, `client-gone`, `idle`,
//! `cut`, `no-name`), `status` (the proxy's status code, or null), `bytes_up`, `bytes_down`,
//! `duration_ms`, `error` (one line, or null).
//!
//! Lines are formatted and written by a thread of their own, so a slow disk never holds a
//! tunnel up; if it falls more than [`QUEUE`] lines behind, lines are dropped and counted. On
//! SIGHUP the file is reopened, for logrotate.

use std::{
    collections::{HashMap, HashSet},
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write as _},
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::SystemTime,
};

use anyhow::Context as _;
use serde::Serialize;
use tracing::warn;

use super::{Ending, TunnelEntry};
use crate::kernel::cgroup;

/// Lines that may wait for the writer.
const QUEUE: usize = 8_192;

/// One line, as the writer thread gets it.
struct Line {
    ended: SystemTime,
    pid: u32,
    command: String,
    uid: u32,
    cgroup_id: u64,
    client: SocketAddr,
    destination: SocketAddr,
    host: Option<String>,
    dns_name: Option<String>,
    upstream: Option<SocketAddr>,
    outcome: &'static str,
    status: Option<u16>,
    bytes_up: u64,
    bytes_down: u64,
    duration_ms: u64,
    error: Option<String>,
}

/// The line as written.
#[derive(Serialize)]
struct Record<'a> {
    time: String,
    pid: u32,
    command: &'a str,
    uid: u32,
    cgroup: Option<String>,
    client: String,
    destination: String,
    host: Option<&'a str>,
    dns_name: Option<&'a str>,
    upstream: Option<String>,
    outcome: &'a str,
    status: Option<u16>,
    bytes_up: u64,
    bytes_down: u64,
    duration_ms: u64,
    error: Option<&'a str>,
}

enum Message {
    Line(Box<Line>),
    Reopen,
}

/// Where the lines go.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Stdout,
    File(PathBuf),
}

impl Target {
    /// `-` is standard output; anything else a file, appended to.
    pub(crate) fn parse(text: &str) -> Self {
        if text == "-" {
            Self::Stdout
        } else {
            Self::File(PathBuf::from(text))
        }
    }

    fn open(&self) -> io::Result<Box<dyn io::Write + Send>> {
        match self {
            Self::Stdout => Ok(Box::new(io::stdout())),
            Self::File(path) => {
                let file: File = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(path)?;
                Ok(Box::new(file))
            }
        }
    }
}

/// The access log: a queue to its writer thread.
pub(crate) struct AccessLog {
    queue: SyncSender<Message>,
    /// Lines dropped because the writer fell behind.
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens `target` (before privileges are dropped, so a root-only folder works) and starts
    /// the writer thread.
    pub(crate) fn start(target: Target) -> anyhow::Result<Self> {
        let out = target
            .open()
            .with_context(|| format!("cannot open the access log {target:?}"))?;
        let (queue, lines) = sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        std::thread::Builder::new()
            .name("transproxy-access-log".into())
            .spawn(move || write_lines(out, target, lines))
            .context("cannot start the access log's thread")?;
        Ok(Self { queue, dropped })
    }

    /// Queues the line of a tunnel that ended.
    pub(super) fn write(&self, entry: &TunnelEntry, ending: &Ending<'_>) {
        let line = Line {
            ended: SystemTime::now(),
            pid: entry.process.pid,
            command: entry.process.command().into_owned(),
            uid: entry.process.uid,
            cgroup_id: entry.process.cgroup,
            client: entry.client,
            destination: entry.dst,
            host: entry.host.get().map(ToString::to_string),
            dns_name: entry.dns_name.get().map(ToString::to_string),
            upstream: entry.upstream.get().copied(),
            outcome: ending.outcome.word(),
            status: ending.status,
            bytes_up: ending.up,
            bytes_down: ending.down,
            duration_ms: entry.age().as_millis().min(u128::from(u64::MAX)) as u64,
            error: ending.detail.map(ToString::to_string),
        };
        match self.queue.try_send(Message::Line(Box::new(line))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    warn!("the access log is behind: {dropped} lines dropped so far");
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Reopens the file (logrotate moved it away).
    pub(super) fn reopen(&self) {
        let _ = self.queue.try_send(Message::Reopen);
    }
}

/// The writer thread: formats and writes lines until the daemon ends, flushing whenever the
/// queue is empty.
fn write_lines(out: Box<dyn io::Write + Send>, target: Target, lines: Receiver<Message>) {
    let mut out = BufWriter::new(out);
    let mut cgroups = CgroupPaths::default();
    while let Ok(message) = lines.recv() {
        let mut next = Some(message);
        while let Some(message) = next {
            match message {
                Message::Line(line) => {
                    let cgroup = cgroups.path(line.cgroup_id);
                    let record = Record {
                        time: humantime::format_rfc3339_millis(line.ended).to_string(),
                        pid: line.pid,
                        command: &line.command,
                        uid: line.uid,
                        cgroup,
                        client: line.client.to_string(),
                        destination: line.destination.to_string(),
                        host: line.host.as_deref(),
                        dns_name: line.dns_name.as_deref(),
                        upstream: line.upstream.map(|a| a.to_string()),
                        outcome: line.outcome,
                        status: line.status,
                        bytes_up: line.bytes_up,
                        bytes_down: line.bytes_down,
                        duration_ms: line.duration_ms,
                        error: line.error.as_deref(),
                    };
                    if serde_json::to_writer(&mut out, &record).is_ok() {
                        let _ = out.write_all(b"\n");
                    }
                }
                Message::Reopen => {
                    let _ = out.flush();
                    match target.open() {
                        Ok(reopened) => out = BufWriter::new(reopened),
                        Err(err) => warn!("cannot reopen the access log {target:?}: {err}"),
                    }
                }
            }
            next = lines.try_recv().ok();
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

/// cgroup paths by id, looked up when first seen (a walk of the hierarchy).
#[derive(Default)]
struct CgroupPaths {
    known: HashMap<u64, Option<String>>,
}

impl CgroupPaths {
    fn path(&mut self, id: u64) -> Option<String> {
        if self.known.len() > 4_096 {
            self.known.clear();
        }
        self.known
            .entry(id)
            .or_insert_with(|| {
                cgroup::paths_by_id(&HashSet::from([id]))
                    .remove(&id)
                    .map(|p| p.display().to_string())
            })
            .clone()
    }
}
