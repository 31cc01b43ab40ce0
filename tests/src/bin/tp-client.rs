//! A client with behaviour curl cannot show, run inside test cgroups:
//!
//! * `half-close ADDR TEXT`: sends TEXT, shuts down its write side, prints the whole answer.
//! * `bulk ADDR SEED LEN`: sends LEN bytes of `pattern(SEED)` while reading LEN bytes (or to
//!   end-of-file), then prints `sent <len> <sha256>` and `received <len> <sha256>`.
//! * `bulk-half-close ADDR SEED LEN`: the same, but shuts down its write side once it has sent
//!   everything, and reads to end-of-file.
//! * `peer ADDR`: connects and prints what `getpeername()` says.
//! * `echo-session ADDR`: keeps one connection open; sends each stdin line and prints the echo.
//! * `probe ADDR`: connects, sends `ping\n`, reads one line; prints the outcome: `refused`,
//!   `reset`, `eof`, `timeout`, `error:<text>` or `data:<line>`.
//! * `netns-probe ADDR`: moves to a network namespace of its own (loopback up), answers one
//!   echo on ADDR there, then probes ADDR as `probe` does: `data:ping` means the connect
//!   reached the address it named, inside that namespace.
//! * `storm ADDR N CONCURRENCY`: N probes, CONCURRENCY at a time; prints outcome counts.
//! * `load ADDR N BYTES`: opens N connections, waits until all are open, then each sends BYTES
//!   of its own pattern in 16 KiB steps to an echo origin and checks every echoed byte; prints
//!   `ok N` or the failures.
//! * `hold ADDR N`: opens N connections one after the other, prints `ready`, and keeps them
//!   open, idle, until its stdin ends (the benchmark's idle-tunnel memory figure).
//!
//! * `serve ADDR echo|peer`: a server for tests whose origins live in other network namespaces
//!   (gateway mode): prints `listening`, then answers each connection on a thread of its own,
//!   echoing (`echo`) or writing the client's address as it sees it and closing (`peer`).
//!
//! Attacks on the kill switch and the listener, run as a local user would:
//!
//! * `squat ADDR SECONDS`: listens on ADDR (the port of a dead daemon's listener), prints
//!   `listening`, then for SECONDS prints `got:<bytes>` for whatever connects and sends.
//! * `as-pid PID UID GID ADDR`: starts a process with process id PID (clone3 with `set_tid`,
//!   which needs root: the test makes deterministic what a fork loop does in seconds), which
//!   drops to UID/GID and prints its `probe` of ADDR.
//! * `stale-record MAPPED DIRECT`: an IPv6-only socket connects to the IPv4-mapped address
//!   MAPPED (intercepted: recorded, redirected, and failing), then to DIRECT; prints the local
//!   port it connected from (`port P`) and its peer as getpeername() says (`peer ADDR`), and
//!   keeps the connection until stdin ends.
//! * `failing-connects ADDR N`: N IPv6-only sockets, each connecting to ADDR as IPv4-mapped
//!   (recorded, then failing), each closed; prints `failed N`.
//! * `udp ADDR`: one datagram with sendto(), one through a connected socket; prints
//!   `sendto:<ok|error>` and `connected:<ok|error>`.
//! * `tls-split ADDR NAME`: sends a ClientHello naming NAME in two writes 50 ms apart (two
//!   segments), then waits for up to a second for the echo and prints `echoed N`.
//! * `read-first ADDR`: connects and reads one line without sending anything (a client of a
//!   server that speaks first); prints `<line> after <ms> ms`.
//! * `read-first-name NAME PORT`: resolves NAME (getaddrinfo, so through /etc/resolv.conf),
//!   connects to its first address and reads one line; prints `<line> from <address>`.
//! * `dns-raw ADDR HEX [WAIT_MS]`: sends the bytes HEX in one datagram from a UDP socket
//!   connected to ADDR; prints `peer:<getpeername>` and `local:<port>`, then, within WAIT_MS
//!   (default 2000), `from:<source> answer:<hex>` or `timeout`.
//! * `port-probe LOCAL ADDR`: `probe` from a socket bound to the address and port LOCAL.
//! * `bound-probe IP ADDR`: `probe` from a socket bound to IP first (ADDR may be `0.0.0.0:PORT`
//!   or `[::]:PORT`, which the kernel sends to that bound address).

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

