//! Delivery: the queue runner and everything that sends mail on.
//!
//! The runner is one task owning the in-memory queue: every live message with its
//! per-recipient state, attempt count, last errors and next attempt time. New messages
//! (from sessions and bounces) arrive on a channel and are tried at once; due messages
//! are handed to attempt tasks (`attempt.rs`), which report back. Outbound concurrency is
//! bounded in total (`max_concurrency`) and per destination (`per_domain_concurrency`),
//! so one slow or dead destination holds only its own slots.
//!
//! Only this module opens outbound connections. Durable state lives in the spool; the
//! runner's memory (attempt counts, last errors, next times) is rebuilt at start: every
//! message found in the spool is tried at once (interface: "After a crash or restart").
//!
//! - `route`: domain → next hop, grouping;  `mx`: DNS (RFC 5321 5.1, RFC 7505);
//!   `client`: the SMTP client;  `tls`: client TLS configs;  `pool`: connection reuse;
//!   `retry`: the schedule;  `dsn`: bounces (RFC 3464);  `attempt`: one attempt.

mod attempt;
pub mod client;
pub mod dsn;
mod pool;
pub mod retry;
pub mod route;
pub mod tls;

/// What became of one recipient in one attempt: the one vocabulary of the SMTP client,
/// the attempt, the spool's record, the decision log and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// 2xx to the final dot: the next hop has it.
    Delivered,
    /// 4xx somewhere (or a failure of ours): try again later.
    Deferred,
    /// 5xx somewhere, or a permanent failure of ours: bounce.
    Failed,
}

impl DeliveryStatus {
    /// Every status, in declaration order (`status as usize` is its index here).
    pub const ALL: [DeliveryStatus; 3] = [
        DeliveryStatus::Delivered,
        DeliveryStatus::Deferred,
        DeliveryStatus::Failed,
    ];

    /// The word in the decision log (`status=`) and the metrics' label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Deferred => "deferred",
            DeliveryStatus::Failed => "failed",
        }
    }
}

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::config::{Config, Route, RouteTls};
use crate::metrics::Metrics;
use crate::queue::{QueueId, RcptState, Spool, StoredMessage, unix_now};
use attempt::{Context, Report, RouteClient};
use client::{ClientConfig, Credentials, TlsPolicy};

/// Why delivery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The DNS resolver could not be set up.
    #[error("DNS resolver: {0}")]
    Resolver(#[from] crate::dns::ResolveError),
    /// A route's TLS settings could not be loaded (bad ca_file, ...).
    #[error("route for {domains}: {error}")]
    RouteTls { domains: String, error: String },
    /// A route's password file could not be read.
    #[error("route for {domains}: cannot read auth_password_file {path}: {error}")]
    Password {
        domains: String,
        path: String,
        error: std::io::Error,
    },
}

/// A queued message as `postern queue list` shows it.
#[derive(Clone, Debug)]
pub struct QueueItem {
    pub message: StoredMessage,
    /// Last error per recipient (deferred ones).
    pub errors: Vec<Option<String>>,
    pub attempts: u32,
    /// Seconds until the next attempt (0 = due or running).
    pub next_in: u64,
    pub in_flight: bool,
}

enum Command {
    New(Box<StoredMessage>),
    Report(Report),
    Flush(oneshot::Sender<usize>),
    Delete(QueueId, oneshot::Sender<bool>),
    List(oneshot::Sender<Vec<QueueItem>>),
    Reconfigure(Box<Settings>),
    Shutdown(oneshot::Sender<()>),
}

/// The way into the runner; cheap to clone.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Command>,
}

/// Test-only: a handle with no runner behind it, and what was enqueued through it.
#[cfg(test)]
pub(crate) fn detached() -> (Handle, Enqueued) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Handle { tx }, Enqueued(rx))
}

/// Test-only: the messages enqueued through a [`detached`] handle.
#[cfg(test)]
pub(crate) struct Enqueued(mpsc::UnboundedReceiver<Command>);

#[cfg(test)]
impl Enqueued {
    /// The next message enqueued so far, if any.
    pub(crate) fn next(&mut self) -> Option<StoredMessage> {
        match self.0.try_recv().ok()? {
            Command::New(m) => Some(*m),
            _ => None,
        }
    }
}

impl Handle {
    /// A message was just stored: try it now.
    pub fn enqueue(&self, message: StoredMessage) {
        let _ = self.tx.send(Command::New(Box::new(message)));
    }

    /// Attempt every waiting message now; returns how many were rescheduled.
    pub async fn flush(&self) -> usize {
        self.ask(Command::Flush).await.unwrap_or(0)
    }

    /// Removes a message from the queue (and the spool); false if unknown.
    pub async fn delete(&self, id: QueueId) -> bool {
        self.ask(|tx| Command::Delete(id, tx))
            .await
            .unwrap_or(false)
    }

