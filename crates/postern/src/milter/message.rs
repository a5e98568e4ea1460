//! The message as milters see and change it at end of message: its header fields, one by
//! one, and its body. Built from the stored message (CRLF line ends, dot-unstuffed) only
//! once a milter is to see it, and turned back into bytes only if some milter changed it.
//!
//! Header edits follow libmilter's documented semantics (smfi_addheader appends,
//! smfi_insheader inserts at an index over all fields, smfi_chgheader changes or, with
//! an empty value, deletes the n-th field of that name and adds the field when there
//! are fewer) as Postfix's cleanup_milter.c applies them, except that Postern's own
//! `Received:` is not there yet (the trace step comes after the milters), so indexes
//! count exactly the fields the milter was sent.

/// One header field: its name and everything after the colon, folds included, without
/// the final CRLF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Field {
    pub name: String,
    pub value: Vec<u8>,
}

/// The message, split.
#[derive(Debug)]
pub(super) struct Split {
    pub fields: Vec<Field>,
    /// The body (after the empty line), when it was replaced; else `None` and the body is
    /// `original[body_start..]`.
    pub new_body: Option<Vec<u8>>,
    pub body_start: usize,
    /// The header section ended with an empty line (else the message has no body, or
    /// its first non-field line starts the body).
    pub separator: bool,
    /// Some milter changed the header or the body: the message must be rebuilt.
    pub changed: bool,
}

