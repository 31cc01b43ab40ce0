//! Authentication to the proxy: which scheme, with which credentials, and each tunnel's
//! exchange.
//!
//! Schemes, strongest first: **Negotiate** (SPNEGO: Kerberos through the system's GSSAPI, or
//! NTLM inside SPNEGO), **NTLM** (NTLMv2, [`ntlm`]), **Digest** (RFC 7616, the `digest_auth`
//! crate) and **Basic**. The proxy names the schemes it accepts in its 407; the strongest one
//! offered for which credentials exist is used, or the one `--proxy-auth-scheme` names.
//! Nothing is sent before the proxy asks, except Basic when the user named it; once a proxy
//! has asked, later tunnels answer from their first request, and the scheme is remembered
//! ([`Auth::learned`]).
//!
//! NTLM and Negotiate authenticate the proxy *connection*: each tunnel's connection does the
//! handshake (for NTLM three requests: CONNECT with NEGOTIATE, 407 with CHALLENGE, CONNECT with
//! AUTHENTICATE, 200), and the client's bytes wait for it (the proxy would read them as its next
//! request). Each tunnel's exchange is a [`Session`].

pub mod challenge;
mod digest;
#[cfg(feature = "gssapi")]
pub(crate) mod negotiate;
pub mod ntlm;

use std::{fmt, sync::Mutex};

use base64::Engine as _;

pub use self::challenge::Challenge;
use self::ntlm::NtlmExchange;
pub use self::ntlm::NtlmIdentity;

/// Most requests one tunnel's authentication may take: NTLM needs two, Digest with a stale
/// nonce three; a proxy that keeps asking after that is in a loop.
pub(crate) const MAX_LEGS: usize = 4;

/// An authentication scheme, weakest first (the order is the preference).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    Basic,
    Digest,
    Ntlm,
    Negotiate,
}

impl Scheme {
    /// The scheme as HTTP names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Basic => "Basic",
            Self::Digest => "Digest",
            Self::Ntlm => "NTLM",
            Self::Negotiate => "Negotiate",
        }
    }

    /// Whether the scheme authenticates the connection rather than each request.
    pub fn per_connection(self) -> bool {
        matches!(self, Self::Ntlm | Self::Negotiate)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A user name and password, as given (`DOMAIN\user`, `user@DOMAIN` or a bare name).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    password: String,
}

/// Never shows the password.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, ***)", self.user)
    }
}

impl Credentials {
    pub fn new(user: String, password: String) -> Self {
        Self { user, password }
    }

    /// `Basic base64(user:password)`.
    pub fn basic(&self) -> String {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.user, self.password));
        format!("Basic {token}")
    }

    /// The NTLM identity: `DOMAIN\user` and `user@DOMAIN` split, a bare name with no domain.
    pub fn ntlm(&self) -> NtlmIdentity {
        let (user, domain) = self.ntlm_parts();
        NtlmIdentity::new(user, domain, &self.password)
    }

    /// The user and the domain, as NTLM names them.
    pub(crate) fn ntlm_parts(&self) -> (&str, &str) {
        if let Some((domain, user)) = self.user.split_once('\\') {
            (user, domain)
        } else if let Some((user, domain)) = self.user.rsplit_once('@') {
            (user, domain)
        } else {
            (self.user.as_str(), "")
        }
    }

    pub(crate) fn password(&self) -> &str {
        &self.password
    }
}

/// Why a tunnel could not authenticate. One line each; never a credential.
#[derive(Debug)]
pub enum AuthError {
    /// None of the offered schemes has credentials here.
    NoCredentials { offered: Vec<String> },
    /// `--proxy-auth-scheme` names a scheme the proxy does not offer.
    NotOffered {
        wanted: Scheme,
        offered: Vec<String>,
    },
    /// The proxy asked again after the answer: the credentials were not accepted.
    Rejected(Scheme),
    /// The proxy kept asking past [`MAX_LEGS`] requests.
    Loop(Scheme),
    /// A challenge that cannot be answered (malformed), with what is wrong.
    Malformed(Scheme, String),
    /// Kerberos (or the GSSAPI) said no: no ticket, an expired one, clock skew...
    Gssapi(String),
    /// The proxy closed the connection in the middle of a per-connection handshake.
    ClosedMidway(Scheme),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoCredentials { .. } => f.write_str(
                "no credentials were sent: give a password (--proxy-auth-file, --proxy-auth-env or the proxy URL) or, for Negotiate, a Kerberos ticket (kinit, --proxy-auth-ccache, --proxy-auth-keytab)",
            ),
            Self::NotOffered { wanted, .. } => write!(
                f,
                "--proxy-auth-scheme is {wanted}, which it does not offer"
            ),
            Self::Rejected(scheme) => write!(f, "the {scheme} credentials were not accepted"),
            Self::Loop(scheme) => write!(
                f,
                "{scheme}: the proxy kept asking after {MAX_LEGS} requests"
            ),
            Self::Malformed(scheme, what) => write!(f, "{scheme}: {what}"),
            Self::Gssapi(what) => write!(f, "Negotiate: {what}"),
            Self::ClosedMidway(scheme) => write!(
                f,
                "{scheme}: the proxy closed the connection during the handshake (it must keep it open between the requests)"
            ),
        }
    }
}

