//! What proxy authentication costs per tunnel: transproxy through squid asking for each scheme
//! (Basic, Digest, NTLM, Negotiate with Kerberos), against squid asking for nothing and
//! against Basic. Every scheme has a squid and a daemon of its own for the whole section, and
//! the schemes take turns within each repetition, as the contenders do in the main tables.
//!
//! What the figures mean: Basic and Digest cost one request per tunnel once the daemon has
//! learned the scheme (Digest reuses its nonce, counting); NTLM and Negotiate authenticate each
//! proxy connection, NTLM in two requests, Negotiate in one with a Kerberos service ticket the
//! GSSAPI keeps in the credentials cache. squid's helpers do their share of the work, so the
//! rate is squid's as much as transproxy's; the interceptor's CPU per 10,000 tunnels is
//! transproxy's alone.

use std::{panic::AssertUnwindSafe, path::Path, process::Command};

use anyhow::{Context as _, bail};
use transproxy_tests::{Kdc, PrivateHosts, Squid, SquidAuth, TestCgroup, kdc};

use crate::{
    figure::Figure,
    interrupt,
    load::Wrk,
    procfs,
    results::Results,
    stage::Stage,
    step::Measured,
    tools::{CURL, WRK},
    transproxy::TransproxyDaemon,
};

/// The user and password of the password schemes (squid's files hold them).
const USER: &str = "bench";
const PASSWORD: &str = "bench-password";

/// What squid asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum AuthScheme {
    /// Nothing: the baseline of squid's own cost.
    None,
    Basic,
    Digest,
    Ntlm,
    Negotiate,
}

impl AuthScheme {
    /// In report order.
    pub(crate) const ALL: [AuthScheme; 5] = [
        AuthScheme::None,
        AuthScheme::Basic,
        AuthScheme::Digest,
        AuthScheme::Ntlm,
        AuthScheme::Negotiate,
    ];

    /// The JSON key and cgroup label.
    pub(crate) fn key(self) -> &'static str {
        match self {
            AuthScheme::None => "none",
            AuthScheme::Basic => "basic",
            AuthScheme::Digest => "digest",
            AuthScheme::Ntlm => "ntlm",
            AuthScheme::Negotiate => "negotiate",
        }
    }

    /// The row label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            AuthScheme::None => "none (squid asks for nothing)",
            AuthScheme::Basic => "Basic (`basic_ncsa_auth`)",
            AuthScheme::Digest => "Digest, MD5 (`digest_file_auth`)",
            AuthScheme::Ntlm => "NTLMv2 (`ntlm_fake_auth`)",
            AuthScheme::Negotiate => "Negotiate, Kerberos (`negotiate_kerberos_auth`, MIT KDC)",
        }
    }

    /// The figures measured for each scheme.
    pub(crate) const FIGURES: [Figure; 3] = [
        Figure::ConnectionsPerSecond,
        Figure::LatencyP50,
        Figure::CpuPer10kConnections,
    ];
}

/// One scheme's squid and the daemon authenticating to it. Fields drop in order: the daemon
/// detaches before its cgroup goes, squid stops before its realm.
struct Setup {
    scheme: AuthScheme,
    daemon: TransproxyDaemon,
    cgroup: TestCgroup,
    squid: Squid,
    /// The daemon's hosts file (Negotiate: the proxy is named `proxy.test`, its principal's).
    _hosts: Option<PrivateHosts>,
    _kdc: Option<Kdc>,
}

impl Setup {
    /// Starts squid asking for `scheme` and a daemon holding the credentials for it.
    fn start(stage: &Stage, scheme: AuthScheme) -> anyhow::Result<Self> {
        let password = || (USER.to_owned(), PASSWORD.to_owned());
        let mut kdc_started = None;
        let squid = match scheme {
            AuthScheme::None => Squid::start(&[]),
            AuthScheme::Basic => {
                let (user, password) = password();
                Squid::start_with_auth(vec![SquidAuth::Basic { user, password }])
            }
            AuthScheme::Digest => {
                let (user, password) = password();
                Squid::start_with_auth(vec![SquidAuth::Digest { user, password }])
            }
            AuthScheme::Ntlm => Squid::start_with_auth(vec![SquidAuth::NtlmFake]),
            AuthScheme::Negotiate => {
                let realm = Kdc::start();
                let squid = Squid::start_with_auth(vec![SquidAuth::Kerberos {
                    keytab: realm.keytab(),
                    krb5_config: realm.config(),
                }]);
                kdc_started = Some(realm);
                squid
            }
        };
        let cgroup = TestCgroup::new(&format!("bench-auth-{}", scheme.key()));
        let log = stage
            .logs
            .join(format!("transproxy-auth-{}.log", scheme.key()));
        let origins = stage.intercepted();
        let port = squid.addr().port();
        let (daemon, hosts) = match &kdc_started {
            Some(realm) => {
                let ccache = realm.ccache("cc.bench");
                realm.kinit(&ccache, "10h");
                let hosts = PrivateHosts::new(&[(kdc::PROXY_HOST, "127.0.0.1".parse()?)]);
                let mut program = hosts.command(&stage.tools.transproxy);
                program.env("KRB5_CONFIG", realm.config());
                let daemon = TransproxyDaemon::start_with(
                    program,
                    &format!("http://{}:{port}", kdc::PROXY_HOST),
                    cgroup.path(),
                    &origins,
                    &[
                        "--proxy-auth-ccache".to_owned(),
                        format!("FILE:{}", ccache.display()),
                    ],
                    &log,
                )?;
                (daemon, Some(hosts))
            }
            None => {
                let url = match scheme {
                    AuthScheme::None => squid.url(),
                    _ => format!("http://{USER}:{PASSWORD}@127.0.0.1:{port}"),
                };
                let program = Command::new(&stage.tools.transproxy);
                let daemon = TransproxyDaemon::start_with(
                    program,
                    &url,
                    cgroup.path(),
                    &origins,
                    &[],
                    &log,
                )?;
                (daemon, None)
            }
        };
        Ok(Self {
            scheme,
            daemon,
            cgroup,
            squid,
            _hosts: hosts,
            _kdc: kdc_started,
        })
    }

