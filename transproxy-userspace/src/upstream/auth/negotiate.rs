//! Negotiate (RFC 4559): SPNEGO through the system's GSSAPI (MIT krb5's libgssapi_krb5, with
//! the `libgssapi` bindings), so Kerberos works as `kinit` left it: the credentials cache named
//! by `KRB5CCNAME` (or `--proxy-auth-ccache`), or a keytab (`--proxy-auth-keytab`, through
//! `KRB5_CLIENT_KTNAME`). The cache is read again for every tunnel, so a ticket renewed or
//! obtained by `kinit` while the daemon runs is used by the next tunnel, without a restart.
//!
//! With a password and no Kerberos, SPNEGO carries NTLM instead, through gss-ntlmssp (the
//! NTLMSSP mechanism for the system GSSAPI), when it is installed.
//!
//! GSSAPI calls block (the first one for a proxy asks the KDC for a service ticket): they run
//! on tokio's blocking pool, never on a tunnel worker.

use base64::Engine as _;
use libgssapi::{
    context::{ClientCtx, CtxFlags},
    credential::{Cred, CredUsage},
    name::Name,
    oid::{GSS_MECH_SPNEGO, GSS_NT_HOSTBASED_SERVICE, GSS_NT_USER_NAME, Oid, OidSet},
};

use super::{AuthError, Credentials};

/// The NTLMSSP mechanism (1.3.6.1.4.1.311.2.2.10), as gss-ntlmssp registers it.
static GSS_MECH_NTLMSSP: Oid<'static> =
    Oid::from_slice(b"\x2b\x06\x01\x04\x01\x82\x37\x02\x02\x0a");

/// One tunnel's SPNEGO context.
pub(super) struct Context {
    ctx: ClientCtx,
}

impl Context {
    /// Starts a context with the proxy `proxy_host` (its service principal is
    /// `HTTP/proxy_host`): from the Kerberos credentials cache, or, with `password`, NTLM
    /// inside SPNEGO. Returns the first token, base64.
    pub(super) async fn start(
        proxy_host: &str,
        password: Option<&Credentials>,
    ) -> Result<(Self, String), AuthError> {
        let target = format!("HTTP@{proxy_host}");
        let password = password.cloned();
        let with_password = password.is_some();
        blocking(move || {
            let name = Name::new(target.as_bytes(), Some(GSS_NT_HOSTBASED_SERVICE))
                .map_err(|err| gssapi_error("the proxy's service name", &err))?;
            let cred = match password {
                None => None,
                Some(credentials) => Some(ntlm_credentials(&credentials)?),
            };
            let mut ctx = ClientCtx::new(cred, name, CtxFlags::empty(), Some(GSS_MECH_SPNEGO));
            let token = ctx
                .step(None, None)
                .map_err(|err| {
                    if with_password {
                        AuthError::Gssapi(format!("NTLM inside SPNEGO: {err}"))
                    } else {
                        ticket_error(&target, &err)
                    }
                })?
                .ok_or_else(|| AuthError::Gssapi("SPNEGO produced no first token".to_owned()))?;
            let token = base64::engine::general_purpose::STANDARD.encode(&*token);
            Ok((Self { ctx }, token))
        })
        .await
    }

    /// The next token, answering the proxy's `token` (base64).
    pub(super) async fn step(self, token: &str) -> Result<(Self, String), AuthError> {
        let input = base64::engine::general_purpose::STANDARD
            .decode(token.trim())
            .map_err(|_| AuthError::Gssapi("the proxy's token is not base64".to_owned()))?;
        let mut context = self;
        blocking(move || {
            let next = context.ctx.step(Some(&input), None).map_err(|err| {
                AuthError::Gssapi(format!("the proxy's answer did not verify: {err}"))
            })?;
            let Some(next) = next else {
                return Err(AuthError::Gssapi(
                    "the context completed, but the proxy asked again".to_owned(),
                ));
            };
            let next = base64::engine::general_purpose::STANDARD.encode(&*next);
            Ok((context, next))
        })
        .await
    }
}