/// The proxy's authentication settings, shared by every tunnel.
pub(crate) struct Auth {
    credentials: Option<Credentials>,
    forced: Option<Scheme>,
    /// Kerberos through the GSSAPI: tried for Negotiate before a password is.
    kerberos: bool,
    /// The proxy's host name, for the Kerberos service principal `HTTP/host`.
    proxy_host: String,
    /// The scheme the proxy asked for last time: later tunnels start with it.
    learned: Mutex<Option<Scheme>>,
    /// Digest's latest challenge, whose nonce is reused (counted) until the proxy calls it
    /// stale.
    digest: Mutex<Option<digest_auth::WwwAuthenticateHeader>>,
}

/// How a tunnel's exchange stands.
enum State {
    /// Nothing sent yet.
    Fresh,
    /// Sent a header of this stateless scheme.
    Sent(Scheme),
    /// An NTLM exchange waiting for its CHALLENGE.
    Ntlm(NtlmExchange),
    /// Sent the AUTHENTICATE message: a 407 now means rejected.
    NtlmDone,
    #[cfg(feature = "gssapi")]
    Negotiate(negotiate::Context),
}

/// One tunnel's authentication exchange.
pub(crate) struct Session<'a> {
    auth: &'a Auth,
    state: State,
    /// Requests that carried credentials.
    legs: usize,
    /// The target, as Digest hashes it (`host:port`).
    target: String,
    /// The last scheme answered with.
    tried: Option<Scheme>,
}

impl Auth {
    pub(crate) fn new(
        credentials: Option<Credentials>,
        forced: Option<Scheme>,
        kerberos: bool,
        proxy_host: String,
    ) -> Self {
        Self {
            credentials,
            forced,
            kerberos,
            proxy_host,
            learned: Mutex::new(None),
            digest: Mutex::new(None),
        }
    }

    /// A tunnel's exchange, with the header of its first request when the scheme is known:
    /// the one the proxy asked for last time, or Basic when the user named it.
    pub(crate) async fn session(
        &self,
        target: String,
    ) -> (Session<'_>, Result<Option<String>, AuthError>) {
        let mut session = Session {
            auth: self,
            state: State::Fresh,
            legs: 0,
            target,
            tried: None,
        };
        let learned = self.learned.lock().ok().and_then(|l| *l);
        let first = match (self.forced, learned) {
            (Some(Scheme::Basic), _) => session.start(Scheme::Basic, None).await,
            (_, Some(scheme)) => session.start(scheme, None).await,
            _ => Ok(None),
        };
        (session, first)
    }

    /// Whether a tunnel's first request will carry a per-connection handshake: the client's
    /// bytes must then wait for the proxy's 200.
    pub(crate) fn handshakes_first(&self) -> bool {
        self.learned
            .lock()
            .ok()
            .and_then(|l| *l)
            .is_some_and(|scheme| scheme.per_connection() || scheme == Scheme::Digest)
    }

    fn learn(&self, scheme: Scheme) {
        if let Ok(mut learned) = self.learned.lock() {
            *learned = Some(scheme);
        }
    }

    /// The schemes that can be answered here, strongest first.
    fn usable(&self) -> Vec<Scheme> {
        let mut usable = Vec::new();
        if self.kerberos && cfg!(feature = "gssapi") {
            usable.push(Scheme::Negotiate);
        }
        if self.credentials.is_some() {
            usable.extend([Scheme::Ntlm, Scheme::Digest, Scheme::Basic]);
        }
        usable
    }
}

