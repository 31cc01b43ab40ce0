//! Running transproxy as a service: the Debian package (`cargo xtask deb`, passed in
//! `TRANSPROXY_DEB`), `cargo xtask install` (the xtask binary, passed in `TRANSPROXY_XTASK`),
//! the shipped unit and config file, and the daemon's notifications to systemd.
//!
//! The package is only looked into, never installed; its maintainer scripts run with stand-ins
//! for `systemctl` and `transproxy`. The unit's sandbox is checked as far as it can be without
//! systemd as init: `systemd-analyze verify` and `security`, and the real daemon started
//! inside the unit's capability bounding set and read-only file system, and traced to check its
//! system calls against the unit's filter. Tools these checks need (systemd-analyze, man,
//! strace, dpkg-deb) are installed by `cargo xtask test`; a missing one fails the test.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::{
        linux::net::SocketAddrExt as _,
        unix::{
            fs::PermissionsExt as _,
            net::{SocketAddr as UnixAddr, UnixDatagram},
        },
    },
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use transproxy::{
    cli::SettingArgs,
    config::{Mode, Settings, check_text},
};
use transproxy_tests::{
    Daemon, Detach, LOG_WAIT, ORIGIN_IP, OTHER_IP, Origin, Squid, TestCgroup, client_bin, probe,
    run, text, transproxy_bin, wait_for,
};

/// Every file the package installs (folders aside), with its mode.
const PACKAGE_FILES: &[(&str, u32)] = &[
    ("/etc/transproxy.toml", 0o600),
    ("/lib/systemd/system/transproxy.service", 0o644),
    ("/usr/bin/transproxy", 0o755),
    ("/usr/share/bash-completion/completions/transproxy", 0o644),
    ("/usr/share/containers/oci/hooks.d/transproxy.json", 0o644),
    ("/usr/share/doc/transproxy/copyright", 0o644),
    (
        "/usr/share/fish/vendor_completions.d/transproxy.fish",
        0o644,
    ),
    ("/usr/share/man/man1/transproxy-cni.1.gz", 0o644),
    ("/usr/share/man/man1/transproxy-detach.1.gz", 0o644),
    ("/usr/share/man/man1/transproxy-exec.1.gz", 0o644),
    ("/usr/share/man/man1/transproxy-gateway.1.gz", 0o644),
    ("/usr/share/man/man1/transproxy-oci-hook.1.gz", 0o644),
    ("/usr/share/man/man1/transproxy-run.1.gz", 0o644),
    ("/usr/share/man/man1/transproxy-status.1.gz", 0o644),
    ("/usr/share/man/man1/transproxy.1.gz", 0o644),
    ("/usr/share/zsh/vendor-completions/_transproxy", 0o644),
];

/// Every file `cargo xtask install` writes, with its mode.
const INSTALLED_FILES: &[(&str, u32)] = &[
    ("/etc/containers/oci/hooks.d/transproxy.json", 0o644),
    ("/etc/systemd/system/transproxy.service", 0o644),
    ("/etc/transproxy.toml", 0o600),
    ("/usr/local/bin/transproxy", 0o755),
    (
        "/usr/local/share/bash-completion/completions/transproxy",
        0o644,
    ),
    (
        "/usr/local/share/fish/vendor_completions.d/transproxy.fish",
        0o644,
    ),
    ("/usr/local/share/man/man1/transproxy-cni.1.gz", 0o644),
    ("/usr/local/share/man/man1/transproxy-detach.1.gz", 0o644),
    ("/usr/local/share/man/man1/transproxy-exec.1.gz", 0o644),
    ("/usr/local/share/man/man1/transproxy-gateway.1.gz", 0o644),
    ("/usr/local/share/man/man1/transproxy-oci-hook.1.gz", 0o644),
    ("/usr/local/share/man/man1/transproxy-run.1.gz", 0o644),
    ("/usr/local/share/man/man1/transproxy-status.1.gz", 0o644),
    ("/usr/local/share/man/man1/transproxy.1.gz", 0o644),
    ("/usr/local/share/zsh/site-functions/_transproxy", 0o644),
];

const MAN_PAGES: &[&str] = &[
    "transproxy",
    "transproxy-run",
    "transproxy-exec",
    "transproxy-detach",
    "transproxy-status",
    "transproxy-oci-hook",
    "transproxy-cni",
    "transproxy-gateway",
];

