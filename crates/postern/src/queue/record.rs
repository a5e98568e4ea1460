//! Record framing and payload encoding (see `docs/queue-format.md`).
//!
//! Encoding refuses to write anything that would not decode back to the same value (a CR or
//! LF inside a field, an identity of "-", a payload over 4 GiB). Decoding trusts nothing: it
//! is handed payloads whose CRC matched, but a CRC does not cover the frame's type and
//! version bytes, and a future format could reuse them, so every payload is parsed strictly
//! and anything unexpected is an error string for the caller to log.

use std::fmt::Write as _;

use super::error::SpoolError;
use super::id::QueueId;
use super::{Envelope, RcptState};

/// First two bytes of every record.
pub(crate) const MAGIC: [u8; 2] = *b"PR";
/// Frame length: magic (2), type (1), version (1), payload length (4), payload CRC-32 (4).
pub(crate) const FRAME_LEN: usize = 12;
/// The only record format version written and read.
pub(crate) const FORMAT_VERSION: u8 = 1;
/// Longest reply text kept in a RCPT record, in bytes.
const MAX_REPLY_LEN: usize = 1024;

/// Record types (the frame's third byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecordType {
    Message = 1,
    Rcpt = 2,
    Done = 3,
    Moved = 4,
    Copy = 5,
    Floor = 6,
}

impl RecordType {
    pub(crate) fn from_u8(b: u8) -> Option<RecordType> {
        match b {
            1 => Some(RecordType::Message),
            2 => Some(RecordType::Rcpt),
            3 => Some(RecordType::Done),
            4 => Some(RecordType::Moved),
            5 => Some(RecordType::Copy),
            6 => Some(RecordType::Floor),
            _ => None,
        }
    }
}

/// A record frame as read from disk (magic already checked).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Frame {
    pub(crate) rtype: u8,
    pub(crate) version: u8,
    pub(crate) len: u32,
    pub(crate) crc: u32,
}

/// Parses a frame; `None` if the magic does not match.
pub(crate) fn parse_frame(b: &[u8; FRAME_LEN]) -> Option<Frame> {
    if b[..2] != MAGIC {
        return None;
    }
    Some(Frame {
        rtype: b[2],
        version: b[3],
        len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        crc: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
    })
}

/// Builds a whole record (frame + payload) in one buffer; `fill` appends the payload.
fn record(
    rtype: RecordType,
    capacity: usize,
    fill: impl FnOnce(&mut Vec<u8>),
) -> Result<Vec<u8>, SpoolError> {
    record_with_tail(rtype, capacity, fill, &[])
}

/// Builds the frame and the first part of a record's payload (`fill`) in one buffer; the
/// payload goes on with `tail`, which the frame's length and CRC cover but which is not
/// copied: the caller writes it right after the buffer (one vectored write).
fn record_with_tail(
    rtype: RecordType,
    capacity: usize,
    fill: impl FnOnce(&mut Vec<u8>),
    tail: &[u8],
) -> Result<Vec<u8>, SpoolError> {
    let mut buf = Vec::with_capacity(FRAME_LEN + capacity);
    buf.extend_from_slice(&[0; FRAME_LEN]);
    fill(&mut buf);
    let total = buf.len() - FRAME_LEN + tail.len();
    let len = u32::try_from(total)
        .map_err(|_| SpoolError::Encode(format!("record of {total} bytes is over 4 GiB")))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[FRAME_LEN..]);
    crc.update(tail);
    buf[..2].copy_from_slice(&MAGIC);
    buf[2] = rtype as u8;
    buf[3] = FORMAT_VERSION;
    buf[4..8].copy_from_slice(&len.to_le_bytes());
    buf[8..12].copy_from_slice(&crc.finalize().to_le_bytes());
    Ok(buf)
}

fn check_line(field: &str, value: &str) -> Result<(), SpoolError> {
    if value.contains(['\r', '\n']) {
        return Err(SpoolError::Encode(format!("{field} contains CR or LF")));
    }
    Ok(())
}

