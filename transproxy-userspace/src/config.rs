//! Settings, from the config file and the flags.
//!
//! `--config FILE` (TOML) carries the same settings as the flags, under the same names; a flag
//! given on the command line wins over the file. Unknown keys are errors that name the key and
//! the line. On SIGHUP the file is read again and the new rules replace the old ones in the
//! kernel maps (see [`crate::run`]).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use serde::Deserialize;

use crate::{
    cli::{DnsMode, OnProxyError, RunOnlyArgs, SettingArgs},
    policy::{DirectNames, NoProxy, Policy, Rule},
    upstream::{ProxyList, ProxyUrl, read_secret_file, read_secret_file_bytes},
};

/// The config file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConfigFile {
    proxy: Option<OneOrMany>,
    #[serde(default, deserialize_with = "duration")]
    proxy_skip: Option<Duration>,
    proxy_ca: Option<PathBuf>,
    pac: Option<String>,
    pac_fallback: Option<crate::pac::PacFallback>,
    #[serde(default, deserialize_with = "duration")]
    pac_refresh: Option<Duration>,
    cgroup: Option<PathBuf>,
    listen: Option<SocketAddr>,
    listen6: Option<String>,
    include: Option<Vec<Rule>>,
    exclude: Option<Vec<Rule>>,
    exclude_uid: Option<Vec<Id>>,
    exclude_gid: Option<Vec<Id>>,
    proxy_auth_env: Option<String>,
    proxy_auth_file: Option<PathBuf>,
    proxy_auth_scheme: Option<crate::upstream::Scheme>,
    proxy_auth_ccache: Option<String>,
    proxy_auth_keytab: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    reply_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    idle_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    refused_ttl: Option<Duration>,
    on_proxy_error: Option<OnProxyError>,
    #[serde(default)]
    wait_for_reply: bool,
    max_tunnels: Option<usize>,
    max_pending: Option<u32>,
    max_namespaces: Option<usize>,
    #[serde(default)]
    fail_closed: bool,
    #[serde(default)]
    refuse_udp: bool,
    access_log: Option<String>,
    metrics: Option<SocketAddr>,
    user: Option<Id>,
    #[serde(default, deserialize_with = "duration")]
    half_close_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    shutdown_grace: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    sniff_timeout: Option<Duration>,
    dns: Option<DnsMode>,
    dns_pool: Option<Vec<ipnet::IpNet>>,
    dns_direct: Option<Vec<String>>,
    /// Per-container settings, most specific match first (see [`ContainerSettings`]).
    #[serde(default)]
    container: Vec<ContainerFile>,
    /// `[gateway]`: `transproxy gateway`'s own settings.
    gateway: Option<GatewayFile>,
}

/// `[gateway]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct GatewayFile {
    /// The LAN interfaces (`--interface`).
    interface: OneOrMany,
}

/// `[[container]]`: settings for the processes of some child cgroups (containers, pods).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ContainerFile {
    /// A path pattern below the daemon's cgroup (`*` within one folder name, `?`, `[...]`).
    cgroup: String,
    proxy: OneOrMany,
    proxy_auth_file: Option<PathBuf>,
}

/// The settings of `[[container]]` in force: processes of a cgroup that `cgroup` matches (or
/// below one) tunnel through `proxies` instead of the daemon's. The deepest matching cgroup
/// wins, and among patterns matching the same one, the first in the file.
#[derive(Debug, Clone)]
pub struct ContainerSettings {
    pub cgroup: glob::Pattern,
    pub proxies: ProxyList,
}

impl ContainerFile {
    fn resolve(self, index: usize, mode: Mode) -> anyhow::Result<ContainerSettings> {
        let named = format!("[[container]] {} ({})", index + 1, self.cgroup);
        let trimmed = self.cgroup.trim_matches('/');
        if trimmed.is_empty() || trimmed.split('/').any(|part| part == "..") {
            bail!("{named}: cgroup must name folders below the daemon's cgroup, without `..`");
        }
        let cgroup = glob::Pattern::new(trimmed)
            .map_err(|err| anyhow!("{named}: cgroup is not a pattern: {err}"))?;
        let proxies = ProxyList::parse(&self.proxy.into_vec(), &format!("{named} proxy"))?;
        let proxies = match (&self.proxy_auth_file, mode) {
            (None, _) | (_, Mode::Reload) => proxies,
            (Some(path), _) if proxies.has_credentials() => {
                bail!(
                    "{named}: give proxy credentials in one place: the proxy URLs or proxy-auth-file ({})",
                    path.display()
                )
            }
            (Some(path), _) => {
                proxies.with_credentials(&read_secret_file(path)?, &path.display().to_string())?
            }
        };
        Ok(ContainerSettings { cgroup, proxies })
    }
}