use transproxy_tests::{pattern, read_up_to, sha256_hex};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tp-client: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    if args.first().map(String::as_str) == Some("as-pid") {
        let arg = |i: usize, what: &str| -> anyhow::Result<&String> {
            args.get(i)
                .ok_or_else(|| anyhow::anyhow!("as-pid: missing {what}"))
        };
        return as_pid(
            arg(1, "PID")?.parse()?,
            arg(2, "UID")?.parse()?,
            arg(3, "GID")?.parse()?,
            arg(4, "ADDR")?.parse()?,
        );
    }
    if args.first().map(String::as_str) == Some("read-first-name") {
        use std::{io::BufRead as _, net::ToSocketAddrs as _};
        let (name, port) = match args {
            [_, name, port] => (name, port.parse::<u16>()?),
            _ => anyhow::bail!("usage: read-first-name NAME PORT"),
        };
        let addr = (name.as_str(), port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{name}: no address"))?;
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut line = String::new();
        std::io::BufReader::new(&stream).read_line(&mut line)?;
        println!("{} from {addr}", line.trim_end());
        return Ok(());
    }
    let (mode, rest) = args
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("usage: tp-client MODE ADDR ..."))?;
    let addr: SocketAddr = rest
        .first()
        .ok_or_else(|| anyhow::anyhow!("missing ADDR"))?
        .parse()?;
    let number = |i: usize, what: &str| -> anyhow::Result<usize> {
        Ok(rest
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("missing {what}"))?
            .parse()?)
    };
    match mode.as_str() {
        "probe" => {
            println!("{}", probe(addr));
            return Ok(());
        }
        "netns-probe" => {
            println!("{}", netns_probe(addr)?);
            return Ok(());
        }
        "storm" => return storm(addr, number(1, "N")?, number(2, "CONCURRENCY")?),
        "load" => return load(addr, number(1, "N")?, number(2, "BYTES")?),
        "hold" => return hold(addr, number(1, "N")?),
        "squat" => return squat(addr, number(1, "SECONDS")?),
        "serve" => return serve(addr, rest.get(1).map_or("echo", String::as_str)),
        "stale-record" => {
            let direct = rest
                .get(1)
                .ok_or_else(|| anyhow::anyhow!("missing DIRECT"))?
                .parse()?;
            return stale_record(addr, direct);
        }
        "failing-connects" => return failing_connects(addr, number(1, "N")?),
        "udp" => return udp(addr),
        "dns-raw" => {
            let hex = rest.get(1).ok_or_else(|| anyhow::anyhow!("missing HEX"))?;
            let wait = if rest.len() > 2 {
                number(2, "WAIT_MS")?
            } else {
                2000
            };
            return dns_raw(addr, hex, Duration::from_millis(wait as u64));
        }
        "tls-split" => {
            let name = rest.get(1).ok_or_else(|| anyhow::anyhow!("missing NAME"))?;
            let hello = transproxy_tests::client_hello(name);
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            stream.write_all(&hello[..20])?;
            std::thread::sleep(Duration::from_millis(50));
            stream.write_all(&hello[20..])?;
            stream.set_read_timeout(Some(Duration::from_secs(1)))?;
            let echoed = read_up_to(&stream, hello.len());
            println!("echoed {}", echoed.len());
            return Ok(());
        }
        "read-first" => {
            use std::io::BufRead as _;
            let started = std::time::Instant::now();
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut line = String::new();
            std::io::BufReader::new(&stream).read_line(&mut line)?;
            println!(
                "{} after {} ms",
                line.trim_end(),
                started.elapsed().as_millis()
            );
            return Ok(());
        }
        "bound-probe" => {
            let target = rest
                .get(1)
                .ok_or_else(|| anyhow::anyhow!("missing ADDR"))?
                .parse()?;
            println!("{}", bound_probe(SocketAddr::new(addr.ip(), 0), target));
            return Ok(());
        }
        "port-probe" => {
            let target = rest
                .get(1)
                .ok_or_else(|| anyhow::anyhow!("missing ADDR"))?
                .parse()?;
            println!("{}", bound_probe(addr, target));
            return Ok(());
        }
        _ => {}
    }
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    match mode.as_str() {
        "half-close" => {
            let text = rest.get(1).ok_or_else(|| anyhow::anyhow!("missing TEXT"))?;
            stream.write_all(text.as_bytes())?;
            stream.shutdown(Shutdown::Write)?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            print!("{answer}");
        }
        "bulk" | "bulk-half-close" => {
            let half_close = mode == "bulk-half-close";
            let seed: u64 = rest
                .get(1)
                .ok_or_else(|| anyhow::anyhow!("missing SEED"))?
                .parse()?;
            let len: usize = rest
                .get(2)
                .ok_or_else(|| anyhow::anyhow!("missing LEN"))?
                .parse()?;
            let mut writer = stream.try_clone()?;
            let sender = std::thread::spawn(move || -> std::io::Result<String> {
                let data = pattern(seed, len);
                writer.write_all(&data)?;
                if half_close {
                    writer.shutdown(Shutdown::Write)?;
                }
                Ok(sha256_hex(&data))
            });
            let received = if half_close {
                let mut all = Vec::new();
                stream.read_to_end(&mut all)?;
                all
            } else {
                read_up_to(&stream, len)
            };
            let sent = sender
                .join()
                .map_err(|_| anyhow::anyhow!("sender panicked"))??;
            println!("sent {len} {sent}");
            println!("received {} {}", received.len(), sha256_hex(&received));
        }
        "peer" => println!("{}", stream.peer_addr()?),
        "echo-session" => {
            let mut replies = std::io::BufReader::new(stream.try_clone()?);
            for line in std::io::stdin().lines() {
                let line = line?;
                // Not sent: says what getpeername() reports now.
                if line == "#peer" {
                    println!("peer {}", stream.peer_addr()?);
                    std::io::stdout().flush()?;
                    continue;
                }
                stream.write_all(format!("{line}\n").as_bytes())?;
                let mut reply = String::new();
                if std::io::BufRead::read_line(&mut replies, &mut reply)? == 0 {
                    anyhow::bail!("connection closed");
                }
                print!("{reply}");
                std::io::stdout().flush()?;
            }
        }
        other => anyhow::bail!("unknown mode {other}"),
    }
    Ok(())
}

