//! The committer: the one thread that writes the segment log.
//!
//! Callers encode their record in their own task and send the bytes with a oneshot
//! sender; a MESSAGE record comes in two parts, its frame and envelope and the message
//! body it was received in (moved, not copied, and handed back with the answer). The
//! committer blocks for the first request, drains whatever else is already queued (up to
//! `max_batch_bytes`), writes the batch with one vectored write and one `fdatasync`, and
//! only then answers every waiter. While that fdatasync runs, the next batch piles up in
//! the channel: no timer holds a batch back. A batch of only [`Durability::Written`]
//! records (a delivery's outcomes and DONE) is answered once written, without a sync: the
//! next synced batch makes it durable, or, at the latest `SpoolOptions::lazy_sync`
//! (200 ms) after it was written, a sync of its own. On an I/O error every waiter of the
//! batch gets the error and the segment is abandoned (its tail is unknown after a failed
//! write or sync); the next batch starts a new segment.
//!
//! The committer also owns the live index (id -> segment) and per-segment live counts, so
//! garbage collection needs no lock: it runs here after a batch that finished messages.
//! The index of the messages queued before the open arrives from the backlog's load
//! (`Request::Loaded`); until then no old segment is collected. A COPY (relocation) is
//! checked against the index when its batch is formed, in order with the DONE records
//! of the same batch, so a finished message is never carried forward (which would bring
//! it back at the next replay).
//! Input is our own callers' records; the only thing it trusts is that `Effect` matches the
//! bytes (both are built by `Spool`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{ErrorKind, IoSlice, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::durable;
use super::error::SpoolError;
use super::id::IdGen;
use super::record;
use super::segment::{self, HEADER, segment_name};
use super::{Location, LogShape, QueueId, SegmentUse, SpoolOptions};

/// What a committed record does to the live index.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Effect {
    /// RCPT: nothing.
    None,
    /// MESSAGE: the message is live in the segment it was written to.
    Add(QueueId),
    /// DONE or MOVED: the message is no longer live.
    Remove(QueueId),
    /// COPY: the message moves from segment `from` to the one written to; written only
    /// if it is live in `from` then.
    Relocate { id: QueueId, from: u64 },
}

pub(crate) enum Request {
    Write(Append),
    /// The index of the messages in the segments written before the open.
    Loaded(Box<Loaded>),
}

/// A record to append: `bytes`, then `body` (empty but for a MESSAGE record, whose frame
/// covers the body that follows it).
pub(crate) struct Append {
    pub(crate) bytes: Vec<u8>,
    pub(crate) body: Vec<u8>,
    pub(crate) effect: Effect,
    pub(crate) durability: Durability,
    pub(crate) reply: oneshot::Sender<Committed>,
}

/// When a record is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Once it is written and `fdatasync`'d: a crash of the machine cannot lose it.
    Synced,
    /// Once it is written: in the page cache it survives the process (a crash, `kill -9`),
    /// and it is synced with the next synced batch, or `SpoolOptions::lazy_sync` (200 ms)
    /// after it was written at the latest.
    /// A power failure before that can lose it. For a delivery's RCPT and DONE records:
    /// losing one only means the recipient is tried again (delivered twice at worst),
    /// as with Postfix, which does not sync the removal of a delivered queue file.
    Written,
}

/// The answer to an [`Append`]: where the record is, once it is on disk, and the body
/// back to its owner.
pub(crate) struct Committed {
    pub(crate) result: Result<Location, SpoolError>,
    pub(crate) body: Vec<u8>,
}

impl Append {
    /// A record without a body part.
    pub(crate) fn record(
        bytes: Vec<u8>,
        effect: Effect,
        durability: Durability,
        reply: oneshot::Sender<Committed>,
    ) -> Append {
        Append {
            bytes,
            body: Vec::new(),
            effect,
            durability,
            reply,
        }
    }

    /// Its length on disk.
    fn len(&self) -> usize {
        self.bytes.len() + self.body.len()
    }