/// Encodes a MESSAGE record whole, the body copied into it (for the files of
/// `deferred/` and the quarantine; the log takes [`encode_message_head`] and the body).
pub(crate) fn encode_message(env: &Envelope, body: &[u8]) -> Result<Vec<u8>, SpoolError> {
    let mut rec = encode_message_head(env, body)?;
    rec.extend_from_slice(body);
    Ok(rec)
}

/// A MESSAGE record without its body: the frame (whose length and CRC cover the body
/// too) and the envelope. Written followed by `body`, it is the record
/// [`encode_message`] builds, without copying the body.
pub(crate) fn encode_message_head(env: &Envelope, body: &[u8]) -> Result<Vec<u8>, SpoolError> {
    let head = encode_head(env, body.len() as u64)?;
    record_with_tail(
        RecordType::Message,
        head.len() + 1,
        |buf| {
            buf.extend_from_slice(head.as_bytes());
            buf.push(b'\n');
        },
        body,
    )
}

/// The envelope lines of a MESSAGE record, `id` to `size` (each ending in LF, without the
/// blank line that ends the envelope): the form the queue keeps an envelope in memory.
pub(crate) fn encode_head(env: &Envelope, size: u64) -> Result<String, SpoolError> {
    check_line("client", &env.client)?;
    check_line("helo", &env.helo)?;
    if let Some(auth) = &env.auth {
        check_line("auth", auth)?;
        if auth.is_empty() || auth == "-" {
            // "-" is how the format spells "not authenticated".
            return Err(SpoolError::Encode(format!(
                "auth identity {auth:?} cannot be stored"
            )));
        }
    }
    check_line("sender", &env.sender)?;
    for param in &env.params {
        check_line("MAIL parameter", param)?;
    }
    if env.recipients.is_empty() {
        return Err(SpoolError::Encode("message has no recipients".into()));
    }
    for rcpt in &env.recipients {
        check_line("recipient", rcpt)?;
    }

    let mut head = String::with_capacity(160 + 64 * env.recipients.len());
    // Writing to a String cannot fail.
    let _ = writeln!(head, "id {}", env.id);
    let _ = writeln!(head, "arrived {}", env.arrived);
    let _ = writeln!(head, "client {}", env.client);
    let _ = writeln!(head, "helo {}", env.helo);
    let _ = writeln!(head, "auth {}", env.auth.as_deref().unwrap_or("-"));
    let _ = writeln!(head, "from <{}>", env.sender);
    for param in &env.params {
        let _ = writeln!(head, "param {param}");
    }
    let _ = writeln!(head, "smtputf8 {}", u8::from(env.smtputf8));
    for rcpt in &env.recipients {
        let _ = writeln!(head, "rcpt <{rcpt}>");
    }
    let _ = writeln!(head, "size {size}");
    Ok(head)
}

/// Encodes a COPY record: a live message carried forward out of an old segment (so that
/// the segment can be collected), with its recipients' states. `head` is the message's
/// envelope lines ([`encode_head`]), `body` its bytes.
pub(crate) fn encode_copy(
    head: &str,
    states: &[RcptState],
    body: &[u8],
) -> Result<Vec<u8>, SpoolError> {
    let states: String = states
        .iter()
        .map(|s| match s {
            RcptState::Pending => 'p',
            RcptState::Delivered => 'd',
            RcptState::Failed => 'f',
        })
        .collect();
    let prefix = format!("states {states}\n");
    record(
        RecordType::Copy,
        prefix.len() + head.len() + 1 + body.len(),
        |buf| {
            buf.extend_from_slice(prefix.as_bytes());
            buf.extend_from_slice(head.as_bytes());
            buf.push(b'\n');
            buf.extend_from_slice(body);
        },
    )
}

