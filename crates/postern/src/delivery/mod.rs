//! Delivery: the queue runner and everything that sends mail on.
//!
//! The runner is one task owning the in-memory queue: every live message in its compact
//! form (`Queued`: the envelope as stored, a few hundred bytes, never the body), with
//! its recipients' states, attempt count, last errors and its place in the timetable
//! (`schedule`). New messages (from sessions and bounces) arrive on a channel and are
//! tried at once; the backlog found in the spool at start arrives in batches from a
//! loader thread while new mail flows, and waits behind it. Attempts (`attempt.rs`) run
//! as tasks, at most `max_attempts` at once, and report back. Outbound concurrency is
//! bounded in total (`max_concurrency`) and per destination (`per_domain_concurrency`),
//! so one slow or dead destination holds only its own slots, and a destination where no
//! host answers is suspended (its mail waits without attempts until a probe gets
//! through), so a dead next hop's backlog costs nothing.
//!
//! What each operation costs as the queue grows (n messages, d destinations): a new
//! message, a report, a dispatch, a delete by id: O(log n); a flush, a reload that
//! changes routes, `queue delete --domain`: O(n), once per request; a listing: one page
//! (1000 messages) per request, O(log n) to find it; expiry: the messages that expired;
//! the per-destination metric: O(d) every five seconds; compaction: O(n) only while the
//! log's oldest segment is mostly finished (then it is emptied and collected).
//!
//! Only this module opens outbound connections. Durable state lives in the spool; the
//! runner's memory (attempt counts, last errors, next times) is rebuilt at start: every
//! message found in the spool is tried at once (interface: "After a crash or restart"),
//! after new mail, within the destinations' limits.
//!
//! - `route`: domain → next hop, grouping;  `mx`: DNS (RFC 5321 5.1, RFC 7505);
//!   `client`: the SMTP client;  `tls`: client TLS configs;  `pool`: connection reuse;
//!   `retry`: the schedule;  `schedule`: the timetable;  `dsn`: bounces (RFC 3464);
//!   `attempt`: one attempt.

mod attempt;
pub mod client;
pub mod dsn;
mod pool;
pub mod retry;
pub mod route;
mod schedule;
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::config::{Config, Route, RouteTls};
use crate::metrics::Metrics;
use crate::queue::{Durability, QueueId, Queued, RcptState, Spool, StoredMessage, unix_now};
use attempt::{Context, Report, RouteClient};
use client::{ClientConfig, Credentials, TlsPolicy};
use schedule::{Contact, DestId, Line, Schedule, Slot};

/// Why delivery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The DNS resolver could not be set up.
    #[error("DNS resolver: {0}")]
    Resolver(#[from] crate::dns::ResolveError),
    /// A route's TLS settings could not be loaded (bad ca_file, ...).
    #[error("route for {domains}: {error}")]
    RouteTls { domains: String, error: String },
    /// The thread that loads the backlog could not be started.
    #[error("cannot start the backlog loader: {0}")]
    Thread(std::io::Error),
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
    /// A message just stored, with its text when the session hands it over (so that its
    /// first attempt need not read it back from the spool).
    New(Box<Queued>, Option<Vec<u8>>),
    /// A batch of the backlog found in the spool at start.
    Loaded(Vec<Queued>),
    LoadDone,
    Report(Report),
    Relocated(
        QueueId,
        Result<crate::queue::Location, crate::queue::SpoolError>,
    ),
    Flush(oneshot::Sender<usize>),
    Delete(QueueId, oneshot::Sender<Deletion>),
    DeleteDomain(String, oneshot::Sender<Result<DomainDeletion, String>>),
    List(ListPage, oneshot::Sender<Page>),
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
            Command::New(m, _) => m.stored().ok(),
            _ => None,
        }
    }
}

impl Handle {
    /// A message was just stored: try it now.
    pub fn enqueue(&self, message: StoredMessage) {
        self.enqueue_with_text(message, None);
    }

    /// A message was just stored from `text` (exactly the octets stored): try it now;
    /// its first attempt uses `text` instead of reading it back from the spool, while
    /// the fresh texts held stay within [`FRESH_TEXTS`] octets.
    pub fn enqueue_with_text(&self, message: StoredMessage, text: Option<Vec<u8>>) {
        match Queued::new(&message) {
            Ok(q) => {
                let _ = self.tx.send(Command::New(Box::new(q), text));
            }
            // It was stored with this envelope, so it encodes; if not, it is delivered
            // after the next restart, from the spool.
            Err(e) => tracing::error!(id = %message.envelope.id, error = %e,
                "cannot queue the stored message; it is delivered after a restart"),
        }
    }

    /// Hands the backlog found in the spool at start to the runner, batch by batch,
    /// while new mail flows (blocking: run on its own thread). New mail goes first.
    pub fn load(&self, backlog: crate::queue::Backlog) -> Result<usize, crate::queue::SpoolError> {
        let loaded = backlog.load(|batch| {
            let _ = self.tx.send(Command::Loaded(batch));
        });
        let _ = self.tx.send(Command::LoadDone);
        loaded
    }

