//! The scripts against a real `redis-server` (started per test on a free loopback port,
//! `postern_testkit::RedisServer`), and the pure parts without one.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_testkit::RedisServer;

use super::lockout::Settled;
use super::*;
use crate::auth::limiter::{Scope, Settings};

/// One counter's answer, for the tests of [`Cluster::window_take`] one counter at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WindowAdd {
    Added { bucket: i64 },
    Over { count: u64 },
}

impl Cluster {
    /// [`Cluster::window_take`] with one counter.
    async fn window_add(
        &self,
        key: &str,
        window: Duration,
        limit: u64,
        amount: u64,
    ) -> Option<WindowAdd> {
        let one = [WindowCounter {
            key,
            window,
            limit,
            amount,
        }];
        Some(match self.window_take(&one).await? {
            Taken::Added(buckets) => WindowAdd::Added {
                bucket: *buckets.first()?,
            },
            Taken::Over { count, .. } => WindowAdd::Over { count },
        })
    }

    /// [`Cluster::window_give_back`] with one counter.
    async fn window_refund(&self, key: &str, bucket: i64, amount: u64) {
        self.window_give_back(&[(key, bucket, amount)]).await;
    }
}

const MIN: Duration = Duration::from_secs(60);

fn config(url: &str) -> crate::config::Cluster {
    crate::config::Cluster {
        redis: url.to_string(),
        node: "test-node".to_string(),
        timeout: Duration::from_millis(200),
        ca_file: None,
        client_cert: None,
        sentinels: Vec::new(),
        sentinel_password: None,
    }
}

/// A client for `url`, once it is up (at most 5 s).
async fn up(url: &str) -> Arc<Cluster> {
    let c = Cluster::new(&config(url), Arc::new(Metrics::new([]))).unwrap();
    wait_for(&c, true).await;
    c
}

