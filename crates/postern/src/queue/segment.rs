//! Segment files: naming, creation, and a reader that verifies every record.
//!
//! The reader trusts nothing in the file beyond what it checks: the header line, the
//! frame's magic, a payload length that fits in the file, and the payload's CRC-32. The
//! first record that fails a check ends the segment for the reader; what that means (a torn
//! tail or corruption) is decided by the caller, which knows whether this is the newest
//! segment.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, Read, Write};
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
pub(crate) fn create_segment(log_dir: &Path, seq: u64) -> Result<File, SpoolError> {
    let path = log_dir.join(segment_name(seq));
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(SpoolError::io("create segment", &path))?;
    let written = file
        .write_all(HEADER)
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

    pub(crate) fn path(&self) -> &Path {
        &self.path
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

/// Whether a complete, CRC-valid record of a known type starts anywhere after `from` in
/// the file. Used once at open on a bad spot in the newest segment: a crash can only leave
/// garbage after the last record (torn tail, safe to cut off); valid records after the bad
/// spot mean it is something else, and the file is left alone. Errs on the side of keeping
/// bytes: a false match only keeps a file that could have been trimmed.
pub(crate) fn valid_record_after(path: &Path, from: u64) -> Result<bool, SpoolError> {
    let mut data = Vec::new();
    let mut file = File::open(path).map_err(SpoolError::io("open segment", path))?;
    io::Seek::seek(&mut file, io::SeekFrom::Start(from + 1))
        .and_then(|_| file.read_to_end(&mut data))
        .map_err(SpoolError::io("read segment", path))?;
    let mut i = 0;
    while i + FRAME_LEN <= data.len() {
        if data[i..i + 2] == record::MAGIC
            && RecordType::from_u8(data[i + 2]).is_some()
            && data[i + 3] == FORMAT_VERSION
        {
            let head: &[u8; FRAME_LEN] = data[i..i + FRAME_LEN].try_into().expect("frame length");
            if let Some(frame) = record::parse_frame(head) {
                let start = i + FRAME_LEN;
                if let Some(payload) = data.get(start..start + frame.len as usize)
                    && crc32fast::hash(payload) == frame.crc
                {
                    return Ok(true);
                }
            }
        }
        i += 1;
    }
    Ok(false)
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
