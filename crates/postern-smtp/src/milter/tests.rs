//! Conversations without sockets: what the session writes, byte for byte, and what it
//! makes of the milter's bytes, however they are split.

use super::frame::write_packet;
use super::proto::*;
use super::*;
use crate::reply::{Reply, Status};

fn pkt(code: u8, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_packet(&mut v, code, |o| o.extend_from_slice(data));
    v
}

fn optneg_reply(version: u32, actions: u32, protocol: u32) -> Vec<u8> {
    let mut d = version.to_be_bytes().to_vec();
    d.extend_from_slice(&actions.to_be_bytes());
    d.extend_from_slice(&protocol.to_be_bytes());
    pkt(SMFIC_OPTNEG, &d)
}

/// Feeds `bytes` and drains the events.
fn events(s: &mut Session, bytes: &[u8]) -> Vec<Result<Event, Error>> {
    s.feed(bytes);
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn decision(d: Decision) -> Vec<Result<Event, Error>> {
    vec![Ok(Event::Decision(d))]
}

/// A session negotiated with a version 6 milter asking for `actions` and `protocol`.
fn session(actions: u32, protocol: u32) -> Session {
    let mut s = Session::new(Config::default());
    s.take_output();
    assert_eq!(
        events(&mut s, &optneg_reply(6, actions, protocol)),
        [Ok(Event::Negotiated)]
    );
    s
}

/// A session inside a transaction (CONNECT, HELO, MAIL answered with continue).
fn in_transaction(actions: u32, protocol: u32) -> Session {
    let mut s = session(actions, protocol);
    let addr = ClientAddr::Inet("192.0.2.7:4000".parse().unwrap());
    for step in 0..3 {
        let sent = match step {
            0 => s.connect(&[], "c.test", &addr),
            1 => s.helo(&[], "c.test"),
            _ => s.mail(&[], "a@b.test", &[]),
        };
        assert_eq!(sent, Ok(Sent::AwaitReply));
        assert_eq!(
            events(&mut s, &pkt(SMFIR_CONTINUE, b"")),
            decision(Decision::Continue)
        );
    }
    s.take_output();
    s
}

const OPTNEG_OUT: &[u8] = b"\0\0\0\x0dO\0\0\0\x06\0\0\x01\xff\0\x1f\xf7\xff";

#[test]
fn a_whole_conversation() {
    let mut s = Session::new(Config::default());
    // We offer version 6, every action, every flag but SMFIP_RCPT_REJ.
    assert_eq!(s.take_output(), OPTNEG_OUT);
    assert_eq!(s.awaiting(), Some(Command::OptNeg));
    // The milter: no HELO, no reply to headers; adds and changes headers, quarantines.
    let actions = SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_QUARANTINE;
    let protocol = SMFIP_NOHELO | SMFIP_NR_HDR;
    assert_eq!(
        events(&mut s, &optneg_reply(6, actions, protocol)),
        [Ok(Event::Negotiated)]
    );
    let n = s.negotiated().unwrap();
    assert_eq!((n.version, n.actions, n.protocol), (6, actions, protocol));
    assert_eq!(s.phase(), Phase::Ready);

    let addr = ClientAddr::Inet("192.0.2.7:4000".parse().unwrap());
    let conn_macros = [("j", "mx.test"), ("daemon_name", "postern")];
    assert_eq!(
        s.connect(&conn_macros, "c.test", &addr),
        Ok(Sent::AwaitReply)
    );
    assert_eq!(
        s.take_output(),
        [
            &b"\0\0\0\x22DCj\0mx.test\0{daemon_name}\0postern\0"[..],
            b"\0\0\0\x15Cc.test\x004\x0f\xa0192.0.2.7\0",
        ]
        .concat()
    );
    // Nothing may be sent while a reply is awaited.
    assert_eq!(s.helo(&[], "x"), Err(Error::Busy(Command::Connect)));
    assert_eq!(
        events(&mut s, &pkt(SMFIR_CONTINUE, b"")),
        decision(Decision::Continue)
    );
    assert_eq!(s.awaiting(), None);

    // HELO is not wanted: its macros still go, the command does not.
    assert_eq!(
        s.helo(&[("{tls_version}", "TLSv1.3")], "c.test"),
        Ok(Sent::Skipped)
    );
    assert_eq!(s.take_output(), b"\0\0\0\x18DH{tls_version}\0TLSv1.3\0");

    assert_eq!(
        s.mail(&[("i", "Q1")], "a@b.test", &["SIZE=100"]),
        Ok(Sent::AwaitReply)
    );
    assert_eq!(
        s.take_output(),
        [
            &b"\0\0\0\x07DMi\0Q1\0"[..],
            b"\0\0\0\x15M<a@b.test>\0SIZE=100\0",
        ]
        .concat()
    );
    assert_eq!(
        events(&mut s, &pkt(SMFIR_CONTINUE, b"")),
        decision(Decision::Continue)
    );
    // The first recipient is refused with the milter's own reply, the second goes on.
    assert_eq!(s.rcpt(&[], "x@d.test", &[]), Ok(Sent::AwaitReply));
    assert_eq!(s.take_output(), b"\0\0\0\x0cR<x@d.test>\0");
    let refused = Reply::new(550, Some(Status(5, 1, 1)), "no such user");
    assert_eq!(
        events(&mut s, &pkt(SMFIR_REPLYCODE, b"550 5.1.1 no such user\0")),
        decision(Decision::Reply(refused))
    );
    assert_eq!(s.phase(), Phase::Transaction);
    assert_eq!(s.rcpt(&[], "c@d.test", &[]), Ok(Sent::AwaitReply));
    s.take_output();
    assert_eq!(
        events(&mut s, &pkt(SMFIR_CONTINUE, b"")),
        decision(Decision::Continue)
    );
    assert_eq!(s.data(&[]), Ok(Sent::AwaitReply));
    assert_eq!(s.take_output(), b"\0\0\0\x01T");
    assert_eq!(
        events(&mut s, &pkt(SMFIR_CONTINUE, b"")),
        decision(Decision::Continue)
    );
    // Headers: no reply (SMFIP_NR_HDR); leading space dropped, folds as LF.
    assert_eq!(s.header("Subject", b" hello"), Ok(Sent::NoReply));
    assert_eq!(s.header("X-Long", b" a\r\n\tb"), Ok(Sent::NoReply));
    assert_eq!(
        s.take_output(),
        [
            &b"\0\0\0\x0fLSubject\0hello\0"[..],
            b"\0\0\0\x0dLX-Long\0a\n\tb\0",
        ]
        .concat()
    );
    assert_eq!(s.eoh(&[]), Ok(Sent::AwaitReply));
    assert_eq!(s.take_output(), b"\0\0\0\x01N");
    assert_eq!(
        events(&mut s, &pkt(SMFIR_CONTINUE, b"")),
        decision(Decision::Continue)
    );
    assert_eq!(s.body(b"Hi\r\n"), Ok((4, Sent::AwaitReply)));
    assert_eq!(s.take_output(), b"\0\0\0\x05BHi\r\n");
    assert_eq!(
        events(&mut s, &pkt(SMFIR_CONTINUE, b"")),
        decision(Decision::Continue)
    );
    assert_eq!(s.eom(&[("{msg_id}", "x")]), Ok(Sent::AwaitReply));
    assert_eq!(
        s.take_output(),
        [&b"\0\0\0\x0dDE{msg_id}\0x\0"[..], b"\0\0\0\x01E"].concat()
    );
    let answer = [
        pkt(SMFIR_PROGRESS, b""),
        pkt(SMFIR_ADDHEADER, b"X-Spam\0yes\0"),
        pkt(SMFIR_CHGHEADER, b"\0\0\0\x01Subject\0[SPAM] hello\0"),
        pkt(SMFIR_QUARANTINE, b"looks like spam\0"),
        pkt(SMFIR_CONTINUE, b""),
    ]
    .concat();
    assert_eq!(
        events(&mut s, &answer),
        [
            Ok(Event::Progress),
            Ok(Event::Action(Action::AddHeader {
                name: "X-Spam".into(),
                value: " yes".into()
            })),
            Ok(Event::Action(Action::ChgHeader {
                index: 1,
                name: "Subject".into(),
                value: " [SPAM] hello".into()
            })),
            Ok(Event::Action(Action::Quarantine {
                reason: "looks like spam".into()
            })),
            Ok(Event::Decision(Decision::Continue)),
        ]
    );
    assert_eq!(s.phase(), Phase::Connected);
    assert_eq!(s.abort(), Ok(Sent::Skipped));
    assert_eq!(s.quit(), Ok(Sent::NoReply));
    assert_eq!(s.take_output(), b"\0\0\0\x01Q");
    assert_eq!(s.handle_eof(), Ok(()));
}

/// The milter's side of the conversation above, fed in every pair of pieces and one
/// octet at a time: the same events every time.
#[test]
fn replies_decode_the_same_at_every_split() {
    let stream = [
        optneg_reply(6, SMFIF_ADDHDRS | SMFIF_CHGBODY, SMFIP_NR_HDR),
        pkt(SMFIR_CONTINUE, b""),
        pkt(SMFIR_CONTINUE, b""),
        pkt(SMFIR_PROGRESS, b""),
        pkt(SMFIR_ADDHEADER, b"X-A\0b\0"),
        pkt(SMFIR_REPLBODY, b"new body\r\n"),
        pkt(SMFIR_REPLYCODE, b"550-5.7.1 one\r\n550 5.7.1 two\0"),
    ]
    .concat();
    // A driver that goes on as each answer comes: CONNECT, MAIL, end of message.
    let drive = |pieces: &[&[u8]]| {
        let mut s = Session::new(Config::default());
        let mut got = Vec::new();
        for piece in pieces {
            s.feed(piece);
            while let Some(e) = s.poll_event() {
                let e = e.unwrap();
                match got.len() {
                    0 => s.connect(&[], "c", &ClientAddr::Unknown),
                    1 => s.mail(&[], "", &[]),
                    2 => s.eom(&[]),
                    _ => Ok(Sent::Skipped),
                }
                .unwrap();
                got.push(e);
            }
        }
        got
    };
    let want = drive(&[&stream]);
    assert_eq!(want.len(), 7);
    assert_eq!(
        want[6],
        Event::Decision(Decision::Reply(Reply {
            code: 550,
            status: Some(Status(5, 7, 1)),
            lines: vec!["one".into(), "two".into()],
        }))
    );
    for k in 0..=stream.len() {
        assert_eq!(drive(&[&stream[..k], &stream[k..]]), want, "split at {k}");
    }
    let octets: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(drive(&octets), want, "octet by octet");
}

#[test]
fn every_decision_at_every_stage() {
    use Decision::*;
    let stages = [
        Command::Connect,
        Command::Helo,
        Command::Mail,
        Command::Rcpt,
        Command::Data,
        Command::Header,
        Command::Eoh,
        Command::Body,
        Command::Eom,
    ];
    let replies: Vec<(Vec<u8>, Decision)> = vec![
        (pkt(SMFIR_CONTINUE, b""), Continue),
        (pkt(SMFIR_ACCEPT, b""), Accept),
        (pkt(SMFIR_REJECT, b""), Reject),
        (pkt(SMFIR_TEMPFAIL, b""), Tempfail),
        (pkt(SMFIR_DISCARD, b""), Discard),
        (pkt(SMFIR_SKIP, b""), Skip),
        (pkt(SMFIR_CONN_FAIL, b""), ConnFail),
        (pkt(SMFIR_SHUTDOWN, b""), Shutdown),
        (
            pkt(SMFIR_REPLYCODE, b"451 4.7.1 later\0"),
            Reply(crate::Reply::new(451, Some(Status(4, 7, 1)), "later")),
        ),
    ];
    for stage in stages {
        for (bytes, want) in &replies {
            let mut s = session(0, 0);
            let addr = ClientAddr::Unknown;
            // Walk to the stage, answering continue.
            for c in stages {
                let sent = match c {
                    Command::Connect => s.connect(&[], "h", &addr),
                    Command::Helo => s.helo(&[], "h"),
                    Command::Mail => s.mail(&[], "a@b", &[]),
                    Command::Rcpt => s.rcpt(&[], "c@d", &[]),
                    Command::Data => s.data(&[]),
                    Command::Header => s.header("A", b" b"),
                    Command::Eoh => s.eoh(&[]),
                    Command::Body => s.body(b"x\r\n").map(|(_, sent)| sent),
                    _ => s.eom(&[]),
                };
                assert_eq!(sent, Ok(Sent::AwaitReply), "{c}");
                if c == stage {
                    break;
                }
                s.feed(&pkt(SMFIR_CONTINUE, b""));
                assert_eq!(s.poll_event(), Some(Ok(Event::Decision(Continue))));
            }
            let got = events(&mut s, bytes);
            let allowed = match want {
                Discard => !matches!(stage, Command::Connect | Command::Helo),
                Skip => stage == Command::Body,
                _ => true,
            };
            if allowed {
                assert_eq!(got, decision(want.clone()), "{want:?} at {stage}");
                assert_eq!(s.awaiting(), None);
            } else {
                assert_eq!(
                    got,
                    [Err(Error::Unexpected {
                        code: bytes[4],
                        after: stage
                    })],
                    "{want:?} at {stage}"
                );
                assert_eq!(s.phase(), Phase::Failed);
            }
        }
    }
}

#[test]
fn every_action_at_end_of_message() {
    let all = SMFI_CURR_ACTS;
    let cases: Vec<(Vec<u8>, Action)> = vec![
        (
            pkt(SMFIR_ADDHEADER, b"X-Virus\0infected\0"),
            Action::AddHeader {
                name: "X-Virus".into(),
                value: " infected".into(),
            },
        ),
        (
            pkt(SMFIR_ADDHEADER, b"X-Folded\0a\n\tb\n c\0"),
            Action::AddHeader {
                name: "X-Folded".into(),
                value: " a\r\n\tb\r\n c".into(),
            },
        ),
        (
            pkt(
                SMFIR_INSHEADER,
                b"\0\0\0\0DKIM-Signature\0v=1; a=rsa-sha256\0",
            ),
            Action::InsHeader {
                index: 0,
                name: "DKIM-Signature".into(),
                value: " v=1; a=rsa-sha256".into(),
            },
        ),
        (
            pkt(SMFIR_CHGHEADER, b"\0\0\0\x02Received\0\0"),
            Action::ChgHeader {
                index: 2,
                name: "Received".into(),
                value: "".into(),
            },
        ),
        (
            // Index 0 is read as 1, as Sendmail and Postfix do.
            pkt(SMFIR_CHGHEADER, b"\0\0\0\0Subject\0new\0"),
            Action::ChgHeader {
                index: 1,
                name: "Subject".into(),
                value: " new".into(),
            },
        ),
        (
            pkt(SMFIR_CHGFROM, b"<bounce@b.test>\0SIZE=10 BODY=8BITMIME\0"),
            Action::ChgFrom {
                addr: "bounce@b.test".into(),
                args: vec!["SIZE=10".into(), "BODY=8BITMIME".into()],
            },
        ),
        (
            pkt(SMFIR_CHGFROM, b"<>\0"),
            Action::ChgFrom {
                addr: "".into(),
                args: vec![],
            },
        ),
        (
            pkt(SMFIR_ADDRCPT, b"<archive@b.test>\0"),
            Action::AddRcpt {
                addr: "archive@b.test".into(),
            },
        ),
        (
            pkt(SMFIR_ADDRCPT_PAR, b"archive@b.test\0NOTIFY=NEVER\0"),
            Action::AddRcptPar {
                addr: "archive@b.test".into(),
                args: vec!["NOTIFY=NEVER".into()],
            },
        ),
        (
            pkt(SMFIR_DELRCPT, b"<c@d.test>\0"),
            Action::DelRcpt {
                addr: "c@d.test".into(),
            },
        ),
        (
            pkt(SMFIR_REPLBODY, b"replaced\r\n\0binary"),
            Action::ReplBody(b"replaced\r\n\0binary".to_vec()),
        ),
        (
            pkt(SMFIR_QUARANTINE, b"Eicar-Test-Signature\0"),
            Action::Quarantine {
                reason: "Eicar-Test-Signature".into(),
            },
        ),
    ];
    for (bytes, want) in cases {
        let mut s = in_transaction(all, 0);
        assert_eq!(s.eom(&[]), Ok(Sent::AwaitReply));
        assert_eq!(
            events(&mut s, &[bytes.clone(), pkt(SMFIR_ACCEPT, b"")].concat()),
            [
                Ok(Event::Action(want.clone())),
                Ok(Event::Decision(Decision::Accept))
            ],
            "{bytes:?}"
        );
        // The same action at another stage is a protocol error.
        let mut s = in_transaction(all, 0);
        assert_eq!(s.rcpt(&[], "c@d", &[]), Ok(Sent::AwaitReply));
        assert_eq!(
            events(&mut s, &bytes),
            [Err(Error::Unexpected {
                code: bytes[4],
                after: Command::Rcpt
            })]
        );
        // And without its action bit, at end of message, too.
        let mut s = in_transaction(0, 0);
        s.eom(&[]).unwrap();
        assert_eq!(
            events(&mut s, &bytes),
            [Err(Error::NotNegotiated { code: bytes[4] })]
        );
    }
}

#[test]
fn header_values_with_leading_space_negotiated() {
    let mut s = in_transaction(SMFIF_ADDHDRS, SMFIP_HDR_LEADSPC);
    assert_eq!(s.header("Subject", b" hi"), Ok(Sent::AwaitReply));
    assert_eq!(s.take_output(), b"\0\0\0\x0dLSubject\0 hi\0");
    s.feed(&pkt(SMFIR_CONTINUE, b""));
    s.poll_event();
    s.eom(&[]).unwrap();
    assert_eq!(
        events(&mut s, &pkt(SMFIR_ADDHEADER, b"X-A\0\tverbatim\0"))[0],
        Ok(Event::Action(Action::AddHeader {
            name: "X-A".into(),
            value: "\tverbatim".into()
        }))
    );
}

#[test]
fn malformed_actions_are_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (pkt(SMFIR_ADDHEADER, b"X-A\0"), "no header value"),
        (pkt(SMFIR_ADDHEADER, b"X-A"), "no header name"),
        (pkt(SMFIR_ADDHEADER, b"\0v\0"), "bad header name"),
        (pkt(SMFIR_ADDHEADER, b"X A\0v\0"), "bad header name"),
        (pkt(SMFIR_ADDHEADER, b"X:A\0v\0"), "bad header name"),
        (
            pkt(SMFIR_ADDHEADER, b"X-A\0v\0extra"),
            "data after the last field",
        ),
        // A header may not smuggle another field, nor end the header section.
        (
            pkt(SMFIR_ADDHEADER, b"X-A\0v\nBcc: x\0"),
            "a header value line that is not a fold",
        ),
        (
            pkt(SMFIR_ADDHEADER, b"X-A\0v\n\n body\0"),
            "a header value line that is not a fold",
        ),
        (
            pkt(SMFIR_ADDHEADER, b"X-A\0v\rBcc: x\0"),
            "bare CR in a header value",
        ),
        (
            pkt(SMFIR_ADDHEADER, b"X-A\0v\n  \n more\0"),
            "a header value line of white space only",
        ),
        (
            pkt(
                SMFIR_ADDHEADER,
                &[b"X-A\0".as_slice(), &[b'v'; 995], b"\0"].concat(),
            ),
            "a header line over 998 octets",
        ),
        (
            pkt(
                SMFIR_ADDHEADER,
                &[b"X-A\0v\n ".as_slice(), &[b'v'; 998], b"\0"].concat(),
            ),
            "a header line over 998 octets",
        ),
        (pkt(SMFIR_INSHEADER, b"\0\0\0"), "no index"),
        (pkt(SMFIR_CHGHEADER, b"\0\0\0\x01X-A\0"), "no header value"),
        (pkt(SMFIR_ADDRCPT, b"<a@b>"), "no address"),
        (pkt(SMFIR_ADDRCPT, b"<>\0"), "empty recipient"),
        (
            pkt(SMFIR_ADDRCPT, b"<a@b>\0X=1\0"),
            "arguments where none belong",
        ),
        (
            pkt(SMFIR_DELRCPT, b"<a@b>\0X=1\0"),
            "arguments where none belong",
        ),
        (pkt(SMFIR_CHGFROM, b"<a@b>\0X=1"), "argument without NUL"),
        (pkt(SMFIR_QUARANTINE, b"why"), "no reason"),
        (
            pkt(SMFIR_REPLYCODE, b"250 ok\0"),
            "a milter reply code must be 4xx or 5xx",
        ),
        (
            pkt(SMFIR_CONTINUE, b"x"),
            "data after a reply that has none",
        ),
        (
            pkt(SMFIR_PROGRESS, b"x"),
            "data after a reply that has none",
        ),
    ];
    for (bytes, why) in cases {
        let mut s = in_transaction(SMFI_CURR_ACTS, 0);
        s.eom(&[]).unwrap();
        assert_eq!(
            events(&mut s, &bytes),
            [Err(Error::Malformed {
                code: bytes[4],
                why
            })],
            "{bytes:?}"
        );
        // An error ends the session: nothing more is sent or decoded.
        assert_eq!(s.phase(), Phase::Failed);
        assert_eq!(s.quit(), Err(Error::NotReady));
        assert_eq!(events(&mut s, &pkt(SMFIR_CONTINUE, b"")), []);
        // Nor kept: a milter flooding us after an error costs no memory.
        s.feed(&[0; 1000]);
        assert_eq!(s.buffered(), 0);
    }
}

