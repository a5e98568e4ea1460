//! The driver against a fake milter on a Unix socket that answers each command as a
//! script says (raw packets, so it can break the protocol), on tokio's paused clock:
//! timeouts are exact and instant.

use std::path::Path;
use std::time::Duration;

use postern_smtp::address::parse_mailbox;
use postern_smtp::milter::proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use super::*;
use crate::budget::MemoryBudget;
use crate::config::{Milter, MilterAddress, MilterClients};

/// What the fake milter sends after a command (code, data), as (code, data) packets;
/// `None`: it stops answering and sends SMFIR_PROGRESS every second instead.
type Script = fn(u8, &[u8]) -> Option<Vec<(u8, Vec<u8>)>>;

fn packet(code: u8, data: &[u8]) -> Vec<u8> {
    let mut p = ((data.len() + 1) as u32).to_be_bytes().to_vec();
    p.push(code);
    p.extend_from_slice(data);
    p
}

/// The answer to SMFIC_OPTNEG: version 6, header and body changes, every stage.
fn optneg() -> Vec<(u8, Vec<u8>)> {
    let mut d = 6u32.to_be_bytes().to_vec();
    d.extend_from_slice(&(SMFIF_ADDHDRS | SMFIF_CHGBODY).to_be_bytes());
    d.extend_from_slice(&0u32.to_be_bytes());
    vec![(SMFIC_OPTNEG, d)]
}

/// Commands no milter answers.
fn unanswered(code: u8) -> bool {
    code == SMFIC_MACRO || code == SMFIC_ABORT || code == SMFIC_QUIT || code == SMFIC_QUIT_NC
}

/// What a fake milter saw: connections accepted, and the commands, in order.
#[derive(Default)]
struct Seen {
    connections: std::sync::atomic::AtomicUsize,
    commands: std::sync::Mutex<Vec<u8>>,
}

impl Seen {
    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn count(&self, code: u8) -> usize {
        self.commands
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == code)
            .count()
    }
}

fn start_fake(path: &Path, script: Script) {
    start_counted(path, script, Close::Never);
}

/// When a counting fake milter closes a connection by itself.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Close {
    Never,
    /// Right after it answered end of message: as a milter whose idle timeout ran out
    /// (or that restarted) while the connection was kept.
    AfterEom,
    /// At SMFIC_QUIT_NC: as if that happened in the instant the connection was taken.
    AtQuitNc,
    /// Never: but after SMFIC_QUIT_NC it answers nothing more (a milter that takes
    /// QUIT_NC and then ignores the next CONNECT).
    MuteAfterQuitNc,
}

