//! Privileges: `postern serve` starts as root to bind port 25, open the spool and read
//! private keys, then gives root up for `user` (interface: "Operations").
//!
//! Two steps, both called from `serve`:
//! - [`plan`], before anything is opened: resolve `user` and `group`, and refuse to run
//!   as root with a listener reachable from other hosts unless `allow_root = true` (a
//!   relay parses hostile input all day; a bug in it must not be a root shell);
//! - [`Plan::apply`], once everything that needs root is open: hand the spool to the
//!   user (chown), then setgroups(2), setgid(2), setuid(2), in that order (each later
//!   one takes away the right to make the earlier ones), and check the result.
//!
//! Trust: the configuration names the user; the user database (NSS) is the system's and
//! trusted. What is not trusted is that the drop worked: afterwards, as Postfix does
//! (`src/util/set_ugid.c`), we check that the real, effective and saved ids are the
//! user's and that `setuid(0)` fails. Nor is the spool trusted while root walks it: the
//! user owns it and could have planted symbolic links or hard links to files elsewhere,
//! so the walk goes by descriptors, never follows a link, and leaves alone any file that
//! has a second hard link (see [`hand_over`]).
//!
//! Threads: the tokio runtime is already running when we drop. The raw system calls
//! change one thread only, but glibc's and musl's `setuid`, `setgid` and `setgroups`
//! wrappers change every thread of the process, as POSIX requires (setuid(2), "C
//! library/kernel differences"; nptl(7)); `nix` calls those wrappers.

use std::ffi::{CStr, CString};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};
use nix::unistd::{
    Gid, Group, Uid, User, fchown, fchownat, getegid, geteuid, getgid, getgrouplist, getgroups,
    getresgid, getresuid, getuid, setgid, setgroups, setuid,
};

use crate::config::Config;

/// What [`plan`] found: whom we will run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Keep the credentials we were started with (not root, or `user` is who we are
    /// already, or root on loopback only / with `allow_root`).
    Stay,
    /// We are root now; after start, this account.
    Drop(Account),
}

/// The account to run as, resolved from the user database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups: the user's groups (as `initgroups(3)` would set them), with
    /// `gid` among them.
    pub groups: Vec<Gid>,
}