    /// The queue as it stands.
    pub async fn list(&self) -> Vec<QueueItem> {
        self.ask(Command::List).await.unwrap_or_default()
    }

    /// A reload: attempts from now on use `settings`; running ones finish on the old.
    pub fn reconfigure(&self, settings: Settings) {
        let _ = self.tx.send(Command::Reconfigure(Box::new(settings)));
    }

    /// Stops dispatching, lets running attempts finish (briefly), closes connections.
    pub async fn shutdown(&self) {
        let _ = self.ask(Command::Shutdown).await;
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).ok()?;
        rx.await.ok()
    }
}

/// How long running attempts get at shutdown before they are cut off (they have not
/// recorded their outcome then, so those recipients are tried again after the restart).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// What a configuration decides about delivery, built (and so checked: password files,
/// CA files, the resolver) before it takes effect, at start or on a reload.
pub struct Settings {
    resolver: crate::dns::Resolver,
    routes: Vec<Route>,
    route_clients: Vec<RouteClient>,
    default_client: RouteClient,
    mx_port: u16,
    hostname: String,
    postmaster: Option<String>,
    ourselves: crate::ourselves::Ourselves,
    max_mx_addresses: usize,
    max_mx_sessions: usize,
    resolve_timeout: Duration,
    retry_schedule: Vec<Duration>,
    max_lifetime: Duration,
    max_concurrency: usize,
    per_destination_limit: usize,
}

impl Settings {
    pub fn new(config: &Config) -> Result<Settings, DeliveryError> {
        Ok(Settings {
            resolver: crate::dns::Resolver::new(&config.delivery.dns_servers)?,
            routes: config.routes.clone(),
            route_clients: config
                .routes
                .iter()
                .map(|r| route_client(config, Some(r)))
                .collect::<Result<Vec<_>, _>>()?,
            default_client: route_client(config, None)?,
            mx_port: config.delivery.mx_port,
            hostname: config.hostname.clone(),
            postmaster: config.postmaster.clone(),
            ourselves: crate::ourselves::Ourselves::from_config(config),
            max_mx_addresses: config.delivery.max_mx_addresses,
            max_mx_sessions: config.delivery.max_mx_sessions,
            resolve_timeout: config.delivery.resolve_timeout,
            retry_schedule: config.delivery.retry_schedule.clone(),
            max_lifetime: config.delivery.max_queue_lifetime,
            max_concurrency: config.delivery.max_concurrency,
            per_destination_limit: config.delivery.per_domain_concurrency,
        })
    }
}

/// The attempts' context for `settings`. From `previous` (a reload) it keeps the slot
/// counters whose limits did not change, so that attempts still running under the old
/// configuration count against the same limits; a changed limit starts afresh (for a
/// moment both the old and the new slots are in use). The connection pool is always new:
/// its connections were opened for the old routes.
fn context(
    settings: Settings,
    spool: Spool,
    handle: Handle,
    metrics: Arc<Metrics>,
    previous: Option<&Context>,
) -> Context {
    let global = match previous {
        Some(p) if p.max_concurrency == settings.max_concurrency => Arc::clone(&p.global),
        _ => Arc::new(Semaphore::new(settings.max_concurrency)),
    };
    let per_destination = match previous {
        Some(p) if p.per_destination_limit == settings.per_destination_limit => {
            Arc::clone(&p.per_destination)
        }
        _ => Arc::new(Mutex::new(HashMap::new())),
    };
    Context {
        spool,
        resolver: settings.resolver,
        routes: settings.routes,
        route_clients: settings.route_clients,
        default_client: settings.default_client,
        mx_port: settings.mx_port,
        hostname: settings.hostname,
        postmaster: settings.postmaster,
        ourselves: settings.ourselves,
        max_mx_addresses: settings.max_mx_addresses,
        max_mx_sessions: settings.max_mx_sessions,
        resolve_timeout: settings.resolve_timeout,
        retry_schedule: settings.retry_schedule,
        max_lifetime: settings.max_lifetime,
        max_concurrency: settings.max_concurrency,
        global,
        per_destination,
        per_destination_limit: settings.per_destination_limit,
        pool: pool::Pool::new(settings.per_destination_limit),
        handle,
        metrics,
    }
}

/// The way into a runner not started yet, and the runner's end of it: commands sent
/// before [`start`] wait for it.
pub fn handle() -> (Handle, Commands) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Handle { tx }, Commands(rx))
}

/// The runner's end of a [`Handle`].
pub struct Commands(mpsc::UnboundedReceiver<Command>);

