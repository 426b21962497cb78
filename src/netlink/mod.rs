//! Netlink, the one way this daemon talks to the kernel's routing, nf_tables and
//! sock_diag: a request socket (extended acks, a bounded wait, sequence numbers), a
//! multicast monitor that drains without blocking and treats lost events as "look
//! again", and the reading of what comes back (messages, attributes, acks).
//!
//! Every family's messages are built by that family ([`crate::netfilter`],
//! [`crate::routing`] with netlink-packet-route, [`crate::procinfo`]); this module
//! only frames, sends, receives and splits. Everything read is bounds-checked:
//! malformed input ends an iteration or becomes [`Malformed`], never a panic.

mod monitor;
mod socket;

pub use monitor::Monitor;
pub use socket::{set_buffer, RequestSocket, Wait};

use std::fmt;

pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
pub const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
pub const NLMSG_OVERRUN: u16 = libc::NLMSG_OVERRUN as u16;
const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// The kernel echoed only the refused request's header (NETLINK_CAP_ACK).
const NLM_F_CAPPED: u16 = 0x100;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;

/// Netlink messages and attributes start on 4-byte boundaries.
pub fn align4(n: usize) -> usize {
    n.next_multiple_of(4)
}

pub fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        buf.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        buf.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

pub fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(
        buf.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// A string attribute without its NUL terminator.
pub fn string(payload: &[u8]) -> &[u8] {
    payload.split(|b| *b == 0).next().unwrap_or(payload)
}

/// What the kernel sent cannot be read as netlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Malformed {}

/// One netlink message.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// The sender's port id (for notifications: the socket that made the change).
    pub port: u32,
    /// Everything after the nlmsghdr.
    pub body: &'a [u8],
    /// The whole message, header included.
    pub raw: &'a [u8],
}

/// Splits a datagram into its netlink messages; a bad length ends it with an error.
pub fn messages(datagram: &[u8]) -> impl Iterator<Item = Result<Message<'_>, Malformed>> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let header = |rest: &[u8]| -> Option<(usize, u16, u16, u32, u32)> {
            let len = u32_at(rest, 0)? as usize;
            Some((
                len,
                u16_at(rest, 4)?,
                u16_at(rest, 6)?,
                u32_at(rest, 8)?,
                u32_at(rest, 12)?,
            ))
        };
        let parsed = header(rest).filter(|(len, ..)| *len >= NLMSG_HDRLEN && *len <= rest.len());
        let Some((len, kind, flags, seq, port)) = parsed else {
            let bad = Malformed(format!("malformed netlink message of {} bytes", rest.len()));
            rest = &[];
            return Some(Err(bad));
        };
        let message = Message {
            kind,
            flags,
            seq,
            port,
            body: &rest[NLMSG_HDRLEN..len],
            raw: &rest[..len],
        };
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(message))
    })
}

/// Iterates over netlink attributes as (type without flags, payload). A bad length
/// ends the iteration and is remembered ([`Attrs::malformed`]) for the readers
/// that must refuse such a message rather than use what came before.
#[derive(Debug, Clone)]
pub struct Attrs<'a> {
    rest: &'a [u8],
    malformed: bool,
}

impl<'a> Attrs<'a> {
    pub fn new(buf: &'a [u8]) -> Attrs<'a> {
        Attrs {
            rest: buf,
            malformed: false,
        }
    }

    /// The payload of the first attribute of type `kind`.
    pub fn get(self, kind: u16) -> Option<&'a [u8]> {
        self.into_iter().find(|(k, _)| *k == kind).map(|(_, v)| v)
    }

    /// Whether the iteration stopped at an attribute whose length was wrong.
    pub fn malformed(&self) -> bool {
        self.malformed
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < NLA_HDRLEN {
            self.malformed |= !self.rest.is_empty();
            self.rest = &[];
            return None;
        }
        let len = u16_at(self.rest, 0)? as usize;
        let kind = u16_at(self.rest, 2)? & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > self.rest.len() {
            self.rest = &[];
            self.malformed = true;
            return None;
        }
        let payload = &self.rest[NLA_HDRLEN..len];
        self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
        Some((kind, payload))
    }
}

/// An NLMSG_ERROR message: errno 0 is an ack, otherwise the kernel refused the
/// message with sequence number `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub seq: u32,
    /// 0 or a positive errno.
    pub errno: i32,
    /// The extended ack's text.
    pub message: Option<String>,
    /// The extended ack's offset of the refused attribute, from the start of the
    /// refused message.
    pub offset: Option<usize>,
}

