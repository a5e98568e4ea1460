//! The durable spool: "250 means on disk".
//!
//! Every accepted message is appended, with its envelope, to a segment log under
//! `SPOOL/log/`, and `Spool::store` returns only after the record has been fdatasync'd.
//! Outcomes (RCPT) and completion (DONE) are more records in the same log; a deferral
//! writes nothing. A message still waiting when its segment is otherwise finished is
//! carried forward (COPY, `Spool::relocate`), so one message waiting for days pins no
//! segment; old segments are deleted once all their messages are finished or carried
//! forward. `Spool::open_in_background` reads only the newest segments (each starts with
//! a FLOOR record bounding the ids handed out before it) and takes new mail at once; the
//! messages already queued are replayed from the rest of the log by `Backlog::load`,
//! while new mail flows. The byte format is specified in `docs/queue-format.md`.
//!
//! Why a log and not one file per message: on this machine "create a file + fsync + fsync
//! the directory" runs at ~800-1500/s, "append + fdatasync" to one open file at ~2000/s
//! even for 64 KB appends. With group commit (see `committer.rs`) one fdatasync covers
//! every record submitted while the previous one ran, so acceptance is not capped by the
//! disk's sync rate.
//!
//! Trust: the spool holds only our own files, but a crash or kill -9 can leave any prefix of
//! a write, and disks rot. Replay believes nothing it cannot verify: each record has a
//! frame, a length that must fit in the file and a CRC-32 of its payload, and payloads are
//! parsed strictly. A bad record at the tail of the newest segment, with nothing valid
//! after it, is a write cut short by a crash, never acknowledged (nothing is answered
//! before its fdatasync), and is trimmed; anywhere else it is corruption: logged at error
//! level with the bytes skipped, the bytes kept, and replay resumes at the next whole
//! record with a valid CRC. Envelopes handed to `store_message` come from the SMTP layer;
//! encoding still refuses CR/LF in any field rather than write a record that would not
//! read back the same.
//!
//! Only this module writes `SPOOL/log/`. Threads: one committer thread per open spool;
//! `store_message` and friends are async and wait for it; `read_message` is a blocking
//! read.

mod committer;
mod deferred;
mod durable;
mod error;
mod id;
pub mod quarantine;
mod record;
mod replay;
mod segment;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tracing::info;

pub use error::SpoolError;
pub use id::{ParseQueueIdError, QueueId};

pub use committer::Durability;
use committer::{Append, Committer, Effect, Request};
use record::{Decoded, FRAME_LEN, RecordType};
use replay::{Mode, Tail};

/// Name of the lock file in the spool directory.
const LOCK_FILE: &str = "lock";
/// Subdirectory holding the segment log.
const LOG_DIR: &str = "log";
/// Reserved for per-message files of long-lived messages (delivery).
pub const DEFERRED_DIR: &str = "deferred";
/// Reserved for quarantined messages (filters).
pub const QUARANTINE_DIR: &str = "quarantine";

/// The SMTP envelope of a stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: QueueId,
    /// Arrival time, Unix seconds.
    pub arrived: i64,
    /// The client's `ip:port`.
    pub client: String,
    /// The HELO/EHLO argument.
    pub helo: String,
    /// The authenticated identity, if any (must not be empty or "-").
    pub auth: Option<String>,
    /// The MAIL FROM address without angle brackets; "" is the null sender.
    pub sender: String,
    /// MAIL parameters, verbatim (`BODY=8BITMIME`).
    pub params: Vec<String>,
    pub smtputf8: bool,
    /// RCPT TO addresses without angle brackets, in order; a recipient's index is its
    /// position here.
    pub recipients: Vec<String>,
}

/// Where a recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptState {
    Pending,
    Delivered,
    Failed,
}

/// Where a MESSAGE record lies: segment number, byte offset of the record's frame, and the
/// record's length (frame + payload). Valid until the message is marked done or moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
}

/// Where a live message is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    /// In the segment log (its first delivery attempt has not deferred it yet).
    Log(Location),
    /// In its own file under `SPOOL/deferred/`.
    Deferred,
}

/// A live message found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub envelope: Envelope,
    /// One state per recipient, same order as `envelope.recipients`.
    pub states: Vec<RcptState>,
    /// Where it is kept, for `read_body`.
    pub place: Place,
    /// Length of the message in bytes.
    pub size: u64,
}