#[test]
fn skipped_stages_send_only_their_macros() {
    let no_all = SMFIP_NOCONNECT
        | SMFIP_NOHELO
        | SMFIP_NOMAIL
        | SMFIP_NORCPT
        | SMFIP_NODATA
        | SMFIP_NOHDRS
        | SMFIP_NOEOH
        | SMFIP_NOBODY;
    let mut s = session(0, no_all);
    let m = [("j", "mx")];
    assert_eq!(s.connect(&m, "h", &ClientAddr::Unknown), Ok(Sent::Skipped));
    assert_eq!(s.helo(&m, "h"), Ok(Sent::Skipped));
    assert_eq!(s.mail(&m, "a@b", &[]), Ok(Sent::Skipped));
    assert_eq!(s.rcpt(&m, "c@d", &[]), Ok(Sent::Skipped));
    assert_eq!(s.data(&m), Ok(Sent::Skipped));
    assert_eq!(s.header("A", b"b"), Ok(Sent::Skipped));
    assert_eq!(s.eoh(&m), Ok(Sent::Skipped));
    assert_eq!(s.body(b"body\r\n"), Ok((6, Sent::Skipped)));
    let macros: Vec<u8> = b"CHMRTN"
        .iter()
        .flat_map(|&st| pkt(SMFIC_MACRO, &[&[st][..], b"j\0mx\0"].concat()))
        .collect();
    assert_eq!(s.take_output(), macros);
    // End of message is always sent.
    assert_eq!(s.eom(&[]), Ok(Sent::AwaitReply));
    assert_eq!(s.take_output(), b"\0\0\0\x01E");
}