/// Reads an NLMSG_ERROR body (`msg.kind` must be NLMSG_ERROR).
pub fn ack(msg: &Message<'_>) -> Result<Ack, Malformed> {
    let malformed = || Malformed("truncated netlink error message".into());
    let error = u32_at(msg.body, 0).ok_or_else(malformed)? as i32;
    // The refused request's header follows; its whole payload too unless capped.
    let request_len = u32_at(msg.body, 4).ok_or_else(malformed)? as usize;
    let seq = u32_at(msg.body, 12).ok_or_else(malformed)?;
    let echoed = if msg.flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        align4(request_len)
    };
    let mut message = None;
    let mut offset = None;
    for (kind, payload) in Attrs::new(msg.body.get(4 + echoed..).unwrap_or(&[])) {
        match kind {
            NLMSGERR_ATTR_MSG => {
                message = Some(String::from_utf8_lossy(string(payload)).into_owned())
            }
            NLMSGERR_ATTR_OFFS => offset = u32_at(payload, 0).map(|o| o as usize),
            _ => {}
        }
    }
    Ok(Ack {
        seq,
        errno: error.wrapping_neg(),
        message,
        offset,
    })
}

/// The errno an NLMSG_DONE carries (a dump's own outcome); 0 when it has none.
pub fn done_errno(msg: &Message<'_>) -> i32 {
    u32_at(msg.body, 0).map_or(0, |code| (code as i32).wrapping_neg())
}

/// A netlink message as the kernel frames it (port id 77), for tests of readers.
#[cfg(test)]
pub(crate) fn frame(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + body.len();
    let mut m = Vec::new();
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&77u32.to_ne_bytes());
    m.extend_from_slice(body);
    m.resize(align4(m.len()), 0);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_messages_and_reads_headers() {
        let mut buf = frame(16, 0x2, 5, &[1, 2, 3]);
        buf.extend(frame(NLMSG_DONE, 0, 6, &0u32.to_ne_bytes()));
        let msgs: Vec<Message> = messages(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(
            (msgs[0].kind, msgs[0].flags, msgs[0].seq, msgs[0].port),
            (16, 2, 5, 77)
        );
        assert_eq!(msgs[0].body, &[1, 2, 3]);
        assert_eq!(msgs[1].kind, NLMSG_DONE);
        assert_eq!(done_errno(&msgs[1]), 0);
    }

    #[test]
    fn truncated_message_is_an_error() {
        let buf = frame(16, 0, 1, &[0; 8]);
        let results: Vec<_> = messages(&buf[..buf.len() - 4]).collect();
        assert_eq!(results.len(), 1);
        assert!(results[0].is_err());
        assert!(messages(&[1, 2, 3]).next().unwrap().is_err());
    }

    #[test]
    fn attributes_stop_at_malformed_lengths() {
        // (len 6, type 0x8001 (nested flag masked) "ab" + pad), then a length past the end.
        let buf = [6, 0, 1, 0x80, b'a', b'b', 0, 0, 40, 0, 2, 0];
        let mut attrs = Attrs::new(&buf);
        assert_eq!(attrs.next(), Some((1, &b"ab"[..])));
        assert_eq!(attrs.next(), None);
        assert!(attrs.malformed());
        let mut fine = Attrs::new(&buf[..8]);
        assert_eq!(fine.by_ref().count(), 1);
        assert!(!fine.malformed());
    }

    #[test]
    fn capped_extended_ack_gives_errno_text_and_offset() {
        let request = frame(0xa06, 0x5, 9, &[]);
        let mut body = (-libc::EINVAL).to_ne_bytes().to_vec();
        body.extend_from_slice(&request[..NLMSG_HDRLEN]);
        body.extend_from_slice(&[8, 0, 1, 0, b'b', b'a', b'd', 0]);
        body.extend_from_slice(&[8, 0, 2, 0]);
        body.extend_from_slice(&24u32.to_ne_bytes());
        let buf = frame(NLMSG_ERROR, NLM_F_CAPPED | 0x200, 9, &body);
        let msg = messages(&buf).next().unwrap().unwrap();
        assert_eq!(
            ack(&msg).unwrap(),
            Ack {
                seq: 9,
                errno: libc::EINVAL,
                message: Some("bad".into()),
                offset: Some(24),
            }
        );
    }

    #[test]
    fn plain_ack_is_errno_zero() {
        let request = frame(0xa06, 0x5, 3, &[]);
        let mut body = 0u32.to_ne_bytes().to_vec();
        body.extend_from_slice(&request);
        let buf = frame(NLMSG_ERROR, 0, 3, &body);
        let msg = messages(&buf).next().unwrap().unwrap();
        let a = ack(&msg).unwrap();
        assert_eq!((a.seq, a.errno, a.message), (3, 0, None));
        assert!(ack(&Message {
            body: &[0; 3],
            ..msg
        })
        .is_err());
    }
}