/// Encodes a RCPT record. The reply comes from a remote server: CR/LF and other control
/// characters become spaces and it is cut to 1024 bytes, so it always fits on one line.
pub(crate) fn encode_outcome(
    id: QueueId,
    index: usize,
    delivered: bool,
    time: i64,
    reply: &str,
) -> Result<Vec<u8>, SpoolError> {
    let mut text: String = reply
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.len() > MAX_REPLY_LEN {
        let mut cut = MAX_REPLY_LEN;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    let outcome = if delivered { "delivered" } else { "failed" };
    let payload = format!("id {id}\nrcpt {index}\noutcome {outcome}\ntime {time}\nreply {text}\n");
    record(RecordType::Rcpt, payload.len(), |buf| {
        buf.extend_from_slice(payload.as_bytes())
    })
}

/// Encodes a DONE record (the message is finished).
pub(crate) fn encode_done(id: QueueId) -> Result<Vec<u8>, SpoolError> {
    let payload = format!("id {id}\n");
    record(RecordType::Done, payload.len(), |buf| {
        buf.extend_from_slice(payload.as_bytes())
    })
}

/// Encodes a MOVED record (the message now lives in `SPOOL/deferred/`).
pub(crate) fn encode_moved(id: QueueId) -> Result<Vec<u8>, SpoolError> {
    let payload = format!("id {id}\n");
    record(RecordType::Moved, payload.len(), |buf| {
        buf.extend_from_slice(payload.as_bytes())
    })
}

/// Encodes a FLOOR record: every queue id handed out before it was written is at most
/// `id` (the first record of each segment; see `docs/queue-format.md`).
pub(crate) fn encode_floor(id: QueueId) -> Result<Vec<u8>, SpoolError> {
    let payload = format!("id {id}\n");
    record(RecordType::Floor, payload.len(), |buf| {
        buf.extend_from_slice(payload.as_bytes())
    })
}

/// A decoded record payload.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// A stored message; the body is `payload[body_start..]`, `size` bytes long.
    Message {
        envelope: Envelope,
        body_start: usize,
        size: u64,
    },
    /// Recipient `index` of message `id` reached a final state.
    Rcpt {
        id: QueueId,
        index: usize,
        delivered: bool,
    },
    Done(QueueId),
    Moved(QueueId),
    /// No id handed out before this record is above this one.
    Floor(QueueId),
    /// A live message carried forward ([`encode_copy`]): like `Message` (offsets from
    /// the start of the payload), with its recipients' states.
    Copy {
        envelope: Envelope,
        states: Vec<RcptState>,
        /// The envelope lines within the payload (what [`encode_head`] made).
        head: std::ops::Range<usize>,
        body_start: usize,
        size: u64,
    },
}

/// Decodes a payload whose CRC already matched.
pub(crate) fn decode(rtype: u8, version: u8, payload: &[u8]) -> Result<Decoded, String> {
    if version != FORMAT_VERSION {
        return Err(format!("unknown record format version {version}"));
    }
    match RecordType::from_u8(rtype) {
        Some(RecordType::Message) => decode_message(payload),
        Some(RecordType::Rcpt) => decode_rcpt(payload),
        Some(RecordType::Done) => Ok(Decoded::Done(decode_id_only(payload)?)),
        Some(RecordType::Moved) => Ok(Decoded::Moved(decode_id_only(payload)?)),
        Some(RecordType::Copy) => decode_copy(payload),
        Some(RecordType::Floor) => Ok(Decoded::Floor(decode_id_only(payload)?)),
        None => Err(format!("unknown record type {rtype}")),
    }
}

/// Splits `key value` lines; every line must have the space.
fn lines(text: &str) -> Result<Vec<(&str, &str)>, String> {
    text.split('\n')
        .map(|line| {
            line.split_once(' ')
                .ok_or_else(|| format!("line without a value: {:?}", truncated(line)))
        })
        .collect()
}

fn truncated(s: &str) -> String {
    s.chars().take(60).collect()
}

fn parse_id(value: &str) -> Result<QueueId, String> {
    value.parse().map_err(|e| format!("{e}"))
}

/// Payload text of a non-MESSAGE record: UTF-8 ending in exactly one newline.
fn small_payload(payload: &[u8]) -> Result<&str, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8".to_string())?;
    text.strip_suffix('\n')
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "payload does not end with a newline".to_string())
}

fn decode_id_only(payload: &[u8]) -> Result<QueueId, String> {
    match lines(small_payload(payload)?)?.as_slice() {
        [("id", id)] => parse_id(id),
        _ => Err("expected a single id line".into()),
    }
}