#[test]
fn no_reply_flags_mean_no_waiting() {
    let nr = SMFIP_NR_CONN
        | SMFIP_NR_HELO
        | SMFIP_NR_MAIL
        | SMFIP_NR_RCPT
        | SMFIP_NR_DATA
        | SMFIP_NR_HDR
        | SMFIP_NR_EOH
        | SMFIP_NR_BODY;
    let mut s = session(0, nr);
    assert_eq!(s.connect(&[], "h", &ClientAddr::Unknown), Ok(Sent::NoReply));
    assert_eq!(s.helo(&[], "h"), Ok(Sent::NoReply));
    assert_eq!(s.mail(&[], "a@b", &[]), Ok(Sent::NoReply));
    assert_eq!(s.rcpt(&[], "c@d", &[]), Ok(Sent::NoReply));
    assert_eq!(s.data(&[]), Ok(Sent::NoReply));
    assert_eq!(s.header("A", b"b"), Ok(Sent::NoReply));
    assert_eq!(s.eoh(&[]), Ok(Sent::NoReply));
    // Without replies the whole body goes at once, in 65535-octet chunks.
    let big = vec![b'x'; MILTER_CHUNK_SIZE + 1];
    assert_eq!(s.body(&big), Ok((big.len(), Sent::NoReply)));
    assert_eq!(s.awaiting(), None);
    let out = s.take_output();
    // connect 8, helo 7, mail 11, rcpt 11, data 5, header 9, eoh 5, two body packets.
    assert_eq!(
        out.len(),
        8 + 7 + 11 + 11 + 5 + 9 + 5 + (5 + MILTER_CHUNK_SIZE) + (5 + 1)
    );
    // A reply to a command that has none is unsolicited.
    assert_eq!(
        events(&mut s, &pkt(SMFIR_CONTINUE, b"")),
        [Err(Error::Unsolicited {
            code: SMFIR_CONTINUE
        })]
    );
}