/// One connection's fate, as a word. It sends one line and waits for one line back, without
/// half-closing (squid would tear the tunnel down).
fn probe(addr: SocketAddr) -> String {
    probe_on(TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
}

/// `probe` from a socket bound to `bind` first.
fn bound_probe(bind: SocketAddr, addr: SocketAddr) -> String {
    use socket2::{Domain, Socket, Type};
    let connected = Socket::new(Domain::for_address(bind), Type::STREAM, None).and_then(|s| {
        s.set_reuse_address(true)?;
        s.bind(&bind.into())?;
        s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
        Ok(TcpStream::from(s))
    });
    probe_on(connected)
}

/// The outcome of one line sent on a connection attempt's result.
fn probe_on(connected: std::io::Result<TcpStream>) -> String {
    use std::io::{BufRead as _, ErrorKind};
    let outcome = |err: std::io::Error| match err.kind() {
        ErrorKind::ConnectionRefused => "refused".to_owned(),
        ErrorKind::ConnectionReset => "reset".to_owned(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout".to_owned(),
        _ => format!("error:{err}"),
    };
    let mut stream = match connected {
        Ok(stream) => stream,
        Err(err) => return outcome(err),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if let Err(err) = stream.write_all(b"ping\n") {
        return outcome(err);
    }
    let mut answer = String::new();
    match std::io::BufReader::new(&stream).read_line(&mut answer) {
        Ok(0) => "eof".to_owned(),
        Ok(_) => format!("data:{}", answer.trim_end()),
        Err(err) => outcome(err),
    }
}

/// `probe` from a fresh network namespace, against an echo of its own there.
fn netns_probe(addr: SocketAddr) -> anyhow::Result<String> {
    use std::io::BufRead as _;
    // SAFETY: unshare(2) has no memory preconditions. It moves this thread (the only one yet);
    // the threads and children it starts afterwards are born in the new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!(
            "cannot enter a new network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    anyhow::ensure!(up.success(), "`ip link set lo up` failed: {up}");
    let listener = std::net::TcpListener::bind(addr)?;
    std::thread::spawn(move || -> std::io::Result<()> {
        let (stream, _) = listener.accept()?;
        let mut line = String::new();
        std::io::BufReader::new(&stream).read_line(&mut line)?;
        (&stream).write_all(line.as_bytes())
    });
    Ok(probe(addr))
}

/// `serve`: a small echo or peer-address server, until killed.
fn serve(addr: SocketAddr, mode: &str) -> anyhow::Result<()> {
    transproxy_tests::raise_fd_limit();
    let listener = std::net::TcpListener::bind(addr)?;
    println!("listening");
    std::io::stdout().flush()?;
    let peer_mode = mode == "peer";
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || -> std::io::Result<()> {
            if peer_mode {
                let peer = stream.peer_addr()?;
                return (&stream).write_all(format!("{}\n", peer.ip()).as_bytes());
            }
            let mut reader = stream.try_clone()?;
            let mut writer = stream;
            std::io::copy(&mut reader, &mut writer)?;
            Ok(())
        });
    }
    Ok(())
}

/// Many probes at once; prints `outcome count` lines, sorted.
fn storm(addr: SocketAddr, n: usize, concurrency: usize) -> anyhow::Result<()> {
    use std::{
        collections::BTreeMap,
        sync::atomic::{AtomicUsize, Ordering},
    };
    transproxy_tests::raise_fd_limit();
    let next = AtomicUsize::new(0);
    let counts = std::sync::Mutex::new(BTreeMap::<String, usize>::new());
    std::thread::scope(|scope| {
        for _ in 0..concurrency.max(1) {
            scope.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let outcome = probe(addr);
                    // Errors keep their text; the rest count by kind.
                    let word = match outcome.split_once(':') {
                        Some(("data", _)) => "data".to_owned(),
                        _ => outcome,
                    };
                    *counts.lock().expect("lock").entry(word).or_default() += 1;
                }
            });
        }
    });
    for (outcome, count) in counts
        .into_inner()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
    {
        println!("{outcome} {count}");
    }
    Ok(())
}

