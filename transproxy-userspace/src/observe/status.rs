//! A running daemon's status, and the control socket it answers on.
//!
//! The daemon listens on `/run/transproxy/<pid>.sock`, in a folder only root can enter, and
//! answers only root (checked by the peer's credentials too). One request per connection, one
//! line ([`Request`]):
//! * `status`: the daemon's status as one JSON document ([`DaemonStatus`]), which `transproxy
//!   status` reads (and shows, or passes on with `--json`). The document's fields are stable:
//!   new ones may be added, none renamed.
//! * `serve pid PID` and `serve netns PATH`: a runtime's hook asks the daemon to serve a
//!   container's network namespace before its process runs ([`crate::containers`]); the answer
//!   is one line, `ok ...` or `error ...`.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::debug;

use super::Observer;
use crate::kernel::cgroup;

/// Where daemons put their control sockets.
pub(crate) const RUN_DIR: &str = "/run/transproxy";

/// How long a client may take to ask.
const REQUEST_WAIT: Duration = Duration::from_secs(2);

/// One daemon, as `transproxy status --json` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct DaemonStatus {
    pub(crate) pid: u32,
    pub(crate) version: String,
    pub(crate) uptime_secs: f64,
    /// The cgroup whose processes are intercepted.
    pub(crate) cgroup: String,
    /// What is intercepted, through which proxy, where it arrives: the ready line.
    pub(crate) intercepting: String,
    /// The proxy, credentials masked.
    pub(crate) proxy: String,
    pub(crate) proxy_addrs: Vec<String>,
    /// Each proxy of the list, in order, with its state.
    #[serde(default)]
    pub(crate) proxies: Vec<ProxyStatus>,
    pub(crate) listeners: Vec<String>,
    /// Where the kill switch's pins are, with `--fail-closed`.
    pub(crate) kill_switch: Option<String>,
    /// The DNS mode and what it knows: `forward, 12 names learned`, `fake, 3 addresses`.
    #[serde(default)]
    pub(crate) dns: Option<String>,
    /// The DNS responder's sockets, as `ADDR/udp` and `ADDR/tcp`.
    #[serde(default)]
    pub(crate) dns_listeners: Vec<String>,
    /// The other network namespaces served (containers), with their listeners.
    #[serde(default)]
    pub(crate) namespaces: Vec<crate::containers::NamespaceStatus>,
    pub(crate) counters: Counters,
    /// The open tunnels, oldest first.
    pub(crate) tunnels: Vec<TunnelStatus>,
    /// The last failure to each destination, latest first.
    pub(crate) failures: Vec<FailureStatus>,
}

/// Counts since the daemon started.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Counters {
    pub(crate) accepted: u64,
    pub(crate) not_redirected: u64,
    pub(crate) over_capacity: u64,
    /// Tunnels open now.
    pub(crate) open: u64,
    /// Tunnels ended, by outcome (the access log's words).
    pub(crate) outcomes: std::collections::BTreeMap<String, u64>,
}

impl std::fmt::Display for Counters {
    /// `12 accepted, 3 open; ended: 8 tunnelled, 1 refused; 0 not redirected, 0 over capacity`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ended: Vec<String> = self
            .outcomes
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(word, n)| format!("{n} {word}"))
            .collect();
        let ended = if ended.is_empty() {
            "none".to_owned()
        } else {
            ended.join(", ")
        };
        write!(
            f,
            "{} accepted, {} open; ended: {ended}; {} not redirected, {} over capacity",
            self.accepted, self.open, self.not_redirected, self.over_capacity
        )
    }
}

/// One open tunnel.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TunnelStatus {
    /// The client's address as the daemon accepted it.
    pub(crate) client: String,
    pub(crate) pid: u32,
    pub(crate) command: String,
    pub(crate) uid: u32,
    /// The client process's cgroup, when it still exists.
    pub(crate) cgroup: Option<String>,
    /// Where the client was going.
    pub(crate) destination: String,
    /// The host name, when one is known.
    pub(crate) host: Option<String>,
    /// The name DNS gave the destination, when known.
    #[serde(default)]
    pub(crate) dns_name: Option<String>,
    /// The proxy address the tunnel goes through, once reached.
    pub(crate) upstream: Option<String>,
    /// `connecting`, `opening` or `relaying`.
    pub(crate) phase: String,
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
    pub(crate) age_secs: f64,
}

