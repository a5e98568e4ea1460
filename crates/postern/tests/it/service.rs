//! Postern as a service (interface: "Operations"): systemd's readiness protocol through a
//! real `NOTIFY_SOCKET` datagram socket, `contrib/postern.service` as `systemd-analyze
//! verify` sees it, dropping root for `user` (as root, which CI is; skipped otherwise),
//! and the Debian package built by `scripts/package-deb`, unpacked and inspected.

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postern_testkit::sink::{Sink, SinkConfig};

use crate::common::{Client, INSIDE, base_config, free_port, message, route_to, run_cli};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A running `postern serve`, killed when dropped.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    /// `prefix` runs before the binary (e.g. `setpriv ...`); `env` is added to its
    /// environment. The log goes to `dir/postern.log`.
    fn start(dir: &Path, config: &Path, prefix: &[String], env: &[(&str, &Path)]) -> Running {
        let log = dir.join("postern.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let bin = env!("CARGO_BIN_EXE_postern");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Running {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `port` answers with a banner.
    fn wait_banner(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if banner_now(port) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("postern exited early ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "postern did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; asserts a clean exit within 15 s.
    fn terminate(&mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status}:\n{}", self.log());
                return;
            }
            assert!(Instant::now() < deadline, "no exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One connection, no retry: the banner arrives at once.
fn banner_now(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"220 "))
}

/// Datagrams on `socket` until one holds `line` (as a whole line); all of them.
fn wait_datagram(socket: &UnixDatagram, line: &str, log: &dyn Fn() -> String) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = text.lines().any(|l| l == line);
                got.push(text);
                if done {
                    return got;
                }
            }
            Err(e) => panic!("no {line} ({e}); got {got:?}; log:\n{}", log()),
        }
    }
}

/// systemd's side of sd_notify(3): READY=1 only once the listener accepts (the banner
/// comes at the first try, no retry), RELOADING=1 then READY=1 around a reload, and
/// STOPPING=1 on SIGTERM.
#[test]
fn notify_ready_when_accepting_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = free_port();
    let config = dir.path().join("postern.toml");
    std::fs::write(
        &config,
        base_config(port, &dir.path().join("spool"), "", ""),
    )
    .unwrap();
    let mut server = Running::start(
        dir.path(),
        &config,
        &[],
        &[("NOTIFY_SOCKET", socket_path.as_path())],
    );
    let log = || std::fs::read_to_string(dir.path().join("postern.log")).unwrap_or_default();
    let before = wait_datagram(&socket, "READY=1", &log);
    assert!(banner_now(port), "READY=1 before the listener accepts");
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(before[0].contains("STATUS="), "{before:?}");

    // A reload is announced (RELOADING=1 with MONOTONIC_USEC), then READY=1 again.
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let reloading = wait_datagram(&socket, "RELOADING=1", &log);
    assert!(
        reloading.last().unwrap().contains("MONOTONIC_USEC="),
        "{reloading:?}"
    );
    let ready = wait_datagram(&socket, "READY=1", &log);
    assert_eq!(ready.len(), 1, "{ready:?}");

    server.terminate();
    let after = wait_datagram(&socket, "STOPPING=1", &log);
    assert!(
        after.iter().all(|d| !d.contains("READY=1")),
        "READY=1 sent twice: {after:?}"
    );
}

/// The unit as shipped, verified by systemd itself. `/usr/sbin/postern` is not
/// installed here, so a copy points at the binary under test; any complaint (an
/// unknown key, a bad value, a missing command) fails the test.
#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(repo().join("contrib/postern.service")).unwrap();
    for needed in [
        "Type=notify\n",
        "ExecStart=/usr/sbin/postern serve --config /etc/postern/postern.toml\n",
        "ExecReload=",
        "NoNewPrivileges=yes\n",
        "ProtectSystem=strict\n",
        "ReadWritePaths=/var/spool/postern\n",
        "PrivateTmp=yes\n",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID",
        "Restart=on-failure\n",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let verify = |text: &str| {
        let path = dir.path().join("postern.service");
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze (scripts/test installs systemd)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout),
        )
    };
    let here = unit.replace("/usr/sbin/postern", env!("CARGO_BIN_EXE_postern"));
    let (ok, said) = verify(&here);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
    // The check sees a real mistake (a misspelt key is only a warning to systemd).
    let (_, said) = verify(&here.replace("NoNewPrivileges=", "NoNewPrivilege="));
    assert!(said.contains("NoNewPrivilege"), "{said}");
}