/// Network namespaces a daemon serves at most by default. Where unprivileged user namespaces
/// are allowed, any user of the cgroup tree can make network namespaces by the thousand
/// (`unshare -Urn`); each costs the daemon two descriptors, which its tunnels need, and the
/// programs' `LISTENERS` map holds 4,096 sockets.
const DEFAULT_MAX_NAMESPACES: usize = 1_024;

/// The most `max-namespaces` may be: two listeners each, and the daemon's own (with DNS), in
/// a map of 4,096.
const MOST_NAMESPACES: usize = 2_040;

/// How long a tunnel waits for the client's first bytes to learn the host name it asked for.
/// Clients that speak first (HTTP, TLS) have sent them by the time the daemon looks, almost
/// always: a client's connect completes on this host, and it writes right after. Clients that
/// wait for the server (SSH, SMTP, FTP, MySQL) pay this once per connection before their
/// tunnel opens by address: 50 ms is unnoticeable next to a login, and covers a TLS library
/// generating its key shares before writing (well under a millisecond here).
const DEFAULT_SNIFF_TIMEOUT: Duration = Duration::from_millis(50);

/// A user or group, by number or by name.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a user or group: a name, or a number from 0 to 4294967295"
)]
enum Id {
    Number(u32),
    Name(String),
}

fn duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map(Some).map_err(|err| {
        serde::de::Error::custom(format!(
            "'{text}' is not a duration ({err}); write e.g. \"10s\""
        ))
    })
}

impl ConfigFile {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses config text; errors name `origin` and the line.
    fn parse(text: &str, origin: &Path) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|err| {
            let line = err
                .span()
                .map(|span| {
                    format!(
                        " line {}",
                        text.as_bytes()
                            .iter()
                            .take(span.start)
                            .filter(|&&b| b == b'\n')
                            .count()
                            + 1
                    )
                })
                .unwrap_or_default();
            let message = err.message().trim().replace('\n', "; ");
            let hint = nearest_key(&message)
                .map(|key| format!("; did you mean `{key}`?"))
                .unwrap_or_default();
            anyhow!("config {}{line}: {message}{hint}", origin.display())
        })
    }
}

/// For an "unknown field `x`, expected one of `a`, `b`" message, the expected key closest to
/// `x` (a flag's `_` for `-`, a typo of a letter or two).
fn nearest_key(message: &str) -> Option<String> {
    let unknown = message.strip_prefix("unknown field `")?.split('`').next()?;
    let expected: Vec<&str> = message
        .split_once("expected")?
        .1
        .split('`')
        .skip(1)
        .step_by(2)
        .collect();
    let wanted = unknown.replace('_', "-").to_ascii_lowercase();
    expected
        .into_iter()
        .map(|key| (edit_distance(&wanted, key), key))
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, key)| key.to_owned())
}

/// Levenshtein distance, for short keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substituted = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// Checks config text the way `--config` would read it (for the fuzz target): never panics.
pub fn check_text(text: &str) -> anyhow::Result<()> {
    ConfigFile::parse(text, Path::new("<fuzz>")).map(drop)
}

/// Which command the settings are for: their defaults differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A long-running daemon on well-known ports.
    Run,
    /// One command: listeners on free ports, so several can run at once.
    Exec,
    /// SIGHUP's re-read for a running daemon: as `Run`, but the proxy's credentials are not read
    /// again. Only the rules are reloaded, and the daemon may no longer be allowed to read a
    /// root-only credentials file once it runs as `--user`.
    Reload,
}

/// A value that may be one string or a list of them (`proxy = "..."` or `proxy = [...]`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

