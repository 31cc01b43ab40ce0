//! NTLM (MS-NLMP): the three messages of the `NTLM` proxy scheme, NTLMv2 only (never LM or
//! NTLMv1), with the MIC current Windows proxies expect.
//!
//! The messages are built here over RustCrypto's MD4, MD5 and HMAC (kept crates), and checked
//! against MS-NLMP §4.2.4's known-answer vectors. The one kept crate that speaks NTLM whole,
//! Devolutions' `sspi`, brings some 400 crates (RSA, X.509, a Kerberos client) for these few
//! hundred lines; the format is small and fully specified.

use hmac::{Hmac, Mac as _};
use md4::{Digest as _, Md4};
use md5::Md5;

/// `NTLMSSP\0`.
const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";

// Negotiate flags (MS-NLMP §2.2.2.5).
const NEGOTIATE_UNICODE: u32 = 0x0000_0001;
const REQUEST_TARGET: u32 = 0x0000_0004;
const NEGOTIATE_NTLM: u32 = 0x0000_0200;
const NEGOTIATE_ALWAYS_SIGN: u32 = 0x0000_8000;
const NEGOTIATE_EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
const NEGOTIATE_TARGET_INFO: u32 = 0x0080_0000;
const NEGOTIATE_VERSION: u32 = 0x0200_0000;
const NEGOTIATE_128: u32 = 0x2000_0000;
const NEGOTIATE_56: u32 = 0x8000_0000;

/// What this client asks for: Unicode, NTLM with extended session security (NTLMv2), the
/// server's target information. No signing or sealing: the tunnel is not NTLM's to protect.
const FLAGS: u32 = NEGOTIATE_UNICODE
    | REQUEST_TARGET
    | NEGOTIATE_NTLM
    | NEGOTIATE_ALWAYS_SIGN
    | NEGOTIATE_EXTENDED_SESSIONSECURITY
    | NEGOTIATE_TARGET_INFO
    | NEGOTIATE_VERSION
    | NEGOTIATE_128
    | NEGOTIATE_56;

// AV pair ids (§2.2.2.1).
const AV_EOL: u16 = 0;
const AV_FLAGS: u16 = 6;
const AV_TIMESTAMP: u16 = 7;
/// MsvAvFlags bit: the AUTHENTICATE message carries a MIC.
const AV_FLAG_MIC: u32 = 0x2;

/// Windows 10 version bytes, sent as every current client does (informational only).
const VERSION: [u8; 8] = [10, 0, 0x61, 0x4a, 0, 0, 0, 15];

type HmacMd5 = Hmac<Md5>;

/// Why an NTLM challenge cannot be answered.
#[derive(Debug, PartialEq, Eq)]
pub enum NtlmError {
    /// Not a CHALLENGE message, or one whose fields point outside it.
    Malformed(&'static str),
}

impl std::fmt::Display for NtlmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(what) => write!(f, "malformed NTLM challenge: {what}"),
        }
    }
}

/// A user's NTLM identity: the password is kept only as its NT hash.
#[derive(Clone)]
pub struct NtlmIdentity {
    user: String,
    domain: String,
    nt_hash: [u8; 16],
}

impl std::fmt::Debug for NtlmIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NtlmIdentity({}\\{})", self.domain, self.user)
    }
}

impl NtlmIdentity {
    pub fn new(user: &str, domain: &str, password: &str) -> Self {
        Self {
            user: user.to_owned(),
            domain: domain.to_owned(),
            nt_hash: Md4::digest(utf16(password)).into(),
        }
    }

    /// NTOWFv2: HMAC-MD5 keyed by the NT hash over the uppercased user and the domain.
    fn ntowf_v2(&self) -> [u8; 16] {
        let mut who = utf16(&self.user.to_uppercase());
        who.extend(utf16(&self.domain));
        hmac_md5(&self.nt_hash, &[&who])
    }
}

/// One NTLM exchange: the NEGOTIATE message sent, kept for the MIC.
pub struct NtlmExchange {
    negotiate: Vec<u8>,
}

impl NtlmExchange {
    /// Starts an exchange; its NEGOTIATE message goes in the first request.
    pub fn start() -> (Self, Vec<u8>) {
        let mut message = Vec::with_capacity(40);
        message.extend_from_slice(SIGNATURE);
        message.extend_from_slice(&1u32.to_le_bytes());
        message.extend_from_slice(&FLAGS.to_le_bytes());
        // Empty domain and workstation fields (length, capacity, offset).
        message.extend_from_slice(&[0; 16]);
        message.extend_from_slice(&VERSION);
        (
            Self {
                negotiate: message.clone(),
            },
            message,
        )
    }

