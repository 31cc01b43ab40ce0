//! The results as a markdown table (stdout and target/bench/results.md) and as JSON
//! (target/bench/results.json).

use std::{fmt::Write as _, fs, path::PathBuf, time::Duration};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::{
    auth::AuthScheme,
    contender::Contender,
    figure::Figure,
    machine::Machine,
    plan::Plan,
    results::Results,
    stats::{Summary, ratio},
    upstream::Upstream,
};

/// The ratio columns: (numerator, denominator, JSON key).
const RATIOS: [(Contender, Contender, &str); 3] = [
    (
        Contender::Transproxy,
        Contender::Redsocks,
        "transproxy_vs_redsocks",
    ),
    (
        Contender::Transproxy,
        Contender::Direct,
        "transproxy_vs_direct",
    ),
    (Contender::Redsocks, Contender::Direct, "redsocks_vs_direct"),
];

/// Everything the report shows.
pub(crate) struct Report<'a> {
    /// Durations and counts, for the header.
    pub plan: &'a Plan,
    /// The samples and notes.
    pub results: &'a Results,
    /// Where and with what.
    pub machine: &'a Machine,
    /// How long the measurements took.
    pub elapsed: Duration,
    /// When, in UTC.
    pub date: String,
}

impl Report<'_> {
    /// One table per upstream, then how everything was set up and what went wrong.
    pub(crate) fn markdown(&self) -> String {
        let plan = self.plan;
        let m = self.machine;
        let mut out = String::new();
        let _ = writeln!(out, "## transproxy benchmark\n");
        let _ = writeln!(
            out,
            "{} · Linux {} · {} × {} · transproxy {} · {} run: {} repetition{}, {} s per wrk run, {} idle tunnels · took {}\n",
            self.date,
            m.kernel,
            m.cpus,
            m.cpu,
            m.transproxy,
            if plan.quick {
                "quick (`--quick`)"
            } else {
                "full"
            },
            plan.repetitions,
            if plan.repetitions == 1 { "" } else { "s" },
            plan.load_seconds,
            thousands(plan.idle_tunnels as f64),
            minutes(self.elapsed),
        );
        let _ = writeln!(
            out,
            "Each cell: median (min–max) of {} sample{}; everything on this machine, over loopback, contenders interleaved. Ratios divide medians: above 1 means more (better for rates, worse for latency, CPU and memory).\n",
            plan.repetitions,
            if plan.repetitions == 1 { "" } else { "s" },
        );
        for upstream in Upstream::ALL {
            let _ = writeln!(out, "### Upstream: {}\n", upstream.title());
            let _ = writeln!(
                out,
                "| | direct | transproxy | redsocks | transproxy ÷ redsocks | transproxy ÷ direct | redsocks ÷ direct |"
            );
            let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|");
            for figure in Figure::ALL {
                if !self.results.has(upstream, figure) {
                    continue;
                }
                let summaries = Contender::ALL.map(|c| self.results.summary(upstream, figure, c));
                let mut row = format!("| {} ", figure.label(plan.idle_tunnels));
                for summary in &summaries {
                    let _ = write!(row, "| {} ", cell(summary.as_ref()));
                }
                for (a, b, _) in RATIOS {
                    let r = ratio(summaries[a.index()].as_ref(), summaries[b.index()].as_ref());
                    let _ = write!(row, "| {} ", r.map_or("–".into(), |r| format!("{r:.2}")));
                }
                let _ = writeln!(out, "{row}|");
            }
            out.push('\n');
        }
        out.push_str(&self.auth_markdown());
        out.push_str(&self.setup_notes());
        if !self.results.notes.is_empty() {
            let _ = writeln!(out, "\nNotes from the run:\n");
            for note in &self.results.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }

    /// The cost of each authentication scheme per tunnel, against Basic.
    fn auth_markdown(&self) -> String {
        let mut out = String::new();
        if !self.results.has_auth() {
            return out;
        }
        let _ = writeln!(
            out,
            "### Proxy authentication: transproxy through squid asking for each scheme\n"
        );
        let _ = writeln!(
            out,
            "| squid asks for | new connections/s (32 conns) | latency p50, 1 conn (µs) | transproxy CPU per 10,000 conns (s) | conns/s ÷ Basic | p50 ÷ Basic | CPU ÷ Basic |"
        );
        let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|");
        for scheme in AuthScheme::ALL {
            let summaries = AuthScheme::FIGURES.map(|f| self.results.auth_summary(scheme, f));
            if summaries.iter().all(Option::is_none) {
                continue;
            }
            let mut row = format!("| {} ", scheme.label());
            for summary in &summaries {
                let _ = write!(row, "| {} ", cell(summary.as_ref()));
            }
            for (i, figure) in AuthScheme::FIGURES.iter().enumerate() {
                let basic = self.results.auth_summary(AuthScheme::Basic, *figure);
                let r = ratio(summaries[i].as_ref(), basic.as_ref());
                let _ = write!(row, "| {} ", r.map_or("–".into(), |r| format!("{r:.2}")));
            }
            let _ = writeln!(out, "{row}|");
        }
        out.push('\n');
        out
    }

    /// The authentication section for the JSON file.
    fn auth_json(&self) -> Value {
        let mut schemes = serde_json::Map::new();
        for scheme in AuthScheme::ALL {
            let mut figures = serde_json::Map::new();
            for figure in AuthScheme::FIGURES {
                let summary = self.results.auth_summary(scheme, figure);
                let basic = self.results.auth_summary(AuthScheme::Basic, figure);
                figures.insert(
                    figure.key().to_owned(),
                    json!({
                        "unit": figure.unit(),
                        "summary": summary_json(summary.as_ref()),
                        "vs_basic": ratio(summary.as_ref(), basic.as_ref()),
                    }),
                );
            }
            schemes.insert(
                scheme.key().to_owned(),
                json!({ "label": scheme.label(), "figures": figures }),
            );
        }
        Value::Object(schemes)
    }

    /// How each contender and fixture was set up, under the tables.
    fn setup_notes(&self) -> String {
        let versions: Vec<String> = self
            .machine
            .packages
            .iter()
            .map(|(p, v)| format!("{p} {v}"))
            .collect();
        let lines = [
            "Origin: nginx (2 workers, sendfile, no access log) on 127.0.0.2, a 100-byte file and a 1 GiB sparse file. Clients (wrk, curl, tp-client) run in a cgroup v2 of their contender.".to_owned(),
            "transproxy: `run --cgroup <its cgroup> --include 127.0.0.2/32:<port> --listen6 off` for the two origins, default log level.".to_owned(),
            "redsocks: `type = http-connect`, `splice = true`, `listenq = 4096`, `redsocks_conn_max` as high as its descriptors allow, no per-connection logs; behind `iptables -t nat -A OUTPUT -p tcp -d 127.0.0.2 --dport <port> -m cgroup --path <its cgroup> -j REDIRECT`. The rules exist only while redsocks is measured: a NAT rule turns connection tracking on for every connection of the machine.".to_owned(),
            "Upstreams: squid with `cache deny all`; tp-fast-proxy (a single-threaded tokio runtime per core on SO_REUSEPORT listeners, relaying with transproxy's own relay: short exchanges copied, bulk spliced); dante 1.4 as a SOCKS5 upstream (no authentication, errors logged only; redsocks with `type = socks5`, transproxy with `--proxy socks5://`).".to_owned(),
            "Latency: the rate test's request (`Connection: close`) at one connection, so it includes setting up the tunnel.".to_owned(),
            "CPU: user + system time of the interceptor process (/proc/PID/stat) during the rate and download runs. RSS: VmRSS of a freshly started interceptor with the idle tunnels open (through tp-fast-proxy) minus before.".to_owned(),
            "Proxy authentication: a squid per scheme (helpers as Debian ships them, a throwaway MIT KDC for Kerberos) and a transproxy authenticating to it with a password (a Kerberos ticket from kinit for Negotiate), the schemes interleaved. Basic and Digest cost one request per tunnel once the daemon has learned the scheme (Digest reuses its nonce); NTLM authenticates each proxy connection in two requests, Negotiate in one with the service ticket kept in the credentials cache. The rate includes squid's helpers; the CPU is transproxy's alone.".to_owned(),
            "Non-matching row: wrk to 127.0.0.3, which no rule names, from the contender's cgroup: transproxy's programs attached, redsocks' rules present; direct has neither.".to_owned(),
            format!("Versions: {}.", versions.join(", ")),
        ];
        let mut out = String::from("Setup:\n\n");
        for line in lines {
            let _ = writeln!(out, "- {line}");
        }
        out
    }

    /// The same figures with every sample, for scripts and later comparison.
    pub(crate) fn json(&self) -> Value {
        let plan = self.plan;
        let mut upstreams = serde_json::Map::new();
        for upstream in Upstream::ALL {
            let mut figures = serde_json::Map::new();
            for figure in Figure::ALL {
                if !self.results.has(upstream, figure) {
                    continue;
                }
                let summaries = Contender::ALL.map(|c| self.results.summary(upstream, figure, c));
                let contenders: serde_json::Map<String, Value> = Contender::ALL
                    .iter()
                    .map(|c| {
                        (
                            c.name().to_owned(),
                            summary_json(summaries[c.index()].as_ref()),
                        )
                    })
                    .collect();
                let ratios: serde_json::Map<String, Value> = RATIOS
                    .iter()
                    .map(|(a, b, key)| {
                        let r = ratio(summaries[a.index()].as_ref(), summaries[b.index()].as_ref());
                        ((*key).to_owned(), json!(r))
                    })
                    .collect();
                figures.insert(
                    figure.key().to_owned(),
                    json!({
                        "label": figure.label(plan.idle_tunnels),
                        "unit": figure.unit(),
                        "higher_is_better": figure.higher_is_better(),
                        "contenders": contenders,
                        "ratios": ratios,
                    }),
                );
            }
            upstreams.insert(
                upstream.key().to_owned(),
                json!({ "title": upstream.title(), "figures": figures }),
            );
        }
        let m = self.machine;
        json!({
            "date": self.date,
            "elapsed_seconds": self.elapsed.as_secs(),
            "plan": {
                "quick": plan.quick,
                "repetitions": plan.repetitions,
                "load_seconds": plan.load_seconds,
                "idle_tunnels": plan.idle_tunnels,
                "download_bytes": plan.download_bytes,
            },
            "machine": {
                "kernel": m.kernel,
                "cpu": m.cpu,
                "cpus": m.cpus,
                "transproxy": m.transproxy,
                "packages": m.packages.iter().map(|(p, v)| (p.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            },
            "upstreams": upstreams,
            "auth": self.auth_json(),
            "notes": self.results.notes,
        })
    }

    /// Writes results.md and results.json into target/bench; returns their paths.
    pub(crate) fn write(&self) -> anyhow::Result<[PathBuf; 2]> {
        let dir = crate::workspace_root().join("target/bench");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let md = dir.join("results.md");
        let json = dir.join("results.json");
        fs::write(&md, self.markdown())
            .with_context(|| format!("cannot write {}", md.display()))?;
        let text =
            serde_json::to_string_pretty(&self.json()).context("cannot encode the results")?;
        fs::write(&json, text + "\n")
            .with_context(|| format!("cannot write {}", json.display()))?;
        Ok([md, json])
    }
}

/// Median, range and samples, or null when nothing was measured.
fn summary_json(summary: Option<&Summary>) -> Value {
    match summary {
        None => Value::Null,
        Some(s) => json!({
            "median": s.median,
            "min": s.min,
            "max": s.max,
            "samples": s.samples,
        }),
    }
}

/// `median (min–max)`, or the single value, or a dash.
fn cell(summary: Option<&Summary>) -> String {
    match summary {
        None => "–".into(),
        Some(s) if s.min == s.max => number(s.median),
        Some(s) => format!("{} ({}–{})", number(s.median), number(s.min), number(s.max)),
    }
}

/// Three significant digits at most, thousands grouped: 12,345 · 812 · 45.6 · 0.0123.
fn number(v: f64) -> String {
    let magnitude = v.abs();
    if magnitude >= 1000.0 {
        thousands(v)
    } else if magnitude >= 100.0 {
        format!("{v:.0}")
    } else if magnitude >= 10.0 {
        format!("{v:.1}")
    } else if magnitude >= 1.0 {
        format!("{v:.2}")
    } else if magnitude == 0.0 {
        "0".into()
    } else {
        let decimals = (2.0 - magnitude.log10().floor()).clamp(3.0, 6.0) as usize;
        format!("{v:.decimals$}")
    }
}

/// An integer with commas between thousands.
pub(crate) fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

/// `8 min 05 s`: how long the run took.
fn minutes(elapsed: Duration) -> String {
    let s = elapsed.as_secs();
    format!("{} min {:02} s", s / 60, s % 60)
}