/// Builds the delivery context and starts the runner with the messages found in the
/// spool at start, listening on `commands` (from [`handle`]).
pub fn start(
    settings: Settings,
    spool: Spool,
    live: Vec<StoredMessage>,
    metrics: Arc<Metrics>,
    handle: Handle,
    commands: Commands,
) {
    let rx = commands.0;
    let ctx = Arc::new(context(settings, spool, handle.clone(), metrics, None));
    let mut runner = Runner {
        ctx,
        entries: HashMap::new(),
        due: BTreeSet::new(),
        attempts: JoinSet::new(),
        running: HashMap::new(),
        stopping: false,
    };
    let now = Instant::now();
    for msg in live {
        // Tried at once; the schedule resumes from the message's age.
        let age = Duration::from_secs((unix_now() - msg.envelope.arrived).max(0) as u64);
        let attempts = retry::attempts_for_age(age, &runner.ctx.retry_schedule);
        runner.insert(msg, attempts, now);
    }
    tokio::spawn(runner.run(rx));
}

/// The client settings for a route (`None`: the default MX route).
fn route_client(config: &Config, route: Option<&Route>) -> Result<RouteClient, DeliveryError> {
    let domains = route.map_or_else(|| "unmatched domains".to_string(), |r| r.domains.join(", "));
    let tls = route.map_or(RouteTls::Opportunistic, |r| r.tls);
    let auth = match route.and_then(|r| r.auth_user.clone().zip(r.auth_password_file.clone())) {
        Some((user, path)) => {
            let text = std::fs::read_to_string(&path).map_err(|error| DeliveryError::Password {
                domains: domains.clone(),
                path: path.display().to_string(),
                error,
            })?;
            // Interface: a trailing newline in the file is not part of the password.
            let password = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text)
                .to_string();
            Some(Credentials { user, password })
        }
        None => None,
    };
    let base = |tls: TlsPolicy| ClientConfig {
        helo_name: config.hostname.clone(),
        connect_timeout: config.delivery.connect_timeout,
        command_timeout: Duration::from_secs(300),
        data_timeout: Duration::from_secs(600),
        tls,
        auth: auth.clone(),
    };
    Ok(match tls {
        RouteTls::None => RouteClient {
            primary: base(TlsPolicy::None),
            plaintext_fallback: None,
        },
        RouteTls::Opportunistic => RouteClient {
            primary: base(TlsPolicy::Opportunistic),
            plaintext_fallback: Some(base(TlsPolicy::None)),
        },
        RouteTls::Required => {
            let ca = route.and_then(|r| r.ca_file.as_deref());
            let verifying = tls::required_config(ca).map_err(|e| DeliveryError::RouteTls {
                domains: domains.clone(),
                error: e.to_string(),
            })?;
            RouteClient {
                primary: base(TlsPolicy::Required(verifying)),
                plaintext_fallback: None,
            }
        }
    })
}

struct Entry {
    msg: StoredMessage,
    attempts: u32,
    next: Instant,
    errors: Vec<Option<String>>,
    in_flight: bool,
    delete_requested: bool,
}

struct Runner {
    ctx: Arc<Context>,
    entries: HashMap<QueueId, Entry>,
    /// Messages waiting, by next attempt time.
    due: BTreeSet<(Instant, QueueId)>,
    attempts: JoinSet<()>,
    /// Which message each running attempt task is for, to recover from a task that
    /// ends without reporting (a panic): its message is rescheduled, not stranded.
    running: HashMap<tokio::task::Id, QueueId>,
    stopping: bool,
}

