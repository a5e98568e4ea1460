//! Tests for the authenticator: real users files (hashed with the cheapest Argon2
//! parameters), tokio's paused clock for the tarpit and the lockout times, and the log lines
//! captured as the default `tracing-subscriber` format writes them.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postern_smtp::AuthRequest;
use tokio::time::Instant;

use super::*;
use crate::config::{Auth, Mechanism};

const MIN: Duration = Duration::from_secs(60);
/// The default `ipv6_prefix`.
const V6: u8 = crate::policy::DEFAULT_IPV6_PREFIX;

/// A users file in a temporary directory: alice (password "wonderland", may also send as
/// a.liddell@company.com) and bob@company.com (password "builder").
fn users_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users");
    let text = format!(
        "# test users\nalice:{}:a.liddell@company.com\nbob@company.com:{}\n",
        password::hash_cheap("wonderland"),
        password::hash_cheap("builder"),
    );
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn config(path: &Path) -> Auth {
    Auth {
        users_file: Some(path.to_path_buf()),
        mechanisms: vec![Mechanism::Plain, Mechanism::Login],
        max_failures: 3,
        failure_window: 10 * MIN,
        lockout: 15 * MIN,
        per_user_lockout: true,
        restrict_senders: false,
    }
}

fn request(user: &str, password: &str) -> AuthRequest {
    AuthRequest {
        mechanism: "PLAIN",
        authzid: None,
        username: user.to_string(),
        password: password.to_string(),
    }
}

/// One attempt with mechanism PLAIN and no authzid.
async fn auth(
    a: &Authenticator,
    client: IpAddr,
    trusted: bool,
    user: &str,
    password: &str,
) -> Result<String, Reply> {
    a.authenticate(client, trusted, &request(user, password))
        .await
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([192, 0, 2, last])
}

fn code(r: &Result<String, Reply>) -> u16 {
    match r {
        Ok(_) => 235,
        Err(reply) => reply.code,
    }
}

#[tokio::test(start_paused = true)]
async fn auth_good_and_bad_credentials() {
    let (_dir, path) = users_file();
    let a = Authenticator::new(&config(&path), V6).unwrap();
    let r = auth(&a, ip(1), false, "alice", "wonderland").await;
    assert_eq!(r, Ok("alice".to_string()));
    let r = auth(&a, ip(1), false, "bob@company.com", "builder").await;
    assert_eq!(r, Ok("bob@company.com".to_string()));

    for (user, pw) in [
        ("alice", "Wonderland"),
        ("alice", ""),
        ("alice ", "wonderland"),
        ("ALICE", "wonderland"),
        ("mallory", "wonderland"),
    ] {
        let r = auth(&a, ip(2), true, user, pw).await;
        assert_eq!(r, Err(catalogue::auth_failed()), "{user:?} {pw:?}");
    }

    // PLAIN's authzid: empty or the user's own name is fine, anyone else is refused.
    let mut req = request("alice", "wonderland");
    req.authzid = Some("alice".into());
    assert_eq!(code(&a.authenticate(ip(3), false, &req).await), 235);
    req.authzid = Some("bob@company.com".into());
    assert_eq!(code(&a.authenticate(ip(3), false, &req).await), 535);
}

#[tokio::test(start_paused = true)]
async fn auth_lockout_per_ip_even_with_the_right_password() {
    let (_dir, path) = users_file();
    let a = Authenticator::new(&config(&path), V6).unwrap();
    for _ in 0..3 {
        let r = auth(&a, ip(1), false, "mallory", "x").await;
        assert_eq!(code(&r), 535);
    }
    // The attempt after the third failure gets 454, even with good credentials.
    let r = auth(&a, ip(1), false, "alice", "wonderland").await;
    assert_eq!(r, Err(catalogue::auth_temporarily_refused()));
    // Other addresses are not affected; unknown names were not counted per name.
    let r = auth(&a, ip(2), false, "alice", "wonderland").await;
    assert_eq!(code(&r), 235);
    // 454s are not failures, and the lockout ends.
    for _ in 0..10 {
        let r = auth(&a, ip(1), false, "alice", "x").await;
        assert_eq!(code(&r), 454);
    }
    tokio::time::advance(15 * MIN).await;
    let r = auth(&a, ip(1), false, "alice", "wonderland").await;
    assert_eq!(code(&r), 235);
}