    /// The AUTHENTICATE message answering `challenge` for `identity`.
    pub fn authenticate(
        &self,
        challenge: &[u8],
        identity: &NtlmIdentity,
        workstation: &str,
    ) -> Result<Vec<u8>, NtlmError> {
        let parsed = Challenge::parse(challenge)?;
        let mut client_challenge = [0u8; 8];
        getrandom::fill(&mut client_challenge)
            .map_err(|_| NtlmError::Malformed("no randomness for the client challenge"))?;
        Ok(authenticate_message(
            &self.negotiate,
            challenge,
            &parsed,
            identity,
            workstation,
            client_challenge,
            now_filetime(),
        ))
    }
}

/// The fields of a CHALLENGE message this client uses.
#[derive(Debug)]
struct Challenge {
    server_challenge: [u8; 8],
    flags: u32,
    target_info: Vec<u8>,
}

impl Challenge {
    fn parse(message: &[u8]) -> Result<Self, NtlmError> {
        // Signature, type, target name, flags, server challenge: 32 bytes.
        if message.len() < 32 || &message[..8] != SIGNATURE {
            return Err(NtlmError::Malformed("no NTLMSSP signature"));
        }
        if le32(message, 8) != 2 {
            return Err(NtlmError::Malformed("not a CHALLENGE message"));
        }
        let flags = le32(message, 20);
        let mut server_challenge = [0u8; 8];
        server_challenge.copy_from_slice(&message[24..32]);
        // Target information when the flag says so and it lies inside the message; older
        // servers (squid's ntlm_fake_auth among them) send a shorter message or leave those
        // bytes as garbage: then an empty list, and no MIC (it needs the server's timestamp).
        let target_info = (flags & NEGOTIATE_TARGET_INFO != 0 && message.len() >= 48)
            .then(|| {
                let len = usize::from(le16(message, 40));
                let offset = le32(message, 44) as usize;
                message.get(offset..offset.saturating_add(len))
            })
            .flatten()
            .filter(|info| av_pairs(info).is_ok())
            .map_or_else(|| vec![0; 4], <[u8]>::to_vec);
        Ok(Self {
            server_challenge,
            flags,
            target_info,
        })
    }
}

/// The AV pairs of target information, without the terminating MsvAvEOL.
fn av_pairs(info: &[u8]) -> Result<Vec<(u16, &[u8])>, NtlmError> {
    let mut pairs = Vec::new();
    let mut rest = info;
    loop {
        if rest.len() < 4 {
            // Target information without MsvAvEOL: tolerated, as Windows does.
            return Ok(pairs);
        }
        let id = u16::from_le_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]]));
        if id == AV_EOL {
            return Ok(pairs);
        }
        let value = rest.get(4..4 + len).ok_or(NtlmError::Malformed(
            "an AV pair runs past the target information",
        ))?;
        pairs.push((id, value));
        rest = &rest[4 + len..];
        if pairs.len() > 64 {
            return Err(NtlmError::Malformed("too many AV pairs"));
        }
    }
}

/// The NTLMv2 response's `temp` blob (§3.3.2): version, time, client challenge, target info.
fn temp_blob(time: u64, client_challenge: [u8; 8], target_info: &[u8]) -> Vec<u8> {
    let mut temp = vec![1, 1, 0, 0, 0, 0, 0, 0];
    temp.extend_from_slice(&time.to_le_bytes());
    temp.extend_from_slice(&client_challenge);
    temp.extend_from_slice(&[0; 4]);
    temp.extend_from_slice(target_info);
    temp.extend_from_slice(&[0; 4]);
    temp
}

/// NTProofStr and the session base key for `temp` (§3.3.2).
fn nt_proof(
    response_key: &[u8; 16],
    server_challenge: &[u8; 8],
    temp: &[u8],
) -> ([u8; 16], [u8; 16]) {
    let proof = hmac_md5(response_key, &[server_challenge, temp]);
    let session_key = hmac_md5(response_key, &[&proof]);
    (proof, session_key)
}

