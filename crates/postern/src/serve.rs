//! `postern serve`: open the spool, bind every listener, run until SIGTERM/SIGINT,
//! then stop cleanly; reload the configuration on SIGHUP or `postern reload`.
//!
//! Reload (interface: "Operations"): the file is read and validated, and everything
//! that can fail is built (recipients list, certificates, users file, route password
//! and CA files, new listeners bound) before anything changes, so a bad configuration
//! changes nothing. Then one swap per listener: each listener's [`listener::Current`]
//! (its settings and the new [`Shared`]) is replaced, so new sessions see the new
//! policy, filters, limits, users and certificates while sessions in progress finish
//! on the one they started with; delivery gets its new routes the same way; listeners
//! no longer configured stop accepting (their sessions finish), new ones start. The
//! spool, the queue, the memory budget's holdings, the metrics and the AUTH failure
//! counts carry over. `spool_dir` cannot change (an error); keys that only a restart
//! applies are named in the log.
//!
//! Shutdown (interface: "421 4.x.x"): stop accepting, tell every session (idle ones get
//! `421 4.3.2` at once; one whose message is being written to the spool finishes that
//! first, so a 250 is never lost), wait for them up to `SHUTDOWN_GRACE`, then let the
//! spool's committer finish what it was given, and return. Nothing that got a 250 can
//! be lost at any point: it is on disk before the 250 is sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::budget::MemoryBudget;
use crate::cluster::Cluster;
use crate::config::{AuthMode, Config, TlsMode};
use crate::dkim::Signer;
use crate::filter::Screener;
use crate::intake::{Intake, Steps};
use crate::listener::{self, ConnectionLimits};
use crate::metrics::{self, Metrics};
use crate::policy::dnsbl::Dnsbl;
use crate::policy::rate::RateLimits;
use crate::policy::{RecipientList, RelayPolicy};
use crate::queue::{Spool, SpoolOptions};
use crate::session::{Settings, Shared};
use crate::tls::ServerTls;
use crate::{control, delivery};

