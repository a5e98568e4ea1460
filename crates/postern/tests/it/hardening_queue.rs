//! Spool hardening (issue 8), black-box: the real binary on loopback, its spool files
//! inspected and damaged between runs the way a clock step, a crash or disk rot would.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::{Server, message, run_cli, wait_until};

/// Record frame: magic, type, version, payload length (LE), payload CRC-32 (LE).
const FRAME_LEN: usize = 12;
const DEFERRED_HEADER: &[u8] = b"postern-deferred 1\n";
const SEGMENT_HEADER: &[u8] = b"postern-segment 1\n";

/// Quarantines mail whose text says "hold me"; everything else goes to `next_hop`.
fn config_extra(next_hop: &str) -> String {
    format!(
        "\n[[filter]]\nname = \"hold\"\nkeywords = [\"hold me\"]\naction = \"quarantine\"\n\
         \n[[route]]\ndomains = [\"*\"]\nnext_hop = \"{next_hop}\"\n"
    )
}

/// Sends one message from the trusted side; returns its queue id.
fn submit(server: &Server, to: &str, body: &str) -> String {
    crate::common::submit_body(server, "sender@company.test", &[to], body)
}

fn cli(server: &Server, args: &[&str]) -> String {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", server.config.to_str().unwrap()]);
    let (code, out, err) = run_cli(&all);
    assert_eq!(code, 0, "postern {args:?}: {out}{err}");
    out
}

/// Waits until the server's log has a line holding both `id` and `what`.
fn wait_log_line(server: &Server, id: &str, what: &str) {
    wait_until(&format!("{what} for {id}"), Duration::from_secs(20), || {
        server
            .log()
            .lines()
            .any(|l| l.contains(id) && l.contains(what))
    });
}

/// A queue id `secs` seconds ahead of now (what a clock set ahead would have made).
fn future_id(secs: u64) -> u64 {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
        + secs * 1_000_000;
    micros << 12
}

fn hex(id: u64) -> String {
    format!("{id:016X}")
}

/// The records of a segment file, as (type, whole record) pairs.
fn records(data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut pos = SEGMENT_HEADER.len();
    while pos + FRAME_LEN <= data.len() {
        let len = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap()) as usize;
        out.push((data[pos + 2], &data[pos..pos + FRAME_LEN + len]));
        pos += FRAME_LEN + len;
    }
    out
}

/// Message `id`'s MESSAGE record, from the log.
fn log_record(spool: &Path, id: &str) -> Vec<u8> {
    for name in files(&spool.join("log")) {
        let data = std::fs::read(spool.join("log").join(&name)).unwrap();
        for (rtype, rec) in records(&data) {
            if rtype == 1 && rec[FRAME_LEN..].starts_with(format!("id {id}\n").as_bytes()) {
                return rec.to_vec();
            }
        }
    }
    panic!("no MESSAGE record for {id}");
}

/// Rewrites the framed records from `start` on so that they carry queue id `new` (every
/// record payload starts with the line `id XXXXXXXXXXXXXXXX`), with fresh CRCs.
fn with_id(data: &[u8], start: usize, new: u64) -> Vec<u8> {
    let mut out = data[..start].to_vec();
    let mut pos = start;
    while pos < data.len() {
        let frame = &data[pos..pos + FRAME_LEN];
        assert_eq!(&frame[..2], b"PR", "not a record frame at {pos}");
        let len = u32::from_le_bytes(frame[4..8].try_into().unwrap()) as usize;
        let mut payload = data[pos + FRAME_LEN..pos + FRAME_LEN + len].to_vec();
        assert_eq!(&payload[..3], b"id ");
        payload[3..19].copy_from_slice(hex(new).as_bytes());
        out.extend_from_slice(&frame[..8]);
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        pos += FRAME_LEN + len;
    }
    out
}