/// The package under test: `TRANSPROXY_DEB`, set by `cargo xtask test`.
fn deb() -> PathBuf {
    let path = std::env::var_os("TRANSPROXY_DEB").map(PathBuf::from).expect(
        "TRANSPROXY_DEB is not set: run the integration tests through `cargo xtask test`, which builds the package",
    );
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

/// The xtask binary that ran `cargo xtask test`: `TRANSPROXY_XTASK`.
fn xtask() -> PathBuf {
    let path = std::env::var_os("TRANSPROXY_XTASK")
        .map(PathBuf::from)
        .expect(
            "TRANSPROXY_XTASK is not set: run the integration tests through `cargo xtask test`",
        );
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

/// Fails the test, saying which package to install, when `tool` is not on PATH.
fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", "command -v \"$0\"", tool])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is missing: install the Debian package {package} (cargo xtask test does)"
    );
}

/// Runs `cmd`, which must succeed; returns its stdout.
fn succeed(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The package unpacked: its files, and its control files in DEBIAN/.
fn unpack() -> tempfile::TempDir {
    require_tool("dpkg-deb", "dpkg");
    let dir = tempfile::Builder::new()
        .prefix("transproxy-deb-")
        .tempdir()
        .expect("tempdir");
    succeed(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb())
            .arg(dir.path()),
    );
    succeed(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(deb())
            .arg(dir.path().join("DEBIAN")),
    );
    dir
}

/// `path` (absolute on the target system) below `root`.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// The files below `root` (folders and DEBIAN/ aside) with their modes.
fn files_with_modes(root: &Path) -> BTreeMap<String, u32> {
    fn walk(root: &Path, dir: &Path, found: &mut BTreeMap<String, u32>) {
        for entry in fs::read_dir(dir).expect("read_dir").map(Result::unwrap) {
            let path = entry.path();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                if path != root.join("DEBIAN") {
                    walk(root, &path, found);
                }
            } else {
                let shown = format!("/{}", path.strip_prefix(root).unwrap().display());
                found.insert(shown, meta.permissions().mode() & 0o7777);
            }
        }
    }
    let mut found = BTreeMap::new();
    walk(root, root, &mut found);
    found
}

fn expected(files: &[(&str, u32)]) -> BTreeMap<String, u32> {
    files.iter().map(|(p, m)| ((*p).to_owned(), *m)).collect()
}

/// The values of `key` in the unit's [Service] section.
fn service_values(unit: &str, key: &str) -> Vec<String> {
    let mut section = "";
    let mut values = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]"
            && let Some(value) = line
                .strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
        {
            values.push(value.to_owned());
        }
    }
    values
}

fn service_value(unit: &str, key: &str) -> String {
    let values = service_values(unit, key);
    assert_eq!(values.len(), 1, "{key}= in the unit: {values:?}");
    values[0].clone()
}

#[test]
fn the_package_holds_every_file_with_its_mode() {
    let listing = succeed(Command::new("dpkg-deb").arg("--contents").arg(deb()));
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        // -rw-r--r-- root/root      5389 2026-12-02 08:08 ./lib/systemd/system/transproxy.service
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 6, "{line}");
        assert_eq!(fields[1], "root/root", "{line}");
        if fields[0].starts_with('d') {
            assert_eq!(fields[0], "drwxr-xr-x", "{line}");
            continue;
        }
        let mode = fields[0]
            .chars()
            .skip(1)
            .fold(0, |mode, c| (mode << 1) | u32::from(c != '-'));
        files.insert(fields[5].trim_start_matches('.').to_owned(), mode);
    }
    assert_eq!(files, expected(PACKAGE_FILES));

    // The binary is the one the other tests run.
    let unpacked = unpack();
    let packaged = fs::read(under(unpacked.path(), "/usr/bin/transproxy")).unwrap();
    assert!(packaged == fs::read(transproxy_bin()).unwrap());
}

