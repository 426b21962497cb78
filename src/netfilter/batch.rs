//! Sending to nf_tables: one transaction (batch) on one NETLINK_NETFILTER socket with
//! every ack read and checked, and dumps (GET requests).

use super::decode::{self, Ack, NlMsg};
use super::encode::{Message, MessageWriter, FAMILY_UNSPEC, NLM_F_ACK};
use super::NetfilterError;
use crate::netlink::{set_buffer, RequestSocket, Wait};
use netlink_sys::protocols::NETLINK_NETFILTER;
use rustables::sys;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

/// Acks are queued by the time `send` returns (nfnetlink handles a batch in the sender's
/// context); the timeout only bounds the wait if that ever stops being true.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
const RECV_BUFFER: usize = 64 * 1024;
/// A dump of our table's rules or set elements is far smaller; stop reading past this.
const MAX_DUMP_BYTES: usize = 64 * 1024 * 1024;
/// Kernel accounting per queued ack is well under this (skb truesize).
const RCVBUF_PER_MESSAGE: usize = 2048;
/// How many of our recent batch sockets the monitor can recognise as ours.
const OWN_PORTS_KEPT: usize = 64;
/// BATCH_BEGIN's sequence number; the kernel reports a failed commit against it.
const BEGIN_SEQ: u32 = 0;

/// Port ids of the sockets this process sent batches from, newest last: nf_tables puts
/// the sender's port id on every change notification, so the monitor can tell our own
/// re-installs from someone else's deletions.
static OWN_PORTS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn remember_own_port(port: u32) {
    let mut ports = OWN_PORTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if ports.len() >= OWN_PORTS_KEPT {
        ports.remove(0);
    }
    ports.push(port);
}

/// Whether a change notification with this sender port id came from this process.
pub(crate) fn is_own_port(port: u32) -> bool {
    // Autobind gives a process's first netlink socket its pid as port id; no other
    // process can hold that one.
    port == std::process::id()
        || OWN_PORTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&port)
}

fn io_error(action: &'static str) -> impl FnOnce(io::Error) -> NetfilterError {
    move |source| NetfilterError::Io { action, source }
}

/// A NETLINK_NETFILTER socket with extended acks on.
fn open() -> Result<RequestSocket, NetfilterError> {
    RequestSocket::open(NETLINK_NETFILTER, Wait::Upto(ACK_TIMEOUT)).map_err(io_error("socket"))
}

/// One refused message of a batch (`index` None: the batch as a whole, e.g. its commit).
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub index: Option<usize>,
    pub ack: Ack,
}

/// Messages sent as one nf_tables transaction: all applied, or none.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub messages: Vec<Message>,
}

impl Batch {
    pub(crate) fn push(&mut self, message: Message) {
        self.messages.push(message);
    }

