//! Keeps the proxy's password out of `/proc/PID/cmdline`, which every user can read.
//!
//! The kernel shows a process's arguments from its own memory, so once the command line is
//! parsed, the credentials in `--proxy URL` are overwritten there, as database clients do with
//! their passwords: `ps` then shows `http://***@host:port`. What remains visible is the moment
//! between the start and this overwrite (milliseconds); `--proxy-auth-file` or
//! `--proxy-auth-env` never put the password on the command line at all.

use std::ops::Range;

/// Masks the credentials of every `--proxy` value in this process's argument area. Returns
/// whether anything was masked.
pub fn mask_proxy_credentials() -> bool {
    let Some(area) = argument_area() else {
        return false;
    };
    // SAFETY: the kernel reports [arg_start, arg_end) as this process's argument strings, in
    // its initial stack, mapped writable for the life of the process. Nothing else refers to
    // it as Rust data: std copies arguments out when asked for them.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(area.start as *mut u8, area.end - area.start) };
    mask_in(bytes)
}

/// Masks the credentials in the NUL-separated arguments `bytes`; each keeps its length, padded
/// with NULs.
fn mask_in(bytes: &mut [u8]) -> bool {
    let mut masked = false;
    let mut value_next = false;
    let mut start = 0;
    while start < bytes.len() {
        let end = bytes[start..]
            .iter()
            .position(|&b| b == 0)
            .map_or(bytes.len(), |i| start + i);
        let arg = &mut bytes[start..end];
        if value_next {
            masked |= mask_url(arg);
            value_next = false;
        } else if arg == b"--proxy" {
            value_next = true;
        } else if let Some(value) = arg.strip_prefix(b"--proxy=") {
            let offset = arg.len() - value.len();
            masked |= mask_url(&mut arg[offset..]);
        } else if arg == b"--" {
            // The command of `exec` and its arguments are not ours.
            break;
        }
        start = end + 1;
    }
    masked
}

/// Replaces `user:password@` in a proxy URL by `***@` (fewer stars when shorter), moving the
/// rest left and padding with NULs. Returns whether there were credentials.
fn mask_url(url: &mut [u8]) -> bool {
    let authority_start = find(url, b"://").map_or(0, |i| i + 3);
    let authority_end = url[authority_start..]
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .map_or(url.len(), |i| authority_start + i);
    let Some(at) = url[authority_start..authority_end]
        .iter()
        .rposition(|&b| b == b'@')
        .map(|i| authority_start + i)
    else {
        return false;
    };
    let stars = (at - authority_start).min(3);
    let rest: Vec<u8> = url[at..].to_vec();
    let mut out = Vec::with_capacity(url.len());
    out.extend_from_slice(&url[..authority_start]);
    out.resize(authority_start + stars, b'*');
    out.extend_from_slice(&rest);
    out.resize(url.len(), 0);
    url.copy_from_slice(&out);
    true
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `arg_start..arg_end` from `/proc/self/stat` (fields 48 and 49).
fn argument_area() -> Option<Range<usize>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain anything; the
    // first of them is field 3.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let start = fields.get(48 - 3)?.parse().ok()?;
    let end = fields.get(49 - 3)?.parse().ok()?;
    (start < end).then_some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(args: &[&str]) -> (bool, Vec<String>) {
        let mut bytes = args.join("\0").into_bytes();
        let len = bytes.len();
        let changed = mask_in(&mut bytes);
        assert_eq!(bytes.len(), len);
        let shown = String::from_utf8(bytes)
            .unwrap()
            .split('\0')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect();
        (changed, shown)
    }

    #[test]
    fn credentials_in_proxy_urls_are_masked_in_place() {
        let (changed, shown) = masked(&[
            "transproxy",
            "run",
            "--proxy",
            "http://alice:s3cret@127.0.0.1:3128/",
            "--listen",
            "127.0.0.1:0",
        ]);
        assert!(changed);
        assert_eq!(
            shown,
            [
                "transproxy",
                "run",
                "--proxy",
                "http://***@127.0.0.1:3128/",
                "--listen",
                "127.0.0.1:0"
            ]
        );
        let (_, shown) = masked(&[
            "transproxy",
            "exec",
            "--proxy=a@127.0.0.1:3128",
            "--",
            "curl",
            "--proxy",
            "http://u:p@x",
        ]);
        assert_eq!(
            shown,
            [
                "transproxy",
                "exec",
                "--proxy=*@127.0.0.1:3128",
                "--",
                "curl",
                "--proxy",
                "http://u:p@x"
            ]
        );
        let (changed, _) = masked(&["transproxy", "run", "--proxy", "http://127.0.0.1:3128"]);
        assert!(!changed);
    }

    #[test]
    fn this_process_has_an_argument_area() {
        let area = argument_area().expect("arg_start and arg_end in /proc/self/stat");
        assert!(area.end > area.start);
    }
}