/// A live message as the delivery queue keeps it in memory: the envelope in its stored
/// text form (the MESSAGE record's envelope lines, one allocation of a few hundred
/// bytes), decoded only when an attempt, a bounce or a listing needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: QueueId,
    /// Arrival time, Unix seconds.
    pub arrived: i64,
    head: Box<str>,
    /// One state per recipient.
    pub states: Box<[RcptState]>,
    pub place: Place,
    /// Length of the message in bytes.
    pub size: u64,
}

impl Queued {
    /// The compact form of a message (fails only for an envelope that cannot be stored).
    pub fn new(msg: &StoredMessage) -> Result<Queued, SpoolError> {
        Ok(Queued {
            id: msg.envelope.id,
            arrived: msg.envelope.arrived,
            head: record::encode_head(&msg.envelope, msg.size)?.into_boxed_str(),
            states: msg.states.clone().into_boxed_slice(),
            place: msg.place,
            size: msg.size,
        })
    }

    /// From a record that replay decoded (`head` is its envelope lines).
    fn replayed(
        head: &[u8],
        envelope: &Envelope,
        states: Vec<RcptState>,
        location: Location,
        size: u64,
    ) -> Queued {
        Queued {
            id: envelope.id,
            arrived: envelope.arrived,
            // Decoded from these very bytes, so UTF-8.
            head: String::from_utf8_lossy(head).into(),
            states: states.into_boxed_slice(),
            place: Place::Log(location),
            size,
        }
    }

    /// The envelope lines (`docs/queue-format.md`, MESSAGE).
    pub fn head(&self) -> &str {
        &self.head
    }

    /// The recipients, in order, without decoding the rest of the envelope.
    pub fn recipients(&self) -> impl Iterator<Item = &str> {
        self.head.split('\n').filter_map(|line| {
            line.strip_prefix("rcpt <")
                .and_then(|r| r.strip_suffix('>'))
        })
    }

    /// The sender ("" for the null sender), without decoding the rest.
    pub fn sender(&self) -> &str {
        self.head
            .split('\n')
            .find_map(|line| {
                line.strip_prefix("from <")
                    .and_then(|r| r.strip_suffix('>'))
            })
            .unwrap_or("")
    }

    /// The message as attempts and listings use it.
    pub fn stored(&self) -> Result<StoredMessage, SpoolError> {
        let (envelope, _) = record::decode_head(&self.head).map_err(|reason| {
            SpoolError::Encode(format!(
                "queued envelope of {} does not decode: {reason}",
                self.id
            ))
        })?;
        Ok(StoredMessage {
            envelope,
            states: self.states.to_vec(),
            place: self.place,
            size: self.size,
        })
    }
}

/// How a spool writes. The daemon chooses; nothing is read from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Group commit (default): one write + one fdatasync for everything submitted while
    /// the previous sync ran. `false`: one write + fdatasync per record (for benchmarks).
    pub group_commit: bool,
    /// Start a new segment once the current one has reached this size (default 64 MiB).
    pub segment_size: u64,
    /// Stop adding records to a batch once it holds this many bytes (default 8 MiB).
    pub max_batch_bytes: usize,
    /// Records answered once written ([`Durability::Written`]) are synced at the latest
    /// this long after the first of them was written (default 200 ms), if no synced
    /// batch has carried them by then.
    pub lazy_sync: std::time::Duration,
}

impl Default for SpoolOptions {
    fn default() -> SpoolOptions {
        SpoolOptions {
            group_commit: true,
            segment_size: 64 << 20,
            max_batch_bytes: 8 << 20,
            lazy_sync: std::time::Duration::from_millis(200),
        }
    }
}

/// The open spool. Cheap to clone; all clones share one committer thread and the lock.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    log_dir: PathBuf,
    ids: Arc<id::IdGen>,
    /// `None` once closed.
    tx: Mutex<Option<mpsc::Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    syncs: Arc<AtomicU64>,
    /// Published by the committer after each batch.
    shape: Arc<Mutex<LogShape>>,
    /// Deferred messages whose log copy may still be live: the MOVED record was not
    /// written, or written without waiting for the answer (at open), or deliberately not
    /// written because the file's name may not be durable. Finishing such a message also
    /// writes a DONE record to the log, so that the log copy cannot come back once the file
    /// is gone.
    unmoved: Mutex<HashSet<QueueId>>,
    /// Holds the `flock` on `SPOOL/lock`; released when the last clone is dropped, after
    /// the committer has stopped (see `Drop`).
    _lock: File,
}