/// Everything `run` and `exec` need, resolved and checked.
#[derive(Debug)]
pub struct Settings {
    /// The upstreams, tried in order.
    pub proxies: ProxyList,
    /// How long a proxy that could not be reached is skipped.
    pub proxy_skip: Duration,
    /// What `https://` proxies' certificates are checked against (`--proxy-ca`, else the
    /// system's store); `None` without an `https://` proxy.
    pub proxy_trust: Option<crate::upstream::ProxyTrust>,
    /// `--pac`, and how often it is fetched again.
    pub pac: Option<(crate::pac::PacSource, Duration)>,
    pub pac_fallback: crate::pac::PacFallback,
    /// `--proxy-auth-env`: the variable that held the credentials, kept from `exec`'s command.
    pub proxy_auth_env: Option<String>,
    /// `--proxy-auth-scheme`.
    pub proxy_auth_scheme: Option<crate::upstream::Scheme>,
    /// Kerberos: the credentials cache (`--proxy-auth-ccache`, else `KRB5CCNAME`).
    pub proxy_auth_ccache: Option<String>,
    /// Kerberos: a keytab to obtain tickets from.
    pub proxy_auth_keytab: Option<PathBuf>,
    /// From the file; `run --cgroup` overrides it, `exec` ignores it.
    pub cgroup: Option<PathBuf>,
    pub listen: SocketAddr,
    /// `None`: IPv6 destinations go direct.
    pub listen6: Option<SocketAddr>,
    pub includes: Vec<Rule>,
    /// User excludes, then those from NO_PROXY.
    pub excludes: Vec<Rule>,
    pub exclude_uids: Vec<u32>,
    pub exclude_gids: Vec<u32>,
    /// NO_PROXY entries that are neither an address nor a host name, reported once.
    pub no_proxy_ignored: Vec<String>,
    /// NO_PROXY host and domain names: their connections go direct.
    pub direct_names: DirectNames,
    /// How long to wait for a client's first bytes to read its host name; zero: never.
    pub sniff_timeout: Duration,
    /// `--dns`.
    pub dns: DnsMode,
    /// `--dns-pool`: where fake addresses come from, per family (`None`: that family gets no
    /// fake addresses).
    pub dns_pool_v4: Option<ipnet::Ipv4Net>,
    pub dns_pool_v6: Option<ipnet::Ipv6Net>,
    /// `--dns-direct`: names that get real answers with `--dns fake`.
    pub dns_direct: DirectNames,
    /// Things worth a warning at start (a rule with host bits set).
    pub notes: Vec<String>,
    pub connect_timeout: Duration,
    pub reply_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub refused_ttl: Duration,
    pub on_proxy_error: OnProxyError,
    /// Hold the client's bytes until the proxy has answered CONNECT.
    pub wait_for_reply: bool,
    /// `None`: derived from the file descriptor limit once it is raised.
    pub max_tunnels: Option<usize>,
    /// Size of the kernel's table of connections waiting for accept().
    pub max_pending: u32,
    /// Network namespaces served besides the daemon's own, at most (0: none).
    pub max_namespaces: usize,
    pub fail_closed: bool,
    /// UDP to intercepted destinations is refused (DNS excepted).
    pub refuse_udp: bool,
    /// `--access-log`: a file, or `-` for standard output.
    pub access_log: Option<String>,
    /// `--metrics`: where Prometheus scrapes.
    pub metrics: Option<SocketAddr>,
    /// The user to switch to after attaching.
    pub user: Option<String>,
    pub half_close_timeout: Duration,
    pub shutdown_grace: Duration,
    /// `[[container]]` sections, in file order.
    pub containers: Vec<ContainerSettings>,
    /// `gateway.interface`: the LAN interfaces of `transproxy gateway` (`--interface` wins).
    pub gateway_interfaces: Vec<String>,
}