/// The last failure to one destination.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct FailureStatus {
    pub(crate) destination: String,
    /// As in the access log: `refused`, `denied`, `timeout`, ...
    pub(crate) outcome: String,
    /// The proxy's status code, when it answered with one.
    pub(crate) status: Option<u16>,
    pub(crate) detail: Option<String>,
    pub(crate) count: u64,
    pub(crate) seconds_ago: f64,
    /// The process that tried last.
    pub(crate) pid: u32,
    pub(crate) command: String,
    pub(crate) uid: u32,
}

/// One proxy of the list, as status shows it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ProxyStatus {
    /// The URL, credentials masked.
    pub(crate) url: String,
    pub(crate) addrs: Vec<String>,
    /// `up`, or `down` (skipped after failing, until `retry_in_secs` have passed).
    pub(crate) state: String,
    /// How long it has been failing.
    pub(crate) down_secs: Option<f64>,
    pub(crate) retry_in_secs: Option<f64>,
}

impl ProxyStatus {
    pub(crate) fn of(report: &crate::upstream::ProxyReport) -> Self {
        let (state, down_secs, retry_in_secs) = match report.state {
            crate::upstream::ProxyState::Up => ("up", None, None),
            crate::upstream::ProxyState::Down { since, retry_in } => (
                "down",
                Some(since.as_secs_f64()),
                Some(retry_in.as_secs_f64()),
            ),
        };
        Self {
            url: report.url.clone(),
            addrs: report.addrs.iter().map(ToString::to_string).collect(),
            state: state.to_owned(),
            down_secs,
            retry_in_secs,
        }
    }
}

/// What the service knows of itself, for [`Observer::status`].
pub(crate) struct About {
    pub(crate) started: std::time::Instant,
    pub(crate) cgroup: String,
    pub(crate) intercepting: String,
    pub(crate) proxy: String,
    pub(crate) proxy_addrs: Vec<String>,
    pub(crate) proxies: Vec<ProxyStatus>,
    pub(crate) listeners: Vec<String>,
    pub(crate) kill_switch: Option<String>,
    pub(crate) dns: Option<String>,
    pub(crate) dns_listeners: Vec<String>,
    pub(crate) namespaces: Vec<crate::containers::NamespaceStatus>,
}

impl Observer {
    /// The daemon's status now. Copies what it needs; cgroup paths are looked up here, off the
    /// data path.
    pub(crate) fn status(&self, about: About) -> DaemonStatus {
        let open = self.open.all();
        let failures = self.failures.all();
        let ids: HashSet<u64> = open.iter().map(|e| e.process.cgroup).collect();
        let paths = cgroup::paths_by_id(&ids);
        let path = |id: u64| paths.get(&id).map(|p| p.display().to_string());
        let now = SystemTime::now();
        DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: about.started.elapsed().as_secs_f64(),
            cgroup: about.cgroup,
            intercepting: about.intercepting,
            proxy: about.proxy,
            proxy_addrs: about.proxy_addrs,
            proxies: about.proxies,
            listeners: about.listeners,
            kill_switch: about.kill_switch,
            dns: about.dns.map(|mode| {
                let m = &self.metrics.dns;
                format!(
                    "{mode}; queries: {} fake, {} forwarded, {} failed, {} refused, {} malformed",
                    m.fake.get(),
                    m.forwarded.get(),
                    m.failed.get(),
                    m.refused.get(),
                    m.malformed.get()
                )
            }),
            dns_listeners: about.dns_listeners,
            namespaces: about.namespaces,
            counters: self.metrics.counters(),
            tunnels: open
                .iter()
                .map(|entry| TunnelStatus {
                    client: entry.client.to_string(),
                    pid: entry.process.pid,
                    command: entry.process.command().into_owned(),
                    uid: entry.process.uid,
                    cgroup: path(entry.process.cgroup),
                    destination: entry.dst.to_string(),
                    host: entry.host.get().map(ToString::to_string),
                    dns_name: entry.dns_name.get().map(ToString::to_string),
                    upstream: entry.upstream.get().map(ToString::to_string),
                    phase: entry.phase().name().to_owned(),
                    bytes_up: entry
                        .progress
                        .to_upstream
                        .load(std::sync::atomic::Ordering::Relaxed),
                    bytes_down: entry
                        .progress
                        .to_client
                        .load(std::sync::atomic::Ordering::Relaxed),
                    age_secs: entry.age().as_secs_f64(),
                })
                .collect(),
            failures: failures
                .into_iter()
                .map(|failure| FailureStatus {
                    destination: failure.dst.to_string(),
                    outcome: failure.outcome.word().to_owned(),
                    status: failure.status,
                    detail: failure.detail,
                    count: failure.count,
                    seconds_ago: now
                        .duration_since(failure.last)
                        .unwrap_or_default()
                        .as_secs_f64(),
                    pid: failure.process.pid,
                    command: failure.process.command().into_owned(),
                    uid: failure.process.uid,
                })
                .collect(),
        }
    }
}

