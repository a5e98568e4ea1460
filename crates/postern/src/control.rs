//! The control socket: how `postern queue ...` talks to a running server, so that queue
//! management never edits files under the server's feet (no torn state).
//!
//! `SPOOL/control.sock`, a Unix socket with mode 0600 (only the spool's owner may use
//! it). One request per connection, one line: `LIST`, `LIST JSON` (one JSON object per
//! message and line), `SHOW <id>`, `FLUSH`, `DELETE <id>`; `RELEASE <id>` (quarantine);
//! `RELOAD` (the configuration: `OK <summary>` or `ERR <why>`, the configuration in use
//! then unchanged);
//! the answer is text for the operator, ending when the server closes the connection.
//! When no server runs, the CLI works on the spool directly (`queue list/show` read it,
//! `queue delete` takes the spool lock first).
//!
//! Trust: whoever can open the socket is the spool's owner (file mode); requests are
//! still parsed strictly and bounded (one line of at most 256 octets).

use std::fmt::Write as _;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::delivery::{self, QueueItem};
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
                let mut reader = TokioBufReader::new(read.take(256));
                let request =
                    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
                        .await;
                let answer = match request {
                    Ok(Ok(_)) if line.trim() == "RELOAD" => reload(&reloads).await,
                    Ok(Ok(_)) => answer(&handle, &spool, &dir, line.trim()).await,
                    _ => "ERR no request\n".to_string(),
                };
                let _ = write.write_all(answer.as_bytes()).await;
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

async fn answer(handle: &delivery::Handle, spool: &Spool, dir: &Path, request: &str) -> String {
    let (verb, arg) = request.split_once(' ').unwrap_or((request, ""));
    match (verb, arg.parse::<QueueId>()) {
        ("LIST", _) if arg == "JSON" => format_list_json(&handle.list().await, true),
        ("LIST", _) => format_list(&handle.list().await, true),
        ("FLUSH", _) => format!(
            "OK {} messages scheduled for immediate delivery\n",
            handle.flush().await
        ),
        ("DELETE", Ok(id)) => {
            if handle.delete(id).await {
                format!("OK {id} deleted\n")
            } else {
                format!("ERR {id}: no such message in the queue\n")
            }
        }
        ("SHOW", Ok(id)) => match handle
            .list()
            .await
            .into_iter()
            .find(|i| i.message.envelope.id == id)
        {
            Some(item) => format_show(dir, &item, true),
            None => format!("ERR {id}: no such message in the queue\n"),
        },
        ("RELEASE", Ok(id)) => match release(spool, handle, id).await {
            Ok(()) => format!("OK {id} released to the queue\n"),
            Err(e) => format!("ERR {id}: {e}\n"),
        },
        _ => "ERR unknown request\n".to_string(),
    }
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
    let stored = spool.store_message(q.envelope, &body).await?;
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

/// Sends one request to a running server. `None` when no server answers on the socket.
pub fn request(spool_dir: &Path, line: &str) -> Option<String> {
    let mut stream = StdUnixStream::connect(socket_path(spool_dir)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    stream.write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut answer = String::new();
    BufReader::new(stream).read_to_string(&mut answer).ok()?;
    Some(answer)
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
pub fn format_list(items: &[QueueItem], running: bool) -> String {
    if items.is_empty() {
        return "queue is empty\n".to_string();
    }
    let mut out = String::new();
    let _ = writeln!(out, "{:<16}  {:>6}  {:>8}  sender", "id", "age", "size");
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
    let _ = writeln!(out, "{} message(s)", items.len());
    out
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
    let mut out = format_list(std::slice::from_ref(item), running);
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
