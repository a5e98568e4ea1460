//! The milter protocol, MTA side, sans I/O: Postern talking to rspamd, clamav-milter,
//! OpenDKIM and any other mail filter written for Sendmail's milter interface.
//!
//! # The protocol
//! Sendmail's mail filter protocol ("milter"), version 6, as libmilter 8.14 and later
//! speak it. There is no RFC: the reference is Sendmail's libmilter source
//! (`include/libmilter/mfdef.h` for the numbers, `libmilter/engine.c` for the milter's
//! side of the conversation, `mfapi.h` for the macro lists), with Postfix's
//! `src/milter/milter8.c` as a second MTA-side implementation and Todd Vierling's
//! "The Sendmail Milter Protocol, Version 2" (with its version 6 addendum) as a prose
//! description. The constants in [`proto`] carry the libmilter names.
//!
//! Every packet, both ways, is a 4-octet big-endian length, one command or reply octet
//! and its data (`frame`). The MTA opens with `SMFIC_OPTNEG` (our version, the actions a
//! milter may take, the protocol flags we can honour); the milter answers with its
//! version (2 to 6), the actions it wants, the stages it does not want to see
//! (`SMFIP_NO*`), the stages it will not answer (`SMFIP_NR_*`) and, optionally, the macros
//! it wants at each stage. Then the MTA reports the SMTP session as it happens: each
//! command preceded by its macros (`SMFIC_MACRO`), CONNECT, HELO, MAIL, RCPT, DATA, the
//! header fields, end of headers, body chunks, end of message; ABORT when a transaction
//! ends early, QUIT at the end. The milter answers each (unless it said it would not)
//! with continue, accept, reject, tempfail, discard or its own SMTP reply; at end of
//! message it may first ask for modifications (headers, envelope, body, quarantine).
//!
//! # This module
//! - [`Session`]: the conversation as a state machine. Stage methods append the bytes to
//!   send and say whether to wait for a reply; [`Session::feed`] takes the milter's bytes
//!   and [`Session::poll_event`] turns them into [`Event`]s, each checked against the
//!   stage it answers and what was negotiated. No socket, no clock: the driver (the
//!   daemon's `milter` module) does the I/O and the timeouts (`Event::Progress` restarts
//!   the reply timeout).
//! - [`encode`]: one encoder per MTA command.
//! - [`frame`]: framing, the packet length bound, and the detection of a peer that is
//!   not a milter (clamd, an HTTP server, spamd, an SMTP server).
//! - [`reply`]: `SMFIR_REPLYCODE` into a checked SMTP [`crate::Reply`].
//!
//! # Trust and limits
//! A milter is a network peer; a broken or hostile one must not make us allocate without
//! bound or panic. A packet may be at most [`Config::max_packet`] octets
//! ([`DEFAULT_MAX_PACKET`], 128 KiB; never less than a whole 65535-octet body chunk and
//! its code, never more than 16 MiB): a longer declared length is an error as soon as
//! the 4 octets are read, before anything is stored. The decoder holds what it was fed
//! plus at most one packet. A milter's SMTP reply has at most 100 lines; header fields it
//! adds may not carry a line that is not a fold. The total size of a replaced body is
//! the driver's to bound (it gets the pieces one by one). Nothing here panics on any
//! input; the fuzz target `milter` checks that.

pub mod encode;
pub mod frame;
pub mod proto;
pub mod reply;
mod session;

pub use encode::ClientAddr;
pub use frame::{FrameError, Stranger};
pub use session::{
    Action, Command, Config, DEFAULT_MAX_PACKET, Decision, Error, Event, MAX_MAX_PACKET,
    MIN_MAX_PACKET, Negotiated, OFFERED_PROTOCOL, Phase, Sent, Session,
};

#[cfg(test)]
mod tests;
