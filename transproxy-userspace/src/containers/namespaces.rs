//! The namespaces served: found (a hook, a connect's report, the scan), served through the
//! opener, and closed when no process of the tree is left in them (see the module above).

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener as StdListener},
    os::fd::AsFd as _,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::anyhow;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    accept::Workers,
    kernel::{ListenerMap, UnservedEvents, UnservedSeen},
};

use super::opener::{Opened, Opener, Target};

/// How often the tree is scanned for namespaces come and gone.
const SCAN_EVERY: Duration = Duration::from_secs(1);

/// How long a namespace a hook asked for may have no process of the tree before its listener
/// is closed: a CNI plugin names a pod's namespace before the pod's first process is in it.
const EMPTY_GRACE: Duration = Duration::from_secs(30);

/// How long before a namespace that could not be served may be reported again by a connect.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One namespace served.
struct Served {
    cookie: u64,
    /// Who named it first.
    origin: String,
    addrs: Vec<SocketAddr>,
    since: Instant,
    /// Whether a process of the tree has been seen in it: then the first scan that finds none
    /// closes it.
    populated: bool,
    /// Closes its listeners.
    stop: CancellationToken,
}

/// What status shows of one served namespace.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct NamespaceStatus {
    /// `net:[INODE]`, as `/proc/PID/ns/net` and `lsns` name it.
    pub(crate) netns: String,
    pub(crate) listeners: Vec<String>,
    /// Who named it: a process, a hook's namespace file.
    pub(crate) origin: String,
    pub(crate) seconds: u64,
}

/// What serving a namespace came to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Listeners opened now.
    Served(String),
    /// It was served already.
    Already(String),
    /// It is the daemon's own.
    Own,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Served(what) => write!(f, "serving {what}"),
            Self::Already(what) => write!(f, "already serving {what}"),
            Self::Own => write!(f, "the daemon's own network namespace"),
        }
    }
}

/// The namespaces served besides the daemon's own.
pub(crate) struct Namespaces {
    opener: Opener,
    /// The daemon's own namespace: inode and cookie.
    own: (u64, u64),
    /// Ports tried first in each namespace (the daemon's own listeners').
    v4_port: u16,
    v6_port: Option<u16>,
    /// `max-namespaces`: past it, connects in namespaces not served follow the kill switch's
    /// choice (direct, or refused), as before the daemon learns of a namespace.
    limit: usize,
    /// A scan is running (see [`Namespaces::rescan`]).
    scanning: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
}

struct State {
    /// By namespace inode. An inode is only reused once its namespace is freed, and a served
    /// namespace is held by its listener until the daemon closes it.
    served: HashMap<u64, Served>,
    /// Namespaces that could not be served, and when: not tried again by the scan for a while.
    failed: HashMap<u64, Instant>,
    /// Set once the programs are loaded.
    map: Option<ListenerMap>,
    seen: Option<UnservedSeen>,
    /// Set once the workers run; listeners opened before wait here.
    workers: Option<Arc<Workers>>,
    waiting: Vec<(u64, CancellationToken, StdListener)>,
}

