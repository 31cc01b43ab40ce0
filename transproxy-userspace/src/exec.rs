//! `transproxy exec -- CMD`: one command and its children, intercepted in a transient cgroup.
//!
//! The command is moved into the cgroup before it executes (so not one of its connects escapes),
//! runs as the user who invoked sudo (with that user's HOME, USER, LOGNAME and SHELL, not
//! root's), and its exit status becomes ours. The cgroup is removed on every path: normal exit,
//! death by signal, and a command that cannot be started. Interception is kernel-side, so static
//! and Go binaries that LD_PRELOAD tools miss are caught too.

use std::{
    ffi::{CString, OsString},
    io,
    os::unix::{ffi::OsStrExt as _, process::ExitStatusExt as _},
    process::{ExitCode, ExitStatus},
    task::Poll,
};

use anyhow::{Context as _, anyhow};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use crate::{
    cli::ExecArgs,
    config::{Mode, Settings},
    kernel::cgroup::TransientCgroup,
    privileges,
    service::{Service, report_ignored_no_proxy, runtime},
};

/// Exit status when the command does not exist, as shells report it.
const NOT_FOUND: u8 = 127;
/// Exit status when the command exists but cannot be started.
const CANNOT_RUN: u8 = 126;

/// Signals passed on to the command: those other processes send to stop or poke a program, whose
/// default action would otherwise end exec without removing its cgroup and leave the command
/// running, no longer intercepted. SIGPIPE needs nothing: Rust programs ignore it.
const FORWARDED: [libc::c_int; 5] = [
    libc::SIGHUP,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
];
/// Signals caught but not passed on: the terminal sends them to the command as well.
const FROM_TERMINAL: [libc::c_int; 2] = [libc::SIGINT, libc::SIGQUIT];

/// Who the command runs as.
#[derive(Debug, Clone)]
struct Identity {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    /// HOME, USER, LOGNAME and SHELL from the user's passwd entry (none without one): sudo
    /// leaves root's, and a command writing to `$HOME` as the user must not be sent to /root.
    login_env: Vec<(&'static str, OsString)>,
}

pub fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::resolve(&args.settings, None, Mode::Exec)?;
    privileges::require_root("exec", privileges::ATTACHES)?;
    let identity = invoking_user()?;
    let cgroup = TransientCgroup::create()?;
    let procs = CString::new(cgroup.procs_path().as_os_str().as_bytes())
        .context("the cgroup path contains a NUL byte")?;
    let fd_limit = privileges::raise_fd_limit();
    let intercepts = crate::service::Intercepts::Cgroup {
        dir: cgroup.file(),
        path: cgroup.path(),
    };
    let attached = Service::attach(&settings, &intercepts, None, fd_limit)?;
    let status = runtime()?.block_on(async {
        let service = attached.start()?;
        service.probe_proxy();
        report_ignored_no_proxy(&settings);
        info!(
            "exec in cgroup {}: {}",
            cgroup.path().display(),
            service.describe()
        );
        let status = run_command(
            &args.command,
            procs,
            identity,
            settings.proxy_auth_env.as_deref(),
        )
        .await;
        service.stop(settings.shutdown_grace).await;
        status
    });
    // Dropping the cgroup kills what the command left running there and removes it.
    drop(cgroup);
    status
}

/// The user who ran `sudo transproxy exec`, from SUDO_UID/SUDO_GID; `None` to stay root.
fn invoking_user() -> anyhow::Result<Option<Identity>> {
    let id = |name: &str| -> anyhow::Result<Option<u32>> {
        match std::env::var(name) {
            Ok(value) => value
                .parse()
                .map(Some)
                .map_err(|_| anyhow!("{name}={value} is not a number")),
            Err(_) => Ok(None),
        }
    };
    let (Some(uid), Some(gid)) = (id("SUDO_UID")?, id("SUDO_GID")?) else {
        return Ok(None);
    };
    if uid == 0 {
        return Ok(None);
    }
    // Supplementary groups and environment, as a login would give them.
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return Ok(Some(Identity {
            uid,
            gid,
            groups: vec![gid],
            login_env: Vec::new(),
        }));
    };
    let name = CString::new(user.name.as_str()).context("user name contains a NUL byte")?;
    let groups = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
        .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|_| vec![gid]);
    let login_env = vec![
        ("HOME", user.dir.into_os_string()),
        ("USER", OsString::from(&user.name)),
        ("LOGNAME", OsString::from(user.name)),
        ("SHELL", user.shell.into_os_string()),
    ];
    Ok(Some(Identity {
        uid,
        gid,
        groups,
        login_env,
    }))
}

