//! Postern, an SMTP relay. The modules follow the mail's path:
//!
//! listener → session → policy → filter → intake → queue → delivery
//!
//! - [`listener`]: binds sockets, enforces connection limits, spawns sessions.
//! - [`session`]: drives the sans-IO protocol core (`postern_smtp`) over a socket.
//! - [`policy`]: the relay decision per recipient, a pure function.
//! - [`filter`]: the message screener, pure.
//! - [`intake`]: end of DATA to the spool, in ordered steps; one outcome per message.
//! - [`queue`]: the durable spool (group-committed segment log).
//! - [`delivery`]: the queue runner, routing, MX, the SMTP client, bounces.
//! - [`control`]: the control socket behind `postern queue ...`.
//! - [`durable`]: whole-file writes that survive a crash (spool files, users, keys).
//! - [`tls`]: the server certificate; [`auth`]: SMTP AUTH users and brute-force defence.
//! - [`config`]: the configuration file, validated; [`maillog`]: the decision log;
//!   [`metrics`]: counters and the Prometheus endpoint; [`ourselves`]: our own name and
//!   addresses (mail loops);
//!   [`server`]: start-up and shutdown; [`cli`]: the command line.

pub mod auth;
pub mod budget;
pub mod cli;
pub mod config;
pub mod control;
pub mod delivery;
pub mod dnsbl;
pub mod durable;
pub mod filter;
pub mod intake;
pub mod listener;
pub mod maillog;
pub mod metrics;
pub mod ourselves;
pub mod policy;
pub mod queue;
pub mod server;
pub mod session;
pub mod tls;
