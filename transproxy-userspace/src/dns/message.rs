//! DNS messages as the responder reads and writes them, with hickory-proto (the Hickory DNS
//! project's wire format, kept and fuzzed upstream) rather than a parser of our own.
//!
//! Only queries are answered: a message that is not a query is dropped, one that cannot be
//! read but has a header gets FORMERR, one too short for a header is dropped. Nothing a client
//! sends can panic the daemon.

use std::net::IpAddr;

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata},
};

use crate::sniff::Name;

/// The size of a DNS header: shorter messages are not answered at all.
const HEADER_LEN: usize = 12;

/// The UDP payload size advertised in answers (RFC 9715's safe size).
const EDNS_PAYLOAD: u16 = 1232;

/// A query the responder will answer: exactly one question, opcode QUERY.
#[derive(Debug)]
pub(crate) struct Query {
    message: Message,
}

/// What became of a message that is not a [`Query`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotAQuery {
    /// Answer with these bytes (FORMERR, NOTIMP).
    Answer(Vec<u8>),
    /// Say nothing: not a DNS query at all, or an answer.
    Drop,
}

/// What a question asks for, as far as fake answers go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Asks {
    A,
    Aaaa,
    Other,
}

impl Query {
    /// Reads a query.
    pub(crate) fn read(bytes: &[u8]) -> Result<Self, NotAQuery> {
        if bytes.len() < HEADER_LEN {
            return Err(NotAQuery::Drop);
        }
        // Answers are never answered (two responders must not ping-pong).
        if bytes[2] & 0x80 != 0 {
            return Err(NotAQuery::Drop);
        }
        let id = u16::from_be_bytes([bytes[0], bytes[1]]);
        let Ok(message) = Message::from_vec(bytes) else {
            return Err(NotAQuery::Answer(error(
                id,
                OpCode::Query,
                ResponseCode::FormErr,
            )));
        };
        let op_code = message.metadata.op_code;
        if op_code != OpCode::Query {
            return Err(NotAQuery::Answer(error(id, op_code, ResponseCode::NotImp)));
        }
        if message.queries.len() != 1 {
            return Err(NotAQuery::Answer(error(id, op_code, ResponseCode::FormErr)));
        }
        Ok(Self { message })
    }

    /// The name asked about, when it is a host name.
    pub(crate) fn name(&self) -> Option<Name> {
        let query = self.message.queries.first()?;
        Name::parse(&query.name().to_ascii())
    }

    /// What the question asks for.
    pub(crate) fn asks(&self) -> Asks {
        let Some(query) = self.message.queries.first() else {
            return Asks::Other;
        };
        if query.query_class() != hickory_proto::rr::DNSClass::IN {
            return Asks::Other;
        }
        match query.query_type() {
            RecordType::A => Asks::A,
            RecordType::AAAA => Asks::Aaaa,
            _ => Asks::Other,
        }
    }

    /// The answer with `address` (none: the name exists, but has no address of that family),
    /// valid for `ttl` seconds.
    pub(crate) fn answer(&self, address: Option<IpAddr>, ttl: u32) -> Vec<u8> {
        let mut reply = self.reply(ResponseCode::NoError);
        if let (Some(query), Some(address)) = (self.message.queries.first(), address) {
            let data = match address {
                IpAddr::V4(ip) => RData::A(rdata::A(ip)),
                IpAddr::V6(ip) => RData::AAAA(rdata::AAAA(ip)),
            };
            reply.add_answer(Record::from_rdata(query.name().clone(), ttl, data));
        }
        encode(&reply).unwrap_or_else(|| error(self.id(), OpCode::Query, ResponseCode::ServFail))
    }

    /// An answer saying `code` (SERVFAIL, REFUSED).
    pub(crate) fn fail(&self, code: ResponseCode) -> Vec<u8> {
        encode(&self.reply(code)).unwrap_or_else(|| error(self.id(), OpCode::Query, code))
    }

    /// The query as it goes on to a resolver: encoded again from what was read, so that only a
    /// well-formed query leaves, never bytes a client appended.
    pub(crate) fn encode(&self) -> Option<Vec<u8>> {
        encode(&self.message)
    }

    /// Whether `answer` answers this query: a response with its id and its question.
    pub(crate) fn is_answered_by(&self, answer: &[u8]) -> bool {
        Message::from_vec(answer).is_ok_and(|answer| {
            answer.metadata.message_type == MessageType::Response
                && answer.metadata.id == self.id()
                && answer.queries == self.message.queries
        })
    }

    /// The query's id.
    pub(crate) fn id(&self) -> u16 {
        self.message.metadata.id
    }

    /// A reply to this query: its id, question and RD bit, RA set, and an OPT record if the
    /// query had one (RFC 6891 says a responder must then include one).
    fn reply(&self, code: ResponseCode) -> Message {
        let mut reply = Message::response(self.id(), OpCode::Query);
        reply.metadata.recursion_desired = self.message.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.metadata.response_code = code;
        reply.add_queries(self.message.queries.iter().cloned());
        if self.message.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            reply.set_edns(edns);
        }
        reply
    }
}