/// Why `serve` will not start, or could not drop root.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// `user` names no account.
    #[error("user `{0}` (key `user`) does not exist on this system")]
    UnknownUser(String),
    /// `group` names no group.
    #[error("group `{0}` (key `group`) does not exist on this system")]
    UnknownGroup(String),
    /// The user database could not be read.
    #[error("cannot look up {what} `{name}`: {error}")]
    Lookup {
        what: &'static str,
        name: String,
        error: nix::Error,
    },
    /// Root, a listener off loopback, no `user`, no `allow_root`.
    #[error(
        "refusing to run as root with a listener reachable from other hosts ({address}): \
         set user = \"postern\" (an unprivileged account to run as once the listeners are \
         bound), or allow_root = true"
    )]
    Root { address: SocketAddr },
    /// `user` is root itself (uid 0), with a listener off loopback.
    #[error(
        "user `{user}` is root (uid 0), and a listener is reachable from other hosts \
         ({address}): name an unprivileged account"
    )]
    UserIsRoot { user: String, address: SocketAddr },
    /// Only root can become another user.
    #[error(
        "running as user `{user}` needs Postern to be started as root (it runs as uid \
         {uid}); start it as root, or as `{user}` itself, or remove the key `user`"
    )]
    NeedsRoot { user: String, uid: u32 },
    /// We are `user` already, but `group` is not our group.
    #[error(
        "changing the group to `{group}` needs Postern to be started as root (it runs as \
         user `{user}` with gid {gid})"
    )]
    GroupNeedsRoot {
        user: String,
        group: String,
        gid: u32,
    },
    /// The spool, about to be opened as root, holds what a spool never does: a link
    /// (which root would follow), a hard-linked file, or an entry that is not Postern's.
    #[error(
        "refusing to open the spool as root: {path}: {why} (remove it; a spool holds only \
         lock, log/, deferred/, quarantine/, tls/ and control.sock)"
    )]
    UnsafeSpool { path: PathBuf, why: String },
    /// Handing the spool to the user failed.
    #[error("cannot hand the spool to user `{user}`: {path}: {error}")]
    Chown {
        user: String,
        path: PathBuf,
        error: nix::Error,
    },
    /// setgroups, setgid or setuid failed.
    #[error("cannot drop privileges to user `{user}`: {step}: {error}")]
    Drop {
        user: String,
        step: &'static str,
        error: nix::Error,
    },
    /// The drop seemed to work but did not.
    #[error("privileges not dropped to user `{user}` as they should be: {what}")]
    Verify { user: String, what: String },
    /// After the drop the user cannot reach the spool.
    #[error(
        "after dropping to user `{user}`, the spool {path} is out of its reach ({error}): \
         every directory above it must be searchable (x) by that user"
    )]
    SpoolUnreachable {
        user: String,
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Decides whom `serve` runs as, before anything is opened. Errors are start-up refusals
/// (and `check-config` reports them too).
pub fn plan(config: &Config) -> Result<Plan, PrivilegeError> {
    let p = &config.privileges;
    let account = match &p.user {
        Some(user) => Some(lookup(user, p.group.as_deref())?),
        None => None,
    };
    decide(
        geteuid(),
        getegid(),
        account,
        p.group.as_deref(),
        p.allow_root,
        config.off_loopback(),
    )
}

/// The decision itself, without the system: who we are, whom the file names, and the
/// first listener off loopback.
fn decide(
    euid: Uid,
    egid: Gid,
    account: Option<Account>,
    group: Option<&str>,
    allow_root: bool,
    off_loopback: Option<SocketAddr>,
) -> Result<Plan, PrivilegeError> {
    let Some(account) = account else {
        return match off_loopback {
            Some(address) if euid.is_root() && !allow_root => Err(PrivilegeError::Root { address }),
            _ => Ok(Plan::Stay),
        };
    };
    if account.uid == euid {
        // Already the user: nothing to drop (root naming root is "staying root").
        if account.uid.is_root() {
            return match off_loopback {
                Some(address) => Err(PrivilegeError::UserIsRoot {
                    user: account.name,
                    address,
                }),
                None => Ok(Plan::Stay),
            };
        }
        return match group {
            Some(group) if account.gid != egid => Err(PrivilegeError::GroupNeedsRoot {
                user: account.name,
                group: group.to_string(),
                gid: egid.as_raw(),
            }),
            _ => Ok(Plan::Stay),
        };
    }
    if !euid.is_root() {
        return Err(PrivilegeError::NeedsRoot {
            user: account.name,
            uid: euid.as_raw(),
        });
    }
    Ok(Plan::Drop(account))
}

/// Resolves `user` (and `group`, else the user's primary group) and its groups.
fn lookup(user: &str, group: Option<&str>) -> Result<Account, PrivilegeError> {
    fn failed(what: &'static str, name: &str) -> impl FnOnce(nix::Error) -> PrivilegeError {
        let name = name.to_string();
        move |error| PrivilegeError::Lookup { what, name, error }
    }
    let entry = User::from_name(user)
        .map_err(failed("user", user))?
        .ok_or_else(|| PrivilegeError::UnknownUser(user.to_string()))?;
    let gid = match group {
        Some(name) => {
            Group::from_name(name)
                .map_err(failed("group", name))?
                .ok_or_else(|| PrivilegeError::UnknownGroup(name.to_string()))?
                .gid
        }
        None => entry.gid,
    };
    // The configuration's names hold no NUL (validated), so this cannot fail; if it
    // did, the name could not be in the database either.
    let c_name = CString::new(user).map_err(|_| PrivilegeError::UnknownUser(user.into()))?;
    let mut groups = getgrouplist(&c_name, gid).map_err(failed("the groups of user", user))?;
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }
    Ok(Account {
        name: entry.name,
        uid: entry.uid,
        gid,
        groups,
    })
}

impl Plan {
    /// Carries the plan out: with [`Plan::Drop`], hands `spool_dir` (and everything in
    /// it: queue, quarantine, control socket, self-signed key) to the account, drops to
    /// it, and checks that the drop holds and that the spool is still reachable.
    pub fn apply(&self, spool_dir: &Path) -> Result<(), PrivilegeError> {
        let Plan::Drop(account) = self else {
            return Ok(());
        };
        hand_over_spool(spool_dir, account)?;
        let step = |step| {
            move |error| PrivilegeError::Drop {
                user: account.name.clone(),
                step,
                error,
            }
        };
        // setgroups(2) and setgid(2) need root: they come before setuid(2).
        setgroups(&account.groups).map_err(step("setgroups"))?;
        setgid(account.gid).map_err(step("setgid"))?;
        setuid(account.uid).map_err(step("setuid"))?;
        verify(account)?;
        std::fs::read_dir(spool_dir).map_err(|error| PrivilegeError::SpoolUnreachable {
            user: account.name.clone(),
            path: spool_dir.to_path_buf(),
            error,
        })?;
        tracing::info!(user = %account.name, uid = account.uid.as_raw(),
            gid = account.gid.as_raw(), "privileges dropped");
        Ok(())
    }
}