fn decode_rcpt(payload: &[u8]) -> Result<Decoded, String> {
    match lines(small_payload(payload)?)?.as_slice() {
        [
            ("id", id),
            ("rcpt", index),
            ("outcome", outcome),
            ("time", time),
            ("reply", _reply),
        ] => {
            let id = parse_id(id)?;
            let index = index
                .parse()
                .map_err(|_| format!("bad recipient index {:?}", truncated(index)))?;
            let delivered = match *outcome {
                "delivered" => true,
                "failed" => false,
                other => return Err(format!("bad outcome {:?}", truncated(other))),
            };
            time.parse::<i64>()
                .map_err(|_| format!("bad time {:?}", truncated(time)))?;
            Ok(Decoded::Rcpt {
                id,
                index,
                delivered,
            })
        }
        _ => Err("RCPT record needs id, rcpt, outcome, time and reply lines in order".into()),
    }
}

/// Strips the angle brackets around an address.
fn address(key: &str, value: &str) -> Result<String, String> {
    value
        .strip_prefix('<')
        .and_then(|v| v.strip_suffix('>'))
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "{key} address not in angle brackets: {:?}",
                truncated(value)
            )
        })
}

fn decode_message(payload: &[u8]) -> Result<Decoded, String> {
    // Envelope lines never are empty, so the first blank line ends the envelope.
    let sep = payload
        .windows(2)
        .position(|w| w == b"\n\n")
        .ok_or("no blank line after the envelope")?;
    let head = std::str::from_utf8(&payload[..sep]).map_err(|_| "envelope is not UTF-8")?;
    let body_start = sep + 2;
    let (envelope, size) = decode_head(head)?;
    let actual = (payload.len() - body_start) as u64;
    if actual != size {
        return Err(format!("size {size} but {actual} message bytes follow"));
    }
    Ok(Decoded::Message {
        envelope,
        body_start,
        size,
    })
}