#[test]
fn the_package_declares_itself_and_its_conffile() {
    let field = |name: &str| {
        succeed(Command::new("dpkg-deb").arg("--field").arg(deb()).arg(name))
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), "transproxy");
    let version = succeed(Command::new(transproxy_bin()).arg("--version"));
    assert_eq!(
        format!("transproxy {}", field("Version")),
        version.trim(),
        "the package's version is the binary's"
    );
    let arch = succeed(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(field("Architecture"), arch.trim());
    let depends = field("Depends");
    assert!(depends.contains("libc6 (>= "), "Depends: {depends}");
    // Negotiate links the system's GSSAPI (MIT krb5): dpkg-shlibdeps must have found it.
    assert!(depends.contains("libgssapi-krb5-2"), "Depends: {depends}");
    assert_eq!(field("Suggests"), "gss-ntlmssp, krb5-user");
    assert!(field("Maintainer").contains('@'));
    assert!(field("Description").contains("/etc/transproxy.toml"));
    let file_name = deb().file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        file_name,
        format!("transproxy_{}_{}.deb", field("Version"), arch.trim())
    );

    let unpacked = unpack();
    let control = unpacked.path().join("DEBIAN");
    assert_eq!(
        fs::read_to_string(control.join("conffiles")).unwrap(),
        "/etc/transproxy.toml\n"
    );
    // md5sums names every file, and matches it.
    let md5sums = fs::read_to_string(control.join("md5sums")).unwrap();
    let listed: BTreeSet<String> = md5sums
        .lines()
        .map(|l| format!("/{}", l.split_once("  ").unwrap().1))
        .collect();
    let expected: BTreeSet<String> = PACKAGE_FILES.iter().map(|(p, _)| (*p).to_owned()).collect();
    assert_eq!(listed, expected);
    succeed(
        Command::new("md5sum")
            .args(["--check", "--quiet"])
            .arg(control.join("md5sums"))
            .current_dir(unpacked.path()),
    );
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "{script}");
        succeed(Command::new("sh").arg("-n").arg(&path));
    }
}

/// What the maintainer scripts ran, with stand-ins for `systemctl` and `transproxy` that only
/// record their arguments, in a mount namespace where `/run` is a fresh tmpfs (with
/// /run/systemd/system when `systemd` is true, as on a machine booted with systemd).
fn maintainer_script(control: &Path, script: &str, args: &[&str], systemd: bool) -> Vec<String> {
    let bin = tempfile::Builder::new()
        .prefix("transproxy-standins-")
        .tempdir()
        .unwrap();
    let log = bin.path().join("calls");
    for tool in ["systemctl", "transproxy"] {
        let path = bin.path().join(tool);
        fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{tool} $*\" >> '{}'\n",
                log.to_string_lossy()
            ),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let setup = if systemd {
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system"
    } else {
        "mount -t tmpfs tmpfs /run"
    };
    // The real transproxy must never run here (it would detach every kill switch on this
    // machine): the stand-ins come first on a PATH that holds no other transproxy.
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.path().display());
    let found = succeed(
        Command::new("sh")
            .args(["-c", "command -v transproxy"])
            .env("PATH", &path),
    );
    assert_eq!(
        found.trim(),
        bin.path().join("transproxy").to_string_lossy()
    );
    let out = run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(r#"{setup} && exec sh "$@""#))
        .arg("sh")
        .arg(control.join(script))
        .args(args)
        .env("PATH", &path));
    assert!(
        out.status.success(),
        "{script} {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn maintainer_scripts_never_start_the_service_and_detach_only_on_removal() {
    let unpacked = unpack();
    let control = unpacked.path().join("DEBIAN");
    let calls = |script: &str, args: &[&str], systemd: bool| {
        maintainer_script(&control, script, args, systemd)
    };
    // Installed: systemd reads the unit; nothing is enabled or started.
    assert_eq!(
        calls("postinst", &["configure", ""], true),
        ["systemctl daemon-reload"]
    );
    assert!(calls("postinst", &["configure", ""], false).is_empty());
    // Upgraded: a running service restarts with the new binary; a stopped one stays stopped.
    assert_eq!(
        calls("postinst", &["configure", "0.0.1"], true),
        [
            "systemctl daemon-reload",
            "systemctl try-restart transproxy.service"
        ]
    );
    // Removed: stopped, disabled, and the kill switch removed, since nothing could remove it
    // once the binary is gone.
    assert_eq!(
        calls("prerm", &["remove"], true),
        [
            "systemctl stop transproxy.service",
            "systemctl --no-reload disable transproxy.service",
            "transproxy detach --all"
        ]
    );
    assert_eq!(
        calls("prerm", &["remove"], false),
        [
            "systemctl --no-reload disable transproxy.service",
            "transproxy detach --all"
        ]
    );
    // Upgrading keeps everything: the new daemon takes the kill switch over.
    assert!(calls("prerm", &["upgrade", "0.2.0"], true).is_empty());
    assert!(calls("prerm", &["deconfigure"], true).is_empty());
    for action in ["remove", "purge"] {
        assert_eq!(
            calls("postrm", &[action], true),
            ["systemctl daemon-reload"]
        );
        assert!(calls("postrm", &[action], false).is_empty());
    }
    assert!(calls("postrm", &["upgrade", "0.2.0"], true).is_empty());
}