/// Postfix's paranoia (`set_ugid.c`): the ids are what we asked for, and root cannot be
/// taken back. setuid(2) by root sets the real, effective and saved user id alike, so
/// `setuid(0)` must now fail with EPERM.
fn verify(account: &Account) -> Result<(), PrivilegeError> {
    let fail = |what: String| {
        Err(PrivilegeError::Verify {
            user: account.name.clone(),
            what,
        })
    };
    let (uid, gid) = (account.uid, account.gid);
    if getuid() != uid || geteuid() != uid {
        return fail(format!(
            "uid {} euid {}, expected {uid}",
            getuid(),
            geteuid()
        ));
    }
    match getresuid() {
        Ok(r) if r.saved == uid => {}
        Ok(r) => return fail(format!("saved uid {}, expected {uid}", r.saved)),
        Err(e) => return fail(format!("getresuid: {e}")),
    }
    if getgid() != gid || getegid() != gid {
        return fail(format!(
            "gid {} egid {}, expected {gid}",
            getgid(),
            getegid()
        ));
    }
    match getresgid() {
        Ok(r) if r.saved == gid => {}
        Ok(r) => return fail(format!("saved gid {}, expected {gid}", r.saved)),
        Err(e) => return fail(format!("getresgid: {e}")),
    }
    match getgroups() {
        Ok(now) if now.iter().all(|g| account.groups.contains(g)) => {}
        Ok(now) => return fail(format!("supplementary groups {now:?}")),
        Err(e) => return fail(format!("getgroups: {e}")),
    }
    if !uid.is_root() && setuid(Uid::from_raw(0)).is_ok() {
        return fail("setuid(0) succeeded: root could be taken back".to_string());
    }
    Ok(())
}

/// What a spool holds at its top (queue/mod.rs, tls.rs, control.rs); nothing else is
/// handed over, and a root start refuses a spool with anything else in it.
const SPOOL_ENTRIES: &[&str] = &[
    "lock",
    "log",
    "deferred",
    "quarantine",
    "tls",
    "control.sock",
];

impl Plan {
    /// Before the spool is opened as root (the contract: bind and open the spool as
    /// root, then drop) and the user it will belong to has had it: root must not follow
    /// what that user may have planted (a `lock` linked to /etc/shadow would be
    /// truncated and written). With [`Plan::Drop`], every entry is checked without
    /// following links: only the spool's own names at the top, only directories and
    /// regular files (and the control socket) below, no symbolic links, no regular file
    /// with a second hard link. A process of that user still running could swap an
    /// entry between this check and the open: the shipped unit (ProtectSystem=strict,
    /// only the spool writable) bounds what root could then be made to write.
    pub fn check_spool(&self, spool_dir: &Path) -> Result<(), PrivilegeError> {
        if !matches!(self, Plan::Drop(_)) {
            return Ok(());
        }
        let unsafe_at = |path: &Path, why: &str| PrivilegeError::UnsafeSpool {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        let top = match std::fs::read_dir(spool_dir) {
            Ok(t) => t,
            // Not made yet: Spool::open makes it, as root, empty.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(unsafe_at(spool_dir, &e.to_string())),
        };
        for entry in top {
            let entry = entry.map_err(|e| unsafe_at(spool_dir, &e.to_string()))?;
            let name = entry.file_name();
            if !SPOOL_ENTRIES
                .iter()
                .any(|n| name.as_bytes() == n.as_bytes())
            {
                return Err(unsafe_at(&entry.path(), "not part of a Postern spool"));
            }
            check_entry(&entry.path(), 0)?;
        }
        Ok(())
    }
}

/// One entry of the spool and what is below it, links not followed.
fn check_entry(path: &Path, depth: usize) -> Result<(), PrivilegeError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let unsafe_at = |why: String| PrivilegeError::UnsafeSpool {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::symlink_metadata(path).map_err(|e| unsafe_at(e.to_string()))?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(unsafe_at("a symbolic link".to_string()));
    }
    if kind.is_file() {
        if meta.nlink() > 1 {
            return Err(unsafe_at(format!(
                "a file with {} hard links",
                meta.nlink()
            )));
        }
        return Ok(());
    }
    if kind.is_socket() && path.file_name().is_some_and(|n| n == "control.sock") {
        return Ok(());
    }
    if !kind.is_dir() {
        return Err(unsafe_at("neither a file nor a directory".to_string()));
    }
    if depth >= 2 {
        return Err(unsafe_at(
            "a directory nested deeper than a spool's".to_string(),
        ));
    }
    for entry in std::fs::read_dir(path).map_err(|e| unsafe_at(e.to_string()))? {
        let entry = entry.map_err(|e| unsafe_at(e.to_string()))?;
        check_entry(&entry.path(), depth + 1)?;
    }
    Ok(())
}

