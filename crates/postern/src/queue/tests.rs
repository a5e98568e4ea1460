//! Spool tests on real temporary directories (real fsyncs).

use std::fs;
use std::path::{Path, PathBuf};

use super::segment::{HEADER, segment_name};
use super::*;

fn envelope(id: QueueId, n: usize) -> Envelope {
    Envelope {
        id,
        arrived: 1_764_403_200 + n as i64,
        client: format!("127.0.0.2:{}", 40000 + n),
        helo: "client.example".into(),
        auth: (n % 2 == 1).then(|| format!("user{n}")),
        sender: if n.is_multiple_of(3) {
            String::new()
        } else {
            format!("sender{n}@example.com")
        },
        params: vec!["BODY=8BITMIME".into(), "SMTPUTF8".into()],
        smtputf8: true,
        recipients: vec![
            format!("a{n}@b.example"),
            format!("jürgen{n}@bücher.example"),
        ],
    }
}

fn body(n: usize) -> Vec<u8> {
    format!("Subject: message {n}\r\n\r\nline one\r\n\r\n.line two {n}\r\n").into_bytes()
}

fn small() -> SpoolOptions {
    SpoolOptions::default()
}

fn tiny_segments() -> SpoolOptions {
    SpoolOptions {
        segment_size: 1,
        ..SpoolOptions::default()
    }
}

fn segments(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join("log").join(segment_name(seq))
}

fn ids(msgs: &[StoredMessage]) -> Vec<QueueId> {
    msgs.iter().map(|m| m.envelope.id).collect()
}

/// Stores message `n` and returns its envelope and location.
async fn put(spool: &Spool, n: usize) -> (Envelope, Location) {
    let env = envelope(spool.new_id(), n);
    let loc = spool.store(&env, &body(n)).await.unwrap();
    (env, loc)
}

#[tokio::test]
async fn store_then_reopen_gives_the_same_message() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let (spool, live) = open_retrying(&dir);
    assert!(live.is_empty());
    for sub in ["log", "deferred", "quarantine"] {
        assert!(dir.join(sub).is_dir(), "{sub}");
    }
    let (env0, loc0) = put(&spool, 0).await;
    let (env1, loc1) = put(&spool, 1).await;
    assert_eq!(spool.read_message(&loc0).unwrap(), body(0));
    assert_eq!(spool.read_message(&loc1).unwrap(), body(1));
    drop(spool);

    let (spool, live) = open_retrying(&dir);
    assert_eq!(live.len(), 2);
    for (msg, (env, loc, n)) in live.iter().zip([(&env0, loc0, 0), (&env1, loc1, 1)]) {
        assert_eq!(&msg.envelope, env);
        assert_eq!(msg.place, Place::Log(loc));
        assert_eq!(msg.size, body(n).len() as u64);
        assert_eq!(msg.states, vec![RcptState::Pending; 2]);
        assert_eq!(spool.read_body(msg).unwrap(), body(n));
    }
    // Ids stay increasing across a restart.
    assert!(spool.new_id() > env1.id);
}

#[tokio::test]
async fn outcomes_and_done_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = open_retrying(dir);
    let (a, _) = put(&spool, 1).await;
    let (b, _) = put(&spool, 2).await;
    let (c, _) = put(&spool, 3).await;
    spool
        .record_outcome(a.id, 0, true, "250 2.0.0 Ok: queued as X")
        .await
        .unwrap();
    spool
        .record_outcome(a.id, 1, false, "550-5.1.1 no such user\r\n550 5.1.1 really")
        .await
        .unwrap();
    spool.mark_done(b.id).await.unwrap();
    spool.mark_moved(c.id).await.unwrap();
    // Records about unknown ids or recipients are harmless.
    spool.record_outcome(b.id, 0, true, "late").await.unwrap();
    spool
        .record_outcome(a.id, 7, true, "no such index")
        .await
        .unwrap();
    spool.mark_done(QueueId::from_u64(1)).await.unwrap();
    drop(spool);

    let (_spool, live) = open_retrying(dir);
    assert_eq!(ids(&live), vec![a.id]);
    assert_eq!(
        live[0].states,
        vec![RcptState::Delivered, RcptState::Failed]
    );
}