async fn wait_for(c: &Cluster, up: bool) {
    for _ in 0..250 {
        if c.is_up() == up {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "the client did not become {}",
        if up { "up" } else { "down" }
    );
}

fn settings() -> Settings {
    Settings {
        max_failures: 3,
        window: 10 * MIN,
        lockout: 15 * MIN,
        per_user: true,
        capacity: 100,
        ipv6_prefix: 64,
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([192, 0, 2, last])
}

fn failed(s: Option<Settled>) -> crate::auth::limiter::FailureOutcome {
    match s {
        Some(Settled::Failed(o)) => o,
        other => panic!("expected a counted failure, got {other:?}"),
    }
}

#[test]
fn window_math_covers_the_window_and_never_overflows() {
    // 1 h: buckets of 225 s, the key lives 1 h + one bucket.
    assert_eq!(
        window_math(Duration::from_secs(3600)),
        (225_000_000, 3_825_000)
    );
    // Tiny and zero windows: width at least 1 us, expiry at least 1 ms.
    assert_eq!(window_math(Duration::ZERO), (1, 1));
    assert_eq!(window_math(Duration::from_micros(5)), (1, 1));
    let (w, e) = window_math(Duration::MAX);
    assert!(w > 0 && e > 0 && e < u64::MAX / 2);
}

#[test]
fn replies_of_the_wrong_shape_are_refused() {
    assert_eq!(
        ints(&Value::Array(vec![Value::Int(1), Value::Int(2)])),
        Some(vec![1, 2])
    );
    assert_eq!(
        ints(&Value::Array(vec![Value::BulkString(b"7".to_vec())])),
        Some(vec![7])
    );
    assert_eq!(ints(&Value::Int(1)), None);
    assert_eq!(ints(&Value::Array(vec![Value::Nil])), None);
    assert_eq!(
        ints(&Value::Array(vec![Value::BulkString(b"x".to_vec())])),
        None
    );
}

#[tokio::test]
async fn window_adds_up_to_the_limit_refuses_beyond_and_refunds() {
    let redis = RedisServer::start(None).unwrap();
    let c = up(&redis.url()).await;
    let hour = Duration::from_secs(3600);
    let mut buckets = Vec::new();
    for _ in 0..3 {
        match c.window_add("rl:test:user:bob", hour, 3, 1).await {
            Some(WindowAdd::Added { bucket }) => buckets.push(bucket),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        c.window_add("rl:test:user:bob", hour, 3, 1).await,
        Some(WindowAdd::Over { count: 3 })
    );
    // More than the limit at once is never added, even to an empty counter.
    assert_eq!(
        c.window_add("rl:test:user:alice", hour, 3, 4).await,
        Some(WindowAdd::Over { count: 0 })
    );
    // A refund makes room for exactly what it took back.
    c.window_refund("rl:test:user:bob", buckets[0], 1).await;
    assert!(matches!(
        c.window_add("rl:test:user:bob", hour, 3, 1).await,
        Some(WindowAdd::Added { .. })
    ));
    assert!(matches!(
        c.window_add("rl:test:user:bob", hour, 3, 1).await,
        Some(WindowAdd::Over { count: 3 })
    ));
    // The key expires by itself: after the window and one bucket (1 h + 225 s) at most.
    let pttl: i64 = redis
        .cli(&["PTTL", "postern:rl:test:user:bob"])
        .parse()
        .unwrap();
    assert!(pttl > 3_600_000 && pttl <= 3_825_000, "{pttl}");
    // Never below zero: refunding more than was added removes the bucket.
    for b in &buckets {
        c.window_refund("rl:test:user:bob", *b, 100).await;
    }
    c.window_refund("rl:test:user:bob", 12345, 1).await;
    let fields = redis.cli(&["HGETALL", "postern:rl:test:user:bob"]);
    assert!(!fields.contains('-'), "{fields}");
    // Emptied, the hash is gone.
    assert_eq!(redis.cli(&["EXISTS", "postern:rl:test:user:bob"]), "0");
    assert!(c.is_up());
}

#[tokio::test]
async fn window_take_adds_to_every_counter_or_to_none() {
    let redis = RedisServer::start(None).unwrap();
    let c = up(&redis.url()).await;
    let counter = |key, limit| WindowCounter {
        key,
        window: Duration::from_secs(60),
        limit,
        amount: 1,
    };
    let both = [counter("rl:a", 5), counter("rl:b", 1)];
    let Some(Taken::Added(buckets)) = c.window_take(&both).await else {
        panic!("first take refused");
    };
    assert_eq!(buckets.len(), 2);
    // rl:b is full: nothing is added to rl:a either, and the answer names rl:b.
    assert_eq!(
        c.window_take(&both).await,
        Some(Taken::Over { index: 1, count: 1 })
    );
    let sum = |key| -> u64 {
        redis
            .cli(&["HVALS", key])
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .sum()
    };
    assert_eq!((sum("postern:rl:a"), sum("postern:rl:b")), (1, 1));
    // Both given back in one call.
    c.window_give_back(&[("rl:a", buckets[0], 1), ("rl:b", buckets[1], 1)])
        .await;
    assert_eq!(redis.cli(&["EXISTS", "postern:rl:a", "postern:rl:b"]), "0");
    assert_eq!(c.window_take(&[]).await, Some(Taken::Added(Vec::new())));
}

#[tokio::test]
async fn window_slides_and_its_key_expires() {
    let redis = RedisServer::start(None).unwrap();
    let c = up(&redis.url()).await;
    // 160 ms: buckets of 10 ms, 17 of them counted (170 ms), the key lives 170 ms.
    let window = Duration::from_millis(160);
    for _ in 0..2 {
        assert!(matches!(
            c.window_add("rl:slide", window, 2, 1).await,
            Some(WindowAdd::Added { .. })
        ));
    }
    assert!(matches!(
        c.window_add("rl:slide", window, 2, 1).await,
        Some(WindowAdd::Over { .. })
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(redis.cli(&["EXISTS", "postern:rl:slide"]), "0");
    assert!(matches!(
        c.window_add("rl:slide", window, 2, 1).await,
        Some(WindowAdd::Added { .. })
    ));
}

#[tokio::test]
async fn lockout_is_shared_and_follows_the_limiter() {
    let redis = RedisServer::start(None).unwrap();
    let c = up(&redis.url()).await;
    let s = settings();
    for n in 1..=2 {
        let o = failed(
            c.auth_settle(ip(7), "alice", true, false, &s, c.timeout())
                .await,
        );
        assert_eq!(o.ip_failures, n);
        assert!(o.started.is_empty());
        assert_eq!(
            c.auth_check(ip(7), "alice", &s, c.timeout()).await,
            Some(None)
        );
    }
    let o = failed(
        c.auth_settle(ip(7), "alice", true, false, &s, c.timeout())
            .await,
    );
    assert_eq!(o.ip_failures, 3);
    let scopes: Vec<Scope> = o.started.iter().map(|l| l.scope).collect();
    assert_eq!(scopes, [Scope::Ip, Scope::User]);
    // The address is refused whatever the name; the name from any address.
    let lock = c
        .auth_check(ip(7), "bob", &s, c.timeout())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lock.scope, Scope::Ip);
    assert!(lock.remaining > 14 * MIN && lock.remaining <= 15 * MIN);
    let lock = c
        .auth_check(ip(8), "alice", &s, c.timeout())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lock.scope, Scope::User);
    assert_eq!(
        c.auth_check(ip(8), "bob", &s, c.timeout()).await,
        Some(None)
    );
    // An attempt checked before the lockout began is refused when it settles.
    match c
        .auth_settle(ip(7), "alice", true, true, &s, c.timeout())
        .await
    {
        Some(Settled::Refused(l)) => assert_eq!(l.scope, Scope::Ip),
        other => panic!("{other:?}"),
    }
    // Keys expire by themselves: the lock with the lockout, the marks with the window.
    let ttl: i64 = redis
        .cli(&["TTL", "postern:auth:lock:ip:192.0.2.7"])
        .parse()
        .unwrap();
    assert!(ttl > 890 && ttl <= 900, "{ttl}");
    let ttl: i64 = redis
        .cli(&["TTL", "postern:auth:fail:ip:192.0.2.7"])
        .parse()
        .unwrap();
    assert!(ttl > 590 && ttl <= 601, "{ttl}");
    assert_eq!(redis.cli(&["ZCARD", "postern:auth:fail:ip:192.0.2.7"]), "3");
}

#[tokio::test]
async fn lockout_success_clears_only_the_users_count() {
    let redis = RedisServer::start(None).unwrap();
    let c = up(&redis.url()).await;
    let s = settings();
    failed(
        c.auth_settle(ip(1), "alice", true, false, &s, c.timeout())
            .await,
    );
    failed(
        c.auth_settle(ip(2), "alice", true, false, &s, c.timeout())
            .await,
    );
    assert_eq!(
        c.auth_settle(ip(3), "alice", true, true, &s, c.timeout())
            .await,
        Some(Settled::Granted)
    );
    // Her count restarted: two more failures do not reach three.
    failed(
        c.auth_settle(ip(4), "alice", true, false, &s, c.timeout())
            .await,
    );
    let o = failed(
        c.auth_settle(ip(5), "alice", true, false, &s, c.timeout())
            .await,
    );
    assert!(o.started.is_empty());
    assert_eq!(
        c.auth_check(ip(6), "alice", &s, c.timeout()).await,
        Some(None)
    );

    // The address's count is not reset by a success; unknown names are not counted.
    let s = Settings {
        per_user: false,
        ..settings()
    };
    for n in 1..=2 {
        let o = failed(
            c.auth_settle(ip(9), "nobody", false, false, &s, c.timeout())
                .await,
        );
        assert_eq!(o.ip_failures, n);
        assert_eq!(
            c.auth_settle(ip(9), "bob", true, true, &s, c.timeout())
                .await,
            Some(Settled::Granted)
        );
    }
    let o = failed(
        c.auth_settle(ip(9), "nobody", false, false, &s, c.timeout())
            .await,
    );
    assert_eq!(o.started.len(), 1);
    assert_eq!(redis.cli(&["EXISTS", "postern:auth:fail:user:nobody"]), "0");
}

#[tokio::test]
async fn lockout_counts_ipv6_per_block_and_merges_marks_beyond_the_cap() {
    let redis = RedisServer::start(None).unwrap();
    let c = up(&redis.url()).await;
    let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
    let s = settings();
    for a in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::1"] {
        failed(
            c.auth_settle(v6(a), "x", false, false, &s, c.timeout())
                .await,
        );
    }
    let lock = c
        .auth_check(v6("2001:db8:1:2:abcd::9"), "x", &s, c.timeout())
        .await;
    assert_eq!(lock.unwrap().unwrap().scope, Scope::Ip);
    assert_eq!(
        c.auth_check(v6("2001:db8:1:3::1"), "x", &s, c.timeout())
            .await,
        Some(None)
    );

    // max_failures 40: at most MAX_MARKS marks kept, the count stays exact, and the
    // lockout starts at the 40th failure.
    let s = Settings {
        max_failures: 40,
        ..settings()
    };
    for n in 1..40 {
        let o = failed(
            c.auth_settle(ip(1), "x", false, false, &s, c.timeout())
                .await,
        );
        assert_eq!(o.ip_failures, n);
        assert!(o.started.is_empty());
    }
    let o = failed(
        c.auth_settle(ip(1), "x", false, false, &s, c.timeout())
            .await,
    );
    assert_eq!(o.started.len(), 1);
    let marks: usize = redis
        .cli(&["ZCARD", "postern:auth:fail:ip:192.0.2.1"])
        .parse()
        .unwrap();
    assert!(marks <= crate::auth::limiter::MAX_MARKS, "{marks}");
}

#[tokio::test]
async fn a_window_of_failures_slides() {
    let redis = RedisServer::start(None).unwrap();
    let c = up(&redis.url()).await;
    let s = Settings {
        window: Duration::from_millis(300),
        ..settings()
    };
    failed(
        c.auth_settle(ip(1), "x", false, false, &s, c.timeout())
            .await,
    );
    failed(
        c.auth_settle(ip(1), "x", false, false, &s, c.timeout())
            .await,
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The first two have left the window: this is failure 1, not 3.
    let o = failed(
        c.auth_settle(ip(1), "x", false, false, &s, c.timeout())
            .await,
    );
    assert_eq!(o.ip_failures, 1);
    assert!(o.started.is_empty());
}

#[tokio::test]
async fn down_and_slow_redis_means_none_at_once_and_it_comes_back() {
    // Nothing listens: never up, every call None without waiting.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = Cluster::new(
        &config(&format!("redis://127.0.0.1:{port}/0")),
        Arc::new(Metrics::new([])),
    )
    .unwrap();
    assert!(!c.is_up());
    // Not up: no call goes out, nothing waits for the bound (200 ms).
    let asked = std::time::Instant::now();
    assert_eq!(c.window_add("rl:x", MIN, 1, 1).await, None);
    assert_eq!(
        c.auth_check(ip(1), "x", &settings(), c.timeout()).await,
        None
    );
    assert!(asked.elapsed() < c.timeout(), "{:?}", asked.elapsed());

    // Paused (SIGSTOP): the call gives up at the bound, then the client is down.
    let redis = RedisServer::start(None).unwrap();
    let metrics = Arc::new(Metrics::new([]));
    let c = Cluster::new(&config(&redis.url()), Arc::clone(&metrics)).unwrap();
    wait_for(&c, true).await;
    redis.pause();
    assert_eq!(c.window_add("rl:x", MIN, 5, 1).await, None);
    assert!(!c.is_up());
    assert_eq!(c.window_add("rl:x", MIN, 5, 1).await, None);
    let text = metrics.render(0);
    assert!(text.contains("postern_cluster_redis_up 0\n"), "{text}");
    assert!(
        text.contains("postern_cluster_redis_failures_total 1\n"),
        "{text}"
    );
    redis.resume();
    wait_for(&c, true).await;
    assert!(matches!(
        c.window_add("rl:x", MIN, 5, 1).await,
        Some(WindowAdd::Added { .. })
    ));
    assert!(metrics.render(0).contains("postern_cluster_redis_up 1\n"));
}

#[tokio::test]
async fn a_password_url_works_and_a_wrong_one_never_comes_up() {
    let redis = RedisServer::start(Some("s3cret")).unwrap();
    let url = format!("redis://:s3cret@127.0.0.1:{}/0", redis.port());
    let c = up(&url).await;
    assert_eq!(
        c.shown_url(),
        format!("redis://:***@127.0.0.1:{}/0", redis.port())
    );
    assert!(matches!(
        c.window_add("rl:pw", MIN, 1, 1).await,
        Some(WindowAdd::Added { .. })
    ));
    let wrong = format!("redis://:nope@127.0.0.1:{}/0", redis.port());
    let c = Cluster::new(&config(&wrong), Arc::new(Metrics::new([]))).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!c.is_up());
}

#[tokio::test]
async fn a_key_of_the_wrong_type_is_a_local_count_not_an_outage() {
    let redis = RedisServer::start(None).unwrap();
    let c = up(&redis.url()).await;
    redis.cli(&["SET", "postern:rl:odd", "x"]);
    assert_eq!(c.window_add("rl:odd", MIN, 5, 1).await, None);
    assert!(c.is_up());
}

/// A burst of parallel guesses (as from several nodes at once) settles atomically:
/// exactly max_failures of them are counted, every later one is refused.
#[tokio::test]
async fn a_burst_of_parallel_failures_cannot_get_past_the_lockout() {
    let redis = RedisServer::start(None).unwrap();
    let c = up(&redis.url()).await;
    let s = settings();
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                c.auth_settle(ip(3), "alice", true, false, &s, c.timeout())
                    .await
            })
        })
        .collect();
    let (mut counted, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Some(Settled::Failed(_)) => counted += 1,
            Some(Settled::Refused(_)) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((counted, refused), (3, 9));
}