/// Directories nested deeper than this inside the spool are left alone (the spool is
/// two levels deep; this only bounds the walk).
const MAX_DEPTH: usize = 16;

/// Makes the account the owner of `spool_dir` and of everything in it.
fn hand_over_spool(spool_dir: &Path, account: &Account) -> Result<(), PrivilegeError> {
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |error| PrivilegeError::Chown {
            user: account.name.clone(),
            path,
            error,
        }
    };
    // The spool directory itself is the configured path, followed if it is a link.
    let dir = Dir::open(
        spool_dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(fail(spool_dir))?;
    let st = fstat(dir.as_fd()).map_err(fail(spool_dir))?;
    if st.st_uid != account.uid.as_raw() || st.st_gid != account.gid.as_raw() {
        fchown(dir.as_fd(), Some(account.uid), Some(account.gid)).map_err(fail(spool_dir))?;
    }
    let changed =
        hand_over(dir, spool_dir, account, 0, true).map_err(|(path, e)| fail(&path)(e))?;
    if changed > 0 {
        tracing::info!(spool = %spool_dir.display(), files = changed, user = %account.name,
            "spool handed to the user");
    }
    Ok(())
}

/// Hands the entries of `dir` (at `path`, for messages) to the account, recursively;
/// returns how many changed owner. By descriptor throughout: each entry is opened with
/// `O_PATH | O_NOFOLLOW` and changed through that descriptor (fchownat(2) with
/// `AT_EMPTY_PATH`), so swapping a name for a link while we walk cannot redirect the
/// change; a directory is entered with `O_NOFOLLOW | O_DIRECTORY` and must be the one
/// just inspected. A regular file with more than one hard link is skipped with a
/// warning: it may be a link to a file outside the spool (the classic hard-link attack;
/// fs.protected_hardlinks stops it too, but not everywhere).
fn hand_over(
    mut dir: Dir,
    path: &Path,
    account: &Account,
    depth: usize,
    top: bool,
) -> Result<usize, (PathBuf, nix::Error)> {
    let names: Vec<CString> = dir
        .iter()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        // At the top only the spool's own entries: a spool_dir that is not a spool
        // (a typo naming /var/spool) does not get its other contents given away.
        .filter(|n| !top || SPOOL_ENTRIES.iter().any(|e| n.as_bytes() == e.as_bytes()))
        .collect();
    let mut changed = 0;
    for name in names {
        let here = path.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        match hand_over_entry(&dir, &name, &here, account, depth) {
            Ok(n) => changed += n,
            // Removed while we walked (the spool is live: a segment collected, a file
            // moved): nothing left to hand over.
            Err((_, nix::Error::ENOENT)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(changed)
}

fn hand_over_entry(
    dir: &Dir,
    name: &CStr,
    here: &Path,
    account: &Account,
    depth: usize,
) -> Result<usize, (PathBuf, nix::Error)> {
    let at = |e| (here.to_path_buf(), e);
    let handle = openat(
        dir.as_fd(),
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(at)?;
    let st = fstat(handle.as_fd()).map_err(at)?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    let mut changed = 0;
    if kind == SFlag::S_IFDIR {
        if depth >= MAX_DEPTH {
            tracing::warn!(path = %here.display(), "spool nested too deep; left as it is");
            return Ok(0);
        }
        let sub = Dir::openat(
            dir.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(at)?;
        let sub_st = fstat(sub.as_fd()).map_err(at)?;
        if (sub_st.st_dev, sub_st.st_ino) != (st.st_dev, st.st_ino) {
            // Replaced between the two opens: someone is racing us. Leave it.
            tracing::warn!(path = %here.display(), "spool directory changed while being \
                handed over; left as it is");
            return Ok(0);
        }
        if !owned_by(&sub_st, account) {
            fchown(sub.as_fd(), Some(account.uid), Some(account.gid)).map_err(at)?;
            changed += 1;
        }
        return Ok(changed + hand_over(sub, here, account, depth + 1, false)?);
    }
    if owned_by(&st, account) {
        return Ok(0);
    }
    if kind == SFlag::S_IFREG && st.st_nlink > 1 {
        tracing::warn!(path = %here.display(), links = st.st_nlink,
            "spool file has other hard links; not handed to the user");
        return Ok(0);
    }
    fchownat(
        handle.as_fd(),
        "",
        Some(account.uid),
        Some(account.gid),
        AtFlags::AT_EMPTY_PATH,
    )
    .map_err(at)?;
    Ok(1)
}

fn owned_by(st: &FileStat, account: &Account) -> bool {
    st.st_uid == account.uid.as_raw() && st.st_gid == account.gid.as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(uid: u32) -> Account {
        Account {
            name: "postern".into(),
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(uid),
            groups: vec![Gid::from_raw(uid)],
        }
    }

    fn public() -> Option<SocketAddr> {
        Some("0.0.0.0:25".parse().unwrap())
    }

    const ROOT: Uid = Uid::from_raw(0);
    const ME: Uid = Uid::from_raw(1000);
    const MY_GID: Gid = Gid::from_raw(1000);

    #[test]
    fn privileges_root_with_a_public_listener_needs_a_user_or_allow_root() {
        let r = decide(ROOT, Gid::from_raw(0), None, None, false, public());
        assert!(matches!(r, Err(PrivilegeError::Root { .. })), "{r:?}");
        assert_eq!(
            decide(ROOT, Gid::from_raw(0), None, None, true, public()).unwrap(),
            Plan::Stay
        );
        // Loopback only: root may stay root.
        assert_eq!(
            decide(ROOT, Gid::from_raw(0), None, None, false, None).unwrap(),
            Plan::Stay
        );
        // Not root: nothing to refuse.
        assert_eq!(
            decide(ME, MY_GID, None, None, false, public()).unwrap(),
            Plan::Stay
        );
    }

    #[test]
    fn privileges_root_drops_to_the_user() {
        let a = account(105);
        assert_eq!(
            decide(
                ROOT,
                Gid::from_raw(0),
                Some(a.clone()),
                None,
                false,
                public()
            )
            .unwrap(),
            Plan::Drop(a)
        );
    }

    #[test]
    fn privileges_a_user_that_is_root_is_refused_off_loopback() {
        let r = decide(
            ROOT,
            Gid::from_raw(0),
            Some(account(0)),
            None,
            false,
            public(),
        );
        assert!(matches!(r, Err(PrivilegeError::UserIsRoot { .. })), "{r:?}");
        assert_eq!(
            decide(ROOT, Gid::from_raw(0), Some(account(0)), None, false, None).unwrap(),
            Plan::Stay
        );
    }

    #[test]
    fn privileges_without_root_only_yourself() {
        assert_eq!(
            decide(ME, MY_GID, Some(account(1000)), None, false, public()).unwrap(),
            Plan::Stay
        );
        let r = decide(ME, MY_GID, Some(account(105)), None, false, None);
        assert!(
            matches!(r, Err(PrivilegeError::NeedsRoot { uid: 1000, .. })),
            "{r:?}"
        );
        assert!(
            r.unwrap_err()
                .to_string()
                .contains("needs Postern to be started as root")
        );
        let mut other_group = account(1000);
        other_group.gid = Gid::from_raw(50);
        let r = decide(ME, MY_GID, Some(other_group), Some("staff"), false, None);
        assert!(
            matches!(r, Err(PrivilegeError::GroupNeedsRoot { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn privileges_unknown_user_and_group_are_named() {
        let e = lookup("no-such-user-postern-test", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "user `no-such-user-postern-test` (key `user`) does not exist on this system"
        );
        let e = lookup("root", Some("no-such-group-postern-test")).unwrap_err();
        assert!(matches!(e, PrivilegeError::UnknownGroup(_)), "{e:?}");
    }

    #[test]
    fn privileges_lookup_finds_root() {
        let a = lookup("root", None).unwrap();
        assert_eq!(a.uid, ROOT);
        assert!(a.groups.contains(&a.gid));
    }
}
