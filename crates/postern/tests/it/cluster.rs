//! `[cluster]` (issue 13, docs/cluster.md) against the real binary and a real
//! `redis-server` (started per test on a free loopback port, no persistence):
//! - an AUTH lockout earned on one node holds on another node sharing the Redis, and
//!   not on a node without `[cluster]`;
//! - Redis hanging (SIGSTOP) while mail flows: every message is accepted, the node logs
//!   one "unreachable" line and shows `postern_cluster_redis_up 0`; after SIGCONT it
//!   says so once, shows 1, and lockouts are shared again;
//! - a `[[rate_limit]]` counts the messages of both nodes together, its keys expire on
//!   their own, and with Redis hanging each node counts alone;
//! - `rediss://` with a private CA and a client certificate (Redis's default
//!   `tls-auth-clients yes`); without the CA the node never trusts the server;
//! - Redis Sentinel: a master, a replica and a sentinel; the nodes find the master
//!   through the sentinel and follow it to the replica when it fails over;
//! - the Redis password is never printed (check-config, the log).
//!
//! AUTH runs on a plain-text listener (`allow_plaintext_auth`), as in hardening_auth.rs.

use std::time::Duration;

use base64::Engine;
use postern_testkit::RedisServer;

use crate::common::{INSIDE, OUTSIDE, Server, free_port, http_get, run_cli, wait_until};

const ALICE: &str = "correct horse";
const BOB: &str = "battery staple";
const DOWN_LINE: &str = "redis unreachable or slow, counting locally";
const UP_AGAIN_LINE: &str = "redis answers again, counters shared";

/// A node's configuration: a plain-text AUTH listener, lockout after 3 failures, a
/// metrics endpoint, and `cluster` as its `[cluster]` section (empty: none).
fn node_config(dir: &std::path::Path, port: u16, metrics: u16, cluster: &str) -> String {
    format!(
        r#"hostname = "relay.test"
spool_dir = "{spool}"

[[listener]]
address = "127.0.0.1:{port}"
tls = "none"
auth = "optional"
allow_plaintext_auth = true

[relay]
accepted_domains = ["accepted.test"]
trusted_networks = ["127.0.0.1/32"]

[auth]
users_file = "{users}"
max_failures = 3

[metrics]
address = "127.0.0.1:{metrics}"

[[route]]
domains = ["*"]
next_hop = "[127.0.0.1]:1"

{cluster}
"#,
        spool = dir.join("spool").display(),
        users = dir.join("users").display(),
    )
}

/// A running node with users alice and bob; `metrics` is its metrics port.
struct Node {
    server: Server,
    metrics: u16,
}

impl Node {
    /// A node on `redis_url` named `name`, or a node without `[cluster]` when `None`.
    /// Waits until it has reached Redis, so the test starts with shared counters.
    fn start(redis_url: Option<&str>, name: &str) -> Node {
        Node::start_with(redis_url, name, "")
    }

    /// [`Node::start`] with `extra` (`[[rate_limit]]`s) in the configuration.
    fn start_with(redis_url: Option<&str>, name: &str, extra: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let (port, metrics) = (free_port(), free_port());
        let cluster = match redis_url {
            Some(url) => format!("[cluster]\nredis = \"{url}\"\nnode = \"{name}\"\n{extra}"),
            None => extra.to_string(),
        };
        let text = node_config(dir.path(), port, metrics, &cluster);
        let config = dir.path().join("postern.toml");
        std::fs::write(&config, &text).unwrap();
        crate::common::add_user(&config, "alice", ALICE);
        crate::common::add_user(&config, "bob", BOB);
        let node = Node {
            server: Server::start_with_config(dir, port, &text),
            metrics,
        };
        if redis_url.is_some() {
            wait_until("the node to reach redis", Duration::from_secs(10), || {
                node.server.log().contains("redis answers, counters shared")
            });
        }
        node
    }

    /// One AUTH PLAIN from `from` in a fresh session; the reply code.
    fn auth(&self, from: &str, user: &str, pass: &str) -> u16 {
        let mut c = self.server.client(from);
        c.hello();
        let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
        c.cmd(&format!("AUTH PLAIN {plain}")).code
    }