#[test]
fn a_long_body_goes_one_chunk_per_reply() {
    let mut s = in_transaction(0, 0);
    let body = vec![b'y'; MILTER_CHUNK_SIZE + 100];
    assert_eq!(s.body(&body), Ok((MILTER_CHUNK_SIZE, Sent::AwaitReply)));
    assert_eq!(s.take_output().len(), 5 + MILTER_CHUNK_SIZE);
    assert_eq!(
        s.body(&body[MILTER_CHUNK_SIZE..]),
        Err(Error::Busy(Command::Body))
    );
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    assert_eq!(
        s.body(&body[MILTER_CHUNK_SIZE..]),
        Ok((100, Sent::AwaitReply))
    );
    // SMFIR_SKIP: the rest of the body is not sent, end of message is.
    assert_eq!(
        events(&mut s, &pkt(SMFIR_SKIP, b"")),
        decision(Decision::Skip)
    );
    s.take_output();
    assert_eq!(s.body(b"more\r\n"), Ok((6, Sent::Skipped)));
    assert!(!s.has_output());
    assert_eq!(s.eom(&[]), Ok(Sent::AwaitReply));
}

#[test]
fn skip_is_an_error_unless_offered() {
    let mut s = Session::new(Config {
        protocol: OFFERED_PROTOCOL & !SMFIP_SKIP,
        ..Config::default()
    });
    events(&mut s, &optneg_reply(6, 0, 0));
    s.connect(&[], "h", &ClientAddr::Unknown).unwrap();
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    s.mail(&[], "a@b", &[]).unwrap();
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    assert_eq!(s.body(b"x"), Ok((1, Sent::AwaitReply)));
    assert_eq!(
        events(&mut s, &pkt(SMFIR_SKIP, b"")),
        [Err(Error::Unexpected {
            code: SMFIR_SKIP,
            after: Command::Body
        })]
    );
}

