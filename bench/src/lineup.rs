//! One run's contenders, side by side: a cgroup each, transproxy and redsocks running, both
//! through the same upstream.

use std::{ffi::OsStr, os::unix::process::CommandExt as _, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use transproxy_tests::{TestCgroup, cgroup::v2_root, wait_for};

use crate::{
    contender::Contender,
    iptables::{NatRules, Selector},
    load::HoldClient,
    procfs,
    redsocks::Redsocks,
    stage::Stage,
    transproxy::TransproxyDaemon,
    upstream::{RunningUpstream, Upstream},
};

/// Everything one upstream's run needs. The interceptors stay up for the whole run; each
/// contender's clients run in a cgroup of their own, so transproxy's programs (attached to its
/// cgroup only) never see the other contenders' connections. redsocks' iptables rules are only
/// in force while redsocks is measured ([`Lineup::arm`]): a NAT rule switches connection
/// tracking on for every connection of the machine, which would tax the other contenders.
pub(crate) struct Lineup<'s> {
    pub upstream: Upstream,
    pub stage: &'s Stage,
    /// Declared first, dropped first: the interceptors stop before their upstream.
    transproxy: TransproxyDaemon,
    redsocks: Redsocks,
    proxy: RunningUpstream,
    selector: Selector,
    cgroups: [TestCgroup; 3],
    /// Interceptors started so far, to name their config and log files.
    starts: usize,
}

impl<'s> Lineup<'s> {
    /// Starts the upstream, makes the cgroups, starts both interceptors.
    pub(crate) fn start(stage: &'s Stage, upstream: Upstream) -> anyhow::Result<Self> {
        let proxy = RunningUpstream::start(upstream, &stage.tools)?;
        let cgroups = Contender::ALL.map(|c| TestCgroup::new(&format!("bench-{}", c.name())));
        let root = v2_root();
        let selector = Selector::choose(
            cgroups[Contender::Redsocks.index()].path(),
            &root,
            stage.nginx.addr(),
        )?;
        let transproxy = start_transproxy(stage, &proxy, &cgroups, upstream, 0)?;
        let redsocks = Redsocks::start(
            proxy.addr(),
            proxy.redsocks_type(),
            stage.plan.tunnels_per_process(),
            &stage.logs,
            &format!("{}-0", upstream.key()),
        )?;
        println!(
            "xtask: {}: upstream on {}, transproxy pid {}, redsocks pid {} (port {}), redsocks rules select {selector:?}",
            upstream.key(),
            proxy.addr(),
            transproxy.pid(),
            redsocks.pid(),
            redsocks.port()
        );
        Ok(Self {
            upstream,
            stage,
            transproxy,
            redsocks,
            proxy,
            selector,
            cgroups,
            starts: 1,
        })
    }

    /// `program` run inside the contender's cgroup (and with its group, when iptables selects
    /// redsocks' clients by group).
    pub(crate) fn client(&self, contender: Contender, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = self.cgroups[contender.index()].command(program);
        if contender == Contender::Redsocks
            && let Some(gid) = self.selector.gid()
        {
            cmd.gid(gid);
        }
        cmd
    }

    /// How redsocks' rules select its clients.
    pub(crate) fn selector(&self) -> &Selector {
        &self.selector
    }

    /// The process whose CPU and memory the figures report, if the contender has one.
    pub(crate) fn interceptor_pid(&self, contender: Contender) -> Option<i32> {
        match contender {
            Contender::Direct => None,
            Contender::Transproxy => Some(self.transproxy.pid()),
            Contender::Redsocks => Some(self.redsocks.pid()),
        }
    }

    /// Puts the contender's interception in force until the returned guard drops: redsocks'
    /// NAT rules (one per intercepted origin); nothing for the others, whose state does not
    /// change between measurements.
    pub(crate) fn arm(&self, contender: Contender) -> anyhow::Result<Option<NatRules>> {
        match contender {
            Contender::Redsocks => Ok(Some(NatRules::add(
                &self.stage.intercepted(),
                &self.selector,
                self.redsocks.port(),
            )?)),
            Contender::Direct | Contender::Transproxy => Ok(None),
        }
    }

    /// Replaces the contender's interceptor with a fresh process (for memory figures that need
    /// a baseline untouched by earlier load).
    pub(crate) fn restart(&mut self, contender: Contender) -> anyhow::Result<()> {
        let n = self.starts;
        self.starts += 1;
        match contender {
            Contender::Direct => {}
            Contender::Transproxy => {
                // The old daemon goes first: two daemons on one cgroup would both redirect.
                self.transproxy.stop();
                self.transproxy =
                    start_transproxy(self.stage, &self.proxy, &self.cgroups, self.upstream, n)
                        .context("cannot restart transproxy")?;
            }
            Contender::Redsocks => {
                self.redsocks.stop();
                self.redsocks = Redsocks::start(
                    self.proxy.addr(),
                    self.proxy.redsocks_type(),
                    self.stage.plan.tunnels_per_process(),
                    &self.stage.logs,
                    &format!("{}-{n}", self.upstream.key()),
                )?;
            }
        }
        Ok(())
    }

    /// Checks that each interceptor really carries its contender's connections: with one
    /// connection held open through it, the interceptor must hold two more sockets (the
    /// client's and the upstream's). Without this, a rule that silently failed to match would
    /// make "redsocks" or "transproxy" measure a direct connection.
    pub(crate) fn verify(&self) -> anyhow::Result<()> {
        let holder = &self.stage.holder;
        for contender in [Contender::Transproxy, Contender::Redsocks] {
            let pid = self
                .interceptor_pid(contender)
                .context("an interceptor without a process")?;
            holder.release();
            let _armed = self.arm(contender)?;
            let before = procfs::socket_count(pid)?;
            let hold = HoldClient::open(
                self.client(contender, &self.stage.tools.client),
                &holder.addr().to_string(),
                1,
                Duration::from_secs(10),
            )?;
            let reached = wait_for(Duration::from_secs(10), || {
                (holder.held() >= 1).then_some(())
            });
            let during = procfs::socket_count(pid)?;
            drop(hold);
            holder.release();
            if reached.is_none() || during < before + 2 {
                bail!(
                    "{}: a connection to {} did not go through the interceptor (it reached the origin: {}; interceptor sockets {before} before, {during} with it open)",
                    contender.name(),
                    holder.addr(),
                    reached.is_some()
                );
            }
        }
        Ok(())
    }
}

/// transproxy on the transproxy contender's cgroup, intercepting the stage's origins only.
fn start_transproxy(
    stage: &Stage,
    proxy: &RunningUpstream,
    cgroups: &[TestCgroup; 3],
    upstream: Upstream,
    n: usize,
) -> anyhow::Result<TransproxyDaemon> {
    TransproxyDaemon::start(
        &stage.tools.transproxy,
        &proxy.url(),
        cgroups[Contender::Transproxy.index()].path(),
        &stage.intercepted(),
        &stage
            .logs
            .join(format!("transproxy-{}-{n}.log", upstream.key())),
    )
}
