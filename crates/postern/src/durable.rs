//! Durable whole-file writes: the one way Postern puts a file on disk so that a crash
//! leaves the old file or the new one, never a mix, and nothing is reported done ("250",
//! "user added") before it would survive a power cut.
//!
//! [`write`]: a temporary file in the same directory, created new with an explicit mode,
//! written, fsynced, given its final name, then the directory fsynced (POSIX: a new name
//! is not durable before that; retried a couple of times). On an error before the file
//! has its final name, the temporary file is removed. Used by the spool's deferred and
//! quarantine files (`queue/`, [`Replace::No`]), the users file (`auth/users.rs`) and the
//! self-signed certificate and key (`tls.rs`, both [`Replace::Yes`], mode 0600). The
//! spool's segments are appended to, not written whole; they use [`sync_dir`].
//!
//! No-replace rename: `rename(2)` silently replaces its target (POSIX: "If the link named
//! by the new argument exists, it shall be removed and old renamed to new"), which is how
//! a queue-id clash used to overwrite another message's file. `link(2)` instead fails with
//! `EEXIST` when the new name exists (POSIX `link`: "[EEXIST] The path2 argument resolves to
//! an existing directory entry"), so a rename is done as `link(old, new)` then
//! `unlink(old)`. Chosen over Linux `renameat2(RENAME_NOREPLACE)` because it needs no new
//! dependency and no raw system call of our own, works on every POSIX file system with
//! hard links (tmpfs, ext4, xfs, btrfs...; `renameat2` flags are refused by some, e.g.
//! older NFS), and its
//! only intermediate state is easy to reason about: a crash between the two steps leaves
//! both names on the same inode, never two different contents and never neither. Each
//! caller documents why that state is harmless for it (a leftover `.tmp` name is removed
//! at open; a leftover source of a set-aside is recognised by its inode and finished).
//!
//! Trust: the paths are ours (configuration or the spool); the contents are opaque.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How many times a failed directory fsync is tried again before giving up.
pub(crate) const DIR_SYNC_RETRIES: u32 = 2;

/// What [`write`] does when the final name already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replace {
    /// Replace it atomically (`rename(2)`): a reader sees the old file or the new one. A
    /// symbolic link at the name is followed: the file it points to is replaced, the link
    /// kept. The temporary file is `.NAME.tmpPID`, so two processes writing the same file
    /// never share one; a leftover of an earlier process with our pid is removed first.
    Yes,
    /// Never: the write fails with `AlreadyExists` and nothing changes (link + unlink, see
    /// the module header). The temporary file is `NAME.tmp`, created new as well (a
    /// leftover is an error too): removing leftovers is the caller's recovery (the
    /// spool's, at open), and until then a leftover name still holds the id it carries.
    No,
}

/// The permission bits of the file [`write`] creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Exactly these bits, whatever the umask.
    Exact(u32),
    /// These bits less the process umask, like any new file.
    Umask(u32),
}

impl Mode {
    /// Owner read and write only, exactly: for secrets (password hashes, private keys).
    pub const PRIVATE: Mode = Mode::Exact(0o600);
}

/// How [`write`] writes; both choices are the caller's, on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub replace: Replace,
    pub mode: Mode,
}

/// A failed durable write: the step, the file or directory it was applied to, the cause.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct Error {
    /// The step, e.g. "fsync" or "rename (no replace)".
    pub op: &'static str,
    /// The file or directory it was applied to.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: io::Error,
    /// The file already has its final name; only the directory fsync failed (after
    /// retries), so after a crash the name may or may not be there.
    pub named: bool,
}

fn failed(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error {
        op,
        path,
        source,
        named: false,
    }
}