#[tokio::test]
async fn torn_tail_at_every_offset_replays_the_earlier_records() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("orig");
    let (spool, _) = open_retrying(&dir);
    let (first, _) = put(&spool, 1).await;
    let (_, last) = put(&spool, 2).await;
    drop(spool);
    let bytes = fs::read(seg_path(&dir, last.segment)).unwrap();
    assert_eq!(bytes.len() as u64, last.offset + last.len);

    for cut in last.offset..last.offset + last.len {
        let dir = tmp.path().join(format!("cut{cut}"));
        fs::create_dir_all(dir.join("log")).unwrap();
        let seg = seg_path(&dir, last.segment);
        fs::write(&seg, &bytes[..cut as usize]).unwrap();

        assert_eq!(
            ids(&scan(&dir).unwrap()),
            vec![first.id],
            "scan, cut at {cut}"
        );
        let (spool, live) = open_retrying(&dir);
        assert_eq!(ids(&live), vec![first.id], "open, cut at {cut}");
        assert_eq!(spool.read_body(&live[0]).unwrap(), body(1));
        drop(spool);
        // The torn tail was trimmed, so it is not reported as corruption later.
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            last.offset,
            "cut at {cut}"
        );
        let (_spool, live) = open_retrying(&dir);
        assert_eq!(ids(&live), vec![first.id]);
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn torn_segment_header_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for len in 0..HEADER.len() {
        fs::create_dir_all(dir.join("log")).unwrap();
        fs::write(seg_path(dir, 7), &HEADER[..len]).unwrap();
        fs::write(dir.join("log").join("notes.txt"), "not a segment").unwrap();
        let (spool, live) = open_retrying(dir);
        assert!(live.is_empty());
        drop(spool);
        assert!(!seg_path(dir, 7).exists(), "header cut at {len}");
        assert!(dir.join("log").join("notes.txt").exists());
        fs::remove_dir_all(dir.join("log")).unwrap();
    }
}

/// Flips a byte of the CRC of the record at `loc`.
fn break_crc(dir: &Path, loc: &Location) {
    let path = seg_path(dir, loc.segment);
    let mut bytes = fs::read(&path).unwrap();
    bytes[loc.offset as usize + 8] ^= 0x55;
    fs::write(&path, bytes).unwrap();
}

#[tokio::test]
async fn corrupt_record_in_an_older_segment_is_skipped_and_the_rest_replayed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = open_retrying(dir);
    let (m1, l1) = put(&spool, 1).await;
    let (_m2, l2) = put(&spool, 2).await;
    let (m3, l3) = put(&spool, 3).await;
    drop(spool);
    let (spool, _) = open_retrying(dir);
    let (m4, l4) = put(&spool, 4).await;
    drop(spool);
    assert_eq!(l1.segment, l2.segment);
    assert!(l4.segment > l2.segment);

    break_crc(dir, &l2);
    let len_before = fs::metadata(seg_path(dir, l2.segment)).unwrap().len();
    // Only the damaged record is lost: replay resumes at the next valid one.
    assert_eq!(ids(&scan(dir).unwrap()), vec![m1.id, m3.id, m4.id]);
    let (spool, live) = open_retrying(dir);
    assert_eq!(ids(&live), vec![m1.id, m3.id, m4.id]);
    assert_eq!(spool.read_message(&l3).unwrap(), body(3));
    assert_eq!(spool.read_message(&l4).unwrap(), body(4));
    // Nothing was trimmed off the damaged segment.
    assert_eq!(
        fs::metadata(seg_path(dir, l2.segment)).unwrap().len(),
        len_before
    );
    assert!(matches!(
        spool.read_message(&l2),
        Err(SpoolError::Corrupt { .. })
    ));

    // Once its last live message is done, the damaged segment is set aside, not deleted.
    spool.mark_done(m1.id).await.unwrap();
    spool.mark_done(m3.id).await.unwrap();
    spool.close();
    let names = segments(dir);
    assert!(!names.contains(&segment_name(l1.segment)), "{names:?}");
    assert!(
        names.contains(&format!("{}.corrupt", segment_name(l1.segment))),
        "{names:?}"
    );
}

#[tokio::test]
async fn corrupt_record_in_the_newest_segment_is_not_trimmed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = open_retrying(dir);
    let (m1, _) = put(&spool, 1).await;
    let (_, l2) = put(&spool, 2).await;
    let (m3, _) = put(&spool, 3).await;
    drop(spool);
    break_crc(dir, &l2);
    let path = seg_path(dir, l2.segment);
    let len_before = fs::metadata(&path).unwrap().len();
    // Not a torn tail (a valid record follows): skipped, the rest replayed, nothing cut.
    let (_spool, live) = open_retrying(dir);
    assert_eq!(ids(&live), vec![m1.id, m3.id]);
    assert_eq!(fs::metadata(&path).unwrap().len(), len_before);
}

