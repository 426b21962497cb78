// SPDX-License-Identifier: GPL-3.0-or-later
//! The upstream UDP sockets forwarded queries share. A socket made, bound,
//! connected, registered and closed for every query was an eighth of the
//! handler's CPU; here a few connected sockets per server carry many queries
//! at once, told apart by ids unique on their socket, and each retires after
//! [`RETIRE_AFTER`] queries so the source port keeps changing. Connected to
//! the server, a socket takes answers from nobody else.

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use slab::Slab;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// Queries waiting on one socket at most.
const IN_FLIGHT_MAX: usize = 64;
/// Queries a socket carries before it takes no more (and closes once idle).
const RETIRE_AFTER: u32 = 256;

struct Pooled {
    socket: UdpSocket,
    server: SocketAddr,
    /// Our id of each waiting query → its pending key.
    waiting: HashMap<u16, usize>,
    sent: u32,
    /// Tells this socket from a later one in the same slot.
    serial: u64,
}

/// Where a forwarded query waits.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ticket {
    slot: usize,
    serial: u64,
    /// The id the query went out with.
    pub(super) id: u16,
}

/// What one read of a pooled socket found.
pub(super) enum Arrival {
    /// An answer with the id of a waiting query, `len` bytes into the buffer.
    Answer {
        key: usize,
        len: usize,
    },
    /// A datagram no query waits for (late, stray, or a runt): read on.
    Stray,
    Drained,
    /// The socket reported an error (the server refused, an ICMP
    /// unreachable): these queries must go to the next server.
    Failed {
        keys: Vec<usize>,
        why: String,
    },
}

pub(super) struct Pool {
    sockets: Slab<Pooled>,
    /// Token of slot 0.
    token_base: usize,
    next_serial: u64,
}

impl Pool {
    pub(super) fn new(token_base: usize) -> Pool {
        Pool {
            sockets: Slab::new(),
            token_base,
            next_serial: 0,
        }
    }

