//! A tiny authoritative DNS responder for tests, on 127.0.0.1 (UDP and TCP on
//! the same ephemeral port), answering from records the test adds at run time.
//! Messages are decoded and encoded with hickory-proto so a stub resolver
//! (hickory-resolver pointed at [`DnsServer::addr`]) accepts the answers.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::lock;

/// How often the server threads look at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// UDP answers larger than this (or the client's EDNS size) are truncated.
const PLAIN_UDP_LIMIT: usize = 512;
/// The EDNS payload size the server advertises.
const EDNS_PAYLOAD: u16 = 1232;

#[derive(Clone, Debug)]
enum Rec {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Mx(u16, String),
    Txt(String),
    Cname(String),
    Ptr(String),
}

impl Rec {
    fn record_type(&self) -> RecordType {
        match self {
            Rec::A(_) => RecordType::A,
            Rec::Aaaa(_) => RecordType::AAAA,
            Rec::Mx(..) => RecordType::MX,
            Rec::Txt(_) => RecordType::TXT,
            Rec::Cname(_) => RecordType::CNAME,
            Rec::Ptr(_) => RecordType::PTR,
        }
    }

    fn rdata(&self) -> RData {
        match self {
            Rec::A(ip) => RData::A(A(*ip)),
            Rec::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
            Rec::Mx(pref, exchange) => RData::MX(MX::new(*pref, to_name(exchange))),
            Rec::Txt(text) => {
                // A TXT string holds at most 255 bytes: split longer texts.
                let mut parts = Vec::new();
                let mut rest = text.as_str();
                while rest.len() > 255 {
                    let mut cut = 255;
                    while !rest.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    parts.push(rest[..cut].to_string());
                    rest = &rest[cut..];
                }
                parts.push(rest.to_string());
                RData::TXT(TXT::new(parts))
            }
            Rec::Cname(target) => RData::CNAME(CNAME(to_name(target))),
            Rec::Ptr(target) => RData::PTR(PTR(to_name(target))),
        }
    }
}

#[derive(Default)]
struct Zone {
    records: HashMap<String, Vec<Rec>>,
    servfail: HashSet<String>,
    ignore: HashSet<String>,
    delays: HashMap<String, Duration>,
}

impl Zone {
    /// True if `name` owns records or is an ancestor of a name that does
    /// (an "empty non-terminal", which exists and so answers NODATA).
    fn exists(&self, name: &str) -> bool {
        if name.is_empty() || self.records.contains_key(name) {
            return true;
        }
        let suffix = format!(".{name}");
        self.records.keys().any(|k| k.ends_with(&suffix))
    }
}

struct Shared {
    zone: Mutex<Zone>,
    queries: Mutex<Vec<(String, String)>>,
    stop: AtomicBool,
    truncate_udp: AtomicBool,
    ttl: AtomicU32,
}

/// Outcome of looking a question up.
enum Answer {
    /// Send nothing (the client times out).
    Silence,
    Reply {
        code: ResponseCode,
        answers: Vec<Record>,
        /// Negative answer (NXDOMAIN or NODATA): add an SOA to the authority section.
        negative: bool,
    },
}

