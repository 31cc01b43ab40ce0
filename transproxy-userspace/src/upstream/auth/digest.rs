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
    use md5::{Digest as _, Md5};

    use super::*;

    const MD5_CHALLENGE: &str = r#"Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=MD5, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS""#;

    fn md5_hex(text: &str) -> String {
        Md5::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// A parameter's value in a header we wrote (quoted or not).
    fn param<'a>(header: &'a str, name: &str) -> &'a str {
        let start = header
            .find(&format!(" {name}="))
            .or_else(|| header.find(&format!(",{name}=")))
            .map(|i| i + name.len() + 2)
            .unwrap_or_else(|| panic!("no {name} in {header}"));
        let rest = header[start..].trim_start_matches('"');
        let end = rest.find(['"', ',']).unwrap_or(rest.len());
        &rest[..end]
    }

    /// RFC 7616 §3.9.1's known answers, MD5 and SHA-256, through the challenge parser and the
    /// crate's response.
    #[test]
    fn rfc_7616_known_answers() {
        for (algorithm, expected) in [
            ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
            (
                "SHA-256",
                "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            ),
        ] {
            let challenge =
                MD5_CHALLENGE.replace("algorithm=MD5", &format!("algorithm={algorithm}"));
            let mut prompt = read(&challenge).unwrap();
            let mut context = AuthContext::new_with_method(
                "Mufasa",
                "Circle of Life",
                "/dir/index.html",
                Option::<&[u8]>::None,
                HttpMethod::GET,
            );
            context.set_custom_cnonce("f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ");
            let header = prompt.respond(&context).unwrap().to_header_string();
            assert_eq!(
                param(&header, "response"),
                expected,
                "{algorithm}: {header}"
            );
        }
    }

    /// Our CONNECT answers: the response is RFC 7616's formula over CONNECT and the target,
    /// recomputed here from the parts the header carries, and each use counts the nonce.
    #[test]
    fn answers_connect_with_the_nonce_counted() {
        let mut prompt = read(MD5_CHALLENGE).unwrap();
        let credentials = Credentials::new("Mufasa".into(), "Circle of Life".into());
        let first = answer(&mut prompt, &credentials, "origin.test:443").unwrap();
        assert!(first.starts_with("Digest username=\"Mufasa\""), "{first}");
        assert_eq!(param(&first, "uri"), "origin.test:443");
        assert_eq!(param(&first, "nc"), "00000001");
        assert_eq!(param(&first, "qop"), "auth");
        let ha1 = md5_hex("Mufasa:http-auth@example.org:Circle of Life");
        let ha2 = md5_hex("CONNECT:origin.test:443");
        let expected = md5_hex(&format!(
            "{ha1}:7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v:00000001:{}:auth:{ha2}",
            param(&first, "cnonce")
        ));
        assert_eq!(param(&first, "response"), expected, "{first}");
        let second = answer(&mut prompt, &credentials, "origin.test:443").unwrap();
        assert_eq!(param(&second, "nc"), "00000002");
        assert!(read("Digest nonce=\"no realm\"").is_err());
    }
}
