//! SMTP AUTH for clients: the answer to the protocol core's "are these credentials good?"
//! (`postern_smtp::AuthRequest`), and whose sender addresses an authenticated user may use.
//!
//! - [`users`]: the users file (argon2id hashes), its atomic rewriting by `postern user`,
//!   and its reloading when it changes;
//! - [`password`]: Argon2id hashing and checking;
//! - [`limiter`]: failure counts and lockouts, pure, with the clock passed in.
//!
//! This module adds what needs a runtime: password checks on blocking threads, bounded by a
//! semaphore; the tarpit (a growing delay before each 535); the log lines fail2ban
//! reads (`docs/auth.md`, "Log lines"); and, with `[cluster]`, the counts and lockouts
//! every node shares (`crate::cluster::lockout`): while Redis answers, its lockouts refuse
//! on every node; the local limiter records every attempt all the same, so a node whose
//! Redis is down or slow goes on counting on its own.
//!
//! Trust: everything in an `AuthRequest` is hostile: the user name reaches the logs only
//! escaped and shortened, the password reaches nothing but Argon2, and how long an answer
//! takes does not depend on whether the name exists. The users file is the operator's (see
//! [`users`]).

pub mod limiter;
pub mod password;
pub mod users;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::cluster::lockout::Settled as SharedSettled;
use crate::maillog;

use postern_smtp::{AuthRequest, Reply, catalogue};
use tokio::sync::Semaphore;

use self::limiter::{FailureOutcome, Limiter, Lockout, Settings};
use self::users::UsersSource;

/// Delay before a 535, per failure of the client address in the current window.
pub const TARPIT_STEP: Duration = Duration::from_millis(250);
/// The longest delay before a 535.
pub const TARPIT_MAX: Duration = Duration::from_secs(5);
/// User names longer than this are shortened in log lines.
const LOGGED_NAME_MAX: usize = 64;

/// What can go wrong loading or editing the users file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// `[auth] users_file` is not set.
    #[error("no users file: set users_file in the [auth] section of the configuration")]
    NoUsersFile,
    /// The users file cannot be read or written.
    #[error("users file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line of the users file is wrong.
    #[error("{}:{line}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// `postern user add` of a name that is already there.
    #[error("user `{0}` already exists (use `postern user passwd` to change the password)")]
    UserExists(String),
    /// `postern user passwd` or `del` of a name that is not there.
    #[error("no user `{0}` in the users file")]
    NoSuchUser(String),
    /// A user name the file cannot hold.
    #[error("{0}")]
    BadName(String),
    /// Argon2 refused to hash (does not happen with the default parameters).
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// Checks AUTH attempts; one for the whole server, shared by all sessions.
pub struct Authenticator {
    users: Arc<UsersSource>,
    /// Shared with the authenticator a reload replaces this one with: failures and
    /// lockouts outlive a reload.
    limiter: Arc<Mutex<Limiter>>,
    /// The lockout settings of this configuration, given to the shared limiter when the
    /// configuration takes effect ([`Authenticator::activate`]).
    settings: Settings,
    /// One permit per CPU: how many password checks run at once.
    hashing: Arc<Semaphore>,
    restrict_senders: bool,
    /// `[cluster]`: the counts shared with the other nodes (untrusted clients only).
    cluster: Option<Arc<Cluster>>,
}

/// The outcome of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Ok,
    BadPassword,
    UnknownUser,
    /// PLAIN with an authorization identity other than the user name.
    AuthzidMismatch {
        known: bool,
    },
}

impl Check {
    fn reason(self) -> &'static str {
        match self {
            Check::Ok => "ok",
            Check::BadPassword => "bad password",
            Check::UnknownUser => "unknown user",
            Check::AuthzidMismatch { .. } => "authzid not allowed",
        }
    }

    fn known_user(self) -> bool {
        match self {
            Check::Ok | Check::BadPassword => true,
            Check::UnknownUser => false,
            Check::AuthzidMismatch { known } => known,
        }
    }
}

/// What the limiter made of a checked attempt.
enum Settled {
    Refused(Lockout),
    Granted,
    Failed(FailureOutcome),
}