impl Settings {
    /// Merges the config file (if any), the flags and the environment. `run_only` is given by
    /// `run` (and its reloads).
    pub fn resolve(
        args: &SettingArgs,
        run_only: Option<&RunOnlyArgs>,
        mode: Mode,
    ) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        if mode == Mode::Exec {
            let run_keys: Vec<&str> = [
                ("cgroup", file.cgroup.is_some()),
                ("fail-closed", file.fail_closed),
                ("user", file.user.is_some()),
            ]
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(key, _)| key)
            .collect();
            if !run_keys.is_empty() {
                bail!(
                    "the config file sets {}, which only `transproxy run` uses: exec makes its own cgroup, is always fail-open and keeps root; use a config without them",
                    run_keys.join(", ")
                );
            }
        }
        let run_only = run_only.cloned().unwrap_or_default();
        // Names a setting as the user gave it: the flag, or the config file's key.
        let named = |flag_given: bool, key: &str| {
            if flag_given {
                format!("--{key}")
            } else {
                format!("`{key}` in the config file")
            }
        };
        let pac = args
            .pac
            .clone()
            .or(file.pac.clone())
            .map(|text| crate::pac::PacSource::parse(&text))
            .transpose()?;
        let pac_refresh = args
            .pac_refresh
            .or(file.pac_refresh)
            .unwrap_or(Duration::from_secs(600));
        if pac_refresh < Duration::from_secs(1) {
            bail!("--pac-refresh must be at least 1s");
        }
        let pac_fallback = args.pac_fallback.or(file.pac_fallback).unwrap_or_default();
        let proxy = match (args.proxy.is_empty(), file.proxy) {
            (false, _) => ProxyList::parse(&args.proxy, "--proxy")?,
            (true, Some(list)) => ProxyList::parse(&list.into_vec(), "the config file's proxy")?,
            // With a PAC file, the script names the proxies.
            (true, None) if pac.is_some() => ProxyList::none(),
            (true, None) => ProxyList::one(match &args.config {
                // A service reads its settings from the file: say where the proxy goes.
                Some(path) => ProxyUrl::from_env().map_err(|err| {
                    anyhow!(
                        "{err}, or set proxy in {} (see the comments there)",
                        path.display()
                    )
                })?,
                None => ProxyUrl::from_env()?,
            }),
        };
        let proxy_ca = args.proxy_ca.clone().or(file.proxy_ca.clone());
        let https_listed = proxy
            .proxies()
            .any(|p| p.kind() == crate::upstream::ProxyKind::Https);
        let proxy_trust = if https_listed || proxy_ca.is_some() && pac.is_some() {
            Some(crate::upstream::ProxyTrust::load(proxy_ca.as_deref())?)
        } else if pac.is_some() {
            // The script may name an https:// proxy: the system's store, if it has one (a
            // proxy it cannot check then fails its TLS handshake).
            crate::upstream::ProxyTrust::load(None).ok()
        } else {
            if proxy_ca.is_some() {
                bail!("--proxy-ca is given, but no proxy is https://");
            }
            None
        };
        let auth_env = args
            .proxy_auth_env
            .as_ref()
            .or(file.proxy_auth_env.as_ref());
        let auth_file = args
            .proxy_auth_file
            .as_ref()
            .or(file.proxy_auth_file.as_ref());
        let places = [
            proxy.has_credentials(),
            auth_env.is_some(),
            auth_file.is_some(),
        ];
        if places.iter().filter(|given| **given).count() > 1 {
            bail!(
                "give proxy credentials in one place: the proxy URLs, --proxy-auth-env or --proxy-auth-file"
            );
        }
        let proxy = match (mode == Mode::Reload, auth_env, auth_file) {
            (true, _, _) | (false, None, None) => proxy,
            (false, Some(var), _) => {
                let value = std::env::var(var)
                    .map_err(|_| anyhow!("--proxy-auth-env: {var} is not set"))?;
                proxy.with_credentials(&value, var)?
            }
            (false, None, Some(path)) => {
                proxy.with_credentials(&read_secret_file(path)?, &path.display().to_string())?
            }
        };
        // Free ports by default: the programs learn the listeners from the sockets themselves,
        // so no port needs to be known in advance, and none can be taken first by someone else.
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let listen = listen_v4(listen, &named(args.listen.is_some(), "listen"))?;
        let listen6 = listen_v6(
            args.listen6
                .as_deref()
                .or(file.listen6.as_deref())
                .unwrap_or("[::1]:0"),
            &named(args.listen6.is_some(), "listen6"),
        )?;
        let pick = |flags: &[Rule], file: Option<Vec<Rule>>| {
            if flags.is_empty() {
                file.unwrap_or_default()
            } else {
                flags.to_vec()
            }
        };
        let includes = pick(&args.includes, file.include);
        let mut excludes = pick(&args.excludes, file.exclude);
        let no_proxy = NoProxy::from_env();
        excludes.extend(no_proxy.excludes);
        let ids = |flags: &[String], file: Option<Vec<Id>>| -> Vec<Id> {
            if flags.is_empty() {
                file.unwrap_or_default()
            } else {
                flags
                    .iter()
                    .map(|f| f.parse().map_or_else(|_| Id::Name(f.clone()), Id::Number))
                    .collect()
            }
        };
        let exclude_uids = ids(&args.exclude_uids, file.exclude_uid)
            .iter()
            .map(uid)
            .collect::<anyhow::Result<_>>()?;
        let exclude_gids = ids(&args.exclude_gids, file.exclude_gid)
            .iter()
            .map(gid)
            .collect::<anyhow::Result<_>>()?;
        let keytab = args
            .proxy_auth_keytab
            .clone()
            .or(file.proxy_auth_keytab.clone());
        if let Some(keytab) = &keytab
            && mode != Mode::Reload
        {
            // The same rule as for the password file: root's only.
            read_secret_file_bytes(keytab).context("proxy-auth-keytab")?;
        }
        let dns = args.dns.or(file.dns).unwrap_or_default();
        let dns_pool_given = !args.dns_pools.is_empty();
        let dns_pools = if dns_pool_given {
            Some(args.dns_pools.clone())
        } else {
            file.dns_pool
        };
        let dns_direct_given = !args.dns_direct.is_empty();
        let dns_direct = if dns_direct_given {
            Some(args.dns_direct.clone())
        } else {
            file.dns_direct
        };
        if dns != DnsMode::Fake {
            for (set, given, key) in [
                (dns_pools.is_some(), dns_pool_given, "dns-pool"),
                (dns_direct.is_some(), dns_direct_given, "dns-direct"),
            ] {
                if set {
                    bail!(
                        "{} only applies with --dns fake (the DNS mode is {})",
                        named(given, key),
                        dns_mode_name(dns)
                    );
                }
            }
        }
        let (dns_pool_v4, dns_pool_v6) = fake_pools(dns_pools, &named(dns_pool_given, "dns-pool"))?;
        let dns_direct = DirectNames::from_patterns(
            &dns_direct.unwrap_or_default(),
            &named(dns_direct_given, "dns-direct"),
        )?;
        let containers = file
            .container
            .into_iter()
            .enumerate()
            .map(|(index, section)| section.resolve(index, mode))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let container_https = containers.iter().any(|section| {
            section
                .proxies
                .proxies()
                .any(|p| p.kind() == crate::upstream::ProxyKind::Https)
        });
        let proxy_trust = match proxy_trust {
            None if container_https => {
                Some(crate::upstream::ProxyTrust::load(proxy_ca.as_deref())?)
            }
            trust => trust,
        };
        let gateway_interfaces = file
            .gateway
            .map(|gateway| gateway.interface.into_vec())
            .unwrap_or_default();
        let settings = Self {
            gateway_interfaces,
            containers,
            proxies: proxy,
            proxy_trust,
            pac: pac.map(|source| (source, pac_refresh)),
            pac_fallback,
            proxy_skip: args
                .proxy_skip
                .or(file.proxy_skip)
                .unwrap_or(Duration::from_secs(30)),
            proxy_auth_env: auth_env.cloned(),
            proxy_auth_scheme: args.proxy_auth_scheme.or(file.proxy_auth_scheme),
            proxy_auth_ccache: args
                .proxy_auth_ccache
                .clone()
                .or(file.proxy_auth_ccache)
                .or_else(|| std::env::var("KRB5CCNAME").ok().filter(|v| !v.is_empty()))
                .or_else(|| (mode == Mode::Exec).then(invoking_users_ccache).flatten()),
            proxy_auth_keytab: keytab,
            cgroup: file.cgroup,
            listen,
            listen6,
            includes,
            excludes,
            exclude_uids,
            exclude_gids,
            no_proxy_ignored: no_proxy.ignored,
            direct_names: no_proxy.names,
            sniff_timeout: args
                .sniff_timeout
                .or(file.sniff_timeout)
                .unwrap_or(DEFAULT_SNIFF_TIMEOUT),
            dns,
            dns_pool_v4,
            dns_pool_v6,
            dns_direct,
            notes: Vec::new(),
            connect_timeout: args
                .connect_timeout
                .or(file.connect_timeout)
                .unwrap_or(Duration::from_secs(5)),
            reply_timeout: args
                .reply_timeout
                .or(file.reply_timeout)
                .unwrap_or(Duration::from_secs(10)),
            idle_timeout: args
                .idle_timeout
                .or(file.idle_timeout)
                .filter(|d| !d.is_zero()),
            refused_ttl: args
                .refused_ttl
                .or(file.refused_ttl)
                .unwrap_or(Duration::from_secs(10)),
            on_proxy_error: args
                .on_proxy_error
                .or(file.on_proxy_error)
                .unwrap_or_default(),
            wait_for_reply: args.wait_for_reply || file.wait_for_reply,
            max_tunnels: args.max_tunnels.or(file.max_tunnels),
            max_pending: args.max_pending.or(file.max_pending).unwrap_or(65_536),
            max_namespaces: args
                .max_namespaces
                .or(file.max_namespaces)
                .unwrap_or(DEFAULT_MAX_NAMESPACES),
            fail_closed: run_only.fail_closed || file.fail_closed,
            refuse_udp: args.refuse_udp || file.refuse_udp,
            access_log: args.access_log.clone().or(file.access_log),
            metrics: args.metrics.or(file.metrics),
            user: run_only.user.clone().or(file.user.map(|id| match id {
                Id::Number(uid) => uid.to_string(),
                Id::Name(name) => name,
            })),
            half_close_timeout: args
                .half_close_timeout
                .or(file.half_close_timeout)
                .unwrap_or(Duration::from_secs(60)),
            shutdown_grace: args
                .shutdown_grace
                .or(file.shutdown_grace)
                .unwrap_or(Duration::from_secs(5)),
        };
        for (given, key, limit) in [
            (
                args.connect_timeout.is_some(),
                "connect-timeout",
                settings.connect_timeout,
            ),
            (
                args.reply_timeout.is_some(),
                "reply-timeout",
                settings.reply_timeout,
            ),
            (
                args.half_close_timeout.is_some(),
                "half-close-timeout",
                settings.half_close_timeout,
            ),
        ] {
            if limit.is_zero() {
                bail!("{} must be longer than 0s", named(given, key));
            }
        }
        // The upper bound is the descriptor limit's, checked when the daemon starts.
        if settings.max_tunnels == Some(0) {
            bail!(
                "{} must be at least 1",
                named(args.max_tunnels.is_some(), "max-tunnels")
            );
        }
        if settings.max_pending == 0 {
            bail!(
                "{} must be at least 1",
                named(args.max_pending.is_some(), "max-pending")
            );
        }
        if settings.max_namespaces > MOST_NAMESPACES {
            bail!(
                "{} is at most {MOST_NAMESPACES}: the programs' map holds 4,096 listeners, two per namespace",
                named(args.max_namespaces.is_some(), "max-namespaces")
            );
        }
        // Without an IPv6 listener IPv6 goes direct (or, with the kill switch, is refused): an
        // IPv6 include would claim interception that does not happen.
        if settings.listen6.is_none()
            && !settings.fail_closed
            && let Some(v6) = settings.includes.iter().find(|r| r.net.addr().is_ipv6())
        {
            bail!(
                "{} off leaves IPv6 alone, but the include {v6} names IPv6 destinations: give an IPv6 listener, or drop the include",
                named(args.listen6.is_some(), "listen6")
            );
        }
        // Refuse a rule set the kernel side cannot hold before anything is attached.
        settings.policy().validate()?;
        let mut settings = settings;
        settings.notes = settings
            .includes
            .iter()
            .chain(&settings.excludes)
            .filter_map(|rule| {
                let written = rule.written?;
                Some(format!(
                    "rule {written} has host bits set: it means {}; for the one address, write {}",
                    rule.net,
                    written.addr()
                ))
            })
            .collect();
        Ok(settings)
    }

    /// Whether Kerberos credentials are configured (a cache or a keytab): Negotiate is then
    /// answered with them, before any password.
    pub fn kerberos(&self) -> bool {
        self.proxy_auth_ccache.is_some() || self.proxy_auth_keytab.is_some()
    }

    /// The interception policy as configured; the daemon adds the sockets that must never be
    /// intercepted (see [`Policy::with_never`]).
    pub fn policy(&self) -> Policy {
        Policy::new(self.includes.clone(), self.excludes.clone())
            .with_excluded_ids(self.exclude_uids.clone(), self.exclude_gids.clone())
    }
}