/// Our effective uid, from /proc (no libc in the tests).
pub(crate) fn euid() -> u32 {
    ids(Path::new("/proc/self/status"), "Uid:")[1]
}

/// The four ids (real, effective, saved, file system) of a `Uid:`/`Gid:` line.
fn ids(status: &Path, key: &str) -> Vec<u32> {
    ids_in(&std::fs::read_to_string(status).unwrap(), key)
}

/// The same, from a status file's text.
fn ids_in(text: &str, key: &str) -> Vec<u32> {
    let line = text.lines().find(|l| l.starts_with(key)).unwrap();
    line[key.len()..]
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
}

fn id_of(flag: &str, user: &str) -> u32 {
    let out = Command::new("id").args([flag, user]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Every file and directory under `dir`, `dir` included, with its owner.
fn owners(dir: &Path, out: &mut Vec<(PathBuf, u32, u32)>) {
    let meta = std::fs::symlink_metadata(dir).unwrap();
    out.push((dir.to_path_buf(), meta.uid(), meta.gid()));
    if meta.is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            owners(&e.unwrap().path(), out);
        }
    }
}

/// `setpriv` arguments that give root exactly the unit's CapabilityBoundingSet, as
/// systemd would.
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(repo().join("contrib/postern.service")).unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet in the unit");
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    vec![
        "setpriv".into(),
        format!("--bounding-set=-all,{}", caps.join(",")),
        "--".into(),
    ]
}

/// As root with `user = "nobody"`: every thread runs as nobody (real, effective, saved
/// and file-system ids, no supplementary group but nobody's), the spool belongs to
/// nobody, and mail is still accepted and delivered. Started twice under the unit's
/// capability bounding set: the first start creates the spool, the second finds it
/// owned by nobody.
#[test]
fn as_root_drops_to_user_and_still_delivers() {
    if euid() != 0 {
        eprintln!("skipped: dropping privileges needs root (CI runs as root)");
        return;
    }
    let (uid, gid) = (id_of("-u", "nobody"), id_of("-g", "nobody"));
    let sink = Sink::start(SinkConfig::default());
    let dir = tempfile::tempdir().unwrap();
    // tempfile makes it 0700 root: nobody must be able to reach the spool inside.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let spool = dir.path().join("spool");
    let config = dir.path().join("postern.toml");
    std::fs::write(
        &config,
        base_config(
            port,
            &spool,
            "user = \"nobody\"",
            // A STARTTLS listener too: its self-signed certificate is made in the spool
            // (spool/tls), as root, and must be handed over with the rest.
            &format!(
                "{}\n[[listener]]\naddress = \"127.0.0.1:{}\"\ntls = \"starttls\"\n",
                route_to(&["accepted.test"], &sink),
                free_port()
            ),
        ),
    )
    .unwrap();
    let prefix = unit_capabilities();
    for round in 1..=2 {
        let mut server = Running::start(dir.path(), &config, &prefix, &[]);
        server.wait_banner(port);
        let pid = server.child.id();
        // setpriv exec()s postern: the pid is postern's.
        let tasks: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|t| t.unwrap().path().join("status"))
            .collect();
        assert!(tasks.len() > 1, "one thread only: {tasks:?}");
        for status in &tasks {
            // A thread may end meanwhile (the one that loads the queued messages at
            // start does): it ran as the user or not at all.
            let Ok(text) = std::fs::read_to_string(status) else {
                continue;
            };
            assert_eq!(ids_in(&text, "Uid:"), [uid; 4], "{}", status.display());
            assert_eq!(ids_in(&text, "Gid:"), [gid; 4], "{}", status.display());
            let groups = text.lines().find(|l| l.starts_with("Groups:")).unwrap();
            assert_eq!(
                groups.split_whitespace().collect::<Vec<_>>(),
                ["Groups:", &gid.to_string()]
            );
        }
        let mut all = Vec::new();
        owners(&spool, &mut all);
        assert!(
            all.iter()
                .any(|(p, _, _)| p.ends_with("tls/selfsigned-key.pem")),
            "no self-signed key in the spool: {all:?}"
        );
        assert!(
            all.iter().any(|(p, _, _)| p.ends_with("control.sock")),
            "{all:?}"
        );
        let foreign: Vec<_> = all
            .iter()
            .filter(|(_, u, g)| (*u, *g) != (uid, gid))
            .collect();
        assert!(
            foreign.is_empty(),
            "round {round}: not nobody's: {foreign:?}"
        );

        let mut c = Client::connect(INSIDE, server_addr(port));
        c.hello();
        let r = c.send_mail(
            "sender@company.test",
            &["user@accepted.test"],
            &message(&format!("round{round}")),
        );
        assert_eq!(r.code, 250, "{}\n{}", r.text(), server.log());
        c.expect("QUIT", 221);
        let got = sink.wait_for(round, Duration::from_secs(20));
        assert!(
            got[round - 1]
                .data_str()
                .contains(&format!("Subject: round{round}")),
            "{}",
            server.log()
        );
        assert!(
            server.log().contains("privileges dropped"),
            "{}",
            server.log()
        );
        server.terminate();
    }
}