impl Inner {
    fn shutdown(&self) {
        // Dropping the only sender lets the committer drain the channel and return.
        drop(
            self.tx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        // Hold the lock while joining so a concurrent close() also waits for the end.
        let mut thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = thread.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Stop writing before the lock is released by dropping `_lock`.
        self.shutdown();
    }
}

impl Spool {
    /// Opens the spool and loads its whole queue before returning (tests and tools; the
    /// server uses [`Spool::open_in_background`]). Returns the live messages, oldest
    /// first.
    ///
    /// Fails with [`SpoolError::Locked`] if another process has the spool open.
    pub fn open(dir: &Path, opts: SpoolOptions) -> Result<(Spool, Vec<StoredMessage>), SpoolError> {
        let (spool, backlog) = Spool::open_in_background(dir, opts)?;
        let mut live = Vec::new();
        backlog.load(|batch| live.extend(batch))?;
        let live = live
            .iter()
            .map(Queued::stored)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((spool, live))
    }

    /// Creates the spool directories if needed, takes the lock, makes the newest
    /// segment's end final, finds the id floor, starts a new segment and the committer
    /// thread: from here new messages can be stored. Reads only the newest segments,
    /// so it takes the same time whatever the queue holds (except once, for a log written
    /// by a Postern without FLOOR records, which is read whole). The messages already
    /// queued are in the returned [`Backlog`], to be loaded while new mail flows.
    ///
    /// Fails with [`SpoolError::Locked`] if another process has the spool open.
    pub fn open_in_background(
        dir: &Path,
        opts: SpoolOptions,
    ) -> Result<(Spool, Backlog), SpoolError> {
        let created = !dir.exists();
        let log_dir = dir.join(LOG_DIR);
        for sub in [
            dir.to_path_buf(),
            log_dir.clone(),
            dir.join(DEFERRED_DIR),
            dir.join(QUARANTINE_DIR),
        ] {
            fs::create_dir_all(&sub).map_err(SpoolError::io("create directory", &sub))?;
        }
        // Make the subdirectories (and a new spool directory itself) durable.
        segment::sync_dir(dir)?;
        if created && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            segment::sync_dir(parent)?;
        }
        let lock = take_lock(dir)?;

        let tail = replay::scan_tail(&log_dir)?;
        quarantine::clean(dir)?;
        // The id floor: above every id still naming something on disk, not only the ids
        // in the log. A deferred or quarantined message's MESSAGE record may be gone
        // from the log (its segment collected, or never written there), and after a
        // clock step back the clock alone would hand its id out again.
        let names_floor = durable::max_id_in_names(&dir.join(DEFERRED_DIR))?
            .max(durable::max_id_in_names(&dir.join(QUARANTINE_DIR))?);
        let (floor, replayed) = match tail.floor {
            Some(floor) => (floor, None),
            None => {
                info!(spool = %dir.display(), "the log has no FLOOR record (written by an older version): reading it whole before taking mail");
                let replayed = replay::replay_segments(&log_dir, &tail.seqs, Mode::Owner)?;
                (replayed.max_id, Some(replayed))
            }
        };
        let ids = Arc::new(id::IdGen::new(floor.max(names_floor)));