/// Writes `unit` into a fresh folder with its binary replaced by `binary` (the package is not
/// installed here), for systemd-analyze.
fn unit_for_analysis(unit: &str, shipped_binary: &str, binary: &Path) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("transproxy-unit-")
        .tempdir()
        .unwrap();
    let exec_start = format!("ExecStart={shipped_binary} ");
    assert_eq!(unit.matches(&exec_start).count(), 1, "{exec_start}");
    let unit = unit.replace(&exec_start, &format!("ExecStart={} ", binary.display()));
    fs::write(dir.path().join("transproxy.service"), unit).unwrap();
    dir
}

/// `systemd-analyze verify` (with the man pages it names looked for in `man_dir`) and
/// `security`: no complaint, and an exposure of at most 3.1 ("OK"). It was 2.7 until the
/// daemon served containers: entering their network namespaces takes CAP_SYS_ADMIN in the
/// bounding set (+0.3) and `RestrictNamespaces=net` (+0.1); only the namespace opener keeps
/// that capability once the daemon is attached.
fn analyze(unit_dir: &Path, man_dir: &Path) {
    require_tool("systemd-analyze", "systemd");
    let unit = unit_dir.join("transproxy.service");
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("MANPATH", man_dir));
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=31"])
        .arg(&unit));
    assert!(
        out.status.success(),
        "systemd-analyze security: exposure above 3.1: {}",
        text(&out.stdout)
    );
}

#[test]
fn the_packaged_unit_verifies_and_says_what_the_daemon_needs() {
    let unpacked = unpack();
    let root = unpacked.path();
    let unit = fs::read_to_string(under(root, "/lib/systemd/system/transproxy.service")).unwrap();
    let dir = unit_for_analysis(
        &unit,
        "/usr/bin/transproxy",
        &under(root, "/usr/bin/transproxy"),
    );
    analyze(dir.path(), &under(root, "/usr/share/man"));

    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        (
            "ExecStart",
            "/usr/bin/transproxy run --config /etc/transproxy.toml",
        ),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("LimitNOFILE", "1048576"),
        ("RuntimeDirectory", "transproxy"),
        ("RuntimeDirectoryMode", "0700"),
        ("LogsDirectory", "transproxy"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/sys/fs/bpf"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        (
            "RestrictAddressFamilies",
            "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        ),
    ] {
        assert_eq!(service_value(&unit, key), value, "{key}");
    }
    // Every group of the service's settings has a comment above it that says why.
    let mut in_service = false;
    let mut after_comment = false;
    for line in unit.lines() {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            after_comment = false;
        } else if line.starts_with('#') {
            after_comment = true;
        } else if line.contains('=') {
            assert!(!in_service || after_comment, "no comment above: {line}");
        } else {
            after_comment = false;
        }
    }
}

#[test]
fn man_pages_and_completions_are_well_formed() {
    require_tool("man", "man-db");
    let unpacked = unpack();
    let root = unpacked.path();
    for page in MAN_PAGES {
        let path = under(root, &format!("/usr/share/man/man1/{page}.1.gz"));
        let roff = succeed(Command::new("gzip").args(["-dc"]).arg(&path));
        assert!(
            roff.lines()
                .any(|l| l.starts_with(&format!(".TH {page} 1 "))),
            "{page}: no .TH line"
        );
        let out = run(Command::new("man")
            .args(["--warnings=all", "-l"])
            .arg(&path)
            .env("MANWIDTH", "100"));
        let shown = text(&out.stdout);
        assert!(out.status.success(), "man -l {page}: {}", text(&out.stderr));
        assert!(
            out.stderr.is_empty(),
            "man -l {page} warns: {}",
            text(&out.stderr)
        );
        assert!(
            shown.contains("NAME") && shown.contains("SYNOPSIS"),
            "{shown}"
        );
    }
    let run_page = succeed(
        Command::new("man")
            .arg("-l")
            .arg(under(root, "/usr/share/man/man1/transproxy-run.1.gz"))
            .env("MANWIDTH", "200"),
    );
    for flag in ["--fail-closed", "--config", "--user", "--cgroup"] {
        assert!(
            run_page.contains(flag),
            "{flag} missing from transproxy-run(1)"
        );
    }

    let bash = under(root, "/usr/share/bash-completion/completions/transproxy");
    succeed(Command::new("bash").arg("-n").arg(&bash));
    assert!(
        fs::read_to_string(&bash)
            .unwrap()
            .contains("complete -F _transproxy")
    );
    let zsh =
        fs::read_to_string(under(root, "/usr/share/zsh/vendor-completions/_transproxy")).unwrap();
    assert!(zsh.starts_with("#compdef transproxy"), "{zsh}");
    let fish = fs::read_to_string(under(
        root,
        "/usr/share/fish/vendor_completions.d/transproxy.fish",
    ))
    .unwrap();
    assert!(fish.contains("complete -c transproxy"), "{fish}");
    for sub in ["run", "exec", "detach", "status"] {
        assert!(fish.contains(sub) && zsh.contains(sub), "{sub}");
    }
}

