//! `postern user add|passwd|del|list`: the real binary, a real users file, passwords given
//! with --password-stdin. Checks what an operator relies on: no plaintext ever reaches the
//! file, the file is mode 0600, comments survive, and mistakes (adding twice, changing a
//! user that is not there, an empty password) change nothing.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use postern::auth::password;

/// A configuration naming `users` (next to it) as the users file.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("postern.toml");
    std::fs::write(&config, "[auth]\nusers_file = \"users\"\n").unwrap();
    let users = dir.path().join("users");
    (dir, config, users)
}

/// Run `postern user ARGS --config CONFIG`, feeding `stdin`.
fn user(config: &Path, args: &[&str], stdin: &str) -> Output {
    let mut all: Vec<&OsStr> = vec![OsStr::new("user")];
    all.extend(args.iter().map(OsStr::new));
    all.extend([OsStr::new("--config"), config.as_os_str()]);
    crate::common::run_cli_stdin(&all, stdin)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// The hash stored for `name`.
fn hash_of(users: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(users).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    line.split(':').nth(1).unwrap().to_string()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn user_add_passwd_list_del() {
    let (_dir, config, users) = setup();
    std::fs::write(&users, "# mail users, managed by postern user\n").unwrap();

    let args = [
        "add",
        "alice",
        "--password-stdin",
        "--address",
        "alice@company.com",
        "--address",
        "a.smith@company.com",
    ];
    ok(&user(&config, &args, "correct horse battery\n"));
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(!text.contains("correct horse"), "{text}");
    assert!(
        text.starts_with("# mail users, managed by postern user\nalice:$argon2id$"),
        "{text}"
    );
    assert!(
        text.ends_with(":alice@company.com,a.smith@company.com\n"),
        "{text}"
    );
    assert_eq!(mode(&users), 0o600);
    let first = hash_of(&users, "alice");
    assert!(password::verify("correct horse battery", &first));

    // Adding the same name again fails and changes nothing.
    let err = failed(&user(&config, &["add", "alice", "--password-stdin"], "x\n"));
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&users).unwrap(), text);

    ok(&user(
        &config,
        &["add", "bob@company.com", "--password-stdin"],
        "builder",
    ));
    let out = ok(&user(&config, &["list"], ""));
    assert_eq!(
        out,
        "alice\talice@company.com,a.smith@company.com\nbob@company.com\n"
    );
    assert!(!out.contains("argon2"));

    // passwd: a new hash, the addresses kept; a CRLF line ending is not part of it.
    ok(&user(
        &config,
        &["passwd", "alice", "--password-stdin"],
        "new secret\r\n",
    ));
    let second = hash_of(&users, "alice");
    assert_ne!(first, second);
    assert!(password::verify("new secret", &second));
    assert!(!password::verify("correct horse battery", &second));
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(!text.contains("new secret"), "{text}");
    assert!(text.contains(":alice@company.com,a.smith@company.com\n"));
    assert_eq!(mode(&users), 0o600);
    // ... or replaced with --address.
    ok(&user(
        &config,
        &[
            "passwd",
            "alice",
            "--password-stdin",
            "--address",
            "alice@company.com",
        ],
        "new secret\n",
    ));
    let out = ok(&user(&config, &["list"], ""));
    assert!(out.starts_with("alice\talice@company.com\n"), "{out}");

    let err = failed(&user(
        &config,
        &["passwd", "carol", "--password-stdin"],
        "x\n",
    ));
    assert!(err.contains("no user `carol`"), "{err}");

    ok(&user(&config, &["del", "alice"], ""));
    assert_eq!(ok(&user(&config, &["list"], "")), "bob@company.com\n");
    let err = failed(&user(&config, &["del", "alice"], ""));
    assert!(err.contains("no user `alice`"), "{err}");
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(text.starts_with("# mail users, managed by postern user\nbob@company.com:$argon2id$"));
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(users.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn user_add_creates_the_file_mode_0600() {
    let (_dir, config, users) = setup();
    assert!(!users.exists());
    assert_eq!(ok(&user(&config, &["list"], "")), "");
    ok(&user(
        &config,
        &["add", "alice", "--password-stdin"],
        "pw\n",
    ));
    assert_eq!(mode(&users), 0o600);
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(
        text.starts_with("alice:$argon2id$v=19$m=19456,t=2,p=1$"),
        "{text}"
    );
}

#[test]
fn user_refuses_bad_input_and_changes_nothing() {
    let (_dir, config, users) = setup();
    let err = failed(&user(&config, &["add", "alice", "--password-stdin"], "\n"));
    assert!(err.contains("empty password"), "{err}");
    let err = failed(&user(&config, &["add", "alice", "--password-stdin"], ""));
    assert!(err.contains("empty password"), "{err}");
    let err = failed(&user(&config, &["add", "a:b", "--password-stdin"], "pw\n"));
    assert!(err.contains("not allowed"), "{err}");
    let err = failed(&user(
        &config,
        &["add", "alice", "--password-stdin", "--address", "nope"],
        "pw\n",
    ));
    assert!(err.contains("not a sender address"), "{err}");
    assert!(!users.exists());

    // A plaintext password in the file is refused, by line, without repeating it.
    std::fs::write(&users, "# x\nalice:hunter2\n").unwrap();
    let err = failed(&user(&config, &["list"], ""));
    assert!(err.contains("users:2:"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn user_needs_a_users_file_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("postern.toml");
    std::fs::write(&config, "").unwrap();
    let err = failed(&user(&config, &["list"], ""));
    assert!(err.contains("no users file"), "{err}");
    assert!(err.contains("postern.toml"), "{err}");
}
