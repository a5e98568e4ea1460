//! PROXY protocol listeners (interface: "Listeners behind a load balancer"), with raw
//! headers written by the test and through a real HAProxy: the carried address is the client
//! for the relay policy and the logs; a peer outside `proxy_from`, or a missing or bad
//! header, gets no banner at all.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::common::{Client, INSIDE, OUTSIDE, Server, free_port};

/// The base config (its plain listener is the readiness probe) plus a proxy listener
/// that takes headers from 127.0.0.1 only.
fn start() -> (Server, SocketAddr) {
    start_with("")
}

/// [`start`] with more tables after the proxy listener.
fn start_with(more: &str) -> (Server, SocketAddr) {
    let port = free_port();
    let extra = format!(
        "[[listener]]\naddress = \"127.0.0.1:{port}\"\ntls = \"none\"\n\
         proxy_protocol = true\nproxy_from = [\"127.0.0.1/32\"]\n{more}"
    );
    let server = Server::start("command_timeout = \"2s\"", &extra);
    (server, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
    let mut v = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v.push(command);
    v.push(family);
    v.extend_from_slice(&u16::try_from(addresses.len()).unwrap().to_be_bytes());
    v.extend_from_slice(addresses);
    v
}

fn v2_tcp4(src: [u8; 4]) -> Vec<u8> {
    let mut a = src.to_vec();
    a.extend_from_slice(&[127, 0, 0, 1]);
    a.extend_from_slice(&40000u16.to_be_bytes());
    a.extend_from_slice(&25u16.to_be_bytes());
    // An SSL TLV claiming TLS with a verified client certificate: skipped, not believed.
    a.extend_from_slice(&[0x20, 0x00, 0x05, 0x07, 0, 0, 0, 0]);
    v2(0x21, 0x11, &a)
}

fn v2_tcp6(src: &str) -> Vec<u8> {
    let mut a = src.parse::<Ipv6Addr>().unwrap().octets().to_vec();
    a.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    a.extend_from_slice(&40000u16.to_be_bytes());
    a.extend_from_slice(&25u16.to_be_bytes());
    v2(0x21, 0x21, &a)
}

/// Sends `header` and the EHLO in one write (the session must get the bytes after the
/// header), then tries to relay to an outside domain; returns the RCPT reply code.
fn relay_code(to: SocketAddr, header: &[u8]) -> u16 {
    let mut c = Client::connect(INSIDE, to);
    let mut first = header.to_vec();
    first.extend_from_slice(b"EHLO client.test\r\n");
    c.send(&first);
    assert_eq!(c.reply().code, 220);
    assert_eq!(c.reply().code, 250);
    c.expect("MAIL FROM:<a@company.test>", 250);
    let code = c.cmd("RCPT TO:<user@other.test>").code;
    c.expect("QUIT", 221);
    code
}

/// The connection is closed without a single byte from the server.
fn closed_without_banner(c: &mut Client) {
    assert!(c.is_closed(), "the server spoke");
}

fn wait_for_log(server: &Server, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn proxy_v1_header_makes_the_claimed_address_the_client() {
    let (server, to) = start();
    // The peer 127.0.0.1 is trusted, but the client it speaks for is not.
    assert_eq!(
        relay_code(to, b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n"),
        554
    );
    wait_for_log(&server, "client=192.0.2.7:40000");
    // A header naming a trusted client relays.
    assert_eq!(
        relay_code(to, b"PROXY TCP4 127.0.0.1 127.0.0.1 40001 25\r\n"),
        250
    );
    // TCP6, and UNKNOWN (the peer's own address: trusted).
    assert_eq!(
        relay_code(to, b"PROXY TCP6 2001:db8::7 ::1 40000 25\r\n"),
        554
    );
    wait_for_log(&server, "client=[2001:db8::7]:40000");
    assert_eq!(relay_code(to, b"PROXY UNKNOWN\r\n"), 250);
}

#[test]
fn proxy_v2_header_makes_the_claimed_address_the_client() {
    let (server, to) = start();
    assert_eq!(relay_code(to, &v2_tcp4([192, 0, 2, 7])), 554);
    wait_for_log(&server, "client=192.0.2.7:40000");
    assert_eq!(relay_code(to, &v2_tcp6("2001:db8::8")), 554);
    wait_for_log(&server, "client=[2001:db8::8]:40000");
    assert_eq!(relay_code(to, &v2_tcp4([127, 0, 0, 1])), 250);
    // LOCAL (a health check): the peer's own address, here trusted.
    assert_eq!(relay_code(to, &v2(0x20, 0x00, &[])), 250);
}

#[test]
fn proxy_missing_or_bad_header_closes_without_banner() {
    let (server, to) = start();
    // SMTP straight away: no header.
    let mut c = Client::connect(INSIDE, to);
    c.send(b"EHLO client.test\r\n");
    closed_without_banner(&mut c);
    wait_for_log(&server, "no PROXY protocol header");
    // Malformed: a port with a leading zero.
    let mut c = Client::connect(INSIDE, to);
    c.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 040000 25\r\n");
    closed_without_banner(&mut c);
    wait_for_log(&server, "bad port");
    // Oversized: a v1 line that never ends.
    let mut c = Client::connect(INSIDE, to);
    c.send(&[b"PROXY UNKNOWN ".as_slice(), &[b'x'; 200]].concat());
    closed_without_banner(&mut c);
    wait_for_log(&server, "PROXY header too long");
    // Nothing at all: closed at command_timeout (2 s).
    let started = Instant::now();
    let mut c = Client::connect(INSIDE, to);
    c.send(b"PROXY TCP4 192.0.2.7");
    closed_without_banner(&mut c);
    assert!(started.elapsed() < Duration::from_secs(10));
    wait_for_log(&server, "PROXY header timed out");
    // The plain listener next to it is untouched.
    let mut plain = server.client(OUTSIDE);
    plain.hello();
}

#[test]
fn proxy_peer_outside_proxy_from_closes_without_banner() {
    let metrics = free_port();
    let (server, to) = start_with(&format!("[metrics]\naddress = \"127.0.0.1:{metrics}\"\n"));
    let mut c = Client::connect(OUTSIDE, to);
    c.send(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 25\r\n");
    closed_without_banner(&mut c);
    wait_for_log(&server, "peer not in proxy_from");
    // And counted, per listener.
    let (_, _, body) = crate::common::http_get(metrics, "/metrics");
    assert!(
        body.contains(&format!(
            "postern_proxy_refused_total{{listener=\"{to}\"}} 1\n"
        )),
        "{body}"
    );
}

/// A full proxy listener answers 421 before the header is read (the connection counts from
/// accept), and the client reads it though its header and EHLO were never read.
#[test]
fn a_full_proxy_listener_says_421_though_the_header_is_unread() {
    let port = free_port();
    let extra = format!(
        "[[listener]]\naddress = \"127.0.0.1:{port}\"\ntls = \"none\"\nmax_connections = 1\n\
         proxy_protocol = true\nproxy_from = [\"127.0.0.1/32\"]\n"
    );
    let server = Server::start("", &extra);
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let mut first = Client::connect(INSIDE, to);
    first.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n");
    assert_eq!(first.reply().code, 220);
    for _ in 0..5 {
        let mut c = Client::connect(INSIDE, to);
        c.send(b"PROXY TCP4 192.0.2.8 127.0.0.1 40001 25\r\nEHLO client.test\r\n");
        // The server has closed by now, with our bytes unread (a reset on Linux keeps
        // what was already received readable).
        std::thread::sleep(Duration::from_millis(100));
        let r = c.reply();
        assert_eq!(r.code, 421, "{}", r.text());
    }
    wait_for_log(&server, "max_connections");
}

/// A real HAProxy (installed by scripts/test) in front of the proxy listener, once with
/// `send-proxy` (v1) and once with `send-proxy-v2`: the client Postern sees is the one
/// that connected to HAProxy, so an outside client cannot relay though HAProxy itself
/// (127.0.0.1) is trusted, and an inside one can.
#[test]
fn through_haproxy_the_client_is_the_one_haproxy_saw() {
    let (server, target) = start();
    let (v1, v2) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend v1\n  bind 127.0.0.1:{v1}\n  default_backend v1\n\
             backend v1\n  server s 127.0.0.1:{port} send-proxy\n\
             frontend v2\n  bind 127.0.0.1:{v2}\n  default_backend v2\n\
             backend v2\n  server s 127.0.0.1:{port} send-proxy-v2\n",
            port = target.port()
        ),
    )
    .unwrap();
    // Debian puts it in /usr/sbin, which a non-root PATH may lack.
    let haproxy = if std::path::Path::new("/usr/sbin/haproxy").exists() {
        "/usr/sbin/haproxy"
    } else {
        "haproxy"
    };
    let child = std::process::Command::new(haproxy)
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("haproxy (scripts/test installs it)");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _haproxy = Kill(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in [v1, v2] {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for port in [v1, v2] {
        let front = SocketAddr::from(([127, 0, 0, 1], port));
        let relay = |from: &str| {
            let mut c = Client::connect(from, front);
            c.hello();
            c.expect("MAIL FROM:<a@company.test>", 250);
            c.cmd("RCPT TO:<user@other.test>").code
        };
        assert_eq!(
            relay(OUTSIDE),
            554,
            "port {port}: the outside client relayed"
        );
        assert_eq!(
            relay(INSIDE),
            250,
            "port {port}: the inside client was refused"
        );
    }
    assert!(server.log().contains("127.0.0.2"), "{}", server.log());
}

/// A load balancer connection stuck in the middle of its header does not hold up a stop:
/// the server exits well before the 5 s grace period (and before command_timeout).
#[test]
fn a_half_sent_header_does_not_delay_shutdown() {
    let port = free_port();
    let extra = format!(
        "[[listener]]\naddress = \"127.0.0.1:{port}\"\ntls = \"none\"\n\
         proxy_protocol = true\nproxy_from = [\"127.0.0.1/32\"]\n"
    );
    let mut server = Server::start("command_timeout = \"5m\"", &extra);
    let mut c = Client::connect(INSIDE, SocketAddr::from(([127, 0, 0, 1], port)));
    c.send(b"PROXY TCP4 192.0.2.7 ");
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let status = server.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "stop took {:?}",
        started.elapsed()
    );
    assert!(
        !server.log().contains("sessions still open"),
        "{}",
        server.log()
    );
}
