//! Segment files: naming, creation, and a reader that verifies every record.
//!
//! The reader trusts nothing in the file beyond what it checks: the header line, the
//! frame's magic, a payload length that fits in the file, and the payload's CRC-32. A
//! record that fails a check stops the reader; the caller can then resynchronise on the
//! next whole record with a valid CRC (`SegmentReader::resync`). What a bad spot with
//! nothing valid after it means (a torn tail or corruption) is decided by the caller,
//! which knows whether this is the newest segment.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub(crate) use super::durable::sync_dir;
use super::error::SpoolError;
use super::record::{self, FORMAT_VERSION, FRAME_LEN, RecordType};

/// First bytes of every segment file.
pub(crate) const HEADER: &[u8] = b"postern-segment 1\n";

/// `0000000000000042.seg`.
pub(crate) fn segment_name(seq: u64) -> String {
    format!("{seq:016}.seg")
}

/// The sequence number of a segment file name, or `None` for any other file.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments in `log_dir`, oldest first. Other files are ignored.
pub(crate) fn list_segments(log_dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut seqs = Vec::new();
    for entry in fs::read_dir(log_dir).map_err(SpoolError::io("read directory", log_dir))? {
        let entry = entry.map_err(SpoolError::io("read directory", log_dir))?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Creates segment `seq`: new file, header, fsync the file, fsync the directory. A file
/// left half-made by a failure is removed (best effort).
/// `first` is written right after the header, in the same write and sync (the FLOOR
/// record).
pub(crate) fn create_segment(log_dir: &Path, seq: u64, first: &[u8]) -> Result<File, SpoolError> {
    let path = log_dir.join(segment_name(seq));
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(SpoolError::io("create segment", &path))?;
    let written = file
        .write_all(&[HEADER, first].concat())
        .and_then(|()| file.sync_all())
        .map_err(SpoolError::io("write segment header", &path))
        .and_then(|()| sync_dir(log_dir));
    if let Err(e) = written {
        drop(file);
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(file)
}

/// What the start of a segment file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeaderState {
    Good,
    /// Shorter than the header but a prefix of it (a crash while creating the segment).
    Torn,
    Bad,
}

/// One step of reading a segment.
pub(crate) enum Item<'a> {
    /// A record whose frame and CRC check out; the payload is not decoded yet.
    Record {
        offset: u64,
        rtype: u8,
        version: u8,
        payload: &'a [u8],
    },
    /// Clean end of file.
    End,
    /// The bytes at `offset` are not a valid record; reading stops here.
    Bad { offset: u64, reason: String },
}

/// Reads the records of one segment in order.
pub(crate) struct SegmentReader {
    path: PathBuf,
    reader: BufReader<File>,
    /// Offset of the next unread byte.
    pos: u64,
    /// File length when opened; bytes appended later are not read.
    len: u64,
    payload: Vec<u8>,
    stopped: bool,
}

impl SegmentReader {
    /// Opens a segment; `None` if it no longer exists (deleted by the server's GC while a
    /// read-only scan was listing the directory).
    pub(crate) fn open(path: &Path) -> Result<Option<SegmentReader>, SpoolError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SpoolError::io("open segment", path)(e)),
        };
        let len = file
            .metadata()
            .map_err(SpoolError::io("stat segment", path))?
            .len();
        Ok(Some(SegmentReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, file),
            pos: 0,
            len,
            payload: Vec::new(),
            stopped: false,
        }))
    }

    /// File length when opened.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Offset just past the last good record read so far.
    pub(crate) fn valid_end(&self) -> u64 {
        self.pos
    }

    /// Reads and checks the header line. Call once, first.
    pub(crate) fn read_header(&mut self) -> Result<HeaderState, SpoolError> {
        let want = HEADER.len().min(self.len as usize);
        let mut buf = vec![0; want];
        self.read_exact(&mut buf)?;
        if buf != HEADER[..want] {
            self.stopped = true;
            return Ok(HeaderState::Bad);
        }
        if want < HEADER.len() {
            self.stopped = true;
            return Ok(HeaderState::Torn);
        }
        self.pos = HEADER.len() as u64;
        Ok(HeaderState::Good)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), SpoolError> {
        self.reader
            .read_exact(buf)
            .map_err(SpoolError::io("read segment", &self.path))
    }

    fn stop(&mut self, offset: u64, reason: String) -> Item<'static> {
        self.stopped = true;
        Item::Bad { offset, reason }
    }

    /// A read error in the middle of a record. The file can only shrink under a read-only
    /// scan (the server trimming a torn tail at startup): that ends the segment like a
    /// torn record. Any other error is an I/O error.
    fn read_failed(&mut self, offset: u64, e: io::Error) -> Result<Item<'static>, SpoolError> {
        if e.kind() == ErrorKind::UnexpectedEof {
            return Ok(self.stop(offset, "file shrank while being read".into()));
        }
        Err(SpoolError::io("read segment", &self.path)(e))
    }

    /// After `Item::Bad` at `offset`: finds the next offset where a whole record with a
    /// valid CRC starts (see `find_next_record`) and goes on reading from there. Returns
    /// that offset, or `None` if nothing valid follows (the reader stays stopped).
    pub(crate) fn resync(&mut self, offset: u64) -> Result<Option<u64>, SpoolError> {
        let found = find_next_record(self.reader.get_ref(), offset + 1, self.len)
            .map_err(SpoolError::io("read segment", &self.path))?;
        if let Some(next) = found {
            self.reader
                .seek(SeekFrom::Start(next))
                .map_err(SpoolError::io("read segment", &self.path))?;
            self.pos = next;
            self.stopped = false;
        }
        Ok(found)
    }

    /// The next record, the clean end, or the first bad spot.
    pub(crate) fn next_item(&mut self) -> Result<Item<'_>, SpoolError> {
        if self.stopped || self.pos == self.len {
            return Ok(Item::End);
        }
        let offset = self.pos;
        let remaining = self.len - offset;
        if remaining < FRAME_LEN as u64 {
            return Ok(self.stop(
                offset,
                format!("{remaining} bytes left, too few for a record frame"),
            ));
        }
        let mut head = [0; FRAME_LEN];
        if let Err(e) = self.reader.read_exact(&mut head) {
            return self.read_failed(offset, e);
        }
        let Some(frame) = record::parse_frame(&head) else {
            return Ok(self.stop(offset, "no record frame (magic \"PR\" missing)".into()));
        };
        if u64::from(frame.len) > remaining - FRAME_LEN as u64 {
            return Ok(self.stop(
                offset,
                format!(
                    "payload length {} runs past the end of the file ({} bytes left)",
                    frame.len,
                    remaining - FRAME_LEN as u64
                ),
            ));
        }
        // The allocation is bounded by the file's real size (checked just above).
        self.payload.clear();
        self.payload.resize(frame.len as usize, 0);
        if let Err(e) = self.reader.read_exact(&mut self.payload) {
            return self.read_failed(offset, e);
        }
        if crc32fast::hash(&self.payload) != frame.crc {
            return Ok(self.stop(offset, "payload CRC mismatch".into()));
        }
        self.pos = offset + FRAME_LEN as u64 + u64::from(frame.len);
        Ok(Item::Record {
            offset,
            rtype: frame.rtype,
            version: frame.version,
            payload: &self.payload,
        })
    }
}