/// The shipped config with every commented setting uncommented: those marked `example` or
/// `required` too when `examples` is true, only the defaults otherwise.
fn uncommented(config: &str, examples: bool) -> String {
    config
        .lines()
        .map(|line| {
            let Some(setting) = line.strip_prefix("# ") else {
                return line.to_owned();
            };
            let is_setting = setting.split_once(" = ").is_some_and(|(key, _)| {
                key.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            });
            let marked = setting.contains("# example") || setting.contains("# required");
            if is_setting && (examples || !marked) {
                setting.to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_shipped_config_parses_and_its_comments_are_the_defaults() {
    let unpacked = unpack();
    let config = fs::read_to_string(under(unpacked.path(), "/etc/transproxy.toml")).unwrap();
    check_text(&config).expect("the shipped config parses");
    check_text(&uncommented(&config, true)).expect("the shipped config, uncommented, parses");

    // Uncommenting the lines that show defaults changes nothing.
    let dir = tempfile::tempdir().unwrap();
    let resolve = |text: &str| {
        let path = dir.path().join("transproxy.toml");
        fs::write(&path, text).unwrap();
        let args = SettingArgs {
            config: Some(path),
            proxy: vec!["http://127.0.0.1:3128".into()],
            ..SettingArgs::default()
        };
        format!("{:?}", Settings::resolve(&args, None, Mode::Run).unwrap())
    };
    let defaults = uncommented(&config, false);
    assert_eq!(resolve(&defaults), resolve(""));
    assert_eq!(resolve(&config), resolve(""));

    // Every setting of the README's example is in the shipped file, at its default or as an
    // example.
    let shipped = keys(&uncommented(&config, true));
    let readme = fs::read_to_string(transproxy_tests::workspace::root().join("README.md")).unwrap();
    let example = readme
        .split("#### Config file")
        .nth(1)
        .and_then(|section| section.split("```toml").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("the README's config example");
    let documented = keys(&uncommented(example, true));
    assert!(documented.len() >= 20, "{documented:?}");
    let missing: Vec<&String> = documented.difference(&shipped).collect();
    assert!(missing.is_empty(), "not in the shipped config: {missing:?}");
    let defaults = keys(&defaults);
    assert!(
        defaults.len() >= 15,
        "{} settings shown at their default: {defaults:?}",
        defaults.len()
    );
}

/// The keys a config text sets.
fn keys(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(" = "))
        .map(|(key, _)| key.trim().to_owned())
        .collect()
}

/// The shipped config names no proxy: a daemon started from it says where to set one, before
/// it attaches anything.
#[test]
fn the_shipped_config_asks_for_a_proxy() {
    let unpacked = unpack();
    let config = under(unpacked.path(), "/etc/transproxy.toml");
    let out = run(Command::new(transproxy_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env_clear());
    let said = text(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!("set proxy in {}", config.display())),
        "{said}"
    );
}

#[test]
fn install_puts_the_same_files_under_usr_local_and_keeps_the_config() {
    let root = tempfile::Builder::new()
        .prefix("transproxy-install-")
        .tempdir()
        .unwrap();
    let install = || {
        succeed(
            Command::new(xtask())
                .args(["install", "--root"])
                .arg(root.path())
                .arg("--binary")
                .arg(transproxy_bin()),
        )
    };
    let said = install();
    assert_eq!(files_with_modes(root.path()), expected(INSTALLED_FILES));
    for (path, _) in INSTALLED_FILES {
        assert!(
            said.contains(&format!("installed {}", under(root.path(), path).display())),
            "{path}: {said}"
        );
    }

    // The same files as the package, but for the binary's path in the unit.
    let unpacked = unpack();
    let packaged = |path: &str| fs::read(under(unpacked.path(), path)).unwrap();
    let installed = |path: &str| fs::read(under(root.path(), path)).unwrap();
    assert!(installed("/usr/local/bin/transproxy") == packaged("/usr/bin/transproxy"));
    assert!(installed("/etc/transproxy.toml") == packaged("/etc/transproxy.toml"));
    for page in MAN_PAGES {
        let man = format!("share/man/man1/{page}.1.gz");
        assert!(installed(&format!("/usr/local/{man}")) == packaged(&format!("/usr/{man}")));
    }
    let unit = String::from_utf8(installed("/etc/systemd/system/transproxy.service")).unwrap();
    let shipped = String::from_utf8(packaged("/lib/systemd/system/transproxy.service")).unwrap();
    assert_eq!(
        unit,
        shipped.replace(
            "ExecStart=/usr/bin/transproxy ",
            "ExecStart=/usr/local/bin/transproxy "
        )
    );
    let dir = unit_for_analysis(
        &unit,
        "/usr/local/bin/transproxy",
        &under(root.path(), "/usr/local/bin/transproxy"),
    );
    analyze(dir.path(), &under(root.path(), "/usr/local/share/man"));

    // Again: nothing changes.
    let said = install();
    for line in said.lines().filter(|l| !l.starts_with("xtask: next:")) {
        assert!(
            line.starts_with("xtask: unchanged ") || line.starts_with("xtask: kept "),
            "{said}"
        );
    }
    // An administrator's config is kept; a changed binary is replaced.
    let config = under(root.path(), "/etc/transproxy.toml");
    fs::write(&config, "proxy = \"http://127.0.0.1:3128\"\n").unwrap();
    fs::write(under(root.path(), "/usr/local/bin/transproxy"), "stale").unwrap();
    let said = install();
    assert!(
        said.contains(&format!("kept {}", config.display())),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "updated {}",
            under(root.path(), "/usr/local/bin/transproxy").display()
        )),
        "{said}"
    );
    assert_eq!(
        fs::read_to_string(&config).unwrap(),
        "proxy = \"http://127.0.0.1:3128\"\n"
    );
    assert!(installed("/usr/local/bin/transproxy") == packaged("/usr/bin/transproxy"));
    assert_eq!(files_with_modes(root.path()), expected(INSTALLED_FILES));
}

/// A socket standing in for systemd's notify socket: a datagram socket any user may send to
/// (as /run/systemd/notify), in a folder of its own.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("transproxy-notify-")
            .tempdir()
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o777)).unwrap();
        Self::with(dir, path, socket)
    }

    fn with(dir: tempfile::TempDir, path: PathBuf, socket: UnixDatagram) -> Self {
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self {
            _dir: dir,
            path,
            socket,
        }
    }

    /// The next notification, or a failure after 10 s.
    fn next(&self, daemon: &Daemon) -> String {
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(err) => panic!(
                "no notification ({err}); daemon stderr:\n{}",
                daemon.stderr()
            ),
        }
    }
}