    /// Attempt every waiting message now; returns how many were rescheduled.
    pub async fn flush(&self) -> usize {
        self.ask(Command::Flush).await.unwrap_or(0)
    }

    /// Removes a message from the queue (and the spool); answers when its DONE record is
    /// on disk (or, for a message being attempted, when that attempt has ended).
    pub async fn delete(&self, id: QueueId) -> Deletion {
        self.ask(|tx| Command::Delete(id, tx))
            .await
            .unwrap_or(Deletion::Failed)
    }

    /// The queue as it stands (every message: for small queues and tests; listings
    /// page through it with [`list_page`](Handle::list_page)).
    pub async fn list(&self) -> Vec<QueueItem> {
        let mut all = Vec::new();
        let mut page = ListPage {
            limit: LIST_PAGE,
            ..ListPage::default()
        };
        while let Some(Page {
            items,
            next: Some(next),
            ..
        }) = self.list_page(page.clone()).await
        {
            page.after = Some(next);
            all.extend(items);
        }
        all
    }

    /// One page of the queue (see [`ListPage`]); `None` if the runner has stopped.
    pub async fn list_page(&self, page: ListPage) -> Option<Page> {
        self.ask(|tx| Command::List(page, tx)).await
    }

    /// `queue delete --domain D`: answered once the DONE records are on disk; `Err`
    /// while the queue is still loading or when the runner has stopped.
    pub async fn delete_domain(&self, domain: &str) -> Result<DomainDeletion, String> {
        self.ask(|tx| Command::DeleteDomain(domain.to_string(), tx))
            .await
            .unwrap_or_else(|| Err("the server is stopping".to_string()))
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

/// Builds the delivery context and starts the runner, listening on `commands` (from
/// [`handle`]), and a thread that loads the messages found in the spool at start.
/// The receiver it returns gets the outcome of that load (the messages loaded, or why it
/// failed: the server must stop then
/// (the spool is untouched, and a server running on without its backlog would neither
/// deliver it nor ever collect the log's old segments).
pub fn start(
    settings: Settings,
    spool: Spool,
    backlog: crate::queue::Backlog,
    metrics: Arc<Metrics>,
    handle: Handle,
    commands: Commands,
) -> Result<oneshot::Receiver<Result<usize, String>>, DeliveryError> {
    let rx = commands.0;
    let ctx = Arc::new(context(settings, spool, handle.clone(), metrics, None));
    let runner = Runner {
        schedule: Schedule::new(ctx.per_destination_limit, &ctx.retry_schedule),
        ctx,
        entries: BTreeMap::new(),
        attempts: JoinSet::new(),
        running: HashMap::new(),
        relocations: 0,
        errors: HashSet::new(),
        delete_replies: HashMap::new(),
        background: JoinSet::new(),
        fresh: HashMap::new(),
        fresh_bytes: 0,
        loading: true,
        stopping: false,
    };
    tokio::spawn(runner.run(rx));
    // The backlog: loaded on its own thread, new mail flowing meanwhile.
    let loader = handle.clone();
    let (failed_tx, failed_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("postern-backlog".into())
        .spawn(move || {
            let outcome = match loader.load(backlog) {
                Ok(n) => {
                    tracing::info!(messages = n, "queued messages loaded");
                    Ok(n)
                }
                // Those messages stay in the spool, untouched, for the next start.
                Err(e) => Err(format!(
                    "cannot load the queued messages from the spool: {e}"
                )),
            };
            let _ = failed_tx.send(outcome);
        })
        .map_err(DeliveryError::Thread)?;
    Ok(failed_rx)
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

/// A queued message as the runner holds it: the compact envelope, where it waits, and
/// what its attempts found. A few hundred bytes; the body is never held here.
struct Entry {
    q: Queued,
    attempts: u32,
    /// Its line and slot while it waits in the timetable; `None` while an attempt runs or
    /// it is being relocated.
    waiting: Option<(Line, Slot)>,
    /// Where its slot goes back after a relocation.
    relocating: Option<(Line, Slot)>,
    /// The destinations of its pending recipients.
    dests: Box<[DestId]>,
    /// Last error per recipient (deferred ones); `None` until an attempt deferred one.
    errors: Option<Box<[Option<Arc<str>>]>>,
    in_flight: bool,
    delete_requested: bool,
}

impl Entry {
    fn busy(&self) -> bool {
        self.in_flight || self.relocating.is_some()
    }
}

/// Relocations (compaction of the log) started per sweep, at most.
const RELOCATIONS_PER_SWEEP: usize = 1000;
/// Message bytes a sweep's relocations may hold at once (each reads its message whole
/// before it is appended again): at least one message, whatever its size.
const RELOCATION_BYTES_PER_SWEEP: u64 = 64 << 20;
/// The fresh message texts the runner holds for first attempts, in octets at most
/// (beyond, a first attempt reads its message from the spool like a retry does).
pub const FRESH_TEXTS: usize = 64 << 20;
/// Items per page of a listing.
pub const LIST_PAGE: usize = 1000;
/// Destinations shown in the per-destination backlog metric.
const TOP_DESTINATIONS: usize = 10;
/// Error texts shared between messages (a dead destination gives a million the same).
const SHARED_ERRORS: usize = 4096;

struct Runner {
    ctx: Arc<Context>,
    /// Every queued message, by id (arrival order).
    entries: BTreeMap<QueueId, Entry>,
    schedule: Schedule,
    attempts: JoinSet<()>,
    /// Which message each running attempt task is for, to recover from a task that
    /// ends without reporting (a panic): its message is rescheduled, not stranded.
    running: HashMap<tokio::task::Id, QueueId>,
    relocations: usize,
    errors: HashSet<Arc<str>>,
    /// Who waits for the deletion of a message that was busy when it was asked for: they
    /// are answered when its DONE is on disk.
    delete_replies: HashMap<QueueId, Vec<oneshot::Sender<Deletion>>>,
    /// Relocations and deletions writing to the spool: waited for at shutdown, so that
    /// what they report is recorded (a deletion answered is not undone by a stop).
    background: JoinSet<()>,
    /// The text of messages just accepted, handed over by their session, for their
    /// first attempt (taken then, or dropped when the message leaves the queue).
    fresh: HashMap<QueueId, Vec<u8>>,
    /// Octets `fresh` holds (allocated), at most [`FRESH_TEXTS`].
    fresh_bytes: usize,
    /// The backlog found in the spool at start is still being read.
    loading: bool,
    stopping: bool,
}

/// What an attempt learned about a destination's reachability.
type Contacts = Vec<(DestId, Contact)>;

impl Runner {
    /// The destinations of a message's pending recipients (routes, no DNS), held in the
    /// timetable until [`Schedule::release`].
    fn destinations(&mut self, q: &Queued) -> Box<[DestId]> {
        let mut names: Vec<route::Destination> = Vec::with_capacity(1);
        for (i, rcpt) in q.recipients().enumerate() {
            if q.states.get(i) != Some(&RcptState::Pending) {
                continue;
            }
            let key = route::next_hop(&self.ctx.routes, route::domain_of(rcpt), self.ctx.mx_port);
            if !names.contains(&key.destination) {
                names.push(key.destination);
            }
        }
        names.iter().map(|d| self.schedule.hold(d)).collect()
    }

    /// Takes an entry out of the queue (it must not be waiting in the timetable).
    fn forget(&mut self, id: QueueId) -> Option<Entry> {
        self.take_fresh(id);
        let entry = self.entries.remove(&id)?;
        self.schedule.release(&entry.dests);
        Some(entry)
    }

    /// The fresh text held for `id`, if any (see [`Runner::fresh`]).
    fn take_fresh(&mut self, id: QueueId) -> Option<Vec<u8>> {
        let text = self.fresh.remove(&id)?;
        self.fresh_bytes -= text.capacity();
        Some(text)
    }

    fn insert(&mut self, q: Queued, attempts: u32, line: Line, at: Instant) {
        let id = q.id;
        if self.entries.contains_key(&id) {
            return;
        }
        let dests = self.destinations(&q);
        let slot = Slot { at, id };
        self.schedule.add(line, slot, &dests);
        self.entries.insert(
            id,
            Entry {
                q,
                attempts,
                waiting: Some((line, slot)),
                relocating: None,
                dests,
                errors: None,
                in_flight: false,
                delete_requested: false,
            },
        );
    }

    /// One copy of each error text (bounded): a dead destination's million deferred
    /// messages share one.
    fn shared_error(&mut self, text: String) -> Arc<str> {
        if let Some(e) = self.errors.get(text.as_str()) {
            return Arc::clone(e);
        }
        if self.errors.len() >= SHARED_ERRORS {
            self.errors.clear();
        }
        let e: Arc<str> = text.into();
        self.errors.insert(Arc::clone(&e));
        e
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        let mut ticks = 0u64;
        loop {
            self.dispatch_due();
            self.publish();
            // At the attempt cap nothing can start before an attempt ends (which wakes
            // the loop): a due head must not make it spin.
            let idle = Instant::now() + Duration::from_secs(3600);
            let wake = if self.running.len() >= self.ctx.max_attempts() {
                idle
            } else {
                self.schedule.wake().unwrap_or(idle)
            };
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Shutdown(done)) => {
                        self.shutdown(&mut rx).await;
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
                Some(_) = self.background.join_next(), if !self.background.is_empty() => {}
                _ = sweep.tick() => {
                    ticks += 1;
                    self.ctx.pool.sweep();
                    if ticks.is_multiple_of(5) {
                        self.expire();
                        self.relocate();
                        self.publish_destinations();
                    }
                }
            }
        }
    }

    /// The metrics that cost O(1).
    fn publish(&self) {
        let m = &self.ctx.metrics;
        m.set_queue_messages(self.entries.len());
        m.set_queue_in_flight(self.running.len());
        let oldest = self
            .entries
            .values()
            .next()
            .map_or(0, |e| unix_now().saturating_sub(e.q.arrived).max(0) as u64);
        m.set_queue_oldest_age(oldest);
        m.set_queue_loading(self.loading);
    }

    /// The per-destination backlog (top N): one pass over the destinations.
    fn publish_destinations(&self) {
        let top = self.schedule.largest(TOP_DESTINATIONS);
        let (_, suspended) = self.schedule.counts();
        self.ctx.metrics.set_queue_destinations(
            top.into_iter()
                .map(
                    |(d, messages, suspended)| crate::metrics::DestinationBacklog {
                        destination: d.to_string(),
                        messages,
                        suspended,
                    },
                )
                .collect(),
            suspended,
        );
    }

    fn dispatch_due(&mut self) {
        if self.stopping {
            return;
        }
        let now = Instant::now();
        while self.running.len() < self.ctx.max_attempts() {
            let Some((start, line, slot, via)) = self.schedule.next(now) else {
                break;
            };
            let Some(entry) = self.entries.get_mut(&start.id) else {
                // Cannot happen (a slot is only in the timetable for a waiting entry);
                // drop it rather than spin on it.
                self.schedule.remove(line, slot, &[via]);
                self.schedule.abandon_probe(&[via]);
                continue;
            };
            self.schedule.started(line, slot, &entry.dests);
            entry.waiting = None;
            let skip = suspended_except(&self.schedule, &entry.dests, start.probe.then_some(via));
            self.launch(start.id, skip);
        }
    }

    /// Starts an attempt for a message already taken out of the timetable.
    fn launch(&mut self, id: QueueId, skip: Vec<(route::Destination, Arc<str>)>) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let msg = match entry.q.stored() {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(%id, error = %e, "queued message cannot be decoded; left in the spool");
                let dests = entry.dests.clone();
                self.schedule.finished(&dests, &[], Instant::now());
                self.schedule.abandon_probe(&dests);
                self.forget(id);
                return;
            }
        };
        entry.in_flight = true;
        let (ctx, attempts) = (Arc::clone(&self.ctx), entry.attempts);
        let text = self.take_fresh(id);
        let tx = self.ctx.handle.tx.clone();
        let task = self.attempts.spawn(async move {
            let report = attempt::run(ctx, msg, attempts, skip, text).await;
            let _ = tx.send(Command::Report(report));
        });
        self.running.insert(task.id(), id);
    }

    /// RFC 5321 4.5.4.1: a message that has outlived `max_queue_lifetime` is attempted
    /// now whatever its destination's state (a suspended destination is not contacted),
    /// so that it bounces on time. Oldest first: stops at the first one still young.
    fn expire(&mut self) {
        if self.stopping {
            return;
        }
        let limit = self.ctx.max_lifetime.as_secs() as i64;
        let now = unix_now();
        let due: Vec<QueueId> = self
            .entries
            .values()
            .take_while(|e| now.saturating_sub(e.q.arrived) >= limit)
            .filter(|e| e.waiting.is_some())
            .map(|e| e.q.id)
            .take(self.ctx.max_attempts().saturating_sub(self.running.len()))
            .collect();
        for id in due {
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            let Some((line, slot)) = entry.waiting.take() else {
                continue;
            };
            self.schedule.started(line, slot, &entry.dests);
            let skip = suspended_except(&self.schedule, &entry.dests, None);
            self.launch(id, skip);
        }
    }

    /// Compaction: when the log's oldest segment is mostly finished but still holds
    /// waiting messages, they are carried forward (COPY records) so that it, and the
    /// finished segments behind it, can be collected. Only waiting messages; their slot
    /// comes back when the copy is written.
    fn relocate(&mut self) {
        if self.stopping || self.relocations > 0 {
            return;
        }
        let Some(seq) = self.ctx.spool.relocation_candidate() else {
            return;
        };
        let mut bytes = 0u64;
        let ids: Vec<QueueId> = self
            .entries
            .values()
            .filter(|e| {
                e.waiting.is_some()
                    && matches!(e.q.place, crate::queue::Place::Log(l) if l.segment == seq)
            })
            .take_while(|e| {
                let first = bytes == 0;
                bytes = bytes.saturating_add(e.q.size.max(1));
                first || bytes <= RELOCATION_BYTES_PER_SWEEP
            })
            .map(|e| e.q.id)
            .take(RELOCATIONS_PER_SWEEP)
            .collect();
        for id in ids {
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            let Some((line, slot)) = entry.waiting.take() else {
                continue;
            };
            self.schedule.remove(line, slot, &entry.dests);
            entry.relocating = Some((line, slot));
            self.relocations += 1;
            let (spool, q, tx) = (
                self.ctx.spool.clone(),
                entry.q.clone(),
                self.ctx.handle.tx.clone(),
            );
            self.background.spawn(async move {
                let result = spool.relocate(&q).await;
                let _ = tx.send(Command::Relocated(id, result));
            });
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
            let now = Instant::now();
            self.schedule.finished(&entry.dests, &[], now);
            self.schedule.abandon_probe(&entry.dests);
            if entry.delete_requested {
                let place = entry.q.place;
                self.forget(id);
                self.finish_deleted(id, place);
                return;
            }
            let slot = Slot {
                at: now + Duration::from_secs(60),
                id,
            };
            entry.waiting = Some((Line::Retry, slot));
            self.schedule.add(Line::Retry, slot, &entry.dests);
        }
    }

    fn contacts(&mut self, found: Vec<(route::Destination, Option<String>)>) -> Contacts {
        found
            .into_iter()
            .filter_map(|(d, unreachable)| {
                // A destination the message does not hold (routes reloaded meanwhile)
                // has nothing to learn.
                let id = self.schedule.find(&d)?;
                let contact = match unreachable {
                    Some(why) => Contact::Unreachable(self.shared_error(why)),
                    None => Contact::Reached,
                };
                Some((id, contact))
            })
            .collect()
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::New(q, text) => {
                let id = q.id;
                self.insert(*q, 0, Line::Fresh, Instant::now());
                // Counted by what it allocates (the body grew by doubling), once per id.
                if let Some(text) = text
                    && self.fresh_bytes + text.capacity() <= FRESH_TEXTS
                    && self.entries.contains_key(&id)
                    && !self.fresh.contains_key(&id)
                {
                    self.fresh_bytes += text.capacity();
                    self.fresh.insert(id, text);
                }
            }
            Command::Loaded(batch) => {
                // Attempted at once (interface: after a restart), after new mail and
                // within the destinations' limits; the schedule resumes from its age.
                let now = Instant::now();
                for q in batch {
                    let age =
                        Duration::from_secs(unix_now().saturating_sub(q.arrived).max(0) as u64);
                    let attempts = retry::attempts_for_age(age, &self.ctx.retry_schedule);
                    self.insert(q, attempts, Line::Retry, now);
                }
            }
            Command::LoadDone => self.loading = false,
            Command::Report(Report::Finished { id, contacts }) => {
                let contacts = self.contacts(contacts);
                if let Some(entry) = self.entries.get(&id) {
                    let dests = entry.dests.clone();
                    self.schedule.finished(&dests, &contacts, Instant::now());
                    self.forget(id);
                }
                // Asked to delete while its attempt finished it: it is gone all the same.
                for reply in self.delete_replies.remove(&id).unwrap_or_default() {
                    let _ = reply.send(Deletion::Deleted);
                }
            }
            Command::Report(Report::Pending(pending)) => {
                let attempt::Pending {
                    msg,
                    attempts,
                    next,
                    errors,
                    contacts,
                } = *pending;
                let contacts = self.contacts(contacts);
                let id = msg.envelope.id;
                let Some(entry) = self.entries.get_mut(&id) else {
                    return;
                };
                entry.in_flight = false;
                let old = entry.dests.clone();
                self.schedule.finished(&old, &contacts, Instant::now());
                if entry.delete_requested {
                    let place = msg.place;
                    self.forget(id);
                    self.finish_deleted(id, place);
                    return;
                }
                let errors: Box<[Option<Arc<str>>]> = errors
                    .into_iter()
                    .map(|e| e.map(|t| self.shared_error(t)))
                    .collect();
                let Some(entry) = self.entries.get_mut(&id) else {
                    return;
                };
                entry.q.states = msg.states.into_boxed_slice();
                entry.q.place = msg.place;
                entry.attempts = attempts;
                entry.errors = Some(errors);
                let q = entry.q.clone();
                // The new destinations are held before the old ones are let go, so a
                // destination the message still goes to keeps its state.
                let dests = self.destinations(&q);
                self.schedule.release(&old);
                let slot = Slot { at: next, id };
                self.schedule.add(Line::Retry, slot, &dests);
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.dests = dests;
                    entry.waiting = Some((Line::Retry, slot));
                }
            }
            Command::Relocated(id, result) => {
                self.relocations = self.relocations.saturating_sub(1);
                let Some(entry) = self.entries.get_mut(&id) else {
                    return;
                };
                match result {
                    Ok(location) => entry.q.place = crate::queue::Place::Log(location),
                    Err(crate::queue::SpoolError::NotLive(_)) => {}
                    Err(e) => {
                        tracing::warn!(%id, error = %e, "could not carry the message forward in the log; it stays where it is");
                    }
                }
                let Some((line, slot)) = entry.relocating.take() else {
                    return;
                };
                if entry.delete_requested {
                    let place = entry.q.place;
                    self.forget(id);
                    self.finish_deleted(id, place);
                    return;
                }
                entry.waiting = Some((line, slot));
                self.schedule.add(line, slot, &entry.dests);
            }
            Command::Flush(reply) => {
                self.schedule.resume_all();
                let now = Instant::now();
                let mut n = 0;
                for (id, e) in self.entries.iter_mut() {
                    if let Some((line, slot)) = e.waiting {
                        let due = Slot { at: now, id: *id };
                        if slot != due || line != Line::Retry {
                            self.schedule.remove(line, slot, &e.dests);
                            self.schedule.add(Line::Retry, due, &e.dests);
                            e.waiting = Some((Line::Retry, due));
                        }
                        n += 1;
                    }
                }
                let _ = reply.send(n);
            }
            Command::Delete(id, reply) => match self.take_for_deletion(id) {
                Removal::Unknown => {
                    let _ = reply.send(if self.loading {
                        Deletion::NotLoadedYet
                    } else {
                        Deletion::Unknown
                    });
                }
                // An attempt may take minutes (a slow next hop): say so at once.
                Removal::Later { attempt: true } => {
                    let _ = reply.send(Deletion::AfterAttempt);
                }
                // Being carried forward in the log: a moment.
                Removal::Later { attempt: false } => {
                    self.delete_replies.entry(id).or_default().push(reply);
                }
                Removal::Now(place) => {
                    self.delete_replies.entry(id).or_default().push(reply);
                    self.finish_deleted(id, place);
                }
            },
            Command::DeleteDomain(domain, reply) => self.delete_domain(&domain, reply),
            Command::List(page, reply) => {
                let _ = reply.send(self.list(&page));
            }
            Command::Reconfigure(settings) => {
                let ctx = &self.ctx;
                let routes_changed =
                    ctx.routes != settings.routes || ctx.mx_port != settings.mx_port;
                let next = context(
                    *settings,
                    ctx.spool.clone(),
                    ctx.handle.clone(),
                    Arc::clone(&ctx.metrics),
                    Some(ctx),
                );
                self.schedule
                    .configure(next.per_destination_limit, &next.retry_schedule);
                let old = std::mem::replace(&mut self.ctx, Arc::new(next));
                // Its idle connections were opened for the old routes.
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), old.pool.close_all()).await;
                });
                if routes_changed {
                    self.regroup();
                }
            }
            Command::Shutdown(_) => unreachable!("handled in run"),
        }
    }

    /// New routes: every waiting message's destinations again (one pass, at a reload).
    fn regroup(&mut self) {
        let ids: Vec<QueueId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.waiting.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            let Some((line, slot)) = entry.waiting else {
                continue;
            };
            let old = std::mem::take(&mut entry.dests);
            self.schedule.remove(line, slot, &old);
            let q = entry.q.clone();
            let dests = self.destinations(&q);
            self.schedule.release(&old);
            self.schedule.add(line, slot, &dests);
            if let Some(entry) = self.entries.get_mut(&id) {
                entry.dests = dests;
            }
        }
    }

    /// `queue delete ID`: the message leaves the timetable now. A message being attempted
    /// (or carried forward) is finished when that ends (an attempt may deliver some
    /// recipients first: that cannot be taken back); the caller finishes one it gets as
    /// [`Removal::Now`] in the spool.
    fn take_for_deletion(&mut self, id: QueueId) -> Removal {
        let Some(e) = self.entries.get_mut(&id) else {
            return Removal::Unknown;
        };
        if e.busy() {
            e.delete_requested = true;
            return Removal::Later {
                attempt: e.in_flight,
            };
        }
        if let Some((line, slot)) = e.waiting.take() {
            self.schedule.remove(line, slot, &e.dests);
        }
        let place = e.q.place;
        self.forget(id);
        Removal::Now(place)
    }

    /// `queue delete --domain D`: every message whose pending recipients are all at `D`
    /// (its domain or a subdomain is not enough: exactly `D`, compared as A-labels) is
    /// deleted; one with pending recipients elsewhere too is left alone (and counted),
    /// so that no other destination loses mail. One pass over the queue (O(n)), then one
    /// task writes the DONE records (a bounded number at a time, group committed) and
    /// answers when they are on disk.
    fn delete_domain(
        &mut self,
        domain: &str,
        reply: oneshot::Sender<Result<DomainDeletion, String>>,
    ) {
        if self.loading {
            // Only part of the queue is known: deleting that part would leave the rest
            // of the backlog to be delivered, under an answer saying "done".
            let _ = reply.send(Err(
                "the queue is still being loaded after the start; try again in a moment"
                    .to_string(),
            ));
            return;
        }
        let wanted = wanted_domain(domain);
        let mut result = DomainDeletion::default();
        let ids: Vec<(QueueId, AtDomain)> = self
            .entries
            .values()
            .map(|e| (e.q.id, pending_at(e.q.recipients(), &e.q.states, &wanted)))
            .filter(|(_, at)| *at != AtDomain::No)
            .collect();
        let mut now = Vec::new();
        for (id, at) in ids {
            if at == AtDomain::AndElsewhere {
                result.kept += 1;
                continue;
            }
            match self.take_for_deletion(id) {
                Removal::Unknown => {}
                Removal::Later { .. } => result.later += 1,
                Removal::Now(place) => now.push((id, place)),
            }
        }
        let spool = self.ctx.spool.clone();
        self.background.spawn(async move {
            let (done, failed) = finish_all(&spool, now).await;
            result.deleted += done;
            result.failed = failed;
            let _ = reply.send(Ok(result));
        });
    }

    /// A page of the listing: up to `page.limit` messages after `page.after`, those with
    /// a recipient at `page.domain` only if given.
    fn list(&self, page: &ListPage) -> Page {
        use std::ops::Bound::{Excluded, Unbounded};
        let wanted = page.domain.as_deref().map(wanted_domain);
        let now = Instant::now();
        let entries: Box<dyn Iterator<Item = &Entry>> = match page.id {
            // One message: a direct lookup, not a walk from the cursor.
            Some(id) => Box::new(self.entries.get(&id).into_iter()),
            None => Box::new(
                self.entries
                    .range((page.after.map_or(Unbounded, Excluded), Unbounded))
                    .map(|(_, e)| e),
            ),
        };
        let mut next = None;
        let items = entries
            .filter(|e| {
                wanted
                    .as_deref()
                    .is_none_or(|w| pending_at(e.q.recipients(), &e.q.states, w) != AtDomain::No)
            })
            .take(page.limit.clamp(1, LIST_PAGE))
            .inspect(|e| next = Some(e.q.id))
            .filter_map(|e| {
                let message = e.q.stored().ok()?;
                let errors = match &e.errors {
                    Some(errs) => errs
                        .iter()
                        .map(|x| x.as_deref().map(str::to_string))
                        .collect(),
                    None => vec![None; message.states.len()],
                };
                Some(QueueItem {
                    message,
                    errors,
                    attempts: e.attempts,
                    next_in: e
                        .waiting
                        .map_or(0, |(_, s)| s.at.saturating_duration_since(now).as_secs()),
                    in_flight: e.busy(),
                })
            })
            .collect();
        Page {
            items,
            next,
            loading: self.loading,
        }
    }

    /// Writes a deleted message's DONE (in a task) and then answers whoever asked.
    fn finish_deleted(&mut self, id: QueueId, place: crate::queue::Place) {
        let replies = self.delete_replies.remove(&id).unwrap_or_default();
        let spool = self.ctx.spool.clone();
        self.background.spawn(async move {
            let (done, _) = finish_all(&spool, vec![(id, place)]).await;
            let outcome = if done == 1 {
                Deletion::Deleted
            } else {
                Deletion::Failed
            };
            for reply in replies {
                let _ = reply.send(outcome);
            }
        });
    }

    async fn shutdown(&mut self, rx: &mut mpsc::UnboundedReceiver<Command>) {
        self.stopping = true;
        let wait = async { while self.attempts.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, wait).await.is_err() {
            tracing::warn!("delivery attempts still running at shutdown; they will be retried");
            self.attempts.abort_all();
        }
        // What the finished attempts reported (a deletion asked for meanwhile is carried
        // out), then the spool writes that started (a relocation's outcome may start a
        // deletion's: twice).
        for _ in 0..2 {
            while let Ok(cmd) = rx.try_recv() {
                match cmd {
                    Command::Shutdown(done) => {
                        let _ = done.send(());
                    }
                    cmd => self.command(cmd),
                }
            }
            let writes = async { while self.background.join_next().await.is_some() {} };
            if tokio::time::timeout(SHUTDOWN_GRACE, writes).await.is_err() {
                tracing::warn!("spool writes still running at shutdown");
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ctx.pool.close_all()).await;
    }
}