/// A bare error reply: the id, the opcode, `code`, no question.
fn error(id: u16, op_code: OpCode, code: ResponseCode) -> Vec<u8> {
    let mut reply = Message::new(id, MessageType::Response, op_code);
    reply.metadata.response_code = code;
    reply.metadata.recursion_available = true;
    encode(&reply).unwrap_or_else(|| {
        // The header alone, by hand: QR set, the opcode, RA, the rcode's low bits.
        let mut header = vec![0u8; HEADER_LEN];
        header[..2].copy_from_slice(&id.to_be_bytes());
        header[2] = 0x80;
        header[3] = 0x80 | (u16::from(code) & 0x0f) as u8;
        header
    })
}

fn encode(message: &Message) -> Option<Vec<u8>> {
    message.to_vec().ok()
}

/// What an answer from a resolver teaches: the name that was asked, and each address given
/// for it with its time to live. CNAME chains are followed implicitly: every A and AAAA record
/// of the answer section is an address the asked name leads to.
pub(crate) fn learn(answer: &[u8]) -> Option<(Name, Vec<(IpAddr, u32)>)> {
    let message = Message::from_vec(answer).ok()?;
    if message.metadata.message_type != MessageType::Response
        || message.metadata.response_code != ResponseCode::NoError
    {
        return None;
    }
    let name = Name::parse(&message.queries.first()?.name().to_ascii())?;
    let addresses: Vec<(IpAddr, u32)> = message
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some((IpAddr::V4(a.0), record.ttl)),
            RData::AAAA(aaaa) => Some((IpAddr::V6(aaaa.0), record.ttl)),
            _ => None,
        })
        .collect();
    (!addresses.is_empty()).then_some((name, addresses))
}

/// The id of a message, to match an answer to its query.
pub(crate) fn id_of(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]))
}

/// Reads `bytes` as a query and answers it every way the responder can, and as an answer to
/// learn from. For the fuzz target: never panics.
pub fn check_bytes(bytes: &[u8]) {
    if let Ok(query) = Query::read(bytes) {
        let _ = query.name();
        let _ = query.asks();
        let _ = query.answer(Some(IpAddr::from([198, 18, 0, 1])), 1);
        let _ = query.fail(ResponseCode::ServFail);
        let _ = query.encode();
        let _ = query.is_answered_by(bytes);
    }
    let _ = learn(bytes);
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::Query as Question,
        rr::{DNSClass, Name as DnsName},
    };

    use super::*;

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 0x1234;
        message.metadata.recursion_desired = true;
        message.add_query(Question::query(DnsName::from_ascii(name).unwrap(), kind));
        message.to_vec().unwrap()
    }

    #[test]
    fn a_query_is_answered_with_its_id_question_and_address() {
        let bytes = query("origin.test.", RecordType::A);
        let query = Query::read(&bytes).unwrap();
        assert_eq!(query.asks(), Asks::A);
        assert_eq!(query.name().unwrap().as_str(), "origin.test");
        let answer =
            Message::from_vec(&query.answer(Some("198.18.0.7".parse().unwrap()), 1)).unwrap();
        assert_eq!(answer.metadata.id, 0x1234);
        assert_eq!(answer.metadata.message_type, MessageType::Response);
        assert!(answer.metadata.recursion_desired && answer.metadata.recursion_available);
        assert_eq!(answer.queries.len(), 1);
        assert_eq!(answer.answers.len(), 1);
        assert_eq!(
            answer.answers[0].data,
            RData::A(rdata::A([198, 18, 0, 7].into()))
        );
        assert_eq!(answer.answers[0].dns_class, DNSClass::IN);
        // The same answer teaches its name and address.
        let (name, addresses) =
            learn(&query.answer(Some("198.18.0.7".parse().unwrap()), 60)).unwrap();
        assert_eq!(name.as_str(), "origin.test");
        assert_eq!(addresses, [("198.18.0.7".parse().unwrap(), 60)]);
        // No address of that family: NOERROR, no record.
        let empty = Message::from_vec(&query.answer(None, 1)).unwrap();
        assert_eq!(empty.metadata.response_code, ResponseCode::NoError);
        assert!(empty.answers.is_empty());
    }

    #[test]
    fn malformed_messages_get_formerr_or_nothing() {
        assert_eq!(Query::read(&[1, 2, 3]).unwrap_err(), NotAQuery::Drop);
        // A header claiming a question that is not there.
        let bad = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'x'];
        let NotAQuery::Answer(reply) = Query::read(&bad).unwrap_err() else {
            panic!("no FORMERR");
        };
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.metadata.id, 0xabcd);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        // An answer is never answered.
        let mut answer = query("origin.test.", RecordType::A);
        answer[2] |= 0x80;
        assert_eq!(Query::read(&answer).unwrap_err(), NotAQuery::Drop);
        // Other opcodes: NOTIMP.
        let mut notify = query("origin.test.", RecordType::A);
        notify[2] = (notify[2] & 0x87) | (4 << 3);
        let NotAQuery::Answer(reply) = Query::read(&notify).unwrap_err() else {
            panic!("no NOTIMP");
        };
        assert_eq!(
            Message::from_vec(&reply).unwrap().metadata.response_code,
            ResponseCode::NotImp
        );
    }
}