/// N concurrent tunnels, each moving BYTES both ways through an echo origin, checked byte for
/// byte.
fn load(addr: SocketAddr, n: usize, bytes: usize) -> anyhow::Result<()> {
    use std::sync::{Barrier, Mutex};
    transproxy_tests::raise_fd_limit();
    let all_open = Barrier::new(n);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for i in 0..n {
            let (all_open, failures) = (&all_open, &failures);
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || {
                    let result = TcpStream::connect_timeout(&addr, Duration::from_secs(30));
                    // Everyone waits here, so all N tunnels are open at the same time.
                    all_open.wait();
                    let result = result.map_err(anyhow::Error::from).and_then(|mut stream| {
                        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
                        let data = pattern(i as u64 + 1, bytes);
                        let mut echoed = vec![0u8; 16 * 1024];
                        for chunk in data.chunks(16 * 1024) {
                            stream.write_all(chunk)?;
                            stream.read_exact(&mut echoed[..chunk.len()])?;
                            anyhow::ensure!(&echoed[..chunk.len()] == chunk, "corrupted echo");
                        }
                        Ok(())
                    });
                    if let Err(err) = result {
                        failures
                            .lock()
                            .expect("lock")
                            .push(format!("tunnel {i}: {err:#}"));
                    }
                })
                .expect("spawn");
        }
    });
    let failures = failures
        .into_inner()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    if failures.is_empty() {
        println!("ok {n}");
        Ok(())
    } else {
        for failure in failures.iter().take(10) {
            println!("{failure}");
        }
        anyhow::bail!("{} of {n} tunnels failed", failures.len())
    }
}

/// N idle connections, open at the same time until stdin ends. One thread opens them in turn,
/// so a slow acceptor slows the opening down instead of overflowing its backlog.
fn hold(addr: SocketAddr, n: usize) -> anyhow::Result<()> {
    use anyhow::Context as _;
    transproxy_tests::raise_fd_limit();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
            .with_context(|| format!("connection {} of {n} to {addr}", i + 1))?;
        held.push(stream);
    }
    println!("ready");
    std::io::stdout().flush()?;
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    drop(held);
    Ok(())
}

