//! Bad input gets one clear line on stderr and a non-zero exit, never a panic, and never the
//! proxy password.

use std::process::Command;

use transproxy::upstream::PROXY_ENV_VARS;
use transproxy_tests::{require_root, transproxy_bin};

/// Runs transproxy with `args` (and no proxy variables in the environment); returns the exit
/// code and stderr.
fn transproxy(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(transproxy_bin());
    for var in PROXY_ENV_VARS {
        cmd.env_remove(var);
    }
    // A `run` that is not refused must not attach at the cgroup v2 root (the whole host): each
    // gets an empty cgroup of its own, which changes no error before the attach.
    let cgroup = (args.first() == Some(&"run") && !args.contains(&"--cgroup"))
        .then(|| transproxy_tests::TestCgroup::new("badinput"));
    cmd.args(args);
    if let Some(cgroup) = &cgroup {
        cmd.arg("--cgroup").arg(cgroup.path());
    }
    // Bounded: a mistake that is not caught starts a daemon, which must fail the test, not hang it.
    let out = transproxy_tests::run_for(&mut cmd, std::time::Duration::from_secs(20));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(args: &[&str], expected: &str) {
    let (code, stderr) = transproxy(args);
    assert!(
        matches!(code, Some(c) if c != 0),
        "{args:?} exited {code:?}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(
        !stderr.contains("secret"),
        "{args:?} leaked the password: {stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{args:?} printed more than one line: {stderr}"
    );
    assert!(
        stderr.contains(expected),
        "{args:?}: expected '{expected}' in: {stderr}"
    );
}

#[test]
fn bad_flags_and_config_give_one_line_errors() {
    let proxy = "http://alice:secret@127.0.0.1:3128";
    for (args, expected) in [
        (
            vec!["run", "--proxy", "http://alice:secret@127.0.0.1:99999"],
            "invalid port",
        ),
        (
            vec!["run", "--proxy", "socks4://alice:secret@127.0.0.1:1080"],
            "unsupported proxy scheme 'socks4'",
        ),
        (vec!["run", "--proxy", "http://alice:secret@"], "--proxy"),
        (vec!["run"], "no upstream proxy"),
        (
            vec!["run", "--proxy", proxy, "--include", "127.0.0.0/33"],
            "not a CIDR",
        ),
        (
            vec!["run", "--proxy", proxy, "--exclude", "127.0.0.9:70000"],
            "not a port",
        ),
        (
            vec!["run", "--proxy", proxy, "--include", "127.0.0.9:90-80"],
            "reversed",
        ),
        (
            vec!["run", "--proxy", proxy, "--listen", "0.0.0.0:15001"],
            "specific IPv4",
        ),
        (
            vec!["run", "--proxy", proxy, "--listen", "nonsense"],
            "--listen",
        ),
        (
            vec!["run", "--proxy", proxy, "--cgroup", "/nonexistent/cgroup"],
            "cannot open cgroup",
        ),
        (
            vec!["run", "--proxy", proxy, "--cgroup", "/proc"],
            "not a cgroup directory",
        ),
        (
            vec!["run", "--proxy", proxy, "--connect-timeout", "soon"],
            "--connect-timeout",
        ),
        // Two sockets each need more descriptors than any limit allows (fs.nr_open < 2^31),
        // and more than tokio's semaphore counts.
        (
            vec![
                "run",
                "--proxy",
                proxy,
                "--max-tunnels",
                "3000000000000000000",
            ],
            "holds at most",
        ),
        (
            vec!["run", "--proxy", proxy, "--reply-timeout", "0s"],
            "--reply-timeout must be longer than 0s",
        ),
        (vec!["run", "--bogus"], "--bogus"),
    ] {
        assert_one_line_error(&args, expected);
    }
}

/// The first-day mistakes that used to pass silently are refused, or get a hint, at start.
#[test]
fn first_day_mistakes_are_named() {
    let proxy = "http://alice:secret@127.0.0.1:3128";
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "proxy = \"http://127.0.0.1:3128\"\ncgroup = \"/sys/fs/cgroup\"\nfail_closed = true\n",
    )
    .unwrap();
    let typo = config.path().to_string_lossy().into_owned();
    let run_keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        run_keys.path(),
        "proxy = \"http://127.0.0.1:3128\"\ncgroup = \"/sys/fs/cgroup\"\n",
    )
    .unwrap();
    let run_keys = run_keys.path().to_string_lossy().into_owned();
    for (args, expected) in [
        // An IPv6 include with no IPv6 listener: the ready line would claim it.
        (
            vec![
                "run",
                "--proxy",
                proxy,
                "--listen6",
                "off",
                "--include",
                "2001:db8::/32",
            ],
            "--listen6 off leaves IPv6 alone, but the include 2001:db8::/32 names IPv6 destinations",
        ),
        // exec's flags do not include run's, and a config setting run's keys is refused.
        (
            vec!["exec", "--proxy", proxy, "--fail-closed", "--", "true"],
            "--fail-closed",
        ),
        (
            vec!["exec", "--config", &run_keys, "--", "true"],
            "the config file sets cgroup, which only `transproxy run` uses",
        ),
        // The command after --.
        (
            vec!["exec", "--proxy", proxy, "curl", "http://127.0.0.2/"],
            "the command goes after --",
        ),
        (
            vec!["run", "--proxy", proxy, "--include", "::1/128:443"],
            "an IPv6 network with a port goes in brackets: [::1/128]:443",
        ),
        (
            vec![
                "run",
                "--proxy",
                "http://alice:secret@127.0.0.1:3128/proxy.pac",
            ],
            "has a path",
        ),
        (
            vec!["run", "--config", &typo],
            "did you mean `fail-closed`?",
        ),
    ] {
        assert_one_line_error(&args, expected);
    }
    let out = Command::new(transproxy_bin())
        .args(["exec", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let options: Vec<&str> = help
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("--"))
        .collect();
    assert!(
        !options
            .iter()
            .any(|o| o.starts_with("--fail-closed") || o.starts_with("--user")),
        "{options:?}"
    );
}

/// `--user` with a config file only root can read: SIGHUP would fail, so the start does.
#[test]
fn a_user_who_cannot_read_the_config_is_refused() {
    let cgroup = transproxy_tests::TestCgroup::new("userconfig");
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "proxy = \"http://127.0.0.1:3128\"\n").unwrap();
    std::fs::set_permissions(
        config.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut cmd = Command::new(transproxy_bin());
    cmd.args([
        "run",
        "--include",
        "127.0.0.2/32",
        "--user",
        "nobody",
        "--config",
    ])
    .arg(config.path())
    .arg("--cgroup")
    .arg(cgroup.path());
    transproxy_tests::refuses_to_start(
        &mut cmd,
        "is not readable by that user, and SIGHUP re-reads it as that user",
    );
}

#[test]
fn cgroup_v1_directory_is_named_as_such() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    // Only where this host has a v1 hierarchy mounted (this machine's hybrid layout does).
    let v1 = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup")).then(|| f[1].to_owned())
    });
    let v1 = v1.expect("this test needs a cgroup v1 hierarchy mounted (hybrid layout)");
    assert_one_line_error(
        &["run", "--proxy", "http://127.0.0.1:3128", "--cgroup", &v1],
        "cgroup v1 directory",
    );
}

#[test]
fn not_root_is_a_clear_error() {
    require_root();
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(transproxy_bin())
        .args(["run", "--proxy", "http://alice:secret@127.0.0.1:3128"])
        .output()
        .expect("runuser");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("must run as root"), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
}