/// A DNS responder on 127.0.0.1, UDP and TCP on the same ephemeral port.
///
/// Behaves like an authoritative server for every name added: AA is set, the
/// id and question are copied, RD is echoed and RA is set. A name with
/// records, but none of the queried type, answers NOERROR with no answer
/// (NODATA), as does an ancestor of a known name; any other name answers
/// NXDOMAIN. Negative answers carry an SOA (minimum = the TTL) in the
/// authority section. Names are case-insensitive; a trailing dot is optional.
/// A CNAME is followed within the server's own data. Records have a TTL of
/// 0 seconds by default (see [`DnsServer::set_ttl`]) so caching resolvers
/// see changes made between retries. The threads stop when it is dropped.
pub struct DnsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Starts the server on 127.0.0.1 with an ephemeral port shared by UDP and TCP.
    pub fn start() -> DnsServer {
        let (udp, tcp) = bind_pair().expect("bind DNS UDP and TCP sockets on 127.0.0.1");
        let addr = udp.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            zone: Mutex::new(Zone::default()),
            queries: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            truncate_udp: AtomicBool::new(false),
            ttl: AtomicU32::new(0),
        });
        udp.set_read_timeout(Some(POLL)).expect("set UDP timeout");
        tcp.set_nonblocking(true)
            .expect("set TCP listener non-blocking");
        let s = shared.clone();
        let udp_thread = thread::Builder::new()
            .name("testkit-dns-udp".into())
            .spawn(move || serve_udp(udp, s))
            .expect("spawn DNS UDP thread");
        let s = shared.clone();
        let tcp_thread = thread::Builder::new()
            .name("testkit-dns-tcp".into())
            .spawn(move || serve_tcp(tcp, s))
            .expect("spawn DNS TCP thread");
        DnsServer {
            addr,
            shared,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    /// The address (127.0.0.1:port) to send queries to, over UDP or TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn add(&self, name: &str, rec: Rec) {
        lock(&self.shared.zone)
            .records
            .entry(normalize(name))
            .or_default()
            .push(rec);
    }

    /// Adds an MX record `domain MX preference exchange`.
    pub fn add_mx(&self, domain: &str, preference: u16, exchange: &str) {
        self.add(domain, Rec::Mx(preference, normalize(exchange)));
    }

    /// Adds the RFC 7505 null MX (`domain MX 0 .`).
    pub fn null_mx(&self, domain: &str) {
        self.add(domain, Rec::Mx(0, String::new()));
    }

    /// Adds an A record (also for DNSBL-style names like `2.0.0.127.zen.test`).
    pub fn add_a(&self, name: &str, ip: Ipv4Addr) {
        self.add(name, Rec::A(ip));
    }

    /// Adds an AAAA record.
    pub fn add_aaaa(&self, name: &str, ip: Ipv6Addr) {
        self.add(name, Rec::Aaaa(ip));
    }

    /// Adds a TXT record (texts over 255 bytes are split into several strings).
    pub fn add_txt(&self, name: &str, text: &str) {
        self.add(name, Rec::Txt(text.to_string()));
    }

    /// Adds a CNAME record `name CNAME target`. Queries of other types at
    /// `name` answer the CNAME followed by the target's records of that type
    /// (when the target is known here).
    pub fn add_cname(&self, name: &str, target: &str) {
        self.add(name, Rec::Cname(normalize(target)));
    }

    /// Adds a PTR record (`name` is the full reverse name, e.g. `1.0.0.127.in-addr.arpa`).
    pub fn add_ptr(&self, name: &str, target: &str) {
        self.add(name, Rec::Ptr(normalize(target)));
    }

    /// Answers SERVFAIL for any query type at exactly `name` (until [`DnsServer::clear`]).
    pub fn servfail(&self, name: &str) {
        lock(&self.shared.zone).servfail.insert(normalize(name));
    }

    /// Never answers queries at exactly `name`, so resolvers time out (until
    /// [`DnsServer::clear`]). The queries are still recorded.
    pub fn ignore(&self, name: &str) {
        lock(&self.shared.zone).ignore.insert(normalize(name));
    }

    /// Answers queries at exactly `name` only after `delay` (a slow authoritative
    /// server). Other names are answered at once meanwhile: each delayed answer is sent
    /// from its own thread. Until [`DnsServer::clear`].
    pub fn delay(&self, name: &str, delay: Duration) {
        lock(&self.shared.zone)
            .delays
            .insert(normalize(name), delay);
    }

    /// Removes every record of `name` and its SERVFAIL, ignore or delay marking.
    pub fn clear(&self, name: &str) {
        let name = normalize(name);
        let mut zone = lock(&self.shared.zone);
        zone.records.remove(&name);
        zone.servfail.remove(&name);
        zone.ignore.remove(&name);
        zone.delays.remove(&name);
    }

    /// Sets the TTL of answers (and the SOA minimum of negative answers); default 0.
    pub fn set_ttl(&self, ttl: u32) {
        self.shared.ttl.store(ttl, Ordering::Relaxed);
    }

    /// When on, every UDP answer is sent truncated (TC set, no records), so
    /// resolvers must retry over TCP. Off by default; answers that do not fit
    /// the client's UDP size are always truncated.
    pub fn set_truncate_udp(&self, on: bool) {
        self.shared.truncate_udp.store(on, Ordering::Relaxed);
    }

    /// Every question received, in order, as (lower-case name without the
    /// trailing dot, record type such as "MX", "A", "AAAA"). A query retried
    /// over TCP appears once per transport.
    pub fn queries(&self) -> Vec<(String, String)> {
        lock(&self.shared.queries).clone()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Binds a UDP socket and a TCP listener on the same ephemeral port of 127.0.0.1.
fn bind_pair() -> io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free port")))
}