/// The suspended destinations among `dests` (but `probed`), for an attempt to skip.
fn suspended_except(
    schedule: &Schedule,
    dests: &[DestId],
    probed: Option<DestId>,
) -> Vec<(route::Destination, Arc<str>)> {
    dests
        .iter()
        .filter(|&&d| Some(d) != probed)
        .filter_map(|&d| {
            let why = schedule.suspended(d)?;
            Some((schedule.name(d)?.as_ref().clone(), why))
        })
        .collect()
}

/// A domain as `queue ... --domain` compares it: A-labels, lower case.
pub fn wanted_domain(domain: &str) -> String {
    postern_smtp::address::ascii_domain(domain).to_ascii_lowercase()
}

/// Where a message's pending recipients are, for `queue list/delete --domain D`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtDomain {
    /// None of them is at `D`.
    No,
    /// All of them are at `D`: the message is `D`'s backlog.
    Only,
    /// Some at `D`, some elsewhere: deleting it would lose other mail.
    AndElsewhere,
}

/// Where the pending recipients of a message are, against `wanted` (from
/// [`wanted_domain`]): exactly that domain, not its subdomains.
pub fn pending_at<'a>(
    recipients: impl Iterator<Item = &'a str>,
    states: &[RcptState],
    wanted: &str,
) -> AtDomain {
    let (mut at, mut elsewhere) = (false, false);
    for (i, rcpt) in recipients.enumerate() {
        if states.get(i) != Some(&RcptState::Pending) {
            continue;
        }
        if same_domain(rcpt, wanted) {
            at = true;
        } else {
            elsewhere = true;
        }
    }
    match (at, elsewhere) {
        (false, _) => AtDomain::No,
        (true, false) => AtDomain::Only,
        (true, true) => AtDomain::AndElsewhere,
    }
}

