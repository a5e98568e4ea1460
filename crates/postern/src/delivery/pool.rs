//! A small cache of idle outbound connections, so consecutive messages to the same host
//! reuse one SMTP session instead of paying TCP + greeting + EHLO (+ TLS) each time.
//!
//! A connection is kept at most `IDLE_LIMIT` after its last transaction (Postfix keeps
//! them 2 s by default; servers commonly drop idle clients after 5 min, so a short limit
//! also avoids most "closed while idle" surprises), and at most `per_key` per host.
//! Stale connections are closed with QUIT by a sweeper.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::client::Connection;

pub const IDLE_LIMIT: Duration = Duration::from_secs(5);

/// Connections are interchangeable only for the same address, certificate name and
/// route (the route decides TLS and AUTH).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: SocketAddr,
    pub server_name: String,
    pub route: Option<usize>,
}

pub struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<(Connection, Instant)>>>,
    per_key: usize,
}

impl Pool {
    pub fn new(per_key: usize) -> Pool {
        Pool {
            idle: Mutex::new(HashMap::new()),
            per_key: per_key.max(1),
        }
    }

    /// An idle connection for `key`, if a fresh one is cached.
    pub fn take(&self, key: &PoolKey) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        while let Some((conn, since)) = list.pop() {
            if since.elapsed() < IDLE_LIMIT {
                return Some(conn);
            }
            tokio::spawn(conn.quit());
        }
        None
    }

    /// Offers a connection back after a successful transaction.
    pub fn put(&self, key: PoolKey, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < self.per_key {
            list.push((conn, Instant::now()));
        } else {
            tokio::spawn(conn.quit());
        }
    }

    /// Closes connections idle for longer than the limit; returns how many remain.
    pub fn sweep(&self) -> usize {
        let mut stale = Vec::new();
        let remaining = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            for list in idle.values_mut() {
                let (keep, old): (Vec<_>, Vec<_>) = list
                    .drain(..)
                    .partition(|(_, since)| since.elapsed() < IDLE_LIMIT);
                *list = keep;
                stale.extend(old.into_iter().map(|(c, _)| c));
            }
            idle.retain(|_, l| !l.is_empty());
            idle.values().map(Vec::len).sum()
        };
        for conn in stale {
            tokio::spawn(conn.quit());
        }
        remaining
    }

    /// Closes every idle connection (shutdown).
    pub async fn close_all(&self) {
        let all: Vec<Connection> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.drain()
                .flat_map(|(_, l)| l.into_iter().map(|(c, _)| c))
                .collect()
        };
        // Concurrently: one unresponsive host must not hold up the others.
        let mut quits = tokio::task::JoinSet::new();
        for conn in all {
            quits.spawn(conn.quit());
        }
        while quits.join_next().await.is_some() {}
    }
}
