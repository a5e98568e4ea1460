//! One milter conversation, MTA side, as a state machine without I/O.
//!
//! The driver calls a method per SMTP stage ([`Session::connect`], [`Session::helo`], ...);
//! each appends the packets to send (macros, then the command, or only the macros when the
//! milter asked not to see that command, or nothing once the milter accepted the message)
//! and says whether a reply must be awaited. The driver writes [`Session::take_output`],
//! feeds what it reads with [`Session::feed`] and takes [`Event`]s from
//! [`Session::poll_event`] until a [`Event::Decision`] arrives. [`Event::Progress`] is the
//! milter asking for more time: the driver, which owns the clock, restarts its timeout.
//!
//! Every reply is checked against the stage it answers: an action at the wrong stage or
//! one the milter did not negotiate, a reply nobody asked for, a malformed packet, are a
//! [`Error`] that ends the session (the driver then applies `on_failure`).

use std::fmt;

use super::encode::{self, ClientAddr};
use super::frame::{Decoder, FrameError, Packet};
use super::proto::*;
use super::reply::parse_replycode;
use crate::reply::Reply;

/// Largest packet we accept from a milter by default (command octet and data): a full
/// `SMFIR_REPLBODY` chunk of [`MILTER_CHUNK_SIZE`] octets with room to spare for a long
/// header or a 32-line reply. 128 KiB.
pub const DEFAULT_MAX_PACKET: usize = 128 * 1024;
/// [`Config::max_packet`] is raised to this at least (a whole body chunk must fit) ...
pub const MIN_MAX_PACKET: usize = MILTER_CHUNK_SIZE + 1;
/// ... and lowered to this at most (so text from a stranger is never a valid length).
pub const MAX_MAX_PACKET: usize = 16 * 1024 * 1024;
/// Buffer capacity a connection kept idle may hold on to ([`Session::shrink_buffers`]).
pub const KEPT_BUFFER: usize = 256 * 1024;

/// The protocol flags we offer by default: every version 6 flag but `SMFIP_RCPT_REJ`
/// (sending refused recipients too is not something the driver does).
pub const OFFERED_PROTOCOL: u32 = SMFI_CURR_PROT & !SMFIP_RCPT_REJ;

/// What we offer the milter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Actions (`SMFIF_*`) the milter may request; by default all of them.
    pub actions: u32,
    /// Protocol flags (`SMFIP_*`) the milter may set; by default [`OFFERED_PROTOCOL`].
    pub protocol: u32,
    /// Longest packet accepted from the milter, see [`DEFAULT_MAX_PACKET`].
    pub max_packet: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            actions: SMFI_CURR_ACTS,
            protocol: OFFERED_PROTOCOL,
            max_packet: DEFAULT_MAX_PACKET,
        }
    }
}

/// A command the MTA sends, by its place in the conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    OptNeg,
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    Header,
    Eoh,
    Body,
    Eom,
    Abort,
    Quit,
    QuitNc,
}

impl Command {
    /// The `SMFIC_*` octet.
    pub fn code(self) -> u8 {
        match self {
            Command::OptNeg => SMFIC_OPTNEG,
            Command::Connect => SMFIC_CONNECT,
            Command::Helo => SMFIC_HELO,
            Command::Mail => SMFIC_MAIL,
            Command::Rcpt => SMFIC_RCPT,
            Command::Data => SMFIC_DATA,
            Command::Header => SMFIC_HEADER,
            Command::Eoh => SMFIC_EOH,
            Command::Body => SMFIC_BODY,
            Command::Eom => SMFIC_BODYEOB,
            Command::Abort => SMFIC_ABORT,
            Command::Quit => SMFIC_QUIT,
            Command::QuitNc => SMFIC_QUIT_NC,
        }
    }

    /// The libmilter name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Command::OptNeg => "SMFIC_OPTNEG",
            Command::Connect => "SMFIC_CONNECT",
            Command::Helo => "SMFIC_HELO",
            Command::Mail => "SMFIC_MAIL",
            Command::Rcpt => "SMFIC_RCPT",
            Command::Data => "SMFIC_DATA",
            Command::Header => "SMFIC_HEADER",
            Command::Eoh => "SMFIC_EOH",
            Command::Body => "SMFIC_BODY",
            Command::Eom => "SMFIC_BODYEOB",
            Command::Abort => "SMFIC_ABORT",
            Command::Quit => "SMFIC_QUIT",
            Command::QuitNc => "SMFIC_QUIT_NC",
        }
    }

    /// The index of this stage's list in an `SMFIC_OPTNEG` answer (`SMFIM_*`).
    fn macro_index(self) -> Option<usize> {
        Some(match self {
            Command::Connect => SMFIM_CONNECT,
            Command::Helo => SMFIM_HELO,
            Command::Mail => SMFIM_ENVFROM,
            Command::Rcpt => SMFIM_ENVRCPT,
            Command::Data => SMFIM_DATA,
            Command::Eom => SMFIM_EOM,
            Command::Eoh => SMFIM_EOH,
            _ => return None,
        } as usize)
    }

    /// A connection-level stage: a final decision there holds for the whole connection.
    fn is_connection_level(self) -> bool {
        matches!(self, Command::Connect | Command::Helo)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What was agreed in option negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The milter's protocol version, 2 to 6.
    pub version: u32,
    /// The actions (`SMFIF_*`) it may take: a subset of what we offered.
    pub actions: u32,
    /// Its protocol flags (`SMFIP_*`): stages it does not want, stages it will not answer.
    pub protocol: u32,
    /// The macros it wants at each stage (`SMFIF_SETSYMLIST`), by `SMFIM_*` index; `None`
    /// where it did not say (then every macro is sent).
    macro_lists: [Option<Vec<String>>; 7],
}