    /// One fetch through it must succeed, and squid must have logged the user it
    /// authenticated: otherwise the figures would measure something else.
    fn verify(&self, stage: &Stage, log: &Path) -> anyhow::Result<()> {
        let mut curl = self.cgroup.command(CURL);
        curl.args([
            "--noproxy",
            "*",
            "--silent",
            "--max-time",
            "10",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
        ])
        .arg(stage.nginx.small_url());
        let out = curl.output().context("cannot run curl")?;
        let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if code != "200" {
            let said = std::fs::read_to_string(log).unwrap_or_default();
            bail!(
                "{}: a fetch through transproxy and squid answered {code:?}; transproxy said:\n{said}",
                self.scheme.key()
            );
        }
        let user = match self.scheme {
            AuthScheme::None => return Ok(()),
            AuthScheme::Negotiate => format!("{}@{}", kdc::USER, kdc::REALM),
            _ => USER.to_owned(),
        };
        let logged = transproxy_tests::wait_for(std::time::Duration::from_secs(5), || {
            self.squid.access_log().contains(&user).then_some(())
        });
        if logged.is_none() {
            bail!(
                "{}: squid did not log the user {user}:\n{}",
                self.scheme.key(),
                self.squid.access_log()
            );
        }
        Ok(())
    }
}

/// Measures every scheme: connections per second and the daemon's CPU per 10,000 tunnels (wrk,
/// 32 connections, `Connection: close`), and the latency at one connection. A scheme whose
/// set-up fails is noted and left out; an interruption ends the benchmark.
pub(crate) fn measure(stage: &Stage, results: &mut Results) -> anyhow::Result<()> {
    let mut setups = Vec::new();
    for scheme in AuthScheme::ALL {
        interrupt::check()?;
        // The test harness' fixtures panic when they cannot start: here that is a note.
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| Setup::start(stage, scheme)))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("its squid or KDC did not start")));
        let log = stage
            .logs
            .join(format!("transproxy-auth-{}.log", scheme.key()));
        match started.and_then(|setup| setup.verify(stage, &log).map(|()| setup)) {
            Ok(setup) => setups.push(setup),
            Err(err) => {
                eprintln!("xtask: auth {}: left out: {err:#}", scheme.key());
                results.note(format!("auth {}: left out: {err:#}", scheme.key()));
            }
        }
    }
    let plan = stage.plan.clone();
    for repetition in 0..plan.repetitions {
        let mut order: Vec<&Setup> = setups.iter().collect();
        if !order.is_empty() {
            let n = order.len();
            order.rotate_left(repetition % n);
        }
        for setup in order {
            interrupt::check()?;
            std::thread::sleep(plan.settle);
            let label = format!(
                "auth {}/{}, {}",
                repetition + 1,
                plan.repetitions,
                setup.scheme.key()
            );
            match measure_one(stage, setup) {
                Ok(Measured { values, problems }) => {
                    for problem in problems {
                        results.note(format!("{label}: {problem}"));
                    }
                    let shown: Vec<String> = values
                        .iter()
                        .map(|(figure, value)| {
                            format!("{} {value:.3} {}", figure.key(), figure.unit())
                        })
                        .collect();
                    println!("xtask: {label}: {}", shown.join(", "));
                    for (figure, value) in values {
                        results.record_auth(setup.scheme, figure, value);
                    }
                }
                Err(err) => {
                    interrupt::check()?;
                    eprintln!("xtask: {label}: failed: {err:#}");
                    results.note(format!("{label}: failed: {err:#}"));
                }
            }
        }
    }
    Ok(())
}

/// One sample of each figure for one scheme, and what the load generator counted as errors.
fn measure_one(stage: &Stage, setup: &Setup) -> anyhow::Result<Measured> {
    let pid = setup.daemon.pid();
    let url = stage.nginx.small_url();
    let rate = Wrk {
        connections: 32,
        threads: 2,
        seconds: stage.plan.load_seconds,
        latency: false,
    };
    let before = procfs::cpu_seconds(pid)?;
    let report = rate.run(setup.cgroup.command(WRK), &url)?;
    let after = procfs::cpu_seconds(pid)?;
    let mut problems: Vec<String> = report
        .problems()
        .map(|p| format!("connection rate: {p}"))
        .into_iter()
        .collect();
    let mut values = vec![(Figure::ConnectionsPerSecond, report.ok_per_second)];
    if report.requests > 0 {
        values.push((
            Figure::CpuPer10kConnections,
            (after - before) / report.requests as f64 * 10_000.0,
        ));
    }
    std::thread::sleep(stage.plan.settle);
    let latency = Wrk {
        connections: 1,
        threads: 1,
        seconds: stage.plan.load_seconds,
        latency: true,
    };
    let report = latency.run(setup.cgroup.command(WRK), &url)?;
    problems.extend(report.problems().map(|p| format!("latency: {p}")));
    let p50 = report
        .p50_us
        .context("wrk printed no latency distribution")?;
    values.push((Figure::LatencyP50, p50));
    Ok(Measured { values, problems })
}
