//! The users file: parsing, editing, atomic writing, and reloading when it changes.
//!
//! Format (one user a line, `docs/auth.md`):
//!
//! ```text
//! # comment
//! alice:$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>
//! bob:$argon2id$v=19$...:bob@company.com,b.smith@company.com
//! ```
//!
//! The third field lists the sender addresses the user may use when `[auth]
//! restrict_senders` is on. Fields are split at `:`, which neither a user name nor a PHC
//! string (`$`, `,`, `=`, `+`, `/` and alphanumerics only) can contain.
//!
//! Trust: the file is the operator's, written by `postern user`, but it is never trusted to
//! hold a plaintext password: anything but an argon2id PHC string is an error at load, named
//! by line, and no error message ever repeats a hash field (it could be a password someone
//! pasted there). A file that fails to parse is refused whole; the running server keeps the
//! users it had.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::AuthError;
use super::password;

/// One user: the password hash and the sender addresses allowed with `restrict_senders`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    /// An argon2id PHC string, checked when the file was read.
    pub hash: String,
    /// Sender addresses (MAIL FROM) this user may use besides its own name.
    pub addresses: Vec<String>,
}

/// A line of the file, kept in order so that editing preserves comments.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// A comment or a blank line, exactly as written.
    Other(String),
    User(User),
}

/// The whole file, for editing (`postern user`) and for looking users up (the server).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsersFile {
    lines: Vec<Line>,
}

/// Check a user name: what `postern user` accepts and what the file may hold. A name is
/// whatever clients type as their SASL user name, often an address, so only what would
/// break the file format or the logs is refused.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the user name is empty".into());
    }
    if name.len() > 255 {
        return Err("the user name is longer than 255 bytes".into());
    }
    if name.starts_with('#') {
        return Err("a user name cannot start with `#` (comment lines do)".into());
    }
    if let Some(c) = name
        .chars()
        .find(|&c| c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "the user name contains {c:?} (colons, spaces and control characters are not allowed)"
        ));
    }
    Ok(())
}

/// Check the name of a new user (`postern user add`): what [`check_name`] accepts, except
/// names that start with `-`. Those look like options: `postern user del -x` or a script's
/// `grep "$name" users` would read them as one, and `-` alone usually means standard
/// input. A line written by hand may still hold such a name: it loads, and
/// `postern user del -- -x` removes it.
pub fn check_new_name(name: &str) -> Result<(), String> {
    check_name(name)?;
    if name.starts_with('-') {
        return Err(format!(
            "a user name cannot start with `-` (`{name}` would be taken for an option)"
        ));
    }
    Ok(())
}

