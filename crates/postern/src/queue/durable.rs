//! File-system steps shared by every part of the spool that creates, renames or removes
//! files: directory fsync (with a bounded retry), create-or-fail, and a rename that never
//! replaces an existing file.
//!
//! No-replace rename: `rename(2)` silently replaces its target (POSIX: "If the link named
//! by the new argument exists, it shall be removed and old renamed to new"), which is how
//! a queue-id clash used to overwrite another message's file. `link(2)` instead fails with
//! `EEXIST` when the new name exists (POSIX `link`: "[EEXIST] The path2 argument resolves to
//! an existing directory entry"), so a rename is done as `link(old, new)` then
//! `unlink(old)`. Chosen over Linux `renameat2(RENAME_NOREPLACE)` because it needs no new
//! dependency and no `unsafe`, works on every POSIX file system with hard links (tmpfs,
//! ext4, xfs, btrfs...; `renameat2` flags are refused by some, e.g. older NFS), and its
//! only intermediate state is easy to reason about: a crash between the two steps leaves
//! both names on the same inode, never two different contents and never neither. Each
//! caller documents why that state is harmless for it (a leftover `.tmp` name is removed
//! at open; a leftover source of a set-aside is recognised by its inode and finished).

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::error::SpoolError;

/// How many times a failed directory fsync is tried again before giving up.
const DIR_SYNC_RETRIES: u32 = 2;

/// Makes the directory's entries (created, renamed or removed files) durable: POSIX
/// `fsync` on the directory (Linux commits its entries; a new or removed name is not
/// durable before that).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SpoolError::io("fsync directory", dir))
}

/// `sync_dir`, tried again a couple of times when it fails (a transient error should not
/// leave a name change undurable). The caller still has to decide what a final failure
/// means: the name change may or may not survive a crash.
///
/// This is the fsync that follows a name change of a message's file or a segment, and the
/// one tests make fail (`fault`).
pub(crate) fn sync_dir_retrying(dir: &Path) -> Result<(), SpoolError> {
    let attempt = || {
        #[cfg(test)]
        if fault::take(dir) {
            return Err(SpoolError::io("fsync directory", dir)(io::Error::other(
                "injected test failure",
            )));
        }
        sync_dir(dir)
    };
    let mut result = attempt();
    for _ in 0..DIR_SYNC_RETRIES {
        if result.is_ok() {
            break;
        }
        result = attempt();
    }
    result
}

/// Creates a new file for writing; fails with `AlreadyExists` rather than truncate or
/// reuse an existing one (`O_CREAT | O_EXCL`).
pub(crate) fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

/// First step of a no-replace rename: gives `from`'s file the name `to` too. Fails with
/// `AlreadyExists` (nothing changed) if `to` exists. The caller then removes `from`.
pub(crate) fn link_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    fs::hard_link(from, to)
}

/// Whether two paths name the same file (same device and inode).
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
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

/// Test-only fault injection: make the next directory fsyncs of a given directory (through
/// `sync_dir_retrying`) fail, to check what the spool does when a name change may not be
/// durable.
#[cfg(test)]
pub(crate) mod fault {
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, PoisonError};

    static FAILING: Mutex<Vec<(PathBuf, u32)>> = Mutex::new(Vec::new());

    /// The next `count` fsyncs of `dir` fail (tests use their own temporary directories,
    /// so tests running in parallel do not see each other's faults).
    pub(crate) fn fail_dir_syncs(dir: &Path, count: u32) {
        let mut failing = FAILING.lock().unwrap_or_else(PoisonError::into_inner);
        failing.retain(|(d, _)| d != dir);
        failing.push((dir.to_path_buf(), count));
    }

    /// Stops injecting failures for `dir`.
    pub(crate) fn clear(dir: &Path) {
        let mut failing = FAILING.lock().unwrap_or_else(PoisonError::into_inner);
        failing.retain(|(d, _)| d != dir);
    }

    pub(super) fn take(dir: &Path) -> bool {
        let mut failing = FAILING.lock().unwrap_or_else(PoisonError::into_inner);
        match failing.iter_mut().find(|(d, _)| d == dir) {
            Some((_, n)) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_noreplace_never_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::write(&a, "new").unwrap();
        fs::write(&b, "old").unwrap();
        let e = link_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&b).unwrap(), b"old");
        assert!(create_new(&b).is_err());
        assert_eq!(fs::read(&b).unwrap(), b"old");
    }

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

    #[test]
    fn injected_dir_sync_failures_are_retried() {
        let tmp = tempfile::tempdir().unwrap();
        fault::fail_dir_syncs(tmp.path(), DIR_SYNC_RETRIES);
        assert!(sync_dir_retrying(tmp.path()).is_ok());
        fault::fail_dir_syncs(tmp.path(), DIR_SYNC_RETRIES + 1);
        assert!(sync_dir_retrying(tmp.path()).is_err());
        fault::clear(tmp.path());
        assert!(sync_dir(tmp.path()).is_ok());
    }
}
