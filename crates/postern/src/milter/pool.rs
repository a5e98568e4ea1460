//! Milter connections kept between SMTP sessions (`pool_size`, `pool_idle_timeout`).
//!
//! Opening a connection to a milter costs a connect, option negotiation (a round trip)
//! and, in libmilter, a new thread: for a relay whose clients send one message per
//! connection, that is paid for every message. Protocol version 6 lets the MTA keep
//! the connection instead: `SMFIC_QUIT_NC` ("quit, new connection follows") ends the
//! SMTP connection for the milter (its close callback runs, libmilter clears its
//! macros) and the next `SMFIC_CONNECT` starts another on the same milter connection,
//! without a new negotiation (libmilter's state table: `ST_Q_NC` leads to `ST_CONN`).
//!
//! QUIT_NC is sent when the connection is taken again, in the same write as the next
//! session's macros and CONNECT, not when it goes idle: after QUIT_NC libmilter takes
//! nothing but CONNECT, so an idle connection that expires could not be closed with
//! QUIT any more (libmilter would drop the QUIT and see the close as a failure); kept
//! in its end-of-message state it takes QUIT. The milter's close callback for a session
//! therefore runs when the next session begins, or at QUIT (`pool_idle_timeout` later
//! at most).
//!
//! A connection goes back to the pool only if its state is clear: the codec says the
//! milter will take QUIT_NC (`Session::can_quit_nc`: between transactions, version 6,
//! where libmilter's engine accepts it), it never failed (a failure drops the
//! connection where it happens: a timeout, a protocol error, a closed socket), and the
//! milter did not answer with a tempfail during the session (a milter in trouble gets
//! a fresh connection). The pool is bounded (`pool_size` idle connections; more are
//! closed with QUIT) and idle connections are closed after `pool_idle_timeout`, by a
//! task that ends with the pool. A connection taken from the pool is checked first: one
//! the milter closed meanwhile (or that holds bytes nobody asked for) is dropped; one
//! the milter closes in the instant between that check and its first answer is replaced
//! by a new connection (`Chain::mail`), so that neither fails a message.
//!
//! Each configuration has its own pools: a reload builds new [`Endpoint`]s, and the old
//! ones (with their idle connections, closed with QUIT) go when the last session of the
//! old configuration ends.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::conn::Conn;
use crate::config::Milter;

/// One `[[milter]]` as the sessions of one configuration share it: its settings and
/// its idle connections.
pub struct Endpoint {
    pub config: Milter,
    pool: Pool,
    /// A kept connection went unanswered: this milter's connections are not kept any
    /// more (until a reload makes a new endpoint).
    no_reuse: std::sync::atomic::AtomicBool,
}

struct Pool {
    /// Idle connections, the most recently used last, with the time they went idle.
    idle: Mutex<Vec<(Box<Conn>, Instant)>>,
}

/// How often the idle connections are looked at, at most (and at least every
/// `pool_idle_timeout / 2`).
const REAP_EVERY: Duration = Duration::from_secs(5);

