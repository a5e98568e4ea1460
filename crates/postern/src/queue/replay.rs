//! Replay: rebuild the set of live messages from the segment log.
//!
//! Reads every segment oldest first and applies each verified record: MESSAGE makes a
//! message live, RCPT marks one recipient final, DONE and MOVED take the message out of the
//! live set; records about ids that are not live are ignored. Nothing is trusted that was
//! not checked: at a record whose frame, length or CRC fails, replay resynchronises on the
//! next whole record with a valid CRC and logs the bytes skipped (see `segment.rs`); a bad
//! spot with nothing valid after it ends the segment (a torn tail if it is the newest), and
//! a record that verifies but does not decode is logged and skipped.
//! COPY carries a live message forward out of an old segment (its location and states
//! replace what was known; it makes the message live if the old segment is gone), and
//! FLOOR bounds the queue ids handed out before it (see `Spool::open`).
//! Message bodies are checked (CRC) but not kept: a message is returned with its location,
//! its envelope in the compact text form the queue keeps ([`Queued`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tracing::{debug, error, warn};

use super::error::SpoolError;
use super::record::{self, Decoded, FRAME_LEN};
use super::segment::{self, HeaderState, Item, SegmentReader};
use super::{Location, QueueId, Queued, RcptState};

/// Who is replaying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `Spool::open`, holding the lock: the newest segment's tail is final.
    Owner,
    /// `scan`, without the lock: the server may be appending to the newest segment.
    ReadOnly,
}

/// How a segment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Every byte verified.
    Clean,
    /// The newest segment ends in a record cut short by a crash (never acknowledged).
    Torn,
    /// The newest segment is shorter than its header (a crash while creating it).
    TornHeader,
    /// A bad header, or a bad record with no valid record after it in a segment that is
    /// not the newest: the rest of the segment was not replayed.
    Corrupt,
}

/// One segment as found by replay.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SegmentState {
    pub(crate) seq: u64,
    /// MESSAGE and COPY records in it, live or not.
    pub(crate) messages: usize,
    /// It holds a FLOOR record.
    pub(crate) floor: bool,
    /// Offset just past the last good record.
    pub(crate) valid_end: u64,
    pub(crate) tail: Tail,
    /// Corruption was found in it (and skipped, or it ended the segment): the segment is
    /// set aside, not deleted, when collected.
    pub(crate) corrupt: bool,
}

pub(crate) struct Replayed {
    /// Live messages, by id (that is, by arrival).
    pub(crate) live: Vec<Queued>,
    /// Every segment read, oldest first.
    pub(crate) segments: Vec<SegmentState>,
    /// The highest queue id seen in any record, live or not (0 if none).
    pub(crate) max_id: u64,
}

/// What replay has found so far, record by record.
#[derive(Default)]
struct Found {
    live: HashMap<QueueId, Queued>,
    /// The highest queue id of any record, live or not.
    max_id: u64,
    /// MESSAGE and COPY records per segment.
    messages: BTreeMap<u64, usize>,
    /// Segments holding a FLOOR record.
    floors: Vec<u64>,
}

/// Where a record was read: its segment's sequence number and file name, and its offset.
#[derive(Clone, Copy)]
struct At<'a> {
    seq: u64,
    segment: &'a str,
    offset: u64,
}

/// One record as framed on disk.
struct Record<'a> {
    rtype: u8,
    version: u8,
    payload: &'a [u8],
}

/// Replays every segment in `log_dir`.
pub(crate) fn replay(log_dir: &Path, mode: Mode) -> Result<Replayed, SpoolError> {
    replay_segments(log_dir, &segment::list_segments(log_dir)?, mode)
}

/// Replays the segments `seqs` (increasing), the last one being the newest of the log.
pub(crate) fn replay_segments(
    log_dir: &Path,
    seqs: &[u64],
    mode: Mode,
) -> Result<Replayed, SpoolError> {
    let mut found = Found::default();
    let mut segments = Vec::with_capacity(seqs.len());
    for (i, &seq) in seqs.iter().enumerate() {
        let newest = i + 1 == seqs.len();
        if let Some(state) = replay_one(log_dir, seq, newest, mode, &mut found)? {
            segments.push(state);
        }
    }
    let mut live: Vec<Queued> = found.live.into_values().collect();
    live.sort_unstable_by_key(|m| m.id);
    Ok(Replayed {
        live,
        segments,
        max_id: found.max_id,
    })
}