/// Whether a canonical recipient's domain is `wanted` (an A-label, lower case).
fn same_domain(recipient: &str, wanted: &str) -> bool {
    postern_smtp::address::ascii_domain(route::domain_of(recipient)).eq_ignore_ascii_case(wanted)
}

/// What `queue delete --domain` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainDeletion {
    /// Messages deleted (every pending recipient was at the domain).
    pub deleted: usize,
    /// Messages with pending recipients at the domain and elsewhere, left alone.
    pub kept: usize,
    /// Messages taken out of the queue whose DONE could not be written (the spool
    /// failed): they come back at the next start.
    pub failed: usize,
    /// Messages being attempted (or carried forward in the log) at the time: deleted
    /// when that ends, not yet when the answer comes.
    pub later: usize,
}

/// One page of a listing.
#[derive(Debug, Default)]
pub struct Page {
    pub items: Vec<QueueItem>,
    /// The cursor for the next page (the last message this page looked at); `None`
    /// at the end.
    pub next: Option<QueueId>,
    /// The queue is still being loaded after the start: not every message is listed.
    pub loading: bool,
}

/// What `queue delete ID` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deletion {
    /// Gone: its DONE record is on disk.
    Deleted,
    /// No such message in the queue.
    Unknown,
    /// Not in the part of the queue loaded so far (after a start the queue is loaded in
    /// the background): it may be in the rest.
    NotLoadedYet,
    /// A delivery attempt is running: the message is finished when it ends (what that
    /// attempt delivers cannot be taken back).
    AfterAttempt,
    /// Out of the queue, but its DONE could not be written (the spool failed; logged):
    /// it comes back at the next start. Also: the runner stopped before answering.
    Failed,
}

