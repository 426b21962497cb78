//! Encoder for the nf_tables messages rustables 0.9 cannot express: rules with `socket`,
//! `tproxy` or `dynset` expressions, and sets with a size and per-element counters.
//!
//! Every rule of the table goes through this encoder (not only the exotic ones) so a
//! chain's rules stay in order and each expression's byte range within its message is
//! known: the kernel's extended ack points at the refused attribute by offset, and
//! [`Message::part_at`] turns that offset back into "expression 4 (tproxy)".
//!
//! Byte orders (what the kernel expects): netlink headers in host order; every u32
//! attribute value (registers, keys, ops, verdict codes) big-endian; data compared against
//! registers in the order the kernel puts it there (marks and cgroup ids host order,
//! addresses and ports network order).

use super::decode::{string, Attrs};
use super::NetfilterError;
use rustables::sys;

/// nlmsghdr (16 bytes) + nfgenmsg (4 bytes).
pub(crate) const HEADERS_LEN: usize = 20;
const NLA_HDRLEN: usize = 4;
/// nft's user data TLV type for a rule comment (libnftnl NFTNL_UDATA_RULE_COMMENT).
const UDATA_RULE_COMMENT: u8 = 0;
/// nft's set user data TLV saying the key's byte order (NFTNL_UDATA_SET_KEYBYTEORDER),
/// and nft's value for host order: without it `nft list` shows host-order keys
/// byte-swapped.
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const NFT_BYTEORDER_HOST_ENDIAN: u32 = 1;

pub(crate) const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
pub(crate) const NLM_F_ACK: u16 = libc::NLM_F_ACK as u16;
pub(crate) const NLM_F_CREATE: u16 = libc::NLM_F_CREATE as u16;
pub(crate) const NLM_F_APPEND: u16 = libc::NLM_F_APPEND as u16;
pub(crate) const NLM_F_DUMP: u16 = libc::NLM_F_DUMP as u16;

pub(crate) const FAMILY_INET: u8 = libc::NFPROTO_INET as u8;
pub(crate) const FAMILY_UNSPEC: u8 = libc::NFPROTO_UNSPEC as u8;

/// The general-purpose register every expression here loads into and reads from.
const REG: u32 = sys::NFT_REG_1;

pub(crate) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The nlmsg type of an nf_tables message.
pub(crate) fn nft_type(msg: u32) -> u16 {
    ((sys::NFNL_SUBSYS_NFTABLES << 8) | msg) as u16
}

/// Writes one netlink message: headers, then attributes padded to 4 bytes.
pub(crate) struct MessageWriter {
    buf: Vec<u8>,
    too_long: bool,
}

impl MessageWriter {
    /// Starts an nf_tables message. `seq` stays 0: the batch numbers its messages.
    pub(crate) fn nft(msg: u32, family: u8, flags: u16) -> Self {
        Self::raw(nft_type(msg), family, flags, 0)
    }

