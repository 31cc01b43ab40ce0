//! `--metrics ADDR`: counters, gauges and a histogram in the Prometheus text format (OpenMetrics),
//! at `http://ADDR/metrics`.
//!
//! Encoded by `prometheus-client` (the Prometheus project's own Rust crate), not by hand. The
//! data path only increments atomics: every labelled counter is created once, at start, and
//! kept. No label carries a destination or a process: their number would be unbounded. What
//! only the kernel sees (connects refused at once, records filed) is read from its per-CPU
//! counters when scraped.
//!
//! Names: `transproxy_connections_accepted_total`, `transproxy_tunnels_total{outcome}` (the
//! access log's outcomes), `transproxy_not_redirected_total`, `transproxy_over_capacity_total`,
//! `transproxy_bytes_total{direction="up"|"down"}`, `transproxy_refused_at_connect_total`,
//! `transproxy_tunnels_open`, `transproxy_records_pending`,
//! `transproxy_proxy_reply_seconds` (histogram: from accept to the proxy's answer),
//! `transproxy_dns_queries_total{answer="fake"|"forwarded"|"refused"|"failed"|"malformed"}`,
//! `transproxy_dns_captured_total` (DNS connects and datagrams the kernel sent to the
//! responder).

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

use super::{Ending, Outcome};

/// Labels of a family.
type Labels = Vec<(&'static str, &'static str)>;

/// What a scrape reads from outside the metrics: the kernel's counters ([refused at connect,
/// records filed, DNS captured], summed over CPUs, when they can be read), and each upstream
/// proxy with whether it is up.
pub(crate) struct Scrape {
    pub(crate) kernel: Option<[u64; 3]>,
    pub(crate) proxies: Vec<(String, bool)>,
}

/// The daemon's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) accepted: Counter,
    pub(crate) not_redirected: Counter,
    pub(crate) over_capacity: Counter,
    /// By outcome, in [`Outcome::ALL`]'s order.
    outcomes: Vec<Counter>,
    bytes_up: Counter,
    bytes_down: Counter,
    open: Gauge,
    proxy_reply: Histogram,
    refused_at_connect: Counter,
    dns_captured: Counter,
    records_pending: Gauge,
    /// Each proxy of the list (its URL, credentials masked: a label bounded by the config).
    proxy_up: Family<Vec<(&'static str, String)>, Gauge>,
    /// Records the daemon took from the kernel, for the pending gauge.
    pub(crate) records_taken: AtomicU64,
    /// What the kernel's counters said at the last scrape.
    kernel_seen: Mutex<[u64; 3]>,
    /// DNS queries answered (`--dns`).
    pub(crate) dns: DnsAnswers,
}

/// DNS queries answered, by how.
pub(crate) struct DnsAnswers {
    /// From the fake pool.
    pub(crate) fake: Counter,
    /// By the resolver the query was sent to.
    pub(crate) forwarded: Counter,
    /// Not captured by the kernel (sent to the responder directly): REFUSED.
    pub(crate) refused: Counter,
    /// The resolver did not answer, or the pool was full: SERVFAIL.
    pub(crate) failed: Counter,
    /// Not a DNS query: FORMERR, NOTIMP or nothing.
    pub(crate) malformed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("transproxy");
        let accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "Connections accepted on the listeners",
            accepted.clone(),
        );
        let tunnels = Family::<Labels, Counter>::default();
        registry.register(
            "tunnels",
            "Tunnels ended, by outcome (as in the access log)",
            tunnels.clone(),
        );
        let outcomes = Outcome::ALL
            .iter()
            .map(|outcome| {
                tunnels
                    .get_or_create(&vec![("outcome", outcome.word())])
                    .clone()
            })
            .collect();
        let not_redirected = Counter::default();
        registry.register(
            "not_redirected",
            "Connections to a listener that the kernel did not redirect (reset)",
            not_redirected.clone(),
        );
        let over_capacity = Counter::default();
        registry.register(
            "over_capacity",
            "Clients reset because --max-tunnels were open",
            over_capacity.clone(),
        );
        let bytes = Family::<Labels, Counter>::default();
        registry.register(
            "bytes",
            "Bytes relayed: up (client to destination) and down",
            bytes.clone(),
        );
        let bytes_up = bytes.get_or_create(&vec![("direction", "up")]).clone();
        let bytes_down = bytes.get_or_create(&vec![("direction", "down")]).clone();
        let open = Gauge::default();
        registry.register("tunnels_open", "Tunnels open now", open.clone());
        // 0.5 ms to about 16 s.
        let proxy_reply = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register(
            "proxy_reply_seconds",
            "Time from accepting a client to the proxy's answer to its tunnel request",
            proxy_reply.clone(),
        );
        let refused_at_connect = Counter::default();
        registry.register(
            "refused_at_connect",
            "Connects the kernel refused at once: their destination was recently reported refused",
            refused_at_connect.clone(),
        );
        let dns_captured = Counter::default();
        registry.register(
            "dns_captured",
            "DNS connects and datagrams the kernel sent to the DNS responder (--dns)",
            dns_captured.clone(),
        );
        let records_pending = Gauge::default();
        registry.register(
            "records_pending",
            "Redirected connections the kernel recorded and the daemon has not taken yet",
            records_pending.clone(),
        );
        let proxy_up = Family::<Vec<(&'static str, String)>, Gauge>::default();
        registry.register(
            "proxy_up",
            "Each upstream proxy: 1 while tunnels try it, 0 while it is skipped after failing",
            proxy_up.clone(),
        );
        let dns = Family::<Labels, Counter>::default();
        registry.register(
            "dns_queries",
            "DNS queries captured with --dns, by answer",
            dns.clone(),
        );
        let answer = |word: &'static str| dns.get_or_create(&vec![("answer", word)]).clone();
        let dns = DnsAnswers {
            fake: answer("fake"),
            forwarded: answer("forwarded"),
            refused: answer("refused"),
            failed: answer("failed"),
            malformed: answer("malformed"),
        };
        Self {
            dns,
            registry,
            accepted,
            not_redirected,
            over_capacity,
            outcomes,
            bytes_up,
            bytes_down,
            open,
            proxy_reply,
            refused_at_connect,
            dns_captured,
            records_pending,
            proxy_up,
            records_taken: AtomicU64::new(0),
            kernel_seen: Mutex::new([0; 3]),
        }
    }
}