impl Namespaces {
    /// Starts the opener for the cgroup tree at `tree` (below the v2 root `root`) and opens
    /// listeners in every namespace its processes are in now, before any program is attached.
    /// Privileged: called before capabilities are dropped.
    pub(crate) fn prepare(
        root: &Path,
        tree: &Path,
        v4_port: u16,
        v6_port: Option<u16>,
        limit: usize,
    ) -> anyhow::Result<(Self, Vec<Opened>)> {
        let relative = Path::new("/").join(tree.strip_prefix(root).map_err(|_| {
            anyhow!(
                "{} is not below the cgroup v2 root {}",
                tree.display(),
                root.display()
            )
        })?);
        let opener = Opener::spawn(&relative)?;
        let own_inode = {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata("/proc/self/ns/net")?.ino()
        };
        let own_cookie = crate::kernel::own_netns_cookie()?;
        let namespaces = Self {
            opener,
            own: (own_inode, own_cookie),
            v4_port,
            v6_port,
            limit,
            scanning: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State {
                served: HashMap::new(),
                failed: HashMap::new(),
                map: None,
                seen: None,
                workers: None,
                waiting: Vec::new(),
            }),
        };
        let mut opened = Vec::new();
        for (inode, pid) in namespaces.opener.scan()?.0 {
            if inode == own_inode {
                continue;
            }
            if opened.len() >= limit {
                namespaces.say_full();
                break;
            }
            match namespaces.opener.open(&Target::Pid(pid), v4_port, v6_port) {
                Ok(listeners) => opened.push(listeners),
                Err(err) => warn!("cannot serve the network namespace net:[{inode}]: {err:#}"),
            }
        }
        Ok((namespaces, opened))
    }

    /// Takes in the listeners [`Namespaces::prepare`] opened, once the programs (with `map`)
    /// have them registered.
    pub(crate) fn loaded(&self, map: ListenerMap, opened: Vec<Opened>) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.map = Some(map);
        for listeners in opened {
            let origin = "found in the cgroup tree at start".to_owned();
            let what = state.keep(listeners, origin.clone(), true);
            info!("serving {what} ({origin})");
        }
    }

    /// Starts serving: the waiting listeners go to `workers`, and the tasks that find
    /// namespaces (reports from the programs, the scan) start, until `shutdown`. Must run
    /// inside the main runtime.
    pub(crate) fn start(
        self: &Arc<Self>,
        workers: Arc<Workers>,
        unserved: UnservedEvents,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
        let (mut reader, seen) = unserved.split()?;
        if let Ok(mut state) = self.state.lock() {
            for (cookie, stop, listener) in state.waiting.drain(..) {
                workers.adopt(listener, cookie, stop);
            }
            state.workers = Some(workers);
            state.seen = Some(seen);
        }
        let reports = {
            let namespaces = Arc::clone(self);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let connects = tokio::select! {
                        () = shutdown.cancelled() => return,
                        connects = reader.next() => connects,
                    };
                    for connect in connects {
                        namespaces.reported(connect.netns, connect.pid).await;
                    }
                }
            })
        };
        let scan = {
            let namespaces = Arc::clone(self);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(SCAN_EVERY) => {}
                    }
                    namespaces.rescan().await;
                }
            })
        };
        Ok(vec![reports, scan])
    }

    /// Serves `target`'s namespace (a hook's request, or a report), saying why in the log.
    pub(crate) async fn serve(
        self: &Arc<Self>,
        target: Target,
        why: &str,
    ) -> anyhow::Result<Outcome> {
        let namespaces = Arc::clone(self);
        let why = why.to_owned();
        tokio::task::spawn_blocking(move || namespaces.serve_now(&target, &why))
            .await
            .map_err(|err| anyhow!("the namespace task failed: {err}"))?
    }

    fn serve_now(&self, target: &Target, why: &str) -> anyhow::Result<Outcome> {
        if self
            .state
            .lock()
            .is_ok_and(|s| s.served.len() >= self.limit)
        {
            self.say_full();
            return Err(anyhow!(
                "{} network namespaces are served already (max-namespaces)",
                self.limit
            ));
        }
        let opened = self.opener.open(target, self.v4_port, self.v6_port)?;
        let mut state = self
            .state
            .lock()
            .map_err(|_| anyhow!("the namespaces' state is poisoned"))?;
        if opened.inode == self.own.0 {
            return Ok(Outcome::Own);
        }
        if let Some(served) = state.served.get(&opened.inode) {
            return Ok(Outcome::Already(describe(opened.inode, &served.addrs)));
        }
        // Again under the lock: serves running at once may have filled it meanwhile.
        if state.served.len() >= self.limit {
            return Err(anyhow!(
                "{} network namespaces are served already (max-namespaces)",
                self.limit
            ));
        }
        let inode = opened.inode;
        let cookie = opened.cookie;
        if let Some(map) = state.map.as_mut() {
            map.serve(
                cookie,
                opened.v4.as_fd(),
                opened.v6.as_ref().map(|l| l.as_fd()),
            )?;
        }
        // A process of the tree was in it when it was opened; a namespace file may wait for
        // its first (a CNI plugin names a pod's namespace before the pod's process is in it).
        let populated = matches!(target, Target::Pid(_));
        let what = state.keep(opened, format!("{target}, {why}"), populated);
        state.failed.remove(&inode);
        if let Some(seen) = state.seen.as_mut() {
            seen.clear(cookie);
        }
        info!("serving {what} ({target}: {why})");
        Ok(Outcome::Served(what))
    }

    /// Warns, once, that the limit of namespaces is reached.
    fn say_full(&self) {
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            warn!(
                "{} network namespaces are served (max-namespaces): more are not served until some are gone (their connects go direct, or are refused with the kill switch)",
                self.limit
            );
        }
    }

    /// A connect in namespace `netns` by `pid` found no listener.
    async fn reported(self: &Arc<Self>, netns: u64, pid: u32) {
        let known = netns == self.own.1
            || self
                .state
                .lock()
                .is_ok_and(|s| s.served.values().any(|served| served.cookie == netns));
        // The daemon's own namespace without an IPv6 listener, or a served one without `::1`:
        // nothing to do, and no need to hear of it again.
        if known {
            return;
        }
        let full = self
            .state
            .lock()
            .is_ok_and(|s| s.served.len() >= self.limit);
        match self
            .serve(Target::Pid(pid), "a connect found no listener there")
            .await
        {
            Ok(_) => {}
            // At the limit a scan would serve nothing either: no scan for every report.
            Err(_) if full => {}
            // A short-lived process (a probe, a health check) is often gone (or a zombie) by
            // now, while its namespace lives on in others: look for them. The scan says what
            // it cannot serve.
            Err(err) => {
                debug!("cannot serve the network namespace of pid {pid}: {err:#}; scanning");
                self.rescan().await;
            }
        }
        // Served (its connects now find the listener) or not: hear of it again later.
        let namespaces = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(RETRY_AFTER).await;
            if let Ok(mut state) = namespaces.state.lock()
                && let Some(seen) = state.seen.as_mut()
            {
                seen.clear(netns);
            }
        });
    }

    /// One scan: serves namespaces not served yet, closes those with no process left. One at
    /// a time: reports that come while a scan runs wait for the next one, not for a scan each.
    async fn rescan(self: &Arc<Self>) {
        if self
            .scanning
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        self.rescan_now().await;
        self.scanning
            .store(false, std::sync::atomic::Ordering::Release);
    }

    async fn rescan_now(self: &Arc<Self>) {
        let namespaces = Arc::clone(self);
        let started = Instant::now();
        let (found, complete) =
            match tokio::task::spawn_blocking(move || namespaces.opener.scan()).await {
                Ok(Ok(found)) => found,
                Ok(Err(err)) => {
                    warn!("cannot scan the cgroup tree's network namespaces: {err:#}");
                    return;
                }
                Err(_) => return,
            };
        let new: Vec<(u64, u32)> = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            // A scan cut short proves nothing gone; one that began before a namespace was
            // served says nothing of it.
            if complete {
                state.close_empty(&found, started);
            }
            let room = self.limit.saturating_sub(state.served.len());
            let new: Vec<(u64, u32)> = found
                .iter()
                .filter(|(inode, _)| **inode != self.own.0 && !state.served.contains_key(*inode))
                .filter(|(inode, _)| {
                    state
                        .failed
                        .get(*inode)
                        .is_none_or(|at| at.elapsed() > EMPTY_GRACE)
                })
                .map(|(inode, pid)| (*inode, *pid))
                .collect();
            if new.len() > room {
                self.say_full();
            }
            new.into_iter().take(room).collect()
        };
        for (inode, pid) in new {
            if let Err(err) = self
                .serve(Target::Pid(pid), "found in the cgroup tree")
                .await
            {
                warn!("cannot serve the network namespace net:[{inode}] (pid {pid}): {err:#}");
                if let Ok(mut state) = self.state.lock() {
                    state.failed.insert(inode, Instant::now());
                }
            }
        }
    }

    /// What status shows.
    pub(crate) fn status(&self) -> Vec<NamespaceStatus> {
        let Ok(state) = self.state.lock() else {
            return Vec::new();
        };
        let mut list: Vec<NamespaceStatus> = state
            .served
            .iter()
            .map(|(inode, served)| NamespaceStatus {
                netns: format!("net:[{inode}]"),
                listeners: served.addrs.iter().map(ToString::to_string).collect(),
                origin: served.origin.clone(),
                seconds: served.since.elapsed().as_secs(),
            })
            .collect();
        list.sort_by(|a, b| a.netns.cmp(&b.netns));
        list
    }
}