    /// Starts a message with an explicit nlmsg type and nfgenmsg resource id
    /// (batch begin/end carry the subsystem there, big-endian).
    pub(crate) fn raw(kind: u16, family: u8, flags: u16, res_id: u16) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by finish()
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // seq
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id 0: to the kernel
        buf.push(family);
        buf.push(sys::NFNETLINK_V0 as u8);
        buf.extend_from_slice(&res_id.to_be_bytes());
        MessageWriter {
            buf,
            too_long: false,
        }
    }

    /// Offset of the next attribute from the start of the message.
    pub(crate) fn offset(&self) -> usize {
        self.buf.len()
    }

    fn header(&mut self, kind: u16, len: usize) {
        let len = u16::try_from(len).unwrap_or_else(|_| {
            self.too_long = true;
            0
        });
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    pub(crate) fn put(&mut self, kind: u16, payload: &[u8]) {
        self.header(kind, NLA_HDRLEN + payload.len());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    pub(crate) fn put_u32(&mut self, kind: u16, value: u32) {
        self.put(kind, &value.to_be_bytes());
    }

    pub(crate) fn put_u64(&mut self, kind: u16, value: u64) {
        self.put(kind, &value.to_be_bytes());
    }

    /// A NUL-terminated string, as the kernel's NLA_STRING policies expect.
    pub(crate) fn put_str(&mut self, kind: u16, value: &str) {
        let mut payload = Vec::with_capacity(value.len() + 1);
        payload.extend_from_slice(value.as_bytes());
        payload.push(0);
        self.put(kind, &payload);
    }

    pub(crate) fn nest(&mut self, kind: u16, body: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.header(kind | sys::NLA_F_NESTED as u16, 0);
        body(self);
        match u16::try_from(self.buf.len() - start) {
            Ok(len) => self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes()),
            Err(_) => self.too_long = true,
        }
    }

    /// A nested `nft_data` value (NFTA_DATA_VALUE inside `kind`).
    pub(crate) fn put_data(&mut self, kind: u16, value: &[u8]) {
        self.nest(kind, |w| w.put(sys::NFTA_DATA_VALUE, value));
    }

    /// The finished message, with its length filled in.
    pub(crate) fn finish(mut self, what: &str) -> Result<Vec<u8>, NetfilterError> {
        let len = u32::try_from(self.buf.len())
            .ok()
            .filter(|_| !self.too_long);
        match len {
            Some(len) => {
                self.buf[..4].copy_from_slice(&len.to_ne_bytes());
                Ok(self.buf)
            }
            None => Err(NetfilterError::InvalidPlan(format!(
                "{what} does not fit in a netlink message"
            ))),
        }
    }
}

/// A named byte range of a message (one expression of a rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    pub start: usize,
    pub end: usize,
    pub name: String,
}

/// One message of a batch, with what to call it when the kernel refuses it.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub bytes: Vec<u8>,
    /// E.g. "rule 'tproxy to proxy' in chain prerouting".
    pub label: String,
    /// Shown with a refusal, e.g. which module to load.
    pub hint: Option<String>,
    pub parts: Vec<Part>,
}

impl Message {
    pub(crate) fn new(bytes: Vec<u8>, label: String) -> Self {
        Message {
            bytes,
            label,
            hint: None,
            parts: Vec::new(),
        }
    }

    /// The part containing `offset` (from the start of the message), if any.
    pub(crate) fn part_at(&self, offset: usize) -> Option<&Part> {
        self.parts
            .iter()
            .find(|part| part.start <= offset && offset < part.end)
    }

    /// Names what the kernel pointed at with an extended-ack offset: an expression of a
    /// rule, or a top-level attribute such as "the table name \"agent_egress\"".
    pub(crate) fn describe_offset(&self, offset: usize) -> String {
        if let Some(part) = self.part_at(offset) {
            return part.name.clone();
        }
        let op = self.bytes.get(4).map_or(0, |kind| u32::from(*kind));
        let attr = self
            .bytes
            .get(offset..)
            .and_then(|rest| Attrs::new(rest).next());
        match attr.and_then(|(kind, payload)| Some((attribute_name(op, kind)?, payload))) {
            Some((name, payload)) if name.ends_with("name") => {
                format!("the {name} {:?}", String::from_utf8_lossy(string(payload)))
            }
            Some((name, _)) => format!("the {name}"),
            None => format!("byte {offset}"),
        }
    }
}

/// What a top-level attribute of an nf_tables message of type `op` is.
fn attribute_name(op: u32, kind: u16) -> Option<&'static str> {
    const TABLE: u32 = sys::NFT_MSG_NEWTABLE;
    const DELTABLE: u32 = sys::NFT_MSG_DELTABLE;
    const CHAIN: u32 = sys::NFT_MSG_NEWCHAIN;
    const RULE: u32 = sys::NFT_MSG_NEWRULE;
    const SET: u32 = sys::NFT_MSG_NEWSET;
    const ELEM: u32 = sys::NFT_MSG_NEWSETELEM;
    const DELELEM: u32 = sys::NFT_MSG_DELSETELEM;
    Some(match (op, kind) {
        (TABLE | DELTABLE | CHAIN | RULE | SET | ELEM | DELELEM, 1) => "table name",
        (CHAIN, 3) | (RULE, 2) => "chain name",
        (CHAIN, 4) => "hook",
        (CHAIN, 7) => "chain type",
        (SET | ELEM | DELELEM, 2) => "set name",
        (SET, 9) => "set size",
        (ELEM | DELELEM, 3) => "element list",
        (RULE, 7) => "comment",
        _ => return None,
    })
}