/// A fake milter that counts what it sees.
fn start_counted(path: &Path, script: Script, close: Close) -> Arc<Seen> {
    let listener = UnixListener::bind(path).unwrap();
    let seen = Arc::new(Seen::default());
    let all = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            all.connections
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let seen = Arc::clone(&all);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut mute = false;
                loop {
                    while buf.len() >= 4 {
                        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                        if buf.len() < 4 + len {
                            break;
                        }
                        let code = buf[4];
                        let data = buf[5..4 + len].to_vec();
                        buf.drain(..4 + len);
                        seen.commands.lock().unwrap().push(code);
                        if code == SMFIC_QUIT_NC && close == Close::AtQuitNc {
                            return;
                        }
                        mute |= code == SMFIC_QUIT_NC && close == Close::MuteAfterQuitNc;
                        if unanswered(code) || mute {
                            continue;
                        }
                        match script(code, &data) {
                            Some(replies) => {
                                for (c, d) in replies {
                                    if s.write_all(&packet(c, &d)).await.is_err() {
                                        return;
                                    }
                                }
                                if code == SMFIC_BODYEOB && close == Close::AfterEom {
                                    return;
                                }
                            }
                            None => loop {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                if s.write_all(&packet(SMFIR_PROGRESS, &[])).await.is_err() {
                                    return;
                                }
                            },
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    seen
}

fn milter(path: &Path, on_failure: OnFailure) -> Milter {
    Milter {
        name: "fake".into(),
        address: MilterAddress::Unix(path.to_path_buf()),
        clients: MilterClients::Any,
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(2),
        on_failure,
        pool_size: 4,
        pool_idle_timeout: Duration::from_secs(10),
    }
}

fn chain(m: Milter, metrics: &Arc<Metrics>) -> Chain {
    chain_on(&Endpoint::new(m), metrics)
}

/// A session's chain on an endpoint (and its pool) that sessions share.
fn chain_on(ep: &Arc<Endpoint>, metrics: &Arc<Metrics>) -> Chain {
    Chain::new(
        &[Arc::clone(ep)],
        Client {
            peer: "192.0.2.1:4000".parse().unwrap(),
            hostname: "relay.test".into(),
            tls: None,
        },
        Arc::clone(metrics),
        64 * 1024,
    )
}

fn sender() -> SenderRequest {
    SenderRequest {
        sender: ReversePath::Mailbox(parse_mailbox("a@b.test").unwrap()),
        params: vec![],
        helo: "client.test".into(),
        authenticated: None,
    }
}

fn counted(metrics: &Metrics, action: &str) -> bool {
    metrics.render(0).contains(&format!(
        "postern_milter_actions_total{{milter=\"fake\",action=\"{action}\"}} 1\n"
    ))
}

/// Continue to everything; at MAIL, a header change (not allowed there).
fn action_at_mail(code: u8, _: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    Some(match code {
        SMFIC_OPTNEG => optneg(),
        SMFIC_MAIL => vec![(SMFIR_ADDHEADER, b"X-A\0b\0".to_vec())],
        _ => vec![(SMFIR_CONTINUE, vec![])],
    })
}

#[tokio::test(start_paused = true)]
async fn a_reply_out_of_place_is_a_failure_and_on_failure_decides() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    start_fake(&path, action_at_mail);
    let metrics = Arc::new(Metrics::new([]));

    let mut c = chain(milter(&path, OnFailure::Tempfail), &metrics);
    let r = c.mail(&sender(), false).await.unwrap_err();
    assert_eq!((r.code, r.status), (451, Some(Status(4, 7, 1))));
    assert!(counted(&metrics, "failed"));
    // The session stays tempfailed.
    let rcpt = parse_mailbox("x@y.test").unwrap();
    assert_eq!(c.rcpt(&rcpt).await.unwrap_err().code, 451);
    assert_eq!(c.mail(&sender(), false).await.unwrap_err().code, 451);

    let metrics = Arc::new(Metrics::new([]));
    let mut c = chain(milter(&path, OnFailure::Accept), &metrics);
    assert_eq!(c.mail(&sender(), false).await, Ok(()));
    assert!(counted(&metrics, "failed"));
    // Skipped from then on.
    assert_eq!(c.rcpt(&rcpt).await, Ok(()));
    assert_eq!(c.mail(&sender(), false).await, Ok(()));
    c.quit().await;
}

/// Negotiates, then never answers.
fn silent(code: u8, _: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    Some(if code == SMFIC_OPTNEG {
        optneg()
    } else {
        vec![]
    })
}

#[tokio::test(start_paused = true)]
async fn a_silent_milter_times_out_after_timeout_and_one_that_never_negotiates_after_connect_timeout()
 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    start_fake(&path, silent);
    let metrics = Arc::new(Metrics::new([]));
    let mut c = chain(milter(&path, OnFailure::Tempfail), &metrics);
    let started = tokio::time::Instant::now();
    assert_eq!(c.mail(&sender(), false).await.unwrap_err().code, 451);
    // CONNECT unanswered: its 2 s timeout.
    assert_eq!(started.elapsed(), Duration::from_secs(2));

    let mute = dir.path().join("mute.sock");
    start_fake(&mute, |_, _| Some(vec![]));
    let mut c = chain(milter(&mute, OnFailure::Tempfail), &metrics);
    let started = tokio::time::Instant::now();
    assert_eq!(c.mail(&sender(), false).await.unwrap_err().code, 451);
    assert_eq!(started.elapsed(), Duration::from_secs(5));

    // Nobody listening: at once.
    let mut c = chain(
        milter(&dir.path().join("none.sock"), OnFailure::Tempfail),
        &metrics,
    );
    let started = tokio::time::Instant::now();
    assert_eq!(c.mail(&sender(), false).await.unwrap_err().code, 451);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

/// Continues until end of message, then only sends SMFIR_PROGRESS.
fn stalling(code: u8, _: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    match code {
        SMFIC_OPTNEG => Some(optneg()),
        SMFIC_BODYEOB => None,
        _ => Some(vec![(SMFIR_CONTINUE, vec![])]),
    }
}

#[tokio::test(start_paused = true)]
async fn progress_keeps_a_reply_alive_for_ten_timeouts_at_most() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    start_fake(&path, stalling);
    let metrics = Arc::new(Metrics::new([]));
    let mut c = chain(milter(&path, OnFailure::Tempfail), &metrics);
    c.mail(&sender(), false).await.unwrap();
    let rcpt = parse_mailbox("x@y.test").unwrap();
    c.rcpt(&rcpt).await.unwrap();
    let started = tokio::time::Instant::now();
    let (verdict, _) = end_of_message(&mut c, rcpt).await;
    let Verdict::Refused { reply, .. } = verdict else {
        panic!("{verdict:?}");
    };
    assert_eq!(reply.code, 451);
    // Progress every second, timeout 2 s: cut at 10 x 2 s.
    assert_eq!(started.elapsed(), Duration::from_secs(20));
}

/// At end of message, a flood of header inserts (tiny each).
fn flood(code: u8, _: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    Some(match code {
        SMFIC_OPTNEG => optneg(),
        SMFIC_BODYEOB => {
            let mut v: Vec<(u8, Vec<u8>)> = (0..5000)
                .map(|_| (SMFIR_INSHEADER, b"\0\0\0\0X\0\0".to_vec()))
                .collect();
            v.push((SMFIR_ACCEPT, vec![]));
            v
        }
        _ => vec![(SMFIR_CONTINUE, vec![])],
    })
}

/// Thousands of changes for one message are a failure of the milter (on_failure
/// decides), not thousands of header scans on the executor.
#[tokio::test(start_paused = true)]
async fn a_flood_of_changes_is_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    start_fake(&path, flood);
    let metrics = Arc::new(Metrics::new([]));
    let mut c = chain(milter(&path, OnFailure::Tempfail), &metrics);
    c.mail(&sender(), false).await.unwrap();
    let rcpt = parse_mailbox("x@y.test").unwrap();
    c.rcpt(&rcpt).await.unwrap();
    let (verdict, data) = end_of_message(&mut c, rcpt).await;
    let Verdict::Refused { reply, .. } = verdict else {
        panic!("{verdict:?}");
    };
    assert_eq!(reply.code, 451);
    assert!(!String::from_utf8_lossy(&data).contains("X:"));
}