/// Check a sender address for the third field: `local@domain`, nothing that would break
/// the format (`:`, `,`, spaces).
pub fn check_address(address: &str) -> Result<(), String> {
    let ok = match address.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !address
                    .chars()
                    .any(|c| c == ':' || c == ',' || c.is_whitespace() || c.is_control())
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{address}` is not a sender address (expected user@domain, without `:`, `,` or spaces)"
        ))
    }
}

impl UsersFile {
    /// Parse the text of a users file; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<UsersFile, AuthError> {
        let mut lines = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let number = i + 1;
            let err = |message: String| AuthError::Parse {
                path: path.to_path_buf(),
                line: number,
                message,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                lines.push(Line::Other(raw.trim_end().to_string()));
                continue;
            }
            let mut fields = line.split(':');
            let name = fields.next().unwrap_or_default().trim();
            check_name(name).map_err(err)?;
            let Some(hash) = fields.next().map(str::trim) else {
                return Err(err(format!(
                    "`{name}` has no password hash (expected `name:$argon2id$...`)"
                )));
            };
            // Never quote `hash` in a message: it may be a plaintext password.
            password::check_hash(hash).map_err(|why| {
                err(format!(
                    "the password of `{name}` is not an argon2id hash ({why}); the users file \
                     never holds plain passwords: set it with `postern user passwd {name}`"
                ))
            })?;
            let mut addresses = Vec::new();
            if let Some(list) = fields.next() {
                for a in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                    check_address(a).map_err(err)?;
                    addresses.push(a.to_string());
                }
            }
            if fields.next().is_some() {
                return Err(err(format!(
                    "`{name}`: too many `:` fields (expected `name:hash` or `name:hash:addresses`)"
                )));
            }
            if let Some(first) = seen.insert(name.to_string(), number) {
                return Err(err(format!("`{name}` is already defined on line {first}")));
            }
            lines.push(Line::User(User {
                name: name.to_string(),
                hash: hash.to_string(),
                addresses,
            }));
        }
        Ok(UsersFile { lines })
    }

    /// Read and parse `path`; a file that does not exist is an empty one when
    /// `missing_ok` (for `postern user add`, which creates it).
    pub fn load(path: &Path, missing_ok: bool) -> Result<UsersFile, AuthError> {
        match std::fs::read_to_string(path) {
            Ok(text) => UsersFile::parse(&text, path),
            Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(UsersFile::default())
            }
            Err(source) => Err(AuthError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The file's text: comments as they were, users one per line.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            match line {
                Line::Other(text) => out.push_str(text),
                Line::User(u) => {
                    out.push_str(&u.name);
                    out.push(':');
                    out.push_str(&u.hash);
                    if !u.addresses.is_empty() {
                        out.push(':');
                        out.push_str(&u.addresses.join(","));
                    }
                }
            }
            out.push('\n');
        }
        out
    }

    /// The users, in file order.
    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.lines.iter().filter_map(|l| match l {
            Line::User(u) => Some(u),
            Line::Other(_) => None,
        })
    }

    pub fn get(&self, name: &str) -> Option<&User> {
        self.users().find(|u| u.name == name)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut User> {
        self.lines.iter_mut().find_map(|l| match l {
            Line::User(u) if u.name == name => Some(u),
            _ => None,
        })
    }

    /// Add a user (`postern user add`); an error if the name exists.
    pub fn add(&mut self, user: User) -> Result<(), AuthError> {
        check_new_name(&user.name).map_err(AuthError::BadName)?;
        if self.get(&user.name).is_some() {
            return Err(AuthError::UserExists(user.name));
        }
        self.lines.push(Line::User(user));
        Ok(())
    }

    /// Replace a user's hash, and its addresses when `addresses` is given
    /// (`postern user passwd`); an error if the name does not exist.
    pub fn set_password(
        &mut self,
        name: &str,
        hash: String,
        addresses: Option<Vec<String>>,
    ) -> Result<(), AuthError> {
        let user = self
            .get_mut(name)
            .ok_or_else(|| AuthError::NoSuchUser(name.to_string()))?;
        user.hash = hash;
        if let Some(addresses) = addresses {
            user.addresses = addresses;
        }
        Ok(())
    }

    /// Remove a user (`postern user del`); an error if the name does not exist.
    pub fn remove(&mut self, name: &str) -> Result<(), AuthError> {
        let before = self.lines.len();
        self.lines
            .retain(|l| !matches!(l, Line::User(u) if u.name == name));
        if self.lines.len() == before {
            return Err(AuthError::NoSuchUser(name.to_string()));
        }
        Ok(())
    }

    /// Replace `path` with this file so that a reader sees the old file or the new one,
    /// never a mix, and a crash leaves one of them on disk (`crate::durable::write`: temp
    /// file, fsync, rename, fsync the directory), with mode 0600 exactly (hashes are
    /// secrets too). A symbolic link at `path` is followed: the file it points to is
    /// replaced, the link kept.
    pub fn save(&self, path: &Path) -> Result<(), AuthError> {
        let options = crate::durable::Options {
            replace: crate::durable::Replace::Yes,
            mode: crate::durable::Mode::PRIVATE,
        };
        crate::durable::write(path, self.to_text().as_bytes(), options).map_err(|e| AuthError::Io {
            path: path.to_path_buf(),
            source: e.source,
        })
    }
}

/// The users the server knows, by name.
#[derive(Debug, Default)]
pub struct Users {
    by_name: HashMap<String, User>,
}

impl Users {
    pub fn from_file(file: &UsersFile) -> Users {
        Users {
            by_name: file.users().map(|u| (u.name.clone(), u.clone())).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&User> {
        self.by_name.get(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// How often, at most, the file's metadata is looked at.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies a version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Fingerprint {
        Fingerprint {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

#[derive(Debug)]
struct ReloadState {
    last_check: Instant,
    /// Of the version last read, or last found broken (so it is reported once).
    seen: Option<Fingerprint>,
}

/// The users file as the server sees it: loaded at start, re-read when it changes.
#[derive(Debug)]
pub struct UsersSource {
    path: PathBuf,
    current: RwLock<Arc<Users>>,
    reload: Mutex<ReloadState>,
}

impl UsersSource {
    /// Load `path`; an error (unreadable, or a line that does not parse) stops the start.
    pub fn open(path: &Path, now: Instant) -> Result<UsersSource, AuthError> {
        let seen = std::fs::metadata(path).ok().map(|m| Fingerprint::of(&m));
        let file = UsersFile::load(path, false)?;
        Ok(UsersSource {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(Users::from_file(&file))),
            reload: Mutex::new(ReloadState {
                last_check: now,
                seen,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The users in force, without looking at the file.
    pub fn snapshot(&self) -> Arc<Users> {
        match self.current.read() {
            Ok(users) => Arc::clone(&users),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The users in force, after re-reading the file if it changed. The file's metadata is
    /// looked at most once per [`RELOAD_CHECK_INTERVAL`]; a file that no longer parses or
    /// cannot be read is logged (once per version) and the previous users stay. Blocking:
    /// call from a blocking thread.
    pub fn current(&self, now: Instant) -> Arc<Users> {
        // One caller checks; the others use what is there rather than wait.
        if let Ok(mut state) = self.reload.try_lock()
            && now.saturating_duration_since(state.last_check) >= RELOAD_CHECK_INTERVAL
        {
            state.last_check = now;
            self.check(&mut state);
        }
        self.snapshot()
    }

    fn check(&self, state: &mut ReloadState) {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) => {
                if state.seen.is_some() {
                    tracing::error!(users_file = %self.path.display(), error = %e,
                        "users file unreadable: keeping the users loaded before");
                    state.seen = None;
                }
                return;
            }
        };
        let fingerprint = Fingerprint::of(&meta);
        if state.seen == Some(fingerprint) {
            return;
        }
        state.seen = Some(fingerprint);
        match UsersFile::load(&self.path, false) {
            Ok(file) => {
                let users = Users::from_file(&file);
                tracing::info!(users_file = %self.path.display(), users = users.len(),
                    "users file reloaded");
                match self.current.write() {
                    Ok(mut current) => *current = Arc::new(users),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(users),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "users file not reloaded: keeping the users loaded before");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn hash(pw: &str) -> String {
        password::hash_cheap(pw)
    }

    fn parse(text: &str) -> Result<UsersFile, String> {
        UsersFile::parse(text, Path::new("users")).map_err(|e| e.to_string())
    }

    #[test]
    fn users_file_parses_comments_users_and_addresses() {
        let (a, b) = (hash("a"), hash("b"));
        let text = format!(
            "# users\n\nalice:{a}\n  bob:{b}:bob@company.com, b.smith@company.com\r\n\
             carol@company.com:{a}:\n"
        );
        let f = parse(&text).unwrap();
        let users: Vec<_> = f.users().collect();
        assert_eq!(users.len(), 3);
        assert_eq!(users[0].name, "alice");
        assert_eq!(users[0].hash, a);
        assert!(users[0].addresses.is_empty());
        assert_eq!(users[1].name, "bob");
        assert_eq!(
            users[1].addresses,
            ["bob@company.com", "b.smith@company.com"]
        );
        assert_eq!(users[2].name, "carol@company.com");
        assert!(users[2].addresses.is_empty());
    }

    #[test]
    fn users_file_round_trips_and_keeps_comments() {
        let (a, b) = (hash("a"), hash("b"));
        let text = format!(
            "# managed by postern user\n\nalice:{a}\n# bob below\nbob:{b}:b@x.test,c@x.test\n"
        );
        let f = parse(&text).unwrap();
        assert_eq!(f.to_text(), text);
        assert_eq!(parse(&f.to_text()).unwrap(), f);

        let mut f = f;
        f.remove("alice").unwrap();
        f.add(User {
            name: "dave".into(),
            hash: a.clone(),
            addresses: vec!["dave@x.test".into()],
        })
        .unwrap();
        f.set_password("bob", a.clone(), None).unwrap();
        assert_eq!(
            f.to_text(),
            format!(
                "# managed by postern user\n\n# bob below\nbob:{a}:b@x.test,c@x.test\ndave:{a}:dave@x.test\n"
            )
        );
        f.set_password("bob", b.clone(), Some(Vec::new())).unwrap();
        assert!(f.get("bob").unwrap().addresses.is_empty());
    }

    #[test]
    fn users_file_edit_errors() {
        let mut f = UsersFile::default();
        let u = User {
            name: "alice".into(),
            hash: hash("a"),
            addresses: Vec::new(),
        };
        f.add(u.clone()).unwrap();
        assert!(matches!(f.add(u), Err(AuthError::UserExists(n)) if n == "alice"));
        assert!(matches!(
            f.set_password("bob", hash("b"), None),
            Err(AuthError::NoSuchUser(_))
        ));
        assert!(matches!(f.remove("bob"), Err(AuthError::NoSuchUser(_))));
        let bad = User {
            name: "a b".into(),
            hash: hash("a"),
            addresses: Vec::new(),
        };
        assert!(matches!(f.add(bad), Err(AuthError::BadName(_))));
    }

    #[test]
    fn users_file_refuses_plaintext_and_other_hashes_naming_the_line() {
        let good = hash("a");
        let cases: &[(&str, &str)] = &[
            (
                "alice:hunter2\n",
                "users:1: the password of `alice` is not an argon2id hash",
            ),
            (
                "# x\nalice:$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo\n",
                "users:2: the password of `alice` is not an argon2id hash",
            ),
            (
                "alice:$6$saltsalt$hashhashhash\n",
                "users:1: the password of `alice` is not an argon2id hash",
            ),
            ("alice\n", "users:1: `alice` has no password hash"),
            (
                "alice:\n",
                "users:1: the password of `alice` is not an argon2id hash",
            ),
            (":x\n", "users:1: the user name is empty"),
            ("a b:x\n", "users:1: the user name contains ' '"),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.starts_with(want), "{text:?}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let err = parse(&format!("alice:{good}\nalice:{good}\n")).unwrap_err();
        assert_eq!(err, "users:2: `alice` is already defined on line 1");
        let err = parse(&format!("alice:{good}:not-an-address\n")).unwrap_err();
        assert!(
            err.starts_with("users:1: `not-an-address` is not a sender address"),
            "{err}"
        );
        let err = parse(&format!("alice:{good}:a@x.test:more\n")).unwrap_err();
        assert!(err.contains("too many `:` fields"), "{err}");
    }

    #[test]
    fn users_file_save_is_mode_0600_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let mut f = UsersFile::default();
        f.add(User {
            name: "alice".into(),
            hash: hash("a"),
            addresses: Vec::new(),
        })
        .unwrap();
        f.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(UsersFile::load(&path, false).unwrap(), f);

        // An existing, more open file becomes 0600 too; no temporary file is left.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        f.remove("alice").unwrap();
        f.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["users"]);

        // A symbolic link is followed, not replaced.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        f.save(&link).unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn users_source_reloads_on_change_and_keeps_users_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(&path, format!("alice:{}\n", hash("a"))).unwrap();
        let t0 = Instant::now();
        let source = UsersSource::open(&path, t0).unwrap();
        assert!(source.current(t0).get("alice").is_some());

        // Changed, but checked at most once a second.
        std::fs::write(&path, format!("bob:{}\n", hash("b"))).unwrap();
        let t = t0 + Duration::from_millis(500);
        assert!(source.current(t).get("alice").is_some());
        let t = t0 + Duration::from_secs(1);
        let users = source.current(t);
        assert!(users.get("alice").is_none());
        assert!(users.get("bob").is_some());

        // A broken file is refused: bob stays.
        std::fs::write(&path, "bob:plaintext\n").unwrap();
        let t = t0 + Duration::from_secs(2);
        assert!(source.current(t).get("bob").is_some());
        // A removed file too.
        std::fs::remove_file(&path).unwrap();
        let t = t0 + Duration::from_secs(3);
        assert!(source.current(t).get("bob").is_some());
        // Fixed again: picked up.
        std::fs::write(&path, format!("carol:{}\n", hash("c"))).unwrap();
        let t = t0 + Duration::from_secs(4);
        assert!(source.current(t).get("carol").is_some());
    }

    #[test]
    fn users_names_and_addresses() {
        assert!(check_name("alice").is_ok());
        assert!(check_name("alice@company.com").is_ok());
        assert!(check_name("Ålice").is_ok());
        for bad in ["", "a:b", "a b", "a\tb", "a\nb", "#a", &"x".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        // New names may not look like options; existing ones still load.
        for bad in ["-", "-x", "--config", "-:"] {
            assert!(check_new_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("-x").is_ok());
        assert!(check_new_name("a-b").is_ok());
        assert!(check_new_name("a:b").is_err());
        let f = parse(&format!("-x:{}\n", hash("pw"))).unwrap();
        assert!(f.get("-x").is_some());
        assert!(check_address("a@b.test").is_ok());
        for bad in ["a", "@b", "a@", "a b@c", "a,b@c", "a:b@c"] {
            assert!(check_address(bad).is_err(), "{bad:?}");
        }
    }
}