        let syncs = Arc::new(AtomicU64::new(0));
        let shape = Arc::new(Mutex::new(LogShape::default()));
        let first_new = tail.seqs.last().map_or(1, |last| last + 1);
        let committer = Committer::new(
            log_dir.clone(),
            opts,
            first_new,
            Arc::clone(&ids),
            Arc::clone(&syncs),
            Arc::clone(&shape),
        )?;
        let (tx, rx) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("postern-spool".into())
            .spawn(move || committer.run(rx))
            .map_err(SpoolError::io("start committer thread for", dir))?;
        let spool = Spool {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                log_dir,
                ids,
                tx: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(handle)),
                syncs,
                shape,
                unmoved: Mutex::new(HashSet::new()),
                _lock: lock,
            }),
        };
        let backlog = Backlog {
            spool: spool.clone(),
            seqs: tail.seqs,
            replayed,
        };
        Ok((spool, backlog))
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// A new queue id, greater than every id handed out or found on disk before.
    pub fn new_id(&self) -> QueueId {
        self.inner.ids.next()
    }

    /// [`store_message`](Spool::store_message) for the tests: a borrowed message (copied),
    /// and only where it is.
    #[cfg(test)]
    pub async fn store(&self, envelope: &Envelope, message: &[u8]) -> Result<Location, SpoolError> {
        self.store_owned(envelope, message.to_vec())
            .await
            .map(|(location, _)| location)
    }

    /// Stores a message: the committer writes the body where it is (after the record's
    /// frame and envelope, in the same vectored write) instead of a copy of it, and hands
    /// it back. Returns only once the record is on disk (fdatasync done); group committed
    /// with concurrent callers. Fails with `Encode` for a field holding CR/LF.
    ///
    /// Do not drop the future early unless the message may be delivered anyway: once
    /// submitted, the record is written even if nobody waits for the answer, and replay
    /// will find it after the next restart.
    async fn store_owned(
        &self,
        envelope: &Envelope,
        message: Vec<u8>,
    ) -> Result<(Location, Vec<u8>), SpoolError> {
        let head = record::encode_message_head(envelope, &message)?;
        let (reply, answer) = oneshot::channel();
        self.send(Request::Write(Append {
            bytes: head,
            body: message,
            effect: Effect::Add(envelope.id),
            durability: Durability::Synced,
            reply,
        }))?;
        // A dropped reply sender means the committer thread is gone (it panicked).
        let committed = answer.await.map_err(|_| SpoolError::Closed)?;
        committed.result.map(|location| (location, committed.body))
    }

    /// Stores a new message (as `store_owned` says) and returns it as the queue holds it
    /// (in the log, every recipient pending), with the message text handed back. The one
    /// way a new message enters the queue (accepted from a client, released from the
    /// quarantine, a bounce or a notice); the caller hands the result to
    /// `delivery::Handle::enqueue` once it may be sent.
    pub async fn store_message(
        &self,
        envelope: Envelope,
        message: Vec<u8>,
    ) -> Result<(StoredMessage, Vec<u8>), SpoolError> {
        let (location, message) = self.store_owned(&envelope, message).await?;
        let stored = StoredMessage {
            states: vec![RcptState::Pending; envelope.recipients.len()],
            size: message.len() as u64,
            envelope,
            place: Place::Log(location),
        };
        Ok((stored, message))
    }

    /// Stores a message in the quarantine, durably (`quarantine::put`), off the async
    /// executor. `Ok` only once it is on disk.
    pub async fn quarantine(
        &self,
        envelope: Envelope,
        message: Vec<u8>,
        rule: String,
        reason: String,
    ) -> Result<(), SpoolError> {
        let dir = self.inner.dir.clone();
        blocking(move || quarantine::put(&dir, &envelope, &message, &rule, &reason)).await
    }

    /// Records that recipient `rcpt_index` of message `id` reached a final state
    /// (`delivered` or failed), with the remote reply (made one line, cut to 1024 bytes),
    /// synced. (Delivery records through [`record_final`](Spool::record_final).)
    #[cfg(test)]
    pub async fn record_outcome(
        &self,
        id: QueueId,
        rcpt_index: usize,
        delivered: bool,
        reply: &str,
    ) -> Result<(), SpoolError> {
        self.outcome_as(id, rcpt_index, delivered, reply, Durability::Synced)
            .await
    }

    async fn outcome_as(
        &self,
        id: QueueId,
        rcpt_index: usize,
        delivered: bool,
        reply: &str,
        durability: Durability,
    ) -> Result<(), SpoolError> {
        let bytes = record::encode_outcome(id, rcpt_index, delivered, unix_now(), reply)?;
        self.append(bytes, Effect::None, durability).await.map(drop)
    }

    /// Marks a message finished (all recipients final, or deleted by the operator). Its
    /// segment may be collected afterwards: do not read it through an old `Location`.
    pub async fn mark_done(&self, id: QueueId) -> Result<(), SpoolError> {
        self.done_as(id, Durability::Synced).await
    }

    async fn done_as(&self, id: QueueId, durability: Durability) -> Result<(), SpoolError> {
        let bytes = record::encode_done(id)?;
        self.append(bytes, Effect::Remove(id), durability)
            .await
            .map(drop)
    }

    /// Records that a message now lives in `SPOOL/deferred/` (written and synced there by
    /// the caller first). Replay no longer returns it; its segment may be collected.
    /// (Earlier versions moved deferred mail out of the log; this one only reads such
    /// spools, and the tests make them with this and `move_to_deferred`.)
    #[cfg(test)]
    pub async fn mark_moved(&self, id: QueueId) -> Result<(), SpoolError> {
        let bytes = record::encode_moved(id)?;
        self.submit(bytes, Effect::Remove(id)).await.map(drop)
    }

    /// Reads a stored message back (the bytes given to `store_message`), checking its CRC.
    /// Blocking file I/O: from async code call it inside `tokio::task::spawn_blocking`.
    pub fn read_message(&self, loc: &Location) -> Result<Vec<u8>, SpoolError> {
        read_at(&self.inner.log_dir, loc)
    }

    /// Reads the body of a live message wherever it is kept. Blocking file I/O.
    pub fn read_body(&self, msg: &StoredMessage) -> Result<Vec<u8>, SpoolError> {
        read_body_in(&self.inner.dir, msg)
    }

    /// The layout of earlier versions, for the tests: moves a message out of the log into
    /// its own file under `SPOOL/deferred/` (see `deferred.rs`): the file is durable before the MOVED record is written, so a crash
    /// in between leaves both copies and the file wins at the next open.
    #[cfg(test)]
    pub async fn move_to_deferred(
        &self,
        envelope: &Envelope,
        body: Vec<u8>,
        states: &[RcptState],
    ) -> Result<(), SpoolError> {
        let dir = self.inner.dir.join(DEFERRED_DIR);
        let env = envelope.clone();
        let states = states.to_vec();
        let id = envelope.id;
        let durable = blocking(move || deferred::write(&dir, &env, &body, &states)).await?;
        // From here the file is the message (it wins over the log copy at the next
        // open), so a failed MOVED record is not a failed move: it only keeps the log
        // segment pinned until the next start. If the file's name may not be durable
        // (directory fsync failed), no MOVED record is written at all: a durable MOVED
        // with a name lost in a crash would lose the message; with the log copy kept
        // alive, a crash leaves the file (which wins) or the log copy (delivered again:
        // at-least-once), never nothing.
        let moved = if durable {
            self.mark_moved(id).await.map_err(|e| {
                tracing::error!(%id, error = %e,
                    "MOVED record not written; the deferred file is authoritative");
            })
        } else {
            Err(())
        };
        if moved.is_err() {
            self.unmoved().insert(id);
        }
        Ok(())
    }

    fn unmoved(&self) -> std::sync::MutexGuard<'_, HashSet<QueueId>> {
        self.inner
            .unmoved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a recipient's final outcome wherever the message is kept; in the log, as
    /// durable as `durability` asks (a deferred file's record is always synced).
    pub async fn record_final(
        &self,
        id: QueueId,
        place: Place,
        rcpt_index: usize,
        delivered: bool,
        reply: &str,
        durability: Durability,
    ) -> Result<(), SpoolError> {
        match place {
            Place::Log(_) => {
                self.outcome_as(id, rcpt_index, delivered, reply, durability)
                    .await
            }
            Place::Deferred => {
                let dir = self.inner.dir.join(DEFERRED_DIR);
                let reply = reply.to_string();
                blocking(move || deferred::append_outcome(&dir, id, rcpt_index, delivered, &reply))
                    .await
            }
        }
    }

    /// The message is finished (all recipients final, or deleted by the operator); in the
    /// log, as durable as `durability` asks (a deferred file's end is always synced).
    pub async fn finish(
        &self,
        id: QueueId,
        place: Place,
        durability: Durability,
    ) -> Result<(), SpoolError> {
        match place {
            Place::Log(_) => self.done_as(id, durability).await,
            Place::Deferred => {
                // A log copy that may still be live is finished first: were the file to
                // go (or never have been durable) with the log copy alive, the next open
                // would bring the message back from the log.
                if self.unmoved().contains(&id) {
                    self.mark_done(id).await?;
                    self.unmoved().remove(&id);
                }
                let dir = self.inner.dir.join(DEFERRED_DIR);
                blocking(move || deferred::remove(&dir, id)).await
            }
        }
    }

    /// Carries a live message forward out of its old segment, so that the segment can be
    /// collected: a COPY record (envelope, body and the recipients' states) appended
    /// like any other, group committed. Returns where it lives now. Written only if the
    /// message is still live in that segment when its batch is formed (a DONE before it
    /// wins); then [`SpoolError::NotLive`]. The caller must not record outcomes for the
    /// message until this returns (they would be written with the old states first).
    pub async fn relocate(&self, msg: &Queued) -> Result<Location, SpoolError> {
        let Place::Log(from) = msg.place else {
            return Err(SpoolError::NotLive(msg.id));
        };
        let spool = self.clone();
        let body = blocking(move || spool.read_message(&from)).await?;
        let bytes = record::encode_copy(&msg.head, &msg.states, &body)?;
        drop(body);
        self.submit(
            bytes,
            Effect::Relocate {
                id: msg.id,
                from: from.segment,
            },
        )
        .await
    }

    /// The log's shape as of the last batch.
    pub fn shape(&self) -> LogShape {
        *self
            .inner
            .shape
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The segment worth emptying by [`relocate`](Spool::relocate), if any: the oldest
    /// one, when it is not the one being written and still holds live messages, and
    /// either at most a quarter of what was written to it is still live (a relocation
    /// then frees at least three times what it copies), or more than half of everything
    /// the log holds is finished (the oldest segment pins finished segments behind it:
    /// copying its live messages lets them all go). So the log stays within about twice
    /// its live messages whatever share of the traffic waits, and a log whose messages
    /// all wait (a destination down) is never rewritten.
    pub fn relocation_candidate(&self) -> Option<u64> {
        self.shape().relocation_candidate()
    }

    /// Stops the committer thread after it has committed and answered everything already
    /// submitted; later calls fail with [`SpoolError::Closed`]. Blocks until then. The lock
    /// is held until the last clone is dropped.
    pub fn close(&self) {
        self.inner.shutdown();
    }

    /// How many batches have been fdatasync'd since open (a metric; group commit makes it
    /// much lower than the number of records).
    pub fn sync_count(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    async fn submit(&self, bytes: Vec<u8>, effect: Effect) -> Result<Location, SpoolError> {
        self.append(bytes, effect, Durability::Synced).await
    }

    async fn append(
        &self,
        bytes: Vec<u8>,
        effect: Effect,
        durability: Durability,
    ) -> Result<Location, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Write(Append::record(
            bytes, effect, durability, reply,
        )))?;
        // A dropped reply sender means the committer thread is gone (it panicked).
        answer.await.map_err(|_| SpoolError::Closed)?.result
    }

    fn send(&self, request: Request) -> Result<(), SpoolError> {
        let tx = self.inner.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = tx.as_ref().ok_or(SpoolError::Closed)?;
        tx.send(request).map_err(|_| SpoolError::Closed)
    }
}