/// Damage at the very start of a record (its frame) hides its length, so replay has to
/// scan for the next record, here across a body larger than one scan chunk.
#[tokio::test]
async fn a_damaged_frame_is_resynchronised_past_a_large_body() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = open_retrying(dir);
    let big: Vec<u8> = b"0123456789 PR line\r\n".repeat(150_000); // ~3 MB, CRLF lines
    let env1 = envelope(spool.new_id(), 1);
    let l1 = spool.store(&env1, &big).await.unwrap();
    let (m2, _) = put(&spool, 2).await;
    spool
        .record_outcome(m2.id, 0, true, "250 ok")
        .await
        .unwrap();
    let (m3, l3) = put(&spool, 3).await;
    drop(spool);
    let path = seg_path(dir, l1.segment);
    let mut bytes = fs::read(&path).unwrap();
    bytes[l1.offset as usize] = b'X'; // the magic
    fs::write(&path, &bytes).unwrap();
    let live = scan(dir).unwrap();
    assert_eq!(ids(&live), vec![m2.id, m3.id]);
    assert_eq!(live[0].states[0], RcptState::Delivered);
    let (spool, live) = open_retrying(dir);
    assert_eq!(ids(&live), vec![m2.id, m3.id]);
    assert_eq!(spool.read_message(&l3).unwrap(), body(3));
    assert_eq!(fs::metadata(&path).unwrap().len(), bytes.len() as u64);
}

/// After a skipped bad record, a torn tail at the end of the newest segment is still a
/// torn tail: cut off, and the records between are kept.
#[tokio::test]
async fn a_torn_tail_after_skipped_corruption_is_still_trimmed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = open_retrying(dir);
    let (m1, l1) = put(&spool, 1).await;
    let (m2, l2) = put(&spool, 2).await;
    let (_, l3) = put(&spool, 3).await;
    drop(spool);
    break_crc(dir, &l1);
    let path = seg_path(dir, l1.segment);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..(l3.offset + l3.len / 2) as usize]).unwrap();
    let (spool, live) = open_retrying(dir);
    assert_eq!(ids(&live), vec![m2.id]);
    assert_eq!(fs::metadata(&path).unwrap().len(), l2.offset + l2.len);
    spool.mark_done(m2.id).await.unwrap();
    spool.close();
    // The segment held corruption: set aside when collected, not deleted.
    let names = segments(dir);
    assert!(
        names.contains(&format!("{}.corrupt", segment_name(l1.segment))),
        "{names:?} ({})",
        m1.id
    );
}

/// Waits for the committer, which collects garbage after answering the batch that
/// finished a message.
/// Waits (up to 30 s: a loaded CI machine can be slow) until `cond` holds.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..3000 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test]
async fn gc_deletes_old_segments_in_order_once_their_messages_are_done() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // segment_size 1: every batch goes to a new segment.
    let (spool, _) = Spool::open(dir, tiny_segments()).unwrap();
    let (a, la) = put(&spool, 1).await;
    let (b, lb) = put(&spool, 2).await;
    let (c, lc) = put(&spool, 3).await;
    assert!(la.segment < lb.segment && lb.segment < lc.segment);
    let exists = |seq| seg_path(dir, seq).exists();

    spool.record_outcome(a.id, 0, true, "250 ok").await.unwrap();
    spool.mark_done(b.id).await.unwrap();
    // A barrier: the committer handles requests in order, GC included.
    spool
        .record_outcome(QueueId::from_u64(1), 0, true, "-")
        .await
        .unwrap();
    // B is done but A, older, is not: nothing may go.
    assert!(exists(la.segment) && exists(lb.segment) && exists(lc.segment));

    spool.mark_done(a.id).await.unwrap();
    eventually("A's and B's segments collected", || {
        !exists(la.segment) && !exists(lb.segment)
    })
    .await;
    // C's segment stays, and so does everything after it (the RCPT and DONE records).
    assert!(exists(lc.segment));
    assert_eq!(spool.read_message(&lc).unwrap(), body(3));
    assert_eq!(segments(dir).first(), Some(&segment_name(lc.segment)));
    drop(spool);

    let (spool, live) = Spool::open(dir, tiny_segments()).unwrap();
    assert_eq!(ids(&live), vec![c.id]);
    spool.mark_done(c.id).await.unwrap();
    spool.close(); // waits for the committer, GC included
    // Only the segment that was being appended to remains.
    assert_eq!(segments(dir).len(), 1, "{:?}", segments(dir));
    drop(spool);

    let (_spool, live) = Spool::open(dir, tiny_segments()).unwrap();
    assert!(live.is_empty());
    assert_eq!(segments(dir).len(), 1, "{:?}", segments(dir));
}