    /// Answers the waiter (who may have gone away: a client that disconnected).
    fn answer(self, result: Result<Location, SpoolError>) {
        let _ = self.reply.send(Committed {
            result,
            body: self.body,
        });
    }
}

/// What the replay of the old segments found.
pub(crate) struct Loaded {
    pub(crate) live: HashMap<QueueId, u64>,
    pub(crate) counts: BTreeMap<u64, usize>,
    pub(crate) totals: BTreeMap<u64, usize>,
    pub(crate) corrupt: HashSet<u64>,
    /// Answered once the index is taken over and the first collection has run.
    pub(crate) done: mpsc::SyncSender<()>,
}

/// The segment being appended to.
struct Current {
    seq: u64,
    file: File,
    /// Bytes written (the header, the FLOOR record and every committed batch); all
    /// durable unless `unsynced`.
    len: u64,
    /// A batch has been written to it.
    has_records: bool,
    /// When the first record written since its last `fdatasync` was (records that are
    /// all [`Durability::Written`]); `None` when everything written is synced.
    unsynced: Option<Instant>,
}

pub(crate) struct Committer {
    log_dir: PathBuf,
    opts: SpoolOptions,
    current: Option<Current>,
    next_seq: u64,
    /// Live message -> the segment holding its MESSAGE record.
    live: HashMap<QueueId, u64>,
    /// Every segment on disk, oldest first -> how many live messages it holds.
    counts: BTreeMap<u64, usize>,
    /// Every segment on disk -> how many messages (MESSAGE and COPY records) it got.
    totals: BTreeMap<u64, usize>,
    /// The old segments' index has arrived (`Request::Loaded`): GC may run.
    loaded: bool,
    ids: Arc<IdGen>,
    shape: Arc<std::sync::Mutex<LogShape>>,
    /// Segments with a corrupt record: renamed aside, not deleted, when collected.
    corrupt: HashSet<u64>,
    syncs: Arc<AtomicU64>,
    /// Set when the removal of a segment may not be durable: no later segment is removed
    /// until the next start (see `collect_garbage`).
    gc_stopped: bool,
}

impl Committer {
    /// Creates a fresh segment, numbered `next_seq`, to append to. The old segments'
    /// index comes later (`Request::Loaded`).
    pub(crate) fn new(
        log_dir: PathBuf,
        opts: SpoolOptions,
        next_seq: u64,
        ids: Arc<IdGen>,
        syncs: Arc<AtomicU64>,
        shape: Arc<std::sync::Mutex<LogShape>>,
    ) -> Result<Committer, SpoolError> {
        let mut committer = Committer {
            log_dir,
            opts,
            current: None,
            next_seq,
            live: HashMap::new(),
            counts: BTreeMap::new(),
            totals: BTreeMap::new(),
            loaded: false,
            ids,
            shape,
            corrupt: HashSet::new(),
            syncs,
            gc_stopped: false,
        };
        committer.start_segment()?;
        committer.publish();
        Ok(committer)
    }

