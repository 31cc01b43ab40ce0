//! The PAC script's thread: QuickJS (through `rquickjs`) holding the compiled script, asked one
//! question at a time. QuickJS was chosen over a pure-Rust engine (boa) for its interrupt
//! handler, which cuts a script that loops, and its memory limit; its core has no I/O at all
//! (no `require`, no files, no network): a script can only compute. The two helpers that need
//! the world, `dnsResolve` and `myIpAddress`, are the daemon's own functions.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    net::{IpAddr, ToSocketAddrs as _, UdpSocket},
    rc::Rc,
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender},
    },
    time::{Duration, Instant},
};

use rquickjs::{CatchResultExt as _, Context, Function, Runtime};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{PacError, result, source::PacSource};
use crate::upstream::Hop;

/// How long one `FindProxyForURL` call may run before it is cut.
pub(super) const EVAL_LIMIT: Duration = Duration::from_millis(200);

/// How long compiling the script (running its top level) may take.
const COMPILE_LIMIT: Duration = Duration::from_secs(1);

/// Memory the script may use.
const MEMORY_LIMIT: usize = 32 << 20;

/// How long a name `dnsResolve` looked up is kept.
const RESOLVE_KEEP: Duration = Duration::from_secs(60);

/// A question for the thread.
pub(super) enum Request {
    Find {
        url: String,
        host: String,
        /// Where the connection goes: `dnsResolve(host)` answers it without asking DNS.
        dst: IpAddr,
        reply: oneshot::Sender<Result<Vec<Hop>, PacError>>,
    },
    /// Fetch and compile the script again (SIGHUP).
    Reload,
    /// A fetch (on a thread of its own) ended: the script's text, or why there is none.
    Fetched(Result<String, String>),
}

/// What `dnsResolve` knows while a call runs.
#[derive(Default)]
struct Knowledge {
    /// The connection's own host name and address.
    current: Option<(String, IpAddr)>,
    /// Names looked up lately.
    resolved: HashMap<String, (Instant, Option<IpAddr>)>,
}