/// `exec`'s default Kerberos cache: that of the user who invoked sudo (sudo does not pass
/// `KRB5CCNAME` on), where MIT Kerberos keeps it by default, if it is there.
fn invoking_users_ccache() -> Option<String> {
    let uid: u32 = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    let path = format!("/tmp/krb5cc_{uid}");
    Path::new(&path).exists().then(|| format!("FILE:{path}"))
}

/// The default `--dns-pool`s: the benchmarking network (RFC 2544), which no host on the
/// internet has, and a part of the ULA range no one assigns (fc00::/8, whose addresses are
/// "to be defined"): the ranges other fake-IP resolvers use, so rules written for them fit.
const DEFAULT_FAKE_POOL_V4: &str = "198.18.0.0/15";
const DEFAULT_FAKE_POOL_V6: &str = "fc00::/18";

/// The fake-address pools: at most one per family, each with room for at least 4 names, host
/// bits cleared. The defaults for a family not given.
fn fake_pools(
    pools: Option<Vec<ipnet::IpNet>>,
    named: &str,
) -> anyhow::Result<(Option<ipnet::Ipv4Net>, Option<ipnet::Ipv6Net>)> {
    let Some(pools) = pools else {
        let v4 = DEFAULT_FAKE_POOL_V4.parse().ok();
        let v6 = DEFAULT_FAKE_POOL_V6.parse().ok();
        return Ok((v4, v6));
    };
    let (mut v4, mut v6) = (None, None);
    for pool in pools {
        match pool.trunc() {
            ipnet::IpNet::V4(net) if net.prefix_len() > 29 => {
                bail!("{named} {pool}: too small, give a /29 or larger")
            }
            ipnet::IpNet::V6(net) if net.prefix_len() > 125 => {
                bail!("{named} {pool}: too small, give a /125 or larger")
            }
            ipnet::IpNet::V4(net) if v4.replace(net).is_some() => {
                bail!("{named}: give one IPv4 pool, not several")
            }
            ipnet::IpNet::V6(net) if v6.replace(net).is_some() => {
                bail!("{named}: give one IPv6 pool, not several")
            }
            _ => {}
        }
        // Fake addresses are always intercepted: a pool over loopback or the like would take
        // this host's own traffic.
        let reserved = [
            "0.0.0.0/8",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "224.0.0.0/3",
            "::/127",
            "::ffff:0:0/96",
            "fe80::/10",
            "ff00::/8",
        ];
        let overlaps = |a: &ipnet::IpNet, b: &ipnet::IpNet| a.contains(b) || b.contains(a);
        if let Some(taken) = reserved
            .iter()
            .filter_map(|net| net.parse::<ipnet::IpNet>().ok())
            .find(|net| overlaps(net, &pool.trunc()))
        {
            bail!("{named} {pool}: overlaps {taken}, which this host uses itself");
        }
    }
    Ok((v4, v6))
}