impl Split {
    /// Splits `data` (a whole message, lines ending in CRLF) into fields and body.
    pub fn parse(data: &[u8]) -> Split {
        let mut fields: Vec<Field> = Vec::new();
        let mut pos = 0;
        let mut separator = false;
        while pos < data.len() {
            let end = memchr::memmem::find(&data[pos..], b"\r\n").map_or(data.len(), |i| pos + i);
            let line = &data[pos..end];
            let next = (end + 2).min(data.len());
            if line.is_empty() {
                separator = true;
                pos = next;
                break;
            }
            if line[0] == b' ' || line[0] == b'\t' {
                match fields.last_mut() {
                    Some(f) => {
                        f.value.extend_from_slice(b"\r\n");
                        f.value.extend_from_slice(line);
                        pos = next;
                        continue;
                    }
                    None => break,
                }
            }
            let Some(colon) = memchr::memchr(b':', line) else {
                break;
            };
            let name = &line[..colon];
            if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b)) {
                break;
            }
            fields.push(Field {
                name: String::from_utf8_lossy(name).into_owned(),
                value: line[colon + 1..].to_vec(),
            });
            pos = next;
        }
        Split {
            fields,
            new_body: None,
            body_start: pos,
            separator,
            changed: false,
        }
    }

    /// The body as the milters see it now.
    pub fn body<'a>(&'a self, original: &'a [u8]) -> &'a [u8] {
        match &self.new_body {
            Some(b) => b,
            None => original.get(self.body_start..).unwrap_or_default(),
        }
    }

    /// The size of the message as it would be rebuilt.
    pub fn size(&self, original: &[u8]) -> u64 {
        self.size_with(self.body(original).len())
    }

    /// The size with a body of `body` octets.
    pub fn size_with(&self, body: usize) -> u64 {
        let fields: usize = self
            .fields
            .iter()
            .map(|f| f.name.len() + 1 + f.value.len() + 2)
            .sum();
        (fields + 2 + body) as u64
    }

    /// A copy of the header to try a milter's changes on, with no body of its own: a
    /// body it replaces goes to its `new_body`.
    pub fn trial(&self) -> Split {
        Split {
            fields: self.fields.clone(),
            new_body: None,
            body_start: self.body_start,
            separator: self.separator,
            changed: false,
        }
    }

    /// Takes the changes tried on `trial` (made by [`Split::trial`]).
    pub fn adopt(&mut self, trial: Split) {
        if trial.changed {
            self.fields = trial.fields;
            self.changed = true;
        }
        if trial.new_body.is_some() {
            self.new_body = trial.new_body;
        }
    }

    /// Appends a field (smfi_addheader).
    pub fn add(&mut self, name: String, value: String) {
        self.fields.push(Field {
            name,
            value: value.into_bytes(),
        });
        self.changed = true;
    }

    /// Inserts a field before the `index`-th (0: first; past the end: last).
    pub fn insert(&mut self, index: u32, name: String, value: String) {
        let at = (index as usize).min(self.fields.len());
        self.fields.insert(
            at,
            Field {
                name,
                value: value.into_bytes(),
            },
        );
        self.changed = true;
    }

    /// Changes the `index`-th (from 1) field called `name` (any case); an empty value
    /// deletes it. With fewer such fields, a non-empty value is added at the end
    /// (libmilter's smfi_chgheader documentation; Postfix cleanup_milter does the same).
    pub fn change(&mut self, index: u32, name: String, value: String) {
        let found = self
            .fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.name.eq_ignore_ascii_case(&name))
            .nth(index.max(1) as usize - 1)
            .map(|(i, _)| i);
        match (found, value.trim().is_empty()) {
            (Some(i), true) => {
                self.fields.remove(i);
            }
            (Some(i), false) => self.fields[i].value = value.into_bytes(),
            (None, true) => return,
            (None, false) => self.fields.push(Field {
                name,
                value: value.into_bytes(),
            }),
        }
        self.changed = true;
    }

    /// A piece of a replacement body (SMFIR_REPLBODY: all pieces of one milter, in
    /// order, are the new body). `first`: the first piece from this milter.
    pub fn replace_body(&mut self, piece: &[u8], first: bool) {
        let body = self.new_body.get_or_insert_with(Vec::new);
        if first {
            body.clear();
        }
        // A milter may send LF line ends (libmilter passes what the filter gives it);
        // the spool holds CRLF, as the SMTP wire does.
        let mut prev = body.last().copied();
        for &b in piece {
            if b == b'\n' && prev != Some(b'\r') {
                body.push(b'\r');
            }
            body.push(b);
            prev = Some(b);
        }
        self.changed = true;
    }

    /// The whole message again, when something changed.
    pub fn rebuild(&self, original: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size(original) as usize);
        for f in &self.fields {
            out.extend_from_slice(f.name.as_bytes());
            out.push(b':');
            out.extend_from_slice(&f.value);
            out.extend_from_slice(b"\r\n");
        }
        let body = self.body(original);
        if self.separator || !body.is_empty() || self.new_body.is_some() {
            out.extend_from_slice(b"\r\n");
        }
        if self.new_body.is_some() {
            // A milter's body: a CR without its LF (which our own SMTP reader refuses
            // from clients, RFC 5321 2.3.8) becomes a line end, so the next hop gets
            // only CRLF lines.
            let mut bytes = body.iter().peekable();
            while let Some(&b) = bytes.next() {
                out.push(b);
                if b == b'\r' && bytes.peek() != Some(&&b'\n') {
                    out.push(b'\n');
                }
            }
        } else {
            out.extend_from_slice(body);
        }
        if !out.is_empty() && !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"Subject: hi\r\nX-A: 1\r\n  folded\r\nx-a: 2\r\n\r\nbody\r\n";

    #[test]
    fn parses_fields_folds_and_body() {
        let s = Split::parse(MSG);
        assert_eq!(s.fields.len(), 3);
        assert_eq!(s.fields[1].value, b" 1\r\n  folded");
        assert!(s.separator);
        assert_eq!(s.body(MSG), b"body\r\n");
        assert_eq!(s.rebuild(MSG), MSG);
        assert_eq!(s.size(MSG), MSG.len() as u64);
    }

    #[test]
    fn edits_as_libmilter_documents_them() {
        let mut s = Split::parse(MSG);
        s.change(2, "X-A".into(), " two".into());
        s.change(1, "subject".into(), String::new());
        s.change(5, "X-New".into(), " added".into());
        s.change(3, "X-Gone".into(), String::new());
        s.insert(0, "X-First".into(), " 0".into());
        s.add("X-Last".into(), " z".into());
        let out = String::from_utf8(s.rebuild(MSG)).unwrap();
        assert_eq!(
            out,
            "X-First: 0\r\nX-A: 1\r\n  folded\r\nx-a: two\r\nX-New: added\r\nX-Last: z\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn a_replaced_body_gets_crlf_and_the_header_stays() {
        let mut s = Split::parse(MSG);
        s.replace_body(b"new\nbo", true);
        s.replace_body(b"dy\r\n", false);
        let out = s.rebuild(MSG);
        assert!(out.ends_with(b"\r\n\r\nnew\r\nbody\r\n"), "{out:?}");
        assert_eq!(s.size(MSG), out.len() as u64);
    }

    #[test]
    fn a_message_without_header_or_separator() {
        let data = b"just text\r\n";
        let s = Split::parse(data);
        assert!(s.fields.is_empty());
        assert_eq!(s.body(data), data);
        let data = b"Subject: x\r\n";
        let s = Split::parse(data);
        assert_eq!(s.fields.len(), 1);
        assert_eq!(s.body(data), b"");
        assert_eq!(s.rebuild(data), data);
    }

    #[test]
    fn a_replaced_body_has_crlf_lines_only() {
        let mut s = Split::parse(MSG);
        s.replace_body(b"one\rtwo\nthree\r", true);
        s.replace_body(b"\nfour\r\n", false);
        let out = s.rebuild(MSG);
        assert!(
            out.ends_with(b"\r\n\r\none\r\ntwo\r\nthree\r\nfour\r\n"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
}
