//! DNS for tests, never leaving loopback.
//!
//! * [`TestResolver`]: a small DNS server on a loopback address, port 53 (UDP and TCP), that
//!   answers A and AAAA for the names it is given (under `.test`), NXDOMAIN for the rest, and
//!   records every question it gets.
//! * [`PrivateResolv`]: runs a program inside a test cgroup and a mount namespace of its own
//!   whose `/etc/resolv.conf` names only a loopback resolver and whose `/etc/nsswitch.conf`
//!   says `hosts: files dns` (no systemd-resolved, no mDNS); a name service cache is hidden.
//!   Names resolved there never reach the machine's own resolver.

use std::{
    collections::HashMap,
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata},
};
use tempfile::TempDir;

/// A question as the resolver got it: the name (without the final dot), its type, and `udp`
/// or `tcp`.
pub type Question = (String, RecordType, &'static str);

/// A DNS server for `.test` names on a loopback address.
pub struct TestResolver {
    ip: Ipv4Addr,
    questions: Arc<Mutex<Vec<Question>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TestResolver {
    /// Serves `names` (each with its address) on `ip`:53, over UDP and TCP.
    pub fn start(ip: Ipv4Addr, names: &[(&str, IpAddr)]) -> Self {
        crate::require_root();
        assert!(ip.is_loopback(), "test resolvers live on loopback");
        let names: HashMap<String, IpAddr> = names
            .iter()
            .map(|(name, ip)| {
                assert!(
                    name.ends_with(".test"),
                    "test names are under .test: {name}"
                );
                (format!("{name}."), *ip)
            })
            .collect();
        let names = Arc::new(names);
        let questions = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let addr = SocketAddr::from((ip, 53));
        let udp = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}/udp: {e}"));
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let tcp = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}/tcp: {e}"));
        tcp.set_nonblocking(true).unwrap();
        let mut threads = Vec::new();
        {
            let (names, questions, stop) = (names.clone(), questions.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, peer)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some(answer) = answer(&buf[..len], &names, &questions, "udp") {
                        let _ = udp.send_to(&answer, peer);
                    }
                }
            }));
        }
        {
            let (names, questions, stop) = (names, questions.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut stream, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut len = [0u8; 2];
                    while stream.read_exact(&mut len).is_ok() {
                        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if stream.read_exact(&mut query).is_err() {
                            break;
                        }
                        let Some(answer) = answer(&query, &names, &questions, "tcp") else {
                            break;
                        };
                        let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&answer);
                        if stream.write_all(&framed).is_err() {
                            break;
                        }
                    }
                }
            }));
        }
        Self {
            ip,
            questions,
            stop,
            threads,
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Every question received: `(name, type, transport)`, names without the final dot.
    pub fn questions(&self) -> Vec<Question> {
        self.questions.lock().unwrap().clone()
    }

    /// Whether `name` was asked about, any type, any transport.
    pub fn was_asked(&self, name: &str) -> bool {
        self.questions().iter().any(|(asked, _, _)| asked == name)
    }
}

impl Drop for TestResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The answer to one query, recording its question.
fn answer(
    bytes: &[u8],
    names: &HashMap<String, IpAddr>,
    questions: &Mutex<Vec<Question>>,
    transport: &'static str,
) -> Option<Vec<u8>> {
    let query = Message::from_vec(bytes).ok()?;
    let question = query.queries.first()?.clone();
    let name = question.name().to_ascii();
    questions.lock().unwrap().push((
        name.trim_end_matches('.').to_owned(),
        question.query_type(),
        transport,
    ));
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    match names.get(&name.to_ascii_lowercase()) {
        None => reply.metadata.response_code = ResponseCode::NXDomain,
        Some(ip) => {
            let data = match (ip, question.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => Some(RData::A(rdata::A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(rdata::AAAA(*v6))),
                _ => None,
            };
            if let Some(data) = data {
                reply.add_answer(Record::from_rdata(question.name().clone(), 60, data));
            }
        }
    }
    debug_assert_eq!(reply.metadata.message_type, MessageType::Response);
    reply.to_vec().ok()
}

/// A private `/etc/resolv.conf` (and nsswitch.conf) for programs run in a test cgroup.
pub struct PrivateResolv {
    dir: TempDir,
}

impl PrivateResolv {
    /// `resolv.conf` naming only `resolver` (a loopback address), with `options` lines
    /// (such as `use-vc`) if any.
    pub fn new(resolver: Ipv4Addr, options: &[&str]) -> Self {
        assert!(resolver.is_loopback(), "private resolvers live on loopback");
        let dir = tempfile::Builder::new()
            .prefix("transproxy-resolv-")
            .tempdir()
            .expect("tempdir");
        let mut resolv = format!("nameserver {resolver}\n");
        for option in options {
            resolv.push_str(&format!("options {option}\n"));
        }
        fs::write(dir.path().join("resolv.conf"), resolv).expect("write resolv.conf");
        fs::write(dir.path().join("nsswitch.conf"), "hosts: files dns\n")
            .expect("write nsswitch.conf");
        Self { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A command that joins `cgroup`, enters a mount namespace of its own with this
    /// resolv.conf, then execs `program`.
    pub fn command(
        &self,
        cgroup: &crate::TestCgroup,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(concat!(
                r#"echo $$ > "$0/cgroup.procs" && exec unshare --mount --propagation private "#,
                r#"/bin/sh -c 'mount --bind "$0" /etc/resolv.conf && "#,
                r#"mount --bind "$1" /etc/nsswitch.conf && "#,
                r#"{ [ ! -d /run/nscd ] || mount -t tmpfs tmpfs /run/nscd; } && "#,
                r#"shift && exec "$@"' "$@""#
            ))
            .arg(cgroup.path())
            .arg(self.file("resolv.conf"))
            .arg(self.file("nsswitch.conf"))
            .arg(program);
        cmd
    }
}

/// A private `/etc/hosts` (and `hosts: files` in nsswitch.conf) for a program the test runs
/// outside any test cgroup, such as the daemon itself: the names it looks up resolve from the
/// test's hosts file, never from DNS.
pub struct PrivateHosts {
    dir: TempDir,
}

impl PrivateHosts {
    /// `/etc/hosts` with `hosts` (names under `.test`).
    pub fn new(hosts: &[(&str, IpAddr)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("transproxy-hosts-")
            .tempdir()
            .expect("tempdir");
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (name, ip) in hosts {
            assert!(
                name.ends_with(".test"),
                "test names are under .test: {name}"
            );
            text.push_str(&format!("{ip} {name}\n"));
        }
        fs::write(dir.path().join("hosts"), text).expect("write hosts");
        fs::write(dir.path().join("nsswitch.conf"), "hosts: files\n").expect("write nsswitch");
        Self { dir }
    }

    /// A command that enters a mount namespace of its own with these hosts, then execs
    /// `program` (arguments added to the command go to it).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
            .arg(concat!(
                r#"mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/nsswitch.conf && "#,
                r#"{ [ ! -d /run/nscd ] || mount -t tmpfs tmpfs /run/nscd; } && "#,
                r#"shift && exec "$@""#
            ))
            .arg(self.dir.path().join("hosts"))
            .arg(self.dir.path().join("nsswitch.conf"))
            .arg(program);
        cmd
    }
}
