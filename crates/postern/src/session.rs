//! Drives one SMTP session: moves bytes between the socket and the sans-IO
//! `postern_smtp::Session`, and answers its questions: the relay policy for each
//! recipient, the spool for each message.
//!
//! Trust: the socket is the network. The protocol core bounds what it buffers; this
//! driver bounds time: every read and every write waits at most `command_timeout`
//! (a client that stops reading our replies cannot hold a task forever).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postern_smtp::server::{Message, Peer, SessionConfig};
use postern_smtp::{Event, Reply, ReversePath, Session, catalogue};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::Config;
use crate::delivery;
use crate::maillog;
use crate::policy::{Client, Decision, RelayPolicy};
use crate::queue::{Envelope, Place, RcptState, Spool, StoredMessage};

/// What every session shares: read-only configuration and policy, and the spool.
pub struct Shared {
    pub config: Config,
    pub policy: RelayPolicy,
    pub spool: Spool,
    pub delivery: delivery::Handle,
}

/// Read size; small enough that 10,000 idle sessions stay cheap.
const READ_BUFFER: usize = 8 * 1024;

/// Runs a session on an accepted TCP connection until it ends.
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    shutdown: watch::Receiver<bool>,
) {
    // Replies are written once per batch of pipelined commands, so Nagle would only
    // add delayed-ACK stalls (~40 ms per message).
    let _ = stream.set_nodelay(true);
    let session_config = SessionConfig {
        hostname: shared.config.hostname.clone(),
        max_message_size: shared.config.max_message_size,
        max_recipients: shared.config.max_recipients,
        max_errors: shared.config.max_errors,
        starttls: false,
    };
    let session = Session::new(
        session_config,
        Peer {
            addr: peer,
            tls: None,
        },
    );
    let reason = drive(stream, session, shared, shutdown).await;
    maillog::disconnected(peer, reason);
}

/// The event loop; returns why the session ended.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    mut session: Session,
    shared: &Shared,
    mut shutdown: watch::Receiver<bool>,
) -> &'static str {
    let timeout = shared.config.command_timeout;
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        match session.poll() {
            Event::NeedInput => {
                if flush(&mut stream, &mut session, timeout).await.is_err() {
                    return "write failed";
                }
                if *shutdown.borrow() {
                    session.shutdown();
                    continue;
                }
                tokio::select! {
                    read = tokio::time::timeout(timeout, stream.read(&mut buf)) => match read {
                        Ok(Ok(0)) => return "client closed",
                        Ok(Ok(n)) => session.receive(&buf[..n]),
                        Ok(Err(_)) => return "read failed",
                        Err(_) => session.timeout(),
                    },
                    _ = shutdown.wait_for(|stop| *stop) => session.shutdown(),
                }
            }
            Event::Recipient(req) => {
                let client = Client {
                    ip: session.peer().ip(),
                    authenticated: req.authenticated.as_deref(),
                };
                let decision = shared.policy.decide(client, &req.recipient);
                match &decision {
                    Decision::Accept(rule) => {
                        maillog::recipient_accepted(session.peer(), &req.recipient, *rule)
                    }
                    Decision::Refuse(rule, reply) => maillog::recipient_refused(
                        session.peer(),
                        req.authenticated.as_deref(),
                        &req.sender,
                        &req.recipient,
                        *rule,
                        reply,
                    ),
                }
                session.answer_recipient(decision.into_result());
            }
            Event::Message(message) => {
                let reply = store(shared, *message).await;
                session.answer_message(reply);
            }
            Event::StartTls => {
                // Not offered by this build (SessionConfig::starttls is false), so the
                // core never asks; closing is the safe answer to a logic error.
                let _ = flush(&mut stream, &mut session, timeout).await;
                return "starttls unavailable";
            }
            Event::Close => {
                let _ = flush(&mut stream, &mut session, timeout).await;
                linger(&mut stream, &mut buf).await;
                return if *shutdown.borrow() {
                    "shutdown"
                } else {
                    "closed"
                };
            }
        }
    }
}

/// Closes our side, then reads and drops what the client still sends for a moment.
/// Closing a socket with unread input makes the kernel send a reset, which can destroy
/// our last reply (the 421 or 221) before the client reads it.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, buf: &mut [u8]) {
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut budget = 256 * 1024usize;
        while budget > 0 {
            match stream.read(buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => budget = budget.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Sends whatever replies are pending, within the timeout.
async fn flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    session: &mut Session,
    timeout: Duration,
) -> Result<(), ()> {
    if !session.has_output() {
        return Ok(());
    }
    let out = session.take_output();
    match tokio::time::timeout(timeout, stream.write_all(&out)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Prepends our Received: header and stores the message durably; the reply is 250
/// only once the spool says it is on disk.
async fn store(shared: &Shared, message: Message) -> Reply {
    let spool = &shared.spool;
    let id = spool.new_id();
    let id_text = id.to_string();
    let now = chrono::Local::now();
    let received = message.received_header(&shared.config.hostname, &id_text, &now.to_rfc2822());
    let mut data = Vec::with_capacity(received.len() + message.body.len());
    data.extend_from_slice(received.as_bytes());
    data.extend_from_slice(&message.body);

    let envelope = Envelope {
        id,
        arrived: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
        client: message.peer.to_string(),
        helo: message.helo.clone(),
        auth: message.authenticated.clone(),
        sender: match &message.sender {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(a) => a.to_string(),
        },
        params: message.params.iter().map(|p| p.to_wire()).collect(),
        smtputf8: message.smtputf8,
        recipients: message.recipients.iter().map(|a| a.to_string()).collect(),
    };
    match spool.store(&envelope, &data).await {
        Ok(location) => {
            maillog::message_accepted(
                &id_text,
                message.peer,
                message.authenticated.as_deref(),
                &message.sender,
                &message.recipients,
                data.len(),
            );
            shared.delivery.enqueue(StoredMessage {
                states: vec![RcptState::Pending; envelope.recipients.len()],
                size: data.len() as u64,
                envelope,
                place: Place::Log(location),
            });
            catalogue::queued(&id_text)
        }
        Err(e) => {
            maillog::message_store_failed(message.peer, &message.sender, &e);
            catalogue::local_error()
        }
    }
}