impl Negotiated {
    /// Does the milter want to see this command at all?
    pub fn sends(&self, c: Command) -> bool {
        let p = self.protocol;
        match c {
            Command::Connect => p & SMFIP_NOCONNECT == 0,
            Command::Helo => p & SMFIP_NOHELO == 0,
            Command::Mail => p & SMFIP_NOMAIL == 0,
            Command::Rcpt => p & SMFIP_NORCPT == 0,
            // DATA is new in version 4; an older milter would drop the connection.
            Command::Data => self.version >= 4 && p & SMFIP_NODATA == 0,
            Command::Header => p & SMFIP_NOHDRS == 0,
            Command::Eoh => p & SMFIP_NOEOH == 0,
            Command::Body => p & SMFIP_NOBODY == 0,
            Command::QuitNc => self.version >= 6,
            Command::OptNeg | Command::Eom | Command::Abort | Command::Quit => true,
        }
    }

    /// Does it answer this command (no `SMFIP_NR_*` for it)?
    pub fn replies(&self, c: Command) -> bool {
        let p = self.protocol;
        match c {
            Command::Connect => p & SMFIP_NR_CONN == 0,
            Command::Helo => p & SMFIP_NR_HELO == 0,
            Command::Mail => p & SMFIP_NR_MAIL == 0,
            Command::Rcpt => p & SMFIP_NR_RCPT == 0,
            Command::Data => p & SMFIP_NR_DATA == 0,
            Command::Header => p & SMFIP_NR_HDR == 0,
            Command::Eoh => p & SMFIP_NR_EOH == 0,
            Command::Body => p & SMFIP_NR_BODY == 0,
            Command::OptNeg | Command::Eom => true,
            Command::Abort | Command::Quit | Command::QuitNc => false,
        }
    }

    /// May it take this action (an `SMFIF_*` bit)?
    pub fn allows(&self, action: u32) -> bool {
        self.actions & action == action
    }

    /// `SMFIP_HDR_LEADSPC`: header values travel with their leading space, both ways.
    pub fn leading_space(&self) -> bool {
        self.protocol & SMFIP_HDR_LEADSPC != 0
    }

    /// The macro names the milter asked for at this stage (without braces), if it asked.
    pub fn macro_list(&self, c: Command) -> Option<&[String]> {
        self.macro_lists
            .get(c.macro_index()?)?
            .as_ref()
            .map(Vec::as_slice)
    }
}

/// What a stage method did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// The command was not sent: the milter does not want it, or has already decided for
    /// this message or connection. (Its macros may have been: a milter that skips MAIL
    /// may still read `{mail_addr}` later, so Sendmail and Postfix send them anyway.)
    Skipped,
    /// Sent; the milter does not answer it.
    NoReply,
    /// Sent; read until an [`Event::Decision`].
    AwaitReply,
}

/// The milter's answer to a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `SMFIR_CONTINUE`: go on.
    Continue,
    /// `SMFIR_ACCEPT`: accept; at CONNECT or HELO for the whole connection, later for this
    /// message: the milter sees nothing more of it (the session skips those stages).
    Accept,
    /// `SMFIR_REJECT`: refuse with our 5xx (a recipient at RCPT, else the message or,
    /// at CONNECT/HELO, the connection).
    Reject,
    /// `SMFIR_TEMPFAIL`: refuse with our 4xx, as for `Reject`.
    Tempfail,
    /// `SMFIR_DISCARD`: accept the message and drop it (not at CONNECT/HELO: there is no
    /// message yet, and that is a protocol error).
    Discard,
    /// `SMFIR_REPLYCODE`: refuse with the milter's own reply, checked: 4xx (tempfail) or
    /// 5xx (reject), possibly multi-line (`milter::reply`). A 421 asks to close the session.
    Reply(Reply),
    /// `SMFIR_SKIP` (to a body chunk): send no more body, go on to end of message.
    Skip,
    /// `SMFIR_CONN_FAIL`: fail the SMTP connection (421).
    ConnFail,
    /// `SMFIR_SHUTDOWN`: the milter shuts down; close the SMTP session (421).
    Shutdown,
}

/// A change the milter asks for at end of message, before its decision. Header values
/// are ready to go after `name:` in the message: the leading space added unless
/// `SMFIP_HDR_LEADSPC` was negotiated, folds as CRLF followed by white space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `SMFIR_ADDHEADER`: append a header field.
    AddHeader { name: String, value: String },
    /// `SMFIR_INSHEADER`: insert a header field at `index` (0 = first), counted over all
    /// header fields as the milter saw them.
    InsHeader {
        index: u32,
        name: String,
        value: String,
    },
    /// `SMFIR_CHGHEADER`: replace the `index`-th (from 1) field called `name`; an empty
    /// value deletes it. Index 0 is read as 1, as Sendmail and Postfix do.
    ChgHeader {
        index: u32,
        name: String,
        value: String,
    },
    /// `SMFIR_CHGFROM`: a new envelope sender (angle brackets removed) and its ESMTP args.
    ChgFrom { addr: String, args: Vec<String> },
    /// `SMFIR_ADDRCPT`: a new recipient.
    AddRcpt { addr: String },
    /// `SMFIR_ADDRCPT_PAR`: a new recipient with ESMTP args.
    AddRcptPar { addr: String, args: Vec<String> },
    /// `SMFIR_DELRCPT`: remove this recipient (as it was given at RCPT).
    DelRcpt { addr: String },
    /// `SMFIR_REPLBODY`: the next piece of the new body (all pieces, in order, replace the
    /// whole body; the driver bounds their total size).
    ReplBody(Vec<u8>),
    /// `SMFIR_QUARANTINE`: hold the message, for this reason.
    Quarantine { reason: String },
}