    /// BATCH_BEGIN (seq 0), the messages numbered 1..=n, BATCH_END.
    ///
    /// Only the last message asks for an ack. The kernel acks every refused message
    /// anyway, and sends all acks once it has processed the whole batch, in batch
    /// order (a failed commit is acked against BATCH_BEGIN before them): so the last
    /// message's ack means every refusal has arrived, and a big batch does not queue
    /// thousands of "0" acks.
    fn encode(&self) -> Result<Vec<u8>, NetfilterError> {
        let subsystem = sys::NFNL_SUBSYS_NFTABLES as u16;
        let begin = MessageWriter::raw(
            sys::NFNL_MSG_BATCH_BEGIN as u16,
            FAMILY_UNSPEC,
            0,
            subsystem,
        )
        .finish("batch begin")?;
        let end = MessageWriter::raw(sys::NFNL_MSG_BATCH_END as u16, FAMILY_UNSPEC, 0, subsystem)
            .finish("batch end")?;
        let total =
            begin.len() + end.len() + self.messages.iter().map(|m| m.bytes.len()).sum::<usize>();
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&begin);
        let last = self.messages.len().saturating_sub(1);
        for (index, message) in self.messages.iter().enumerate() {
            let start = out.len();
            out.extend_from_slice(&message.bytes);
            let header = out.get_mut(start..start + 12).ok_or_else(|| {
                NetfilterError::Protocol(format!("{} has no netlink header", message.label))
            })?;
            let mut flags = u16::from_ne_bytes([header[6], header[7]]) & !NLM_F_ACK;
            if index == last {
                flags |= NLM_F_ACK;
            }
            header[6..8].copy_from_slice(&flags.to_ne_bytes());
            header[8..12].copy_from_slice(&seq_of(index).to_ne_bytes());
        }
        let start = out.len();
        out.extend_from_slice(&end);
        out[start + 8..start + 12].copy_from_slice(&seq_of(self.messages.len()).to_ne_bytes());
        Ok(out)
    }

    /// Sends the batch and reads every ack. Ok(empty) means the kernel committed it;
    /// otherwise it aborted the whole batch and these are the refusals, in batch order.
    pub(crate) fn transact(&self) -> Result<Vec<Refusal>, NetfilterError> {
        let Some(last_seq) = self.messages.len().checked_sub(1).map(seq_of) else {
            return Ok(Vec::new());
        };
        let bytes = self.encode()?;
        let socket = open()?;
        set_buffer(
            socket.socket(),
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            bytes.len() + RECV_BUFFER,
        );
        // Room for every message to be refused (a refused table makes all the rest fail).
        set_buffer(
            socket.socket(),
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            (self.messages.len() + 1) * RCVBUF_PER_MESSAGE + RECV_BUFFER,
        );
        remember_own_port(socket.port());
        socket.send(&bytes).map_err(io_error("send"))?;

        let mut refusals = Vec::new();
        let mut buf = Vec::with_capacity(RECV_BUFFER);
        loop {
            socket.recv(&mut buf).map_err(|source| {
                match (source.kind(), source.raw_os_error()) {
                    (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, _) => {
                        NetfilterError::Protocol(format!(
                            "no ack for the batch within {ACK_TIMEOUT:?}"
                        ))
                    }
                    // Only refusals are acked besides the last message: an overrun
                    // means many refusals, so the batch was aborted.
                    (_, Some(libc::ENOBUFS)) => NetfilterError::Protocol(
                        "the kernel refused the batch with more refusals than the receive \
                         buffer holds; nothing was changed"
                            .into(),
                    ),
                    _ => NetfilterError::Io {
                        action: "recv ack",
                        source,
                    },
                }
            })?;
            for msg in decode::messages(&buf)? {
                if msg.kind != libc::NLMSG_ERROR as u16 {
                    continue;
                }
                let ack = decode::ack(&msg)?;
                let seq = ack.seq;
                let index = (seq != BEGIN_SEQ).then(|| seq as usize - 1);
                if index.is_some_and(|i| i >= self.messages.len()) {
                    return Err(NetfilterError::Protocol(format!(
                        "ack for unknown sequence number {seq}"
                    )));
                }
                if ack.errno != 0 {
                    refusals.push(Refusal { index, ack });
                }
                // Nothing follows an ack of the last message; an error on BATCH_BEGIN
                // may be the batch's framing (then nothing else comes) or its commit
                // (the rest would only repeat what was already sent).
                if seq == last_seq || seq == BEGIN_SEQ {
                    refusals.sort_by_key(|r| r.index);
                    return Ok(refusals);
                }
            }
        }
    }

    /// Sends the batch; Ok once the kernel has committed all of it.
    pub(crate) fn commit(&self) -> Result<(), NetfilterError> {
        let refusals = self.transact()?;
        match refusals.first() {
            None => Ok(()),
            Some(first) => Err(self.refusal_error(first, refusals.len() - 1)),
        }
    }

    /// The error for a refusal: which message, which part of it, the kernel's words.
    pub(crate) fn refusal_error(&self, refusal: &Refusal, also_refused: usize) -> NetfilterError {
        let message = refusal.index.and_then(|i| self.messages.get(i));
        let part = message.and_then(|m| Some(m.describe_offset(refusal.ack.offset?)));
        NetfilterError::Refused {
            item: message
                .map(|m| m.label.clone())
                .unwrap_or_else(|| "the batch".to_string()),
            part,
            errno: refusal.ack.errno,
            kernel_message: refusal.ack.message.clone(),
            hint: message.and_then(|m| m.hint.clone()),
            also_refused,
        }
    }
}

fn seq_of(index: usize) -> u32 {
    index as u32 + 1
}

