//! Postern's SMTP protocol core, sans I/O.
//!
//! This crate parses and produces SMTP bytes and nothing else: it has no socket, no
//! clock, no file and no async runtime (its Cargo.toml has no such dependency, so it
//! cannot grow one by accident). The daemon (`postern`) drives it.
//!
//! - [`address`]: envelope addresses, canonicalised, with their relay-trick flags.
//! - [`client`]: the client's side: reply parser, EHLO capabilities, command lines,
//!   dot-stuffing (driven by the daemon's outbound client).
//! - [`command`]: command lines → [`command::Command`].
//! - [`data`]: the DATA/BDAT body readers (dot-unstuffing, smuggling-safe end detection).
//! - [`milter`]: the milter protocol, MTA side: framing, negotiation, every command and
//!   reply, a session state machine for the daemon's milter driver.
//! - [`proxy`]: the PROXY protocol header (v1 and v2) a load balancer sends first.
//! - [`reply`]: replies and the one catalogue of every reply we send.
//! - [`server`]: the server session state machine.

pub mod address;
pub mod client;
pub mod command;
pub mod data;
pub mod milter;
pub mod reply;
pub mod proxy;
pub mod server;

pub use address::{Address, Domain, ReversePath};
pub use client::{ClientCommand, Extensions, MailParams, ParsedReply, ReplyError, ReplyParser};
pub use reply::{Reply, Status, catalogue};
pub use server::{
    AuthRequest, Event, Message, Peer, RecipientRequest, Refusals, SenderRequest, Session,
    SessionConfig, TlsInfo,
};
