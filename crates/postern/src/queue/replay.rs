//! Replay: rebuild the set of live messages from the segment log.
//!
//! Reads every segment oldest first and applies each verified record: MESSAGE makes a
//! message live, RCPT marks one recipient final, DONE and MOVED take the message out of the
//! live set; records about ids that are not live are ignored. Nothing is trusted that was
//! not checked: at a record whose frame, length or CRC fails, replay resynchronises on the
//! next whole record with a valid CRC and logs the bytes skipped (see `segment.rs`); a bad
//! spot with nothing valid after it ends the segment (a torn tail if it is the newest), and
//! a record that verifies but does not decode is logged and skipped.
//! Message bodies are checked (CRC) but not kept: a message is returned with its location.

use std::collections::HashMap;
use std::path::Path;

use tracing::{debug, error, warn};

use super::error::SpoolError;
use super::record::{self, Decoded, FRAME_LEN};
use super::segment::{self, HeaderState, Item, SegmentReader};
use super::{Location, QueueId, RcptState, StoredMessage};

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
    /// Offset just past the last good record.
    pub(crate) valid_end: u64,
    pub(crate) tail: Tail,
    /// Corruption was found in it (and skipped, or it ended the segment): the segment is
    /// set aside, not deleted, when collected.
    pub(crate) corrupt: bool,
}

pub(crate) struct Replayed {
    /// Live messages, by id (that is, by arrival).
    pub(crate) live: Vec<StoredMessage>,
    /// Every segment read, oldest first.
    pub(crate) segments: Vec<SegmentState>,
    /// The highest queue id seen in any MESSAGE record, live or not (0 if none).
    pub(crate) max_id: u64,
}

/// What replay has found so far, record by record.
#[derive(Default)]
struct Found {
    live: HashMap<QueueId, StoredMessage>,
    /// The highest queue id of any MESSAGE record, live or not.
    max_id: u64,
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

pub(crate) fn replay(log_dir: &Path, mode: Mode) -> Result<Replayed, SpoolError> {
    let seqs = segment::list_segments(log_dir)?;
    let mut found = Found::default();
    let mut segments = Vec::with_capacity(seqs.len());
    for (i, &seq) in seqs.iter().enumerate() {
        let newest = i + 1 == seqs.len();
        let name = segment::segment_name(seq);
        let path = log_dir.join(&name);
        let Some(mut reader) = SegmentReader::open(&path)? else {
            // Deleted by the server's GC after we listed it: all its messages were done.
            continue;
        };
        let (tail, corrupt) = match reader.read_header()? {
            HeaderState::Good => replay_records(&mut reader, seq, &name, newest, mode, &mut found)?,
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
        segments.push(SegmentState {
            seq,
            valid_end: reader.valid_end(),
            tail,
            corrupt,
        });
    }
    let mut live: Vec<StoredMessage> = found.live.into_values().collect();
    live.sort_by_key(|m| m.envelope.id);
    Ok(Replayed {
        live,
        segments,
        max_id: found.max_id,
    })
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
        let (live, max_id) = (&mut self.live, &mut self.max_id);
        let decoded = match record::decode(rtype, version, payload) {
            Ok(d) => d,
            Err(reason) => {
                error!(segment = %name, offset, reason = %reason,
                "spool record passed its CRC but does not decode; skipped (corruption or a newer format)");
                return;
            }
        };
        match decoded {
            Decoded::Message { envelope, size, .. } => {
                let id = envelope.id;
                *max_id = (*max_id).max(id.as_u64());
                if live.contains_key(&id) {
                    // Only a caller retrying store() after an error it got although the write
                    // landed can produce this; both copies are the same message.
                    warn!(segment = %name, offset, %id, "second MESSAGE record for a live id; ignored");
                    return;
                }
                let states = vec![RcptState::Pending; envelope.recipients.len()];
                let location = Location {
                    segment: seq,
                    offset,
                    len: (FRAME_LEN + payload.len()) as u64,
                };
                live.insert(
                    id,
                    StoredMessage {
                        envelope,
                        states,
                        place: super::Place::Log(location),
                        size,
                    },
                );
            }
            Decoded::Rcpt {
                id,
                index,
                delivered,
            } => {
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
                live.remove(&id);
            }
        }
    }
}
