//! The quarantine: messages a `[[filter]]` held back (the article's BADMAIL folder).
//!
//! One file per message, `SPOOL/quarantine/<ID>`, written like every durable thing in
//! the spool (`crate::durable::write`): temp file, fsync, rename, fsync the directory, so a 250 for a quarantined
//! message means it is on disk. Format: the line `postern-quarantine 1`, then `rule`,
//! `reason` and `time` lines, an empty line, and the MESSAGE record exactly as in a
//! segment (framed, CRC-checked), possibly followed by a DONE record: the mark that the
//! message was released or deleted and the file only awaits its removal. Release puts
//! the message back into the queue for its original recipients; delete removes the file.
//!
//! Trust: our own files; a file that does not verify is reported, never half-read.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::Path;

use super::durable::{self, sync_dir};
use super::record::{self, Decoded, FRAME_LEN};
use super::{Envelope, QUARANTINE_DIR, QueueId, SpoolError};

const HEADER: &str = "postern-quarantine 1\n";

/// A quarantined message's description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    pub envelope: Envelope,
    /// The filter that held it.
    pub rule: String,
    /// Why, in words.
    pub reason: String,
    /// When it was quarantined, Unix seconds.
    pub time: i64,
    /// Message size in bytes.
    pub size: u64,
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1000)
        .collect()
}

/// Stores a message in the quarantine, durably. Blocking.
pub fn put(
    spool_dir: &Path,
    envelope: &Envelope,
    message: &[u8],
    rule: &str,
    reason: &str,
) -> Result<(), SpoolError> {
    let dir = spool_dir.join(QUARANTINE_DIR);
    fs::create_dir_all(&dir).map_err(SpoolError::io("create directory", &dir))?;
    let mut bytes = format!(
        "{HEADER}rule {}\nreason {}\ntime {}\n\n",
        one_line(rule),
        one_line(reason),
        super::unix_now()
    )
    .into_bytes();
    bytes.extend(record::encode_message(envelope, message)?);
    // Never replace a file (`SPOOL_FILE`): a name already taken is an error, the client
    // gets 4xx and sends again, nothing is lost. A crash before the temporary name is
    // removed leaves `ID.tmp` as a second name of the same file; `clean` removes it at
    // the next open. 250 means on disk: the new name is durable before `Ok`.
    let path = dir.join(envelope.id.to_string());
    crate::durable::write(&path, &bytes, durable::SPOOL_FILE)?;
    Ok(())
}