impl Session<'_> {
    /// Whether this session has sent credentials.
    pub(crate) fn sent_credentials(&self) -> bool {
        self.legs > 0
    }

    /// The scheme last answered with, if any.
    pub(crate) fn scheme(&self) -> Option<Scheme> {
        self.tried
    }

    /// The first header of `scheme` (`new_digest`: a Digest challenge to answer; without one,
    /// the last one is answered again with its nonce counted).
    async fn start(
        &mut self,
        scheme: Scheme,
        new_digest: Option<&str>,
    ) -> Result<Option<String>, AuthError> {
        let auth = self.auth;
        let header = match scheme {
            Scheme::Basic => {
                let Some(credentials) = &auth.credentials else {
                    return Ok(None);
                };
                self.state = State::Sent(Scheme::Basic);
                credentials.basic()
            }
            Scheme::Digest => {
                let Some(credentials) = &auth.credentials else {
                    return Ok(None);
                };
                let mut prompt = auth
                    .digest
                    .lock()
                    .map_err(|_| AuthError::Malformed(Scheme::Digest, "state lost".to_owned()))?;
                if let Some(challenge) = new_digest {
                    *prompt = Some(digest::read(challenge)?);
                }
                let Some(prompt) = prompt.as_mut() else {
                    return Ok(None);
                };
                let header = digest::answer(prompt, credentials, &self.target)?;
                self.state = State::Sent(Scheme::Digest);
                header
            }
            Scheme::Ntlm => {
                if auth.credentials.is_none() {
                    return Ok(None);
                }
                let (exchange, negotiate) = NtlmExchange::start();
                self.state = State::Ntlm(exchange);
                format!(
                    "NTLM {}",
                    base64::engine::general_purpose::STANDARD.encode(negotiate)
                )
            }
            Scheme::Negotiate => self.start_negotiate().await?,
        };
        self.tried = Some(scheme);
        self.legs += 1;
        Ok(Some(header))
    }

    #[cfg(feature = "gssapi")]
    async fn start_negotiate(&mut self) -> Result<String, AuthError> {
        let (context, token) = negotiate::Context::start(
            &self.auth.proxy_host,
            if self.auth.kerberos {
                None
            } else {
                self.auth.credentials.as_ref()
            },
        )
        .await?;
        self.state = State::Negotiate(context);
        Ok(format!("Negotiate {token}"))
    }

    #[cfg(not(feature = "gssapi"))]
    async fn start_negotiate(&mut self) -> Result<String, AuthError> {
        Err(AuthError::Gssapi(
            "this transproxy was built without GSSAPI".to_owned(),
        ))
    }

    /// The header for the next request, answering a 407 that offered `challenges`.
    pub(crate) async fn answer(&mut self, challenges: &[Challenge]) -> Result<String, AuthError> {
        let offered: Vec<String> = challenges.iter().map(ToString::to_string).collect();
        let find = |scheme: Scheme| challenges.iter().find(|c| c.is(scheme.name()));
        if self.legs >= MAX_LEGS {
            let scheme = self.scheme().unwrap_or(Scheme::Basic);
            return Err(AuthError::Loop(scheme));
        }
        match std::mem::replace(&mut self.state, State::Fresh) {
            State::Ntlm(exchange) => {
                // The CHALLENGE comes as the NTLM token.
                let Some(token) = find(Scheme::Ntlm).and_then(|c| c.token.as_deref()) else {
                    return Err(AuthError::Rejected(Scheme::Ntlm));
                };
                let challenge = base64::engine::general_purpose::STANDARD
                    .decode(token)
                    .map_err(|_| {
                        AuthError::Malformed(Scheme::Ntlm, "challenge is not base64".to_owned())
                    })?;
                let credentials = self
                    .auth
                    .credentials
                    .as_ref()
                    .ok_or(AuthError::Rejected(Scheme::Ntlm))?;
                let message = exchange
                    .authenticate(&challenge, &credentials.ntlm(), &workstation())
                    .map_err(|err| AuthError::Malformed(Scheme::Ntlm, err.to_string()))?;
                self.state = State::NtlmDone;
                self.legs += 1;
                return Ok(format!(
                    "NTLM {}",
                    base64::engine::general_purpose::STANDARD.encode(message)
                ));
            }
            State::NtlmDone => return Err(AuthError::Rejected(Scheme::Ntlm)),
            #[cfg(feature = "gssapi")]
            State::Negotiate(context) => {
                let token = find(Scheme::Negotiate).and_then(|c| c.token.as_deref());
                let Some(token) = token else {
                    return Err(AuthError::Rejected(Scheme::Negotiate));
                };
                let (context, next) = context.step(token).await?;
                self.state = State::Negotiate(context);
                self.legs += 1;
                return Ok(format!("Negotiate {next}"));
            }
            State::Sent(Scheme::Digest) => {
                // Asked again: a stale nonce gets one more try with the new one.
                let stale = find(Scheme::Digest)
                    .and_then(|c| c.param("stale"))
                    .is_some_and(|s| s.eq_ignore_ascii_case("true"));
                if !stale {
                    return Err(AuthError::Rejected(Scheme::Digest));
                }
            }
            State::Sent(scheme) => return Err(AuthError::Rejected(scheme)),
            State::Fresh => {}
        }
        // Choose: the forced scheme, or the strongest offered that has credentials.
        let scheme = match self.auth.forced {
            Some(wanted) => {
                if find(wanted).is_none() {
                    return Err(AuthError::NotOffered { wanted, offered });
                }
                wanted
            }
            None => {
                let mut usable = self.auth.usable();
                // With a password only, Negotiate (NTLM inside SPNEGO) comes after the rest.
                if self.auth.credentials.is_some() && !usable.contains(&Scheme::Negotiate) {
                    usable.push(Scheme::Negotiate);
                }
                usable
                    .into_iter()
                    .find(|scheme| find(*scheme).is_some())
                    .ok_or(AuthError::NoCredentials { offered })?
            }
        };
        let new_digest = find(Scheme::Digest).map(|c| c.text.clone());
        let header =
            self.start(scheme, new_digest.as_deref())
                .await?
                .ok_or(AuthError::NoCredentials {
                    offered: challenges.iter().map(ToString::to_string).collect(),
                })?;
        self.auth.learn(scheme);
        Ok(header)
    }
}

/// The workstation name NTLM sends: this host's name.
fn workstation() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .map(|name| name.split('.').next().unwrap_or("").to_uppercase())
        .unwrap_or_default()
}

/// The challenges of `Proxy-Authenticate` values. Public for the fuzz target.
pub fn challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    challenge::parse_all(values)
}