#[tokio::test]
async fn rotation_by_size_replays_across_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let opts = SpoolOptions {
        segment_size: 600,
        ..SpoolOptions::default()
    };
    let (spool, _) = Spool::open(dir, opts).unwrap();
    let mut stored = Vec::new();
    for n in 0..20 {
        stored.push(put(&spool, n).await.0);
    }
    for env in stored.iter().step_by(2) {
        spool.mark_done(env.id).await.unwrap();
    }
    spool
        .record_outcome(stored[1].id, 1, true, "ok")
        .await
        .unwrap();
    drop(spool);
    assert!(segments(dir).len() > 3, "{:?}", segments(dir));
    let (spool, live) = Spool::open(dir, opts).unwrap();
    let odd: Vec<QueueId> = stored.iter().skip(1).step_by(2).map(|e| e.id).collect();
    assert_eq!(ids(&live), odd);
    assert_eq!(
        live[0].states,
        vec![RcptState::Pending, RcptState::Delivered]
    );
    for msg in &live {
        let n = (msg.envelope.arrived - 1_764_403_200) as usize;
        assert_eq!(spool.read_body(msg).unwrap(), body(n));
    }
}

#[test]
fn a_second_open_of_the_same_spool_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path(), small()).unwrap();
    let err = Spool::open(tmp.path(), small())
        .err()
        .expect("second open must fail");
    match &err {
        SpoolError::Locked { holder, .. } => {
            assert_eq!(holder, &format!("pid {}", std::process::id()))
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("lock"), "{err}");
    drop(spool);
    let _reopened = Spool::open(tmp.path(), small()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stores_are_group_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = open_retrying(dir);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..200 {
        let spool = spool.clone();
        tasks.spawn(async move {
            let env = envelope(spool.new_id(), n);
            let loc = spool.store(&env, &body(n)).await.unwrap();
            (env, loc, n)
        });
    }
    let mut stored = Vec::new();
    while let Some(done) = tasks.join_next().await {
        stored.push(done.unwrap());
    }
    let syncs = spool.sync_count();
    assert!(
        (1..100).contains(&syncs),
        "{syncs} fdatasyncs for 200 stores"
    );
    for (_, loc, n) in &stored {
        assert_eq!(spool.read_message(loc).unwrap(), body(*n));
    }
    drop(spool);

    let (_spool, live) = open_retrying(dir);
    assert_eq!(live.len(), 200);
    stored.sort_by_key(|(env, _, _)| env.id);
    for (msg, (env, loc, _)) in live.iter().zip(&stored) {
        assert_eq!(&msg.envelope, env);
        assert_eq!(msg.place, Place::Log(*loc));
    }
}

#[tokio::test]
async fn per_record_sync_without_group_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        group_commit: false,
        ..SpoolOptions::default()
    };
    let (spool, _) = Spool::open(tmp.path(), opts).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..20 {
        let spool = spool.clone();
        tasks.spawn(async move { put(&spool, n).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(spool.sync_count(), 20);
}

fn lazy(lazy_sync: std::time::Duration) -> SpoolOptions {
    SpoolOptions {
        lazy_sync,
        ..SpoolOptions::default()
    }
}

/// Long enough never to come during a test.
const NEVER: std::time::Duration = std::time::Duration::from_secs(3600);

#[tokio::test]
async fn written_outcomes_are_answered_before_their_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = Spool::open(dir, lazy(NEVER)).unwrap();
    let (a, la) = put(&spool, 1).await;
    let (b, lb) = put(&spool, 2).await;
    let synced = spool.sync_count();
    spool
        .record_final(a.id, Place::Log(la), 0, true, "250 ok", Durability::Written)
        .await
        .unwrap();
    spool
        .finish(b.id, Place::Log(lb), Durability::Written)
        .await
        .unwrap();
    // Answered once written, without an fdatasync of their own.
    assert_eq!(spool.sync_count(), synced);
    // Written, they survive the process at once: another reader sees them now.
    let seen = scan(dir).unwrap();
    assert_eq!(ids(&seen), vec![a.id]);
    assert_eq!(seen[0].states[0], RcptState::Delivered);
    // A stop syncs what is written.
    spool.close();
    assert_eq!(spool.sync_count(), synced + 1);
    drop(spool);
    let (_spool, live) = open_retrying(dir);
    assert_eq!(ids(&live), vec![a.id]);
}

#[tokio::test]
async fn written_outcomes_are_synced_by_their_deadline_under_steady_traffic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = Spool::open(dir, lazy(std::time::Duration::from_millis(50))).unwrap();
    let mut stored = Vec::new();
    for n in 0..20 {
        stored.push(put(&spool, n).await);
    }
    let synced = spool.sync_count();
    // A written record every 20 ms, for 400 ms: never 50 ms without a request, but the
    // deadline counts from the first record written, so the committer syncs meanwhile
    // (a timer restarted by every request would not have by the end of the loop).
    for (env, loc) in &stored {
        spool
            .finish(env.id, Place::Log(*loc), Durability::Written)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        spool.sync_count() > synced,
        "no sync while written records came"
    );
    drop(spool);
    let (_spool, live) = open_retrying(dir);
    assert!(live.is_empty());
}