/// A reload (a new authenticator from the previous one) keeps the failures and lockouts
/// counted so far; its new settings apply once it is activated.
#[tokio::test(start_paused = true)]
async fn auth_lockouts_outlive_a_reload() {
    let (_dir, path) = users_file();
    let mut lenient = config(&path);
    lenient.max_failures = 5;
    let old = Authenticator::new(&lenient, V6).unwrap();
    for client in [ip(1), ip(3)] {
        for _ in 0..2 {
            assert_eq!(code(&auth(&old, client, false, "mallory", "x").await), 535);
        }
    }
    for _ in 0..5 {
        assert_eq!(code(&auth(&old, ip(2), false, "mallory", "x").await), 535);
    }
    let mut strict = config(&path);
    strict.max_failures = 2;
    let new = Authenticator::reloaded(&strict, V6, Some(&old)).unwrap();
    // Locked out before the reload: still locked out after it.
    assert_eq!(
        code(&auth(&new, ip(2), false, "alice", "wonderland").await),
        454
    );
    // Not active yet: a third failure is under the old limit of five and locks nothing.
    assert_eq!(code(&auth(&new, ip(1), false, "mallory", "x").await), 535);
    assert_eq!(code(&auth(&new, ip(1), false, "mallory", "x").await), 535);
    new.activate();
    // Active: the failures counted before the reload count toward the new limit of two.
    assert_eq!(code(&auth(&new, ip(3), false, "mallory", "x").await), 535);
    assert_eq!(
        code(&auth(&new, ip(3), false, "alice", "wonderland").await),
        454
    );
}

#[tokio::test(start_paused = true)]
async fn auth_lockout_per_user_from_any_address() {
    let (_dir, path) = users_file();
    let a = Authenticator::new(&config(&path), V6).unwrap();
    for n in 1..=3 {
        let r = auth(&a, ip(n), false, "alice", "guess").await;
        assert_eq!(code(&r), 535);
    }
    let r = auth(&a, ip(50), false, "alice", "wonderland").await;
    assert_eq!(code(&r), 454);
    let r = auth(&a, ip(50), false, "bob@company.com", "builder").await;
    assert_eq!(code(&r), 235);
    // A trusted client is never locked out.
    let r = auth(&a, ip(60), true, "alice", "wonderland").await;
    assert_eq!(code(&r), 235);

    // Without per-user lockout only the addresses count.
    let mut c = config(&path);
    c.per_user_lockout = false;
    let a = Authenticator::new(&c, V6).unwrap();
    for n in 1..=3 {
        auth(&a, ip(n), false, "alice", "guess").await.unwrap_err();
    }
    let r = auth(&a, ip(50), false, "alice", "wonderland").await;
    assert_eq!(code(&r), 235);
}

#[tokio::test(start_paused = true)]
async fn auth_trusted_failures_do_not_lock_out() {
    let (_dir, path) = users_file();
    let a = Authenticator::new(&config(&path), V6).unwrap();
    for _ in 0..5 {
        let r = auth(&a, ip(1), true, "alice", "guess").await;
        assert_eq!(code(&r), 535);
    }
    let r = auth(&a, ip(1), true, "alice", "wonderland").await;
    assert_eq!(code(&r), 235);
    // Nor toward the user from elsewhere.
    let r = auth(&a, ip(2), false, "alice", "wonderland").await;
    assert_eq!(code(&r), 235);
}

#[tokio::test(start_paused = true)]
async fn auth_success_clears_only_the_users_count() {
    let (_dir, path) = users_file();
    let a = Authenticator::new(&config(&path), V6).unwrap();
    // alice mistypes from two addresses, then logs in from a third: her count restarts.
    for n in 1..=2 {
        auth(&a, ip(n), false, "alice", "guess").await.unwrap_err();
    }
    auth(&a, ip(3), false, "alice", "wonderland").await.unwrap();
    for n in 4..=5 {
        auth(&a, ip(n), false, "alice", "guess").await.unwrap_err();
    }
    let r = auth(&a, ip(6), false, "alice", "wonderland").await;
    assert_eq!(code(&r), 235);

    // An address's count survives its successes: two guesses, a login with a valid
    // account, one more guess, and the address is locked out.
    for _ in 0..2 {
        auth(&a, ip(7), false, "alice", "guess").await.unwrap_err();
    }
    auth(&a, ip(7), false, "bob@company.com", "builder")
        .await
        .unwrap();
    let r = auth(&a, ip(7), false, "mallory", "x").await;
    assert_eq!(code(&r), 535);
    let r = auth(&a, ip(7), false, "bob@company.com", "builder").await;
    assert_eq!(code(&r), 454);
}