/// Lower-case, without the trailing dot ("" is the root).
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn to_name(normalized: &str) -> Name {
    if normalized.is_empty() {
        return Name::root();
    }
    let mut name = Name::from_ascii(normalized)
        .or_else(|_| Name::from_utf8(normalized))
        .unwrap_or_else(|e| panic!("invalid DNS name {normalized:?}: {e}"));
    name.set_fqdn(true);
    name
}

fn serve_udp(socket: UdpSocket, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 65535];
    while !shared.stop.load(Ordering::SeqCst) {
        let (len, peer) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(_) => continue, // timeout (poll the stop flag) or a transient error
        };
        match respond(&shared, &buf[..len], true) {
            Some((reply, None)) => {
                let _ = socket.send_to(&reply, peer);
            }
            Some((reply, Some(delay))) => {
                if let Ok(socket) = socket.try_clone() {
                    let _ = thread::Builder::new()
                        .name("testkit-dns-delayed".into())
                        .spawn(move || {
                            thread::sleep(delay);
                            let _ = socket.send_to(&reply, peer);
                        });
                }
            }
            None => {}
        }
    }
}

fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let s = shared.clone();
                let _ = thread::Builder::new()
                    .name("testkit-dns-tcp-conn".into())
                    .spawn(move || {
                        let _ = serve_tcp_conn(stream, s);
                    });
            }
            Err(_) => thread::sleep(POLL / 4),
        }
    }
}

fn serve_tcp_conn(mut stream: TcpStream, shared: Arc<Shared>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    loop {
        let mut len = [0u8; 2];
        if !read_full(&mut stream, &mut len, &shared)? {
            return Ok(());
        }
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        if !read_full(&mut stream, &mut msg, &shared)? {
            return Ok(());
        }
        if let Some((reply, delay)) = respond(&shared, &msg, false) {
            if let Some(delay) = delay {
                thread::sleep(delay);
            }
            let Ok(n) = u16::try_from(reply.len()) else {
                return Ok(());
            };
            let mut out = n.to_be_bytes().to_vec();
            out.extend_from_slice(&reply);
            stream.write_all(&out)?;
        }
    }
}

