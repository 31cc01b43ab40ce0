//! The connection a tunnel goes through: a plain socket (to an `http://` or SOCKS5 proxy, or to
//! the destination itself), or TLS to an `https://` proxy, with rustls.
//!
//! The plain socket stays a `TcpStream` all the way to the relay, which splices it; TLS bytes
//! must pass through rustls, so those tunnels are copied (see [`crate::relay::relay_stream`]).

use std::{
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject as _},
    },
};

/// A connection to a proxy (or, for `direct`, to the destination).
pub(crate) enum ProxyStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ProxyStream {
    /// The socket underneath: for its address, and to reset it.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Self::Tcp(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for ProxyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ProxyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The certificates an `https://` proxy is checked against: the file of `--proxy-ca` (only
/// those: a private CA that signed the proxy's certificate; webpki does not accept a CA
/// certificate as the proxy's own, so a self-signed one cannot be pinned), else the system's
/// store.
#[derive(Clone)]
pub struct ProxyTrust(Arc<ClientConfig>);

impl std::fmt::Debug for ProxyTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyTrust")
    }
}

impl ProxyTrust {
    /// From `--proxy-ca FILE` (PEM, one certificate or more), or the system's store.
    pub fn load(ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .with_context(|| format!("--proxy-ca: cannot read {}", path.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("--proxy-ca: {} is not PEM", path.display()))?;
                if certs.is_empty() {
                    bail!("--proxy-ca: {} holds no certificate", path.display());
                }
                for cert in certs {
                    roots.add(cert).with_context(|| {
                        format!(
                            "--proxy-ca: a certificate in {} is not usable",
                            path.display()
                        )
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    bail!(
                        "no CA certificate in the system's store to check an https:// proxy against (install ca-certificates, or give --proxy-ca)"
                    );
                }
            }
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS set-up")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self(Arc::new(config)))
    }

    /// TLS over `tcp` with the proxy `host` (a name, checked against the certificate's names,
    /// or an address, checked against its IP addresses).
    pub(super) async fn connect(&self, host: &str, tcp: TcpStream) -> io::Result<ProxyStream> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        let tls = TlsConnector::from(Arc::clone(&self.0))
            .connect(name, tcp)
            .await?;
        Ok(ProxyStream::Tls(Box::new(tls)))
    }
}
