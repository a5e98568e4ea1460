//! The SMTP client's side of the wire, sans I/O: what the daemon's outbound client
//! (`postern::delivery::client`) reads from and writes to a server.
//!
//! - [`reply`]: a push parser for the server's replies (RFC 5321 4.2), bounded.
//! - [`ehlo`]: the capabilities an EHLO reply announces (RFC 5321 4.1.1.1).
//! - [`command`]: the command lines we send (RFC 5321 4.1.1, RFC 3207, RFC 4954, RFC 3030).
//! - [`stuff`]: dot-stuffing of a message body (RFC 5321 4.5.2) and its SIZE (RFC 1870).
//!
//! Trust: replies come from an untrusted server. The parser enforces its limits on the
//! bytes as they arrive and never panics; what it keeps of reply text has had its
//! control characters replaced, so it can go into logs and bounces as is. Commands are
//! built from our own spool and configuration; a control character in an argument is
//! replaced all the same, so no argument can ever end a command line early.

pub mod command;
pub mod ehlo;
pub mod reply;
pub mod stuff;

pub use command::{ClientCommand, MailParams};
pub use ehlo::Extensions;
pub use reply::{
    MAX_REPLY_LINE, MAX_REPLY_LINES, MAX_REPLY_SIZE, ParsedReply, ReplyError, ReplyParser,
    parse_reply,
};
pub use stuff::{Stuffed, wire_size};