    /// `postern_cluster_redis_up`'s value, if shown.
    fn redis_up(&self) -> Option<String> {
        let (_, _, body) = http_get(self.metrics, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix("postern_cluster_redis_up "))
            .map(str::to_string)
    }

    /// Locks `from` (and `user`, when it is a known name) out: max_failures (3) wrong
    /// passwords.
    fn lock_out(&self, from: &str, user: &str) {
        for _ in 0..3 {
            assert_eq!(self.auth(from, user, "wrong"), 535);
        }
    }
}

#[test]
fn a_lockout_earned_on_one_node_holds_on_the_other() {
    let redis = RedisServer::start(None).unwrap();
    let a = Node::start(Some(&redis.url()), "edge-a");
    let b = Node::start(Some(&redis.url()), "edge-b");
    let alone = Node::start(None, "alone");

    a.lock_out(OUTSIDE, "alice");
    // Node B refuses the address, even with the right password, and alice from any
    // other untrusted address (her name is locked out too); bob elsewhere is fine.
    assert_eq!(b.auth(OUTSIDE, "alice", ALICE), 454);
    assert_eq!(b.auth(OUTSIDE, "bob", BOB), 454);
    assert_eq!(b.auth("127.0.0.3", "alice", ALICE), 454);
    assert_eq!(b.auth("127.0.0.3", "bob", BOB), 235);
    // Trusted clients are never locked out.
    assert_eq!(b.auth(INSIDE, "alice", ALICE), 235);
    assert!(
        b.server
            .log()
            .contains("client=127.0.0.2 user=alice scope=ip"),
        "{}",
        b.server.log()
    );
    // A node that counts alone knows nothing of it.
    assert_eq!(alone.auth(OUTSIDE, "alice", ALICE), 235);
    assert_eq!(alone.redis_up(), None);
    assert_eq!(a.redis_up().as_deref(), Some("1"));
}

#[test]
fn redis_hanging_while_mail_flows_means_local_counting_then_shared_again() {
    let password = "s3cret-redis-pw";
    let redis = RedisServer::start(Some(password)).unwrap();
    let url = format!("redis://:{password}@127.0.0.1:{}/0", redis.port());
    let a = Node::start(Some(&url), "edge-a");
    let b = Node::start(Some(&url), "edge-b");
    assert_eq!(a.redis_up().as_deref(), Some("1"));

    redis.pause();
    // Authenticated submissions keep flowing: each AUTH asks Redis first (the first one
    // waits at most the timeout, the others not at all), and every message gets its 250.
    for n in 0..3 {
        let mut c = a.server.client(OUTSIDE);
        c.hello();
        let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0alice\0{ALICE}"));
        assert_eq!(c.cmd(&format!("AUTH PLAIN {plain}")).code, 235);
        let r = c.send_mail(
            "alice@accepted.test",
            &["someone@elsewhere.test"],
            &crate::common::message(&format!("while-down-{n}")),
        );
        assert_eq!(r.code, 250, "{}", r.text());
        c.expect("QUIT", 221);
    }
    wait_until("the down metric", Duration::from_secs(5), || {
        a.redis_up().as_deref() == Some("0")
    });
    assert_eq!(
        a.server.log().matches(DOWN_LINE).count(),
        1,
        "{}",
        a.server.log()
    );
    // Counting goes on locally meanwhile.
    a.lock_out("127.0.0.4", "nobody");
    assert_eq!(a.auth("127.0.0.4", "bob", BOB), 454);

    redis.resume();
    for node in [&a, &b] {
        wait_until("the up metric", Duration::from_secs(5), || {
            node.redis_up().as_deref() == Some("1")
        });
    }
    assert_eq!(
        a.server.log().matches(UP_AGAIN_LINE).count(),
        1,
        "{}",
        a.server.log()
    );
    assert_eq!(a.server.log().matches(DOWN_LINE).count(), 1);
    // Shared again: a lockout earned on A now holds on B.
    a.lock_out("127.0.0.5", "nobody");
    assert_eq!(b.auth("127.0.0.5", "bob", BOB), 454);
    // The password was in no log line.
    assert!(!a.server.log().contains(password));
    assert!(
        a.server.log().contains(":***@127.0.0.1"),
        "{}",
        a.server.log()
    );
}