#[tokio::test]
async fn a_synced_batch_makes_the_written_records_before_it_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = Spool::open(dir, lazy(NEVER)).unwrap();
    let (a, la) = put(&spool, 1).await;
    let synced = spool.sync_count();
    spool
        .finish(a.id, Place::Log(la), Durability::Written)
        .await
        .unwrap();
    // The next message's fdatasync covers the DONE written before it: one sync for
    // both, and nothing left for the stop to sync.
    let (b, _) = put(&spool, 2).await;
    assert_eq!(spool.sync_count(), synced + 1);
    spool.close();
    assert_eq!(spool.sync_count(), synced + 1);
    drop(spool);
    let (_spool, live) = open_retrying(dir);
    assert_eq!(ids(&live), vec![b.id]);
}

#[tokio::test]
async fn scan_works_while_the_spool_is_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = open_retrying(dir);
    let (a, la) = put(&spool, 1).await;
    let (b, _) = put(&spool, 2).await;
    spool
        .record_outcome(a.id, 1, false, "550 no")
        .await
        .unwrap();
    let seen = scan(dir).unwrap();
    assert_eq!(ids(&seen), vec![a.id, b.id]);
    assert_eq!(seen[0].states, vec![RcptState::Pending, RcptState::Failed]);
    assert_eq!(read_body_in(dir, &seen[0]).unwrap(), body(1));
    assert_eq!(seen[0].place, Place::Log(la));
    // The spool is unaffected.
    spool.mark_done(b.id).await.unwrap();
    assert_eq!(ids(&scan(dir).unwrap()), vec![a.id]);
}

#[tokio::test]
async fn closed_spool_refuses_records_and_encode_errors_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path(), small()).unwrap();
    let mut bad = envelope(spool.new_id(), 1);
    bad.recipients.push("x@y\r\nrcpt <evil@example>".into());
    assert!(matches!(
        spool.store(&bad, b"x").await,
        Err(SpoolError::Encode(_))
    ));
    assert_eq!(spool.sync_count(), 0);
    spool.close();
    let env = envelope(spool.new_id(), 2);
    assert!(matches!(
        spool.store(&env, b"x").await,
        Err(SpoolError::Closed)
    ));
    assert!(matches!(
        spool.mark_done(env.id).await,
        Err(SpoolError::Closed)
    ));
}

#[test]
fn scan_of_a_missing_spool_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(
        scan(&tmp.path().join("nope")),
        Err(SpoolError::Io { .. })
    ));
}