/// Sends a GET request with NLM_F_DUMP and hands every reply message to `each`.
/// A refusal (e.g. ENOENT: no such table) becomes `Refused` naming `what`.
pub(crate) fn dump(
    request: MessageWriter,
    what: &str,
    mut each: impl FnMut(&NlMsg<'_>) -> Result<(), NetfilterError>,
) -> Result<(), NetfilterError> {
    let mut bytes = request.finish(what)?;
    bytes[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let socket = open()?;
    socket.send(&bytes).map_err(io_error("send"))?;
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    let mut total = 0usize;
    loop {
        socket.recv(&mut buf).map_err(io_error("recv dump"))?;
        total += buf.len();
        if total > MAX_DUMP_BYTES {
            return Err(NetfilterError::Protocol(format!(
                "dump of {what} exceeds {MAX_DUMP_BYTES} bytes"
            )));
        }
        for msg in decode::messages(&buf)? {
            match msg.kind as libc::c_int {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => {
                    let ack = decode::ack(&msg)?;
                    if ack.errno == 0 {
                        return Ok(());
                    }
                    return Err(NetfilterError::Refused {
                        item: what.to_string(),
                        part: None,
                        errno: ack.errno,
                        kernel_message: ack.message,
                        hint: None,
                        also_refused: 0,
                    });
                }
                _ => each(&msg)?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::encode::{NLM_F_CREATE, NLM_F_REQUEST};

    fn message(label: &str) -> Message {
        let bytes = MessageWriter::nft(sys::NFT_MSG_NEWTABLE, 1, NLM_F_ACK | NLM_F_CREATE)
            .finish(label)
            .unwrap();
        Message::new(bytes, label.into())
    }

    #[test]
    fn batch_is_framed_numbered_and_asks_one_ack() {
        let batch = Batch {
            messages: vec![message("a"), message("b"), message("c")],
        };
        let bytes = batch.encode().unwrap();
        let msgs = decode::messages(&bytes).unwrap();
        let kinds: Vec<u16> = msgs.iter().map(|m| m.kind).collect();
        let table = crate::netfilter::encode::nft_type(sys::NFT_MSG_NEWTABLE);
        assert_eq!(
            kinds,
            [
                sys::NFNL_MSG_BATCH_BEGIN as u16,
                table,
                table,
                table,
                sys::NFNL_MSG_BATCH_END as u16
            ]
        );
        let seqs: Vec<u32> = msgs
            .iter()
            .map(|m| u32::from_ne_bytes(m.raw[8..12].try_into().unwrap()))
            .collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
        let flags: Vec<u16> = msgs.iter().map(|m| m.flags).collect();
        let create = NLM_F_REQUEST | NLM_F_CREATE;
        assert_eq!(
            flags,
            [
                NLM_F_REQUEST,
                create,
                create,
                create | NLM_F_ACK,
                NLM_F_REQUEST
            ]
        );
        // BATCH_BEGIN names the nf_tables subsystem, big-endian, as res_id.
        assert_eq!(
            &msgs[0].body[2..4],
            &(sys::NFNL_SUBSYS_NFTABLES as u16).to_be_bytes()
        );
    }

    #[test]
    fn refusal_error_names_message_part_and_hint() {
        let mut rule = crate::netfilter::encode::Rule::new(
            "prerouting",
            "tproxy to proxy",
            vec![crate::netfilter::encode::Expr::Tproxy],
        );
        rule.hint = Some("modprobe nft_tproxy".into());
        let msg = rule.message("t").unwrap();
        let offset = msg.parts[0].start + 4;
        let batch = Batch {
            messages: vec![message("table inet t"), msg],
        };
        let refusal = Refusal {
            index: Some(1),
            ack: Ack {
                seq: 2,
                errno: libc::ENOENT,
                message: None,
                offset: Some(offset),
            },
        };
        let text = batch.refusal_error(&refusal, 2).to_string();
        assert!(text.starts_with(
            "kernel refused rule 'tproxy to proxy' in chain prerouting at expression 1 (tproxy): "
        ), "{text}");
        assert!(
            text.contains("(modprobe nft_tproxy); 2 more message(s)"),
            "{text}"
        );
    }
}
