//! The spool's file-system steps, on top of the crate's durable writes
//! (`crate::durable`, which also explains the no-replace rename): directory fsync as a
//! `SpoolError`, the options every whole spool file is written with ([`SPOOL_FILE`]:
//! never replacing), moving a file aside, and reading the ids in file names.

use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};

use crate::durable::{Mode, Options, Replace};
use crate::durable::{link_noreplace, same_file};

#[cfg(test)]
pub(crate) use crate::durable::fault;

use super::error::SpoolError;

/// How the spool writes a whole file (a deferred or a quarantined message): never over
/// an existing file (a queue-id clash must not overwrite another message), with the
/// umask's say over the mode, as for the segments.
pub(crate) const SPOOL_FILE: Options = Options {
    replace: Replace::No,
    mode: Mode::Umask(0o666),
};

impl From<crate::durable::Error> for SpoolError {
    fn from(e: crate::durable::Error) -> SpoolError {
        SpoolError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        }
    }
}

/// Makes the directory's entries durable (`crate::durable::sync_dir`).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    crate::durable::sync_dir(dir).map_err(SpoolError::io("fsync directory", dir))
}

/// `sync_dir`, retried (`crate::durable::sync_dir_retrying`): the fsync that follows a
/// name change of a message's file or a segment.
pub(crate) fn sync_dir_retrying(dir: &Path) -> Result<(), SpoolError> {
    crate::durable::sync_dir_retrying(dir).map_err(SpoolError::io("fsync directory", dir))
}

/// Moves `path` aside to `path` + `suffix` (or `suffix.2`, `suffix.3`, ... if that name
/// holds another file), never replacing anything, and returns the new name. If a previous
/// attempt was cut short between link and unlink (the aside name already holds this very
/// file), it is completed. An error from the final unlink is returned: the file then
/// still has its old name too, and the caller must not act as if it were gone.
pub(crate) fn set_aside(path: &Path, suffix: &str) -> io::Result<PathBuf> {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    let base = PathBuf::from(name);
    for n in 1..=100u32 {
        let aside = if n == 1 {
            base.clone()
        } else {
            let mut s = base.as_os_str().to_owned();
            s.push(format!(".{n}"));
            PathBuf::from(s)
        };
        match link_noreplace(path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                if !same_file(path, &aside) {
                    continue; // another file: try the next name
                }
            }
            Err(e) => return Err(e),
        }
        fs::remove_file(path)?;
        return Ok(aside);
    }
    Err(io::Error::new(
        ErrorKind::AlreadyExists,
        format!("no free name to set {} aside", path.display()),
    ))
}

/// The highest queue id in the names of the files in `dir` (`ID`, `ID.tmp`,
/// `ID.corrupt`, ...); 0 if none or the directory is missing. Used to seed the id
/// generator, so that a clock stepped back cannot hand out an id that still names a file.
pub(crate) fn max_id_in_names(dir: &Path) -> Result<u64, SpoolError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(SpoolError::io("list", dir)(e)),
    };
    let mut max = 0;
    for entry in entries {
        let entry = entry.map_err(SpoolError::io("list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let stem = name.split('.').next().unwrap_or(name);
        if let Ok(id) = stem.parse::<super::QueueId>() {
            max = max.max(id.as_u64());
        }
    }
    Ok(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_aside_picks_a_free_name_and_completes_an_interrupted_one() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("X");
        fs::write(&p, "first").unwrap();
        let aside = set_aside(&p, ".corrupt").unwrap();
        assert_eq!(aside, tmp.path().join("X.corrupt"));
        assert!(!p.exists());
        // A second file with the same name: set aside under another name.
        fs::write(&p, "second").unwrap();
        let aside2 = set_aside(&p, ".corrupt").unwrap();
        assert_eq!(aside2, tmp.path().join("X.corrupt.2"));
        assert_eq!(fs::read(&aside).unwrap(), b"first");
        assert_eq!(fs::read(&aside2).unwrap(), b"second");
        // A crash between link and unlink: both names on one inode; finishing it
        // only removes the old name.
        fs::write(&p, "third").unwrap();
        fs::hard_link(&p, tmp.path().join("X.corrupt.3")).unwrap();
        assert_eq!(
            set_aside(&p, ".corrupt").unwrap(),
            tmp.path().join("X.corrupt.3")
        );
        assert!(!p.exists());
        assert_eq!(fs::read(tmp.path().join("X.corrupt.3")).unwrap(), b"third");
    }

    #[test]
    fn max_id_in_names_reads_every_kind_of_name() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(max_id_in_names(&tmp.path().join("missing")).unwrap(), 0);
        for name in [
            "0000000000000010",
            "0000000000000030.corrupt",
            "0000000000000020.tmp",
            "notes",
        ] {
            fs::write(tmp.path().join(name), "").unwrap();
        }
        assert_eq!(max_id_in_names(tmp.path()).unwrap(), 0x30);
    }
}