fn quarantine_records_start(data: &[u8]) -> usize {
    data.windows(2).position(|w| w == b"\n\n").unwrap() + 2
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Item 1: after a clock step back, new mail must not get the id of a message still on
/// disk, and nothing may be written over an existing spool file.
///
/// The spool is put in the state a clock set days ahead leaves behind: a deferred message
/// `F` and a quarantined one `F+1` from the future, and a message `F-1` released from the
/// quarantine into the log (so the log's highest id is `F-1`). Then, with the real clock,
/// new mail arrives: one deferred, one quarantined. Before the fix the id floor came from
/// the log alone, the new messages got `F` and `F+1`, and their files replaced the
/// existing ones.
#[test]
fn a_clock_step_back_neither_reuses_an_id_nor_overwrites_a_file() {
    let mut server = Server::start("", &config_extra("[127.0.0.1]:1"));
    let spool = server.spool();
    let (deferred, quarantine) = (spool.join("deferred"), spool.join("quarantine"));
    let a = submit(&server, "user@remote.test", &message("first"));
    wait_log_line(&server, &a, "message deferred");
    let q = submit(
        &server,
        "user@remote.test",
        "Subject: held\r\n\r\nhold me, please\r\n",
    );
    assert!(quarantine.join(&q).exists());
    server.terminate(Duration::from_secs(20));

    // The clock had been days ahead: files from "the future".
    let f = future_id(10 * 86_400);
    // A deferred file as earlier versions wrote them (this one keeps deferred mail in
    // the log), made from A's record.
    let deferred_a = [DEFERRED_HEADER, &log_record(&spool, &a)].concat();
    let deferred_f = with_id(&deferred_a, DEFERRED_HEADER.len(), f);
    std::fs::write(deferred.join(hex(f)), &deferred_f).unwrap();
    let quarantined_q = std::fs::read(quarantine.join(&q)).unwrap();
    let start = quarantine_records_start(&quarantined_q);
    let quarantined_f1 = with_id(&quarantined_q, start, f + 1);
    std::fs::write(quarantine.join(hex(f + 1)), &quarantined_f1).unwrap();
    std::fs::write(
        quarantine.join(hex(f - 1)),
        with_id(&quarantined_q, start, f - 1),
    )
    .unwrap();
    // Released while no server runs: its MESSAGE record (id F-1) goes into the log.
    let out = cli(&server, &["quarantine", "release", &hex(f - 1)]);
    assert!(out.contains("released"), "{out}");

    // The clock is right again; new mail arrives.
    server.spawn();
    wait_log_line(&server, &hex(f - 1), "message deferred");
    let new_deferred = submit(&server, "user@remote.test", &message("new-after-step"));
    wait_log_line(&server, &new_deferred, "message deferred");
    let new_held = submit(
        &server,
        "user@remote.test",
        "Subject: new held\r\n\r\nhold me too\r\n",
    );

    let old: Vec<String> = [a.clone(), q.clone(), hex(f - 1), hex(f), hex(f + 1)].into();
    assert!(!old.contains(&new_deferred), "id {new_deferred} reused");
    assert!(!old.contains(&new_held), "id {new_held} reused");
    // The future files are untouched.
    assert_eq!(
        std::fs::read(deferred.join(hex(f))).unwrap(),
        deferred_f,
        "deferred/{} was overwritten",
        hex(f)
    );
    assert_eq!(
        std::fs::read(quarantine.join(hex(f + 1))).unwrap(),
        quarantined_f1,
        "quarantine/{} was overwritten",
        hex(f + 1)
    );
    // Every message is still there.
    let list = cli(&server, &["queue", "list"]);
    for id in [&a, &hex(f - 1), &hex(f), &new_deferred] {
        assert!(
            list.contains(id.as_str()),
            "{id} missing from the queue:\n{list}"
        );
    }
    let held = cli(&server, &["quarantine", "list"]);
    for id in [&q, &hex(f + 1), &new_held] {
        assert!(
            held.contains(id.as_str()),
            "{id} missing from quarantine:\n{held}"
        );
    }
    let names = files(&deferred);
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
}

/// Item 2: one damaged record must not hide the rest of its segment. Three messages stay
/// in the log (their next hop accepts the connection and never says a word, and the
/// server is killed while it waits), a byte inside the first record is flipped, and at
/// the next start the other two are still queued, then delivered, and the log says how
/// many bytes were skipped. Before the fix replay stopped at the bad record.
#[test]
fn a_damaged_record_hides_nothing_after_it() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap(); // never accepts
    let hop = format!("[127.0.0.1]:{}", silent.local_addr().unwrap().port());
    let mut server = Server::start("", &config_extra(&hop));
    let ids: Vec<String> = (1..=3)
        .map(|n| submit(&server, "user@remote.test", &message(&format!("rot{n}"))))
        .collect();
    server.kill9();

    let segment = server.spool().join("log").join("0000000000000001.seg");
    let mut bytes = std::fs::read(&segment).unwrap();
    assert!(bytes.starts_with(SEGMENT_HEADER));
    // The first message's record, after the segment's FLOOR record.
    let floor = records(&bytes)[0];
    assert_eq!(floor.0, 6, "a segment starts with its FLOOR record");
    let first = SEGMENT_HEADER.len() + floor.1.len();
    let len = u32::from_le_bytes(bytes[first + 4..first + 8].try_into().unwrap()) as usize;
    let payload = &bytes[first + FRAME_LEN..first + FRAME_LEN + len];
    assert!(payload.starts_with(format!("id {}\n", ids[0]).as_bytes()));
    bytes[first + FRAME_LEN + len / 2] ^= 0x20; // disk rot inside the first record
    std::fs::write(&segment, &bytes).unwrap();

    // The read-only view (no server running) already sees the two good messages.
    let list = cli(&server, &["queue", "list"]);
    assert!(!list.contains(&ids[0]), "{list}");
    for id in &ids[1..] {
        assert!(
            list.contains(id.as_str()),
            "{id} hidden by the damaged record:\n{list}"
        );
    }

    // Restart with a next hop that works: the two good messages are delivered.
    let sink = postern_testkit::sink::Sink::start(postern_testkit::sink::SinkConfig::default());
    let text = crate::common::base_config(
        server.port,
        &server.spool(),
        "",
        &config_extra(&format!("[127.0.0.1]:{}", sink.addr().port())),
    );
    std::fs::write(&server.config, text).unwrap();
    server.spawn();
    let got = sink.wait_for(2, Duration::from_secs(20));
    let mut subjects: Vec<String> = got
        .iter()
        .map(|m| {
            let data = String::from_utf8_lossy(&m.data).into_owned();
            let subject = data.lines().find(|l| l.starts_with("Subject: ")).unwrap();
            subject.to_string()
        })
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["Subject: rot2", "Subject: rot3"]);
    let skipped = FRAME_LEN + len;
    let log = server.log();
    assert!(
        log.lines().any(|l| l.contains("0000000000000001.seg")
            && l.contains(&format!("bytes_skipped={skipped}"))),
        "the log does not say that {skipped} bytes were skipped:\n{log}"
    );
    drop(silent);
}