/// `Spool::open` for tests that reopen a spool at once. Another test thread spawning a
/// process (openssl, the postern binary) can fork while our lock file is open: the child
/// holds the flock'd descriptor until its exec closes it (O_CLOEXEC), so an immediate
/// reopen may briefly see `Locked`. Real servers do not fork, and `Locked` stays an
/// error there.
fn open_retrying(dir: &Path) -> (Spool, Vec<StoredMessage>) {
    for _ in 0..100 {
        match Spool::open(dir, small()) {
            Err(SpoolError::Locked { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
    panic!("spool still locked after 2 s");
}

#[test]
fn a_damaged_deferred_file_is_set_aside_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("spool");
    {
        let (spool, _) = open_retrying(&dir);
        spool.close();
    }
    let bad = dir
        .join(DEFERRED_DIR)
        .join(QueueId::from_u64(42).to_string());
    fs::write(&bad, b"not a deferred file").unwrap();
    let (_spool, live) = open_retrying(&dir);
    assert!(live.is_empty());
    assert!(!bad.exists());
    assert!(bad.with_extension("corrupt").exists());
}

#[tokio::test]
async fn the_id_floor_covers_deferred_and_quarantined_files_and_nothing_is_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let (spool, _) = open_retrying(&dir);
    // Ids far ahead of the clock, as a clock set ahead leaves them.
    let far = QueueId::from_u64(u64::MAX / 2);
    let far1 = QueueId::from_u64(u64::MAX / 2 + 1);
    let pending = [RcptState::Pending; 2];
    spool
        .move_to_deferred(&envelope(far, 1), body(1), &pending)
        .await
        .unwrap();
    quarantine::put(&dir, &envelope(far1, 2), &body(2), "rule", "why").unwrap();
    // Taking a name already in use is an error, never an overwrite.
    assert!(
        spool
            .move_to_deferred(&envelope(far, 3), body(3), &pending)
            .await
            .is_err()
    );
    assert!(quarantine::put(&dir, &envelope(far1, 4), &body(4), "rule", "why").is_err());
    let (loaded, deferred_body) = deferred::load(&dir.join(DEFERRED_DIR), far).unwrap();
    assert_eq!(loaded.message.envelope, envelope(far, 1));
    assert_eq!(deferred_body, body(1));
    assert_eq!(quarantine::load(&dir, far1).unwrap().1, body(2));
    for sub in [DEFERRED_DIR, QUARANTINE_DIR] {
        for e in fs::read_dir(dir.join(sub)).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(!name.ends_with(".tmp"), "{name} left behind");
        }
    }
    spool.close();
    drop(spool);
    // The log holds no MESSAGE record with these ids: the floor must come from the files.
    let (spool, live) = open_retrying(&dir);
    assert_eq!(ids(&live), vec![far]);
    assert!(spool.new_id() > far1);
}

/// A directory fsync that keeps failing: more failures than `sync_dir_retrying` retries.
const FSYNC_FAILURES: u32 = 10;

/// Gives `path` a second name, so that its content can be put back under `path` after
/// an unlink: what a crash does to an unlink whose directory fsync failed.
fn keep_name(path: &Path) -> PathBuf {
    let kept = path.with_extension("kept");
    fs::hard_link(path, &kept).unwrap();
    kept
}

fn undo_unlink(kept: &Path, path: &Path) {
    assert!(!path.exists(), "{} was not unlinked", path.display());
    fs::rename(kept, path).unwrap();
}

#[tokio::test]
async fn a_finished_deferred_message_stays_finished_whatever_its_unlink_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let deferred_dir = dir.join(DEFERRED_DIR);
    let (spool, _) = open_retrying(&dir);
    let (env, _) = put(&spool, 1).await;
    let pending = [RcptState::Pending; 2];
    spool
        .move_to_deferred(&env, body(1), &pending)
        .await
        .unwrap();
    let file = deferred::path(&deferred_dir, env.id);
    let kept = keep_name(&file);
    durable::fault::fail_dir_syncs(&deferred_dir, FSYNC_FAILURES);
    // The operator deletes it (pending recipients: a resurrection would deliver it).
    spool
        .finish(env.id, Place::Deferred, Durability::Synced)
        .await
        .unwrap();
    durable::fault::clear(&deferred_dir);
    // A second finish (as after a failed unlink) is harmless.
    fs::hard_link(&kept, &file).unwrap();
    spool
        .finish(env.id, Place::Deferred, Durability::Synced)
        .await
        .unwrap();
    spool.close();
    drop(spool);
    // The crash lost the unlink.
    undo_unlink(&kept, &file);
    assert!(scan(&dir).unwrap().is_empty());
    let (_spool, live) = open_retrying(&dir);
    assert!(live.is_empty(), "finished message came back: {live:?}");
    assert!(!file.exists(), "the finished file is removed at open");
}

#[tokio::test]
async fn a_deferred_file_whose_name_may_not_be_durable_keeps_its_log_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let deferred_dir = dir.join(DEFERRED_DIR);
    let pending = [RcptState::Pending; 2];
    let (spool, _) = open_retrying(&dir);
    let (e1, _) = put(&spool, 1).await;
    let (e2, _) = put(&spool, 2).await;
    durable::fault::fail_dir_syncs(&deferred_dir, FSYNC_FAILURES);
    spool
        .move_to_deferred(&e1, body(1), &pending)
        .await
        .unwrap();
    durable::fault::fail_dir_syncs(&deferred_dir, FSYNC_FAILURES);
    spool
        .move_to_deferred(&e2, body(2), &pending)
        .await
        .unwrap();
    // e1 is finished (the operator deletes it); e2 waits.
    spool
        .finish(e1.id, Place::Deferred, Durability::Synced)
        .await
        .unwrap();
    durable::fault::clear(&deferred_dir);
    spool.close();
    drop(spool);
    // The crash lost both new names: e2 must survive in the log, e1 must stay finished.
    fs::remove_file(deferred::path(&deferred_dir, e2.id)).unwrap();
    assert!(!deferred::path(&deferred_dir, e1.id).exists());
    assert_eq!(ids(&scan(&dir).unwrap()), vec![e2.id]);
    let (spool, live) = open_retrying(&dir);
    assert_eq!(ids(&live), vec![e2.id]);
    assert!(matches!(live[0].place, Place::Log(_)));
    assert_eq!(spool.read_body(&live[0]).unwrap(), body(2));
}