/// The end of a one-recipient message through `c`: its verdict and the message after it.
async fn end_of_message(c: &mut Chain, rcpt: Address) -> (Verdict, Vec<u8>) {
    let budget = MemoryBudget::new(1 << 30);
    let mut reservation = budget.reservation();
    let (mut s, mut params, mut rcpts) = (ReversePath::Null, vec![], vec![rcpt]);
    let mut data = b"Subject: x\r\n\r\nbody\r\n".to_vec();
    let verdict = c
        .end_of_message(
            "ID1",
            Envelope {
                sender: &mut s,
                params: &mut params,
                recipients: &mut rcpts,
            },
            &mut data,
            &mut reservation,
        )
        .await;
    (verdict, data)
}

// --- connections kept between sessions ------------------------------------------------

/// Continue to everything, end of message too: libmilter takes QUIT_NC after that.
fn continuing(code: u8, _: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    Some(match code {
        SMFIC_OPTNEG => optneg(),
        _ => vec![(SMFIR_CONTINUE, vec![])],
    })
}

/// Lets the fake milter read what was written without an answer (QUIT_NC, QUIT).
async fn settle() {
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        tokio::task::yield_now().await;
    }
}

/// One SMTP session through `ep`: MAIL, RCPT, end of message, QUIT.
async fn one_session(ep: &Arc<Endpoint>, metrics: &Arc<Metrics>) -> Verdict {
    let mut c = chain_on(ep, metrics);
    c.mail(&sender(), false).await.unwrap();
    let rcpt = parse_mailbox("x@y.test").unwrap();
    c.rcpt(&rcpt).await.unwrap();
    let (verdict, _) = end_of_message(&mut c, rcpt).await;
    c.quit().await;
    verdict
}