/// The messages a spool held when it was opened, not loaded yet.
#[must_use = "the queued messages are only delivered once loaded"]
pub struct Backlog {
    spool: Spool,
    /// The segments written before this open.
    seqs: Vec<u64>,
    /// Already read whole at open (a log without FLOOR records).
    replayed: Option<replay::Replayed>,
}

/// How many messages [`Backlog::load`] hands over at a time.
const LOAD_BATCH: usize = 10_000;

impl Backlog {
    /// Replays the log as it was at open (every record read and checked, the messages
    /// moved to `deferred/` by earlier versions reconciled with it), tells the committer
    /// which messages live where (from then on old segments can be collected), and hands
    /// the live messages over, oldest first, in batches. Blocking: run it on its own
    /// thread. Messages stored since the open are not in it (they are in newer segments).
    pub fn load(self, mut deliver: impl FnMut(Vec<Queued>)) -> Result<usize, SpoolError> {
        let Backlog {
            spool,
            seqs,
            replayed,
        } = self;
        let inner = &spool.inner;
        let replayed = match replayed {
            Some(r) => r,
            None => replay::replay_segments(&inner.log_dir, &seqs, Mode::Owner)?,
        };
        let mut counts = BTreeMap::new();
        let mut totals = BTreeMap::new();
        let mut corrupt = HashSet::new();
        for seg in &replayed.segments {
            if seg.tail == Tail::TornHeader {
                continue; // removed at open
            }
            counts.insert(seg.seq, 0usize);
            totals.insert(seg.seq, seg.messages);
            if seg.corrupt {
                corrupt.insert(seg.seq);
            }
        }
        // Messages moved to their own file (by versions that did so): the file wins over
        // a log copy (a crash between the rename and the MOVED record leaves both); such
        // log copies get their MOVED now.
        let deferred_dir = inner.dir.join(DEFERRED_DIR);
        let mut from_files = Vec::new();
        let mut file_ids = HashSet::new();
        let mut removed_finished = false;
        for id in deferred::list(&deferred_dir, true)? {
            let (loaded, _) = match deferred::load(&deferred_dir, id) {
                Ok(l) => l,
                Err(e) => {
                    // One damaged file must not keep the server (and every other
                    // message) down: set it aside for the operator, loudly.
                    // Never over an earlier `ID.corrupt` (a reused id): `set_aside` picks
                    // a free name and does not replace anything.
                    let path = deferred::path(&deferred_dir, id);
                    let aside = durable::set_aside(&path, ".corrupt")
                        .map_err(SpoolError::io("set aside", &path))?;
                    segment::sync_dir(&deferred_dir)?;
                    tracing::error!(error = %e, file = %path.display(), aside = %aside.display(),
                        "unreadable deferred message set aside; it will not be delivered");
                    continue;
                }
            };
            file_ids.insert(id);
            if loaded.finished {
                // Finished, but the unlink did not happen or did not last (a crash, or a
                // failed directory fsync: see `deferred::remove`). Complete it.
                let path = deferred::path(&deferred_dir, id);
                match fs::remove_file(&path) {
                    Ok(()) => removed_finished = true,
                    Err(e) => tracing::warn!(file = %path.display(), error = %e,
                        "cannot remove a finished message's file; it stays finished"),
                }
                continue;
            }
            if loaded.valid_len < loaded.file_len {
                deferred::trim(&deferred_dir, id, loaded.valid_len)?;
            }
            from_files.push(Queued::new(&loaded.message)?);
        }
        if removed_finished && let Err(e) = durable::sync_dir_retrying(&deferred_dir) {
            tracing::warn!(error = %e, "directory fsync failed after removing finished files; they are marked finished");
        }
        // A log copy of a message that has its own file (live or finished) is dead, but
        // stays live in the log until its MOVED record is written (below).
        let mut live_in_log = HashMap::with_capacity(replayed.live.len());
        let mut moved_late = Vec::new();
        let mut live = Vec::with_capacity(replayed.live.len() + from_files.len());
        for msg in replayed.live {
            if let Place::Log(loc) = msg.place {
                live_in_log.insert(msg.id, loc.segment);
                *counts.entry(loc.segment).or_default() += 1;
            }
            if file_ids.contains(&msg.id) {
                moved_late.push(msg.id);
            } else {
                live.push(msg);
            }
        }
        spool.unmoved().extend(moved_late.iter().copied());
        let (done, taken) = mpsc::sync_channel(1);
        spool.send(Request::Loaded(Box::new(committer::Loaded {
            live: live_in_log,
            counts,
            totals,
            corrupt,
            done,
        })))?;
        // The old segments are counted (and the finished ones collected) from here.
        taken.recv().map_err(|_| SpoolError::Closed)?;
        for id in moved_late {
            // Fire and forget: the committer writes it before anything submitted later.
            let (reply, _) = oneshot::channel();
            spool.send(Request::Write(Append::record(
                record::encode_moved(id)?,
                Effect::Remove(id),
                Durability::Synced,
                reply,
            )))?;
        }
        live.extend(from_files);
        live.sort_unstable_by_key(|m| m.id);
        let total = live.len();
        info!(spool = %inner.dir.display(), live = total,
            segments = replayed.segments.len(), "queue loaded from the spool");
        let mut rest = live.into_iter();
        loop {
            let batch: Vec<Queued> = rest.by_ref().take(LOAD_BATCH).collect();
            if batch.is_empty() {
                break;
            }
            deliver(batch);
        }
        Ok(total)
    }
}