/// How long sessions get to wind down after SIGTERM. With the delivery runner's 3 s and
/// 1 s for closing outbound connections, the process is gone within 10 s.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs the relay until a stop signal. Errors are start-up failures (bad spool, port
/// in use, ...), reported by the CLI.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    // First of all: from here on SIGTERM, SIGINT and SIGHUP are ours (their default
    // action, death, would lose nothing but would surprise a reload right at start).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    check_usable(&config)?;
    // Spool files, the control socket and keys are the owner's only, whatever umask the
    // server was started with (the unit sets 0077 too).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // Before anything is opened: a root start that must not happen stops here.
    let privileges = crate::privileges::plan(&config)?;
    raise_fd_limit();

    // Root opens the spool: first make sure it follows nothing the user planted there.
    privileges.check_spool(&config.spool_dir)?;
    let spool_dir = config.spool_dir.clone();
    let options = spool_options();
    let (spool, backlog) =
        tokio::task::spawn_blocking(move || Spool::open_in_background(&spool_dir, options))
            .await?
            .with_context(|| format!("cannot open the spool {}", config.spool_dir.display()))?;
    tracing::info!(spool = %config.spool_dir.display(), "spool open");
    let metrics = Arc::new(Metrics::new(config.listeners.iter().map(|l| l.address)));
    // After the spool lock: the self-signed certificate lives in the spool.
    let mut prepared = prepare(config, None, None, &metrics)?;
    // Bind everything before serving anything, so a bad address fails the start.
    let bound = bind_new(&prepared.config, &HashMap::new())?;
    let metrics_socket = match &prepared.config.metrics {
        Some(m) => {
            let socket = listener::bind(m.address)
                .with_context(|| format!("cannot listen on {} for metrics", m.address))?;
            tracing::info!(address = %m.address, "metrics at http://{}/metrics", m.address);
            Some(socket)
        }
        None => None,
    };
    let (reload_tx, mut reload_rx) = mpsc::channel(4);
    let (delivery, delivery_rx) = delivery::handle();
    control::start(spool.clone(), delivery.clone(), reload_tx).with_context(|| {
        format!(
            "cannot create the control socket {}",
            control::socket_path(&prepared.config.spool_dir).display()
        )
    })?;
    // Everything that needs root is open (listeners, spool, keys, the control socket):
    // give root up, before delivery writes anything into the spool.
    privileges.apply(&prepared.config.spool_dir)?;
    warn_unreadable(&prepared.config);
    let Some(delivery_settings) = prepared.delivery.take() else {
        bail!("internal error: delivery settings missing");
    };
    let loaded = delivery::start(
        delivery_settings,
        spool.clone(),
        backlog,
        Arc::clone(&metrics),
        delivery.clone(),
        delivery_rx,
    )?;

    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(socket) = metrics_socket {
        tokio::spawn(metrics::serve(
            socket,
            Arc::clone(&metrics),
            spool.clone(),
            stop_rx.clone(),
        ));
    }
    let hostname = prepared.config.hostname.clone();
    let mut server = Server {
        config: prepared.config.clone(),
        budget: crate::budget::MemoryBudget::new(prepared.config.max_message_memory),
        spool,
        delivery,
        metrics,
        auth: None,
        rate_limits: Arc::new(RateLimits::default()),
        cluster: None,
        listeners: HashMap::new(),
        shutdown: stop_rx,
        sessions: TaskTracker::new(),
    };
    server.commit(prepared, bound);
    tracing::info!(hostname = %hostname, "postern started");

    // Every listener bound, the spool open, the signals handled.
    crate::notify::ready();
    // Resolves only if the queue's load failed (or its thread died without a word);
    // a load that succeeded leaves it pending for good.
    let load_failed = async {
        match loaded.await {
            Ok(Ok(_)) => std::future::pending().await,
            Ok(Err(why)) => why,
            Err(_) => "the thread loading the queue stopped unexpectedly".to_string(),
        }
    };
    tokio::pin!(load_failed);
    let mut fatal = None;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            // The queue could not be read: stop (nonzero, so that a supervisor restarts
            // us and the operator sees why) rather than take mail that would wait beside
            // a backlog nobody delivers.
            why = &mut load_failed => {
                tracing::error!(error = %why, "stopping: the queue could not be loaded (the spool is untouched)");
                fatal = Some(why);
                break;
            }
            _ = int.recv() => break,
            // A reload stuck on a file (a FIFO, a dead NFS mount) must not hold up a stop:
            // it is abandoned, and it has changed nothing until it completes.
            _ = hup.recv() => tokio::select! {
                _ = server.reload() => {}
                _ = term.recv() => break,
                _ = int.recv() => break,
            },
            Some(reply) = reload_rx.recv() => tokio::select! {
                r = server.reload() => { let _ = reply.send(r); }
                _ = term.recv() => break,
                _ = int.recv() => break,
            },
        }
    }
    crate::notify::stopping();
    tracing::info!("stopping: no new connections, closing sessions");
    let _ = stop_tx.send(true);
    let Server {
        config,
        spool,
        delivery,
        listeners,
        sessions,
        ..
    } = server;
    for (_, l) in listeners {
        let _ = l.stop.send(true);
        let _ = l.task.await;
    }
    sessions.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions still open after the grace period; closing them");
    }
    let socket = control::socket_path(&config.spool_dir);
    delivery.shutdown().await;
    let _ = std::fs::remove_file(socket);
    tokio::task::spawn_blocking(move || spool.close()).await?;
    if let Some(why) = fatal {
        bail!("{why}");
    }
    tracing::info!("postern stopped");
    Ok(())
}

/// Refuses what this build cannot run and warns about an open relay; at start and on
/// every reload.
fn check_usable(config: &Config) -> anyhow::Result<()> {
    let unsupported = config.unsupported_features();
    if !unsupported.is_empty() {
        bail!(
            "this configuration uses features not available in this version:\n  - {}",
            unsupported.join("\n  - ")
        );
    }
    if config.relay.open_relay {
        tracing::warn!(
            "OPEN RELAY: open_relay = true, anyone on the Internet may relay mail through \
             this server to any domain. This is almost never what you want."
        );
    } else if config.relay.is_open_relay() {
        tracing::warn!(
            "OPEN RELAY: relay.trusted_networks cover {}, so anyone on the Internet may \
             relay mail through this server to any domain. This is almost never what you want.",
            crate::config::every_address_of(&config.relay.trusted_everyone())
        );
    }
    Ok(())
}