/// Replays one segment into `found`; `None` if it is gone (collected after the listing).
fn replay_one(
    log_dir: &Path,
    seq: u64,
    newest: bool,
    mode: Mode,
    found: &mut Found,
) -> Result<Option<SegmentState>, SpoolError> {
    let name = segment::segment_name(seq);
    let path = log_dir.join(&name);
    let Some(mut reader) = SegmentReader::open(&path)? else {
        // Deleted by the server's GC after we listed it: all its messages were done.
        return Ok(None);
    };
    let (tail, corrupt) = match reader.read_header()? {
        HeaderState::Good => replay_records(&mut reader, seq, &name, newest, mode, found)?,
        HeaderState::Torn if newest => {
            if mode == Mode::Owner {
                warn!(segment = %name, "newest segment is shorter than its header (crash while creating it)");
            }
            (Tail::TornHeader, false)
        }
        HeaderState::Torn | HeaderState::Bad => {
            error!(segment = %name, "spool segment has a bad header; skipped (corruption)");
            (Tail::Corrupt, true)
        }
    };
    Ok(Some(SegmentState {
        seq,
        messages: found.messages.get(&seq).copied().unwrap_or(0),
        floor: found.floors.contains(&seq),
        valid_end: reader.valid_end(),
        tail,
        corrupt,
    }))
}

/// What `Spool::open` learns from the newest segments before it takes new mail.
pub(crate) struct TailScan {
    /// The segments of the log, oldest first, without a newest one removed for a torn
    /// header.
    pub(crate) seqs: Vec<u64>,
    /// No queue id in the log (nor any handed out by the runs that wrote it) is above
    /// this; `None` for a log without FLOOR records (written by an older Postern), whose
    /// every record must be read to know.
    pub(crate) floor: Option<u64>,
}

/// Makes the newest segment's end final (a torn tail trimmed; a segment cut short in its
/// header removed) and finds the id floor, reading only the newest segments: each segment
/// starts with a FLOOR record bounding every id handed out before it, and every id
/// handed out after it is in that segment or a later one. So the floor is the highest id
/// in the segments from the newest one with a FLOOR record on.
pub(crate) fn scan_tail(log_dir: &Path) -> Result<TailScan, SpoolError> {
    let mut seqs = segment::list_segments(log_dir)?;
    let mut found = Found::default();
    for i in (0..seqs.len()).rev() {
        let seq = seqs[i];
        let newest = i + 1 == seqs.len();
        // Read-only: corruption is reported once, by the replay of the whole log.
        let Some(state) = replay_one(log_dir, seq, newest, Mode::ReadOnly, &mut found)? else {
            continue;
        };
        if newest {
            let path = log_dir.join(segment::segment_name(seq));
            match state.tail {
                Tail::Torn => {
                    warn!(segment = %segment::segment_name(seq), valid_end = state.valid_end,
                        "torn tail in the newest segment (a write cut short by a crash, never acknowledged); trimmed");
                    segment::trim_segment(&path, state.valid_end)?;
                }
                Tail::TornHeader => {
                    warn!(segment = %segment::segment_name(seq),
                        "newest segment is shorter than its header (crash while creating it); removed");
                    std::fs::remove_file(&path).map_err(SpoolError::io("remove segment", &path))?;
                    segment::sync_dir(log_dir)?;
                    seqs.pop();
                    continue;
                }
                Tail::Clean | Tail::Corrupt => {}
            }
        }
        if state.floor {
            return Ok(TailScan {
                seqs,
                floor: Some(found.max_id),
            });
        }
    }
    // No FLOOR record at all: an empty log has nothing to bound.
    let floor = seqs.is_empty().then_some(0);
    Ok(TailScan { seqs, floor })
}