/// `chattr +i` on a directory for the life of the guard: no name in it can be created,
/// removed or renamed (even by root), while the files in it can still be written.
struct Immutable(PathBuf);

impl Immutable {
    /// `None` if the file system or the user cannot do it (the test is then skipped).
    fn set(dir: &Path) -> Option<Immutable> {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        // Check that it took: creating a name must fail now.
        (ok && std::fs::write(dir.join("probe"), "").is_err()).then(|| Immutable(dir.into()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// Item 3 with a real failure: the operator deletes a deferred message kept in its own
/// file (as versions before the log kept deferred mail wrote them; such a spool is still
/// read) while its directory refuses every name change, so the unlink of its file fails.
/// The delete must still be final: after a restart the message is not back (before the
/// fix it was, and was delivered again), and its file is removed then.
#[test]
fn a_deleted_message_does_not_come_back_when_its_unlink_fails() {
    let mut server = Server::start("", &config_extra("[127.0.0.1]:1"));
    let deferred = server.spool().join("deferred");
    let id = submit(&server, "user@remote.test", &message("to-delete"));
    wait_log_line(&server, &id, "message deferred");
    assert!(
        !deferred.join(&id).exists(),
        "deferred mail stays in the log"
    );
    server.terminate(Duration::from_secs(20));
    // The old layout: the message moved to its own file, its log copy not yet marked
    // MOVED (the file wins; the log copy gets its MOVED at the start).
    let record = log_record(&server.spool(), &id);
    std::fs::write(deferred.join(&id), [DEFERRED_HEADER, &record].concat()).unwrap();
    server.spawn();
    wait_log_line(&server, &id, "message deferred");
    {
        let Some(_frozen) = Immutable::set(&deferred) else {
            eprintln!("skipped: chattr +i is not available here");
            return;
        };
        let out = cli(&server, &["queue", "delete", &id]);
        assert!(out.starts_with("OK"), "{out}");
        // The unlink really failed: the file is still there.
        assert!(deferred.join(&id).exists());
    }
    server.terminate(Duration::from_secs(20));
    server.spawn();
    let list = cli(&server, &["queue", "list"]);
    assert!(!list.contains(&id), "deleted message came back:\n{list}");
    assert!(!deferred.join(&id).exists(), "{:?}", files(&deferred));
}

/// The queue is loaded in the background after the listener is up; if that load fails
/// (here a segment older than the newest that cannot be read: a directory in its
/// place, as an I/O error would), the server must stop with a nonzero status and say
/// why, not run on taking mail beside a backlog it never delivers (and never collect
/// the log). The spool is left as it was: the message is still there afterwards.
#[test]
fn a_queue_that_cannot_be_loaded_stops_the_server() {
    let mut server = Server::start("", &config_extra("[127.0.0.1]:1"));
    let id = submit(&server, "user@remote.test", &message("kept"));
    wait_log_line(&server, &id, "message deferred");
    server.terminate(Duration::from_secs(20));
    let log_dir = server.spool().join("log");
    assert!(
        log_dir.join("0000000000000001.seg").exists(),
        "{:?}",
        files(&log_dir)
    );
    let bad = log_dir.join("0000000000000000.seg");
    std::fs::create_dir(&bad).unwrap();

    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(server.log_path())
        .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["serve", "--config"])
        .arg(&server.config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until("the server to stop", Duration::from_secs(20), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    assert!(!status.unwrap().success());
    assert!(
        server.log().contains("the queue could not be loaded"),
        "{}",
        server.log()
    );
    std::fs::remove_dir(&bad).unwrap();
    server.spawn();
    wait_log_line(&server, &id, "message deferred");
}