/// Bytes of a payload checked before its CRC: every record payload (MESSAGE, RCPT, DONE,
/// MOVED) starts with the line `id XXXXXXXXXXXXXXXX\n`.
const ID_LINE_LEN: usize = 20;
/// How much of the file a resynchronisation scan reads at a time.
const SCAN_CHUNK: usize = 1 << 20;

/// Whether `b` (at least `FRAME_LEN + ID_LINE_LEN` bytes) starts like a record whose
/// payload fits in `room` bytes: the cheap checks done before a CRC.
fn plausible_record(b: &[u8], room: u64) -> Option<record::Frame> {
    let head: &[u8; FRAME_LEN] = b.get(..FRAME_LEN)?.try_into().ok()?;
    let frame = record::parse_frame(head)?;
    RecordType::from_u8(frame.rtype)?;
    if frame.version != FORMAT_VERSION
        || (frame.len as usize) < ID_LINE_LEN
        || u64::from(frame.len) > room
    {
        return None;
    }
    let id_line = b.get(FRAME_LEN..FRAME_LEN + ID_LINE_LEN)?;
    let ok = id_line.starts_with(b"id ")
        && id_line[3..19].iter().all(u8::is_ascii_hexdigit)
        && id_line[19] == b'\n';
    ok.then_some(frame)
}

/// CRC-32 of `len` bytes of `file` at `offset`, read in bounded pieces.
fn crc_at(file: &File, mut offset: u64, len: u32) -> io::Result<u32> {
    let mut hasher = crc32fast::Hasher::new();
    let mut left = len as usize;
    let mut buf = vec![0; left.min(64 * 1024)];
    while left > 0 {
        let n = left.min(buf.len());
        file.read_exact_at(&mut buf[..n], offset)?;
        hasher.update(&buf[..n]);
        offset += n as u64;
        left -= n;
    }
    Ok(hasher.finalize())
}