/// Replays the records of one segment; returns how it ended and whether corruption was
/// found (and skipped) in it.
fn replay_records(
    reader: &mut SegmentReader,
    seq: u64,
    name: &str,
    newest: bool,
    mode: Mode,
    found: &mut Found,
) -> Result<(Tail, bool), SpoolError> {
    let mut corrupt = false;
    loop {
        let (offset, reason) = match reader.next_item()? {
            Item::End => return Ok((Tail::Clean, corrupt)),
            Item::Record {
                offset,
                rtype,
                version,
                payload,
            } => {
                let at = At {
                    seq,
                    segment: name,
                    offset,
                };
                found.apply(
                    at,
                    Record {
                        rtype,
                        version,
                        payload,
                    },
                );
                continue;
            }
            Item::Bad { offset, reason } => (offset, reason),
        };
        // One bad record must not hide the rest of its segment: go on from the next
        // whole record with a valid CRC, if there is one. (A crash only ever leaves a bad
        // spot with nothing valid after it: everything before a record is fdatasync'd
        // before the record's batch is answered, and the batch is the last write.)
        if let Some(next) = reader.resync(offset)? {
            let skipped = next - offset;
            corrupt = true;
            error!(segment = %name, offset, reason = %reason, bytes_skipped = skipped,
                resumed_at = next,
                "corrupt spool record skipped; replay resumes at the next valid record");
            if mode == Mode::Owner {
                crate::maillog::spool_corruption(name, offset, skipped);
            }
            continue;
        }
        let left = reader.len() - offset;
        if !newest {
            error!(segment = %name, offset, reason = %reason, bytes_skipped = left,
                "corrupt spool record with no valid record after it; rest of segment skipped");
            if mode == Mode::Owner {
                crate::maillog::spool_corruption(name, offset, left);
            }
            return Ok((Tail::Corrupt, true));
        }
        // The newest segment ending in a bad spot with nothing valid after it: a torn
        // tail (never acknowledged), or a write in progress for a read-only scan.
        match mode {
            Mode::ReadOnly => {
                debug!(segment = %name, offset, reason = %reason,
                    "incomplete record at the end of the newest segment (write in progress or torn tail)");
            }
            Mode::Owner => {
                warn!(segment = %name, offset, reason = %reason, bytes = left,
                    "torn tail in the newest segment (a write cut short by a crash, never acknowledged); it will be trimmed");
            }
        }
        return Ok((Tail::Torn, corrupt));
    }
}

#[allow(clippy::too_many_arguments)]
impl Found {
    /// Applies one record whose CRC matched.
    fn apply(&mut self, at: At<'_>, record: Record<'_>) {
        let At {
            seq,
            segment: name,
            offset,
        } = at;
        let Record {
            rtype,
            version,
            payload,
        } = record;
        let decoded = match record::decode(rtype, version, payload) {
            Ok(d) => d,
            Err(reason) => {
                error!(segment = %name, offset, reason = %reason,
                "spool record passed its CRC but does not decode; skipped (corruption or a newer format)");
                return;
            }
        };
        let location = Location {
            segment: seq,
            offset,
            len: (FRAME_LEN + payload.len()) as u64,
        };
        let live = &mut self.live;
        match decoded {
            Decoded::Message {
                envelope,
                size,
                body_start,
            } => {
                let id = envelope.id;
                self.max_id = self.max_id.max(id.as_u64());
                *self.messages.entry(seq).or_default() += 1;
                if live.contains_key(&id) {
                    // Only a caller retrying store() after an error it got although the write
                    // landed can produce this; both copies are the same message.
                    warn!(segment = %name, offset, %id, "second MESSAGE record for a live id; ignored");
                    return;
                }
                let states = vec![RcptState::Pending; envelope.recipients.len()];
                // The envelope lines end one byte before the body (the blank line).
                let head = &payload[..body_start - 1];
                live.insert(
                    id,
                    Queued::replayed(head, &envelope, states, location, size),
                );
            }
            Decoded::Copy {
                envelope,
                states,
                head,
                size,
                ..
            } => {
                // The message carried forward: this copy is where it lives now, with the
                // states it had then (RCPT records after it still apply). Its original
                // may be in a segment already collected.
                let id = envelope.id;
                self.max_id = self.max_id.max(id.as_u64());
                *self.messages.entry(seq).or_default() += 1;
                let mut copy = Queued::replayed(&payload[head], &envelope, states, location, size);
                if let Some(old) = live.get(&id) {
                    // A recipient final in either stays final.
                    for (new, old) in copy.states.iter_mut().zip(old.states.iter()) {
                        if *new == RcptState::Pending {
                            *new = *old;
                        }
                    }
                }
                live.insert(id, copy);
            }
            Decoded::Floor(id) => {
                self.max_id = self.max_id.max(id.as_u64());
                self.floors.push(seq);
            }
            Decoded::Rcpt {
                id,
                index,
                delivered,
            } => {
                self.max_id = self.max_id.max(id.as_u64());
                let Some(msg) = live.get_mut(&id) else { return };
                match msg.states.get_mut(index) {
                    Some(state) => {
                        *state = if delivered {
                            RcptState::Delivered
                        } else {
                            RcptState::Failed
                        }
                    }
                    None => warn!(segment = %name, offset, %id, index,
                    "RCPT record for a recipient index the message does not have; ignored"),
                }
            }
            Decoded::Done(id) | Decoded::Moved(id) => {
                self.max_id = self.max_id.max(id.as_u64());
                live.remove(&id);
            }
        }
    }
}