/// A configuration with everything that can fail already built: it takes effect with
/// [`Server::commit`], which cannot fail.
struct Prepared {
    config: Config,
    policy: RelayPolicy,
    tls: Option<ServerTls>,
    auth: Option<Authenticator>,
    dnsbl: Option<Dnsbl>,
    screener: Screener,
    signer: Signer,
    checker: Option<crate::authentication::Checker>,
    /// `[cluster]`: the previous client when the section is unchanged, else a new one.
    cluster: Option<Arc<Cluster>>,
    /// Taken at start to start the runner; given to it on commit otherwise.
    delivery: Option<delivery::Settings>,
}

/// Reads the files the configuration names and builds its parts. `previous`: the
/// authenticator in use (a reload), whose failure counts carry over; `previous_cluster`:
/// the Redis client in use, kept when `[cluster]` has not changed.
fn prepare(
    config: Config,
    previous: Option<&Authenticator>,
    previous_cluster: Option<&Arc<Cluster>>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Prepared> {
    let cluster = match (&config.cluster, previous_cluster) {
        (Some(k), Some(c)) if c.serves(k) => Some(Arc::clone(c)),
        (Some(k), _) => {
            tracing::info!(redis = %k.shown_url(), node = %k.node,
                "[cluster]: sharing AUTH lockouts and rate-limit counters through redis");
            Some(Cluster::new(k, Arc::clone(metrics))?)
        }
        (None, _) => None,
    };
    let recipients = match &config.relay.recipients_file {
        Some(path) => Some(RecipientList::load(path)?),
        None => None,
    };
    let policy = RelayPolicy::new(&config.relay, recipients);
    let tls = if config.listeners.iter().any(|l| l.tls != TlsMode::None) {
        Some(ServerTls::load(&config)?)
    } else {
        None
    };
    let auth = if config.listeners.iter().any(|l| l.auth != AuthMode::None) {
        Some(
            Authenticator::reloaded(&config.auth, config.ipv6_prefix, previous)?
                .with_cluster(cluster.clone()),
        )
    } else {
        None
    };
    let dnsbl = if config.relay.dnsbl.is_empty() {
        None
    } else {
        let resolver = crate::dns::Resolver::new(&config.delivery.dns_servers)?;
        Some(Dnsbl::new(config.relay.dnsbl.clone(), resolver))
    };
    let screener = Screener::new(&config.filters);
    let signer = Signer::new(&config.dkim).map_err(|e| anyhow::anyhow!("[[dkim]] key {e}"))?;
    let checker = if config.authentication.any() {
        Some(
            crate::authentication::Checker::new(&config)
                .map_err(|e| anyhow::anyhow!("[authentication]: {e}"))?,
        )
    } else {
        None
    };
    let delivery = delivery::Settings::new(&config)?;
    Ok(Prepared {
        config,
        policy,
        tls,
        auth,
        dnsbl,
        screener,
        signer,
        checker,
        cluster,
        delivery: Some(delivery),
    })
}

/// Binds the configured listeners that are not running yet.
fn bind_new(
    config: &Config,
    running: &HashMap<SocketAddr, Running>,
) -> anyhow::Result<Vec<(SocketAddr, TcpListener)>> {
    let mut bound = Vec::new();
    for l in &config.listeners {
        if running.contains_key(&l.address) {
            continue;
        }
        let socket =
            listener::bind(l.address).with_context(|| format!("cannot listen on {}", l.address))?;
        bound.push((l.address, socket));
    }
    Ok(bound)
}

/// A listener's accept loop.
struct Running {
    current: Arc<ArcSwap<listener::Current>>,
    limits: Arc<ConnectionLimits>,
    /// Stops accepting (a reload removed the listener, or shutdown).
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The running server: what outlives a reload, and the configuration in effect.
struct Server {
    config: Config,
    spool: Spool,
    delivery: delivery::Handle,
    metrics: Arc<Metrics>,
    budget: Arc<MemoryBudget>,
    /// The authenticator in effect (its failure counts carry over to the next).
    auth: Option<Arc<Authenticator>>,
    /// The `[[rate_limit]]`s in effect (their counts carry over to the next).
    rate_limits: Arc<RateLimits>,
    /// The Redis client in effect (kept by a reload that leaves `[cluster]` alone).
    cluster: Option<Arc<Cluster>>,
    listeners: HashMap<SocketAddr, Running>,
    shutdown: watch::Receiver<bool>,
    sessions: TaskTracker,
}

impl Server {
    /// Re-reads the configuration and applies it, or changes nothing. The answer is the
    /// summary for `postern reload`; both outcomes are logged.
    async fn reload(&mut self) -> Result<String, String> {
        tracing::info!("reloading the configuration");
        crate::notify::reloading();
        let result = self.try_reload().await;
        crate::notify::ready();
        match &result {
            Ok(summary) => tracing::info!("configuration reloaded: {summary}"),
            Err(e) => tracing::error!("reload failed, the configuration in use is unchanged: {e}"),
        }
        result
    }

    async fn try_reload(&mut self) -> Result<String, String> {
        let source = self.config.source.clone();
        let previous = self.auth.clone();
        let previous_cluster = self.cluster.clone();
        let metrics = Arc::clone(&self.metrics);
        let old_spool = self.config.spool_dir.clone();
        let prepared = tokio::task::spawn_blocking(move || -> anyhow::Result<Prepared> {
            let config = Config::load_default_or_file(source.as_deref())?;
            if config.spool_dir != old_spool {
                bail!(
                    "spool_dir cannot change on reload ({} is in use, the file says {}): \
                     restart to move the spool",
                    old_spool.display(),
                    config.spool_dir.display()
                );
            }
            check_usable(&config)?;
            // The start's refusal holds for a reload too: root with a listener off
            // loopback and no `user` (after a drop, a different `user` needs a restart).
            crate::privileges::plan(&config)?;
            prepare(
                config,
                previous.as_deref(),
                previous_cluster.as_ref(),
                &metrics,
            )
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e:#}"))?;
        let bound = match bind_new(&prepared.config, &self.listeners) {
            Ok(bound) => bound,
            Err(e) => {
                // A Redis client made for this reload is never used: it stays quiet.
                if let Some(new) = &prepared.cluster
                    && !self
                        .cluster
                        .as_ref()
                        .is_some_and(|old| Arc::ptr_eq(old, new))
                {
                    new.retire();
                }
                return Err(format!("{e:#}"));
            }
        };
        let changes = crate::config::changes(&self.config, &prepared.config);
        // Keys only a restart applies keep their running values, so that the next reload
        // still reports them as pending.
        let mut prepared = prepared;
        prepared.config.log_format = self.config.log_format;
        prepared.config.privileges = self.config.privileges.clone();
        prepared.config.metrics = self.config.metrics.clone();
        self.commit(prepared, bound);
        for key in &changes.need_restart {
            tracing::warn!(key = %key, "changed, but only a restart applies it");
        }
        Ok(changes.summary())
    }

    /// Puts `p` in effect: `bound` are the sockets of its listeners that were not running.
    fn commit(&mut self, mut p: Prepared, bound: Vec<(SocketAddr, TcpListener)>) {
        let config = &p.config;
        if let Some(auth) = &p.auth {
            auth.activate();
        }
        if let Some(tls) = &p.tls {
            tls.spawn_reloader();
        }
        if let Some(settings) = p.delivery.take() {
            self.delivery.reconfigure(settings);
        }
        self.budget.set_limit(config.max_message_memory);
        self.metrics
            .add_listeners(config.listeners.iter().map(|l| l.address));
        let auth = p.auth.map(Arc::new);
        let rate_limits = Arc::new(RateLimits::shared(
            &config.rate_limits,
            config.ipv6_prefix,
            Some(&self.rate_limits),
            p.cluster.clone(),
        ));
        self.metrics
            .add_rate_limits(config.rate_limits.iter().map(|r| r.name.as_str()));
        let shared = Arc::new(Shared {
            policy: p.policy,
            intake: Intake::new(
                self.spool.clone(),
                self.delivery.clone(),
                Steps {
                    screener: p.screener,
                    checker: p.checker,
                    signer: p.signer,
                },
                Arc::clone(&self.metrics),
                Arc::clone(&self.budget),
                config.hostname.clone(),
            ),
            tls: p.tls,
            auth: auth.clone(),
            dnsbl: p.dnsbl,
            metrics: Arc::clone(&self.metrics),
            budget: Arc::clone(&self.budget),
            ourselves: crate::ourselves::Ourselves::from_config(config),
            // New pools with each configuration: a connection negotiated under the old
            // settings is never used under the new ones.
            milters: config
                .milters
                .iter()
                .map(|m| crate::milter::Endpoint::new(m.clone()))
                .collect(),
            rate_limits: Arc::clone(&rate_limits),
            cluster: p.cluster.clone(),
        });
        self.rate_limits = rate_limits;
        // A client the reload replaced or removed leaves the gauge and the log alone.
        if let Some(old) = &self.cluster
            && !p.cluster.as_ref().is_some_and(|new| Arc::ptr_eq(new, old))
        {
            old.retire();
        }
        if p.cluster.is_none() {
            self.metrics.cluster_off();
        }
        self.cluster = p.cluster.take();
        self.metrics
            .add_milters(config.milters.iter().map(|m| m.name.as_str()));
        self.auth = auth;

        let mut bound: HashMap<SocketAddr, TcpListener> = bound.into_iter().collect();
        let mut keep = HashMap::new();
        for l in &config.listeners {
            // Each listener's session settings, derived once: sessions never see the Config.
            let current = listener::Current {
                limits: listener::Limits {
                    address: l.address,
                    max_connections: l.max_connections,
                    per_ip_connections: l.per_ip_connections,
                    ipv6_prefix: config.ipv6_prefix,
                    proxy_from: l.proxy_protocol.then(|| l.proxy_from.clone()),
                    connection_rate: l.connection_rate,
                },
                settings: Arc::new(Settings::new(
                    config,
                    l,
                    shared.tls.is_some(),
                    shared.auth.is_some(),
                )),
                shared: Arc::clone(&shared),
            };
            if let Some(running) = self.listeners.remove(&l.address) {
                running.limits.set(&current.limits);
                running.current.store(Arc::new(current));
                keep.insert(l.address, running);
            } else if let Some(socket) = bound.remove(&l.address) {
                tracing::info!(address = %l.address, "listening");
                keep.insert(l.address, self.spawn_listener(socket, current));
            }
        }
        for (address, gone) in self.listeners.drain() {
            tracing::info!(address = %address, "listener removed: no new connections, its sessions finish");
            let _ = gone.stop.send(true);
        }
        self.listeners = keep;
        self.config = p.config;
    }

    fn spawn_listener(&self, socket: TcpListener, current: listener::Current) -> Running {
        let limits = ConnectionLimits::new(
            current.limits.max_connections,
            current.limits.per_ip_connections,
            current.limits.ipv6_prefix,
        );
        limits.set(&current.limits);
        let current = Arc::new(ArcSwap::from_pointee(current));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(listener::run(
            socket,
            Arc::clone(&current),
            Arc::clone(&limits),
            stop_rx,
            self.shutdown.clone(),
            self.sessions.clone(),
        ));
        Running {
            current,
            limits,
            stop,
            task,
        }
    }
}

/// After a privilege drop: the files a reload (or the certificate watcher) reads again
/// must be readable by the user we now are; say so at once rather than at the first
/// reload or renewal.
fn warn_unreadable(config: &Config) {
    let mut files: Vec<(&str, &std::path::Path)> = Vec::new();
    if let Some(t) = &config.tls {
        files.push(("tls.cert", &t.cert));
        files.push(("tls.key", &t.key));
    }
    if let Some(f) = &config.auth.users_file {
        files.push(("auth.users_file", f));
    }
    if let Some(f) = &config.relay.recipients_file {
        files.push(("relay.recipients_file", f));
    }
    for d in &config.dkim {
        files.push(("dkim.key", &d.key));
    }
    if let Some(c) = &config.cluster {
        if let Some(f) = &c.ca_file {
            files.push(("cluster.ca_file", f));
        }
        if let Some((cert, key)) = &c.client_cert {
            files.push(("cluster.cert_file", cert));
            files.push(("cluster.key_file", key));
        }
    }
    if let Some(f) = &config.source {
        files.push(("the configuration file", f));
    }
    for (key, path) in files {
        if let Err(e) = std::fs::File::open(path) {
            tracing::warn!(key, path = %path.display(), error = %e,
                "not readable after the privilege drop: reloads (and certificate renewal) will fail until it is");
        }
    }
}

/// Group commit unless `POSTERN_SPOOL_SYNC=per-message` asks for one fsync per message
/// (only to measure what group commit buys; both are equally durable).
fn spool_options() -> SpoolOptions {
    let mut options = SpoolOptions::default();
    if std::env::var("POSTERN_SPOOL_SYNC").as_deref() == Ok("per-message") {
        tracing::info!("spool: one fsync per message (POSTERN_SPOOL_SYNC=per-message)");
        options.group_commit = false;
    }
    options
}

/// Each connection is a descriptor: allow as many as the hard limit permits, so that
/// `max_connections` and not the soft default of 1024 is what bounds us.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
}