/// One authenticated message from `from` as alice; the reply to MAIL if it was not 250,
/// else to the dot.
fn alice_sends(node: &Node, from: &str) -> u16 {
    let mut c = node.server.client(from);
    c.hello();
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0alice\0{ALICE}"));
    c.expect(&format!("AUTH PLAIN {plain}"), 235);
    let r = c.cmd("MAIL FROM:<alice@accepted.test>");
    if r.code != 250 {
        return r.code;
    }
    c.expect("RCPT TO:<someone@elsewhere.test>", 250);
    c.data(&crate::common::message("limited")).code
}

const ALICE_LIMIT: &str = r#"
[[rate_limit]]
name = "roaming"
clients = "authenticated"
per = "user"
messages = 3
window = "1m"
"#;

#[test]
fn a_rate_limit_counts_the_messages_of_every_node_together() {
    let redis = RedisServer::start(None).unwrap();
    let a = Node::start_with(Some(&redis.url()), "edge-a", ALICE_LIMIT);
    let b = Node::start_with(Some(&redis.url()), "edge-b", ALICE_LIMIT);
    let alone = Node::start_with(None, "alone", ALICE_LIMIT);
    assert_eq!(alice_sends(&a, OUTSIDE), 250);
    assert_eq!(alice_sends(&b, "127.0.0.3"), 250);
    // A message refused at its end (too many hops) is given back on Redis too.
    let mut c = a.server.client(OUTSIDE);
    c.hello();
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0alice\0{ALICE}"));
    c.expect(&format!("AUTH PLAIN {plain}"), 235);
    c.expect("MAIL FROM:<alice@accepted.test>", 250);
    c.expect("RCPT TO:<someone@elsewhere.test>", 250);
    let looped = "Received: x\r\n".repeat(120) + &crate::common::message("loop");
    assert_eq!(c.data(&looped).code, 554);
    // Given back off the session's path: wait until Redis holds 2 again.
    let key = "postern:rl:roaming:m:authenticated:user:1m:alice";
    wait_until("the refund", Duration::from_secs(5), || {
        let fields = redis.cli(&["hvals", key]);
        fields
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .sum::<u64>()
            == 2
    });
    assert_eq!(alice_sends(&b, OUTSIDE), 250);
    // Three in the window, across both nodes: the fourth is refused on either.
    assert_eq!(alice_sends(&a, OUTSIDE), 451);
    assert_eq!(alice_sends(&b, "127.0.0.4"), 451);
    assert!(
        b.server.log().contains("limit=roaming"),
        "{}",
        b.server.log()
    );
    // The key expires by itself: within the window plus one bucket (60 s + 3.75 s).
    let ttl: i64 = redis.cli(&["pttl", key]).trim().parse().unwrap();
    assert!(ttl > 50_000 && ttl <= 63_750, "pttl {ttl}");
    // A node that counts alone has its own three.
    for _ in 0..3 {
        assert_eq!(alice_sends(&alone, OUTSIDE), 250);
    }
    assert_eq!(alice_sends(&alone, OUTSIDE), 451);

    // Redis hanging: each node counts what it has seen itself (A saw one message kept,
    // so it allows two more), and mail never waits on Redis beyond the bound.
    redis.pause();
    assert_eq!(alice_sends(&a, OUTSIDE), 250);
    assert_eq!(alice_sends(&a, OUTSIDE), 250);
    assert_eq!(alice_sends(&a, OUTSIDE), 451);
    redis.resume();
    wait_until("the up metric", Duration::from_secs(5), || {
        a.redis_up().as_deref() == Some("1")
    });
    // Shared again: Redis still holds the three of before the pause.
    assert_eq!(alice_sends(&a, OUTSIDE), 451);
    // What A counted alone still counts on A, even when Redis has forgotten everything
    // (a Redis restarted empty): A has seen three in the window.
    redis.cli(&["FLUSHALL"]);
    assert_eq!(alice_sends(&a, OUTSIDE), 451);
    // B, which saw two, may send one more now that Redis starts again from zero.
    assert_eq!(alice_sends(&b, OUTSIDE), 250);
}

