//! SOCKS5 (RFC 1928) to the proxy, with username/password authentication (RFC 1929), through
//! the `tokio-socks` crate: a small, kept client that speaks exactly this (no SOCKS server, no
//! DNS of its own). The destination goes as the host name when one is known, else as the
//! address; `socks5h://` never sends an address.
//!
//! The client's bytes wait for the proxy's reply: a SOCKS5 proxy reads its request and then
//! relays, and bytes sent with the request could be taken for a malformed one.

use std::{fmt, net::SocketAddr, time::Duration};

use tokio_socks::{Error as SocksError, TargetAddr, tcp::Socks5Stream};

use super::{Credentials, ProxyStream, TunnelError, http_connect::Target};

/// How a SOCKS5 proxy is asked for tunnels.
pub(super) struct Socks5 {
    credentials: Option<Credentials>,
    /// `socks5h://`: a tunnel with no host name fails instead of sending the address.
    names_only: bool,
    reply_timeout: Duration,
}

/// A SOCKS5 proxy's refusal, or a reply that is not SOCKS5.
#[derive(Debug)]
pub struct SocksFailure {
    /// What went wrong, in the crate's words (`Connection refused`, `Password auth failure`).
    pub what: String,
    /// The proxy reported the destination refused or unreachable: refused stays refused.
    pub unreachable: bool,
    /// The proxy turned the credentials, or the request, down.
    pub denied: bool,
}

impl fmt::Display for SocksFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SOCKS5 proxy: {}", self.what)
    }
}

impl Socks5 {
    pub(super) fn new(
        credentials: Option<Credentials>,
        names_only: bool,
        reply_timeout: Duration,
    ) -> Self {
        Self {
            credentials,
            names_only,
            reply_timeout,
        }
    }

    /// Asks the proxy on `stream` for a tunnel to `target`; once this returns, `stream` is the
    /// tunnel.
    pub(super) async fn request(
        &self,
        stream: &mut ProxyStream,
        target: &Target<'_>,
    ) -> Result<(), TunnelError> {
        let target = match target {
            Target::Name(name, port) => TargetAddr::Domain(name.as_str().into(), *port),
            Target::Addr(addr) if self.names_only => return Err(TunnelError::NoName(*addr)),
            Target::Addr(addr) => TargetAddr::Ip(SocketAddr::new(addr.ip(), addr.port())),
        };
        let connecting = async {
            match &self.credentials {
                Some(credentials) => Socks5Stream::connect_with_password_and_socket(
                    &mut *stream,
                    target,
                    &credentials.user,
                    credentials.password(),
                )
                .await
                .map(drop),
                None => Socks5Stream::connect_with_socket(&mut *stream, target)
                    .await
                    .map(drop),
            }
        };
        // Boxed: the crate's connector holds a 513-byte buffer, which would otherwise be part
        // of every tunnel's handshake, SOCKS or not.
        match tokio::time::timeout(self.reply_timeout, Box::pin(connecting)).await {
            Err(_) => Err(TunnelError::ReplyTimeout(self.reply_timeout)),
            Ok(Ok(())) => Ok(()),
            Ok(Err(SocksError::Io(err))) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(TunnelError::Closed)
            }
            Ok(Err(SocksError::Io(err))) => Err(TunnelError::Io(err)),
            Ok(Err(err)) => Err(TunnelError::Socks(failure(
                &err,
                self.credentials.is_some(),
            ))),
        }
    }
}

/// What a SOCKS5 error means for the client; `with_password` says whether credentials were
/// offered.
fn failure(err: &SocksError, with_password: bool) -> SocksFailure {
    let unreachable = matches!(
        err,
        SocksError::ConnectionRefused
            | SocksError::HostUnreachable
            | SocksError::NetworkUnreachable
    );
    let denied = matches!(
        err,
        SocksError::ConnectionNotAllowedByRuleset
            | SocksError::PasswordAuthFailure(_)
            | SocksError::NoAcceptableAuthMethods
            | SocksError::AuthorizationRequired
            | SocksError::InvalidAuthValues(_)
    );
    let hint = match err {
        SocksError::NoAcceptableAuthMethods | SocksError::AuthorizationRequired
            if !with_password =>
        {
            " (it wants a user name and password: give them in the URL, --proxy-auth-file or --proxy-auth-env)"
        }
        _ => "",
    };
    SocksFailure {
        what: format!("{err}{hint}"),
        unreachable,
        denied,
    }
}