/// CLOCK_MONOTONIC now, in microseconds.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(rc, 0);
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000
}

/// The notifications of one daemon's life: READY=1 (with the ready line as status) once it is
/// ready, RELOADING=1 and READY=1 around a SIGHUP, STOPPING=1 on SIGTERM, then a clean exit.
fn check_notifications(daemon: &mut Daemon, notify: &NotifySocket) {
    let status = daemon
        .ready_line()
        .strip_prefix("transproxy ready: ")
        .unwrap()
        .to_owned();
    assert_eq!(notify.next(daemon), format!("READY=1\nSTATUS={status}"));

    let before = monotonic_usec();
    daemon.signal(libc::SIGHUP);
    let reloading = notify.next(daemon);
    let usec: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|rest| rest.strip_suffix("\nSTATUS=reloading"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{reloading:?}"));
    assert!(
        before <= usec && usec <= monotonic_usec(),
        "MONOTONIC_USEC={usec} is not the time of the reload"
    );
    assert_eq!(notify.next(daemon), format!("READY=1\nSTATUS={status}"));
    let log = wait_for(LOG_WAIT, || {
        let log = daemon.stderr();
        log.contains("SIGHUP: reloaded").then_some(log)
    });
    assert!(log.is_some(), "{}", daemon.stderr());

    daemon.signal(libc::SIGTERM);
    assert_eq!(notify.next(daemon), "STOPPING=1\nSTATUS=SIGTERM: stopping");
    let exit = daemon.wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}: {}",
        daemon.stderr()
    );
}

/// A config file the daemon may read again after switching user.
fn rules_config() -> tempfile::NamedTempFile {
    let config = tempfile::NamedTempFile::new().unwrap();
    fs::write(
        config.path(),
        "include = [\"127.0.0.2/32\", \"127.0.0.3/32\"]\n",
    )
    .unwrap();
    fs::set_permissions(config.path(), fs::Permissions::from_mode(0o644)).unwrap();
    config
}