/// The shape of the log, for the delivery runner's compaction (see
/// [`Spool::relocation_candidate`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogShape {
    /// The oldest segment: its number, live messages and messages ever written to it.
    pub oldest: Option<SegmentUse>,
    /// The segment being appended to.
    pub current: u64,
    /// Segments on disk.
    pub segments: usize,
    /// Live messages in the whole log.
    pub live: usize,
    /// Messages (MESSAGE and COPY records) written to the segments on disk.
    pub total: usize,
    /// The backlog is loaded (before that, old segments are not counted).
    pub loaded: bool,
}

impl LogShape {
    /// See [`Spool::relocation_candidate`].
    pub fn relocation_candidate(&self) -> Option<u64> {
        let oldest = self.oldest?;
        let mostly_finished = oldest.live.saturating_mul(4) <= oldest.total;
        let log_mostly_finished = self.live.saturating_mul(2) < self.total;
        (self.loaded
            && oldest.seq != self.current
            && oldest.live > 0
            && (mostly_finished || log_mostly_finished))
            .then_some(oldest.seq)
    }
}

/// How much of a segment is still live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentUse {
    pub seq: u64,
    pub live: usize,
    pub total: usize,
}

/// Read-only view for the CLI (`postern queue list` while the server runs): replays the
/// log without taking the lock, without trimming anything and without GC. A record being
/// written at that moment is simply not seen.
pub fn scan(dir: &Path) -> Result<Vec<StoredMessage>, SpoolError> {
    let mut live = replay::replay(&dir.join(LOG_DIR), Mode::ReadOnly)?
        .live
        .iter()
        .map(Queued::stored)
        .collect::<Result<Vec<_>, _>>()?;
    let deferred_dir = dir.join(DEFERRED_DIR);
    for id in deferred::list(&deferred_dir, false)? {
        // A file may vanish between the listing and the read (delivered meanwhile).
        if let Ok((loaded, _)) = deferred::load(&deferred_dir, id) {
            live.retain(|m| m.envelope.id != id);
            if !loaded.finished {
                live.push(loaded.message);
            }
        }
    }
    live.sort_by_key(|m| m.envelope.id);
    Ok(live)
}

