//! The spool's error type.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong while opening, writing or reading the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Another process (or another open `Spool` in this one) holds `SPOOL/lock`.
    #[error("spool lock {} is held by another process ({holder}); is another postern running on this spool?", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// What the lock file says about its holder ("pid 1234"), or "unknown".
        holder: String,
    },
    /// A file-system operation on the spool failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The operation, e.g. "fdatasync" or "create segment".
        op: &'static str,
        /// The file or directory it was applied to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Bytes read back from the spool do not verify (frame, checksum or envelope).
    #[error("corrupt spool record in {} at offset {offset}: {reason}", path.display())]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the record in that file.
        offset: u64,
        /// What did not check out.
        reason: String,
    },
    /// A record could not be encoded: a field holds CR or LF, or the message is too large.
    #[error("cannot encode spool record: {0}")]
    Encode(String),
    /// The message is not live where the request said (finished or moved meanwhile).
    #[error("message {0} is no longer live there")]
    NotLive(super::QueueId),
    /// The spool was closed; it accepts no more records.
    #[error("spool is closed")]
    Closed,
}

impl SpoolError {
    /// Builds a `map_err` adapter for an I/O failure of `op` on `path`.
    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
        let path = path.to_path_buf();
        move |source| SpoolError::Io { op, path, source }
    }

    /// A copy of this error for another waiter of the same failed batch
    /// (`io::Error` is not `Clone`: the copy keeps the kind and the message).
    pub(crate) fn duplicate(&self) -> SpoolError {
        match self {
            SpoolError::Locked { path, holder } => SpoolError::Locked {
                path: path.clone(),
                holder: holder.clone(),
            },
            SpoolError::Io { op, path, source } => SpoolError::Io {
                op,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            SpoolError::Corrupt {
                path,
                offset,
                reason,
            } => SpoolError::Corrupt {
                path: path.clone(),
                offset: *offset,
                reason: reason.clone(),
            },
            SpoolError::Encode(reason) => SpoolError::Encode(reason.clone()),
            SpoolError::NotLive(id) => SpoolError::NotLive(*id),
            SpoolError::Closed => SpoolError::Closed,
        }
    }
}
