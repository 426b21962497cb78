//! Reading what nf_tables sends back, on top of [`crate::netlink`]: its
//! messages carry an nfgenmsg (family) before their attributes, and their
//! numbers are big-endian.

use super::encode::HEADERS_LEN;
use super::NetfilterError;
use crate::netlink::{self, NLMSG_HDRLEN};

pub(crate) use crate::netlink::{string, Ack, Attrs, Message as NlMsg};

/// The parts of a netlink message that nf_tables adds.
pub(crate) trait NftMessage<'a> {
    /// The nfgenmsg family.
    fn family(&self) -> Option<u8>;
    /// The attributes (after the nfgenmsg).
    fn attrs(&self) -> Attrs<'a>;
}

impl<'a> NftMessage<'a> for NlMsg<'a> {
    fn family(&self) -> Option<u8> {
        self.body.first().copied()
    }

    fn attrs(&self) -> Attrs<'a> {
        Attrs::new(self.body.get(HEADERS_LEN - NLMSG_HDRLEN..).unwrap_or(&[]))
    }
}

fn protocol(e: netlink::Malformed) -> NetfilterError {
    NetfilterError::Protocol(e.0)
}

/// Splits a datagram into its netlink messages.
pub(crate) fn messages(buf: &[u8]) -> Result<Vec<NlMsg<'_>>, NetfilterError> {
    netlink::messages(buf)
        .map(|m| m.map_err(protocol))
        .collect()
}

/// Reads an NLMSG_ERROR body (`msg.kind` must be NLMSG_ERROR).
pub(crate) fn ack(msg: &NlMsg<'_>) -> Result<Ack, NetfilterError> {
    netlink::ack(msg).map_err(protocol)
}

pub(crate) fn be32(payload: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(payload.get(..4)?.try_into().ok()?))
}

pub(crate) fn be64(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_messages_give_family_and_attributes() {
        // nfgenmsg (family 1, version, res_id), then attribute 1 "ab".
        let body = [1, 0, 0, 0, 7, 0, 1, 0, b'a', b'b', 0, 0];
        let mut buf = ((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes().to_vec();
        buf.extend_from_slice(&0x0a02u16.to_ne_bytes());
        buf.extend_from_slice(&[0; 10]);
        buf.extend_from_slice(&body);
        let msgs = messages(&buf).unwrap();
        assert_eq!(msgs[0].family(), Some(1));
        assert_eq!(string(msgs[0].attrs().get(1).unwrap()), b"ab");
        assert!(matches!(
            messages(&buf[..20]),
            Err(NetfilterError::Protocol(_))
        ));
    }

    #[test]
    fn big_endian_helpers() {
        assert_eq!(be32(&[0, 0, 1, 2]), Some(258));
        assert_eq!(be64(&[0, 0, 0, 0, 0, 0, 0, 9]), Some(9));
        assert_eq!(be32(&[1]), None);
    }
}