/// Fills `buf`, polling the stop flag; Ok(false) on EOF or stop.
fn read_full(stream: &mut TcpStream, buf: &mut [u8], shared: &Shared) -> io::Result<bool> {
    let mut filled = 0;
    let mut idle = Duration::ZERO;
    while filled < buf.len() {
        if shared.stop.load(Ordering::SeqCst) || idle > Duration::from_secs(30) {
            return Ok(false);
        }
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                filled += n;
                idle = Duration::ZERO;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                idle += POLL
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Builds the wire reply to one wire query and how long to wait before sending it, or
/// None to stay silent.
fn respond(shared: &Shared, wire: &[u8], udp: bool) -> Option<(Vec<u8>, Option<Duration>)> {
    let request = match Message::from_vec(wire) {
        Ok(m) => m,
        Err(_) => {
            // Answer FORMERR if there is at least an id to copy.
            if wire.len() < 2 {
                return None;
            }
            let id = u16::from_be_bytes([wire[0], wire[1]]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                .to_vec()
                .ok()
                .map(|m| (m, None));
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return None;
    }

    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = true;
    metadata.recursion_available = true;
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }

    let ttl = shared.ttl.load(Ordering::Relaxed);
    let mut delay = None;
    let code = if request.metadata.op_code != OpCode::Query {
        ResponseCode::NotImp
    } else if request.queries.len() != 1 {
        ResponseCode::FormErr
    } else {
        let query = &request.queries[0];
        let qname = normalize(&query.name().to_ascii());
        let qtype = query.query_type();
        lock(&shared.queries).push((qname.clone(), qtype.to_string()));
        delay = lock(&shared.zone).delays.get(&qname).copied();
        match lookup(&lock(&shared.zone), query.name(), &qname, qtype, ttl) {
            Answer::Silence => return None,
            Answer::Reply {
                code,
                answers,
                negative,
            } => {
                response.add_answers(answers);
                if negative {
                    response.add_authority(soa_for(&qname, ttl));
                }
                code
            }
        }
    };
    metadata.response_code = code;
    response.metadata = metadata;

    let bytes = response.to_vec().ok()?;
    if udp {
        let limit = request
            .edns
            .as_ref()
            .map(|e| usize::from(e.max_payload()).max(PLAIN_UDP_LIMIT))
            .unwrap_or(PLAIN_UDP_LIMIT);
        if bytes.len() > limit || shared.truncate_udp.load(Ordering::Relaxed) {
            return response.truncate().to_vec().ok().map(|m| (m, delay));
        }
    }
    Some((bytes, delay))
}

fn lookup(zone: &Zone, qname_wire: &Name, qname: &str, qtype: RecordType, ttl: u32) -> Answer {
    if zone.ignore.contains(qname) {
        return Answer::Silence;
    }
    if zone.servfail.contains(qname) {
        return Answer::Reply {
            code: ResponseCode::ServFail,
            answers: Vec::new(),
            negative: false,
        };
    }
    if !zone.exists(qname) {
        return Answer::Reply {
            code: ResponseCode::NXDomain,
            answers: Vec::new(),
            negative: true,
        };
    }
    let mut answers = Vec::new();
    let mut owner = qname_wire.clone();
    let mut current = qname.to_string();
    // Follow CNAMEs within our own data, with a bound against loops.
    for _ in 0..8 {
        let Some(recs) = zone.records.get(&current) else {
            break;
        };
        let cname = recs.iter().find_map(|r| match r {
            Rec::Cname(t) => Some(t.clone()),
            _ => None,
        });
        if let Some(target) = cname
            && qtype != RecordType::CNAME
            && qtype != RecordType::ANY
        {
            answers.push(Record::from_rdata(
                owner.clone(),
                ttl,
                Rec::Cname(target.clone()).rdata(),
            ));
            owner = to_name(&target);
            current = target;
            continue;
        }
        for r in recs {
            if qtype == RecordType::ANY || r.record_type() == qtype {
                answers.push(Record::from_rdata(owner.clone(), ttl, r.rdata()));
            }
        }
        break;
    }
    let negative = answers.is_empty();
    Answer::Reply {
        code: ResponseCode::NoError,
        answers,
        negative,
    }
}

/// The SOA put in the authority section of negative answers. The zone is
/// taken to be the last two labels of the name asked about.
fn soa_for(qname: &str, ttl: u32) -> Record {
    let labels: Vec<&str> = qname.split('.').filter(|l| !l.is_empty()).collect();
    let zone = labels[labels.len().saturating_sub(2)..].join(".");
    let soa = SOA::new(
        to_name("ns.testkit.test"),
        to_name("hostmaster.testkit.test"),
        1,
        3600,
        600,
        86400,
        ttl,
    );
    Record::from_rdata(to_name(&zone), ttl, RData::SOA(soa))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn query_msg(name: &str, qtype: RecordType, id: u16) -> Vec<u8> {
        let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        msg.to_vec().unwrap()
    }

    fn udp_query(dns: &DnsServer, name: &str, qtype: RecordType) -> Message {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.send_to(&query_msg(name, qtype, 0x1234), dns.addr())
            .unwrap();
        let mut buf = [0u8; 4096];
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert!(m.metadata.authoritative);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].query_type(), qtype);
        m
    }

    fn tcp_query(dns: &DnsServer, name: &str, qtype: RecordType) -> Message {
        let mut s = TcpStream::connect(dns.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let q = query_msg(name, qtype, 77);
        let mut out = (q.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&q);
        s.write_all(&out).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).unwrap();
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.metadata.id, 77);
        m
    }

    fn mx_set(m: &Message) -> Vec<(u16, String)> {
        let mut v: Vec<(u16, String)> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn mx_with_two_preferences_and_a() {
        let dns = DnsServer::start();
        dns.add_mx("example.test", 10, "mx1.example.test");
        dns.add_mx("Example.Test.", 20, "mx2.example.test.");
        dns.add_a("mx1.example.test", Ipv4Addr::new(127, 0, 0, 3));
        let m = udp_query(&dns, "EXAMPLE.test.", RecordType::MX);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            mx_set(&m),
            vec![
                (10, "mx1.example.test.".to_string()),
                (20, "mx2.example.test.".to_string())
            ]
        );
        let m = udp_query(&dns, "mx1.example.test.", RecordType::A);
        match &m.answers[0].data {
            RData::A(a) => assert_eq!(a.0, Ipv4Addr::new(127, 0, 0, 3)),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            dns.queries(),
            vec![
                ("example.test".to_string(), "MX".to_string()),
                ("mx1.example.test".to_string(), "A".to_string())
            ]
        );
    }

    #[test]
    fn delayed_names_do_not_hold_up_others() {
        let dns = DnsServer::start();
        dns.add_a("slow.example.test", Ipv4Addr::new(127, 0, 0, 3));
        dns.add_a("fast.example.test", Ipv4Addr::new(127, 0, 0, 4));
        dns.delay("slow.example.test", Duration::from_millis(1500));
        let slow = {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.send_to(
                &query_msg("slow.example.test", RecordType::A, 9),
                dns.addr(),
            )
            .unwrap();
            sock
        };
        let start = std::time::Instant::now();
        let m = udp_query(&dns, "fast.example.test", RecordType::A);
        assert_eq!(m.answers.len(), 1);
        assert!(start.elapsed() < Duration::from_millis(1000));
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = slow.recv_from(&mut buf).unwrap();
        assert_eq!(Message::from_vec(&buf[..n]).unwrap().answers.len(), 1);
        assert!(start.elapsed() >= Duration::from_millis(1400));
        let m = tcp_query(&dns, "slow.example.test", RecordType::A);
        assert_eq!(m.answers.len(), 1);
    }

    #[test]
    fn nodata_vs_nxdomain() {
        let dns = DnsServer::start();
        dns.add_a("mx.sub.example.test", Ipv4Addr::LOCALHOST);
        // Has records, not of this type: NODATA with an SOA.
        let m = udp_query(&dns, "mx.sub.example.test.", RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        // Empty non-terminal: NODATA.
        let m = udp_query(&dns, "sub.example.test.", RecordType::MX);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        // Unknown: NXDOMAIN.
        let m = udp_query(&dns, "nope.example.test.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn null_mx_servfail_and_dnsbl_names() {
        let dns = DnsServer::start();
        dns.null_mx("nomail.test");
        dns.servfail("broken.test");
        dns.add_a("2.0.0.127.zen.test", Ipv4Addr::new(127, 0, 0, 2));
        let m = udp_query(&dns, "nomail.test.", RecordType::MX);
        assert_eq!(mx_set(&m), vec![(0, ".".to_string())]);
        let m = udp_query(&dns, "broken.test.", RecordType::MX);
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        let m = udp_query(&dns, "broken.test.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        dns.clear("broken.test");
        let m = udp_query(&dns, "broken.test.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = udp_query(&dns, "2.0.0.127.zen.test.", RecordType::A);
        match &m.answers[0].data {
            RData::A(a) => assert_eq!(a.0, Ipv4Addr::new(127, 0, 0, 2)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn tcp_and_truncation() {
        let dns = DnsServer::start();
        dns.add_mx("example.test", 5, "mx.example.test");
        dns.add_aaaa("mx.example.test", Ipv6Addr::LOCALHOST);
        let m = tcp_query(&dns, "example.test.", RecordType::MX);
        assert_eq!(mx_set(&m), vec![(5, "mx.example.test.".to_string())]);
        let m = tcp_query(&dns, "mx.example.test.", RecordType::AAAA);
        assert_eq!(m.answers.len(), 1);
        dns.set_truncate_udp(true);
        let m = udp_query(&dns, "example.test.", RecordType::MX);
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        // Over TCP the full answer still comes.
        let m = tcp_query(&dns, "example.test.", RecordType::MX);
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 1);
    }

    #[test]
    fn cname_txt_and_ignore() {
        let dns = DnsServer::start();
        dns.add_cname("alias.test", "real.test");
        dns.add_a("real.test", Ipv4Addr::new(127, 0, 0, 9));
        dns.add_txt("real.test", &"x".repeat(300));
        let m = udp_query(&dns, "alias.test.", RecordType::A);
        assert_eq!(m.answers.len(), 2);
        assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(m.answers[1].record_type(), RecordType::A);
        let m = udp_query(&dns, "real.test.", RecordType::TXT);
        match &m.answers[0].data {
            RData::TXT(t) => assert_eq!(t.txt_data.len(), 2),
            other => panic!("unexpected {other:?}"),
        }
        dns.ignore("slow.test");
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        sock.send_to(&query_msg("slow.test.", RecordType::A, 1), dns.addr())
            .unwrap();
        let mut buf = [0u8; 512];
        assert!(sock.recv_from(&mut buf).is_err());
        assert_eq!(dns.queries().last().unwrap().0, "slow.test");
    }

    #[test]
    fn garbage_gets_formerr_and_server_keeps_going() {
        let dns = DnsServer::start();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.send_to(&[0xab, 0xcd, 0xff], dns.addr()).unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.metadata.id, 0xabcd);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        let m = udp_query(&dns, "x.test.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }
}