impl Runner {
    fn insert(&mut self, msg: StoredMessage, attempts: u32, next: Instant) {
        let id = msg.envelope.id;
        let n = msg.states.len();
        self.due.insert((next, id));
        self.entries.insert(
            id,
            Entry {
                msg,
                attempts,
                next,
                errors: vec![None; n],
                in_flight: false,
                delete_requested: false,
            },
        );
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        loop {
            self.ctx.metrics.set_queue_messages(self.entries.len());
            self.dispatch_due();
            let wake = self
                .due
                .first()
                .map(|(t, _)| *t)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Shutdown(done)) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
                Some(done) = self.attempts.join_next_with_id(), if !self.attempts.is_empty() => {
                    self.reap(done);
                }
                _ = sweep.tick() => { self.ctx.pool.sweep(); }
            }
        }
    }

    fn dispatch_due(&mut self) {
        if self.stopping {
            return;
        }
        let now = Instant::now();
        while let Some(&(t, id)) = self.due.first() {
            if t > now {
                break;
            }
            self.due.pop_first();
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            entry.in_flight = true;
            let (ctx, msg, attempts) = (Arc::clone(&self.ctx), entry.msg.clone(), entry.attempts);
            let tx = self.ctx.handle.tx.clone();
            let task = self.attempts.spawn(async move {
                let report = attempt::run(ctx, msg, attempts).await;
                let _ = tx.send(Command::Report(report));
            });
            self.running.insert(task.id(), id);
        }
    }

    /// An attempt task ended. Normally its report is already on the channel; if it
    /// panicked there is none, so the message is put back on the schedule.
    fn reap(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let (task, failure) = match done {
            Ok((task, ())) => (task, None),
            Err(e) => (e.id(), Some(e)),
        };
        let Some(id) = self.running.remove(&task) else {
            return;
        };
        if let Some(e) = failure
            && let Some(entry) = self.entries.get_mut(&id)
            && entry.in_flight
        {
            tracing::error!(id = %id, error = %e, "delivery attempt failed unexpectedly; retrying later");
            entry.in_flight = false;
            entry.next = Instant::now() + Duration::from_secs(60);
            self.due.insert((entry.next, id));
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::New(msg) => {
                if !self.entries.contains_key(&msg.envelope.id) {
                    self.insert(*msg, 0, Instant::now());
                }
            }
            Command::Report(Report::Finished(id)) => {
                self.entries.remove(&id);
            }
            Command::Report(Report::Pending(pending)) => {
                let attempt::Pending {
                    msg,
                    attempts,
                    next,
                    errors,
                } = *pending;
                let id = msg.envelope.id;
                let Some(entry) = self.entries.get_mut(&id) else {
                    return;
                };
                if entry.delete_requested {
                    let place = msg.place;
                    self.entries.remove(&id);
                    self.finish_deleted(id, place, None);
                    return;
                }
                entry.msg = msg;
                entry.attempts = attempts;
                entry.errors = errors;
                entry.in_flight = false;
                entry.next = next;
                self.due.insert((next, id));
            }
            Command::Flush(reply) => {
                let now = Instant::now();
                let mut n = 0;
                for (id, e) in self.entries.iter_mut() {
                    if !e.in_flight {
                        self.due.remove(&(e.next, *id));
                        e.next = now;
                        self.due.insert((now, *id));
                        n += 1;
                    }
                }
                let _ = reply.send(n);
            }
            Command::Delete(id, reply) => match self.entries.get_mut(&id) {
                None => {
                    let _ = reply.send(false);
                }
                Some(e) if e.in_flight => {
                    // Finished when the running attempt reports (it may deliver some
                    // recipients first: that cannot be taken back).
                    e.delete_requested = true;
                    let _ = reply.send(true);
                }
                Some(e) => {
                    let (next, place) = (e.next, e.msg.place);
                    self.due.remove(&(next, id));
                    self.entries.remove(&id);
                    self.finish_deleted(id, place, Some(reply));
                }
            },
            Command::List(reply) => {
                let now = Instant::now();
                let mut items: Vec<QueueItem> = self
                    .entries
                    .values()
                    .map(|e| QueueItem {
                        message: e.msg.clone(),
                        errors: e.errors.clone(),
                        attempts: e.attempts,
                        next_in: e.next.saturating_duration_since(now).as_secs(),
                        in_flight: e.in_flight,
                    })
                    .collect();
                items.sort_by_key(|i| i.message.envelope.id);
                let _ = reply.send(items);
            }
            Command::Reconfigure(settings) => {
                let ctx = &self.ctx;
                let next = context(
                    *settings,
                    ctx.spool.clone(),
                    ctx.handle.clone(),
                    Arc::clone(&ctx.metrics),
                    Some(ctx),
                );
                let old = std::mem::replace(&mut self.ctx, Arc::new(next));
                // Its idle connections were opened for the old routes.
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), old.pool.close_all()).await;
                });
            }
            Command::Shutdown(_) => unreachable!("handled in run"),
        }
    }

    fn finish_deleted(
        &mut self,
        id: QueueId,
        place: crate::queue::Place,
        reply: Option<oneshot::Sender<bool>>,
    ) {
        let spool = self.ctx.spool.clone();
        tokio::spawn(async move {
            let ok = match spool.finish(id, place).await {
                Ok(()) => {
                    crate::maillog::message_deleted(&id);
                    true
                }
                Err(e) => {
                    tracing::error!(id = %id, error = %e, "cannot delete the message");
                    false
                }
            };
            if let Some(r) = reply {
                let _ = r.send(ok);
            }
        });
    }

    async fn shutdown(&mut self) {
        self.stopping = true;
        let wait = async { while self.attempts.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, wait).await.is_err() {
            tracing::warn!("delivery attempts still running at shutdown; they will be retried");
            self.attempts.abort_all();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ctx.pool.close_all()).await;
    }
}

/// Recipient states as words, for the CLI.
pub fn state_word(s: RcptState) -> &'static str {
    match s {
        RcptState::Pending => "pending",
        RcptState::Delivered => "delivered",
        RcptState::Failed => "failed",
    }
}
