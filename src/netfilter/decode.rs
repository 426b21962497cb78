//! Reading what the kernel sends back: netlink messages, attributes, acks.
//! Everything is bounds-checked; malformed input ends the iteration or becomes an error,
//! never a panic.

use super::encode::{align4, HEADERS_LEN};
use super::NetfilterError;

const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLM_F_CAPPED: u16 = 0x100;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;

/// One netlink message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NlMsg<'a> {
    pub kind: u16,
    pub flags: u16,
    /// The sender's port id (for notifications: the socket that made the change).
    pub port: u32,
    /// Everything after the nlmsghdr.
    pub body: &'a [u8],
    /// The whole message, header included.
    pub raw: &'a [u8],
}

impl<'a> NlMsg<'a> {
    /// The nfgenmsg family of an nf_tables message.
    pub(crate) fn family(&self) -> Option<u8> {
        self.body.first().copied()
    }

    /// The attributes of an nf_tables message (after its nfgenmsg).
    pub(crate) fn attrs(&self) -> Attrs<'a> {
        Attrs(self.body.get(HEADERS_LEN - NLMSG_HDRLEN..).unwrap_or(&[]))
    }
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a datagram into its netlink messages.
pub(crate) fn messages(buf: &[u8]) -> Result<Vec<NlMsg<'_>>, NetfilterError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let malformed = || {
            NetfilterError::Protocol(format!("malformed netlink message of {} bytes", rest.len()))
        };
        let len = u32_at(rest, 0).ok_or_else(malformed)? as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(malformed());
        }
        out.push(NlMsg {
            kind: u16_at(rest, 4).ok_or_else(malformed)?,
            flags: u16_at(rest, 6).ok_or_else(malformed)?,
            port: u32_at(rest, 12).ok_or_else(malformed)?,
            body: &rest[NLMSG_HDRLEN..len],
            raw: &rest[..len],
        });
        rest = rest.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Iterates over netlink attributes as (type without flags, payload).
#[derive(Debug, Clone)]
pub(crate) struct Attrs<'a>(pub &'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let len = u16_at(self.0, 0)? as usize;
        let kind = u16_at(self.0, 2)? & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > self.0.len() {
            self.0 = &[];
            return None;
        }
        let payload = &self.0[NLA_HDRLEN..len];
        self.0 = self.0.get(align4(len)..).unwrap_or(&[]);
        Some((kind, payload))
    }
}

impl<'a> Attrs<'a> {
    /// The payload of the first attribute of type `kind`.
    pub(crate) fn get(self, kind: u16) -> Option<&'a [u8]> {
        self.into_iter().find(|(k, _)| *k == kind).map(|(_, v)| v)
    }
}

pub(crate) fn be32(payload: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(payload.get(..4)?.try_into().ok()?))
}

pub(crate) fn be64(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

/// A string attribute without its NUL terminator.
pub(crate) fn string(payload: &[u8]) -> &[u8] {
    payload.split(|b| *b == 0).next().unwrap_or(payload)
}

/// An NLMSG_ERROR message: 0 is an ack, otherwise the kernel refused the message with
/// sequence number `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ack {
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
pub(crate) fn ack(msg: &NlMsg<'_>) -> Result<Ack, NetfilterError> {
    let malformed = || NetfilterError::Protocol("truncated netlink error message".into());
    let error = u32_at(msg.body, 0).ok_or_else(malformed)? as i32;
    // The refused request's header follows; its whole payload too unless capped.
    let request_len = u32_at(msg.body, 4).ok_or_else(malformed)? as usize;
    let seq = u32_at(msg.body, 12).ok_or_else(malformed)?;
    let echoed = if msg.flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        align4(request_len)
    };
    let tlvs = Attrs(msg.body.get(4 + echoed..).unwrap_or(&[]));
    let mut message = None;
    let mut offset = None;
    for (kind, payload) in tlvs {
        match kind {
            NLMSGERR_ATTR_MSG => {
                message = Some(String::from_utf8_lossy(string(payload)).into_owned())
            }
            NLMSGERR_ATTR_OFFS => {
                offset = payload
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(|b| u32::from_ne_bytes(b) as usize)
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut v = ((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes().to_vec();
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&77u32.to_ne_bytes());
        v.extend_from_slice(body);
        v.resize(align4(v.len()), 0);
        v
    }

    #[test]
    fn splits_messages_and_reads_headers() {
        let mut buf = nlmsg(0x0a02, 0, 5, &[1, 0, 0, 0, 1]);
        buf.extend(nlmsg(3, 2, 6, &[]));
        let msgs = messages(&buf).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].kind, msgs[0].port), (0x0a02, 77));
        assert_eq!(msgs[0].family(), Some(1));
        assert_eq!(msgs[0].body.len(), 5);
        assert_eq!((msgs[1].kind, msgs[1].flags), (3, 2));
    }

    #[test]
    fn truncated_message_is_an_error() {
        let mut buf = nlmsg(3, 0, 1, &[0; 8]);
        buf.truncate(20);
        assert!(matches!(messages(&buf), Err(NetfilterError::Protocol(_))));
        assert!(messages(&[1, 0]).is_err());
    }

    #[test]
    fn attributes_stop_at_malformed_lengths() {
        // type 1 "ab\0", then a nested type 2 (flag stripped), then garbage length.
        let buf = [7, 0, 1, 0, b'a', b'b', 0, 0, 4, 0, 2, 0x80, 200, 0, 3, 0];
        let got: Vec<_> = Attrs(&buf).collect();
        assert_eq!(got, vec![(1, &b"ab\0"[..]), (2, &[][..])]);
        assert_eq!(string(Attrs(&buf).get(1).unwrap()), b"ab");
        assert_eq!(Attrs(&buf).get(3), None);
    }

    #[test]
    fn capped_extended_ack_gives_errno_text_and_offset() {
        let mut body = (-95i32).to_ne_bytes().to_vec();
        // the refused request's header: len 120, type, flags, seq 9, port
        body.extend_from_slice(&120u32.to_ne_bytes());
        body.extend_from_slice(&[0; 4]);
        body.extend_from_slice(&9u32.to_ne_bytes());
        body.extend_from_slice(&[0; 4]);
        body.extend_from_slice(&[8, 0, 1, 0, b'b', b'a', b'd', 0]); // MSG
        body.extend_from_slice(&[8, 0, 2, 0]); // OFFS
        body.extend_from_slice(&44u32.to_ne_bytes());
        let buf = nlmsg(2, NLM_F_CAPPED | 0x200, 9, &body);
        let msgs = messages(&buf).unwrap();
        assert_eq!(
            ack(&msgs[0]).unwrap(),
            Ack {
                seq: 9,
                errno: 95,
                message: Some("bad".into()),
                offset: Some(44),
            }
        );
    }

    #[test]
    fn plain_ack_is_errno_zero() {
        let mut body = 0i32.to_ne_bytes().to_vec();
        body.extend_from_slice(&16u32.to_ne_bytes());
        body.extend_from_slice(&[0; 4]);
        body.extend_from_slice(&3u32.to_ne_bytes());
        body.extend_from_slice(&[0; 4]);
        let buf = nlmsg(2, 0, 3, &body);
        let got = ack(&messages(&buf).unwrap()[0]).unwrap();
        assert_eq!((got.seq, got.errno, got.offset), (3, 0, None));
    }

    #[test]
    fn big_endian_helpers() {
        assert_eq!(be32(&[0, 0, 1, 2]), Some(258));
        assert_eq!(be64(&[0, 0, 0, 0, 0, 0, 0, 9]), Some(9));
        assert_eq!(be32(&[1]), None);
    }
}