#[test]
fn accept_ends_the_message_and_reject_at_connect_the_connection() {
    let mut s = in_transaction(0, 0);
    s.rcpt(&[], "c@d", &[]).unwrap();
    assert_eq!(
        events(&mut s, &pkt(SMFIR_ACCEPT, b"")),
        decision(Decision::Accept)
    );
    s.take_output();
    assert_eq!(s.phase(), Phase::MessageDecided);
    assert_eq!(
        s.rcpt(&[("{rcpt_addr}", "e@f")], "e@f", &[]),
        Ok(Sent::Skipped)
    );
    assert_eq!(s.data(&[]), Ok(Sent::Skipped));
    assert_eq!(s.header("A", b"b"), Ok(Sent::Skipped));
    assert_eq!(s.body(b"x"), Ok((1, Sent::Skipped)));
    assert_eq!(s.eom(&[]), Ok(Sent::Skipped));
    assert!(!s.has_output());
    // The next transaction is seen again.
    assert_eq!(s.mail(&[], "a@b", &[]), Ok(Sent::AwaitReply));
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    // RSET: ABORT, no reply.
    s.take_output();
    assert_eq!(s.abort(), Ok(Sent::NoReply));
    assert_eq!(s.take_output(), b"\0\0\0\x01A");
    assert_eq!(s.phase(), Phase::Connected);

    // A refused MAIL ends the transaction.
    s.mail(&[], "a@b", &[]).unwrap();
    assert_eq!(
        events(&mut s, &pkt(SMFIR_TEMPFAIL, b"")),
        decision(Decision::Tempfail)
    );
    assert_eq!(s.phase(), Phase::Connected);
    assert_eq!(s.rcpt(&[], "c@d", &[]), Ok(Sent::Skipped));

    let mut s = session(0, 0);
    s.connect(&[], "h", &ClientAddr::Unknown).unwrap();
    assert_eq!(
        events(&mut s, &pkt(SMFIR_REJECT, b"")),
        decision(Decision::Reject)
    );
    assert_eq!(s.phase(), Phase::Finished);
    s.take_output();
    assert_eq!(s.helo(&[], "h"), Ok(Sent::Skipped));
    assert_eq!(s.mail(&[], "a@b", &[]), Ok(Sent::Skipped));
    assert!(!s.has_output());
    // libmilter may close after such a decision: not an error.
    assert_eq!(s.handle_eof(), Ok(()));
}