/// What [`Session::poll_event`] hands out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Option negotiation is done: see [`Session::negotiated`]; send CONNECT next.
    Negotiated,
    /// `SMFIR_PROGRESS`: still working; restart the reply timeout.
    Progress,
    /// A modification at end of message.
    Action(Action),
    /// The answer to the command awaited; nothing is awaited any more.
    Decision(Decision),
}

/// Why the conversation cannot go on (the first two kinds are the driver's mistakes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// A command was given while the reply to this one is still awaited.
    Busy(Command),
    /// A command was given before negotiation ended, or after the session ended.
    NotReady,
    /// The packet stream is broken (too long, cut, not a milter at all).
    Frame(FrameError),
    /// The milter sent a packet when no reply was awaited.
    Unsolicited { code: u8 },
    /// The milter's reply does not belong to the command it answers.
    Unexpected { code: u8, after: Command },
    /// The milter took an action it did not negotiate.
    NotNegotiated { code: u8 },
    /// A packet whose data is wrong; the text says how.
    Malformed { code: u8, why: &'static str },
    /// The milter speaks a protocol version we cannot (below 2 or above 6).
    Version(u32),
    /// The milter asks for actions we did not offer.
    Actions { asked: u32, offered: u32 },
    /// The milter sets protocol flags we did not offer (or its version does not have).
    Protocol { asked: u32, allowed: u32 },
    /// The milter closed the connection while a reply to this command was awaited.
    Closed(Command),
}

fn code_name(code: u8) -> String {
    match reply_name(code) {
        Some(name) => name.to_string(),
        None if code.is_ascii_graphic() => format!("unknown reply '{}'", code as char),
        None => format!("unknown reply 0x{code:02x}"),
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Busy(c) => write!(f, "still waiting for the reply to {c}"),
            Error::NotReady => f.write_str("milter session not ready for this command"),
            Error::Frame(e) => e.fmt(f),
            Error::Unsolicited { code } => {
                write!(f, "{} sent when no reply was awaited", code_name(*code))
            }
            Error::Unexpected { code, after } => {
                write!(f, "{} is not a reply to {after}", code_name(*code))
            }
            Error::NotNegotiated { code } => {
                write!(f, "{} was not negotiated", code_name(*code))
            }
            Error::Malformed { code, why } => write!(f, "malformed {}: {why}", code_name(*code)),
            Error::Version(v) => write!(
                f,
                "milter protocol version {v}, we speak {SMFI_PROT_VERSION_MIN} to {SMFI_PROT_VERSION}"
            ),
            Error::Actions { asked, offered } => write!(
                f,
                "milter asks for actions 0x{asked:x}, we offered 0x{offered:x}"
            ),
            Error::Protocol { asked, allowed } => write!(
                f,
                "milter sets protocol flags 0x{asked:x}, only 0x{allowed:x} were offered"
            ),
            Error::Closed(c) => write!(f, "milter closed the connection before answering {c}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Error {
        Error::Frame(e)
    }
}

/// Where the conversation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `SMFIC_OPTNEG` sent, its answer awaited.
    Negotiating,
    /// Negotiated; CONNECT comes next.
    Ready,
    /// In the SMTP connection, outside a transaction.
    Connected,
    /// Inside a transaction (after MAIL).
    Transaction,
    /// The milter accepted or discarded this message: nothing more of it is sent.
    MessageDecided,
    /// The milter decided for the whole connection, or QUIT was sent: nothing more.
    Finished,
    /// A protocol error ended the conversation.
    Failed,
}

/// Where the milter's side stands, as far as `SMFIC_QUIT_NC` is concerned: a model of
/// the state table of libmilter's engine (`libmilter/engine.c`, `next_states`; Sendmail
/// 8.14 to 8.17). That table takes QUIT_NC only after end of message (`ST_ENDM`, i.e.
/// `SMFIC_BODYEOB` answered with continue: any other final answer puts the engine back
/// to `ST_HELO`), after an unknown command (`ST_UNKN`, never sent here), and after ABORT
/// (`ST_ABRT`) only when `ST_UNKN` may be skipped, i.e. the milter set
/// `SMFIP_NOUNKNOWN`. Anywhere else libmilter drops QUIT_NC without a word, and then the
/// CONNECT that follows too, unanswered: the MTA would wait for its reply until its
/// timeout. (Checked against Debian's libmilter 8.17.1.9, with testdata/milter/noop.c
/// and pymilter.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    /// `ST_CONN`, `ST_HELO` and anything the table treats as them.
    Outside,
    /// `ST_MAIL` to `ST_BODY`: inside a transaction.
    InMail,
    /// `ST_ENDM`, after end of message answered with continue.
    EndOfMessage,
    /// `ST_ABRT`: ABORT taken inside a transaction.
    Aborted,
}