/// The first offset in `from..end` where a whole record with a valid CRC starts, if any:
/// where replay resynchronises after a bad record.
///
/// A candidate must have the magic, a known type, version 1, a length that fits before
/// `end`, a payload starting with an `id` line, and then a matching CRC. Could a frame be
/// forged inside a message body (which is attacker-controlled) and be taken for a record
/// here? No: every payload's `id` line ends in a bare LF, and Postern never stores a
/// message holding a bare LF (RFC 5321 2.3.8 and 4.1.1.4: lines end in CRLF; the session
/// refuses bare CR/LF, see `postern-smtp` data.rs), nor an envelope field with one.
///
/// Work: one pass over the bytes (memchr for the magic), a CRC only for candidates that
/// pass the cheap checks (in practice only real records), so linear in the segment size.
pub(crate) fn find_next_record(file: &File, from: u64, end: u64) -> io::Result<Option<u64>> {
    let need = (FRAME_LEN + ID_LINE_LEN) as u64;
    let overlap = need as usize - 1;
    let mut buf = vec![0; SCAN_CHUNK + overlap];
    let mut base = from;
    while base + need <= end {
        let want = ((end - base) as usize).min(buf.len());
        let chunk = &mut buf[..want];
        file.read_exact_at(chunk, base)?;
        // Candidates start in the first `SCAN_CHUNK` bytes (the rest is overlap, so that a
        // candidate's first `need` bytes are always in the buffer).
        for i in memchr::memmem::find_iter(chunk, &record::MAGIC) {
            if i >= SCAN_CHUNK {
                break;
            }
            let at = base + i as u64;
            if at + need > end {
                return Ok(None);
            }
            let room = end - at - FRAME_LEN as u64;
            if let Some(frame) = plausible_record(&chunk[i..], room)
                && crc_at(file, at + FRAME_LEN as u64, frame.len)? == frame.crc
            {
                return Ok(Some(at));
            }
        }
        base += SCAN_CHUNK as u64;
    }
    Ok(None)
}

/// Cuts a segment back to `len` bytes and syncs it (a torn tail found at startup).
pub(crate) fn trim_segment(path: &Path, len: u64) -> Result<(), SpoolError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(SpoolError::io("open segment", path))?;
    file.set_len(len)
        .and_then(|()| file.sync_all())
        .map_err(SpoolError::io("trim segment", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(rtype: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = record::MAGIC.to_vec();
        v.extend([rtype, FORMAT_VERSION]);
        v.extend((payload.len() as u32).to_le_bytes());
        v.extend(crc32fast::hash(payload).to_le_bytes());
        v.extend(payload);
        v
    }

    fn find(bytes: &[u8], from: u64) -> Option<u64> {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("seg");
        fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        find_next_record(&file, from, bytes.len() as u64).unwrap()
    }

    #[test]
    fn resync_finds_the_next_valid_record_only() {
        let done = frame(3, b"id 0187F3A2B4C5D6E7\n");
        // A frame as a message body could hold one: CRLF line ends. Never taken.
        let forged = frame(3, b"id 0187F3A2B4C5D6E7\r\n");
        let mut bad_crc = done.clone();
        bad_crc[8] ^= 1;
        let mut bytes = b"PRPR garbage PR\x03\x01".to_vec();
        bytes.extend(&forged);
        bytes.extend(&bad_crc);
        let at = bytes.len() as u64;
        bytes.extend(&done);
        assert_eq!(find(&bytes, 0), Some(at));
        assert_eq!(find(&bytes, at), Some(at));
        assert_eq!(find(&bytes, at + 1), None);
        // A whole record cut short is not a record.
        assert_eq!(find(&bytes[..bytes.len() - 1], 0), None);
        assert_eq!(find(b"", 0), None);
    }

    #[test]
    fn resync_finds_a_record_across_a_scan_chunk_boundary() {
        let done = frame(4, b"id 0187F3A2B4C5D6E7\n");
        for start in [SCAN_CHUNK - 13, SCAN_CHUNK - 1, SCAN_CHUNK, SCAN_CHUNK + 7] {
            let mut bytes = vec![b'P'; start];
            bytes.extend(&done);
            assert_eq!(find(&bytes, 0), Some(start as u64), "record at {start}");
        }
    }
}