/// Reads a live message's body without an open spool (for the CLI). Blocking.
pub fn read_body_in(dir: &Path, msg: &StoredMessage) -> Result<Vec<u8>, SpoolError> {
    match &msg.place {
        Place::Log(loc) => read_at(&dir.join(LOG_DIR), loc),
        Place::Deferred => Ok(deferred::load(&dir.join(DEFERRED_DIR), msg.envelope.id)?.1),
    }
}

/// Runs blocking file work off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(SpoolError::Closed))
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn read_at(log_dir: &Path, loc: &Location) -> Result<Vec<u8>, SpoolError> {
    let path = log_dir.join(segment::segment_name(loc.segment));
    let corrupt = |reason: String| SpoolError::Corrupt {
        path: path.clone(),
        offset: loc.offset,
        reason,
    };
    if loc.len < FRAME_LEN as u64 || loc.len > FRAME_LEN as u64 + u64::from(u32::MAX) {
        return Err(corrupt(format!("impossible record length {}", loc.len)));
    }
    let file = File::open(&path).map_err(SpoolError::io("open segment", &path))?;
    let mut buf = vec![0; loc.len as usize];
    file.read_exact_at(&mut buf, loc.offset).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            corrupt("record runs past the end of the segment".into())
        } else {
            SpoolError::io("read segment", &path)(e)
        }
    })?;
    let frame = record::parse_frame(buf[..FRAME_LEN].try_into().expect("frame length"))
        .ok_or_else(|| corrupt("no record frame".into()))?;
    if frame.rtype != RecordType::Message as u8 && frame.rtype != RecordType::Copy as u8 {
        return Err(corrupt(format!(
            "record type {} is not MESSAGE or COPY",
            frame.rtype
        )));
    }
    if u64::from(frame.len) + FRAME_LEN as u64 != loc.len {
        return Err(corrupt("record length does not match the location".into()));
    }
    if crc32fast::hash(&buf[FRAME_LEN..]) != frame.crc {
        return Err(corrupt("payload CRC mismatch".into()));
    }
    match record::decode(frame.rtype, frame.version, &buf[FRAME_LEN..]) {
        Ok(Decoded::Message { body_start, .. } | Decoded::Copy { body_start, .. }) => {
            buf.drain(..FRAME_LEN + body_start);
            Ok(buf)
        }
        Ok(_) => Err(corrupt("not a MESSAGE or COPY record".into())),
        Err(reason) => Err(corrupt(reason)),
    }
}

/// Opens `SPOOL/lock` and takes an exclusive `flock` on it for the life of the spool; the
/// file records the holder's pid for the error message of the next would-be owner.
fn take_lock(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(SpoolError::io("open lock file", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "unknown".to_string(),
                t => t.chars().take(80).collect(),
            };
            return Err(SpoolError::Locked { path, holder });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(SpoolError::io("lock", &path)(e)),
    }
    // Informational only; the lock is the flock, not the content.
    let _ = file
        .set_len(0)
        .and_then(|()| file.write_all(format!("pid {}\n", std::process::id()).as_bytes()));
    Ok(file)
}