#[test]
fn negotiation_errors() {
    let cases: Vec<(Vec<u8>, Error)> = vec![
        (optneg_reply(1, 0, 0), Error::Version(1)),
        (optneg_reply(7, 0, 0), Error::Version(7)),
        (
            optneg_reply(6, 0x200, 0),
            Error::Actions {
                asked: 0x200,
                offered: SMFI_CURR_ACTS,
            },
        ),
        (
            optneg_reply(6, 0, SMFIP_RCPT_REJ),
            Error::Protocol {
                asked: SMFIP_RCPT_REJ,
                allowed: OFFERED_PROTOCOL,
            },
        ),
        // A version 2 milter cannot skip replies to CONNECT.
        (
            optneg_reply(2, 0, SMFIP_NR_CONN),
            Error::Protocol {
                asked: SMFIP_NR_CONN,
                allowed: SMFI_V2_PROT | SMFIP_NR_HDR,
            },
        ),
        (
            pkt(SMFIC_OPTNEG, b"\0\0\0\x06\0\0\0\0"),
            Error::Malformed {
                code: SMFIC_OPTNEG,
                why: "shorter than its three fields",
            },
        ),
        (
            [optneg_reply(6, 0, 0), vec![0, 0]].concat(),
            Error::Unexpected {
                code: SMFIC_OPTNEG,
                after: Command::OptNeg,
            },
        ),
        (
            pkt(SMFIR_CONTINUE, b""),
            Error::Unexpected {
                code: SMFIR_CONTINUE,
                after: Command::OptNeg,
            },
        ),
        (
            pkt(SMFIR_ACCEPT, b""),
            Error::Unexpected {
                code: SMFIR_ACCEPT,
                after: Command::OptNeg,
            },
        ),
    ];
    for (bytes, want) in cases {
        let mut s = Session::new(Config::default());
        // The trailing-bytes case: first a length error, fix the packet by hand.
        let bytes = if bytes.len() == 19 {
            let mut b = bytes[..17].to_vec();
            b.extend_from_slice(&[0, 0]);
            b[3] = 15;
            b
        } else {
            bytes
        };
        let got = events(&mut s, &bytes);
        match (&want, got.as_slice()) {
            (
                Error::Unexpected {
                    code: SMFIC_OPTNEG, ..
                },
                [Err(Error::Malformed { why, .. })],
            ) => assert_eq!(*why, "cut macro list"),
            (_, got) => assert_eq!(got, [Err(want.clone())]),
        }
        assert_eq!(
            s.connect(&[], "h", &ClientAddr::Unknown),
            Err(Error::NotReady)
        );
    }
}

#[test]
fn older_milters_get_what_their_version_has() {
    // Version 2: no DATA (nor its macros), everything else as usual.
    let mut s = Session::new(Config::default());
    s.take_output();
    assert_eq!(
        events(&mut s, &optneg_reply(2, SMFIF_ADDHDRS, SMFIP_NOHELO)),
        [Ok(Event::Negotiated)]
    );
    s.connect(&[], "h", &ClientAddr::Unknown).unwrap();
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    s.mail(&[], "a@b", &[]).unwrap();
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    s.take_output();
    assert_eq!(s.data(&[("x", "y")]), Ok(Sent::Skipped));
    assert!(!s.has_output());
    assert_eq!(s.quit_nc(), Err(Error::NotReady));
    // Version 4 has DATA.
    let mut s = Session::new(Config::default());
    events(&mut s, &optneg_reply(4, 0, 0));
    s.connect(&[], "h", &ClientAddr::Unknown).unwrap();
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    s.mail(&[], "a@b", &[]).unwrap();
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    assert_eq!(s.data(&[]), Ok(Sent::AwaitReply));
}

#[test]
fn macro_lists_from_the_milter_choose_the_macros() {
    let mut d = Vec::new();
    for v in [6, SMFIF_SETSYMLIST, 0] {
        d.extend_from_slice(&u32::to_be_bytes(v));
    }
    d.extend_from_slice(&SMFIM_CONNECT.to_be_bytes());
    d.extend_from_slice(b"{client_addr} j\0");
    d.extend_from_slice(&SMFIM_ENVFROM.to_be_bytes());
    d.extend_from_slice(b"\0");
    d.extend_from_slice(&99u32.to_be_bytes()); // unknown: ignored
    d.extend_from_slice(b"x\0");
    let mut s = Session::new(Config::default());
    s.take_output();
    assert_eq!(
        events(&mut s, &pkt(SMFIC_OPTNEG, &d)),
        [Ok(Event::Negotiated)]
    );
    let n = s.negotiated().unwrap();
    assert_eq!(
        n.macro_list(Command::Connect),
        Some(&["client_addr".to_string(), "j".to_string()][..])
    );
    let m = [
        ("j", "mx"),
        ("daemon_name", "p"),
        ("client_addr", "192.0.2.7"),
    ];
    s.connect(&m, "h", &ClientAddr::Unknown).unwrap();
    let out = s.take_output();
    assert!(
        out.starts_with(b"\0\0\0\x1fDCj\0mx\0{client_addr}\x00192.0.2.7\0"),
        "{out:?}"
    );
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    // An empty list: no macros at MAIL.
    s.mail(&[("i", "Q1")], "a@b", &[]).unwrap();
    assert_eq!(s.take_output(), b"\0\0\0\x07M<a@b>\0");
    // No list for HELO: all of them (HELO after MAIL: a client may say EHLO again).
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    s.helo(&[("cipher", "")], "h").unwrap();
    assert!(s.take_output().starts_with(b"\0\0\0\x0cDH{cipher}\0\0"));
}

