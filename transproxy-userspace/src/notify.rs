//! systemd's readiness protocol (`sd_notify(3)`), for the `Type=notify` unit: `READY=1` once
//! the programs are attached and the listeners accept, `RELOADING=1` and `READY=1` around a
//! SIGHUP reload, `STOPPING=1` when a signal stops the daemon, each with a `STATUS=` line that
//! `systemctl status` shows.
//!
//! The protocol is one datagram of `KEY=VALUE` lines sent to the Unix socket named by
//! `$NOTIFY_SOCKET`: a path, or an abstract name written with a leading `@`. That is a few lines
//! of the standard library with no `unsafe`, so it is written here instead of taken from a
//! crate. Without `$NOTIFY_SOCKET` (not started by systemd) nothing is sent.
//!
//! The daemon drops every capability and may switch user before it is ready; the socket stays
//! reachable, since systemd's is writable by every user (and the unit's `NotifyAccess=main`
//! accepts messages from the daemon whatever its user). A notification that cannot be sent is
//! logged and otherwise ignored: it is never a reason to stop serving.

use std::{
    io,
    os::{
        linux::net::SocketAddrExt as _,
        unix::{
            ffi::OsStrExt as _,
            net::{SocketAddr, UnixDatagram},
        },
    },
};

use tracing::{debug, warn};

/// Where notifications go, read from `$NOTIFY_SOCKET` once at start.
pub(crate) struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for; one that sends nothing when it is unset, empty or
    /// names a kind of socket this does not speak (systemd's `vsock:` addresses, for VMs).
    pub(crate) fn from_env() -> Self {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET").filter(|v| !v.is_empty()) else {
            return Self { target: None };
        };
        let target = target_address(value.as_encoded_bytes())
            .and_then(|addr| Ok((UnixDatagram::unbound()?, addr)));
        match target {
            Ok(target) => Self {
                target: Some(target),
            },
            Err(err) => {
                warn!(
                    "NOTIFY_SOCKET={}: {err}; systemd will not hear that transproxy is ready",
                    value.to_string_lossy()
                );
                Self { target: None }
            }
        }
    }

    /// `READY=1`: attached and listening, or done reloading. `status` is shown by `systemctl
    /// status`.
    pub(crate) fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `RELOADING=1`, with the time systemd (253 and later) uses to match it to the reload it
    /// asked for.
    pub(crate) fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
            monotonic_usec()
        ));
    }

    /// `STOPPING=1`: a signal asked the daemon to stop; `why` names it.
    pub(crate) fn stopping(&self, why: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(why)));
    }

    fn send(&self, message: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(err) = socket.send_to_addr(message.as_bytes(), addr) {
            warn!("cannot notify systemd ({err})");
        } else {
            debug!("notified systemd: {}", message.replace('\n', " "));
        }
    }
}

/// `$NOTIFY_SOCKET` as a socket address: `@name` is the abstract socket `name`, a path starting
/// with `/` a socket file.
fn target_address(value: &[u8]) -> io::Result<SocketAddr> {
    match value {
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name),
        [b'/', ..] => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(value)),
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "not a Unix socket path or @abstract name",
        )),
    }
}

/// The protocol is line based: a status never spans lines.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(now) => {
            let secs = u64::try_from(now.tv_sec()).unwrap_or(0);
            let micros = u64::try_from(now.tv_nsec() / 1000).unwrap_or(0);
            secs.saturating_mul(1_000_000).saturating_add(micros)
        }
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_addresses() {
        let path = target_address(b"/run/systemd/notify").unwrap();
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let abstract_name = target_address(b"@/org/freedesktop/systemd1/notify/42").unwrap();
        assert_eq!(
            abstract_name.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify/42"[..])
        );
        for unsupported in [&b"vsock:2:1234"[..], b"relative/path"] {
            assert!(target_address(unsupported).is_err(), "{unsupported:?}");
        }
    }

    #[test]
    fn messages_reach_the_socket_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let notifier = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
        };
        let mut buf = [0u8; 512];
        let mut next = || {
            let n = listener.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        notifier.ready("intercepting\nall");
        assert_eq!(next(), "READY=1\nSTATUS=intercepting all");
        notifier.reloading();
        let reloading = next();
        let usec: u64 = reloading
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|rest| rest.strip_suffix("\nSTATUS=reloading"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{reloading:?}"));
        assert!(usec > 0 && usec <= monotonic_usec(), "{usec}");
        notifier.stopping("SIGTERM: stopping");
        assert_eq!(next(), "STOPPING=1\nSTATUS=SIGTERM: stopping");
        // Without a socket nothing is sent and nothing fails.
        Notifier { target: None }.ready("ignored");
    }
}