/// Writes `contents` as the file `path`, durably (see the module header). Blocking.
///
/// `Ok`: the file and its name are on disk. `Err` with `named` false: nothing has the
/// final name (and no temporary file is left, unless removing it failed too). `Err` with
/// `named` true: the file has its name, but that name may not survive a crash.
pub fn write(path: &Path, contents: &[u8], options: Options) -> Result<(), Error> {
    let target = match options.replace {
        Replace::Yes => match fs::canonicalize(path) {
            Ok(real) => real,
            Err(e) if e.kind() == ErrorKind::NotFound => path.to_path_buf(),
            Err(e) => return Err(failed("resolve", path)(e)),
        },
        Replace::No => path.to_path_buf(),
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = target.file_name() else {
        return Err(failed("write", path)(io::Error::other(
            "the path has no file name",
        )));
    };
    let tmp = match options.replace {
        Replace::Yes => {
            let mut n = std::ffi::OsString::from(".");
            n.push(name);
            n.push(format!(".tmp{}", std::process::id()));
            let tmp = dir.join(n);
            // A leftover from a crashed run with the same pid is ours to replace.
            let _ = fs::remove_file(&tmp);
            tmp
        }
        Replace::No => {
            let mut n = name.to_owned();
            n.push(".tmp");
            dir.join(n)
        }
    };

    let mut file = create_new_with(&tmp, options.mode).map_err(failed("create", &tmp))?;
    let named = set_mode(&file, options.mode)
        .map_err(failed("set mode", &tmp))
        .and_then(|()| file.write_all(contents).map_err(failed("write", &tmp)))
        .and_then(|()| file.sync_all().map_err(failed("fsync", &tmp)))
        .and_then(|()| match options.replace {
            Replace::Yes => fs::rename(&tmp, &target).map_err(failed("rename", &target)),
            Replace::No => {
                link_noreplace(&tmp, &target).map_err(failed("rename (no replace)", &target))
            }
        });
    drop(file);
    if let Err(e) = named {
        // Nothing took the final name: the temporary file is ours and useless.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if options.replace == Replace::No
        && let Err(e) = fs::remove_file(&tmp)
    {
        // A crash here leaves `NAME.tmp` as a second name of the same file, which the
        // caller's recovery removes (only a name is dropped).
        tracing::warn!(file = %tmp.display(), error = %e,
            "could not remove the temporary name of a file; removed at next start");
    }
    sync_dir_retrying(&dir).map_err(|source| Error {
        op: "fsync directory",
        path: dir,
        source,
        named: true,
    })
}

/// Creates a new file for writing with `mode`; fails with `AlreadyExists` rather than
/// truncate or reuse an existing one (`O_CREAT | O_EXCL`).
fn create_new_with(path: &Path, mode: Mode) -> io::Result<File> {
    let bits = match mode {
        Mode::Exact(b) | Mode::Umask(b) => b,
    };
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(bits)
        .open(path)
}

/// The umask can only clear bits of the mode given at creation; setting it again makes an
/// `Exact` mode exact.
fn set_mode(file: &File, mode: Mode) -> io::Result<()> {
    match mode {
        Mode::Exact(bits) => file.set_permissions(fs::Permissions::from_mode(bits)),
        Mode::Umask(_) => Ok(()),
    }
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

/// Makes the directory's entries (created, renamed or removed files) durable: POSIX
/// `fsync` on the directory (Linux commits its entries; a new or removed name is not
/// durable before that).
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// `sync_dir`, tried again a couple of times when it fails (a transient error should not
/// leave a name change undurable). The caller still has to decide what a final failure
/// means: the name change may or may not survive a crash.
///
/// This is the fsync that follows a name change of a whole file (`write`) or of a spool
/// segment, and the one tests make fail (`fault`).
pub(crate) fn sync_dir_retrying(dir: &Path) -> io::Result<()> {
    let attempt = || {
        #[cfg(test)]
        if fault::take(dir) {
            return Err(io::Error::other("injected test failure"));
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

/// Test-only fault injection: make the next directory fsyncs of a given directory (through
/// `sync_dir_retrying`) fail, to check what a caller does when a name change may not be
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

    /// How many injected failures for `dir` are still to come.
    pub(crate) fn remaining(dir: &Path) -> u32 {
        let failing = FAILING.lock().unwrap_or_else(PoisonError::into_inner);
        failing
            .iter()
            .find(|(d, _)| d == dir)
            .map_or(0, |(_, n)| *n)
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

    const NO_REPLACE: Options = Options {
        replace: Replace::No,
        mode: Mode::Umask(0o666),
    };
    const REPLACE_PRIVATE: Options = Options {
        replace: Replace::Yes,
        mode: Mode::PRIVATE,
    };

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn link_noreplace_never_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::write(&a, "new").unwrap();
        fs::write(&b, "old").unwrap();
        let e = link_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&b).unwrap(), b"old");
        assert!(create_new_with(&b, Mode::Umask(0o666)).is_err());
        assert_eq!(fs::read(&b).unwrap(), b"old");
    }

    #[test]
    fn no_replace_keeps_the_existing_file_and_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("0000000000000001");
        write(&p, b"first", NO_REPLACE).unwrap();
        let e = write(&p, b"second", NO_REPLACE).unwrap_err();
        assert_eq!(e.source.kind(), ErrorKind::AlreadyExists);
        assert!(!e.named);
        assert_eq!(fs::read(&p).unwrap(), b"first");
        assert_eq!(names(tmp.path()), ["0000000000000001"]);
    }

    #[test]
    fn no_replace_refuses_a_leftover_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("X");
        fs::write(tmp.path().join("X.tmp"), "leftover").unwrap();
        let e = write(&p, b"new", NO_REPLACE).unwrap_err();
        assert_eq!(e.op, "create");
        assert!(!p.exists());
        // The leftover is the caller's to remove.
        assert_eq!(fs::read(tmp.path().join("X.tmp")).unwrap(), b"leftover");
    }

    #[test]
    fn replace_is_atomic_exact_mode_and_follows_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("users");
        fs::write(&real, "old").unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write(&link, b"new", REPLACE_PRIVATE).unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&real).unwrap(), b"new");
        assert_eq!(
            fs::metadata(&real).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(names(tmp.path()), ["link", "users"]);
    }

    #[test]
    fn a_failed_write_removes_its_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        // A directory at the final name: the rename fails after the temp file was made.
        let p = tmp.path().join("key.pem");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("inside"), "x").unwrap();
        let e = write(&p, b"secret", REPLACE_PRIVATE).unwrap_err();
        assert_eq!(e.op, "rename");
        assert!(!e.named);
        assert_eq!(names(tmp.path()), ["key.pem"]);
    }

    #[test]
    fn a_failed_directory_fsync_is_reported_as_named() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("Y");
        fault::fail_dir_syncs(tmp.path(), DIR_SYNC_RETRIES + 1);
        let e = write(&p, b"y", NO_REPLACE).unwrap_err();
        fault::clear(tmp.path());
        assert!(e.named);
        assert_eq!(e.op, "fsync directory");
        assert_eq!(fs::read(&p).unwrap(), b"y");
        assert_eq!(names(tmp.path()), ["Y"]);
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
