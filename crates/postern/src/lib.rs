//! Postern, an SMTP relay. The modules follow the mail's path:
//!
//! listener → session → policy → filter → milter → intake → queue → delivery
//!
//! - [`listener`]: binds sockets, enforces connection limits, spawns sessions.
//! - [`session`]: drives the sans-IO protocol core (`postern_smtp`) over a socket.
//! - [`policy`]: the relay decision per recipient, a pure function (and its DNS
//!   blocklist lookups).
//! - [`filter`]: the message screener, pure.
//! - [`dkim`]: DKIM keys and the signing of relayed mail, an intake step.
//! - [`milter`]: the milter driver: the session's conversation with each `[[milter]]`
//!   (MAIL, RCPT, and end of message inside the intake).
//! - [`authentication`]: SPF, DKIM and DMARC checks on mail from untrusted clients, and
//!   the `Authentication-Results:` field they make.
//! - [`intake`]: end of DATA to the spool, in ordered steps; one outcome per message.
//! - [`queue`]: the durable spool (group-committed segment log).
//! - [`delivery`]: the queue runner, routing, the SMTP client, bounces.
//!
//! Beside the path: [`auth`] (SMTP AUTH users and brute-force defence), [`tls`] (the
//! server certificate), [`dns`] (the resolver: MX, addresses, blocklists), [`budget`]
//! (memory for message bodies), [`durable`] (whole-file writes that survive a crash:
//! spool files, users, keys), [`ourselves`] (our own name and addresses, against mail
//! loops), [`config`] (the configuration file, validated), [`maillog`] (the decision
//! log), [`metrics`] (counters and the Prometheus endpoint), [`control`] (the control
//! socket behind `postern queue ...`), [`privileges`] (dropping root after start),
//! [`notify`] (telling systemd), [`serve`] (start-up, reload and shutdown), [`simulate`]
//! (the policy simulator behind `check-policy` and `self-test`) and [`cli`] (the command
//! line).

// The mail's path.
pub mod listener;
pub mod session;
pub mod policy;
pub mod filter;
pub mod dkim;
pub mod milter;
pub mod authentication;
pub mod intake;
pub mod queue;
pub mod delivery;

// Beside it.
pub mod auth;
pub mod budget;
pub mod cluster;
pub mod cli;
pub mod config;
pub mod control;
pub mod dns;
pub mod durable;
pub mod maillog;
pub mod metrics;
pub mod notify;
pub mod ourselves;
pub mod privileges;
pub mod serve;
pub mod simulate;
pub mod tls;