/// One conversation with one milter (see the module documentation).
#[derive(Debug)]
pub struct Session {
    config: Config,
    negotiated: Option<Negotiated>,
    phase: Phase,
    awaiting: Option<Command>,
    /// `SMFIR_SKIP` was received: no more body chunks for this message.
    skip_body: bool,
    quit_sent: bool,
    /// The milter's side, for [`Session::can_quit_nc`].
    engine: Engine,
    decoder: Decoder,
    out: Vec<u8>,
}

impl Session {
    /// Starts a conversation: `SMFIC_OPTNEG` is in the output at once.
    pub fn new(mut config: Config) -> Session {
        config.max_packet = config.max_packet.clamp(MIN_MAX_PACKET, MAX_MAX_PACKET);
        let mut out = Vec::new();
        encode::optneg(&mut out, SMFI_PROT_VERSION, config.actions, config.protocol);
        Session {
            decoder: Decoder::new(config.max_packet),
            config,
            negotiated: None,
            phase: Phase::Negotiating,
            awaiting: Some(Command::OptNeg),
            skip_body: false,
            quit_sent: false,
            engine: Engine::Outside,
            out,
        }
    }

    // --- getters --------------------------------------------------------------------

    /// What was negotiated, once [`Event::Negotiated`] was handed out.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// The command whose reply is awaited: the driver reads (with its timeout) while this
    /// is `Some`.
    pub fn awaiting(&self) -> Option<Command> {
        self.awaiting
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    #[cfg(test)]
    pub(crate) fn config_max_packet(&self) -> usize {
        self.config.max_packet
    }

    /// Octets fed and not yet decoded: at most one packet's worth after
    /// [`Session::poll_event`] returned `None`.
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }

    /// Bytes to send are waiting.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// May this connection be kept for another SMTP connection ([`Session::quit_nc`])?
    /// Only between transactions, with nothing awaited, with a version 6 milter, and
    /// where libmilter's engine takes `SMFIC_QUIT_NC` (see `Engine`): after a message
    /// whose end it answered with continue, or after ABORT when it set
    /// `SMFIP_NOUNKNOWN`. Elsewhere the connection must be closed with QUIT.
    pub fn can_quit_nc(&self) -> bool {
        let Some(neg) = &self.negotiated else {
            return false;
        };
        // Bytes the milter sent that nobody asked for would be read as the answer to
        // the next session's CONNECT: such a connection is never kept.
        self.awaiting.is_none()
            && self.decoder.buffered() == 0
            && self.phase == Phase::Connected
            && neg.sends(Command::QuitNc)
            && match self.engine {
                Engine::EndOfMessage => true,
                Engine::Aborted => neg.protocol & SMFIP_NOUNKNOWN != 0,
                Engine::Outside | Engine::InMail => false,
            }
    }

    // --- output ---------------------------------------------------------------------

    /// The bytes to send to the milter, in order.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The bytes to send, left in place: call [`Session::clear_output`] once they are
    /// written (the buffer keeps its capacity for the next command).
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Forgets the bytes [`Session::output`] showed (they were written).
    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    /// Octets of buffer memory held now (output and input), whatever is in them.
    pub fn held(&self) -> usize {
        self.out.capacity() + self.decoder.capacity()
    }

    /// Gives back buffer memory beyond [`KEPT_BUFFER`] (a big message's body passed
    /// through): for a connection kept idle between SMTP sessions.
    pub fn shrink_buffers(&mut self) {
        if self.out.is_empty() && self.out.capacity() > KEPT_BUFFER {
            self.out = Vec::new();
        }
        self.decoder.shrink(KEPT_BUFFER);
    }

    // --- input ----------------------------------------------------------------------