/// What [`Runner::take_for_deletion`] found.
enum Removal {
    Unknown,
    /// Busy (an attempt, or else a relocation, runs): finished when that ends.
    Later {
        attempt: bool,
    },
    /// Out of the timetable: its DONE is to be written.
    Now(crate::queue::Place),
}

/// DONE records written at once by a deletion (the committer groups them into one
/// write and fsync).
const FINISHING_AT_ONCE: usize = 512;

/// Finishes deleted messages in the spool, [`FINISHING_AT_ONCE`] at a time, logging each;
/// returns how many were finished and how many failed.
pub(crate) async fn finish_all(
    spool: &crate::queue::Spool,
    messages: Vec<(QueueId, crate::queue::Place)>,
) -> (usize, usize) {
    let (mut done, mut failed) = (0, 0);
    let mut running = JoinSet::new();
    let mut tally =
        |outcome: Result<(QueueId, Result<(), crate::queue::SpoolError>), _>| match outcome {
            Ok((id, Ok(()))) => {
                crate::maillog::message_deleted(&id);
                done += 1;
            }
            Ok((id, Err(e))) => {
                tracing::error!(id = %id, error = %e, "cannot delete the message");
                failed += 1;
            }
            Err(_) => failed += 1,
        };
    for (id, place) in messages {
        if running.len() >= FINISHING_AT_ONCE
            && let Some(outcome) = running.join_next().await
        {
            tally(outcome);
        }
        let spool = spool.clone();
        running.spawn(async move { (id, spool.finish(id, place, Durability::Synced).await) });
    }
    while let Some(outcome) = running.join_next().await {
        tally(outcome);
    }
    (done, failed)
}