#[tokio::test(start_paused = true)]
async fn the_next_session_reuses_the_connection_without_negotiating_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    let seen = start_counted(&path, continuing, Close::Never);
    let metrics = Arc::new(Metrics::new([]));
    let ep = Endpoint::new(milter(&path, OnFailure::Tempfail));
    for _ in 0..3 {
        let verdict = one_session(&ep, &metrics).await;
        assert_eq!(verdict, Verdict::Go { quarantine: None });
        assert_eq!(ep.idle(), 1);
    }
    settle().await;
    assert_eq!(seen.connections(), 1);
    assert_eq!(seen.count(SMFIC_OPTNEG), 1);
    assert_eq!(seen.count(SMFIC_CONNECT), 3);
    assert_eq!(seen.count(SMFIC_HELO), 3, "each session says HELO again");
    // QUIT_NC goes with the next session's CONNECT: the last one is still idle.
    assert_eq!(seen.count(SMFIC_QUIT_NC), 2);
    assert_eq!(seen.count(SMFIC_QUIT), 0);

    // Unused for pool_idle_timeout: closed with QUIT (libmilter takes it there, at the
    // end of a message; after QUIT_NC it would not).
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(ep.idle(), 0);
    settle().await;
    assert_eq!(seen.count(SMFIC_QUIT), 1);
    one_session(&ep, &metrics).await;
    assert_eq!(seen.connections(), 2);

    // pool_size = 0: a connection per session, as before.
    let mut m = milter(&path, OnFailure::Tempfail);
    m.pool_size = 0;
    let ep = Endpoint::new(m);
    one_session(&ep, &metrics).await;
    one_session(&ep, &metrics).await;
    assert_eq!(ep.idle(), 0);
    assert_eq!(seen.connections(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_kept_connection_the_milter_closed_is_replaced_not_failed() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new([]));
    // Closed while idle: found closed when taken (the EOF is there), dropped, and a new
    // connection opened.
    let path = dir.path().join("idle.sock");
    let seen = start_counted(&path, continuing, Close::AfterEom);
    let ep = Endpoint::new(milter(&path, OnFailure::Tempfail));
    for _ in 0..2 {
        assert_eq!(
            one_session(&ep, &metrics).await,
            Verdict::Go { quarantine: None }
        );
        settle().await;
    }
    assert_eq!(seen.connections(), 2);
    assert_eq!(seen.count(SMFIC_QUIT_NC), 0);
    assert!(!counted(&metrics, "failed"));

    // Closed in the instant it was taken: its first awaited answer (CONNECT's) finds it
    // closed, and a new connection takes over.
    let path = dir.path().join("race.sock");
    let seen = start_counted(&path, continuing, Close::AtQuitNc);
    let ep = Endpoint::new(milter(&path, OnFailure::Tempfail));
    for _ in 0..3 {
        assert_eq!(
            one_session(&ep, &metrics).await,
            Verdict::Go { quarantine: None }
        );
    }
    assert_eq!(seen.connections(), 3);
    assert_eq!(seen.count(SMFIC_QUIT_NC), 2);
    assert!(!counted(&metrics, "failed"));
}

#[tokio::test(start_paused = true)]
async fn a_kept_connection_that_goes_unanswered_is_replaced_and_reuse_stops() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new([]));
    let path = dir.path().join("mute.sock");
    let seen = start_counted(&path, continuing, Close::MuteAfterQuitNc);
    let ep = Endpoint::new(milter(&path, OnFailure::Tempfail));
    for _ in 0..3 {
        assert_eq!(
            one_session(&ep, &metrics).await,
            Verdict::Go { quarantine: None }
        );
    }
    // The second session's kept connection went unanswered: it got a fresh one without
    // a failure, and from then on nothing is kept (the third opened its own).
    assert!(!counted(&metrics, "failed"));
    assert_eq!(ep.idle(), 0);
    assert_eq!(seen.connections(), 3);
    assert_eq!(seen.count(SMFIC_QUIT_NC), 1);
}