/// Redis gone (killed) and started again on the same address: the client goes down,
/// then reconnects by itself and shares again.
#[tokio::test]
async fn a_restarted_redis_is_found_again() {
    let redis = RedisServer::start(None).unwrap();
    let port = redis.port();
    let c = up(&redis.url()).await;
    drop(redis);
    wait_for(&c, false).await;
    assert_eq!(c.window_add("rl:again", MIN, 5, 1).await, None);
    let redis = RedisServer::start_on(port, None).unwrap();
    wait_for(&c, true).await;
    assert!(matches!(
        c.window_add("rl:again", MIN, 5, 1).await,
        Some(WindowAdd::Added { .. })
    ));
    drop(redis);
}

#[tokio::test]
async fn a_client_serves_a_reload_only_while_its_tls_files_are_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let ca = postern_testkit::TestCa::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    let mut k = config("rediss://127.0.0.1:1/0");
    k.ca_file = Some(ca_file.clone());
    let c = Cluster::new(&k, Arc::new(Metrics::new([]))).unwrap();
    assert!(c.serves(&k));
    // Renewed in place: a new client is needed.
    std::fs::write(&ca_file, postern_testkit::TestCa::new().ca_pem()).unwrap();
    assert!(!c.serves(&k));
    // No certificate in it: an error for the new client, never a silent reuse.
    std::fs::write(&ca_file, "not a certificate").unwrap();
    assert!(!c.serves(&k));
    let err = Cluster::new(&k, Arc::new(Metrics::new([]))).unwrap_err();
    assert!(format!("{err:#}").contains("no PEM certificate"), "{err:#}");
    let mut other = k.clone();
    other.node = "another".into();
    assert!(!c.serves(&other));
}