/// A DNS mode as the flag spells it.
fn dns_mode_name(mode: DnsMode) -> &'static str {
    match mode {
        DnsMode::Off => "off",
        DnsMode::Forward => "forward",
        DnsMode::Fake => "fake",
    }
}

/// The IPv4 listener: connect4 rewrites destinations to it, so it must be a specific address.
/// `named` says where it was set.
fn listen_v4(addr: SocketAddr, named: &str) -> anyhow::Result<SocketAddr> {
    match addr.ip() {
        IpAddr::V4(ip) if !ip.is_unspecified() => Ok(addr),
        _ => bail!(
            "{named} {addr}: must be a specific IPv4 address and port, such as 127.0.0.1:15001"
        ),
    }
}

/// The IPv6 listener, or `None` for `off`.
fn listen_v6(text: &str, named: &str) -> anyhow::Result<Option<SocketAddr>> {
    if matches!(text, "off" | "none") {
        return Ok(None);
    }
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| anyhow!("{named} {text}: expected [IPV6]:PORT or off"))?;
    match addr.ip() {
        IpAddr::V6(ip) if ip != Ipv6Addr::UNSPECIFIED && ip.to_ipv4_mapped().is_none() => {
            Ok(Some(addr))
        }
        _ => bail!("{named} {text}: must be a specific IPv6 address, such as [::1]:15001"),
    }
}