    /// The loop of the committer thread; returns when every `Sender` is gone and the
    /// channel is drained, so everything submitted before `close` has been answered.
    pub(crate) fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut next = None;
        loop {
            let first = match next.take() {
                Some(r) => r,
                None => match self.receive(&rx) {
                    Some(r) => r,
                    None => break,
                },
            };
            let first = match first {
                Request::Write(w) => w,
                Request::Loaded(loaded) => {
                    self.load(*loaded);
                    continue;
                }
            };
            let mut bytes = first.len();
            let mut batch = vec![first];
            if self.opts.group_commit {
                while bytes < self.opts.max_batch_bytes {
                    match rx.try_recv() {
                        Ok(Request::Write(req)) => {
                            bytes += req.len();
                            batch.push(req);
                        }
                        // After this batch: it may hold records for new messages only.
                        Ok(loaded) => {
                            next = Some(loaded);
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            self.commit(batch);
        }
        debug!("spool committer stopped");
    }

    /// The next request (`None` once every sender is gone). While written records wait
    /// for a sync, waits no longer than their deadline (`lazy_sync` after the first of
    /// them was written, however many requests come meanwhile), then syncs them itself.
    fn receive(&mut self, rx: &mpsc::Receiver<Request>) -> Option<Request> {
        loop {
            let Some(since) = self.current.as_ref().and_then(|c| c.unsynced) else {
                return rx.recv().ok();
            };
            let left = self.opts.lazy_sync.saturating_sub(since.elapsed());
            if left.is_zero() {
                self.sync_written();
                continue;
            }
            match rx.recv_timeout(left) {
                Ok(r) => return Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => self.sync_written(),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.sync_written();
                    return None;
                }
            }
        }
    }

    /// Syncs the records written to the current segment since its last sync. They were
    /// answered already; if the sync fails they may not be durable (a power failure could
    /// then deliver their recipients again), and the segment is abandoned as after any
    /// failed sync.
    fn sync_written(&mut self) {
        let Some(cur) = self.current.as_mut().filter(|c| c.unsynced.is_some()) else {
            return;
        };
        match cur.file.sync_data() {
            Ok(()) => {
                cur.unsynced = None;
                self.syncs.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                error!(segment = %segment_name(cur.seq), error = %e,
                    "spool sync failed; written delivery outcomes may not be durable; abandoning the segment");
                self.abandon_segment();
            }
        }
    }

    /// Takes over the index of the old segments; they can be collected from now on.
    fn load(&mut self, loaded: Loaded) {
        let Loaded {
            live,
            counts,
            totals,
            corrupt,
            done,
        } = loaded;
        for (id, seq) in live {
            // A message of the backlog cannot have been added since the open (new ids
            // are above the floor), so this only fills the index.
            self.live.entry(id).or_insert(seq);
        }
        for (seq, n) in counts {
            *self.counts.entry(seq).or_default() += n;
        }
        for (seq, n) in totals {
            *self.totals.entry(seq).or_default() += n;
        }
        self.corrupt.extend(corrupt);
        self.loaded = true;
        self.collect_garbage();
        self.publish();
        let _ = done.send(());
    }

    /// Publishes the log's shape for the delivery runner.
    fn publish(&self) {
        let oldest = self
            .counts
            .first_key_value()
            .map(|(&seq, &live)| SegmentUse {
                seq,
                live,
                total: self.totals.get(&seq).copied().unwrap_or(0),
            });
        let shape = LogShape {
            oldest,
            current: self.current.as_ref().map_or(0, |c| c.seq),
            segments: self.counts.len(),
            live: self.live.len(),
            total: self.totals.values().sum(),
            loaded: self.loaded,
        };
        *self
            .shape
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = shape;
    }

    fn start_segment(&mut self) -> Result<(), SpoolError> {
        let seq = self.next_seq;
        // Never retry a number: a failed attempt may have left something behind.
        self.next_seq += 1;
        // Every id handed out so far is at most this: `replay::scan_tail` relies on it.
        let floor = record::encode_floor(self.ids.high_water())?;
        let file = segment::create_segment(&self.log_dir, seq, &floor)?;
        self.counts.insert(seq, 0);
        self.totals.insert(seq, 0);
        self.current = Some(Current {
            seq,
            file,
            len: (HEADER.len() + floor.len()) as u64,
            has_records: false,
            unsynced: None,
        });
        debug!(segment = %segment_name(seq), "new spool segment");
        Ok(())
    }

    /// Makes sure there is a segment to write the next batch to, starting a new one when
    /// there is none (after an error) or the current one has reached `segment_size` (and
    /// holds at least one record, so a tiny `segment_size` cannot make empty segments).
    fn rotate_if_full(&mut self) -> Result<(), SpoolError> {
        let full = self
            .current
            .as_ref()
            .is_none_or(|c| c.len >= self.opts.segment_size && c.has_records);
        if full {
            self.sync_written();
            self.current = None;
            self.start_segment()?;
        }
        Ok(())
    }

    fn commit(&mut self, batch: Vec<Append>) {
        let batch = self.drop_stale_copies(batch);
        if batch.is_empty() {
            return;
        }
        let written = self.write_batch(&batch);
        match written {
            Ok((seq, mut offset)) => {
                let mut finished_any = false;
                for req in batch {
                    let len = req.len() as u64;
                    let location = Location {
                        segment: seq,
                        offset,
                        len,
                    };
                    offset += len;
                    finished_any |= self.apply(req.effect, seq);
                    req.answer(Ok(location));
                }
                if finished_any {
                    self.collect_garbage();
                }
                self.publish();
            }
            Err(e) => {
                error!(error = %e, records = batch.len(), "spool write failed; abandoning the segment");
                self.abandon_segment();
                for req in batch {
                    req.answer(Err(e.duplicate()));
                }
            }
        }
    }

    /// Answers (and leaves out) each COPY whose message is no longer live in the segment
    /// it is carried from, given the index and the DONE records before it in the batch.
    fn drop_stale_copies(&self, batch: Vec<Append>) -> Vec<Append> {
        if !batch
            .iter()
            .any(|w| matches!(w.effect, Effect::Relocate { .. }))
        {
            return batch;
        }
        let mut removed = HashSet::new();
        let mut kept = Vec::with_capacity(batch.len());
        for w in batch {
            match w.effect {
                Effect::Remove(id) => {
                    removed.insert(id);
                }
                Effect::Relocate { id, from } => {
                    if removed.contains(&id) || self.live.get(&id) != Some(&from) {
                        w.answer(Err(SpoolError::NotLive(id)));
                        continue;
                    }
                    // A second COPY of it in this batch would find it moved.
                    removed.insert(id);
                }
                Effect::None | Effect::Add(_) => {}
            }
            kept.push(w);
        }
        kept
    }

    /// Writes and syncs a batch; returns its segment and the offset of its first record.
    fn write_batch(&mut self, batch: &[Append]) -> Result<(u64, u64), SpoolError> {
        self.rotate_if_full()?;
        let cur = self
            .current
            .as_mut()
            .expect("a current segment after rotation");
        let seq = cur.seq;
        let log_dir = &self.log_dir;
        let io = |op| {
            move |source| SpoolError::Io {
                op,
                path: log_dir.join(segment_name(seq)),
                source,
            }
        };
        write_all_vectored(&mut cur.file, batch).map_err(io("write"))?;
        if batch.iter().any(|r| r.durability == Durability::Synced) {
            cur.file.sync_data().map_err(io("fdatasync"))?;
            self.syncs.fetch_add(1, Ordering::Relaxed);
            cur.unsynced = None;
        } else {
            cur.unsynced.get_or_insert_with(Instant::now);
        }
        let start = cur.len;
        cur.len += batch.iter().map(|r| r.len() as u64).sum::<u64>();
        cur.has_records = true;
        Ok((seq, start))
    }

    /// Updates the live index; true if a message was finished.
    fn apply(&mut self, effect: Effect, seq: u64) -> bool {
        match effect {
            Effect::None => false,
            Effect::Add(id) => {
                *self.totals.entry(seq).or_default() += 1;
                // A retried store of an id already live keeps the older (smaller) segment,
                // which cannot be collected before this one anyway.
                if let std::collections::hash_map::Entry::Vacant(slot) = self.live.entry(id) {
                    slot.insert(seq);
                    *self.counts.entry(seq).or_default() += 1;
                }
                false
            }
            Effect::Relocate { id, from } => {
                *self.totals.entry(seq).or_default() += 1;
                self.live.insert(id, seq);
                *self.counts.entry(seq).or_default() += 1;
                if let Some(n) = self.counts.get_mut(&from) {
                    *n = n.saturating_sub(1);
                }
                true
            }
            Effect::Remove(id) => match self.live.remove(&id) {
                Some(home) => {
                    if let Some(n) = self.counts.get_mut(&home) {
                        *n = n.saturating_sub(1);
                    }
                    true
                }
                None => false,
            },
        }
    }

    /// After a failed write or sync: trim what may have landed past the last good batch
    /// (best effort) and stop using the segment.
    fn abandon_segment(&mut self) {
        let Some(cur) = self.current.take() else {
            return;
        };
        let path = self.log_dir.join(segment_name(cur.seq));
        let trimmed = cur.file.set_len(cur.len).and_then(|()| cur.file.sync_all());
        if let Err(e) = trimmed {
            // Replay will stop at the first bad record after cur.len and report it.
            warn!(path = %path.display(), error = %e, "could not trim the abandoned segment");
        }
    }

    /// Deletes segments from the oldest while they hold no live message, never the one
    /// being appended to. Strictly in order: RCPT/DONE records in a later segment refer to
    /// messages in earlier ones, so a later segment must not vanish before an earlier one.
    /// The directory is synced after each removal so a crash cannot bring back an older
    /// segment whose DONE records were in an already-removed newer one.
    ///
    /// A failed directory fsync after a removal: the removal may or may not survive a
    /// crash (POSIX leaves the directory's state unspecified; Linux may drop the change,
    /// so even a later fsync that succeeds proves nothing about it). If it does not and a
    /// later segment's removal does, replay after the crash would find this segment's
    /// MESSAGE records without the DONE records that finished them: finished messages
    /// resurrected. So: retry the fsync, and if it still fails, remove no later segment
    /// in this process. Nothing is rolled back (the segment stays gone from the index);
    /// after a restart replay sees either state correctly, because every later segment
    /// is still there. The cost is disk space until the restart, and an error in the log.
    pub(crate) fn collect_garbage(&mut self) {
        if self.gc_stopped || !self.loaded {
            return;
        }
        let current = self.current.as_ref().map(|c| c.seq);
        while let Some((&seq, &live)) = self.counts.first_key_value() {
            if live > 0 || Some(seq) == current {
                break;
            }
            let path = self.log_dir.join(segment_name(seq));
            let removed = if self.corrupt.contains(&seq) {
                // Keep the evidence for the operator, out of the log.
                // Never over an earlier `.seg.corrupt`; an unlink error keeps the
                // segment in the log (and stops collection) until it succeeds.
                durable::set_aside(&path, ".corrupt").map(|aside| {
                    error!(segment = %segment_name(seq), kept_as = %aside.display(),
                        "corrupt segment taken out of the log and kept for inspection");
                })
            } else {
                fs::remove_file(&path)
            };
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "could not remove spool segment; will retry");
                    return;
                }
            }
            self.counts.remove(&seq);
            self.totals.remove(&seq);
            self.corrupt.remove(&seq);
            if let Err(e) = durable::sync_dir_retrying(&self.log_dir) {
                error!(segment = %segment_name(seq), error = %e,
                    "could not make the removal of a spool segment durable; no later segment is collected until restart");
                self.gc_stopped = true;
                return;
            }
            info!(segment = %segment_name(seq), "spool segment collected");
        }
    }
}

/// `write_all` for a batch of records, without copying them into one buffer: one
/// `writev` of every record's parts (more only if the kernel takes less).
fn write_all_vectored(file: &mut File, batch: &[Append]) -> std::io::Result<()> {
    if let [one] = batch
        && one.body.is_empty()
    {
        return file.write_all(&one.bytes);
    }
    let mut slices: Vec<IoSlice<'_>> = batch
        .iter()
        .flat_map(|r| [&r.bytes, &r.body])
        .filter(|part| !part.is_empty())
        .map(|part| IoSlice::new(part))
        .collect();
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        match file.write_vectored(bufs) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
