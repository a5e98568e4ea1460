//! Every integration test in one binary (as rustls and ripgrep do): one link instead of
//! ten, and one set of shared helpers (`common`). Each module starts the real `postern`
//! binary on loopback and talks to it with real clients; names say what must hold.
//!
//! Run one area with `cargo test -p postern --test it delivery::` (a module name).

mod common;

mod authentication;
mod cluster;

mod delivery;
mod dkim;
mod filtering;
mod hardening_auth;
mod hardening_delivery;
mod hardening_queue;
mod hardening_session;
mod milter;
mod ops;
mod proxy;
mod queue_cli;
mod rate_limits;
mod reload;
mod server;
mod service;
mod tls_auth;
mod transcripts;
mod user_cli;