#[test]
fn check_config_hides_the_redis_password() {
    let dir = tempfile::tempdir().unwrap();
    let text = node_config(
        dir.path(),
        free_port(),
        free_port(),
        "[cluster]\nredis = \"redis://postern:hunter2@127.0.0.1:6379/0\"\nnode = \"edge-1\"\n",
    );
    let config = dir.path().join("postern.toml");
    std::fs::write(&config, text).unwrap();
    let (code, out, err) = run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("cluster: node edge-1, AUTH lockouts and rate-limit counters shared through redis://postern:***@127.0.0.1:6379/0"),
        "{out}"
    );
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );
}

#[test]
fn reload_keeps_an_unchanged_client_and_replaces_a_changed_one() {
    const SHARING: &str = "[cluster]: sharing AUTH lockouts";
    let redis = RedisServer::start(None).unwrap();
    let a = Node::start(Some(&redis.url()), "edge-a");
    let reload = || {
        let (code, out, err) = run_cli(&["reload", "--config", a.server.config.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        out + &err
    };
    reload();
    assert_eq!(a.server.log().matches(SHARING).count(), 1);
    assert_eq!(a.redis_up().as_deref(), Some("1"));

    let text = std::fs::read_to_string(&a.server.config).unwrap();
    std::fs::write(&a.server.config, text.replace("edge-a", "edge-renamed")).unwrap();
    assert!(reload().contains("cluster"));
    assert_eq!(a.server.log().matches(SHARING).count(), 2);
    wait_until(
        "the new client to reach redis",
        Duration::from_secs(5),
        || {
            a.server
                .log()
                .matches("redis answers, counters shared")
                .count()
                == 2
        },
    );
    a.lock_out(OUTSIDE, "nobody");
    assert_eq!(
        redis.cli(&["EXISTS", "postern:auth:lock:ip:127.0.0.2"]),
        "1"
    );

    // Without [cluster] the node counts alone, and its metrics say nothing of Redis.
    let text = std::fs::read_to_string(&a.server.config).unwrap();
    let (before, _) = text.split_once("[cluster]").unwrap();
    std::fs::write(&a.server.config, before).unwrap();
    reload();
    assert_eq!(a.redis_up(), None);
}

#[test]
fn rediss_with_a_private_ca_and_a_client_certificate_shares_lockouts() {
    let dir = tempfile::tempdir().unwrap();
    let ca = postern_testkit::TestCa::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    let server_dir = dir.path().join("server");
    let client_dir = dir.path().join("client");
    std::fs::create_dir_all(&server_dir).unwrap();
    std::fs::create_dir_all(&client_dir).unwrap();
    let (cert, key) = ca.issue(&["127.0.0.1"]).write_to(&server_dir);
    let redis = postern_testkit::RedisServer::start_tls(&postern_testkit::RedisTls {
        cert: &cert,
        key: &key,
        ca: &ca_file,
        client_certificates: true,
    })
    .unwrap();
    let (client_cert, client_key) = ca.issue(&["edge.test"]).write_to(&client_dir);
    let url = format!("rediss://127.0.0.1:{}/0", redis.tls_port().unwrap());
    let tls = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        ca_file.display(),
        client_cert.display(),
        client_key.display()
    );
    let a = Node::start_with(Some(&url), "edge-a", &tls);
    let b = Node::start_with(Some(&url), "edge-b", &tls);
    a.lock_out(OUTSIDE, "alice");
    assert_eq!(b.auth(OUTSIDE, "alice", ALICE), 454);
    assert_eq!(
        redis.cli(&["EXISTS", "postern:auth:lock:ip:127.0.0.2"]),
        "1",
        "the lockout is in Redis, reached over TLS"
    );

    // Without the private CA the server's certificate is not trusted: the node never
    // shares (it says so once) and counts on its own.
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics) = (free_port(), free_port());
    let cluster = format!("[cluster]\nredis = \"{url}\"\nnode = \"edge-c\"\n");
    let text = node_config(dir.path(), port, metrics, &cluster);
    let config = dir.path().join("postern.toml");
    std::fs::write(&config, &text).unwrap();
    crate::common::add_user(&config, "alice", ALICE);
    let c = Node {
        server: Server::start_with_config(dir, port, &text),
        metrics,
    };
    wait_until("the refusal", Duration::from_secs(10), || {
        c.server.log().contains(DOWN_LINE)
    });
    assert_eq!(c.auth(OUTSIDE, "alice", ALICE), 235);
    assert_eq!(c.redis_up().as_deref(), Some("0"));
}