impl State {
    /// Keeps the listeners of a namespace just opened (and registered): adopted by a worker,
    /// or waiting for the workers to start. Returns what the log says of it.
    fn keep(&mut self, opened: Opened, origin: String, populated: bool) -> String {
        let Opened {
            cookie,
            inode,
            v4,
            v6,
        } = opened;
        let stop = CancellationToken::new();
        let listeners: Vec<StdListener> = [Some(v4), v6].into_iter().flatten().collect();
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        for listener in listeners {
            match &self.workers {
                Some(workers) => workers.adopt(listener, cookie, stop.clone()),
                None => self.waiting.push((cookie, stop.clone(), listener)),
            }
        }
        let what = describe(inode, &addrs);
        self.served.insert(
            inode,
            Served {
                cookie,
                origin,
                addrs,
                since: Instant::now(),
                populated,
                stop,
            },
        );
        what
    }

    /// Closes the listeners of namespaces where no process of the tree is left (`found` holds
    /// those with one, from a whole scan begun at `scanned`), once they had one or their grace
    /// is over. Those served after the scan began are left alone.
    fn close_empty(&mut self, found: &HashMap<u64, u32>, scanned: Instant) {
        let mut gone = Vec::new();
        for (inode, served) in &mut self.served {
            if found.contains_key(inode) {
                served.populated = true;
            } else if served.since > scanned {
                continue;
            } else if served.populated || served.since.elapsed() > EMPTY_GRACE {
                gone.push(*inode);
            }
        }
        for inode in gone {
            if let Some(served) = self.served.remove(&inode) {
                served.stop.cancel();
                info!(
                    "stopped serving the network namespace net:[{inode}]: no process of the cgroup tree is left in it"
                );
            }
        }
    }
}

/// `the network namespace net:[INODE], listening on ADDR and ADDR`.
fn describe(inode: u64, addrs: &[SocketAddr]) -> String {
    let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    format!(
        "the network namespace net:[{inode}], listening on {}",
        addrs.join(" and ")
    )
}
