//! Per-message files for deferred messages, as earlier versions kept them. Deferred mail
//! now stays in the log (a message waiting long is carried forward by compaction, see
//! `Spool::relocate`), so nothing new is written here; a spool from an earlier version is
//! still read, and its files are finished and removed as before.
//!
//! How they were made: a message that was deferred moved out of the log into
//! `SPOOL/deferred/<ID>` (written to `<ID>.tmp`, fsynced, renamed, directory fsynced;
//! then a MOVED record went to the log; `write`, kept for the tests). Its later outcomes are RCPT records
//! appended to that file (one fdatasync each: deferred mail is the slow path). When it is
//! finished a DONE record is appended (fdatasync'd), then the file is unlinked (see
//! `remove` for why).
//!
//! File format: the line `postern-deferred 1\n`, the MESSAGE record exactly as in a
//! segment, then zero or more RCPT records, then possibly one DONE record; all framed and
//! CRC-checked like the log.
//!
//! Trust: our own files, but a crash can cut an append short. Loading stops at the first
//! record that does not verify; the owner trims that tail before appending again, so a
//! torn record can never hide later ones.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

#[cfg(test)]
use super::Envelope;
use super::durable;
use super::record::{self, Decoded, FRAME_LEN};
use super::{QueueId, RcptState, SpoolError, StoredMessage};

const HEADER: &[u8] = b"postern-deferred 1\n";

pub(crate) fn path(dir: &Path, id: QueueId) -> PathBuf {
    dir.join(id.to_string())
}