/// The control socket of this daemon. Removed when dropped, if the daemon still may.
pub(crate) struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `/run/transproxy/<pid>.sock`, making the folder (root's alone) if needed. Before
    /// privileges are dropped; the socket file is root's and closed to others. Needs a runtime
    /// (tokio registers the socket).
    pub(crate) fn bind(std: std::os::unix::net::UnixListener, path: PathBuf) -> io::Result<Self> {
        std.set_nonblocking(true)?;
        Ok(Self {
            listener: UnixListener::from_std(std)?,
            path,
        })
    }

    /// The privileged part of [`ControlSocket::bind`], without a runtime: the folder, stale
    /// sockets of dead daemons, and the bound socket.
    pub(crate) fn prepare() -> anyhow::Result<(std::os::unix::net::UnixListener, PathBuf)> {
        let dir = Path::new(RUN_DIR);
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err).with_context(|| format!("cannot create {RUN_DIR}")),
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {RUN_DIR}"))?;
        let path = dir.join(format!("{}.sock", std::process::id()));
        let _ = fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        Ok((listener, path))
    }

    /// The next request from root: `Some(stream)` to answer on.
    pub(crate) async fn next(&self) -> UnixStream {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == 0 => return stream,
                Ok(cred) => debug!("control socket: refused uid {}", cred.uid()),
                Err(err) => debug!("control socket: no peer credentials: {err}"),
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// What root may ask a daemon on its control socket.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request {
    Status,
    /// Serve this namespace (a runtime's hook).
    Serve(crate::containers::Target),
}

impl Request {
    /// The request of one line, or why it is not one.
    pub(crate) fn parse(line: &str) -> Result<Self, String> {
        use crate::containers::Target;
        let mut words = line.trim_end_matches(['\r', '\n']).splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("status"), None, None) => Ok(Self::Status),
            (Some("serve"), Some("pid"), Some(pid)) => pid
                .parse()
                .map(|pid| Self::Serve(Target::Pid(pid)))
                .map_err(|_| format!("not a pid: {pid:?}")),
            (Some("serve"), Some("netns"), Some(path)) if path.starts_with('/') => {
                Ok(Self::Serve(Target::Path(PathBuf::from(path))))
            }
            _ => Err(format!("unknown request {:?}", line.trim_end())),
        }
    }
}

/// Reads the one request on `stream` (a short line, within [`REQUEST_WAIT`]).
pub(crate) async fn read_request(
    stream: UnixStream,
) -> Option<(Result<Request, String>, UnixStream)> {
    let mut stream = BufReader::new(stream);
    let mut request = String::new();
    let asked = tokio::time::timeout(REQUEST_WAIT, async {
        // At most one short line (a namespace file's path included).
        let mut limited = (&mut stream).take(4096);
        limited.read_line(&mut request).await
    })
    .await;
    if !matches!(asked, Ok(Ok(_))) {
        return None;
    }
    // A line cut at the limit is not a request: a shortened path must not be served.
    if !request.ends_with('\n') {
        return Some((
            Err("the request is too long, or has no end of line".to_owned()),
            stream.into_inner(),
        ));
    }
    Some((Request::parse(&request), stream.into_inner()))
}

/// Writes `status` as JSON on `stream`.
pub(crate) async fn answer(mut stream: UnixStream, status: DaemonStatus) {
    let Ok(mut json) = serde_json::to_vec(&status) else {
        return;
    };
    json.push(b'\n');
    let _ = stream.write_all(&json).await;
}

/// Writes one line on `stream`.
pub(crate) async fn answer_line(mut stream: UnixStream, line: &str) {
    let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
}

/// Asks the daemon at `path` to serve a namespace; its one-line answer.
pub(crate) fn ask_to_serve(path: &Path, what: &str, wait: Duration) -> io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(wait))?;
    stream.write_all(format!("serve {what}\n").as_bytes())?;
    let mut answer = String::new();
    stream.take(4096).read_to_string(&mut answer)?;
    Ok(answer.trim_end().to_owned())
}

/// Asks the daemon listening on `path` for its status.
pub(crate) fn ask(path: &Path) -> io::Result<DaemonStatus> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"status\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    serde_json::from_slice(&answer).map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))
}

/// The control sockets in [`RUN_DIR`], by pid.
pub(crate) fn sockets() -> HashMap<u32, PathBuf> {
    fs::read_dir(RUN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let pid = name.to_str()?.strip_suffix(".sock")?.parse().ok()?;
            Some((pid, entry.path()))
        })
        .collect()
}