    /// Sends `query` to `server` for pending query `key`, on a socket with
    /// room; its id is replaced by one no other query on that socket has.
    pub(super) fn send(
        &mut self,
        registry: &Registry,
        server: SocketAddr,
        query: &mut [u8],
        key: usize,
    ) -> io::Result<Ticket> {
        if query.len() < 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a query without its id",
            ));
        }
        let open = self.sockets.iter().find(|(_, s)| {
            s.server == server && s.sent < RETIRE_AFTER && s.waiting.len() < IN_FLIGHT_MAX
        });
        let slot = match open {
            Some((slot, _)) => slot,
            None => self.open(registry, server)?,
        };
        let Some(pooled) = self.sockets.get_mut(slot) else {
            return Err(io::Error::other("pooled socket gone"));
        };
        let id = loop {
            let id = rand::random::<u16>();
            if !pooled.waiting.contains_key(&id) {
                break id;
            }
        };
        query[..2].copy_from_slice(&id.to_be_bytes());
        pooled.sent += 1;
        if let Err(e) = pooled.socket.send(query) {
            // Whatever the socket has to say, no new query goes through it.
            pooled.sent = RETIRE_AFTER;
            self.close_if_idle(slot);
            return Err(e);
        }
        pooled.waiting.insert(id, key);
        Ok(Ticket {
            slot,
            serial: pooled.serial,
            id,
        })
    }

    fn open(&mut self, registry: &Registry, server: SocketAddr) -> io::Result<usize> {
        let local = match server {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let mut socket = UdpSocket::bind(local)?;
        socket.connect(server)?;
        let entry = self.sockets.vacant_entry();
        registry.register(
            &mut socket,
            Token(self.token_base + entry.key()),
            Interest::READABLE,
        )?;
        self.next_serial += 1;
        let slot = entry.key();
        entry.insert(Pooled {
            socket,
            server,
            waiting: HashMap::new(),
            sent: 0,
            serial: self.next_serial,
        });
        Ok(slot)
    }

    /// The query no longer waits (answered, timed out, given up).
    pub(super) fn release(&mut self, ticket: Ticket) {
        let Some(pooled) = self.sockets.get_mut(ticket.slot) else {
            return;
        };
        if pooled.serial != ticket.serial {
            return;
        }
        pooled.waiting.remove(&ticket.id);
        self.close_if_idle(ticket.slot);
    }

    fn close_if_idle(&mut self, slot: usize) {
        if self
            .sockets
            .get(slot)
            .is_some_and(|p| p.sent >= RETIRE_AFTER && p.waiting.is_empty())
        {
            // Closing it takes it out of the epoll set.
            self.sockets.remove(slot);
        }
    }

    /// Reads one datagram from the socket in `slot` into `buf`.
    pub(super) fn receive(&mut self, slot: usize, buf: &mut [u8]) -> Arrival {
        let Some(pooled) = self.sockets.get_mut(slot) else {
            return Arrival::Drained;
        };
        match pooled.socket.recv(buf) {
            Ok(n) if n >= 2 => match pooled.waiting.get(&u16::from_be_bytes([buf[0], buf[1]])) {
                Some(&key) => Arrival::Answer { key, len: n },
                None => Arrival::Stray,
            },
            Ok(_) => Arrival::Stray,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Arrival::Drained,
            Err(e) => {
                let pooled = self.sockets.remove(slot);
                Arrival::Failed {
                    keys: pooled.waiting.into_values().collect(),
                    why: e.to_string(),
                }
            }
        }
    }

    #[cfg(test)]
    fn sockets(&self) -> usize {
        self.sockets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::Poll;

    fn server() -> (std::net::UdpSocket, SocketAddr) {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        (s, addr)
    }

    #[test]
    fn queries_share_a_socket_with_distinct_ids_and_answers_find_their_query() {
        let poll = Poll::new().unwrap();
        let mut pool = Pool::new(1000);
        let (upstream, addr) = server();
        let mut tickets = Vec::new();
        for key in 0..10 {
            let mut query = vec![0, 0, 1, 2, 3];
            let ticket = pool.send(poll.registry(), addr, &mut query, key).unwrap();
            assert_eq!(query[..2], ticket.id.to_be_bytes());
            tickets.push(ticket);
        }
        assert_eq!(pool.sockets(), 1, "ten queries, one socket");
        let mut ids: Vec<u16> = tickets.iter().map(|t| t.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 10);
        // The server answers the seventh query, and sends a stray.
        let mut got = [0u8; 64];
        let mut from = None;
        for _ in 0..10 {
            let (n, peer) = upstream.recv_from(&mut got).unwrap();
            assert_eq!(n, 5);
            from = Some(peer);
        }
        let peer = from.unwrap();
        let stray = (0..=u16::MAX)
            .find(|i| !ids.contains(i))
            .unwrap()
            .to_be_bytes();
        upstream.send_to(&[stray[0], stray[1], 9], peer).unwrap();
        let id = tickets[7].id.to_be_bytes();
        upstream.send_to(&[id[0], id[1], 7, 7], peer).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut buf = [0u8; 64];
        let slot = 0;
        let mut arrivals = Vec::new();
        loop {
            match pool.receive(slot, &mut buf) {
                Arrival::Answer { key, len } => arrivals.push(Some((key, len))),
                Arrival::Stray => arrivals.push(None),
                Arrival::Drained => break,
                Arrival::Failed { why, .. } => panic!("{why}"),
            }
        }
        assert_eq!(arrivals, vec![None, Some((7, 4))]);
    }

    #[test]
    fn a_socket_retires_after_its_queries_and_closes_once_idle() {
        let poll = Poll::new().unwrap();
        let mut pool = Pool::new(0);
        let (_upstream, addr) = server();
        let send = |pool: &mut Pool, key| {
            let mut query = vec![0, 0, 1];
            pool.send(poll.registry(), addr, &mut query, key).unwrap()
        };
        // Answered (released) as they go: one socket carries them all.
        for key in 0..RETIRE_AFTER as usize - 1 {
            let ticket = send(&mut pool, key);
            pool.release(ticket);
        }
        let last = send(&mut pool, 0);
        assert_eq!(pool.sockets(), 1);
        // Retired but still waited on: the next query takes a new socket.
        let next = send(&mut pool, 1);
        assert_eq!(pool.sockets(), 2);
        assert_ne!(next.serial, last.serial);
        pool.release(last);
        assert_eq!(pool.sockets(), 1, "the retired socket closed once idle");
    }

    #[test]
    fn a_refused_socket_hands_back_every_query_waiting_on_it() {
        let poll = Poll::new().unwrap();
        let mut pool = Pool::new(0);
        // Nothing listens there: the kernel answers with port unreachable.
        let (closed, addr) = server();
        drop(closed);
        let mut query = vec![0, 0, 1];
        pool.send(poll.registry(), addr, &mut query, 4).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut buf = [0u8; 16];
        match pool.receive(0, &mut buf) {
            Arrival::Failed { keys, why } => assert_eq!(keys, vec![4], "{why}"),
            _ => panic!("the refusal was not reported"),
        }
        assert_eq!(pool.sockets(), 0);
    }
}