fn uid(id: &Id) -> anyhow::Result<u32> {
    match id {
        Id::Number(n) => Ok(*n),
        Id::Name(name) => nix::unistd::User::from_name(name)
            .with_context(|| format!("cannot look up user '{name}'"))?
            .map(|user| user.uid.as_raw())
            .ok_or_else(|| anyhow!("--exclude-uid: no user named '{name}'")),
    }
}

fn gid(id: &Id) -> anyhow::Result<u32> {
    match id {
        Id::Number(n) => Ok(*n),
        Id::Name(name) => nix::unistd::Group::from_name(name)
            .with_context(|| format!("cannot look up group '{name}'"))?
            .map(|group| group.gid.as_raw())
            .ok_or_else(|| anyhow!("--exclude-gid: no group named '{name}'")),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// A config file holding `text`, removed on drop.
    fn config(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(text.as_bytes()).expect("write config");
        file
    }

    fn args_with(path: &Path) -> SettingArgs {
        SettingArgs {
            config: Some(path.to_owned()),
            ..SettingArgs::default()
        }
    }

    #[test]
    fn credentials_come_from_one_place() {
        let args = SettingArgs {
            proxy: vec!["http://alice:secret@127.0.0.1:3128".to_owned()],
            proxy_auth_env: Some("TP_UNSET_CREDENTIALS".to_owned()),
            ..SettingArgs::default()
        };
        let err = Settings::resolve(&args, None, Mode::Run)
            .unwrap_err()
            .to_string();
        assert!(err.contains("in one place"), "{err}");
    }

    #[test]
    fn file_settings_apply_and_flags_win() {
        let file = config(
            "proxy = \"http://127.0.0.1:3128\"\n\
             listen = \"127.0.0.1:16001\"\n\
             listen6 = \"off\"\n\
             include = [\"10.0.0.0/8\", \"192.0.2.0/24:443\"]\n\
             exclude = [\"10.1.0.0/16\"]\n\
             exclude-uid = [0, \"root\"]\n\
             connect-timeout = \"3s\"\n",
        );
        let settings = Settings::resolve(&args_with(file.path()), None, Mode::Run).unwrap();
        assert_eq!(settings.listen, "127.0.0.1:16001".parse().unwrap());
        assert_eq!(settings.listen6, None);
        assert_eq!(settings.includes.len(), 2);
        assert_eq!(settings.exclude_uids, [0, 0]);
        assert_eq!(settings.connect_timeout, Duration::from_secs(3));
        assert_eq!(settings.half_close_timeout, Duration::from_secs(60));

        let mut args = args_with(file.path());
        args.includes = vec!["172.16.0.0/12".parse().unwrap()];
        args.connect_timeout = Some(Duration::from_secs(7));
        args.proxy = vec!["http://127.0.0.1:8080".into()];
        let settings = Settings::resolve(&args, None, Mode::Run).unwrap();
        assert_eq!(
            settings.includes,
            vec!["172.16.0.0/12".parse::<Rule>().unwrap()]
        );
        assert_eq!(settings.connect_timeout, Duration::from_secs(7));
        assert_eq!(settings.proxies.to_string(), "http://127.0.0.1:8080");

        // A list in the file, tried in order; flags replace it whole.
        let file = config(
            "proxy = [\"socks5h://127.0.0.1:1080\", \"http://127.0.0.1:3128\", \"direct\"]\n\
             proxy-skip = \"1m\"\n",
        );
        let settings = Settings::resolve(&args_with(file.path()), None, Mode::Run).unwrap();
        assert_eq!(
            settings.proxies.to_string(),
            "socks5h://127.0.0.1:1080, http://127.0.0.1:3128, direct"
        );
        assert_eq!(settings.proxy_skip, Duration::from_secs(60));
    }

    #[test]
    fn errors_name_the_key_and_line() {
        for (text, expected) in [
            (
                "proxy = \"http://127.0.0.1:3128\"\n\nprox = \"x\"\n",
                "line 3: unknown field `prox`",
            ),
            (
                "proxy = \"http://127.0.0.1:3128\"\nfail_closed = true\n",
                "did you mean `fail-closed`?",
            ),
            (
                "proxy = \"http://127.0.0.1:3128\"\nconnect-timeout = \"0s\"\n",
                "`connect-timeout` in the config file must be longer than 0s",
            ),
            (
                "proxy = \"http://127.0.0.1:3128\"\ninclude = [\"10.0.0.0/33\"]\n",
                "line 2",
            ),
            (
                "proxy = \"http://127.0.0.1:3128\"\nconnect-timeout = \"soon\"\n",
                "not a duration",
            ),
            (
                "proxy = \"http://127.0.0.1:3128\"\nexclude-uid = [\"no-such-user-here\"]\n",
                "no user named",
            ),
            (
                "proxy = \"http://u:secret@127.0.0.1:99999\"\n",
                "config file's proxy",
            ),
            ("proxy = [\n", "line 1"),
        ] {
            let file = config(text);
            let err = format!(
                "{:#}",
                Settings::resolve(&args_with(file.path()), None, Mode::Run).unwrap_err()
            );
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn listeners_must_be_specific() {
        assert!(listen_v4("0.0.0.0:15001".parse().unwrap(), "--listen").is_err());
        assert!(listen_v4("[::1]:15001".parse().unwrap(), "--listen").is_err());
        assert!(listen_v6("[::]:15001", "--listen6").is_err());
        assert!(listen_v6("127.0.0.1:15001", "--listen6").is_err());
        assert_eq!(listen_v6("off", "--listen6").unwrap(), None);
        assert_eq!(
            listen_v6("[::1]:0", "--listen6").unwrap(),
            Some("[::1]:0".parse().unwrap())
        );
    }
}
