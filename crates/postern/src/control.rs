//! The control socket: how `postern queue ...` talks to a running server, so that queue
//! management never edits files under the server's feet (no torn state).
//!
//! `SPOOL/control.sock`, a Unix socket with mode 0600 (only the spool's owner may use
//! it). One request per connection, one line (see [`Request`]): `LIST [JSON] [DOMAIN d]`
//! (`JSON`: one JSON object per message and line), `SHOW <id>`, `FLUSH`,
//! `DELETE <id>`, `DELETE DOMAIN <d>`; `RELEASE <id>` (quarantine); `RELOAD` (the
//! configuration: `OK <summary>` or `ERR <why>`, the configuration in use then
//! unchanged). The answer is text for the operator, ending when the server closes the
//! connection; a failure starts with `ERR`. A listing is streamed page by page as the
//! runner hands them out (one page in memory, whatever the queue's size), so its first
//! line comes at once; a deletion answers once its DONE records are on disk.
//! When no server runs, the CLI works on the spool directly (`queue list/show` read it,
//! `queue delete` takes the spool lock first).
//!
//! Trust: whoever can open the socket is the spool's owner (file mode); requests are
//! still parsed strictly and bounded (one line of at most 512 octets).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::delivery::{self, ListPage, QueueItem};
use crate::queue::quarantine::{self, Quarantined};
use crate::queue::{QueueId, Spool, StoredMessage, read_body_in};

pub const SOCKET: &str = "control.sock";

pub fn socket_path(spool_dir: &Path) -> PathBuf {
    spool_dir.join(SOCKET)
}

/// Binds the control socket (replacing a stale one: we hold the spool lock, so no other
/// server uses it) and serves requests until the task is dropped.
/// A reload request: the server answers on the sender, `Ok(summary)` or `Err(why)`.
pub type ReloadRequest = oneshot::Sender<Result<String, String>>;

