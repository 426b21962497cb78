//! The agents' DNS over TCP: their connections to the handler, each query
//! on them decided as one over UDP.

use super::stream::Conn;
use super::{Asker, Handler, Via, CLIENT_BASE, MAX_CLIENTS};
use mio::{Interest, Token};
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

/// An agent's TCP connection to the handler.
pub(super) struct Client {
    pub(super) conn: Conn,
    pub(super) agent: SocketAddr,
    pub(super) asked: SocketAddr,
    pub(super) serial: u64,
    pub(super) last_active: Instant,
}

impl Handler {
    /// A TCP listener is ready: take its connections (at most MAX_CLIENTS open).
    pub(super) fn accept_clients(&mut self, index: usize) {
        loop {
            let Some(listener) = self.tcp_listeners.get(index) else {
                return;
            };
            let (stream, agent) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("dns: accepting a tcp query: {e}");
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                log::warn!("dns: {MAX_CLIENTS} tcp connections open: closing {agent}'s");
                continue;
            }
            let Ok(asked) = stream.local_addr() else {
                continue;
            };
            let entry = self.clients.vacant_entry();
            let key = entry.key();
            let mut conn = Conn::new(stream);
            if let Err(e) = self.poll.registry().register(
                &mut conn.stream,
                Token(CLIENT_BASE + key),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("dns: watching {agent}'s tcp connection: {e}");
                continue;
            }
            self.next_serial += 1;
            entry.insert(Client {
                conn,
                agent,
                asked,
                serial: self.next_serial,
                last_active: Instant::now(),
            });
            self.on_client(key);
        }
    }

    /// An agent's TCP connection is ready: its queries, and what waits to be written.
    pub(super) fn on_client(&mut self, key: usize) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        if client
            .conn
            .flush()
            .and_then(|()| client.conn.fill())
            .is_err()
        {
            self.clients.remove(key);
            return;
        }
        let asker = Asker {
            agent: client.agent,
            asked: client.asked,
            via: Via::Tcp {
                key,
                serial: client.serial,
            },
        };
        let mut queries = Vec::new();
        while let Some(query) = client.conn.next_message() {
            queries.push(query);
        }
        if !queries.is_empty() {
            client.last_active = Instant::now();
        }
        // A peer that closed its side may still read: answers to queries
        // just taken go out before it is dropped (or the idle timeout).
        let done = client.conn.overfull()
            || (client.conn.closed && client.conn.drained() && queries.is_empty());
        for query in queries {
            self.on_query(&query, asker);
        }
        if done {
            self.clients.remove(key);
        }
    }
}