#[tokio::test]
async fn gc_stops_when_a_segment_removal_may_not_be_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log_dir = dir.join("log");
    let (spool, _) = Spool::open(dir, tiny_segments()).unwrap();
    // segment_size 1: each batch in its own segment.
    let (m1, l1) = put(&spool, 1).await;
    let (m2, l2) = put(&spool, 2).await;
    assert!(l2.segment > l1.segment);
    let first = seg_path(dir, l1.segment);
    let kept = keep_name(&first);
    durable::fault::fail_dir_syncs(&log_dir, FSYNC_FAILURES);
    spool.mark_done(m1.id).await.unwrap();
    eventually("the first segment removed", || !first.exists()).await;
    // The removal is seen before its directory fsync runs: wait until that fsync and all
    // its retries have failed (clearing the fault earlier would let a retry succeed).
    let attempts = crate::durable::DIR_SYNC_RETRIES + 1;
    eventually("the removal's fsyncs failed", || {
        durable::fault::remaining(&log_dir) <= FSYNC_FAILURES - attempts
    })
    .await;
    durable::fault::clear(&log_dir);
    // m1's DONE record lives in a later segment: that one must not be collected now.
    spool.mark_done(m2.id).await.unwrap();
    spool.close();
    drop(spool);
    undo_unlink(&kept, &first);
    assert!(seg_path(dir, l2.segment).exists());
    let (_spool, live) = open_retrying(dir);
    assert!(live.is_empty(), "finished message came back: {live:?}");
}

#[test]
fn a_removed_quarantine_file_stays_removed_whatever_its_unlink_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let qdir = dir.join(QUARANTINE_DIR);
    let id = QueueId::from_u64(77);
    quarantine::put(&dir, &envelope(id, 1), &body(1), "rule", "why").unwrap();
    let file = qdir.join(id.to_string());
    let kept = keep_name(&file);
    durable::fault::fail_dir_syncs(&qdir, FSYNC_FAILURES);
    quarantine::remove(&dir, id).unwrap();
    durable::fault::clear(&qdir);
    undo_unlink(&kept, &file);
    // Back on disk, but marked: neither listed nor releasable, and cleaned at open.
    assert!(quarantine::list(&dir).unwrap().is_empty());
    assert!(quarantine::load(&dir, id).is_err());
    assert!(quarantine::remove(&dir, id).is_err());
    let (_spool, _) = open_retrying(&dir);
    assert!(!file.exists());
}

fn queued(env: &Envelope, n: usize, states: &[RcptState], loc: Location) -> Queued {
    Queued::new(&StoredMessage {
        envelope: env.clone(),
        states: states.to_vec(),
        place: Place::Log(loc),
        size: body(n).len() as u64,
    })
    .unwrap()
}

#[tokio::test]
async fn a_relocated_message_keeps_its_states_and_frees_its_old_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = Spool::open(dir, tiny_segments()).unwrap();
    let (a, la) = put(&spool, 1).await;
    spool.record_outcome(a.id, 0, true, "250 ok").await.unwrap();
    let (b, lb) = put(&spool, 2).await;
    let (c, lc) = put(&spool, 3).await;
    let q = queued(&a, 1, &[RcptState::Delivered, RcptState::Pending], la);
    let moved = spool.relocate(&q).await.unwrap();
    assert!(moved.segment > lb.segment);
    assert_eq!(spool.read_message(&moved).unwrap(), body(1));
    // A's old segment and the one with its RCPT record go; B's (older than the copy)
    // stays, and with it everything after.
    eventually("A's old segment collected", || {
        !seg_path(dir, la.segment).exists()
    })
    .await;
    assert!(seg_path(dir, lb.segment).exists());
    // A copy of a finished message is refused (C's segment is kept by B, older).
    spool.mark_done(c.id).await.unwrap();
    let qc = queued(&c, 3, &[RcptState::Pending; 2], lc);
    assert!(matches!(spool.relocate(&qc).await, Err(SpoolError::NotLive(id)) if id == c.id));
    // So is one from where the message no longer is.
    assert!(spool.relocate(&q).await.is_err());
    spool.mark_done(b.id).await.unwrap();
    drop(spool);

    let (spool, live) = Spool::open(dir, tiny_segments()).unwrap();
    assert_eq!(ids(&live), vec![a.id]);
    assert_eq!(
        live[0].states,
        vec![RcptState::Delivered, RcptState::Pending]
    );
    assert_eq!(live[0].place, Place::Log(moved));
    assert_eq!(spool.read_body(&live[0]).unwrap(), body(1));
    // An outcome after the copy applies to it.
    spool
        .record_outcome(a.id, 1, false, "550 no")
        .await
        .unwrap();
    drop(spool);
    let (_spool, live) = Spool::open(dir, tiny_segments()).unwrap();
    assert_eq!(
        live[0].states,
        vec![RcptState::Delivered, RcptState::Failed]
    );
}