#[test]
fn with_sentinels_the_nodes_follow_a_failover() {
    let primary = RedisServer::start(None).unwrap();
    let replica = RedisServer::start_replica(&primary).unwrap();
    let sentinel = RedisServer::start_sentinel(&primary, "postern").unwrap();
    // The URL's host is the master's name; the sentinel says where it is.
    let url = "redis://postern/0";
    let sentinels = format!("sentinels = [\"127.0.0.1:{}\"]\n", sentinel.port());
    let a = Node::start_with(Some(url), "edge-a", &sentinels);
    let b = Node::start_with(Some(url), "edge-b", &sentinels);
    let master_line = format!("master=127.0.0.1:{}", primary.port());
    assert!(a.server.log().contains(&master_line), "{}", a.server.log());

    a.lock_out(OUTSIDE, "alice");
    assert_eq!(b.auth(OUTSIDE, "alice", ALICE), 454);
    // The lockout reaches the replica, then the master dies and the sentinel promotes
    // the replica.
    let key = "postern:auth:lock:ip:127.0.0.2";
    wait_until("replication", Duration::from_secs(10), || {
        replica.cli(&["EXISTS", key]) == "1"
    });
    let promoted = format!("master=127.0.0.1:{}", replica.port());
    drop(primary);
    wait_until("the failover", Duration::from_secs(20), || {
        a.server.log().contains(&promoted) && b.server.log().contains(&promoted)
    });
    for node in [&a, &b] {
        wait_until("shared again", Duration::from_secs(10), || {
            node.redis_up().as_deref() == Some("1")
        });
    }
    // What was counted before is still there, and new counts go to the new master.
    assert_eq!(b.auth(OUTSIDE, "alice", ALICE), 454);
    a.lock_out("127.0.0.6", "nobody");
    assert_eq!(b.auth("127.0.0.6", "bob", BOB), 454);
    assert_eq!(
        replica.cli(&["EXISTS", "postern:auth:lock:ip:127.0.0.6"]),
        "1"
    );
}

#[test]
fn a_hanging_sentinel_does_not_stop_the_sharing() {
    let primary = RedisServer::start(None).unwrap();
    let hanging = RedisServer::start_sentinel(&primary, "postern").unwrap();
    let good = RedisServer::start_sentinel(&primary, "postern").unwrap();
    hanging.pause();
    let sentinels = format!(
        "sentinels = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n",
        hanging.port(),
        good.port()
    );
    let a = Node::start_with(Some("redis://postern/0"), "edge-a", &sentinels);
    let b = Node::start_with(Some("redis://postern/0"), "edge-b", &sentinels);
    a.lock_out(OUTSIDE, "alice");
    assert_eq!(b.auth(OUTSIDE, "alice", ALICE), 454);
    // Both sentinels stopped: the master they named still answers, and sharing goes on.
    good.pause();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(a.redis_up().as_deref(), Some("1"));
    a.lock_out("127.0.0.7", "nobody");
    assert_eq!(b.auth("127.0.0.7", "bob", BOB), 454);
    good.resume();
    hanging.resume();
}