/// Listens on `addr` for `seconds`, printing what every connection sends.
fn squat(addr: SocketAddr, seconds: usize) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    println!("listening");
    std::io::stdout().flush()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds as u64);
    while std::time::Instant::now() < deadline {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut buf = [0u8; 1024];
                let len = stream.read(&mut buf).unwrap_or(0);
                println!(
                    "got:{}",
                    String::from_utf8_lossy(&buf[..len]).escape_default()
                );
                std::io::stdout().flush()?;
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// `struct clone_args` of clone3(2), up to `cgroup` (size 88).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// A child with process id `pid` that drops to `uid`/`gid` and probes `addr`.
fn as_pid(
    pid: libc::pid_t,
    uid: libc::uid_t,
    gid: libc::gid_t,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let tids = [pid];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM forks this single-threaded process; the child only makes
    // system calls and prints before it exits.
    let child = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw const args,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if child < 0 {
        anyhow::bail!("clone3 with pid {pid}: {}", std::io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: plain system calls in the child.
        let dropped = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setgid(gid) == 0
                && libc::setuid(uid) == 0
        };
        let outcome = if dropped {
            probe(addr)
        } else {
            format!("error:cannot drop to {uid}:{gid}")
        };
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        println!("pid {} uid {uid}: {outcome}", std::process::id());
        let _ = std::io::stdout().flush();
        // SAFETY: ends the child without running the parent's exit handlers twice.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just made.
    unsafe { libc::waitpid(child as libc::pid_t, &mut status, 0) };
    Ok(())
}

/// An IPv6-only socket whose connect to the IPv4-mapped `mapped` fails after the programs
/// recorded it, and which then connects to `direct`.
fn stale_record(mapped: SocketAddr, direct: SocketAddr) -> anyhow::Result<()> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let SocketAddr::V4(mapped) = mapped else {
        anyhow::bail!("MAPPED must be an IPv4 address");
    };
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    socket.set_only_v6(true)?;
    // So that someone else may bind its address while its connection is in TIME_WAIT.
    socket.set_reuse_address(true)?;
    let target = SocketAddr::new(mapped.ip().to_ipv6_mapped().into(), mapped.port());
    if let Ok(()) = socket.connect(&SockAddr::from(target)) {
        anyhow::bail!("an IPv6-only socket connected to {target}");
    }
    socket.connect(&SockAddr::from(direct))?;
    let port = socket
        .local_addr()?
        .as_socket()
        .map(|a| a.port())
        .unwrap_or(0);
    let peer = socket.peer_addr()?.as_socket();
    println!("port {port}");
    println!(
        "peer {}",
        peer.map_or_else(|| "?".into(), |p| p.to_string())
    );
    std::io::stdout().flush()?;
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    Ok(())
}

/// `n` IPv6-only sockets connecting to `addr` as IPv4-mapped: each is recorded by connect6,
/// then fails, and is closed.
fn failing_connects(addr: SocketAddr, n: usize) -> anyhow::Result<()> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let SocketAddr::V4(v4) = addr else {
        anyhow::bail!("ADDR must be an IPv4 address");
    };
    let target = SockAddr::from(SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()));
    let mut failed = 0;
    for _ in 0..n {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        socket.set_only_v6(true)?;
        if socket.connect(&target).is_err() {
            failed += 1;
        }
    }
    println!("failed {failed}");
    Ok(())
}

/// One datagram to `addr` by sendto(), and one through a connected socket.
fn dns_raw(addr: SocketAddr, hex: &str, wait: Duration) -> anyhow::Result<()> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("0"), 16))
        .collect::<Result<Vec<u8>, _>>()?;
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    socket.connect(addr)?;
    println!("peer:{}", socket.peer_addr()?);
    socket.send(&bytes)?;
    println!("local:{}", socket.local_addr()?.port());
    socket.set_read_timeout(Some(wait))?;
    let mut buf = [0u8; 4096];
    match socket.recv_from(&mut buf) {
        Ok((len, from)) => {
            let answer: String = buf[..len].iter().map(|b| format!("{b:02x}")).collect();
            println!("from:{from} answer:{answer}");
        }
        Err(_) => println!("timeout"),
    }
    Ok(())
}

fn udp(addr: SocketAddr) -> anyhow::Result<()> {
    // Loopback sources for loopback destinations (the tests' own); any address otherwise (a
    // gateway test's client in its own namespace).
    let bind = match (addr.is_ipv4(), addr.ip().is_loopback()) {
        (true, true) => "127.0.0.1:0",
        (false, true) => "[::1]:0",
        (true, false) => "0.0.0.0:0",
        (false, false) => "[::]:0",
    };
    let word = |result: std::io::Result<usize>| match result {
        Ok(_) => "ok".to_owned(),
        Err(err) => format!("error:{err}"),
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    println!("sendto:{}", word(socket.send_to(b"ping", addr)));
    let connected = std::net::UdpSocket::bind(bind)?;
    let sent = connected
        .connect(addr)
        .and_then(|()| connected.send(b"ping"));
    println!("connected:{}", word(sent));
    Ok(())
}