/// What a rule does when it gets to its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accept,
    Drop,
    /// Continue in a regular chain, not coming back.
    Goto(String),
}

/// The expressions this module's rules are made of. Unless said otherwise they load
/// into, or read from, the one register `REG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expr {
    /// Load a meta key (`NFT_META_*`).
    Meta(u32),
    /// Set a meta key from the register.
    SetMeta(u32),
    /// Load a conntrack key (`NFT_CT_*`) of the packet's flow. No flow: next rule.
    Ct(u32),
    /// Set a conntrack key of the packet's flow from the register.
    SetCt(u32),
    /// Continue only if the register starts with these bytes.
    Cmp(Vec<u8>),
    /// Continue only if the register does not start with these bytes.
    CmpNe(Vec<u8>),
    /// Load `len` bytes at `offset` of a header (`NFT_PAYLOAD_*`) into register `dreg`.
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// register &= mask.
    Mask(Vec<u8>),
    /// Load constant bytes.
    Immediate(Vec<u8>),
    /// Load a property (`NFT_SOCKET_*`) of the packet's socket; `level` is the cgroup
    /// ancestor level for `NFT_SOCKET_CGROUPV2`. No socket: next rule.
    Socket {
        key: u32,
        level: Option<u32>,
    },
    /// Continue only if the register is in the named set.
    Lookup(String),
    /// Add or refresh the key starting at register `sreg` in a dynamic set, with a
    /// per-element counter.
    UpdateCounted {
        set: String,
        sreg: u32,
    },
    /// Hand the packet to the transparent socket on the port in the register (any
    /// family, port-only form).
    Tproxy,
    Counter,
    RejectTcpReset,
    /// Answer with ICMP(v6) port unreachable: a UDP sender learns at once.
    RejectPortUnreachable,
    Verdict(Verdict),
}