pub fn start(
    spool: Spool,
    handle: delivery::Handle,
    reloads: mpsc::Sender<ReloadRequest>,
) -> std::io::Result<()> {
    let spool_dir = spool.dir().to_path_buf();
    let spool_dir = spool_dir.as_path();
    let path = socket_path(spool_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let dir = spool_dir.to_path_buf();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            let dir = dir.clone();
            let spool = spool.clone();
            let reloads = reloads.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = TokioBufReader::new(read.take(MAX_REQUEST as u64 + 1));
                let request =
                    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
                        .await;
                let answer = match request {
                    Ok(Ok(_)) => match Request::parse(&line) {
                        Ok(Request::Reload) => reload(&reloads).await,
                        Ok(Request::List { json, domain }) => {
                            // Streamed: what it writes is the answer.
                            let _ = stream_list(&handle, &mut write, json, domain).await;
                            return;
                        }
                        Ok(request) => answer(&handle, &spool, &dir, request).await,
                        Err(why) => format!("ERR {why}\n"),
                    },
                    _ => "ERR no request\n".to_string(),
                };
                let _ = write_bounded(&mut write, answer.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// Asks the server to reload and waits for the outcome (one reload at a time: the
/// server's main task does them in turn).
async fn reload(reloads: &mpsc::Sender<ReloadRequest>) -> String {
    let (tx, rx) = oneshot::channel();
    if reloads.send(tx).await.is_err() {
        return "ERR the server is stopping\n".to_string();
    }
    match rx.await {
        Ok(Ok(summary)) => format!("OK reloaded: {summary}\n"),
        Ok(Err(why)) => format!("ERR {why}\n"),
        Err(_) => "ERR the server is stopping\n".to_string(),
    }
}

/// The longest request line, in octets (with its line ending).
/// (`DELETE DOMAIN` and a domain of the longest 255 octets fit.)
pub const MAX_REQUEST: usize = 512;
/// How long a write of the answer may take: a client that stops reading (an operator
/// reading a listing in a pager, or gone) is dropped after this; it holds one page.
const WRITE_TIMEOUT: Duration = Duration::from_secs(600);

/// A control request, parsed strictly: one verb, its arguments, nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `LIST [JSON] [DOMAIN d]`: the queue, or the messages with a recipient at `d`.
    List {
        json: bool,
        domain: Option<String>,
    },
    Show(QueueId),
    Flush,
    Delete(QueueId),
    /// `DELETE DOMAIN d`: the messages whose every pending recipient is at `d`.
    DeleteDomain(String),
    Release(QueueId),
    Reload,
}

impl Request {
    /// Parses one request line (its CRLF or LF ending optional).
    pub fn parse(line: &str) -> Result<Request, String> {
        if line.len() > MAX_REQUEST {
            return Err(format!("request longer than {MAX_REQUEST} octets"));
        }
        let line = line
            .strip_suffix('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .unwrap_or(line);
        let words: Vec<&str> = line.split(' ').collect();
        let id = |w: &str| {
            w.parse::<QueueId>()
                .map_err(|_| format!("not a queue id: {w:?}"))
        };
        Ok(match words.as_slice() {
            ["LIST"] => Request::List {
                json: false,
                domain: None,
            },
            ["LIST", "JSON"] => Request::List {
                json: true,
                domain: None,
            },
            ["LIST", "DOMAIN", d] => Request::List {
                json: false,
                domain: Some(domain(d)?),
            },
            ["LIST", "JSON", "DOMAIN", d] => Request::List {
                json: true,
                domain: Some(domain(d)?),
            },
            ["SHOW", i] => Request::Show(id(i)?),
            ["FLUSH"] => Request::Flush,
            ["DELETE", "DOMAIN", d] => Request::DeleteDomain(domain(d)?),
            ["DELETE", i] => Request::Delete(id(i)?),
            ["RELEASE", i] => Request::Release(id(i)?),
            ["RELOAD"] => Request::Reload,
            _ => return Err("unknown request".to_string()),
        })
    }

    /// The request as the CLI sends it (what [`Request::parse`] reads back).
    pub fn line(&self) -> String {
        match self {
            Request::List { json, domain } => {
                let mut l = "LIST".to_string();
                if *json {
                    l.push_str(" JSON");
                }
                if let Some(d) = domain {
                    l.push_str(" DOMAIN ");
                    l.push_str(d);
                }
                l
            }
            Request::Show(id) => format!("SHOW {id}"),
            Request::Flush => "FLUSH".to_string(),
            Request::Delete(id) => format!("DELETE {id}"),
            Request::DeleteDomain(d) => format!("DELETE DOMAIN {d}"),
            Request::Release(id) => format!("RELEASE {id}"),
            Request::Reload => "RELOAD".to_string(),
        }
    }
}

/// A domain as the queue commands take it: a domain name (U-labels allowed, lower-cased,
/// RFC 5321 4.1.2) or an address literal in brackets (`[192.0.2.1]`), as recipients'
/// domains are stored.
pub fn domain(d: &str) -> Result<String, String> {
    if d.starts_with('[') {
        // As stored: `[192.0.2.1]`, `[IPv6:2001:db8::1]` (RFC 5321 4.1.3), canonical.
        let literal = || -> Option<String> {
            let inner = d.strip_prefix('[')?.strip_suffix(']')?;
            let tag = inner.get(..5).filter(|t| t.eq_ignore_ascii_case("IPv6:"));
            Some(match tag {
                Some(_) => format!("[IPv6:{}]", inner[5..].parse::<std::net::Ipv6Addr>().ok()?),
                None => format!("[{}]", inner.parse::<std::net::Ipv4Addr>().ok()?),
            })
        };
        return literal().ok_or_else(|| format!("not an address literal: {d:?}"));
    }
    postern_smtp::address::parse_domain(d).map_err(|_| format!("not a domain: {d:?}"))
}

async fn write_bounded(
    write: &mut (impl tokio::io::AsyncWrite + Unpin),
    bytes: &[u8],
) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, write.write_all(bytes))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// `LIST`: the header, then the queue page by page as the runner hands them out (one
/// page in memory), then the count.
async fn stream_list(
    handle: &delivery::Handle,
    write: &mut (impl tokio::io::AsyncWrite + Unpin),
    json: bool,
    domain: Option<String>,
) -> std::io::Result<()> {
    let mut page = ListPage {
        domain,
        limit: delivery::LIST_PAGE,
        ..ListPage::default()
    };
    let domain = page.domain.clone();
    let mut count = 0usize;
    let loading = loop {
        let Some(delivery::Page {
            items,
            next,
            loading,
        }) = handle.list_page(page.clone()).await
        else {
            // The text listing then has no count: the CLI sees it was cut off.
            return write_bounded(write, b"ERR the server is stopping\n").await;
        };
        let Some(next) = next else { break loading };
        page.after = Some(next);
        let mut out = String::new();
        if json {
            out = format_list_json(&items, true);
        } else {
            if count == 0 && !items.is_empty() {
                out.push_str(&list_header());
            }
            format_items(&mut out, &items, true);
        }
        count += items.len();
        write_bounded(write, out.as_bytes()).await?;
    };
    if !json {
        let mut footer = list_footer(count, domain.as_deref());
        if loading {
            footer.push_str(LOADING_NOTE);
        }
        write_bounded(write, footer.as_bytes()).await?;
    }
    Ok(())
}

async fn answer(handle: &delivery::Handle, spool: &Spool, dir: &Path, request: Request) -> String {
    match request {
        Request::Flush => format!(
            "OK {} messages scheduled for immediate delivery\n",
            handle.flush().await
        ),
        Request::Delete(id) => match handle.delete(id).await {
            delivery::Deletion::Deleted => format!("OK {id} deleted\n"),
            delivery::Deletion::Unknown => format!("ERR {id}: no such message in the queue\n"),
            delivery::Deletion::NotLoadedYet => format!("ERR {id}: {NOT_LOADED}\n"),
            delivery::Deletion::AfterAttempt => {
                format!("OK {id} deleted when its running delivery attempt ends\n")
            }
            delivery::Deletion::Failed => {
                format!(
                    "ERR {id}: not deleted (the spool failed, see the log, or the server is stopping)\n"
                )
            }
        },
        Request::DeleteDomain(d) => match handle.delete_domain(&d).await {
            Ok(deletion) => deletion_summary(&d, deletion),
            Err(why) => format!("ERR {d}: {why}\n"),
        },
        Request::Show(id) => {
            let page = ListPage {
                id: Some(id),
                limit: 1,
                ..ListPage::default()
            };
            match handle.list_page(page).await {
                Some(page) if !page.items.is_empty() => format_show(dir, &page.items[0], true),
                Some(page) if page.loading => {
                    format!("ERR {id}: {NOT_LOADED}\n")
                }
                _ => format!("ERR {id}: no such message in the queue\n"),
            }
        }
        Request::Release(id) => match release(spool, handle, id).await {
            Ok(()) => format!("OK {id} released to the queue\n"),
            Err(e) => format!("ERR {id}: {e}\n"),
        },
        Request::List { .. } | Request::Reload => unreachable!("answered by the caller"),
    }
}

/// Said of a message not found while the queue is still being loaded after a start.
const NOT_LOADED: &str = "not in the part of the queue loaded so far (it is being loaded after the start); try again in a moment";
/// The end of a listing made while the queue is still being loaded.
const LOADING_NOTE: &str =
    "(the queue is still being loaded after the start: messages not loaded yet are not listed)\n";

/// What `queue delete --domain` says: how many went, how many stayed because they have
/// recipients elsewhere too (and so deleting them would lose other mail), how many go
/// when the attempt running on them ends.
pub fn deletion_summary(domain: &str, d: delivery::DomainDeletion) -> String {
    let mut out = if d.failed > 0 {
        format!(
            "ERR {domain}: {} messages deleted, {} could not be (the spool failed; they come back at the next start)",
            d.deleted, d.failed
        )
    } else {
        format!("OK {domain}: {} messages deleted", d.deleted)
    };
    if d.later > 0 {
        let _ = write!(
            out,
            "; {} more when their running delivery attempts end",
            d.later
        );
    }
    if d.kept > 0 {
        let _ = write!(
            out,
            "; {} kept (they have pending recipients at other domains too)",
            d.kept
        );
    }
    out.push('\n');
    out
}

/// Puts a quarantined message back into the queue for its original recipients, without
/// screening it again (an operator looked at it), then removes it from the quarantine.
/// A crash between the two steps leaves it in both places: releasing twice would send
/// it twice, never lose it.
pub async fn release(
    spool: &Spool,
    handle: &delivery::Handle,
    id: QueueId,
) -> Result<(), crate::queue::SpoolError> {
    // One release at a time: two concurrent releases of the same id would queue it
    // twice. (The offline path holds the spool lock, so it cannot race this one.)
    static RELEASING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one_at_a_time = RELEASING.lock().await;
    let dir = spool.dir().to_path_buf();
    let d = dir.clone();
    let (mut q, body) = tokio::task::spawn_blocking(move || quarantine::load(&d, id))
        .await
        .map_err(|_| crate::queue::SpoolError::Closed)??;
    // Its queue lifetime starts now: time spent in quarantine must not expire it.
    q.envelope.arrived = crate::queue::unix_now();
    let (stored, _) = spool.store_message(q.envelope, body).await?;
    let d = dir.clone();
    tokio::task::spawn_blocking(move || quarantine::remove(&d, id))
        .await
        .map_err(|_| crate::queue::SpoolError::Closed)??;
    crate::maillog::released(
        &id,
        &q.rule,
        &stored.envelope.sender,
        stored.envelope.recipients.len(),
    );
    handle.enqueue(stored);
    Ok(())
}

/// `postern quarantine list`: id, date, sender, recipients, subject, rule.
pub fn format_quarantine(spool_dir: &Path, items: &[Quarantined]) -> String {
    if items.is_empty() {
        return "quarantine is empty\n".to_string();
    }
    let mut out = String::new();
    for q in items {
        let date = chrono::DateTime::from_timestamp(q.time, 0).map_or_else(
            || q.time.to_string(),
            |d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        );
        let subject = quarantine::load(spool_dir, q.envelope.id)
            .map(|(_, body)| header_value(&body, "subject").unwrap_or_default())
            .unwrap_or_default();
        let sender = if q.envelope.sender.is_empty() {
            "<>".to_string()
        } else {
            format!("<{}>", q.envelope.sender)
        };
        let _ = writeln!(
            out,
            "{}  {date}  {sender}  rule {}  size {}",
            q.envelope.id, q.rule, q.size
        );
        let _ = writeln!(
            out,
            "    to: {}",
            q.envelope
                .recipients
                .iter()
                .map(|r| format!("<{r}>"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(out, "    subject: {subject}");
        let _ = writeln!(out, "    reason: {}", q.reason);
    }
    let _ = writeln!(out, "{} message(s)", items.len());
    out
}

/// Unix seconds as RFC 3339 in UTC (`2026-01-02T03:04:05Z`).
fn rfc3339(t: i64) -> serde_json::Value {
    chrono::DateTime::from_timestamp(t, 0).map_or(serde_json::Value::Null, |d| {
        d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into()
    })
}

/// `postern quarantine list --json`: one JSON object per message and line, with what the
/// text listing shows (`sender` without angle brackets, `""` for the null sender).
pub fn format_quarantine_json(spool_dir: &Path, items: &[Quarantined]) -> String {
    let mut out = String::new();
    for q in items {
        let subject = quarantine::load(spool_dir, q.envelope.id)
            .ok()
            .and_then(|(_, body)| header_value(&body, "subject"));
        let object = serde_json::json!({
            "id": q.envelope.id.to_string(),
            "quarantined": rfc3339(q.time),
            "arrival": rfc3339(q.envelope.arrived),
            "sender": q.envelope.sender,
            "recipients": q.envelope.recipients,
            "size": q.size,
            "subject": subject,
            "filter": q.rule,
            "reason": q.reason,
        });
        let _ = writeln!(out, "{object}");
    }
    out
}

/// `postern quarantine show ID`: the description and the message header.
pub fn format_quarantined(q: &Quarantined, body: &[u8]) -> String {
    let mut out = format!(
        "{}  rule {}\nreason: {}\nclient {}  helo {}  from <{}>\nto: {}\n--- headers ---\n",
        q.envelope.id,
        q.rule,
        q.reason,
        q.envelope.client,
        q.envelope.helo,
        q.envelope.sender,
        q.envelope.recipients.join(", ")
    );
    out.push_str(&String::from_utf8_lossy(header_section(body)).replace("\r\n", "\n"));
    out
}

fn header_section(body: &[u8]) -> &[u8] {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(body.len(), |p| p + 2);
    &body[..end.min(64 * 1024)]
}

/// The unfolded value of the first header `name` (raw, not MIME-decoded).
fn header_value(body: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(header_section(body)).into_owned();
    let mut value: Option<String> = None;
    for line in text.split("\r\n") {
        match &mut value {
            Some(v) if line.starts_with([' ', '\t']) => v.push_str(line),
            Some(_) => break,
            None => {
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case(name)
                {
                    value = Some(v.trim().to_string());
                }
            }
        }
    }
    value
}

/// Sends one request to a running server and returns its whole answer. `None` when no
/// server answers on the socket.
pub fn request(spool_dir: &Path, line: &str) -> Option<String> {
    let mut answer = Vec::new();
    request_to(spool_dir, line, &mut answer).ok()??;
    Some(String::from_utf8_lossy(&answer).into_owned())
}

/// How long the CLI waits for the next bytes of an answer (a deletion of a million
/// messages answers once their DONE records are written: seconds, not minutes).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// Sends one request to a running server and copies its answer to `out` as it arrives
/// (a listing of a million starts at once). `Ok(None)` when no server answers on the
/// socket; `Ok(Some(false))` when the answer is a failure (`ERR`).
pub fn request_to(
    spool_dir: &Path,
    line: &str,
    out: &mut dyn Write,
) -> std::io::Result<Option<bool>> {
    let Ok(mut stream) = StdUnixStream::connect(socket_path(spool_dir)) else {
        return Ok(None);
    };
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    if stream.write_all(format!("{line}\n").as_bytes()).is_err() {
        return Ok(None);
    }
    // The end of the answer: a text listing must end with its count.
    const TAIL: usize = 1024;
    let mut tail = Vec::new();
    let mut first = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if first.len() < 3 {
            first.extend_from_slice(&buf[..n.min(3 - first.len())]);
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > TAIL {
            tail.drain(..tail.len() - TAIL);
        }
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    // No answer at all: the server stopped (or dropped us) before saying anything. Only
    // a JSON listing of an empty queue is rightly empty.
    let json_listing = line.starts_with("LIST JSON");
    let text_listing = line.starts_with("LIST") && !json_listing;
    if text_listing && !first.starts_with(b"ERR") && !listing_is_whole(&tail) {
        let _ = writeln!(
            out,
            "ERR the listing was cut off (the server stopped or dropped it)"
        );
        return Ok(Some(false));
    }
    Ok(Some(
        !first.starts_with(b"ERR") && (!first.is_empty() || json_listing),
    ))
}

/// Queue items as found on disk, when no server runs.
pub fn offline_items(messages: Vec<StoredMessage>) -> Vec<QueueItem> {
    messages
        .into_iter()
        .map(|m| QueueItem {
            errors: vec![None; m.states.len()],
            message: m,
            attempts: 0,
            next_in: 0,
            in_flight: false,
        })
        .collect()
}

fn age(arrived: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    crate::config::format_duration(Duration::from_secs((now - arrived).max(1) as u64))
}

/// `postern queue list`: like mailq, one block per message.
pub fn format_list(items: &[QueueItem], running: bool, domain: Option<&str>) -> String {
    if items.is_empty() {
        return list_footer(0, domain);
    }
    let mut out = list_header();
    format_items(&mut out, items, running);
    out.push_str(&list_footer(items.len(), domain));
    out
}

/// The first line of a listing.
pub fn list_header() -> String {
    format!("{:<16}  {:>6}  {:>8}  sender\n", "id", "age", "size")
}

/// The last line of a listing of `n` messages (those for `domain`, if given). The CLI
/// checks that it came: a listing without it was cut off.
pub fn list_footer(n: usize, domain: Option<&str>) -> String {
    match (n, domain) {
        (0, None) => "queue is empty\n".to_string(),
        (0, Some(d)) => format!("no queued message for {d}\n"),
        (n, None) => format!("{n} message(s)\n"),
        (n, Some(d)) => format!("{n} message(s) for {d}\n"),
    }
}

/// Whether a text listing ends as [`list_footer`] ends one (a listing cut off, by the
/// server stopping or dropping a reader that stalled, does not).
pub fn listing_is_whole(text: &[u8]) -> bool {
    let text = text.strip_suffix(LOADING_NOTE.as_bytes()).unwrap_or(text);
    let Some(body) = text.strip_suffix(b"\n") else {
        return false;
    };
    let last = body.rsplit(|&b| b == b'\n').next().unwrap_or(body);
    last == b"queue is empty"
        || last.starts_with(b"no queued message for ")
        || last
            .split(|&b| b == b' ')
            .nth(1)
            .is_some_and(|w| w == b"message(s)")
}

/// The listing's block for each message.
pub fn format_items(out: &mut String, items: &[QueueItem], running: bool) {
    for item in items {
        let env = &item.message.envelope;
        let sender = if env.sender.is_empty() {
            "<>".to_string()
        } else {
            format!("<{}>", env.sender)
        };
        let next = if !running {
            "at next start".to_string()
        } else if item.in_flight {
            "now (attempt running)".to_string()
        } else if item.next_in == 0 {
            "now".to_string()
        } else {
            format!(
                "in {}",
                crate::config::format_duration(Duration::from_secs(item.next_in))
            )
        };
        let _ = writeln!(
            out,
            "{:<16}  {:>6}  {:>8}  {sender}  (attempts {}, next {next})",
            env.id.to_string(),
            age(env.arrived),
            item.message.size,
            item.attempts
        );
        for (i, rcpt) in env.recipients.iter().enumerate() {
            let state = delivery::state_word(item.message.states[i]);
            match item.errors.get(i).and_then(|e| e.as_deref()) {
                Some(err) => {
                    let _ = writeln!(out, "    <{rcpt}>  {state}: {err}");
                }
                None => {
                    let _ = writeln!(out, "    <{rcpt}>  {state}");
                }
            }
        }
    }
}

/// `postern queue list --json`: one JSON object per message and line, with what the text
/// listing shows. `next_attempt` is `null` when no server runs (everything is attempted
/// at its start); `last_error` is per recipient, and at the top the first of them.
pub fn format_list_json(items: &[QueueItem], running: bool) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut out = String::new();
    for item in items {
        let env = &item.message.envelope;
        let recipients: Vec<serde_json::Value> = env
            .recipients
            .iter()
            .enumerate()
            .map(|(i, rcpt)| {
                serde_json::json!({
                    "address": rcpt,
                    "state": item.message.states.get(i).map(|s| delivery::state_word(*s)),
                    "last_error": item.errors.get(i).cloned().flatten(),
                })
            })
            .collect();
        let next = if running {
            rfc3339(now.saturating_add(item.next_in as i64))
        } else {
            serde_json::Value::Null
        };
        let object = serde_json::json!({
            "id": env.id.to_string(),
            "arrival": rfc3339(env.arrived),
            "sender": env.sender,
            "recipients": recipients,
            "size": item.message.size,
            "attempts": item.attempts,
            "next_attempt": next,
            "in_flight": item.in_flight,
            "last_error": item.errors.iter().flatten().next(),
        });
        let _ = writeln!(out, "{object}");
    }
    out
}

/// `postern queue show ID`: the envelope, per-recipient state and the message headers.
pub fn format_show(spool_dir: &Path, item: &QueueItem, running: bool) -> String {
    let mut out = format_list(std::slice::from_ref(item), running, None);
    let env = &item.message.envelope;
    let _ = writeln!(
        out,
        "client {}  helo {}  auth {}  params {}",
        env.client,
        env.helo,
        env.auth.as_deref().unwrap_or("-"),
        if env.params.is_empty() {
            "-".to_string()
        } else {
            env.params.join(" ")
        }
    );
    match read_body_in(spool_dir, &item.message) {
        Ok(body) => {
            let end = body
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(body.len(), |p| p + 2);
            out.push_str("--- headers ---\n");
            out.push_str(
                &String::from_utf8_lossy(&body[..end.min(64 * 1024)]).replace("\r\n", "\n"),
            );
        }
        Err(e) => {
            let _ = writeln!(out, "(message text unavailable: {e})");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly_and_read_back() {
        let id = QueueId::from_u64(0x0187_F3A2_B4C5_D6E7);
        let cases = [
            Request::List {
                json: false,
                domain: None,
            },
            Request::List {
                json: true,
                domain: None,
            },
            Request::List {
                json: false,
                domain: Some("dead.test".into()),
            },
            Request::List {
                json: true,
                domain: Some("[192.0.2.1]".into()),
            },
            Request::Show(id),
            Request::Flush,
            Request::Delete(id),
            Request::DeleteDomain("xn--bcher-kva.test".into()),
            Request::Release(id),
            Request::Reload,
        ];
        for r in cases {
            let line = r.line();
            assert_eq!(Request::parse(&line), Ok(r.clone()), "{line}");
            assert_eq!(Request::parse(&format!("{line}\n")), Ok(r.clone()));
            assert_eq!(Request::parse(&format!("{line}\r\n")), Ok(r));
        }
    }

    #[test]
    fn domains_are_canonical_and_checked() {
        let parsed = |l: &str| match Request::parse(l) {
            Ok(Request::List { domain, .. }) => domain,
            other => panic!("{l}: {other:?}"),
        };
        assert_eq!(parsed("LIST DOMAIN Dead.TEST."), Some("dead.test".into()));
        assert_eq!(
            parsed("LIST JSON DOMAIN bücher.test"),
            Some("bücher.test".into())
        );
        // Address literals as recipients' domains are stored: canonical, tagged for v6.
        assert_eq!(
            parsed("LIST DOMAIN [IPv6:2001:db8::1]"),
            Some("[IPv6:2001:db8::1]".into())
        );
        assert_eq!(
            domain("[ipv6:2001:0DB8:0:0::1]"),
            Ok("[IPv6:2001:db8::1]".into())
        );
        assert_eq!(domain("[192.0.2.1]"), Ok("[192.0.2.1]".into()));
        for bad in [
            "-x.test",
            "a..b",
            "a b",
            "[300.1.1.1]",
            "[192.0.2.1",
            "[::1]",
            "[IPv6:192.0.2.1]",
            "x_y.test",
            "",
        ] {
            assert!(domain(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "list",
            "LIST  JSON",
            "LIST JSON JSON",
            "LIST DOMAIN",
            "LIST DOMAIN a.test b.test",
            "LIST DOMAIN a.test JSON",
            "DELETE",
            "DELETE DOMAIN",
            "DELETE not-an-id",
            "DELETE DOMAIN bad_domain!",
            "SHOW",
            "FLUSH NOW",
            "RELOAD\n\n",
            " RELOAD",
            "RELOAD\r",
        ] {
            assert!(Request::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("LIST DOMAIN {}.test", "a".repeat(MAX_REQUEST));
        assert!(Request::parse(&long).unwrap_err().contains("longer than"));
    }

    #[test]
    fn a_listing_is_whole_only_with_its_count() {
        let whole = |t: &str| listing_is_whole(t.as_bytes());
        assert!(whole(&format_list(&[], true, None)));
        assert!(whole(&format_list(&[], true, Some("dead.test"))));
        assert!(whole(
            "id ...\n0187F3A2B4C5D6E7 ...\n    <a@b>  pending\n2 message(s)\n"
        ));
        assert!(whole(&format!(
            "x\n3 message(s) for dead.test\n{LOADING_NOTE}"
        )));
        // Cut off: mid-page, after a page, or nothing at all.
        assert!(!whole(
            "id ...\n0187F3A2B4C5D6E7  1m  120  <a@b>  (attempts"
        ));
        assert!(!whole("id ...\n0187F3A2B4C5D6E7 ...\n    <a@b>  pending\n"));
        assert!(!whole(""));
        // A recipient line that looks like a count does not end a listing.
        assert!(!whole("    <message(s)@x>  pending\n"));
    }

    #[test]
    fn a_deletion_by_domain_says_what_stayed_and_why() {
        let d = |deleted, kept, failed| {
            deletion_summary(
                "dead.test",
                delivery::DomainDeletion {
                    deleted,
                    kept,
                    failed,
                    later: 0,
                },
            )
        };
        let busy = delivery::DomainDeletion {
            deleted: 5,
            later: 2,
            ..Default::default()
        };
        assert_eq!(
            deletion_summary("dead.test", busy),
            "OK dead.test: 5 messages deleted; 2 more when their running delivery attempts end\n"
        );
        assert_eq!(d(3, 0, 0), "OK dead.test: 3 messages deleted\n");
        assert!(d(3, 2, 0).starts_with("OK dead.test: 3 messages deleted; 2 kept"));
        assert!(d(3, 0, 1).starts_with("ERR dead.test: 3 messages deleted, 1 could not be"));
    }
}