    /// Bytes read from the milter. Call [`Session::poll_event`] until `None` after each.
    /// After an error the bytes are dropped.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.phase != Phase::Failed {
            self.decoder.feed(bytes);
        }
    }

    /// The milter closed its end. Fine between commands (libmilter closes after a
    /// connection-level decision); an error while a reply is awaited or inside a packet.
    pub fn handle_eof(&mut self) -> Result<(), Error> {
        if self.phase == Phase::Failed {
            return Err(Error::NotReady);
        }
        let result = match (self.decoder.eof(), self.awaiting) {
            (Err(e), _) => Err(Error::Frame(e)),
            (Ok(()), Some(c)) => Err(Error::Closed(c)),
            (Ok(()), None) => Ok(()),
        };
        self.phase = if result.is_err() {
            Phase::Failed
        } else {
            Phase::Finished
        };
        self.awaiting = None;
        result
    }

    /// The next event from what was fed, `None` when more input is needed (or after an
    /// error, which is handed out once and ends the session).
    pub fn poll_event(&mut self) -> Option<Result<Event, Error>> {
        if self.phase == Phase::Failed {
            return None;
        }
        let result = match self.decoder.next_packet() {
            Ok(None) => return None,
            Ok(Some(packet)) => self.handle(packet),
            Err(e) => Err(Error::Frame(e)),
        };
        if result.is_err() {
            self.phase = Phase::Failed;
            self.awaiting = None;
            self.out.clear();
            // Whatever else the milter sent is not read: free it.
            self.decoder = Decoder::new(self.config.max_packet);
        }
        Some(result)
    }

    fn handle(&mut self, p: Packet) -> Result<Event, Error> {
        let Some(after) = self.awaiting else {
            return Err(Error::Unsolicited { code: p.code });
        };
        if after == Command::OptNeg {
            if p.code != SMFIC_OPTNEG {
                return Err(Error::Unexpected {
                    code: p.code,
                    after,
                });
            }
            self.negotiated = Some(self.negotiate(&p.data)?);
            self.phase = Phase::Ready;
            self.awaiting = None;
            return Ok(Event::Negotiated);
        }
        let unexpected = Error::Unexpected {
            code: p.code,
            after,
        };
        let no_data = |d: Decision| -> Result<Decision, Error> {
            if p.data.is_empty() {
                Ok(d)
            } else {
                Err(Error::Malformed {
                    code: p.code,
                    why: "data after a reply that has none",
                })
            }
        };
        let decision = match p.code {
            SMFIR_PROGRESS => {
                no_data(Decision::Continue)?;
                return Ok(Event::Progress);
            }
            SMFIR_CONTINUE => no_data(Decision::Continue)?,
            SMFIR_ACCEPT => no_data(Decision::Accept)?,
            SMFIR_REJECT => no_data(Decision::Reject)?,
            SMFIR_TEMPFAIL => no_data(Decision::Tempfail)?,
            SMFIR_DISCARD if !after.is_connection_level() => no_data(Decision::Discard)?,
            // Only to a body chunk, and only if we said we understand it.
            SMFIR_SKIP if after == Command::Body && self.config.protocol & SMFIP_SKIP != 0 => {
                no_data(Decision::Skip)?
            }
            SMFIR_CONN_FAIL => no_data(Decision::ConnFail)?,
            SMFIR_SHUTDOWN => no_data(Decision::Shutdown)?,
            SMFIR_REPLYCODE => Decision::Reply(
                parse_replycode(&p.data).map_err(|why| Error::Malformed { code: p.code, why })?,
            ),
            _ if after == Command::Eom => return self.action(p).map(Event::Action),
            _ => return Err(unexpected),
        };
        self.decided(after, &decision);
        Ok(Event::Decision(decision))
    }

    /// The state after the answer to `after`.
    fn decided(&mut self, after: Command, d: &Decision) {
        use Decision::*;
        self.awaiting = None;
        let in_message = matches!(self.phase, Phase::Transaction | Phase::MessageDecided);
        self.phase = match (after, d) {
            (_, Shutdown | ConnFail) => Phase::Finished,
            (c, Continue) if c.is_connection_level() => Phase::Connected,
            (c, _) if c.is_connection_level() => Phase::Finished,
            (Command::Eom, _) => Phase::Connected,
            (_, Continue | Skip) => self.phase,
            (_, Accept | Discard) => Phase::MessageDecided,
            // A refused recipient is one recipient; the transaction goes on.
            (Command::Rcpt, Reject | Tempfail | Reply(_)) => self.phase,
            (_, Reject | Tempfail | Reply(_)) if in_message => Phase::Connected,
            (_, _) => self.phase,
        };
        if matches!(d, Skip) {
            self.skip_body = true;
        }
        // libmilter's engine after the answer (mi_engine): accept sends it back to
        // ST_HELO; reject, tempfail and discard too, except at RCPT (CT_IGNO: one
        // recipient refused, the transaction goes on); continue and skip leave it.
        self.engine = match (after, d) {
            (_, Continue | Skip) => self.engine,
            (Command::Rcpt, Reject | Tempfail | Discard | Reply(_)) => self.engine,
            _ => Engine::Outside,
        };
    }

    fn action(&mut self, p: Packet) -> Result<Action, Error> {
        let code = p.code;
        let needed = match code {
            SMFIR_ADDHEADER | SMFIR_INSHEADER => SMFIF_ADDHDRS,
            SMFIR_CHGHEADER => SMFIF_CHGHDRS,
            SMFIR_CHGFROM => SMFIF_CHGFROM,
            SMFIR_ADDRCPT => SMFIF_ADDRCPT,
            SMFIR_ADDRCPT_PAR => SMFIF_ADDRCPT_PAR,
            SMFIR_DELRCPT => SMFIF_DELRCPT,
            SMFIR_REPLBODY => SMFIF_CHGBODY,
            SMFIR_QUARANTINE => SMFIF_QUARANTINE,
            _ => {
                return Err(Error::Unexpected {
                    code,
                    after: Command::Eom,
                });
            }
        };
        let Some(neg) = &self.negotiated else {
            return Err(Error::NotReady);
        };
        if !neg.allows(needed) {
            return Err(Error::NotNegotiated { code });
        }
        let lead = neg.leading_space();
        let bad = |why| Error::Malformed { code, why };
        if code == SMFIR_REPLBODY {
            return Ok(Action::ReplBody(p.data));
        }
        let mut data = &p.data[..];
        let action = match code {
            SMFIR_ADDHEADER => {
                let (name, value) = header_pair(&mut data, lead).map_err(bad)?;
                Action::AddHeader { name, value }
            }
            SMFIR_INSHEADER | SMFIR_CHGHEADER => {
                let index = take_u32(&mut data).ok_or_else(|| bad("no index"))?;
                let (name, value) = header_pair(&mut data, lead).map_err(bad)?;
                if code == SMFIR_INSHEADER {
                    Action::InsHeader { index, name, value }
                } else {
                    Action::ChgHeader {
                        index: index.max(1),
                        name,
                        value,
                    }
                }
            }
            SMFIR_QUARANTINE => Action::Quarantine {
                reason: text(take_str(&mut data).ok_or_else(|| bad("no reason"))?),
            },
            _ => {
                let addr = take_str(&mut data).ok_or_else(|| bad("no address"))?;
                let addr = text(addr.strip_prefix(b"<").unwrap_or(addr));
                let addr = addr.strip_suffix('>').map(str::to_string).unwrap_or(addr);
                if addr.is_empty() && code != SMFIR_CHGFROM {
                    return Err(bad("empty recipient"));
                }
                let mut args = Vec::new();
                while !data.is_empty() {
                    let s = take_str(&mut data).ok_or_else(|| bad("argument without NUL"))?;
                    args.extend(text(s).split_ascii_whitespace().map(str::to_string));
                }
                match code {
                    SMFIR_CHGFROM => Action::ChgFrom { addr, args },
                    SMFIR_ADDRCPT_PAR => Action::AddRcptPar { addr, args },
                    _ if !args.is_empty() => return Err(bad("arguments where none belong")),
                    SMFIR_ADDRCPT => Action::AddRcpt { addr },
                    _ => Action::DelRcpt { addr },
                }
            }
        };
        if !data.is_empty() {
            return Err(bad("data after the last field"));
        }
        Ok(action)
    }

    /// Reads the milter's `SMFIC_OPTNEG` answer (libmilter's `st_optionneg` writes it;
    /// Postfix's `milter8_connect` reads it the same way).
    fn negotiate(&self, data: &[u8]) -> Result<Negotiated, Error> {
        let bad = |why| Error::Malformed {
            code: SMFIC_OPTNEG,
            why,
        };
        let mut d = data;
        let (Some(version), Some(actions), Some(protocol)) =
            (take_u32(&mut d), take_u32(&mut d), take_u32(&mut d))
        else {
            return Err(bad("shorter than its three fields"));
        };
        if !(SMFI_PROT_VERSION_MIN..=SMFI_PROT_VERSION).contains(&version) {
            return Err(Error::Version(version));
        }
        if actions & !self.config.actions != 0 {
            return Err(Error::Actions {
                asked: actions,
                offered: self.config.actions,
            });
        }
        // What the milter's version knows; the header no-reply flag (Postfix's
        // "no_header_reply") predates version 6.
        let known = match version {
            2 => SMFI_V2_PROT | SMFIP_NR_HDR,
            3 => SMFI_V3_PROT | SMFIP_NR_HDR,
            4 | 5 => SMFI_V4_PROT | SMFIP_NR_HDR,
            _ => SMFI_CURR_PROT,
        };
        let allowed = known & self.config.protocol;
        if protocol & !allowed != 0 {
            return Err(Error::Protocol {
                asked: protocol,
                allowed,
            });
        }
        // SMFIF_SETSYMLIST: (SMFIM_* index, "macro names") pairs to the end.
        let mut macro_lists: [Option<Vec<String>>; 7] = Default::default();
        while !d.is_empty() {
            let index = take_u32(&mut d).ok_or_else(|| bad("cut macro list"))?;
            let names = take_str(&mut d).ok_or_else(|| bad("macro list without NUL"))?;
            // An unknown index is ignored, as Postfix does.
            if let Some(slot) = macro_lists.get_mut(index as usize) {
                *slot = Some(
                    text(names)
                        .split_ascii_whitespace()
                        .map(|n| bare_macro(n).to_string())
                        .collect(),
                );
            }
        }
        Ok(Negotiated {
            version,
            actions,
            protocol,
            macro_lists,
        })
    }

    // --- stages (mutators) ----------------------------------------------------------

    /// Checks a stage may be sent now, and whether the milter's version has it at all.
    fn ready(&self) -> Result<&Negotiated, Error> {
        if let Some(c) = self.awaiting {
            return Err(Error::Busy(c));
        }
        match (&self.negotiated, self.phase) {
            (_, Phase::Failed | Phase::Negotiating) | (None, _) => Err(Error::NotReady),
            (Some(n), _) => Ok(n),
        }
    }

    /// Sends the stage's macros (those the milter asked for) and, if it wants it, the
    /// command built by `encode`.
    fn stage(
        &mut self,
        c: Command,
        macros: &[(&str, &str)],
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Sent, Error> {
        let neg = self.ready()?;
        let sends = neg.sends(c);
        let replies = neg.replies(c);
        // DATA does not exist before version 4: neither does its macro list.
        if c == Command::Data && neg.version < 4 {
            return Ok(Sent::Skipped);
        }
        let wanted: Vec<(&str, &str)> = match neg.macro_list(c) {
            Some(list) => macros
                .iter()
                .filter(|(name, _)| list.iter().any(|l| l == bare_macro(name)))
                .copied()
                .collect(),
            None => macros.to_vec(),
        };
        if !wanted.is_empty() {
            encode::macros(&mut self.out, c.code(), &wanted);
        }
        if !sends {
            return Ok(Sent::Skipped);
        }
        encode(&mut self.out);
        self.engine = match c {
            Command::Mail
            | Command::Rcpt
            | Command::Data
            | Command::Header
            | Command::Eoh
            | Command::Body => Engine::InMail,
            Command::Eom => Engine::EndOfMessage,
            _ => Engine::Outside,
        };
        Ok(if replies {
            self.awaiting = Some(c);
            Sent::AwaitReply
        } else {
            Sent::NoReply
        })
    }

    /// Skips the stages of a message the milter has already decided, and anything after
    /// a connection-level decision.
    fn in_message(&self) -> Result<bool, Error> {
        self.ready()?;
        Ok(self.phase == Phase::Transaction)
    }

    /// `SMFIC_CONNECT`, with the connect macros (`j`, `{daemon_name}`, `_`,
    /// `{client_addr}`, ...). `hostname` is the client's name, `[address]` if it has none.
    pub fn connect(
        &mut self,
        macros: &[(&str, &str)],
        hostname: &str,
        addr: &ClientAddr,
    ) -> Result<Sent, Error> {
        self.ready()?;
        if self.phase != Phase::Ready {
            return Err(Error::NotReady);
        }
        self.phase = Phase::Connected;
        self.stage(Command::Connect, macros, |o| {
            encode::connect(o, hostname, addr)
        })
    }

    /// `SMFIC_HELO` with the HELO macros (`{tls_version}`, `{cipher}`, ...).
    pub fn helo(&mut self, macros: &[(&str, &str)], name: &str) -> Result<Sent, Error> {
        self.ready()?;
        if self.phase == Phase::Finished || self.phase == Phase::Ready {
            return Ok(Sent::Skipped);
        }
        self.stage(Command::Helo, macros, |o| encode::helo(o, name))
    }

    /// `SMFIC_MAIL`: starts a transaction. `sender` without angle brackets, `args` the
    /// ESMTP parameters. Macros: `i`, `{mail_addr}`, `{auth_authen}`, ...
    pub fn mail(
        &mut self,
        macros: &[(&str, &str)],
        sender: &str,
        args: &[&str],
    ) -> Result<Sent, Error> {
        self.ready()?;
        if !matches!(self.phase, Phase::Connected | Phase::MessageDecided) {
            return Ok(Sent::Skipped);
        }
        self.phase = Phase::Transaction;
        self.skip_body = false;
        self.stage(Command::Mail, macros, |o| encode::mail(o, sender, args))
    }

    /// `SMFIC_RCPT`, once per recipient, with `{rcpt_addr}` and friends.
    pub fn rcpt(
        &mut self,
        macros: &[(&str, &str)],
        recipient: &str,
        args: &[&str],
    ) -> Result<Sent, Error> {
        if !self.in_message()? {
            return Ok(Sent::Skipped);
        }
        self.stage(Command::Rcpt, macros, |o| encode::rcpt(o, recipient, args))
    }

    /// `SMFIC_DATA` (skipped for milters older than version 4).
    pub fn data(&mut self, macros: &[(&str, &str)]) -> Result<Sent, Error> {
        if !self.in_message()? {
            return Ok(Sent::Skipped);
        }
        self.stage(Command::Data, macros, encode::data)
    }

    /// `SMFIC_HEADER`: one header field; `value` is everything after the colon, folds
    /// (CRLF + white space) included. The leading space is dropped unless
    /// `SMFIP_HDR_LEADSPC` was negotiated, and folds travel as LF, as Sendmail sends them.
    pub fn header(&mut self, name: &str, value: &[u8]) -> Result<Sent, Error> {
        if !self.in_message()? {
            return Ok(Sent::Skipped);
        }
        let lead = self
            .negotiated
            .as_ref()
            .is_some_and(Negotiated::leading_space);
        let value = if lead {
            value
        } else {
            value.strip_prefix(b" ").unwrap_or(value)
        };
        let mut wire = Vec::with_capacity(value.len());
        let mut rest = value;
        while let Some(i) = memchr::memmem::find(rest, b"\r\n") {
            wire.extend_from_slice(&rest[..i]);
            wire.push(b'\n');
            rest = &rest[i + 2..];
        }
        wire.extend_from_slice(rest);
        self.stage(Command::Header, &[], |o| encode::header(o, name, &wire))
    }

    /// `SMFIC_EOH`, with the end-of-header macros.
    pub fn eoh(&mut self, macros: &[(&str, &str)]) -> Result<Sent, Error> {
        if !self.in_message()? {
            return Ok(Sent::Skipped);
        }
        self.stage(Command::Eoh, macros, encode::eoh)
    }

    /// `SMFIC_BODY`: sends body octets and says how many it took. When the milter answers
    /// body chunks, one packet of at most [`MILTER_CHUNK_SIZE`] octets goes out and its
    /// reply must be read before the rest; when it does not (`SMFIP_NR_BODY`), all of it
    /// goes out at once. After `SMFIR_SKIP` (or with `SMFIP_NOBODY`) everything is taken
    /// and nothing sent.
    pub fn body(&mut self, body: &[u8]) -> Result<(usize, Sent), Error> {
        if !self.in_message()? || self.skip_body {
            return Ok((body.len(), Sent::Skipped));
        }
        if body.is_empty() {
            return Ok((0, Sent::Skipped));
        }
        let neg = self.ready()?;
        if !neg.sends(Command::Body) {
            return Ok((body.len(), Sent::Skipped));
        }
        let replies = neg.replies(Command::Body);
        self.engine = Engine::InMail;
        if !replies {
            encode::body(&mut self.out, body);
            return Ok((body.len(), Sent::NoReply));
        }
        let n = body.len().min(MILTER_CHUNK_SIZE);
        encode::body(&mut self.out, &body[..n]);
        self.awaiting = Some(Command::Body);
        Ok((n, Sent::AwaitReply))
    }

    /// `SMFIC_BODYEOB`: end of message. The milter answers with [`Event::Action`]s, then
    /// its [`Event::Decision`]; the transaction is over after it.
    pub fn eom(&mut self, macros: &[(&str, &str)]) -> Result<Sent, Error> {
        if !self.in_message()? {
            if self.phase == Phase::MessageDecided {
                self.phase = Phase::Connected;
            }
            return Ok(Sent::Skipped);
        }
        self.stage(Command::Eom, macros, encode::bodyeob)
    }

    /// `SMFIC_ABORT`: the transaction ended without end of message (RSET, a refused
    /// DATA, a client gone). Nothing outside a transaction; no reply.
    pub fn abort(&mut self) -> Result<Sent, Error> {
        self.ready()?;
        if !matches!(self.phase, Phase::Transaction | Phase::MessageDecided) {
            return Ok(Sent::Skipped);
        }
        self.phase = Phase::Connected;
        encode::abort(&mut self.out);
        // libmilter takes ABORT inside a transaction only; elsewhere (after an accepted
        // MAIL, say) it ignores it and goes back to ST_HELO.
        self.engine = match self.engine {
            Engine::InMail => Engine::Aborted,
            _ => Engine::Outside,
        };
        Ok(Sent::NoReply)
    }

    /// `SMFIC_QUIT`: the end; no reply, close the connection after writing it.
    pub fn quit(&mut self) -> Result<Sent, Error> {
        self.ready()?;
        self.phase = Phase::Finished;
        if self.quit_sent {
            return Ok(Sent::Skipped);
        }
        self.quit_sent = true;
        encode::quit(&mut self.out);
        Ok(Sent::NoReply)
    }

    /// `SMFIC_QUIT_NC` ("quit, new connection follows", version 6): this SMTP connection
    /// is over and the next one will use this milter connection; [`Session::connect`] is
    /// allowed again, without a new negotiation (libmilter negotiates once per
    /// connection: `ST_Q_NC` leads to `ST_CONN` only). Only where
    /// [`Session::can_quit_nc`] says so, else `NotReady`: send QUIT and close.
    pub fn quit_nc(&mut self) -> Result<Sent, Error> {
        self.ready()?;
        if !self.can_quit_nc() {
            return Err(Error::NotReady);
        }
        encode::quit_nc(&mut self.out);
        self.phase = Phase::Ready;
        self.skip_body = false;
        self.engine = Engine::Outside;
        Ok(Sent::NoReply)
    }
}