#[test]
fn framing_errors_and_strangers() {
    // A declared length above the bound.
    let mut s = Session::new(Config::default());
    let mut big = (DEFAULT_MAX_PACKET as u32 + 1).to_be_bytes().to_vec();
    big.push(SMFIR_REPLBODY);
    assert_eq!(
        events(&mut s, &big),
        [Err(Error::Frame(FrameError::TooLong {
            declared: DEFAULT_MAX_PACKET as u32 + 1,
            max: DEFAULT_MAX_PACKET
        }))]
    );
    // clamd, asked an OPTNEG.
    let mut s = Session::new(Config::default());
    let got = events(&mut s, b"UNKNOWN COMMAND\n");
    assert_eq!(
        got,
        [Err(Error::Frame(FrameError::NotAMilter(Stranger::Clamd)))]
    );
    assert_eq!(
        got[0].as_ref().unwrap_err().to_string(),
        "this looks like clamd, not a milter"
    );
    // An HTTP server.
    let mut s = Session::new(Config::default());
    assert_eq!(
        events(
            &mut s,
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
        ),
        [Err(Error::Frame(FrameError::NotAMilter(Stranger::Http)))]
    );
    // Closed while waiting.
    let mut s = Session::new(Config::default());
    assert_eq!(s.handle_eof(), Err(Error::Closed(Command::OptNeg)));
    let mut s = session(0, 0);
    s.connect(&[], "h", &ClientAddr::Unknown).unwrap();
    s.feed(&[0, 0, 0, 1]);
    assert_eq!(s.poll_event(), None);
    assert_eq!(
        s.handle_eof(),
        Err(Error::Frame(FrameError::Truncated { have: 4, want: 5 }))
    );
    // Config bounds.
    let s = Session::new(Config {
        max_packet: 10,
        ..Config::default()
    });
    assert_eq!(s.config_max_packet(), MIN_MAX_PACKET);
}

#[test]
fn errors_read_well() {
    let e = Error::Unexpected {
        code: SMFIR_ADDHEADER,
        after: Command::Rcpt,
    };
    assert_eq!(
        e.to_string(),
        "SMFIR_ADDHEADER is not a reply to SMFIC_RCPT"
    );
    assert_eq!(
        Error::Unsolicited { code: b'z' }.to_string(),
        "unknown reply 'z' sent when no reply was awaited"
    );
    assert_eq!(
        Error::NotNegotiated {
            code: SMFIR_CHGFROM
        }
        .to_string(),
        "SMFIR_CHGFROM was not negotiated"
    );
    assert_eq!(
        Error::Version(7).to_string(),
        "milter protocol version 7, we speak 2 to 6"
    );
}

/// Ends the message of a session in a transaction: RCPT answered `rcpt`, end of message
/// answered `eom`.
fn finish_message(s: &mut Session, rcpt: u8, eom: u8) {
    assert_eq!(s.rcpt(&[], "c@d.test", &[]), Ok(Sent::AwaitReply));
    events(s, &pkt(rcpt, b""));
    assert_eq!(s.eom(&[]), Ok(Sent::AwaitReply));
    assert!(!s.can_quit_nc(), "a reply is awaited");
    assert!(matches!(
        events(s, &pkt(eom, b""))[..],
        [Ok(Event::Decision(_))]
    ));
    s.take_output();
}

/// A reply the milter sent beyond what was asked, still undecoded when the decision was
/// taken, would be read as the next SMTP session's answer to CONNECT: not kept.
#[test]
fn no_quit_nc_with_bytes_nobody_asked_for() {
    let mut s = in_transaction(0, 0);
    assert_eq!(s.rcpt(&[], "c@d.test", &[]), Ok(Sent::AwaitReply));
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    assert_eq!(s.eom(&[]), Ok(Sent::AwaitReply));
    let mut both = pkt(SMFIR_CONTINUE, b"");
    both.extend_from_slice(&pkt(SMFIR_ACCEPT, b""));
    s.feed(&both);
    assert!(matches!(s.poll_event(), Some(Ok(Event::Decision(_)))));
    assert!(s.buffered() > 0);
    assert!(!s.can_quit_nc());
    assert_eq!(s.quit_nc(), Err(Error::NotReady));
}

/// A kept connection gives back what a big message made its buffers hold.
#[test]
fn shrink_buffers_gives_back_a_big_body_buffer() {
    let mut s = in_transaction(0, SMFIP_NR_BODY);
    let answer = |s: &mut Session, sent: Result<Sent, Error>| {
        if sent == Ok(Sent::AwaitReply) {
            events(s, &pkt(SMFIR_CONTINUE, b""));
        }
    };
    let sent = s.rcpt(&[], "c@d.test", &[]);
    answer(&mut s, sent);
    let sent = s.data(&[]);
    answer(&mut s, sent);
    let sent = s.eoh(&[]);
    answer(&mut s, sent);
    s.take_output();
    let big = vec![b'x'; 4 * super::session::KEPT_BUFFER];
    assert_eq!(s.body(&big), Ok((big.len(), Sent::NoReply)));
    assert!(s.output().len() > big.len());
    s.clear_output();
    use super::session::KEPT_BUFFER;
    assert!(s.held() > 4 * KEPT_BUFFER, "{}", s.held());
    s.shrink_buffers();
    assert!(s.held() <= 2 * KEPT_BUFFER, "{}", s.held());
}