impl Metrics {
    pub(super) fn opened(&self) {
        self.open.inc();
    }

    pub(super) fn closed(&self, ending: &Ending<'_>) {
        self.open.dec();
        let index = Outcome::ALL
            .iter()
            .position(|o| *o == ending.outcome)
            .unwrap_or(0);
        if let Some(counter) = self.outcomes.get(index) {
            counter.inc();
        }
        self.bytes_up.inc_by(ending.up);
        self.bytes_down.inc_by(ending.down);
    }

    /// Counts for status and the shutdown summary.
    pub(crate) fn counters(&self) -> super::status::Counters {
        super::status::Counters {
            accepted: self.accepted.get(),
            not_redirected: self.not_redirected.get(),
            over_capacity: self.over_capacity.get(),
            open: u64::try_from(self.open.get()).unwrap_or(0),
            outcomes: Outcome::ALL
                .iter()
                .zip(&self.outcomes)
                .map(|(outcome, counter)| (outcome.word().to_owned(), counter.get()))
                .collect(),
        }
    }

    /// The proxy answered a tunnel request `after` the client was accepted.
    pub(crate) fn proxy_replied(&self, after: Duration) {
        self.proxy_reply.observe(after.as_secs_f64());
    }

    /// The text exposition, with what `scrape` read now.
    pub(crate) fn encode(&self, scrape: Scrape) -> String {
        for (proxy, up) in scrape.proxies {
            self.proxy_up
                .get_or_create(&vec![("proxy", proxy)])
                .set(i64::from(up));
        }
        if let Some(now) = scrape.kernel {
            let mut seen = self
                .kernel_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.refused_at_connect
                .inc_by(now[0].saturating_sub(seen[0]));
            self.dns_captured.inc_by(now[2].saturating_sub(seen[2]));
            let taken = self.records_taken.load(Ordering::Relaxed);
            let pending = now[1].saturating_sub(taken);
            self.records_pending
                .set(i64::try_from(pending).unwrap_or(i64::MAX));
            *seen = now;
        }
        let mut text = String::new();
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// How long a scraper may take to send its request.
const REQUEST_WAIT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until the task is dropped. `kernel` reads what lives
/// outside the metrics (the kernel's counters, the proxies' states).
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<super::Observer>,
    kernel: Arc<dyn Fn() -> Scrape + Send + Sync>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (metrics, kernel) = (Arc::clone(&metrics), Arc::clone(&kernel));
        tokio::spawn(async move {
            if let Err(err) = answer(stream, &metrics.metrics, kernel.as_ref()).await {
                debug!("metrics: {err}");
            }
        });
    }
}

/// Reads one request and answers it: the metrics for `GET /metrics`, 404 otherwise.
async fn answer(
    mut stream: TcpStream,
    metrics: &Metrics,
    kernel: &(dyn Fn() -> Scrape + Send + Sync),
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let path = tokio::time::timeout(REQUEST_WAIT, async {
        let mut buf = [0u8; 1024];
        loop {
            let read = stream.read(&mut buf).await?;
            if read == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            head.extend_from_slice(&buf[..read]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&head) {
                Ok(httparse::Status::Complete(_)) => {
                    return Ok(Some((
                        request.method == Some("GET"),
                        request.path.unwrap_or("").to_owned(),
                    )));
                }
                Ok(httparse::Status::Partial) if head.len() < 8 * 1024 => {}
                _ => return Ok(None),
            }
        }
    })
    .await
    .unwrap_or(Ok(None))?;
    let response = match path {
        Some((true, path)) if path == "/metrics" || path.starts_with("/metrics?") => {
            let body = metrics.encode(kernel());
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        Some(_) => {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
        }
        None => "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