/// Credentials for NTLM inside SPNEGO: the user's, for the NTLMSSP mechanism, whose password
/// gss-ntlmssp reads from the memory file [`prepare`] made. (Handing it the password directly,
/// `gss_acquire_cred_with_password`, fails on OpenSSL 3, which keeps MD4 out of its default
/// provider.)
fn ntlm_credentials(credentials: &Credentials) -> Result<Cred, AuthError> {
    let user = Name::new(credentials.user.as_bytes(), Some(GSS_NT_USER_NAME))
        .map_err(|err| gssapi_error("the user name", &err))?;
    let mut mechs = OidSet::new();
    mechs
        .add(GSS_MECH_NTLMSSP)
        .map_err(|err| gssapi_error("a mechanism set", &err))?;
    Cred::acquire(Some(&user), None, CredUsage::Initiate, Some(&mechs))
    .map_err(|err| {
        AuthError::Gssapi(format!(
            "NTLM inside SPNEGO needs gss-ntlmssp (the NTLMSSP mechanism for the system GSSAPI): {err}"
        ))
    })
}

/// A missing, expired or unusable Kerberos ticket, said with the fix.
fn ticket_error(target: &str, err: &libgssapi::error::Error) -> AuthError {
    let ccache = std::env::var("KRB5CCNAME").unwrap_or_else(|_| "the default cache".to_owned());
    AuthError::Gssapi(format!(
        "no usable Kerberos ticket for {} in {ccache} ({err}); get one with kinit, or give --proxy-auth-keytab",
        target.replacen('@', "/", 1)
    ))
}

fn gssapi_error(what: &str, err: &libgssapi::error::Error) -> AuthError {
    AuthError::Gssapi(format!("{what}: {err}"))
}

/// Runs a GSSAPI call on the blocking pool.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, AuthError> + Send + 'static,
) -> Result<T, AuthError> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or_else(|_| Err(AuthError::Gssapi("the GSSAPI call failed".to_owned())))
}

/// Sets the environment the GSSAPI reads, once, at start: the Kerberos credentials cache
/// (`KRB5CCNAME`), the keytab to obtain tickets from (`KRB5_CLIENT_KTNAME`), and, for NTLM
/// inside SPNEGO, the user's password where gss-ntlmssp looks for it (`NTLM_USER_FILE`): a
/// memory file of this process's (never on disk), `DOMAIN:USER:PASSWORD`, readable through
/// /proc/self/fd only by this process and root. Returns the memory file, to keep open.
///
/// # Safety
///
/// Changes the environment: call it while the process has one thread.
pub(crate) unsafe fn prepare(
    ccache: Option<&str>,
    keytab: Option<&std::path::Path>,
    credentials: Option<&Credentials>,
) -> anyhow::Result<Option<std::os::fd::OwnedFd>> {
    use std::io::Write as _;

    if let Some(ccache) = ccache {
        // SAFETY: the caller guarantees one thread: nothing reads the environment meanwhile.
        unsafe { std::env::set_var("KRB5CCNAME", ccache) };
    }
    if let Some(keytab) = keytab {
        let keytab = format!("FILE:{}", keytab.display());
        // SAFETY: as above.
        unsafe { std::env::set_var("KRB5_CLIENT_KTNAME", keytab) };
    }
    let Some(credentials) = credentials else {
        return Ok(None);
    };
    let identity = credentials.ntlm_parts();
    let memfd = nix::sys::memfd::memfd_create(
        c"transproxy-ntlm-user",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )
    .map_err(|err| anyhow::anyhow!("cannot hold the NTLM credentials in memory: {err}"))?;
    let mut file = std::fs::File::from(memfd);
    writeln!(
        file,
        "{}:{}:{}",
        identity.1,
        identity.0,
        credentials.password()
    )?;
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    // SAFETY: as above.
    unsafe { std::env::set_var("NTLM_USER_FILE", path) };
    Ok(Some(file.into()))
}