/// Removes what a crash can leave in the quarantine directory (owner only, at open):
/// `ID.tmp` files (either the put never reached its rename, and the client got no 250, or
/// the crash came between link and unlink and `ID` holds the same file), and files marked
/// removed whose unlink did not happen or did not last (see `remove`).
pub(crate) fn clean(spool_dir: &Path) -> Result<(), SpoolError> {
    let dir = spool_dir.join(QUARANTINE_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(SpoolError::io("list", &dir)(e)),
    };
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(SpoolError::io("list", &dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let finished = name
            .parse::<QueueId>()
            .is_ok_and(|id| matches!(load_file(&entry.path(), id), Ok(None)));
        if finished || name.ends_with(".tmp") {
            removed |= fs::remove_file(entry.path()).is_ok();
        }
    }
    if removed {
        sync_dir(&dir)?;
    }
    Ok(())
}

/// Reads one quarantined message and its body. Blocking. A file marked finished
/// (released or deleted, see `remove`) reads as missing.
pub fn load(spool_dir: &Path, id: QueueId) -> Result<(Quarantined, Vec<u8>), SpoolError> {
    let path = spool_dir.join(QUARANTINE_DIR).join(id.to_string());
    load_file(&path, id)?.ok_or_else(|| {
        SpoolError::io("read", &path)(std::io::Error::new(
            ErrorKind::NotFound,
            "released or deleted from the quarantine",
        ))
    })
}

/// Reads one quarantine file; `None` if it is marked finished.
fn load_file(path: &Path, id: QueueId) -> Result<Option<(Quarantined, Vec<u8>)>, SpoolError> {
    let path = path.to_path_buf();
    let mut data = Vec::new();
    File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(SpoolError::io("read", &path))?;
    let corrupt = |reason: &str| SpoolError::Corrupt {
        path: path.clone(),
        offset: 0,
        reason: reason.to_string(),
    };
    let split = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .ok_or_else(|| corrupt("no header end"))?;
    let head = std::str::from_utf8(&data[..split]).map_err(|_| corrupt("header is not UTF-8"))?;
    let mut lines = head.lines();
    if lines.next() != Some(HEADER.trim_end()) {
        return Err(corrupt("not a quarantine file"));
    }
    let (mut rule, mut reason, mut time) = (String::new(), String::new(), 0);
    for line in lines {
        match line.split_once(' ') {
            Some(("rule", v)) => rule = v.to_string(),
            Some(("reason", v)) => reason = v.to_string(),
            Some(("time", v)) => time = v.parse().map_err(|_| corrupt("bad time"))?,
            _ => return Err(corrupt("unknown header line")),
        }
    }
    let rec = &data[split + 2..];
    let frame_bytes: &[u8; FRAME_LEN] = rec
        .get(..FRAME_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("truncated record"))?;
    let frame = record::parse_frame(frame_bytes).ok_or_else(|| corrupt("no record frame"))?;
    let payload = rec
        .get(FRAME_LEN..FRAME_LEN + frame.len as usize)
        .ok_or_else(|| corrupt("truncated record"))?;
    if crc32fast::hash(payload) != frame.crc {
        return Err(corrupt("CRC mismatch"));
    }
    let quarantined = match record::decode(frame.rtype, frame.version, payload) {
        Ok(Decoded::Message {
            envelope,
            body_start,
            size,
        }) => (
            Quarantined {
                envelope,
                rule,
                reason,
                time,
                size,
            },
            payload[body_start..].to_vec(),
        ),
        Ok(_) => return Err(corrupt("not a message record")),
        Err(e) => return Err(corrupt(&e)),
    };
    if quarantined.0.envelope.id != id {
        return Err(corrupt("file name and message id differ"));
    }
    let rest = &rec[FRAME_LEN + payload.len()..];
    Ok((!is_done_marker(rest, id)).then_some(quarantined))
}

/// Whether `rest` (what follows the MESSAGE record) starts with a whole, CRC-valid DONE
/// record for `id`. Anything else (nothing, or a marker torn by a crash) is not a mark.
fn is_done_marker(rest: &[u8], id: QueueId) -> bool {
    let Some(frame) = rest
        .get(..FRAME_LEN)
        .and_then(|b| <&[u8; FRAME_LEN]>::try_from(b).ok())
        .and_then(record::parse_frame)
    else {
        return false;
    };
    let Some(payload) = rest.get(FRAME_LEN..FRAME_LEN + frame.len as usize) else {
        return false;
    };
    crc32fast::hash(payload) == frame.crc
        && matches!(record::decode(frame.rtype, frame.version, payload), Ok(Decoded::Done(d)) if d == id)
}

/// Every quarantined message, oldest first; unreadable files are skipped with a warning.
pub fn list(spool_dir: &Path) -> Result<Vec<Quarantined>, SpoolError> {
    let dir = spool_dir.join(QUARANTINE_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SpoolError::io("list", &dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(SpoolError::io("list", &dir))?;
        let Ok(id) = entry.file_name().to_string_lossy().parse::<QueueId>() else {
            continue;
        };
        match load_file(&entry.path(), id) {
            Ok(Some((q, _))) => out.push(q),
            Ok(None) => {} // released or deleted; its file awaits removal
            Err(e) => tracing::warn!(error = %e, "unreadable quarantine file"),
        }
    }
    out.sort_by_key(|q| q.envelope.id);
    Ok(out)
}

/// Removes a quarantined message (after release, or on delete). Blocking.
///
/// The removal is made durable in the file first: a DONE record is appended and
/// fdatasync'd, then the file is unlinked and the directory fsync'd (retried). If that
/// fsync fails, the unlink may or may not survive a crash (POSIX leaves it unspecified);
/// a quarantine file that came back would be a released message that can be released, and
/// so sent, again. With the mark, whichever way the unlink lands the message reads as gone
/// (`load`, `list`) and the next open removes the file. So a failure after the mark is
/// logged, not an error. A missing file is an error (`NotFound`): nothing to remove.
pub fn remove(spool_dir: &Path, id: QueueId) -> Result<(), SpoolError> {
    let dir = spool_dir.join(QUARANTINE_DIR);
    let path = dir.join(id.to_string());
    // Only a readable, unmarked file is removed: an id not in the quarantine is an error.
    load(spool_dir, id)?;
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(SpoolError::io("open", &path))?;
    let before = file
        .metadata()
        .map_err(SpoolError::io("stat", &path))?
        .len();
    let marked = file
        .write_all(&record::encode_done(id)?)
        .and_then(|()| file.sync_data())
        .map_err(SpoolError::io("mark removed", &path));
    if marked.is_err() {
        // A torn mark is not a mark, but cut it off so that a later one is read.
        let _ = file.set_len(before).and_then(|()| file.sync_all());
        return marked;
    }
    drop(file);
    if let Err(e) = fs::remove_file(&path)
        && e.kind() != ErrorKind::NotFound
    {
        tracing::warn!(file = %path.display(), error = %e,
            "quarantine file not removed (it is marked removed); removed at next start");
        return Ok(());
    }
    if let Err(e) = durable::sync_dir_retrying(&dir) {
        tracing::warn!(file = %path.display(), error = %e,
            "removal of a quarantine file may not be durable; it is marked removed, so it cannot come back");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(id: u64) -> Envelope {
        Envelope {
            id: QueueId::from_u64(id),
            arrived: 1,
            client: "192.0.2.1:1".into(),
            helo: "h".into(),
            auth: None,
            sender: "a@b.test".into(),
            params: vec![],
            smtputf8: false,
            recipients: vec!["x@y.test".into()],
        }
    }

    #[test]
    fn put_list_load_remove() {
        let dir = tempfile::tempdir().unwrap();
        put(
            dir.path(),
            &env(7),
            b"Subject: s\r\n\r\nbody\r\n",
            "no-exe",
            "attachment \"a.exe\"",
        )
        .unwrap();
        put(dir.path(), &env(9), b"x\r\n", "kw", "keyword\nwith newline").unwrap();
        let all = list(dir.path()).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].rule, "no-exe");
        assert_eq!(all[1].reason, "keyword with newline");
        let (q, body) = load(dir.path(), QueueId::from_u64(7)).unwrap();
        assert_eq!(q.envelope, env(7));
        assert_eq!(body, b"Subject: s\r\n\r\nbody\r\n");
        remove(dir.path(), QueueId::from_u64(7)).unwrap();
        assert_eq!(list(dir.path()).unwrap().len(), 1);
        assert!(load(dir.path(), QueueId::from_u64(7)).is_err());
    }

    #[test]
    fn a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        put(dir.path(), &env(7), b"body\r\n", "r", "why").unwrap();
        let path = dir
            .path()
            .join(QUARANTINE_DIR)
            .join(QueueId::from_u64(7).to_string());
        let mut data = fs::read(&path).unwrap();
        let n = data.len();
        data[n - 2] ^= 0xff;
        fs::write(&path, data).unwrap();
        assert!(load(dir.path(), QueueId::from_u64(7)).is_err());
        assert!(list(dir.path()).unwrap().is_empty());
    }
}