/// Writes a message's own file: temp file, fsync, no-replace rename, fsync the directory.
///
/// `Ok(true)`: the file is durable under its name. `Ok(false)`: the file has its name, but
/// the directory fsync failed (after retries), so after a crash the name may or may not
/// be there. Either way the file is the message from now on (rolling back would be just as
/// uncertain); the caller must keep the log copy alive (no MOVED record) in the second
/// case, so that whichever way the name lands, one copy survives. `Err`: nothing has the
/// final name; the log copy is the message.
#[cfg(test)]
pub(crate) fn write(
    dir: &Path,
    envelope: &Envelope,
    body: &[u8],
    states: &[RcptState],
) -> Result<bool, SpoolError> {
    let mut bytes = HEADER.to_vec();
    bytes.extend(record::encode_message(envelope, body)?);
    let now = super::unix_now();
    for (i, state) in states.iter().enumerate() {
        if *state != RcptState::Pending {
            let delivered = *state == RcptState::Delivered;
            bytes.extend(record::encode_outcome(
                envelope.id,
                i,
                delivered,
                now,
                "(recorded before the move)",
            )?);
        }
    }
    // Never replace a file (`SPOOL_FILE`): a name already taken (a queue id clash, or a
    // leftover) is an error: the message then simply stays in the log, where it is safe.
    // A crash before the temporary name is removed leaves `ID.tmp` as a second name of
    // the same inode; `list` removes it at open, which only drops a name.
    let final_path = path(dir, envelope.id);
    match crate::durable::write(&final_path, &bytes, durable::SPOOL_FILE) {
        Ok(()) => Ok(true),
        Err(e) if e.named => {
            tracing::error!(file = %final_path.display(), error = %e,
                "deferred file written but its directory entry may not be durable; the log copy is kept too");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Appends a final outcome for one recipient, durably.
pub(crate) fn append_outcome(
    dir: &Path,
    id: QueueId,
    index: usize,
    delivered: bool,
    reply: &str,
) -> Result<(), SpoolError> {
    let bytes = record::encode_outcome(id, index, delivered, super::unix_now(), reply)?;
    append_record(dir, id, &bytes)
}

/// Appends one record to a message's file and fdatasyncs it.
fn append_record(dir: &Path, id: QueueId, bytes: &[u8]) -> Result<(), SpoolError> {
    let p = path(dir, id);
    let mut file = OpenOptions::new()
        .append(true)
        .open(&p)
        .map_err(SpoolError::io("open", &p))?;
    let before = file.metadata().map_err(SpoolError::io("stat", &p))?.len();
    let written = file
        .write_all(bytes)
        .map_err(SpoolError::io("append", &p))
        .and_then(|()| file.sync_data().map_err(SpoolError::io("fdatasync", &p)));
    if written.is_err() {
        // A half-written record would hide every later one: cut it off again.
        let _ = file.set_len(before).and_then(|()| file.sync_all());
    }
    written
}

/// Finishes a message kept in its own file, so that it can never come back.
///
/// Why not just unlink and fsync the directory: if that fsync fails, the unlink may or
/// may not survive a crash (POSIX leaves the state of the directory unspecified after a
/// failed fsync; Linux may even have dropped the change from its cache, so a retry that
/// succeeds does not prove it landed). An unlink that does not survive would resurrect
/// a finished message, and rolling back ("not finished") is no better. So the finished
/// state is made durable in the file itself first: a DONE record appended and
/// fdatasync'd (file data, independent of the directory). Then the unlink and the
/// directory fsync (retried). Whichever way the unlink lands, the next open reads the
/// DONE record, treats the message as finished, and removes the file. A failure after
/// the DONE record is therefore logged but not an error: the message is finished.
pub(crate) fn remove(dir: &Path, id: QueueId) -> Result<(), SpoolError> {
    let p = path(dir, id);
    match append_record(dir, id, &record::encode_done(id)?) {
        Ok(()) => {}
        Err(SpoolError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    if let Err(e) = fs::remove_file(&p)
        && e.kind() != ErrorKind::NotFound
    {
        tracing::warn!(file = %p.display(), error = %e,
            "finished message's file not removed (it is marked finished); removed at next start");
        return Ok(());
    }
    if let Err(e) = durable::sync_dir_retrying(dir) {
        tracing::warn!(file = %p.display(), error = %e,
            "removal of a finished message's file may not be durable; it is marked finished, so it cannot come back");
    }
    Ok(())
}

/// A loaded deferred file.
pub(crate) struct Loaded {
    pub(crate) message: StoredMessage,
    /// Length of the verified prefix; bytes after it are a torn append.
    pub(crate) valid_len: u64,
    pub(crate) file_len: u64,
    /// The file ends in a DONE record: the message is finished, the file only awaits its
    /// removal (a crash or a failed unlink came between the two).
    pub(crate) finished: bool,
}

/// Reads one deferred file: its envelope, states and body offset.
pub(crate) fn load(dir: &Path, id: QueueId) -> Result<(Loaded, Vec<u8>), SpoolError> {
    let p = path(dir, id);
    let mut data = Vec::new();
    File::open(&p)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(SpoolError::io("read", &p))?;
    let corrupt = |offset: usize, reason: &str| SpoolError::Corrupt {
        path: p.clone(),
        offset: offset as u64,
        reason: reason.to_string(),
    };
    if !data.starts_with(HEADER) {
        return Err(corrupt(0, "not a deferred message file"));
    }
    let mut pos = HEADER.len();
    let mut message: Option<(StoredMessage, Vec<u8>)> = None;
    let mut finished = false;
    while let Some((decoded, next, payload_start)) = next_record(&data, pos) {
        // Only DONE may follow DONE (a second finish after a failed unlink).
        if finished && !matches!(decoded, Decoded::Done(d) if d == id) {
            return Err(corrupt(pos, "record after DONE"));
        }
        match (decoded, message.as_mut()) {
            (
                Decoded::Message {
                    envelope,
                    body_start,
                    size,
                },
                None,
            ) => {
                if envelope.id != id {
                    return Err(corrupt(pos, "file name and message id differ"));
                }
                let body = data[payload_start + body_start..next].to_vec();
                let states = vec![RcptState::Pending; envelope.recipients.len()];
                message = Some((
                    StoredMessage {
                        envelope,
                        states,
                        place: super::Place::Deferred,
                        size,
                    },
                    body,
                ));
            }
            (
                Decoded::Rcpt {
                    index, delivered, ..
                },
                Some((m, _)),
            ) => {
                if let Some(s) = m.states.get_mut(index) {
                    *s = if delivered {
                        RcptState::Delivered
                    } else {
                        RcptState::Failed
                    };
                }
            }
            (Decoded::Done(done_id), Some(_)) if done_id == id => finished = true,
            _ => return Err(corrupt(pos, "unexpected record")),
        }
        pos = next;
    }
    let (message, body) = message.ok_or_else(|| corrupt(pos, "no message record"))?;
    Ok((
        Loaded {
            message,
            valid_len: pos as u64,
            file_len: data.len() as u64,
            finished,
        },
        body,
    ))
}

/// Decodes the record at `pos`: (decoded, end of record, start of payload).
fn next_record(data: &[u8], pos: usize) -> Option<(Decoded, usize, usize)> {
    let frame_bytes: &[u8; FRAME_LEN] = data.get(pos..pos + FRAME_LEN)?.try_into().ok()?;
    let frame = record::parse_frame(frame_bytes)?;
    let start = pos + FRAME_LEN;
    let end = start.checked_add(frame.len as usize)?;
    let payload = data.get(start..end)?;
    if crc32fast::hash(payload) != frame.crc {
        return None;
    }
    let decoded = record::decode(frame.rtype, frame.version, payload).ok()?;
    Some((decoded, end, start))
}

/// Ids of the deferred files in `dir`; leftover `.tmp` files (a move cut short: the
/// message is still live in the log) are removed when `clean` is set.
pub(crate) fn list(dir: &Path, clean: bool) -> Result<Vec<QueueId>, SpoolError> {
    let mut ids = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(ids),
        Err(e) => return Err(SpoolError::io("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(SpoolError::io("list", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Ok(id) = name.parse::<QueueId>() {
            ids.push(id);
        } else if clean && name.ends_with(".tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
    ids.sort();
    Ok(ids)
}

/// Cuts a torn append off (owner only, at open).
pub(crate) fn trim(dir: &Path, id: QueueId, len: u64) -> Result<(), SpoolError> {
    let p = path(dir, id);
    let file = OpenOptions::new()
        .write(true)
        .open(&p)
        .map_err(SpoolError::io("open", &p))?;
    file.set_len(len).map_err(SpoolError::io("truncate", &p))?;
    file.sync_all().map_err(SpoolError::io("fsync", &p))
}