impl Expr {
    /// The kernel's name for the expression type.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Expr::Meta(_) | Expr::SetMeta(_) => "meta",
            Expr::Ct(_) | Expr::SetCt(_) => "ct",
            Expr::Cmp(_) | Expr::CmpNe(_) => "cmp",
            Expr::Payload { .. } => "payload",
            Expr::Mask(_) => "bitwise",
            Expr::Immediate(_) | Expr::Verdict(_) => "immediate",
            Expr::Socket { .. } => "socket",
            Expr::Lookup(_) => "lookup",
            Expr::UpdateCounted { .. } => "dynset",
            Expr::Tproxy => "tproxy",
            Expr::Counter => "counter",
            Expr::RejectTcpReset | Expr::RejectPortUnreachable => "reject",
        }
    }

    fn write_data(&self, w: &mut MessageWriter) {
        match self {
            Expr::Meta(key) => {
                w.put_u32(sys::NFTA_META_KEY, *key);
                w.put_u32(sys::NFTA_META_DREG, REG);
            }
            Expr::SetMeta(key) => {
                w.put_u32(sys::NFTA_META_KEY, *key);
                w.put_u32(sys::NFTA_META_SREG, REG);
            }
            Expr::Ct(key) => {
                w.put_u32(sys::NFTA_CT_KEY, *key);
                w.put_u32(sys::NFTA_CT_DREG, REG);
            }
            Expr::SetCt(key) => {
                w.put_u32(sys::NFTA_CT_KEY, *key);
                w.put_u32(sys::NFTA_CT_SREG, REG);
            }
            Expr::Cmp(data) | Expr::CmpNe(data) => {
                let op = match self {
                    Expr::CmpNe(_) => sys::NFT_CMP_NEQ,
                    _ => sys::NFT_CMP_EQ,
                };
                w.put_u32(sys::NFTA_CMP_SREG, REG);
                w.put_u32(sys::NFTA_CMP_OP, op);
                w.put_data(sys::NFTA_CMP_DATA, data);
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                w.put_u32(sys::NFTA_PAYLOAD_DREG, *dreg);
                w.put_u32(sys::NFTA_PAYLOAD_BASE, *base);
                w.put_u32(sys::NFTA_PAYLOAD_OFFSET, *offset);
                w.put_u32(sys::NFTA_PAYLOAD_LEN, *len);
            }
            Expr::Mask(mask) => {
                w.put_u32(sys::NFTA_BITWISE_SREG, REG);
                w.put_u32(sys::NFTA_BITWISE_DREG, REG);
                w.put_u32(sys::NFTA_BITWISE_LEN, mask.len() as u32);
                w.put_data(sys::NFTA_BITWISE_MASK, mask);
                w.put_data(sys::NFTA_BITWISE_XOR, &vec![0; mask.len()]);
            }
            Expr::Immediate(data) => {
                w.put_u32(sys::NFTA_IMMEDIATE_DREG, REG);
                w.put_data(sys::NFTA_IMMEDIATE_DATA, data);
            }
            Expr::Verdict(verdict) => {
                w.put_u32(sys::NFTA_IMMEDIATE_DREG, sys::NFT_REG_VERDICT);
                w.nest(sys::NFTA_IMMEDIATE_DATA, |w| {
                    w.nest(sys::NFTA_DATA_VERDICT, |w| match verdict {
                        Verdict::Accept => {
                            w.put_u32(sys::NFTA_VERDICT_CODE, libc::NF_ACCEPT as u32)
                        }
                        Verdict::Drop => w.put_u32(sys::NFTA_VERDICT_CODE, libc::NF_DROP as u32),
                        Verdict::Goto(chain) => {
                            w.put_u32(sys::NFTA_VERDICT_CODE, sys::NFT_GOTO as u32);
                            w.put_str(sys::NFTA_VERDICT_CHAIN, chain);
                        }
                    })
                });
            }
            Expr::Socket { key, level } => {
                w.put_u32(sys::NFTA_SOCKET_KEY, *key);
                w.put_u32(sys::NFTA_SOCKET_DREG, REG);
                if let Some(level) = level {
                    w.put_u32(sys::NFTA_SOCKET_LEVEL, *level);
                }
            }
            Expr::Lookup(set) => {
                w.put_str(sys::NFTA_LOOKUP_SET, set);
                w.put_u32(sys::NFTA_LOOKUP_SREG, REG);
            }
            Expr::UpdateCounted { set, sreg } => {
                w.put_str(sys::NFTA_DYNSET_SET_NAME, set);
                w.put_u32(sys::NFTA_DYNSET_OP, sys::NFT_DYNSET_OP_UPDATE);
                w.put_u32(sys::NFTA_DYNSET_SREG_KEY, *sreg);
                w.nest(sys::NFTA_DYNSET_EXPR, |w| Expr::Counter.write(w));
            }
            Expr::Tproxy => {
                w.put_u32(sys::NFTA_TPROXY_FAMILY, libc::NFPROTO_UNSPEC as u32);
                w.put_u32(sys::NFTA_TPROXY_REG_PORT, REG);
            }
            Expr::Counter => {}
            Expr::RejectTcpReset => w.put_u32(sys::NFTA_REJECT_TYPE, sys::NFT_REJECT_TCP_RST),
            Expr::RejectPortUnreachable => {
                w.put_u32(sys::NFTA_REJECT_TYPE, sys::NFT_REJECT_ICMPX_UNREACH);
                w.put(
                    sys::NFTA_REJECT_ICMP_CODE,
                    &[sys::NFT_REJECT_ICMPX_PORT_UNREACH as u8],
                );
            }
        }
    }

    /// The expression's name and data attributes (the content of one list element).
    fn write(&self, w: &mut MessageWriter) {
        w.put_str(sys::NFTA_EXPR_NAME, self.name());
        w.nest(sys::NFTA_EXPR_DATA, |w| self.write_data(w));
    }
}