/// Continue to everything, but a tempfail to RCPT.
fn tempfail_rcpt(code: u8, _: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    Some(match code {
        SMFIC_OPTNEG => optneg(),
        SMFIC_RCPT => vec![(SMFIR_TEMPFAIL, vec![])],
        _ => vec![(SMFIR_CONTINUE, vec![])],
    })
}

/// Accept at end of message: libmilter is back in ST_HELO, where it drops QUIT_NC.
fn accept_at_eom(code: u8, _: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    Some(match code {
        SMFIC_OPTNEG => optneg(),
        SMFIC_BODYEOB => vec![(SMFIR_ACCEPT, vec![])],
        _ => vec![(SMFIR_CONTINUE, vec![])],
    })
}

#[tokio::test(start_paused = true)]
async fn a_connection_after_a_tempfail_a_timeout_or_an_accept_is_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new([]));

    let path = dir.path().join("tempfail.sock");
    let seen = start_counted(&path, tempfail_rcpt, Close::Never);
    let ep = Endpoint::new(milter(&path, OnFailure::Tempfail));
    let mut c = chain_on(&ep, &metrics);
    c.mail(&sender(), false).await.unwrap();
    let rcpt = parse_mailbox("x@y.test").unwrap();
    assert_eq!(c.rcpt(&rcpt).await.unwrap_err().code, 451);
    c.quit().await;
    assert_eq!(ep.idle(), 0);
    settle().await;
    assert_eq!(seen.count(SMFIC_QUIT), 1);
    assert_eq!(seen.count(SMFIC_QUIT_NC), 0);

    let path = dir.path().join("accept.sock");
    let seen = start_counted(&path, accept_at_eom, Close::Never);
    let ep = Endpoint::new(milter(&path, OnFailure::Tempfail));
    one_session(&ep, &metrics).await;
    one_session(&ep, &metrics).await;
    assert_eq!(ep.idle(), 0);
    assert_eq!(seen.connections(), 2);
    assert_eq!(seen.count(SMFIC_QUIT_NC), 0);

    // A reply timeout: the connection is dropped where it failed.
    let path = dir.path().join("stall.sock");
    let seen = start_counted(&path, stalling, Close::Never);
    let mut m = milter(&path, OnFailure::Accept);
    m.timeout = Duration::from_millis(100);
    let ep = Endpoint::new(m);
    one_session(&ep, &metrics).await;
    assert_eq!(ep.idle(), 0);
    one_session(&ep, &metrics).await;
    assert_eq!(seen.connections(), 2);
    assert!(metrics.render(0).contains("action=\"failed\"} 2"));
}

#[tokio::test(start_paused = true)]
async fn the_pool_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    let seen = start_counted(&path, continuing, Close::Never);
    let metrics = Arc::new(Metrics::new([]));
    let ep = Endpoint::new(milter(&path, OnFailure::Tempfail));
    // Six sessions at once: six connections; four kept, two closed.
    let mut chains = Vec::new();
    for _ in 0..6 {
        let mut c = chain_on(&ep, &metrics);
        c.mail(&sender(), false).await.unwrap();
        chains.push(c);
    }
    for mut c in chains {
        c.quit().await;
    }
    assert_eq!(seen.connections(), 6);
    // Ended in a transaction: ABORT first; the fake has no SMFIP_NOUNKNOWN, so
    // libmilter would not take QUIT_NC after it: none kept.
    assert_eq!(ep.idle(), 0);
    for _ in 0..6 {
        one_session(&ep, &metrics).await;
    }
    assert_eq!(ep.idle(), 1);
    let mut chains = Vec::new();
    for _ in 0..6 {
        let mut c = chain_on(&ep, &metrics);
        c.mail(&sender(), false).await.unwrap();
        let rcpt = parse_mailbox("x@y.test").unwrap();
        c.rcpt(&rcpt).await.unwrap();
        end_of_message(&mut c, rcpt).await;
        chains.push(c);
    }
    for mut c in chains {
        c.quit().await;
    }
    assert_eq!(ep.idle(), 4);
    settle().await;
    assert_eq!(seen.count(SMFIC_QUIT), 6 + 2);
}