#[test]
fn the_daemon_tells_systemd_when_it_is_ready_reloading_and_stopping() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("notify");
    let config = rules_config();

    let notify = NotifySocket::new();
    let (mut cmd, listen) = Daemon::command(Command::new(transproxy_bin()), &squid.url(), &cgroup);
    cmd.arg("--config")
        .arg(config.path())
        .env("NOTIFY_SOCKET", &notify.path);
    let mut daemon = Daemon::spawn(cmd, listen);
    assert_eq!(
        probe(&cgroup, origin.addr()),
        "data:ping",
        "{}",
        daemon.stderr()
    );
    check_notifications(&mut daemon, &notify);

    // An abstract socket (`@name`), after switching user.
    let name = format!("transproxy-test-notify-{}", std::process::id());
    let socket =
        UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    let notify = NotifySocket::with(tempfile::tempdir().unwrap(), PathBuf::new(), socket);
    let (mut cmd, listen) = Daemon::command(Command::new(transproxy_bin()), &squid.url(), &cgroup);
    cmd.args(["--user", "nobody", "--config"])
        .arg(config.path())
        .env("NOTIFY_SOCKET", format!("@{name}"));
    let mut daemon = Daemon::spawn(cmd, listen);
    check_notifications(&mut daemon, &notify);

    // Without NOTIFY_SOCKET nothing is sent, and nothing is said about it.
    let (mut cmd, listen) = Daemon::command(Command::new(transproxy_bin()), &squid.url(), &cgroup);
    cmd.env_remove("NOTIFY_SOCKET");
    let daemon = Daemon::spawn(cmd, listen);
    let log = daemon.stderr();
    assert!(
        !log.contains("notified systemd") && !log.contains("NOTIFY_SOCKET"),
        "{log}"
    );
}