/// One rule: where it goes, what it is called, what it is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub chain: &'static str,
    /// Short name, used in errors and as the rule's comment in `nft list`.
    pub name: String,
    pub hint: Option<String>,
    pub exprs: Vec<Expr>,
}

impl Rule {
    pub(crate) fn new(chain: &'static str, name: impl Into<String>, exprs: Vec<Expr>) -> Self {
        Rule {
            chain,
            name: name.into(),
            hint: None,
            exprs,
        }
    }

    /// A NEWRULE message appending this rule to its chain of `table`.
    pub(crate) fn message(&self, table: &str) -> Result<Message, NetfilterError> {
        let label = format!("rule '{}' in chain {}", self.name, self.chain);
        let mut w = MessageWriter::nft(
            sys::NFT_MSG_NEWRULE,
            FAMILY_INET,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
        );
        w.put_str(sys::NFTA_RULE_TABLE, table);
        w.put_str(sys::NFTA_RULE_CHAIN, self.chain);
        let mut parts = Vec::with_capacity(self.exprs.len());
        w.nest(sys::NFTA_RULE_EXPRESSIONS, |w| {
            for (index, expr) in self.exprs.iter().enumerate() {
                let start = w.offset();
                w.nest(sys::NFTA_LIST_ELEM, |w| expr.write(w));
                parts.push(Part {
                    start,
                    end: w.offset(),
                    name: format!("expression {} ({})", index + 1, expr.name()),
                });
            }
        });
        if let Some(comment) = comment_user_data(&self.name) {
            w.put(sys::NFTA_RULE_USERDATA, &comment);
        }
        Ok(Message {
            bytes: w.finish(&label)?,
            label,
            hint: self.hint.clone(),
            parts,
        })
    }
}

/// nft's rule comment TLV: type, length (with the NUL), text, NUL. Names too long for
/// a comment go without one.
fn comment_user_data(text: &str) -> Option<Vec<u8>> {
    let len = u8::try_from(text.len() + 1).ok()?;
    let mut tlv = Vec::with_capacity(text.len() + 3);
    tlv.push(UDATA_RULE_COMMENT);
    tlv.push(len);
    tlv.extend_from_slice(text.as_bytes());
    tlv.push(0);
    Some(tlv)
}

/// A named set of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetSpec {
    pub name: &'static str,
    /// nft's data type id (shown by `nft list`; the kernel only keeps it).
    pub key_type: u32,
    pub key_len: u32,
    /// The key is a host-order number (not network-order bytes).
    pub key_host_order: bool,
    /// Unique among the sets of one batch.
    pub id: u32,
    /// Dynamic: rules add elements (`update @set`), bounded by `size`, expiring after
    /// `timeout_ms` without an update.
    pub dynamic: Option<DynamicSet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DynamicSet {
    pub size: u32,
    pub timeout_ms: u64,
}