#[test]
fn relocation_waits_for_a_mostly_finished_oldest_segment() {
    let shape = |live, total, loaded| LogShape {
        oldest: Some(SegmentUse {
            seq: 3,
            live,
            total,
        }),
        current: 9,
        segments: 7,
        // The rest of the log: all of it still waiting.
        live: live + 600,
        total: total + 600,
        loaded,
    };
    assert_eq!(shape(1, 4, true).relocation_candidate(), Some(3));
    assert_eq!(shape(25, 100, true).relocation_candidate(), Some(3));
    // More than a quarter live (a destination down: nothing is rewritten), nothing
    // live (GC's job), or the old index not loaded yet.
    assert_eq!(shape(26, 100, true).relocation_candidate(), None);
    assert_eq!(shape(0, 100, true).relocation_candidate(), None);
    assert_eq!(shape(1, 100, false).relocation_candidate(), None);
    let mut current = shape(1, 100, true);
    current.current = 3;
    assert_eq!(current.relocation_candidate(), None);
    // A third of the traffic waits (a dead destination): the oldest segment is a third
    // live, but it pins finished segments behind it; once more than half of the log is
    // finished, it is emptied.
    let mut pinning = shape(33, 100, true);
    assert_eq!(pinning.relocation_candidate(), None, "the log mostly live");
    pinning.total = 700;
    pinning.live = 349;
    assert_eq!(pinning.relocation_candidate(), Some(3));
    pinning.live = 350;
    assert_eq!(pinning.relocation_candidate(), None, "half the log live");
    // Everything waits (a destination down): nothing is rewritten.
    let all = shape(100, 100, true);
    assert_eq!(all.relocation_candidate(), None);
}

#[tokio::test]
async fn new_mail_is_stored_before_the_backlog_is_loaded_and_never_mixed_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = Spool::open(dir, tiny_segments()).unwrap();
    let mut old = Vec::new();
    for n in 0..5 {
        old.push(put(&spool, n).await.0.id);
    }
    spool.mark_done(old[1]).await.unwrap();
    drop(spool);

    let (spool, backlog) = Spool::open_in_background(dir, tiny_segments()).unwrap();
    // New mail first: stored (and finished) while the backlog waits.
    let (fresh, _) = put(&spool, 7).await;
    assert!(
        old.iter().all(|id| *id < fresh.id),
        "new ids above the old ones"
    );
    let (done, _) = put(&spool, 8).await;
    spool.mark_done(done.id).await.unwrap();
    assert!(!spool.shape().loaded);
    let mut loaded = Vec::new();
    backlog.load(|batch| loaded.extend(batch)).unwrap();
    assert!(spool.shape().loaded);
    let loaded: Vec<QueueId> = loaded.iter().map(|q| q.id).collect();
    assert_eq!(loaded, vec![old[0], old[2], old[3], old[4]]);
    drop(spool);
    let (_spool, live) = Spool::open(dir, tiny_segments()).unwrap();
    let mut want = vec![old[0], old[2], old[3], old[4], fresh.id];
    want.sort();
    assert_eq!(ids(&live), want);
}

#[tokio::test]
async fn the_floor_is_found_in_the_newest_segments_and_old_logs_are_read_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A log written without FLOOR records (an older version): one segment, by hand,
    // holding a message whose id is far in the future.
    let future = QueueId::from_u64(u64::MAX / 2);
    fs::create_dir_all(dir.join("log")).unwrap();
    let mut bytes = HEADER.to_vec();
    bytes.extend(record::encode_message(&envelope(future, 0), &body(0)).unwrap());
    fs::write(seg_path(dir, 1), &bytes).unwrap();
    let (spool, live) = Spool::open(dir, small()).unwrap();
    assert_eq!(ids(&live), vec![future]);
    let next = spool.new_id();
    assert!(next > future);
    drop(spool);
    // Now the newest segment has a FLOOR record: the floor holds without reading the
    // old segment (which is damaged here, beyond recognition, to prove it).
    fs::write(seg_path(dir, 1), b"garbage").unwrap();
    // (`next` was handed out but never stored: it needs no protection.)
    let (spool, _backlog) = Spool::open_in_background(dir, small()).unwrap();
    assert!(spool.new_id() > future);
}