/// The shipped unit's capability bounding set, as setpriv takes it (`-all,+bpf,...`).
fn bounding_set(unit: &str) -> String {
    let caps: Vec<String> = service_value(unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(!caps.is_empty());
    format!("-all,{}", caps.join(","))
}

/// A wrapper that starts the daemon as the unit's sandbox would, as far as it can be made
/// without systemd: in a mount namespace of its own where every mount but /dev and /proc is
/// read-only (ProtectSystem=strict, ProtectKernelTunables=, ProtectControlGroups=), /proc/sys
/// too, except the unit's ReadWritePaths; with only the unit's capability bounding set, and
/// no_new_privs. The seccomp filter is checked by
/// `the_daemons_system_calls_are_in_the_units_filter`.
fn sandboxed(unit: &str) -> Command {
    let writable = service_values(unit, "ReadWritePaths").join(" ");
    let script = r#"
        set -e
        mount --bind /proc/sys /proc/sys
        for mp in $(awk '{ print $5 }' /proc/self/mountinfo | sort -u); do
            case "$mp" in /dev|/dev/*|/proc) continue ;; esac
            mount -o remount,bind,ro "$mp"
        done
        for rw in $WRITABLE; do
            mount --bind "$rw" "$rw"
            mount -o remount,bind,rw "$rw"
        done
        if touch /etc/.transproxy-sandbox-check 2>/dev/null; then
            rm -f /etc/.transproxy-sandbox-check
            echo "the sandbox left /etc writable" >&2
            exit 1
        fi
        exec setpriv --bounding-set="$CAPS" --inh-caps=-all --no-new-privs -- "$@"
    "#;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "slave",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .env("WRITABLE", writable)
    .env("CAPS", bounding_set(unit));
    cmd
}

#[test]
fn the_daemon_runs_in_the_units_sandbox() {
    let unpacked = unpack();
    let unit = fs::read_to_string(under(
        unpacked.path(),
        "/lib/systemd/system/transproxy.service",
    ))
    .unwrap();
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("sandbox");
    let _detach = Detach(&cgroup);
    let config = rules_config();
    let notify = NotifySocket::new();

    // With everything that needs more than the start: the kill switch's pins in bpffs, a
    // switch of user, a reload, notifications through a read-only file system.
    let mut wrapper = sandboxed(&unit);
    wrapper.arg(transproxy_bin());
    let (mut cmd, listen) = Daemon::command(wrapper, &squid.url(), &cgroup);
    cmd.args(["--fail-closed", "--user", "nobody", "--config"])
        .arg(config.path())
        .env("NOTIFY_SOCKET", &notify.path);
    let mut daemon = Daemon::spawn(cmd, listen);
    assert_eq!(
        fs::read_link(format!("/proc/{}/exe", daemon.pid())).unwrap(),
        transproxy_bin(),
        "the wrapper became the daemon"
    );
    assert_eq!(
        probe(&cgroup, origin.addr()),
        "data:ping",
        "{}",
        daemon.stderr()
    );
    assert_eq!(squid.wait_connects(origin.addr(), 1, LOG_WAIT).len(), 1);
    check_notifications(&mut daemon, &notify);
    // The pins were made in the host's bpffs, not in a copy private to the sandbox: the kill
    // switch outlives the daemon and `transproxy detach` outside finds it.
    let detached = transproxy_tests::detach(&cgroup);
    assert!(
        text(&detached.stdout).contains("removed the kill switch"),
        "{}{}",
        text(&detached.stdout),
        text(&detached.stderr)
    );
}

/// The names of the system calls `group` (a `@set` of systemd's) allows, its nested sets
/// expanded.
fn syscall_set(group: &str, allowed: &mut BTreeSet<String>) {
    let listing = succeed(Command::new("systemd-analyze").args(["syscall-filter", group]));
    for name in listing.lines().skip(1).map(str::trim) {
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        if name.starts_with('@') {
            if !allowed.contains(name) {
                allowed.insert(name.to_owned());
                syscall_set(name, allowed);
            }
        } else {
            allowed.insert(name.to_owned());
        }
    }
}

#[test]
fn the_daemons_system_calls_are_in_the_units_filter() {
    require_tool("strace", "strace");
    require_tool("systemd-analyze", "systemd");
    let unpacked = unpack();
    let unit = fs::read_to_string(under(
        unpacked.path(),
        "/lib/systemd/system/transproxy.service",
    ))
    .unwrap();
    let mut allowed = BTreeSet::new();
    for entry in service_value(&unit, "SystemCallFilter").split_whitespace() {
        assert!(!entry.starts_with('~'), "an allow list: {entry}");
        if entry.starts_with('@') {
            syscall_set(entry, &mut allowed);
        } else {
            allowed.insert(entry.to_owned());
        }
    }

    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    const LEN: usize = 8 << 20;
    let received = Arc::new(Mutex::new(Vec::new()));
    let bulk = Origin::bulk(OTHER_IP, 2, LEN, Arc::clone(&received));
    let cgroup = TestCgroup::new("syscalls");
    let _detach = Detach(&cgroup);
    let config = rules_config();
    let trace = tempfile::NamedTempFile::new().unwrap();
    // -D: strace runs as a detached grandchild, so the daemon is the test's child and gets
    // its signals; -f follows its threads.
    let mut strace = Command::new("strace");
    strace
        .args(["-D", "-f", "-q", "-o"])
        .arg(trace.path())
        .arg(transproxy_bin());
    let (mut cmd, listen) = Daemon::command(strace, &squid.url(), &cgroup);
    cmd.args(["--fail-closed", "--user", "nobody", "--config"])
        .arg(config.path());
    let mut daemon = Daemon::spawn(cmd, listen);
    assert_eq!(
        probe(&cgroup, origin.addr()),
        "data:ping",
        "{}",
        daemon.stderr()
    );
    // A bulk transfer: the relay's splice path.
    let out = run(cgroup.command(client_bin()).args([
        "bulk",
        &bulk.addr().to_string(),
        "1",
        &LEN.to_string(),
    ]));
    assert!(
        text(&out.stdout).contains(&format!("received {LEN} ")),
        "{}{}\ndaemon:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        daemon.stderr()
    );
    daemon.signal(libc::SIGHUP);
    assert!(
        wait_for(LOG_WAIT, || daemon
            .stderr()
            .contains("SIGHUP: reloaded")
            .then_some(()))
        .is_some(),
        "{}",
        daemon.stderr()
    );
    daemon.signal(libc::SIGTERM);
    let exit = daemon.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{}", daemon.stderr());
    let pid = daemon.pid();
    let traced = wait_for(Duration::from_secs(10), || {
        let trace = fs::read_to_string(trace.path()).ok()?;
        // `PID +++ exited with 0 +++`, the pid padded to a width strace chooses.
        let exited = format!("{pid} +++ exited with 0 +++");
        trace
            .lines()
            .any(|line| line.split_whitespace().eq(exited.split(' ')))
            .then_some(trace)
    })
    .unwrap_or_else(|| {
        let trace = fs::read_to_string(trace.path()).unwrap_or_default();
        let tail: Vec<&str> = trace.lines().rev().take(20).collect();
        panic!(
            "strace did not see pid {pid} exit; the trace ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    });

    let called: BTreeSet<&str> = traced
        .lines()
        .filter_map(|line| {
            let call = line.split_whitespace().nth(1)?;
            let name = call.split('(').next()?;
            (call.contains('(') && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .then_some(name)
        })
        .collect();
    assert!(
        called.contains("bpf") && called.contains("splice"),
        "{called:?}"
    );
    let outside: Vec<&&str> = called
        .iter()
        .filter(|name| !allowed.contains(**name))
        .collect();
    assert!(
        outside.is_empty(),
        "the daemon calls {outside:?}, which the unit's SystemCallFilter does not allow"
    );
}
