//! Test helpers for Postern's integration tests: a real DNS responder
//! ([`DnsServer`]), a scriptable capturing SMTP server ([`Sink`]), a test
//! certificate authority ([`TestCa`]) and a real `redis-server` ([`RedisServer`]), all
//! on loopback and all synchronous
//! (std threads and std sockets, no async runtime), so blocking tests can use
//! them directly. Everything stops when dropped.

pub mod ca;
pub mod dns;
pub mod redis;
pub mod sink;

pub use ca::{TestCa, TlsIdentity};
pub use dns::DnsServer;
pub use redis::{RedisServer, RedisTls};
pub use sink::{ReceivedMessage, Sink, SinkConfig};

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, ignoring poisoning: a panic in one connection thread (for
/// example in a user-supplied reply closure) must not break the whole helper.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