impl Endpoint {
    /// The milter `config`; with a pool, a task closes its idle connections in time
    /// (started when there is a tokio runtime, as in the daemon and its tests).
    pub fn new(config: Milter) -> Arc<Endpoint> {
        let ep = Arc::new(Endpoint {
            config,
            pool: Pool {
                idle: Mutex::new(Vec::new()),
            },
            no_reuse: std::sync::atomic::AtomicBool::new(false),
        });
        if ep.config.pool_size > 0
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let every = (ep.config.pool_idle_timeout / 2)
                .min(REAP_EVERY)
                .max(Duration::from_millis(10));
            rt.spawn(reap(Arc::downgrade(&ep), every));
        }
        ep
    }

    /// An idle connection, the most recently used first, checked to be still open and
    /// quiet; `None`: open a new one.
    pub(super) fn take(&self) -> Option<Box<Conn>> {
        if self.reuse_stopped() {
            return None;
        }
        loop {
            let (mut conn, since) = self.lock().pop()?;
            if since.elapsed() >= self.config.pool_idle_timeout {
                // Expired (the reaper had not come yet); the rest are older still.
                let old = std::mem::take(&mut *self.lock());
                spawn_quits(std::iter::once(conn).chain(old.into_iter().map(|(c, _)| c)));
                return None;
            }
            // QUIT_NC goes out with the next command (CONNECT).
            if conn.is_quiet() && conn.quit_nc().is_ok() {
                conn.resume();
                return Some(conn);
            }
            // Closed by the milter (its own idle timeout, a restart): dropped.
        }
    }

    /// The SMTP session on `conn` is over: kept for the next one if its state allows it
    /// and there is room (QUIT_NC is sent when it is taken), otherwise QUIT and close.
    pub(super) async fn release(&self, mut conn: Box<Conn>) {
        if self.config.pool_size == 0 || self.reuse_stopped() || !conn.reusable() {
            conn.quit().await;
            return;
        }
        // An idle connection holds no big message's buffers (up to `pool_size` of them).
        conn.shrink_buffers();
        let full = {
            let mut idle = self.lock();
            if idle.len() < self.config.pool_size {
                idle.push((conn, Instant::now()));
                None
            } else {
                Some(conn)
            }
        };
        if let Some(conn) = full {
            conn.quit().await;
        }
    }

    /// A kept connection got no answer to the next session's CONNECT: keep none from
    /// now on (the idle ones are closed), and say so once.
    pub(super) fn stop_reuse(&self) {
        use std::sync::atomic::Ordering;
        if !self.no_reuse.swap(true, Ordering::Relaxed) {
            tracing::warn!(milter = %self.config.name, timeout = ?self.config.timeout,
                "a kept milter connection did not answer the next session's CONNECT; \
                 this milter's connections are no longer kept (set pool_size = 0 for it)");
            let idle = std::mem::take(&mut *self.lock());
            spawn_quits(idle.into_iter().map(|(c, _)| c));
        }
    }

    fn reuse_stopped(&self) -> bool {
        self.no_reuse.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Idle connections now (for the tests).
    #[cfg(test)]
    pub(super) fn idle(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Box<Conn>, Instant)>> {
        // A panic elsewhere while the lock was held leaves a plain Vec: still usable.
        self.pool.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Endpoint {
    /// The configuration is gone (a reload, shutdown): QUIT to the idle connections, if
    /// a runtime is there to send it; else they are just closed.
    fn drop(&mut self) {
        let idle = std::mem::take(&mut *self.lock());
        spawn_quits(idle.into_iter().map(|(c, _)| c));
    }
}

/// QUIT to `conns` in a task of their own, if there is a runtime (there is, wherever
/// connections are made); without one they are just closed.
fn spawn_quits(conns: impl Iterator<Item = Box<Conn>>) {
    let conns: Vec<Box<Conn>> = conns.collect();
    if conns.is_empty() {
        return;
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(quit_all(conns.into_iter()));
    }
}

async fn quit_all(conns: impl Iterator<Item = Box<Conn>>) {
    for c in conns {
        c.quit().await;
    }
}

/// Closes idle connections older than `pool_idle_timeout`, until the endpoint is gone.
async fn reap(ep: Weak<Endpoint>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(ep) = ep.upgrade() else {
            return;
        };
        let limit = ep.config.pool_idle_timeout;
        let expired: Vec<Box<Conn>> = {
            let mut idle = ep.lock();
            // Oldest first: the expired ones are a prefix.
            let n = idle
                .iter()
                .take_while(|(_, t)| t.elapsed() >= limit)
                .count();
            idle.drain(..n).map(|(c, _)| c).collect()
        };
        drop(ep);
        quit_all(expired.into_iter()).await;
    }
}