/// The AUTHENTICATE message (§2.2.1.3), with the MIC when the server sent a timestamp.
fn authenticate_message(
    negotiate: &[u8],
    challenge_message: &[u8],
    challenge: &Challenge,
    identity: &NtlmIdentity,
    workstation: &str,
    client_challenge: [u8; 8],
    now: u64,
) -> Vec<u8> {
    let response_key = identity.ntowf_v2();
    let pairs = av_pairs(&challenge.target_info).unwrap_or_default();
    let server_time = pairs
        .iter()
        .find(|(id, value)| *id == AV_TIMESTAMP && value.len() == 8)
        .map(|(_, value)| u64::from_le_bytes(value[..8].try_into().unwrap_or([0; 8])));
    // With the server's timestamp, the MIC is due: say so in MsvAvFlags, and send no LMv2.
    let with_mic = server_time.is_some();
    let target_info = if with_mic {
        let mut info = Vec::new();
        let mut flags = AV_FLAG_MIC;
        for (id, value) in &pairs {
            if *id == AV_FLAGS && value.len() == 4 {
                flags |= u32::from_le_bytes(value[..4].try_into().unwrap_or([0; 4]));
                continue;
            }
            push_av(&mut info, *id, value);
        }
        push_av(&mut info, AV_FLAGS, &flags.to_le_bytes());
        push_av(&mut info, AV_EOL, &[]);
        info
    } else {
        challenge.target_info.clone()
    };
    let time = server_time.unwrap_or(now);
    let temp = temp_blob(time, client_challenge, &target_info);
    let (proof, session_key) = nt_proof(&response_key, &challenge.server_challenge, &temp);
    let mut nt_response = proof.to_vec();
    nt_response.extend_from_slice(&temp);
    let lm_response = if with_mic {
        vec![0; 24]
    } else {
        let mut lm = hmac_md5(
            &response_key,
            &[&challenge.server_challenge, &client_challenge],
        )
        .to_vec();
        lm.extend_from_slice(&client_challenge);
        lm
    };

    let flags = FLAGS & (challenge.flags | NEGOTIATE_VERSION);
    let domain = utf16(&identity.domain);
    let user = utf16(&identity.user);
    let host = utf16(workstation);
    // Header 64 + version 8 + MIC 16, then the payload.
    let payload_start = 88u32;
    let fields: [&[u8]; 6] = [&lm_response, &nt_response, &domain, &user, &host, &[]];
    let mut message =
        Vec::with_capacity(payload_start as usize + fields.iter().map(|f| f.len()).sum::<usize>());
    message.extend_from_slice(SIGNATURE);
    message.extend_from_slice(&3u32.to_le_bytes());
    let mut offset = payload_start;
    for field in fields {
        let len = field.len() as u16;
        message.extend_from_slice(&len.to_le_bytes());
        message.extend_from_slice(&len.to_le_bytes());
        message.extend_from_slice(&offset.to_le_bytes());
        offset += u32::from(len);
    }
    message.extend_from_slice(&flags.to_le_bytes());
    message.extend_from_slice(&VERSION);
    let mic_at = message.len();
    message.extend_from_slice(&[0; 16]);
    for field in fields {
        message.extend_from_slice(field);
    }
    if with_mic {
        // No key exchange: the exported session key is the session base key (§3.2.5.1.2).
        let mic = hmac_md5(&session_key, &[negotiate, challenge_message, &message]);
        message[mic_at..mic_at + 16].copy_from_slice(&mic);
    }
    message
}

fn push_av(info: &mut Vec<u8>, id: u16, value: &[u8]) {
    info.extend_from_slice(&id.to_le_bytes());
    info.extend_from_slice(&(value.len() as u16).to_le_bytes());
    info.extend_from_slice(value);
}

fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    // An HMAC key may have any length: `new_from_slice` cannot fail for it.
    let mut mac = HmacMd5::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn utf16(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Now as a FILETIME: 100 ns ticks since 1601.
fn now_filetime() -> u64 {
    const UNIX_EPOCH_AS_FILETIME: u64 = 116_444_736_000_000_000;
    let since_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    UNIX_EPOCH_AS_FILETIME + (since_unix.as_nanos() / 100) as u64
}

/// Answers `challenge` (the bytes of a CHALLENGE message) with fixed inputs. For the fuzz
/// target: never panics.
pub fn check_challenge(challenge: &[u8]) {
    let identity = NtlmIdentity::new("User", "Domain", "Password");
    let (exchange, _) = NtlmExchange::start();
    if let Ok(parsed) = Challenge::parse(challenge) {
        let _ = authenticate_message(
            &exchange.negotiate,
            challenge,
            &parsed,
            &identity,
            "WS",
            [0xaa; 8],
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// MS-NLMP §4.2.4: user "User", domain "Domain", password "Password", server challenge
    /// 0123456789abcdef, client challenge aa..., time 0, target info NbDomainName "Domain"
    /// and NbComputerName "Server".
    const TARGET_INFO: &str =
        "02000c0044006f006d00610069006e0001000c0053006500720076006500720000000000";

    #[test]
    fn ntlmv2_matches_the_ms_nlmp_known_answers() {
        let identity = NtlmIdentity::new("User", "Domain", "Password");
        assert_eq!(hex(&identity.nt_hash), "a4f49c406510bdcab6824ee7c30fd852");
        let key = identity.ntowf_v2();
        assert_eq!(hex(&key), "0c868a403bfd7a93a3001ef22ef02e3f");
        let server: [u8; 8] = unhex("0123456789abcdef").try_into().unwrap();
        let temp = temp_blob(0, [0xaa; 8], &unhex(TARGET_INFO));
        assert_eq!(
            hex(&temp),
            format!(
                "01010000000000000000000000000000aaaaaaaaaaaaaaaa00000000{TARGET_INFO}00000000"
            )
        );
        let (proof, session_key) = nt_proof(&key, &server, &temp);
        assert_eq!(hex(&proof), "68cd0ab851e51c96aabc927bebef6a1c");
        assert_eq!(hex(&session_key), "8de40ccadbc14a82f15cb0ad0de95ca3");
    }

    /// A CHALLENGE message with `info` as target information.
    fn challenge_message(info: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(SIGNATURE);
        m.extend_from_slice(&2u32.to_le_bytes());
        m.extend_from_slice(&[0; 8]); // target name: empty
        m.extend_from_slice(&(FLAGS | NEGOTIATE_TARGET_INFO).to_le_bytes());
        m.extend_from_slice(&unhex("0123456789abcdef"));
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&(info.len() as u16).to_le_bytes());
        m.extend_from_slice(&(info.len() as u16).to_le_bytes());
        m.extend_from_slice(&56u32.to_le_bytes());
        m.extend_from_slice(&VERSION);
        m.extend_from_slice(info);
        m
    }

    #[test]
    fn the_authenticate_message_carries_the_known_answers() {
        let identity = NtlmIdentity::new("User", "Domain", "Password");
        let (exchange, negotiate) = NtlmExchange::start();
        assert_eq!(&negotiate[..8], SIGNATURE);
        let message = challenge_message(&unhex(TARGET_INFO));
        let parsed = Challenge::parse(&message).unwrap();
        let auth = authenticate_message(
            &exchange.negotiate,
            &message,
            &parsed,
            &identity,
            "WS",
            [0xaa; 8],
            0,
        );
        let field = |at: usize| {
            let len = usize::from(le16(&auth, at));
            let offset = le32(&auth, at + 4) as usize;
            auth[offset..offset + len].to_vec()
        };
        // No server timestamp: LMv2 and no MIC, as §4.2.4 shows.
        assert_eq!(
            hex(&field(12)),
            "86c35097ac9cec102554764a57cccc19aaaaaaaaaaaaaaaa"
        );
        assert_eq!(hex(&field(20)[..16]), "68cd0ab851e51c96aabc927bebef6a1c");
        assert_eq!(field(36), utf16("User"));
        assert_eq!(&auth[72..88], &[0; 16]);
    }

    #[test]
    fn a_server_timestamp_brings_the_mic() {
        let identity = NtlmIdentity::new("User", "Domain", "Password");
        let (exchange, _) = NtlmExchange::start();
        let mut info = unhex(&TARGET_INFO[..TARGET_INFO.len() - 8]);
        push_av(&mut info, AV_TIMESTAMP, &7u64.to_le_bytes());
        push_av(&mut info, AV_EOL, &[]);
        let message = challenge_message(&info);
        let auth = exchange.authenticate(&message, &identity, "WS").unwrap();
        let lm_offset = le32(&auth, 16) as usize;
        assert_eq!(&auth[lm_offset..lm_offset + 24], &[0; 24]);
        assert_ne!(&auth[72..88], &[0; 16]);
        // MsvAvFlags with the MIC bit is in the echoed target info.
        let nt_offset = le32(&auth, 24) as usize;
        let nt_len = usize::from(le16(&auth, 20));
        let temp = &auth[nt_offset + 16..nt_offset + nt_len];
        let echoed = &temp[28..temp.len() - 4];
        let pairs = av_pairs(echoed).unwrap();
        assert!(pairs.contains(&(AV_FLAGS, &AV_FLAG_MIC.to_le_bytes()[..])));
        assert!(pairs.iter().any(|(id, _)| *id == AV_TIMESTAMP));
    }

    #[test]
    fn malformed_challenges_are_errors() {
        assert!(Challenge::parse(b"NTLMSSP\0").is_err());
        let mut message = challenge_message(&unhex(TARGET_INFO));
        message[8] = 3;
        assert!(Challenge::parse(&message).is_err());
        // Target information outside the message, or not AV pairs: none is used.
        let mut message = challenge_message(&unhex(TARGET_INFO));
        message[44] = 200;
        assert_eq!(Challenge::parse(&message).unwrap().target_info, [0; 4]);
        let bad = Challenge::parse(&challenge_message(&unhex("0200ff00"))).unwrap();
        assert_eq!(bad.target_info, [0; 4]);
        // squid's ntlm_fake_auth: 49 bytes, garbage where the target information would be.
        let fake = base64::engine::general_purpose::STANDARD
            .decode("TlRMTVNTUAACAAAACQAJAK6qqqoGgggAQToT9t68xvQAAAAAAAA6AFdPUktHUk9VUA==")
            .unwrap();
        assert_eq!(Challenge::parse(&fake).unwrap().target_info, [0; 4]);
    }
}