fn take_u32(d: &mut &[u8]) -> Option<u32> {
    let (head, rest) = d.split_first_chunk::<4>()?;
    *d = rest;
    Some(u32::from_be_bytes(*head))
}

/// A NUL-terminated string (without its NUL).
fn take_str<'a>(d: &mut &'a [u8]) -> Option<&'a [u8]> {
    let i = memchr::memchr(0, d)?;
    let s = &d[..i];
    *d = &d[i + 1..];
    Some(s)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A macro name without its braces, for comparing with a milter's list.
fn bare_macro(name: &str) -> &str {
    name.strip_prefix('{')
        .and_then(|n| n.strip_suffix('}'))
        .unwrap_or(name)
}

/// The longest line of a message, CRLF excluded (RFC 5322 2.1.1).
const MAX_LINE: usize = 998;

/// A header field from the milter: a name (printable ASCII, no colon) and a value made
/// ready for the message (see [`Action`]). A value line that would start a new field or
/// end the header section is refused: a milter may add headers, not smuggle them.
fn header_pair(d: &mut &[u8], lead: bool) -> Result<(String, String), &'static str> {
    let name = take_str(d).ok_or("no header name")?;
    let value = take_str(d).ok_or("no header value")?;
    if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b) && b != b':') {
        return Err("bad header name");
    }
    let value = text(value);
    let value = value
        .strip_suffix('\n')
        .unwrap_or(&value)
        .replace("\r\n", "\n");
    if value.contains('\r') {
        return Err("bare CR in a header value");
    }
    let mut lines = value.split('\n');
    let first = lines.next().unwrap_or_default();
    // RFC 5322 2.1.1: at most 998 octets a line, the field's name and colon included.
    if name.len() + 2 + first.len() > MAX_LINE {
        return Err("a header line over 998 octets");
    }
    let mut out = String::with_capacity(value.len() + 8);
    if !lead && !first.is_empty() {
        out.push(' ');
    }
    out.push_str(first);
    for line in lines {
        if !line.starts_with([' ', '\t']) {
            return Err("a header value line that is not a fold");
        }
        // RFC 5322 3.2.2: a folded line holds more than white space.
        if line.trim_matches([' ', '\t']).is_empty() {
            return Err("a header value line of white space only");
        }
        if line.len() > MAX_LINE {
            return Err("a header line over 998 octets");
        }
        out.push_str("\r\n");
        out.push_str(line);
    }
    Ok((text(name), out))
}