#[tokio::test(start_paused = true)]
async fn auth_ipv6_clients_are_counted_per_64() {
    let (_dir, path) = users_file();
    let a = Authenticator::new(&config(&path), V6).unwrap();
    let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
    for n in 1..=3 {
        let r = auth(&a, v6(&format!("2001:db8:1:2::{n}")), false, "mallory", "x").await;
        assert_eq!(code(&r), 535);
    }
    let r = auth(&a, v6("2001:db8:1:2:ffff::9"), false, "alice", "wonderland").await;
    assert_eq!(code(&r), 454);
    let r = auth(&a, v6("2001:db8:1:3::1"), false, "alice", "wonderland").await;
    assert_eq!(code(&r), 235);
}

#[tokio::test(start_paused = true)]
async fn auth_tarpit_grows_and_is_bounded() {
    let (_dir, path) = users_file();
    let mut c = config(&path);
    c.max_failures = 1000;
    let a = Authenticator::new(&c, V6).unwrap();
    let mut delays = Vec::new();
    for _ in 0..25 {
        let start = Instant::now();
        auth(&a, ip(1), false, "alice", "guess").await.unwrap_err();
        delays.push(start.elapsed());
    }
    let ms = |n: u64| Duration::from_millis(n);
    assert_eq!(&delays[..4], [ms(250), ms(500), ms(750), ms(1000)]);
    assert_eq!(delays[19], ms(5000));
    assert!(delays.iter().all(|d| *d <= TARPIT_MAX), "{delays:?}");
    // No delay before a success, nor before a 454.
    let start = Instant::now();
    auth(&a, ip(1), false, "alice", "wonderland").await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(tarpit(u32::MAX), TARPIT_MAX);
    assert_eq!(tarpit(0), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn auth_users_file_changes_are_picked_up() {
    let (_dir, path) = users_file();
    let a = Authenticator::new(&config(&path), V6).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let carol = format!("carol:{}\n", password::hash_cheap("sea"));
    std::fs::write(&path, format!("{text}{carol}")).unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    let r = auth(&a, ip(1), false, "carol", "sea").await;
    assert_eq!(code(&r), 235);

    // A broken file is logged and ignored: the users stay.
    std::fs::write(&path, "carol:sea\n").unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    let r = auth(&a, ip(1), false, "carol", "sea").await;
    assert_eq!(code(&r), 235);
}

#[test]
fn auth_new_reports_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users");
    std::fs::write(&path, "# x\nalice:plaintext-password\n").unwrap();
    let err = Authenticator::new(&config(&path), V6)
        .err()
        .unwrap()
        .to_string();
    assert!(err.starts_with(&format!("{}:2: ", path.display())), "{err}");
    assert!(!err.contains("plaintext-password"), "{err}");

    let missing = dir.path().join("nope");
    let err = Authenticator::new(&config(&missing), V6)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope"), "{err}");

    let mut c = config(&path);
    c.users_file = None;
    assert!(matches!(
        Authenticator::new(&c, V6),
        Err(AuthError::NoUsersFile)
    ));
}

#[test]
fn auth_may_send_as() {
    let (_dir, path) = users_file();
    let a = Authenticator::new(&config(&path), V6).unwrap();
    assert!(a.may_send_as("alice", "ceo@company.com"), "off by default");

    let mut c = config(&path);
    c.restrict_senders = true;
    let a = Authenticator::new(&c, V6).unwrap();
    assert!(a.may_send_as("alice", "a.liddell@company.com"));
    assert!(a.may_send_as("alice", "A.Liddell@Company.COM"));
    assert!(a.may_send_as("alice", "<a.liddell@company.com>"));
    assert!(a.may_send_as("alice", ""), "the null sender");
    assert!(!a.may_send_as("alice", "ceo@company.com"));
    assert!(!a.may_send_as("alice", "alice"));
    // A name that is an address may send as itself.
    assert!(a.may_send_as("bob@company.com", "bob@company.com"));
    assert!(a.may_send_as("bob@company.com", "Bob@company.com"));
    assert!(!a.may_send_as("bob@company.com", "a.liddell@company.com"));
    assert!(!a.may_send_as("nobody", "nobody@company.com"));
}

#[test]
fn auth_log_names_are_escaped() {
    assert_eq!(LogName("alice").to_string(), "alice");
    assert_eq!(LogName("bob@company.com").to_string(), "bob@company.com");
    assert_eq!(
        LogName("x client=203.0.113.9").to_string(),
        "\"x client=203.0.113.9\""
    );
    assert_eq!(LogName("a\nWARN b").to_string(), "\"a\\nWARN b\"");
    assert_eq!(LogName("").to_string(), "\"\"");
    let long = "a".repeat(100);
    assert_eq!(LogName(&long).to_string(), format!("{}...", &long[..64]));
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log lines fail2ban reads, exactly as the daemon's formatter (`cli::init_logging`,
/// default `tracing-subscriber` format, no ANSI colours) writes them, less the timestamp.
/// `docs/auth.md` documents these lines and its filter's regex is written against them.
#[test]
fn auth_log_lines_have_the_documented_format() {
    let (_dir, path) = users_file();
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .with_max_level(tracing::Level::INFO)
        .finish();
    // tracing caches each callsite's interest globally and, while only one dispatcher is
    // registered, decides it from whichever thread hits the callsite first: a test running
    // in parallel without a subscriber would switch these lines off. With a second
    // dispatcher alive it asks all of them, ours included.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let mut c = config(&path);
            c.max_failures = 2;
            let a = Authenticator::new(&c, V6).unwrap();
            let v6: IpAddr = "2001:db8::7".parse().unwrap();
            auth(&a, v6, false, "mallory", "x").await.unwrap_err();
            auth(&a, ip(5), false, "alice", "guess").await.unwrap_err();
            auth(&a, v6, false, "alice", "secret-guess")
                .await
                .unwrap_err();
            auth(&a, v6, false, "alice", "wonderland")
                .await
                .unwrap_err();
            auth(&a, ip(7), false, "alice", "wonderland")
                .await
                .unwrap_err();
            let mut req = request("bob@company.com", "builder");
            req.authzid = Some("alice".into());
            a.authenticate(ip(8), false, &req).await.unwrap_err();
            req.authzid = None;
            a.authenticate(ip(8), false, &req).await.unwrap();
            auth(&a, ip(9), false, "x client=203.0.113.9", "x")
                .await
                .unwrap_err();
        })
    });
    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<String> = text
        .lines()
        // The wall-clock end of the lockout changes from run to run.
        .map(|l| match l.find(" until=") {
            Some(i) => format!("{} until=T", &l[..i]),
            None => l.to_string(),
        })
        .collect();
    assert_eq!(
        lines,
        [
            " WARN maillog: auth failed client=2001:db8::7 user=mallory reason=unknown user",
            " WARN maillog: auth failed client=192.0.2.5 user=alice reason=bad password",
            " WARN maillog: auth failed client=2001:db8::7 user=alice reason=bad password",
            " WARN maillog: auth lockout client=2001:db8::7 user=alice scope=ip until=T",
            " WARN maillog: auth lockout client=2001:db8::7 user=alice scope=user until=T",
            " INFO maillog: auth refused: locked out client=2001:db8::7 user=alice scope=ip until=T",
            " INFO maillog: auth refused: locked out client=192.0.2.7 user=alice scope=user until=T",
            " WARN maillog: auth failed client=192.0.2.8 user=bob@company.com reason=authzid not allowed",
            " INFO maillog: auth ok client=192.0.2.8 user=bob@company.com mechanism=PLAIN",
            " WARN maillog: auth failed client=192.0.2.9 user=\"x client=203.0.113.9\" reason=unknown user",
        ]
    );
    assert!(!text.contains("secret-guess") && !text.contains("wonderland"));
    assert!(!text.contains("builder"));
}

#[test]
fn shared_and_local_failure_outcomes_merge() {
    use super::limiter::{FailureOutcome, Lockout, Scope};
    let lock = |scope| Lockout {
        scope,
        remaining: Duration::from_secs(900),
    };
    // Node-local: 2 failures, nothing started; Redis: 5, both lockouts started.
    let mut local = FailureOutcome {
        ip_failures: 2,
        started: vec![],
    };
    super::merge(
        &mut local,
        FailureOutcome {
            ip_failures: 5,
            started: vec![lock(Scope::User), lock(Scope::Ip)],
        },
    );
    assert_eq!(local.ip_failures, 5);
    assert_eq!(local.started, [lock(Scope::Ip), lock(Scope::User)]);
    // Both started the address's: logged once.
    let mut local = FailureOutcome {
        ip_failures: 7,
        started: vec![lock(Scope::Ip)],
    };
    super::merge(
        &mut local,
        FailureOutcome {
            ip_failures: 3,
            started: vec![lock(Scope::Ip)],
        },
    );
    assert_eq!(local.ip_failures, 7);
    assert_eq!(local.started, [lock(Scope::Ip)]);
}