/// The clock: tokio's, so that tests with paused time control it too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Authenticator {
    /// Loads the users file (`auth.users_file`); an error names the file and line. IPv6
    /// clients are counted per block of `ipv6_prefix` bits (the top-level key).
    pub fn new(auth: &crate::config::Auth, ipv6_prefix: u8) -> Result<Authenticator, AuthError> {
        Authenticator::reloaded(auth, ipv6_prefix, None)
    }

    /// The authenticator of a reloaded configuration: the users file read again, the new
    /// lockout settings, and the failures and lockouts `previous` has counted so far.
    pub fn reloaded(
        auth: &crate::config::Auth,
        ipv6_prefix: u8,
        previous: Option<&Authenticator>,
    ) -> Result<Authenticator, AuthError> {
        let path = auth.users_file.as_ref().ok_or(AuthError::NoUsersFile)?;
        let users = UsersSource::open(path, now())?;
        // Made now rather than at the first unknown name, which would then answer slower.
        let _ = password::dummy_hash();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let settings = Settings::from_config(auth, ipv6_prefix);
        Ok(Authenticator {
            users: Arc::new(users),
            limiter: match previous {
                Some(p) => Arc::clone(&p.limiter),
                None => Arc::new(Mutex::new(Limiter::new(settings))),
            },
            settings,
            // One bound on password checks for the whole server, across reloads.
            hashing: previous.map_or_else(
                || Arc::new(Semaphore::new(cpus)),
                |p| Arc::clone(&p.hashing),
            ),
            restrict_senders: auth.restrict_senders,
            cluster: None,
        })
    }

    /// Shares failure counts and lockouts with the other nodes through `cluster`.
    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Authenticator {
        self.cluster = cluster;
        self
    }

    /// Makes this authenticator's lockout settings those of the limiter it shares (a
    /// reload that took effect; until then the previous ones apply).
    pub fn activate(&self) {
        self.limiter().set_settings(self.settings);
    }

    fn limiter(&self) -> std::sync::MutexGuard<'_, Limiter> {
        // The limiter's state is consistent after any panic (plain counters): keep going.
        self.limiter.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One AUTH attempt, the whole decision, including the tarpit delay (it sleeps before
    /// returning a failure). `trusted`: the client is in trusted_networks (never locked
    /// out). `Ok(identity)`: the caller sends 235; `Err(reply)`: the caller sends that
    /// reply (535 5.7.8 for bad credentials, 454 4.7.0 while locked out).
    pub async fn authenticate(
        &self,
        client: IpAddr,
        trusted: bool,
        request: &AuthRequest,
    ) -> Result<String, Reply> {
        let name = request.username.as_str();
        let mut locked = self.limiter().check(client, name, trusted, now());
        // One AUTH waits on Redis at most `[cluster] timeout` in all, its check and its
        // settling together.
        let mut redis_left = self
            .cluster
            .as_ref()
            .map_or(Duration::ZERO, |c| c.timeout());
        if locked.is_none()
            && !trusted
            && let Some(c) = &self.cluster
        {
            let asked = Instant::now();
            locked = c
                .auth_check(client, name, &self.settings, redis_left)
                .await
                .flatten();
            redis_left = redis_left.saturating_sub(asked.elapsed());
        }
        if let Some(lock) = locked {
            log_refused(client, name, lock);
            return Err(catalogue::auth_temporarily_refused());
        }

        let check = match &request.authzid {
            // PLAIN's authzid asks to act as someone else; nobody may.
            Some(z) if !z.is_empty() && z != name => Check::AuthzidMismatch {
                known: self.users.snapshot().get(name).is_some(),
            },
            _ => match self.check_password(name, &request.password).await {
                Some(check) => check,
                None => return Err(catalogue::auth_temporarily_refused()),
            },
        };

        let outcome = match self.settle(client, name, trusted, check, redis_left).await {
            Settled::Refused(lock) => {
                log_refused(client, name, lock);
                return Err(catalogue::auth_temporarily_refused());
            }
            Settled::Granted => {
                maillog::auth_ok(client, &LogName(name), request.mechanism);
                return Ok(name.to_string());
            }
            Settled::Failed(outcome) => outcome,
        };
        maillog::auth_failed(client, &LogName(name), check.reason());
        for lock in &outcome.started {
            maillog::auth_lockout(
                client,
                &LogName(name),
                lock.scope.as_str(),
                &Until(lock.remaining),
            );
        }
        tokio::time::sleep(tarpit(outcome.ip_failures)).await;
        Err(catalogue::auth_failed())
    }

    /// Record the outcome of a check in the limiter (and in Redis). Other attempts may
    /// have started a lockout while this one was being checked: a burst of parallel
    /// guesses must not get past it, so the lockout is looked at again first, locally and
    /// in Redis (whose script checks and records in one atomic step, so a burst spread
    /// over several nodes cannot get past it either). Redis is asked first and the local
    /// limiter's lock is only taken after it answered: no lock is held across an await.
    /// `redis_left`: what the attempt may still wait on Redis.
    async fn settle(
        &self,
        client: IpAddr,
        name: &str,
        trusted: bool,
        check: Check,
        redis_left: Duration,
    ) -> Settled {
        let ok = check == Check::Ok;
        let shared = match &self.cluster {
            Some(c) if !trusted => {
                c.auth_settle(
                    client,
                    name,
                    check.known_user(),
                    ok,
                    &self.settings,
                    redis_left,
                )
                .await
            }
            _ => None,
        };
        let now = now();
        let mut limiter = self.limiter();
        if let Some(lock) = limiter.check(client, name, trusted, now) {
            return Settled::Refused(lock);
        }
        match shared {
            // Refused by Redis, which did not count it: nor does the local limiter.
            Some(SharedSettled::Refused(lock)) => Settled::Refused(lock),
            _ if ok => {
                limiter.record_success(name, now);
                Settled::Granted
            }
            shared => {
                let known = check.known_user().then_some(name);
                let mut outcome = limiter.record_failure(client, known, trusted, now);
                if let Some(SharedSettled::Failed(s)) = shared {
                    merge(&mut outcome, s);
                }
                Settled::Failed(outcome)
            }
        }
    }

    /// Check the password on a blocking thread, at most one per CPU at a time. An unknown
    /// name costs one check against a dummy hash. `None` when the check could not run.
    async fn check_password(&self, name: &str, password: &str) -> Option<Check> {
        // The permit moves into the blocking task, so a check that outlives this future
        // (the client hung up) still holds its CPU slot until it is done.
        let permit = match Arc::clone(&self.hashing).acquire_owned().await {
            Ok(p) => p,
            Err(_) => return None, // closed: never happens, the semaphore is never closed
        };
        let users = Arc::clone(&self.users);
        let (name, secret) = (name.to_string(), password.to_string());
        let now = now();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let users = users.current(now);
            match users.get(&name) {
                Some(user) if password::verify(&secret, &user.hash) => Check::Ok,
                Some(_) => Check::BadPassword,
                None => {
                    password::verify(&secret, password::dummy_hash());
                    Check::UnknownUser
                }
            }
        });
        match task.await {
            Ok(check) => Some(check),
            Err(e) => {
                tracing::error!(error = %e, "password check failed");
                None
            }
        }
    }

    /// True when the users file has `name` (for `postern check-policy --auth`, which
    /// checks no password and says when the user does not exist).
    pub fn knows(&self, name: &str) -> bool {
        self.users.snapshot().get(name).is_some()
    }

    /// Anti-spoofing: may `identity` (the name it authenticated with) use `sender` as
    /// MAIL FROM (`""` = the null sender)? Always yes unless `[auth] restrict_senders`.
    /// With it: the null sender, the identity itself when it is an address, and the
    /// addresses listed for the user in the users file. Compared without regard to case.
    pub fn may_send_as(&self, identity: &str, sender: &str) -> bool {
        if !self.restrict_senders {
            return true;
        }
        let sender = sender
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .unwrap_or(sender);
        if sender.is_empty() || same_address(identity, sender) {
            return true;
        }
        self.users
            .snapshot()
            .get(identity)
            .is_some_and(|u| u.addresses.iter().any(|a| same_address(a, sender)))
    }
}