fn decode_copy(payload: &[u8]) -> Result<Decoded, String> {
    let nl = payload
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("COPY record without a states line")?;
    let line = std::str::from_utf8(&payload[..nl]).map_err(|_| "states line is not UTF-8")?;
    let letters = line
        .strip_prefix("states ")
        .ok_or("COPY record does not start with a states line")?;
    let states = letters
        .chars()
        .map(|c| match c {
            'p' => Ok(RcptState::Pending),
            'd' => Ok(RcptState::Delivered),
            'f' => Ok(RcptState::Failed),
            other => Err(format!("bad recipient state {other:?}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let start = nl + 1;
    match decode_message(&payload[start..])? {
        Decoded::Message {
            envelope,
            body_start,
            size,
        } => {
            if states.len() != envelope.recipients.len() {
                return Err(format!(
                    "{} states for {} recipients",
                    states.len(),
                    envelope.recipients.len()
                ));
            }
            Ok(Decoded::Copy {
                envelope,
                states,
                // The head's lines end with the LF before the blank line.
                head: start..start + body_start - 1,
                body_start: start + body_start,
                size,
            })
        }
        _ => Err("COPY record does not hold a message".into()),
    }
}

/// Parses a message's envelope lines ([`encode_head`]'s text, with or without its final
/// LF); returns the envelope and the `size` it declares.
pub(crate) fn decode_head(head: &str) -> Result<(Envelope, u64), String> {
    let head = head.strip_suffix('\n').unwrap_or(head);
    let mut id = None;
    let mut arrived = None;
    let mut client = None;
    let mut helo = None;
    let mut auth = None;
    let mut from = None;
    let mut smtputf8 = None;
    let mut size = None;
    let mut params = Vec::new();
    let mut recipients = Vec::new();

    fn once<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), String> {
        if slot.replace(value).is_some() {
            return Err(format!("duplicate {key} line"));
        }
        Ok(())
    }

    for (key, value) in lines(head)? {
        match key {
            "id" => once(&mut id, key, parse_id(value)?)?,
            "arrived" => once(
                &mut arrived,
                key,
                value
                    .parse::<i64>()
                    .map_err(|_| format!("bad arrived {:?}", truncated(value)))?,
            )?,
            "client" => once(&mut client, key, value.to_string())?,
            "helo" => once(&mut helo, key, value.to_string())?,
            "auth" => once(&mut auth, key, (value != "-").then(|| value.to_string()))?,
            "from" => once(&mut from, key, address(key, value)?)?,
            "param" => params.push(value.to_string()),
            "smtputf8" => once(
                &mut smtputf8,
                key,
                match value {
                    "0" => false,
                    "1" => true,
                    _ => return Err(format!("bad smtputf8 {:?}", truncated(value))),
                },
            )?,
            "rcpt" => recipients.push(address(key, value)?),
            "size" => once(
                &mut size,
                key,
                value
                    .parse::<u64>()
                    .map_err(|_| format!("bad size {:?}", truncated(value)))?,
            )?,
            other => return Err(format!("unknown envelope key {:?}", truncated(other))),
        }
    }

    let missing = |key: &str| format!("envelope has no {key} line");
    let size = size.ok_or_else(|| missing("size"))?;
    if recipients.is_empty() {
        return Err(missing("rcpt"));
    }
    let envelope = Envelope {
        id: id.ok_or_else(|| missing("id"))?,
        arrived: arrived.ok_or_else(|| missing("arrived"))?,
        client: client.ok_or_else(|| missing("client"))?,
        helo: helo.ok_or_else(|| missing("helo"))?,
        auth: auth.ok_or_else(|| missing("auth"))?,
        sender: from.ok_or_else(|| missing("from"))?,
        params,
        smtputf8: smtputf8.ok_or_else(|| missing("smtputf8"))?,
        recipients,
    };
    Ok((envelope, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            id: QueueId::from_u64(0x0187_F3A2_B4C5_D6E7),
            arrived: 1_764_403_200,
            client: "127.0.0.2:40000".into(),
            helo: "client.example".into(),
            auth: None,
            sender: "sender@example.com".into(),
            params: vec!["BODY=8BITMIME".into()],
            smtputf8: false,
            recipients: vec!["a@b.example".into(), "c@d.example".into()],
        }
    }

    fn payload(rec: &[u8]) -> (&[u8], Frame) {
        let frame = parse_frame(rec[..FRAME_LEN].try_into().unwrap()).unwrap();
        let payload = &rec[FRAME_LEN..];
        assert_eq!(frame.len as usize, payload.len());
        assert_eq!(frame.crc, crc32fast::hash(payload));
        (payload, frame)
    }

    #[test]
    fn a_message_head_and_its_body_are_the_whole_record() {
        for body in [&b""[..], b"x", b"Subject: hi\r\n\r\nbody\r\n"] {
            let mut rec = encode_message_head(&envelope(), body).unwrap();
            rec.extend_from_slice(body);
            assert_eq!(rec, encode_message(&envelope(), body).unwrap());
            let (p, frame) = payload(&rec);
            assert!(p.ends_with(body));
            assert_eq!(frame.rtype, RecordType::Message as u8);
        }
    }

    #[test]
    fn message_text_is_the_documented_format() {
        let rec = encode_message(&envelope(), b"Subject: hi\r\n\r\nbody\r\n").unwrap();
        let (p, frame) = payload(&rec);
        assert_eq!(frame.rtype, 1);
        assert_eq!(frame.version, 1);
        let expected = "id 0187F3A2B4C5D6E7\narrived 1764403200\nclient 127.0.0.2:40000\n\
            helo client.example\nauth -\nfrom <sender@example.com>\nparam BODY=8BITMIME\n\
            smtputf8 0\nrcpt <a@b.example>\nrcpt <c@d.example>\nsize 21\n\n\
            Subject: hi\r\n\r\nbody\r\n";
        assert_eq!(std::str::from_utf8(p).unwrap(), expected);
        match decode(frame.rtype, frame.version, p).unwrap() {
            Decoded::Message {
                envelope: env,
                body_start,
                size,
            } => {
                assert_eq!(env, envelope());
                assert_eq!(&p[body_start..], b"Subject: hi\r\n\r\nbody\r\n");
                assert_eq!(size, 21);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn odd_but_legal_fields_round_trip() {
        let mut env = envelope();
        env.sender = String::new();
        env.auth = Some("user name".into());
        env.helo = String::new();
        env.smtputf8 = true;
        env.params = vec![];
        env.recipients = vec!["jürgen@bücher.example".into(), "\"a>b\"@x".into()];
        // A body that itself contains blank lines and an envelope look-alike.
        let body = b"\n\nid 0000000000000000\n\n";
        let rec = encode_message(&env, body).unwrap();
        let (p, frame) = payload(&rec);
        match decode(frame.rtype, frame.version, p).unwrap() {
            Decoded::Message {
                envelope: got,
                body_start,
                ..
            } => {
                assert_eq!(got, env);
                assert_eq!(&p[body_start..], body);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encode_refuses_what_would_not_decode() {
        let cases: [fn(&mut Envelope); 7] = [
            |e| e.sender = "a@b\r\nrcpt <evil@x>".into(),
            |e| e.recipients[1] = "x\n".into(),
            |e| e.helo = "h\r".into(),
            |e| e.params.push("X=\n".into()),
            |e| e.auth = Some("-".into()),
            |e| e.auth = Some(String::new()),
            |e| e.recipients.clear(),
        ];
        for change in cases {
            let mut env = envelope();
            change(&mut env);
            assert!(matches!(
                encode_message(&env, b"x"),
                Err(SpoolError::Encode(_))
            ));
        }
    }

    #[test]
    fn small_records_round_trip() {
        let id = QueueId::from_u64(42);
        let rec = encode_outcome(id, 3, false, 1_764_403_200, "550 5.1.1 no\r\nsuch user").unwrap();
        let (p, frame) = payload(&rec);
        assert_eq!(
            std::str::from_utf8(p).unwrap(),
            "id 000000000000002A\nrcpt 3\noutcome failed\ntime 1764403200\nreply 550 5.1.1 no  such user\n"
        );
        assert!(matches!(
            decode(frame.rtype, frame.version, p).unwrap(),
            Decoded::Rcpt { id: i, index: 3, delivered: false } if i == id
        ));
        let long = "é".repeat(2000);
        let rec = encode_outcome(id, 0, true, 0, &long).unwrap();
        assert!(rec.len() < FRAME_LEN + 1024 + 100);
        let (p, frame) = payload(&rec);
        assert!(decode(frame.rtype, frame.version, p).is_ok());

        let rec = encode_done(id).unwrap();
        let (p, frame) = payload(&rec);
        assert!(
            matches!(decode(frame.rtype, frame.version, p).unwrap(), Decoded::Done(i) if i == id)
        );
        let rec = encode_moved(id).unwrap();
        let (p, frame) = payload(&rec);
        assert!(
            matches!(decode(frame.rtype, frame.version, p).unwrap(), Decoded::Moved(i) if i == id)
        );
    }

    #[test]
    fn decode_rejects_garbage() {
        let good = encode_message(&envelope(), b"body").unwrap();
        let p = &good[FRAME_LEN..];
        assert!(decode(1, 2, p).is_err(), "unknown version");
        assert!(decode(9, 1, p).is_err(), "unknown type");
        assert!(decode(3, 1, p).is_err(), "MESSAGE payload read as DONE");
        let text = std::str::from_utf8(p).unwrap();
        for bad in [
            text.replace("size 4", "size 5"),
            text.replace("smtputf8 0", "smtputf8 2"),
            text.replace("rcpt <a@b.example>", "rcpt a@b.example"),
            text.replace("arrived", "arived"),
            text.replace("helo client.example\n", ""),
            text.replace("\n\n", "\n"),
            text.replace(
                "id 0187F3A2B4C5D6E7\n",
                "id 0187F3A2B4C5D6E7\nid 0187F3A2B4C5D6E7\n",
            ),
        ] {
            assert!(decode(1, 1, bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(decode(3, 1, b"id 000000000000002A").is_err());
        assert!(decode(3, 1, b"id 000000000000002A\n\n").is_err());
        assert!(decode(2, 1, b"id 000000000000002A\nrcpt 1\n").is_err());
    }
}
