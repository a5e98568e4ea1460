//! `postern serve`: open the spool, bind every listener, run until SIGTERM/SIGINT,
//! then stop cleanly.
//!
//! Shutdown (interface: "421 4.x.x"): stop accepting, tell every session (idle ones get
//! `421 4.3.2` at once; one whose message is being written to the spool finishes that
//! first, so a 250 is never lost), wait for them up to `SHUTDOWN_GRACE`, then let the
//! spool's committer finish what it was given, and return. Nothing that got a 250 can
//! be lost at any point: it is on disk before the 250 is sent.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::{AuthMode, Config, TlsMode};
use crate::filter::Screener;
use crate::intake::Intake;
use crate::listener;
use crate::metrics::{self, Metrics};
use crate::policy::dnsbl::Dnsbl;
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
    // Before anything is opened: a root start that must not happen stops here.
    let privileges = crate::privileges::plan(&config)?;
    raise_fd_limit();

    let recipients = match &config.relay.recipients_file {
        Some(path) => Some(RecipientList::load(path)?),
        None => None,
    };
    let policy = RelayPolicy::new(&config.relay, recipients);
    let spool_dir = config.spool_dir.clone();
    let options = spool_options();
    let (spool, live) = tokio::task::spawn_blocking(move || Spool::open(&spool_dir, options))
        .await?
        .with_context(|| format!("cannot open the spool {}", config.spool_dir.display()))?;
    tracing::info!(spool = %config.spool_dir.display(), messages = live.len(),
        "spool open");
    // After the spool lock: the self-signed certificate lives in the spool.
    let tls = if config.listeners.iter().any(|l| l.tls != TlsMode::None) {
        let tls = ServerTls::load(&config)?;
        tls.spawn_reloader();
        Some(tls)
    } else {
        None
    };
    let auth = if config.listeners.iter().any(|l| l.auth != AuthMode::None) {
        Some(Authenticator::new(&config.auth, config.ipv6_prefix)?)
    } else {
        None
    };

    let dnsbl = if config.relay.dnsbl.is_empty() {
        None
    } else {
        let resolver = crate::dns::Resolver::new(&config.delivery.dns_servers)?;
        Some(Dnsbl::new(config.relay.dnsbl.clone(), resolver))
    };
    let config_filters = config.filters.clone();
    if !config_filters.is_empty() {
        tracing::info!(filters = config_filters.len(), "message screener active");
    }
    let metrics = Arc::new(Metrics::new(config.listeners.iter().map(|l| l.address)));
    let delivery = delivery::start(&config, spool.clone(), live, Arc::clone(&metrics))?;
    control::start(spool.clone(), delivery.clone()).with_context(|| {
        format!(
            "cannot create the control socket {}",
            control::socket_path(&config.spool_dir).display()
        )
    })?;

    // Bind everything before serving anything, so a bad address fails the start.
    let mut bound = Vec::new();
    for l in &config.listeners {
        let socket =
            listener::bind(l.address).with_context(|| format!("cannot listen on {}", l.address))?;
        tracing::info!(address = %l.address, "listening");
        bound.push((socket, l.clone()));
    }
    let metrics_socket = match &config.metrics {
        Some(m) => {
            let socket = listener::bind(m.address)
                .with_context(|| format!("cannot listen on {} for metrics", m.address))?;
            tracing::info!(address = %m.address, "metrics at http://{}/metrics", m.address);
            Some(socket)
        }
        None => None,
    };

    let budget = crate::budget::MemoryBudget::new(config.max_message_memory);
    let ourselves = crate::ourselves::Ourselves::from_config(&config);
    let intake = Intake::new(
        spool.clone(),
        delivery.clone(),
        Arc::new(Screener::new(&config_filters)),
        Arc::clone(&metrics),
        Arc::clone(&budget),
        config.hostname.clone(),
    );
    // Each listener's session settings, derived once: sessions never see the Config.
    let settings: Vec<Arc<Settings>> = bound
        .iter()
        .map(|(_, l)| Arc::new(Settings::new(&config, l, tls.is_some(), auth.is_some())))
        .collect();
    let ipv6_prefix = config.ipv6_prefix;
    let shared = Arc::new(Shared {
        policy,
        intake,
        tls,
        auth,
        dnsbl,
        metrics: Arc::clone(&metrics),
        budget,
        ourselves,
    });
    // Everything that needs root is open (listeners, spool, keys): give root up.
    privileges.apply(&config.spool_dir)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(socket) = metrics_socket {
        tokio::spawn(metrics::serve(
            socket,
            metrics,
            spool.clone(),
            stop_rx.clone(),
        ));
    }
    let sessions = TaskTracker::new();
    let mut accept_loops = Vec::new();
    for ((socket, l), settings) in bound.into_iter().zip(settings) {
        accept_loops.push(tokio::spawn(listener::run(
            socket,
            listener::Limits {
                address: l.address,
                max_connections: l.max_connections,
                per_ip_connections: l.per_ip_connections,
                ipv6_prefix,
                proxy_from: l.proxy_protocol.then(|| l.proxy_from.clone()),
            },
            settings,
            Arc::clone(&shared),
            stop_rx.clone(),
            sessions.clone(),
        )));
    }
    tracing::info!(hostname = %config.hostname, "postern started");

    // READY=1 only once SIGTERM is handled: a stop right after the start drains too.
    wait_for_stop_signal(crate::notify::ready).await?;
    crate::notify::stopping();
    tracing::info!("stopping: no new connections, closing sessions");
    let _ = stop_tx.send(true);
    for a in accept_loops {
        let _ = a.await;
    }
    sessions.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions still open after the grace period; closing them");
    }
    let socket = control::socket_path(&config.spool_dir);
    drop(shared);
    delivery.shutdown().await;
    let _ = std::fs::remove_file(socket);
    tokio::task::spawn_blocking(move || spool.close()).await?;
    tracing::info!("postern stopped");
    Ok(())
}

/// Waits for SIGTERM or SIGINT; `armed` runs once both are handled.
async fn wait_for_stop_signal(armed: impl FnOnce()) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    armed();
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
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
