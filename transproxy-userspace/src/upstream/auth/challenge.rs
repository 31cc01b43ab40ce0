//! `Proxy-Authenticate` challenges (RFC 9110 §11.6.1): the scheme, then either one token68
//! (`NTLM TlRMTVNT...`, `Negotiate YII...`) or comma-separated parameters
//! (`Digest realm="x", nonce="y"`). One header may carry several challenges; a proxy may send
//! several headers. No kept crate parses these for proxies (the HTTP crates leave
//! authentication to their users), so this is a small parser of its own, fuzzed.

use std::fmt;

/// Most challenges read from one reply: proxies offer two or three.
const MAX_CHALLENGES: usize = 16;

/// Most parameters read from one challenge.
const MAX_PARAMS: usize = 32;

/// One challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme, as the proxy wrote it (`Digest`, `NTLM`); compare with
    /// [`Challenge::is`].
    pub scheme: String,
    /// The token68 after the scheme, if any (NTLM's and Negotiate's handshake messages).
    pub token: Option<String>,
    /// The parameters, names lowercased, values unquoted.
    pub params: Vec<(String, String)>,
    /// The challenge as sent, from its scheme to its last parameter (what Digest parses).
    pub text: String,
}

impl Challenge {
    /// Whether this challenge is of `scheme` (case-insensitive, as schemes are).
    pub fn is(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }

    /// The value of parameter `name` (lowercase).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// For log lines: the scheme alone (tokens and nonces are noise, and may be long).
impl fmt::Display for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.scheme.escape_default().to_string())
    }
}

/// The challenges of every `Proxy-Authenticate` value in `values`, in order. Malformed parts
/// are skipped: a proxy that sends nonsense gets no answer to it, never a panic.
pub fn parse_all<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    let mut challenges = Vec::new();
    for value in values {
        for challenge in parse(value) {
            if challenges.len() == MAX_CHALLENGES {
                return challenges;
            }
            challenges.push(challenge);
        }
    }
    challenges
}

/// The challenges in one header value.
pub fn parse(value: &str) -> Vec<Challenge> {
    let mut challenges: Vec<Challenge> = Vec::new();
    let mut rest = value.trim_start_matches([' ', '\t', ',']);
    while !rest.is_empty() && challenges.len() < MAX_CHALLENGES {
        let start = rest;
        let (scheme, after) = take_token(rest);
        if scheme.is_empty() {
            // Not a token where a scheme must be: skip to the next comma.
            rest = skip_element(rest);
            continue;
        }
        let mut challenge = Challenge {
            scheme: scheme.to_owned(),
            token: None,
            params: Vec::new(),
            text: String::new(),
        };
        rest = after.trim_start_matches([' ', '\t']);
        if is_param_start(rest) {
            // Parameters, until one that is not `name=value` (the next challenge's scheme).
            loop {
                rest = rest.trim_start_matches([' ', '\t', ',']);
                if !is_param_start(rest) {
                    break;
                }
                let (name, after_name) = take_token(rest);
                let after_eq = after_name.trim_start_matches([' ', '\t']);
                let after_eq = after_eq.strip_prefix('=').unwrap_or(after_eq);
                let after_eq = after_eq.trim_start_matches([' ', '\t']);
                let (value, after_value) = if let Some(quoted) = after_eq.strip_prefix('"') {
                    take_quoted(quoted)
                } else {
                    let (token, after) = take_token(after_eq);
                    (token.to_owned(), after)
                };
                if challenge.params.len() < MAX_PARAMS {
                    challenge.params.push((name.to_ascii_lowercase(), value));
                }
                rest = after_value;
            }
        } else if !rest.is_empty() && !rest.starts_with(',') {
            // token68: its characters, then `=` padding, then the end or a comma.
            let body = rest.find(|c: char| !is_token68(c)).unwrap_or(rest.len());
            let padded = rest[body..].trim_start_matches('=');
            let end = rest.len() - padded.len();
            let after_token = padded.trim_start_matches([' ', '\t']);
            if body > 0 && (after_token.is_empty() || after_token.starts_with(',')) {
                challenge.token = Some(rest[..end].to_owned());
                rest = after_token;
            } else {
                // Neither: this challenge is malformed; skip to the next element.
                rest = skip_element(rest);
                continue;
            }
        }
        let consumed = start.len() - rest.len();
        challenge.text = start[..consumed]
            .trim_end_matches([' ', '\t', ','])
            .to_owned();
        challenges.push(challenge);
        rest = rest.trim_start_matches([' ', '\t', ',']);
    }
    challenges
}

/// Whether `text` starts with `name=` (a parameter, not a scheme or a token68).
fn is_param_start(text: &str) -> bool {
    let (name, after) = take_token(text);
    !name.is_empty()
        && after
            .trim_start_matches([' ', '\t'])
            .strip_prefix('=')
            .is_some_and(|value| !value.starts_with('=') && !value.trim_start().is_empty())
}

/// RFC 9110 tchar.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// RFC 9110 token68 characters, before the `=` padding.
fn is_token68(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~+/".contains(c)
}

/// The leading token of `text` and what follows it.
fn take_token(text: &str) -> (&str, &str) {
    let end = text.find(|c: char| !is_tchar(c)).unwrap_or(text.len());
    text.split_at(end)
}

/// A quoted string's content (after its opening quote), unescaped, and what follows its
/// closing quote (the rest, if it never closes).
fn take_quoted(text: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (value, &text[i + 1..]),
            '\\' => {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            }
            c => value.push(c),
        }
    }
    (value, "")
}

/// `text` after its first comma (or nothing).
fn skip_element(text: &str) -> &str {
    text.split_once(',').map_or("", |(_, rest)| rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_tokens_and_parameters() {
        let all = parse_all([
            "Negotiate",
            "NTLM TlRMTVNTUAACAAAA==",
            r#"Digest realm="spike", nonce="a\"b", qop="auth,auth-int", algorithm=MD5, stale=FALSE"#,
            r#"Basic realm="transproxy test""#,
        ]);
        let schemes: Vec<&str> = all.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(schemes, ["Negotiate", "NTLM", "Digest", "Basic"]);
        assert_eq!(all[0].token, None);
        assert_eq!(all[1].token.as_deref(), Some("TlRMTVNTUAACAAAA=="));
        let digest = &all[2];
        assert_eq!(digest.param("nonce"), Some("a\"b"));
        assert_eq!(digest.param("qop"), Some("auth,auth-int"));
        assert_eq!(digest.param("algorithm"), Some("MD5"));
        assert!(digest.text.starts_with("Digest realm=") && digest.text.ends_with("stale=FALSE"));
        assert_eq!(all[3].param("realm"), Some("transproxy test"));
    }

    #[test]
    fn several_challenges_in_one_header() {
        let all = parse(r#"Basic realm="a", Digest realm="b", nonce="n", NTLM, Negotiate YII="#);
        let schemes: Vec<&str> = all.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(schemes, ["Basic", "Digest", "NTLM", "Negotiate"]);
        assert_eq!(all[1].param("nonce"), Some("n"));
        assert_eq!(all[3].token.as_deref(), Some("YII="));
    }

    #[test]
    fn nonsense_is_skipped_not_fatal() {
        for value in [
            "",
            ",,,",
            "\"quoted\"",
            "Digest realm=\"never closed",
            "= = =",
            "NTLM ====",
            "\u{1F600} x",
        ] {
            let _ = parse(value);
        }
        assert_eq!(
            parse("Digest realm=\"never closed")[0].param("realm"),
            Some("never closed")
        );
    }
}
