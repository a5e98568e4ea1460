//! A real `redis-server` for the cluster tests: started on a free loopback port in a
//! temporary directory, with no persistence (`--save '' --appendonly no`), killed when
//! dropped. [`RedisServer::pause`] and [`RedisServer::resume`] send SIGSTOP and SIGCONT
//! (a Redis that hangs rather than one that is gone), [`RedisServer::cli`] runs
//! `redis-cli` against it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`; killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    /// The TLS port of [`RedisServer::start_tls`].
    tls_port: Option<u16>,
    dir: std::path::PathBuf,
}

/// What a server is started as.
enum Role {
    Primary,
    /// A replica of the primary on this port.
    Replica(u16),
    /// A sentinel watching the primary on this port under this name.
    Sentinel(u16, String),
}

/// What [`RedisServer::start_tls`] serves TLS with (PEM files).
pub struct RedisTls<'a> {
    pub cert: &'a std::path::Path,
    pub key: &'a std::path::Path,
    /// The CA client certificates must chain to (`tls-ca-cert-file`).
    pub ca: &'a std::path::Path,
    /// `tls-auth-clients yes` (Redis's default) rather than `no`.
    pub client_certificates: bool,
}

impl RedisServer {
    /// Starts one and waits until it answers PING (at most 10 s). `password`: set as
    /// `requirepass`.
    pub fn start(password: Option<&str>) -> std::io::Result<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        RedisServer::start_on(port, password)
    }

    /// Like [`start`](Self::start) on a given port (a restart of a server that was
    /// dropped: its clients reconnect to the same address).
    pub fn start_on(port: u16, password: Option<&str>) -> std::io::Result<RedisServer> {
        RedisServer::spawn(port, password, None, Role::Primary)
    }

    /// A server that speaks plain text on [`port`](Self::port) (for [`cli`](Self::cli)
    /// and the readiness check) and TLS on [`tls_port`](Self::tls_port).
    pub fn start_tls(tls: &RedisTls<'_>) -> std::io::Result<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        RedisServer::spawn(port, None, Some(tls), Role::Primary)
    }

    /// A replica of `primary` (`--replicaof`), for the Sentinel tests.
    pub fn start_replica(primary: &RedisServer) -> std::io::Result<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        RedisServer::spawn(port, None, None, Role::Replica(primary.port))
    }

    /// A Redis Sentinel watching `primary` as master `name`, alone (quorum 1), quick to
    /// fail over: the master is down after 500 ms without an answer.
    pub fn start_sentinel(primary: &RedisServer, name: &str) -> std::io::Result<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        RedisServer::spawn(
            port,
            None,
            None,
            Role::Sentinel(primary.port, name.to_string()),
        )
    }

    fn spawn(
        port: u16,
        password: Option<&str>,
        tls: Option<&RedisTls<'_>>,
        role: Role,
    ) -> std::io::Result<RedisServer> {
        let dir = std::env::temp_dir().join(format!("postern-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new("redis-server");
        if let Role::Sentinel(primary, name) = &role {
            // A sentinel rewrites its configuration file: it must have one of its own.
            let conf = dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "sentinel monitor {name} 127.0.0.1 {primary} 1\n\
                     sentinel down-after-milliseconds {name} 500\n\
                     sentinel failover-timeout {name} 2000\n"
                ),
            )?;
            cmd.arg(&conf).arg("--sentinel");
        }
        if let Role::Replica(primary) = role {
            cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = password {
            cmd.args(["--requirepass", p]);
        }
        let mut tls_port = None;
        if let Some(t) = tls {
            let p = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            tls_port = Some(p);
            cmd.args(["--tls-port", &p.to_string()])
                .arg("--tls-cert-file")
                .arg(t.cert)
                .arg("--tls-key-file")
                .arg(t.key)
                .arg("--tls-ca-cert-file")
                .arg(t.ca)
                .args([
                    "--tls-auth-clients",
                    if t.client_certificates { "yes" } else { "no" },
                ]);
        }
        let child = cmd.spawn()?;
        let mut server = RedisServer {
            child,
            port,
            tls_port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.answers(password) {
            if Instant::now() > deadline {
                return Err(std::io::Error::other("redis-server did not answer PING"));
            }
            if let Some(status) = server.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "redis-server exited: {status}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// Whether it answers PING now (in 1 s).
    fn answers(&self, password: Option<&str>) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if let Some(p) = password {
            let _ = write!(s, "AUTH {p}\r\n");
        }
        let _ = s.write_all(b"PING\r\n");
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.windows(5).any(|w| w == b"+PONG") {
                return true;
            }
        }
        false
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TLS port (servers of [`start_tls`](Self::start_tls) only).
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGSTOP: the server hangs, its connections stay open.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let ok = Command::new("kill")
            .args([which, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {which} redis-server");
    }

    /// `redis-cli -p PORT ARGS...`; its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A paused server does not die of SIGKILL any slower, but resume it anyway so
        // nothing is left stopped if the kill fails.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