/// Runs the PAC thread until every sender is gone: loads the script, answers questions,
/// fetches it again every `refresh` and on [`Request::Reload`] (keeping the last good one
/// when that fails).
pub(super) fn run(
    source: PacSource,
    refresh: Duration,
    requests: Receiver<Request>,
    myself: SyncSender<Request>,
) {
    let runtime = match Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            warn!("PAC: cannot start the JavaScript engine: {err}");
            return;
        }
    };
    runtime.set_memory_limit(MEMORY_LIMIT);
    runtime.set_max_stack_size(256 * 1024);
    let deadline = Rc::new(RefCell::new(Instant::now()));
    let cut = Rc::clone(&deadline);
    runtime.set_interrupt_handler(Some(Box::new(move || Instant::now() > *cut.borrow())));
    let knowledge = Rc::new(RefCell::new(Knowledge::default()));
    let mut script: Result<Context, String> = Err("not loaded yet".to_owned());
    // Fetching happens on a thread of its own (a slow PAC server holds up no question); one at
    // a time, remembering whether it was asked for loudly (start, SIGHUP).
    let fetching = Cell::new(None::<bool>);
    let fetch = |loud: bool| {
        if let Some(was_loud) = fetching.get() {
            fetching.set(Some(was_loud || loud));
            return;
        }
        let (from, answer) = (source.clone(), myself.clone());
        let started = std::thread::Builder::new()
            .name("transproxy-pac-fetch".into())
            .spawn(move || {
                let text = from.fetch().map_err(|err| format!("{err:#}"));
                let _ = answer.send(Request::Fetched(text));
            });
        match started {
            Ok(_) => fetching.set(Some(loud)),
            Err(err) => warn!("PAC: cannot fetch {source}: {err}"),
        }
    };
    fetch(true);
    let mut next_refresh = Instant::now() + refresh;
    loop {
        let wait = next_refresh.saturating_duration_since(Instant::now());
        match requests.recv_timeout(wait) {
            Ok(Request::Find {
                url,
                host,
                dst,
                reply,
            }) => {
                let answer = match &script {
                    Ok(context) => {
                        knowledge.borrow_mut().current = Some((host.to_ascii_lowercase(), dst));
                        *deadline.borrow_mut() = Instant::now() + EVAL_LIMIT;
                        let answer = find(context, &url, &host);
                        knowledge.borrow_mut().current = None;
                        answer
                    }
                    Err(why) => Err(PacError::NotLoaded(why.clone())),
                };
                let _ = reply.send(answer);
            }
            Ok(Request::Reload) => {
                fetch(true);
                next_refresh = Instant::now() + refresh;
            }
            Ok(Request::Fetched(text)) => {
                let loud = fetching.take().unwrap_or(false);
                *deadline.borrow_mut() = Instant::now() + COMPILE_LIMIT;
                let compiled = text.and_then(|text| compile(&runtime, &text, &knowledge));
                settle(&source, compiled, &mut script, loud);
            }
            Err(RecvTimeoutError::Timeout) => {
                fetch(false);
                next_refresh = Instant::now() + refresh;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Puts a newly compiled script in place; on failure keeps the one in `script` (if any).
/// `loud` (start, SIGHUP) reports success too.
fn settle(
    source: &PacSource,
    compiled: Result<Context, String>,
    script: &mut Result<Context, String>,
    loud: bool,
) {
    match compiled {
        Ok(context) => {
            if loud || script.is_err() {
                info!("PAC: loaded {source}");
            }
            *script = Ok(context);
        }
        Err(why) => match script {
            Ok(_) => warn!("PAC: cannot load {source} again ({why}); the last good script stays"),
            Err(before) => {
                warn!("PAC: cannot load {source}: {why}; tunnels that need it fail until it loads");
                *before = why;
            }
        },
    }
}

/// A context with the helpers, the daemon's natives and the script, which must define
/// `FindProxyForURL`.
fn compile(
    runtime: &Runtime,
    text: &str,
    knowledge: &Rc<RefCell<Knowledge>>,
) -> Result<Context, String> {
    let context = Context::full(runtime).map_err(|err| err.to_string())?;
    context.with(|ctx| {
        let known = Rc::clone(knowledge);
        let dns_resolve = Function::new(ctx.clone(), move |host: String| {
            resolve(&mut known.borrow_mut(), &host).map(|ip| ip.to_string())
        })
        .map_err(|err| err.to_string())?;
        ctx.globals()
            .set("dnsResolve", dns_resolve)
            .map_err(|err| err.to_string())?;
        let my_ip = Function::new(ctx.clone(), my_ip_address).map_err(|err| err.to_string())?;
        ctx.globals()
            .set("myIpAddress", my_ip)
            .map_err(|err| err.to_string())?;
        ctx.eval::<(), _>(include_str!("helpers.js"))
            .catch(&ctx)
            .map_err(|err| format!("the helpers: {}", one_line(&err.to_string())))?;
        ctx.eval::<(), _>(text).catch(&ctx).map_err(|err| {
            format!(
                "the script does not compile: {}",
                one_line(&err.to_string())
            )
        })?;
        ctx.globals()
            .get::<_, Function>("FindProxyForURL")
            .map_err(|_| "the script defines no function FindProxyForURL".to_owned())?;
        Ok::<(), String>(())
    })?;
    Ok(context)
}

/// One call of `FindProxyForURL(url, host)`, parsed.
fn find(context: &Context, url: &str, host: &str) -> Result<Vec<Hop>, PacError> {
    context.with(|ctx| {
        let function: Function = ctx
            .globals()
            .get("FindProxyForURL")
            .map_err(|_| PacError::NotLoaded("FindProxyForURL is gone".to_owned()))?;
        let started = Instant::now();
        let answer: rquickjs::Result<rquickjs::Value> = function.call((url, host));
        let answer = match answer.catch(&ctx) {
            Ok(value) => value,
            Err(_) if started.elapsed() >= EVAL_LIMIT => return Err(PacError::TimedOut),
            Err(err) => return Err(PacError::Threw(one_line(&err.to_string()))),
        };
        let Some(text) = answer.as_string().and_then(|s| s.to_string().ok()) else {
            return Err(PacError::NotAString);
        };
        result::parse(&text).map_err(PacError::Bad)
    })
}

/// `dnsResolve(host)`: the connection's own address for its own name, an address as itself,
/// else this host's resolver (kept for [`RESOLVE_KEEP`]). IPv4 first, as browsers answer.
fn resolve(knowledge: &mut Knowledge, host: &str) -> Option<IpAddr> {
    let host = host.trim().to_ascii_lowercase();
    if let Some((name, ip)) = &knowledge.current
        && *name == host
    {
        return Some(*ip);
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some((at, ip)) = knowledge.resolved.get(&host)
        && at.elapsed() < RESOLVE_KEEP
    {
        return *ip;
    }
    let found = lookup(&host);
    if knowledge.resolved.len() > 4096 {
        knowledge.resolved.clear();
    }
    knowledge.resolved.insert(host, (Instant::now(), found));
    found
}

/// How long `dnsResolve` waits for this host's resolver: a script's call must stay short.
const LOOKUP_WAIT: Duration = Duration::from_millis(500);

/// Lookups still running (a resolver that hangs keeps its thread): beyond this many, a
/// lookup answers null at once.
static LOOKUPS: AtomicUsize = AtomicUsize::new(0);
const MAX_LOOKUPS: usize = 8;

/// This host's resolver, on a thread of its own, waited for [`LOOKUP_WAIT`] at most.
fn lookup(host: &str) -> Option<IpAddr> {
    if LOOKUPS.fetch_add(1, Ordering::Relaxed) >= MAX_LOOKUPS {
        LOOKUPS.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    let (answer, answered) = std::sync::mpsc::sync_channel(1);
    let host = host.to_owned();
    let started = std::thread::Builder::new()
        .name("transproxy-pac-dns".into())
        .spawn(move || {
            let found = (host.as_str(), 0).to_socket_addrs().ok().and_then(|addrs| {
                let addrs: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                addrs
                    .iter()
                    .find(|ip| ip.is_ipv4())
                    .or(addrs.first())
                    .copied()
            });
            LOOKUPS.fetch_sub(1, Ordering::Relaxed);
            let _ = answer.send(found);
        });
    if started.is_err() {
        LOOKUPS.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    answered.recv_timeout(LOOKUP_WAIT).ok().flatten()
}

/// `myIpAddress()`: the address this host would send from towards the outside (a UDP socket
/// "connected" to a documentation address: connecting a UDP socket sends nothing).
fn my_ip_address() -> String {
    UdpSocket::bind("0.0.0.0:0")
        .and_then(|socket| {
            socket.connect("192.0.2.1:9")?;
            socket.local_addr()
        })
        .map(|addr| addr.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified())
        .map_or_else(|| "127.0.0.1".to_owned(), |ip| ip.to_string())
}

/// An error message as one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