fn server_addr(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// As root, a listener reachable from other hosts needs `user` (or `allow_root`):
/// `serve` refuses before binding anything, and `check-config` says the same; a user
/// that does not exist is named.
#[test]
fn as_root_a_public_listener_without_user_is_refused() {
    if euid() != 0 {
        eprintln!("skipped: the root check needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let write = |name: &str, top: &str| {
        let path = dir.path().join(name);
        let text = format!(
            "spool_dir = \"{}\"\n{top}\n[[listener]]\naddress = \"0.0.0.0:{}\"\n",
            spool.display(),
            free_port()
        );
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let public = write("public.toml", "");
    for cmd in ["serve", "check-config"] {
        // Bounded: a serve that wrongly started would otherwise never return.
        let out = Command::new("timeout")
            .args([
                "20",
                env!("CARGO_BIN_EXE_postern"),
                cmd,
                "--config",
                &public,
            ])
            .output()
            .unwrap();
        let (code, out, err) = (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(code, 1, "{cmd}: {out}{err}");
        assert!(
            err.contains("refusing to run as root with a listener reachable from other hosts"),
            "{cmd}: {err}"
        );
    }
    assert!(!spool.exists(), "serve opened the spool before refusing");
    let allowed = write("allowed.toml", "allow_root = true");
    let (code, out, err) = run_cli(&["check-config", "--config", &allowed]);
    assert_eq!(code, 0, "{out}{err}");
    // Not root: becoming another user needs root (serve refuses; check-config, often run
    // unprivileged, only notes it), being yourself is fine.
    let as_nobody = |args: &[&str]| {
        let o = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_postern"))
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let other = write("other.toml", "user = \"root\"");
    let (code, said) = as_nobody(&["serve", "--config", &other]);
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains("needs Postern to be started as root"),
        "{said}"
    );
    let (code, said) = as_nobody(&["check-config", "--config", &other]);
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains("note: running as user `root` needs"),
        "{said}"
    );
    let myself = write("myself.toml", "user = \"nobody\"");
    let (code, said) = as_nobody(&["check-config", "--config", &myself]);
    assert_eq!(code, 0, "{said}");

    // An unknown user stops serve; check-config warns (the package may create it later).
    let unknown = write("unknown.toml", "user = \"no-such-postern-user\"");
    let (code, out, err) = run_cli(&["serve", "--config", &unknown]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("user `no-such-postern-user`"), "{err}");
    assert!(!spool.exists(), "serve opened the spool before refusing");
    let (code, out, err) = run_cli(&["check-config", "--config", &unknown]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("warning: user `no-such-postern-user` (key `user`) does not exist"),
        "{out}"
    );
}

/// `scripts/package-deb` (with the binary under test, so CI builds nothing twice) makes a
/// package that lintian passes without an error; unpacked into a scratch root it holds
/// the binary, the unit, the conffile, the spool and the Debian documents, and the
/// packaged binary accepts the packaged configuration.
#[test]
fn debian_package_builds_and_holds_a_working_relay() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("scripts/package-deb"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_postern"))
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "package-deb failed:\n{said}");
    // lintian's errors are lines "E: postern: tag ..."; --fail-on error makes them fatal
    // to the script too, this says which.
    assert!(!said.lines().any(|l| l.starts_with("E: ")), "{said}");
    let deb = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");

    let field = |name: &str| {
        let o = Command::new("dpkg-deb")
            .arg("-f")
            .arg(&deb)
            .arg(name)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "postern");
    assert!(field("Depends").contains("libc6"), "{}", field("Depends"));
    assert!(field("Depends").contains("adduser"), "{}", field("Depends"));

    let root = dir.path().join("root");
    let control = dir.path().join("control");
    for (flag, to) in [("-x", &root), ("-e", &control)] {
        let ok = Command::new("dpkg-deb")
            .arg(flag)
            .arg(&deb)
            .arg(to)
            .status()
            .unwrap();
        assert!(ok.success(), "dpkg-deb {flag}");
    }
    let mode = |p: &str| {
        std::fs::symlink_metadata(root.join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o7777
    };
    for (path, expected) in [
        ("usr/sbin/postern", 0o755),
        ("lib/systemd/system/postern.service", 0o644),
        ("etc/postern/postern.toml", 0o644),
        ("var/spool/postern", 0o755),
        ("usr/share/doc/postern/copyright", 0o644),
        ("usr/share/doc/postern/changelog.Debian.gz", 0o644),
        ("usr/share/doc/postern/operations.md", 0o644),
        ("usr/share/man/man8/postern.8.gz", 0o644),
    ] {
        assert_eq!(mode(path), expected, "{path}");
    }
    assert!(root.join("var/spool/postern").is_dir());
    assert_eq!(
        std::fs::read_to_string(root.join("lib/systemd/system/postern.service")).unwrap(),
        std::fs::read_to_string(repo().join("contrib/postern.service")).unwrap()
    );
    // Stripped: no symbol table left.
    let sections = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(root.join("usr/sbin/postern"))
        .output()
        .unwrap();
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_info"),
        "not stripped"
    );
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/postern/postern.toml");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system"), "{postinst}");
    assert!(postinst.contains("dpkg-statoverride"), "{postinst}");

    // The shipped configuration, as the packaged binary reads it.
    let shipped = std::fs::read_to_string(root.join("etc/postern/postern.toml")).unwrap();
    assert!(shipped.contains("\nuser = \"postern\"\n"), "{shipped}");
    assert!(
        shipped.contains("\nspool_dir = \"/var/spool/postern\"\n"),
        "{shipped}"
    );
    let bin = root.join("usr/sbin/postern");
    let check = |config: &Path| {
        let o = Command::new(&bin)
            .args(["check-config", "--config"])
            .arg(config)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let user_exists = Command::new("id")
        .arg("postern")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    let (code, out, err) = check(&root.join("etc/postern/postern.toml"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.is_empty(), "{err}");
    if !user_exists {
        // Created by postinst, which `dpkg -x` does not run: a warning, not an error
        // (serve would refuse to start).
        assert!(
            out.contains("warning: user `postern` (key `user`) does not exist"),
            "{out}"
        );
    }
    // With a user this machine has, it is valid, loopback only and never open.
    let copy = dir.path().join("postern.toml");
    std::fs::write(
        &copy,
        shipped.replace("user = \"postern\"", "user = \"nobody\""),
    )
    .unwrap();
    let (code, out, err) = check(&copy);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("open relay: NO\n"), "{out}");
    assert!(out.contains("listener 127.0.0.1:"), "{out}");
    assert!(!out.contains("listener 0.0.0.0"), "{out}");
    assert!(out.contains("then runs as user nobody"), "{out}");
}

/// As root with `user`, the spool (the user's own after the first start) is checked
/// before root opens it: a `lock` linked to a root file, or an entry that is not the
/// spool's, stops the start and nothing is written through it; only the spool's own
/// entries are handed over.
#[test]
fn as_root_a_spool_with_planted_links_is_refused() {
    if euid() != 0 {
        eprintln!("skipped: the spool check needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(spool.join("log")).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "root's own\n").unwrap();
    std::os::unix::fs::symlink(&victim, spool.join("lock")).unwrap();
    let config = dir.path().join("postern.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = \"{}\"\nuser = \"nobody\"\n[[listener]]\naddress = \"127.0.0.1:{}\"\ntls = \"none\"\n",
            spool.display(),
            free_port()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let (code, out, err) = run_cli(&["serve", "--config", cfg]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("refusing to open the spool as root") && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's own\n");

    // Something that is not the spool's at its top: refused, and not given away.
    std::fs::remove_file(spool.join("lock")).unwrap();
    std::fs::write(spool.join("other-daemon.db"), "x").unwrap();
    let (code, _, err) = run_cli(&["serve", "--config", cfg]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("other-daemon.db") && err.contains("not part of a Postern spool"),
        "{err}"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(spool.join("other-daemon.db"))
            .unwrap()
            .uid(),
        0
    );
}