/// Which part of the queue a listing asks for.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    /// Messages after this id (the previous page's last).
    pub after: Option<QueueId>,
    /// Only messages with a recipient at this domain.
    pub domain: Option<String>,
    /// Only this message.
    pub id: Option<QueueId>,
    pub limit: usize,
}

/// Recipient states as words, for the CLI.
pub fn state_word(s: RcptState) -> &'static str {
    match s {
        RcptState::Pending => "pending",
        RcptState::Delivered => "delivered",
        RcptState::Failed => "failed",
    }
}

#[cfg(test)]
mod domain_tests {
    use super::*;

    #[test]
    fn a_domain_backlog_is_its_pending_recipients_exactly_at_it() {
        use RcptState::{Delivered, Pending};
        let at = |rcpts: &[&str], states: &[RcptState], d: &str| {
            pending_at(rcpts.iter().copied(), states, &wanted_domain(d))
        };
        assert_eq!(
            at(&["a@dead.test"], &[Pending], "dead.test"),
            AtDomain::Only
        );
        assert_eq!(
            at(&["a@DEAD.test"], &[Pending], "Dead.Test"),
            AtDomain::Only
        );
        // A subdomain is another destination.
        assert_eq!(
            at(&["a@sub.dead.test"], &[Pending], "dead.test"),
            AtDomain::No
        );
        assert_eq!(
            at(
                &["a@dead.test", "b@other.test"],
                &[Pending, Pending],
                "dead.test"
            ),
            AtDomain::AndElsewhere
        );
        // Only pending recipients count: what was delivered is not the backlog.
        assert_eq!(
            at(
                &["a@dead.test", "b@other.test"],
                &[Pending, Delivered],
                "dead.test"
            ),
            AtDomain::Only
        );
        assert_eq!(
            at(
                &["a@dead.test", "b@other.test"],
                &[Delivered, Pending],
                "dead.test"
            ),
            AtDomain::No
        );
        // U-labels and A-labels are the same domain.
        assert_eq!(
            at(&["a@bücher.test"], &[Pending], "xn--bcher-kva.test"),
            AtDomain::Only
        );
    }
}