impl SetSpec {
    pub(crate) fn message(&self, table: &str) -> Result<Message, NetfilterError> {
        let label = format!("set {}", self.name);
        let mut w = MessageWriter::nft(sys::NFT_MSG_NEWSET, FAMILY_INET, NLM_F_ACK | NLM_F_CREATE);
        w.put_str(sys::NFTA_SET_TABLE, table);
        w.put_str(sys::NFTA_SET_NAME, self.name);
        let flags = match self.dynamic {
            Some(_) => sys::NFT_SET_EVAL | sys::NFT_SET_TIMEOUT,
            None => 0,
        };
        w.put_u32(sys::NFTA_SET_FLAGS, flags);
        w.put_u32(sys::NFTA_SET_KEY_TYPE, self.key_type);
        w.put_u32(sys::NFTA_SET_KEY_LEN, self.key_len);
        w.put_u32(sys::NFTA_SET_ID, self.id);
        if self.key_host_order {
            let mut tlv = vec![UDATA_SET_KEYBYTEORDER, 4];
            tlv.extend_from_slice(&NFT_BYTEORDER_HOST_ENDIAN.to_ne_bytes());
            w.put(sys::NFTA_SET_USERDATA, &tlv);
        }
        if let Some(dynamic) = &self.dynamic {
            w.put_u64(sys::NFTA_SET_TIMEOUT, dynamic.timeout_ms);
            w.nest(sys::NFTA_SET_DESC, |w| {
                w.put_u32(sys::NFTA_SET_DESC_SIZE, dynamic.size)
            });
        }
        Ok(Message::new(w.finish(&label)?, label))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nlattr header bytes: length then type, host order.
    fn nla(len: u16, kind: u16) -> Vec<u8> {
        let mut v = len.to_ne_bytes().to_vec();
        v.extend_from_slice(&kind.to_ne_bytes());
        v
    }

    fn attrs_of(mut w: MessageWriter) -> Vec<u8> {
        w.buf.split_off(HEADERS_LEN)
    }

    #[test]
    fn headers_are_nlmsghdr_then_nfgenmsg() {
        let bytes = MessageWriter::nft(sys::NFT_MSG_NEWRULE, FAMILY_INET, NLM_F_ACK)
            .finish("test")
            .unwrap();
        let mut expected = 20u32.to_ne_bytes().to_vec();
        expected.extend_from_slice(&0x0a06u16.to_ne_bytes()); // subsystem 10, NEWRULE
        expected.extend_from_slice(&0x0005u16.to_ne_bytes()); // REQUEST | ACK
        expected.extend_from_slice(&[0; 8]); // seq, port id
        expected.extend_from_slice(&[1, 0, 0, 0]); // inet, v0, res_id 0
        assert_eq!(bytes, expected);
    }

    #[test]
    fn u32_attribute_is_big_endian_and_strings_are_nul_padded() {
        let mut w = MessageWriter::nft(0, 0, 0);
        w.put_u32(3, 0x0102_0304);
        w.put_str(1, "abcd");
        let mut expected = nla(8, 3);
        expected.extend_from_slice(&[1, 2, 3, 4]);
        expected.extend_from_slice(&nla(9, 1));
        expected.extend_from_slice(b"abcd\0\0\0\0");
        assert_eq!(attrs_of(w), expected);
    }

    #[test]
    fn nest_sets_flag_and_covers_its_content() {
        let mut w = MessageWriter::nft(0, 0, 0);
        w.nest(2, |w| w.put(1, &[7, 7]));
        let mut expected = nla(12, 2 | 0x8000);
        expected.extend_from_slice(&nla(6, 1));
        expected.extend_from_slice(&[7, 7, 0, 0]);
        assert_eq!(attrs_of(w), expected);
    }

    #[test]
    fn oversized_nest_is_an_error_not_a_wrapped_length() {
        let mut w = MessageWriter::nft(0, 0, 0);
        w.nest(1, |w| w.put(2, &vec![0; 70_000]));
        assert!(matches!(
            w.finish("big"),
            Err(NetfilterError::InvalidPlan(why)) if why.contains("big")
        ));
    }

    #[test]
    fn socket_cgroupv2_expression_bytes() {
        let mut w = MessageWriter::nft(0, 0, 0);
        Expr::Socket {
            key: sys::NFT_SOCKET_CGROUPV2,
            level: Some(2),
        }
        .write(&mut w);
        let mut expected = nla(11, 1); // NFTA_EXPR_NAME
        expected.extend_from_slice(b"socket\0\0");
        expected.extend_from_slice(&nla(28, 2 | 0x8000)); // NFTA_EXPR_DATA
        for (kind, value) in [(1u16, 3u32), (2, 1), (3, 2)] {
            // key cgroupv2, dreg 1, level 2
            expected.extend_from_slice(&nla(8, kind));
            expected.extend_from_slice(&value.to_be_bytes());
        }
        assert_eq!(attrs_of(w), expected);
    }

    #[test]
    fn tproxy_is_port_only_family_unspec() {
        let mut w = MessageWriter::nft(0, 0, 0);
        Expr::Tproxy.write(&mut w);
        let mut expected = nla(11, 1);
        expected.extend_from_slice(b"tproxy\0\0");
        expected.extend_from_slice(&nla(20, 2 | 0x8000));
        expected.extend_from_slice(&nla(8, 1)); // NFTA_TPROXY_FAMILY
        expected.extend_from_slice(&0u32.to_be_bytes());
        expected.extend_from_slice(&nla(8, 3)); // NFTA_TPROXY_REG_PORT
        expected.extend_from_slice(&1u32.to_be_bytes());
        assert_eq!(attrs_of(w), expected);
    }

    #[test]
    fn goto_verdict_bytes() {
        let mut w = MessageWriter::nft(0, 0, 0);
        Expr::Verdict(Verdict::Goto("x".into())).write_data(&mut w);
        let mut expected = nla(8, 1); // dreg
        expected.extend_from_slice(&0u32.to_be_bytes()); // verdict register
        expected.extend_from_slice(&nla(24, 2 | 0x8000)); // NFTA_IMMEDIATE_DATA
        expected.extend_from_slice(&nla(20, 2 | 0x8000)); // NFTA_DATA_VERDICT
        expected.extend_from_slice(&nla(8, 1)); // code
        expected.extend_from_slice(&(-4i32).to_be_bytes()); // NFT_GOTO
        expected.extend_from_slice(&nla(6, 2)); // chain
        expected.extend_from_slice(b"x\0\0\0");
        assert_eq!(attrs_of(w), expected);
    }

    #[test]
    fn cmp_wraps_data_in_nft_data_value() {
        let mut w = MessageWriter::nft(0, 0, 0);
        Expr::Cmp(vec![6]).write_data(&mut w);
        let mut expected = nla(8, 1);
        expected.extend_from_slice(&1u32.to_be_bytes()); // sreg 1
        expected.extend_from_slice(&nla(8, 2));
        expected.extend_from_slice(&0u32.to_be_bytes()); // NFT_CMP_EQ
        expected.extend_from_slice(&nla(12, 3 | 0x8000));
        expected.extend_from_slice(&nla(5, 1));
        expected.extend_from_slice(&[6, 0, 0, 0]);
        assert_eq!(attrs_of(w), expected);
    }

    #[test]
    fn rule_message_records_expression_ranges_and_comment() {
        let rule = Rule::new(
            "prerouting",
            "t",
            vec![Expr::Counter, Expr::Verdict(Verdict::Accept)],
        );
        let msg = rule.message("tbl").unwrap();
        assert_eq!(msg.label, "rule 't' in chain prerouting");
        let len = u32::from_ne_bytes(msg.bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, msg.bytes.len());
        assert_eq!(msg.parts.len(), 2);
        let counter = &msg.parts[0];
        assert_eq!(counter.name, "expression 1 (counter)");
        // The part starts at its list element header.
        assert_eq!(
            &msg.bytes[counter.start + 2..counter.start + 4],
            &(1u16 | 0x8000).to_ne_bytes()
        );
        assert_eq!(msg.parts[1].start, counter.end);
        assert_eq!(
            msg.part_at(counter.end + 5).unwrap().name,
            "expression 2 (immediate)"
        );
        assert!(msg.part_at(3).is_none());
        // NFTA_RULE_USERDATA holding the comment TLV: type 0, length 2, "t\0".
        let mut comment = nla(8, 7);
        comment.extend_from_slice(&[0, 2, b't', 0]);
        assert!(msg.bytes.ends_with(&comment));
    }

    #[test]
    fn offsets_outside_expressions_name_the_attribute() {
        let rule = Rule::new("output", "r", vec![Expr::Counter]);
        let msg = rule.message("tbl").unwrap();
        // The first attribute, right after the headers, is the table name.
        assert_eq!(msg.describe_offset(HEADERS_LEN), "the table name \"tbl\"");
        assert_eq!(
            msg.describe_offset(HEADERS_LEN + 8),
            "the chain name \"output\""
        );
        assert_eq!(
            msg.describe_offset(msg.parts[0].start),
            "expression 1 (counter)"
        );
        assert_eq!(msg.describe_offset(9999), "byte 9999");
    }

    #[test]
    fn comments_too_long_are_left_out() {
        assert_eq!(comment_user_data("ab"), Some(vec![0, 3, b'a', b'b', 0]));
        assert_eq!(comment_user_data(&"x".repeat(255)), None);
    }
}