#[test]
fn quit_nc_after_end_of_message_answered_with_continue() {
    let mut s = in_transaction(0, 0);
    // Inside a transaction libmilter would drop QUIT_NC.
    assert!(!s.can_quit_nc());
    assert_eq!(s.quit_nc(), Err(Error::NotReady));
    // A refused recipient does not leave the transaction (CT_IGNO), continue at EOM
    // leaves libmilter in ST_ENDM.
    finish_message(&mut s, SMFIR_REJECT, SMFIR_CONTINUE);
    assert!(s.can_quit_nc());
    assert_eq!(s.quit_nc(), Ok(Sent::NoReply));
    assert_eq!(s.take_output(), b"\0\0\0\x01K");
    assert_eq!(s.phase(), Phase::Ready);
    assert!(!s.can_quit_nc());
    // The next SMTP connection, with no new negotiation: CONNECT is allowed again, the
    // skipped body of the last message is forgotten.
    assert_eq!(
        s.connect(&[("j", "mx.test")], "h", &ClientAddr::Unknown),
        Ok(Sent::AwaitReply)
    );
    assert_eq!(
        s.take_output(),
        [
            pkt(SMFIC_MACRO, b"Cj\0mx.test\0"),
            pkt(SMFIC_CONNECT, b"h\0U")
        ]
        .concat()
    );
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    assert_eq!(s.mail(&[], "a@b", &[]), Ok(Sent::AwaitReply));
}

#[test]
fn no_quit_nc_where_libmilter_would_drop_it() {
    // Accept, reject, tempfail, discard or a reply at end of message: ST_HELO.
    for eom in [SMFIR_ACCEPT, SMFIR_REJECT, SMFIR_TEMPFAIL, SMFIR_DISCARD] {
        let mut s = in_transaction(0, 0);
        finish_message(&mut s, SMFIR_CONTINUE, eom);
        assert_eq!(s.phase(), Phase::Connected);
        assert!(!s.can_quit_nc(), "{}", eom as char);
        assert_eq!(s.quit_nc(), Err(Error::NotReady));
        assert!(!s.has_output());
    }
    // Before any message (a session that only said HELO).
    let mut s = session(0, 0);
    s.connect(&[], "h", &ClientAddr::Unknown).unwrap();
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    assert!(!s.can_quit_nc());
    // After ABORT inside a transaction: only with SMFIP_NOUNKNOWN (ST_UNKN skipped).
    for (protocol, ok) in [(0, false), (SMFIP_NOUNKNOWN, true)] {
        let mut s = in_transaction(0, protocol);
        assert_eq!(s.abort(), Ok(Sent::NoReply));
        assert_eq!(s.can_quit_nc(), ok, "{protocol:x}");
    }
    // ABORT after the milter accepted the message at MAIL: libmilter is back in
    // ST_HELO and ignores it.
    let mut s = session(0, SMFIP_NOUNKNOWN);
    s.connect(&[], "h", &ClientAddr::Unknown).unwrap();
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    s.mail(&[], "a@b", &[]).unwrap();
    events(&mut s, &pkt(SMFIR_ACCEPT, b""));
    assert_eq!(s.abort(), Ok(Sent::NoReply));
    assert!(!s.can_quit_nc());
    // A milter older than version 6 has no QUIT_NC.
    let mut s = Session::new(Config::default());
    events(&mut s, &optneg_reply(5, 0, 0));
    s.connect(&[], "h", &ClientAddr::Unknown).unwrap();
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    s.mail(&[], "a@b", &[]).unwrap();
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    finish_message(&mut s, SMFIR_CONTINUE, SMFIR_CONTINUE);
    assert!(!s.can_quit_nc());
    // Nor does a conversation that failed.
    let mut s = in_transaction(0, 0);
    finish_message(&mut s, SMFIR_CONTINUE, SMFIR_CONTINUE);
    events(&mut s, &pkt(SMFIR_CONTINUE, b""));
    assert_eq!(s.phase(), Phase::Failed);
    assert!(!s.can_quit_nc());
    assert_eq!(s.quit_nc(), Err(Error::NotReady));
}

#[test]
fn output_is_written_in_place() {
    let mut s = Session::new(Config::default());
    assert_eq!(s.output(), OPTNEG_OUT);
    s.clear_output();
    assert!(!s.has_output() && s.output().is_empty());
}

/// Seeded pseudo-random input (the same every run): never a panic, the buffer bounded,
/// and once an error is out, nothing more.
#[test]
fn pseudo_random_input_never_panics() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let seed_stream = [
        optneg_reply(6, SMFI_CURR_ACTS, SMFIP_NR_HDR),
        pkt(SMFIR_ADDHEADER, b"X-A\0b\0"),
        pkt(SMFIR_REPLYCODE, b"550-5.7.1 a\r\n550 5.7.1 b\0"),
        pkt(SMFIR_CHGHEADER, b"\0\0\0\x01A\0b\0"),
        pkt(SMFIR_CONTINUE, b""),
    ]
    .concat();
    for round in 0..2000 {
        let mut input = seed_stream.clone();
        for _ in 0..(next() % 8) {
            let i = (next() as usize) % input.len();
            input[i] = next() as u8;
        }
        if round % 3 == 0 {
            input = (0..(next() % 64)).map(|_| next() as u8).collect();
        }
        let mut s = Session::new(Config::default());
        let mut failed = false;
        for piece in input.chunks(1 + (next() as usize) % 7) {
            s.feed(piece);
            while let Some(e) = s.poll_event() {
                assert!(!failed, "an event after an error");
                match e {
                    Ok(Event::Negotiated) => {
                        let _ = s.connect(&[], "h", &ClientAddr::Unknown);
                    }
                    Ok(Event::Decision(_)) => {
                        let _ = s.mail(&[], "a@b", &[]);
                        let _ = s.eom(&[]);
                    }
                    Ok(_) => {}
                    Err(_) => failed = true,
                }
            }
        }
        let _ = s.handle_eof();
    }
}