/// Runs the command inside the cgroup and returns its exit status as ours, passing the
/// [`FORWARDED`] signals on to it. `credentials_var` (`--proxy-auth-env`) is not passed on.
async fn run_command(
    command: &[OsString],
    procs: CString,
    identity: Option<Identity>,
    credentials_var: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow!("no command given"))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    // The proxy's credentials are the daemon's, not the command's (which runs as the user).
    if let Some(var) = credentials_var {
        cmd.env_remove(var);
    }
    // Set by the daemon for its own GSSAPI use: the password file is the daemon's memory, and
    // the keytab its identity's.
    cmd.env_remove("NTLM_USER_FILE")
        .env_remove("KRB5_CLIENT_KTNAME");
    if let Some(id) = &identity {
        cmd.envs(id.login_env.iter().map(|(name, value)| (name, value)));
    }
    let exec_pid = std::process::id() as libc::pid_t;
    // SAFETY: `enter` only makes async-signal-safe system calls (open, write, close, setgroups,
    // setgid, setuid, prctl, getppid) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || enter(&procs, identity.as_ref(), exec_pid));
    }
    let mut handled = Vec::new();
    for signo in FORWARDED.into_iter().chain(FROM_TERMINAL) {
        let stream = signal(SignalKind::from_raw(signo))
            .with_context(|| format!("cannot handle signal {signo}"))?;
        handled.push((signo, stream));
    }
    // `spawn` forks from this thread, the one `block_on` runs on, which lives as long as exec:
    // the parent-death signal set in `enter` fires when the forking thread ends.
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(err) => {
            let code = if err.kind() == io::ErrorKind::NotFound {
                NOT_FOUND
            } else {
                CANNOT_RUN
            };
            eprintln!(
                "transproxy: cannot run {}: {err}",
                program.to_string_lossy()
            );
            return Ok(ExitCode::from(code));
        }
    };
    let pid = child.id().map(|pid| pid as libc::pid_t);
    let forward = |sig: libc::c_int| {
        if let (Some(pid), Ok(sig)) = (pid, nix::sys::signal::Signal::try_from(sig)) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    };
    loop {
        tokio::select! {
            status = child.wait() => return Ok(exit_code(status.context("cannot wait for the command")?)),
            signo = next_signal(&mut handled) => if FORWARDED.contains(&signo) {
                forward(signo);
            },
        }
    }
}

/// The next of the `handled` signals to arrive.
async fn next_signal(handled: &mut [(libc::c_int, Signal)]) -> libc::c_int {
    std::future::poll_fn(|cx| {
        handled
            .iter_mut()
            .find_map(|(signo, stream)| match stream.poll_recv(cx) {
                Poll::Ready(Some(())) => Some(Poll::Ready(*signo)),
                // Ready(None): the runtime is shutting down; nothing more will come.
                _ => None,
            })
            .unwrap_or(Poll::Pending)
    })
    .await
}

/// In the forked child, before exec: join the cgroup, drop to the invoking user, and ask to be
/// killed when exec dies. That covers SIGKILL, which exec cannot catch to clean up: the command
/// would otherwise run on, no longer intercepted (its own children are killed with the cgroup
/// when the next exec removes it).
fn enter(procs: &CString, identity: Option<&Identity>, exec_pid: libc::pid_t) -> io::Result<()> {
    // SAFETY: plain system calls on valid pointers; see `run_command`.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // "0" moves the writing process itself.
        let written = libc::write(fd, c"0".as_ptr().cast(), 1);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(err);
        }
        if let Some(id) = identity
            && (libc::setgroups(id.groups.len(), id.groups.as_ptr()) != 0
                || libc::setgid(id.gid) != 0
                || libc::setuid(id.uid) != 0)
        {
            return Err(io::Error::last_os_error());
        }
        // After setuid, which clears the parent-death signal.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        // exec died before the prctl: the signal will never come.
        if libc::getppid() != exec_pid {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// The command's status as a process exit code; death by signal N becomes 128 + N, as in shells.
fn exit_code(status: ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(signal)) => ExitCode::from(128u8.wrapping_add(signal as u8)),
        (None, None) => {
            warn!("the command ended with status {status}");
            ExitCode::FAILURE
        }
    }
}