/// The local and the shared outcome of one failure as one: the larger failure count (the
/// tarpit), and every lockout either started, once per scope, the address's first.
fn merge(local: &mut FailureOutcome, shared: FailureOutcome) {
    local.ip_failures = local.ip_failures.max(shared.ip_failures);
    for lock in shared.started {
        if !local.started.iter().any(|l| l.scope == lock.scope) {
            local.started.push(lock);
        }
    }
    local.started.sort_by_key(|l| l.scope != limiter::Scope::Ip);
}

/// Two addresses are the same mailbox, ignoring case (in practice no two mailboxes differ
/// only by case, and users do not always type theirs the same way).
fn same_address(a: &str, b: &str) -> bool {
    a.contains('@') && a.to_lowercase() == b.to_lowercase()
}

/// The delay before a 535: [`TARPIT_STEP`] per failure of the address in the window,
/// at most [`TARPIT_MAX`].
pub fn tarpit(ip_failures: u32) -> Duration {
    TARPIT_STEP.saturating_mul(ip_failures).min(TARPIT_MAX)
}

fn log_refused(client: IpAddr, name: &str, lock: Lockout) {
    maillog::auth_refused(
        client,
        &LogName(name),
        lock.scope.as_str(),
        &Until(lock.remaining),
    );
}

/// A client's user name in a log line. Names made of letters, digits and `.@_+-` are
/// written as they are; anything else (spaces, `=`, quotes, control characters, newlines)
/// is written quoted and escaped, so a name cannot forge a field or a line that fail2ban
/// would read. Long names are cut.
struct LogName<'a>(&'a str);

impl std::fmt::Display for LogName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut = match self.0.char_indices().nth(LOGGED_NAME_MAX) {
            Some((i, _)) => &self.0[..i],
            None => self.0,
        };
        let plain = !cut.is_empty()
            && cut
                .chars()
                .all(|c| c.is_alphanumeric() || "._@+-".contains(c));
        if plain {
            f.write_str(cut)?;
        } else {
            // Debug quotes and escapes `"`, `\`, control and non-printable characters.
            write!(f, "{:?}", cut)?;
        }
        if cut.len() < self.0.len() {
            f.write_str("...")?;
        }
        Ok(())
    }
}

/// When a lockout ends, as UTC wall-clock time (`2026-11-29T09:43:00Z`).
struct Until(Duration);

impl std::fmt::Display for Until {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let end = chrono::Duration::from_std(self.0)
            .ok()
            .and_then(|d| chrono::Utc::now().checked_add_signed(d));
        match end {
            Some(t) => write!(f, "{}", t.format("%Y-%m-%dT%H:%M:%SZ")),
            None => f.write_str("never"),
        }
    }
}

#[cfg(test)]
mod tests;
