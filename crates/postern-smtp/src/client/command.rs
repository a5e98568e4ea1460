//! The command lines the client sends (RFC 5321 4.1.1, with the extensions' commands).
//!
//! [`ClientCommand::write_to`] appends the line and its CRLF to an output buffer, so a
//! pipelined batch (RFC 2920 3.1) is one buffer and one write. Its `Display` is the line
//! as a log may show it: credentials are replaced by placeholders.
//!
//! Trust: arguments come from our spool and configuration, and the conversation refuses
//! addresses with control characters before it builds a command. As a last line of
//! defence (like [`crate::Reply::write_to`]), an argument's control characters are still
//! written as '?', so no argument can end a line and smuggle a second command in.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

/// One command line, without its CRLF. `Debug` shows what `Display` shows: no secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ClientCommand<'a> {
    /// RFC 5321 4.1.1.1, with our host name.
    Ehlo(&'a str),
    /// RFC 5321 4.1.1.1: for a server that refuses EHLO.
    Helo(&'a str),
    /// RFC 3207 4.
    StartTls,
    /// `AUTH PLAIN` with its initial response (RFC 4954 4, RFC 4616 2: an empty
    /// authorisation identity, the user name and the password, NUL-separated, base64).
    AuthPlain { user: &'a str, password: &'a str },
    /// `AUTH LOGIN` (draft-murchison-sasl-login): the server then asks for the user name
    /// and the password with 334 challenges.
    AuthLogin,
    /// The user name in answer to AUTH LOGIN's first 334, base64 (RFC 4954 4).
    AuthLoginUser(&'a str),
    /// The password in answer to AUTH LOGIN's second 334, base64.
    AuthLoginPassword(&'a str),
    /// `MAIL FROM:<reverse-path>` and its parameters (RFC 5321 4.1.1.2); the path
    /// without angle brackets, "" for the null sender.
    Mail { sender: &'a str, params: MailParams },
    /// `RCPT TO:<forward-path>` (RFC 5321 4.1.1.3), the path without angle brackets.
    Rcpt(&'a str),
    /// RFC 5321 4.1.1.4.
    Data,
    /// `BDAT size [LAST]` (RFC 3030 2): a chunk of `size` octets follows the line.
    Bdat { size: u64, last: bool },
    /// RFC 5321 4.1.1.5.
    Rset,
    /// RFC 5321 4.1.1.9.
    Noop,
    /// RFC 5321 4.1.1.10.
    Quit,
}

/// The MAIL FROM parameters we may send, in the order they are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=n` (RFC 1870 6): the message size as the server counts it
    /// (see [`crate::client::wire_size`]).
    pub size: Option<u64>,
    /// `BODY=8BITMIME` (RFC 6152 2).
    pub eight_bit_mime: bool,
    /// `SMTPUTF8` (RFC 6531 3.4).
    pub smtputf8: bool,
}

impl ClientCommand<'_> {
    /// Appends the command line and its CRLF to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match *self {
            ClientCommand::Ehlo(name) => {
                out.extend_from_slice(b"EHLO ");
                push_argument(out, name);
            }
            ClientCommand::Helo(name) => {
                out.extend_from_slice(b"HELO ");
                push_argument(out, name);
            }
            ClientCommand::StartTls => out.extend_from_slice(b"STARTTLS"),
            ClientCommand::AuthPlain { user, password } => {
                out.extend_from_slice(b"AUTH PLAIN ");
                let token = [b"\0", user.as_bytes(), b"\0", password.as_bytes()].concat();
                push_base64(out, &token);
            }
            ClientCommand::AuthLogin => out.extend_from_slice(b"AUTH LOGIN"),
            ClientCommand::AuthLoginUser(secret) | ClientCommand::AuthLoginPassword(secret) => {
                push_base64(out, secret.as_bytes());
            }
            ClientCommand::Mail { sender, params } => {
                out.extend_from_slice(b"MAIL FROM:<");
                push_argument(out, sender);
                out.push(b'>');
                if let Some(size) = params.size {
                    out.extend_from_slice(format!(" SIZE={size}").as_bytes());
                }
                if params.eight_bit_mime {
                    out.extend_from_slice(b" BODY=8BITMIME");
                }
                if params.smtputf8 {
                    out.extend_from_slice(b" SMTPUTF8");
                }
            }
            ClientCommand::Rcpt(recipient) => {
                out.extend_from_slice(b"RCPT TO:<");
                push_argument(out, recipient);
                out.push(b'>');
            }
            ClientCommand::Data => out.extend_from_slice(b"DATA"),
            ClientCommand::Bdat { size, last } => {
                out.extend_from_slice(format!("BDAT {size}").as_bytes());
                if last {
                    out.extend_from_slice(b" LAST");
                }
            }
            ClientCommand::Rset => out.extend_from_slice(b"RSET"),
            ClientCommand::Noop => out.extend_from_slice(b"NOOP"),
            ClientCommand::Quit => out.extend_from_slice(b"QUIT"),
        }
        out.extend_from_slice(b"\r\n");
    }

    /// The command's verb, e.g. for naming the phase a timeout happened in.
    pub fn verb(&self) -> &'static str {
        match self {
            ClientCommand::Ehlo(_) => "EHLO",
            ClientCommand::Helo(_) => "HELO",
            ClientCommand::StartTls => "STARTTLS",
            ClientCommand::AuthPlain { .. }
            | ClientCommand::AuthLogin
            | ClientCommand::AuthLoginUser(_)
            | ClientCommand::AuthLoginPassword(_) => "AUTH",
            ClientCommand::Mail { .. } => "MAIL",
            ClientCommand::Rcpt(_) => "RCPT",
            ClientCommand::Data => "DATA",
            ClientCommand::Bdat { .. } => "BDAT",
            ClientCommand::Rset => "RSET",
            ClientCommand::Noop => "NOOP",
            ClientCommand::Quit => "QUIT",
        }
    }
}

/// The line as a log may show it: without its CRLF, credentials as placeholders.
impl fmt::Display for ClientCommand<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientCommand::AuthPlain { .. } => f.write_str("AUTH PLAIN <redacted>"),
            ClientCommand::AuthLoginUser(_) => f.write_str("<user name>"),
            ClientCommand::AuthLoginPassword(_) => f.write_str("<redacted>"),
            _ => {
                let mut line = Vec::new();
                self.write_to(&mut line);
                line.truncate(line.len() - 2);
                f.write_str(&String::from_utf8_lossy(&line))
            }
        }
    }
}

impl fmt::Debug for ClientCommand<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientCommand({self})")
    }
}

/// An argument with its control characters (CR and LF among them) written as '?'.
fn push_argument(out: &mut Vec<u8>, argument: &str) {
    out.extend(
        argument
            .bytes()
            .map(|b| if b < b' ' || b == 0x7f { b'?' } else { b }),
    );
}

fn push_base64(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(BASE64.encode(data).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(command: ClientCommand<'_>) -> String {
        let mut out = Vec::new();
        command.write_to(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn command_lines_table() {
        let params = |size, eight_bit_mime, smtputf8| MailParams {
            size,
            eight_bit_mime,
            smtputf8,
        };
        #[rustfmt::skip]
        let cases: &[(ClientCommand<'_>, &str, &str)] = &[
            (ClientCommand::Ehlo("client.test"), "EHLO client.test\r\n", "EHLO client.test"),
            (ClientCommand::Helo("client.test"), "HELO client.test\r\n", "HELO client.test"),
            (ClientCommand::StartTls, "STARTTLS\r\n", "STARTTLS"),
            (ClientCommand::AuthPlain { user: "relay", password: "s3cret" },
             "AUTH PLAIN AHJlbGF5AHMzY3JldA==\r\n", "AUTH PLAIN <redacted>"),
            (ClientCommand::AuthLogin, "AUTH LOGIN\r\n", "AUTH LOGIN"),
            (ClientCommand::AuthLoginUser("relay"), "cmVsYXk=\r\n", "<user name>"),
            (ClientCommand::AuthLoginPassword("s3cret"), "czNjcmV0\r\n", "<redacted>"),
            (ClientCommand::Mail { sender: "a@b.test", params: MailParams::default() },
             "MAIL FROM:<a@b.test>\r\n", "MAIL FROM:<a@b.test>"),
            (ClientCommand::Mail { sender: "", params: params(Some(7), true, true) },
             "MAIL FROM:<> SIZE=7 BODY=8BITMIME SMTPUTF8\r\n", "MAIL FROM:<> SIZE=7 BODY=8BITMIME SMTPUTF8"),
            (ClientCommand::Mail { sender: "j\u{f6}rg@b.test", params: params(None, false, true) },
             "MAIL FROM:<j\u{f6}rg@b.test> SMTPUTF8\r\n", "MAIL FROM:<j\u{f6}rg@b.test> SMTPUTF8"),
            (ClientCommand::Rcpt("c@d.test"), "RCPT TO:<c@d.test>\r\n", "RCPT TO:<c@d.test>"),
            (ClientCommand::Data, "DATA\r\n", "DATA"),
            (ClientCommand::Bdat { size: 1000, last: false }, "BDAT 1000\r\n", "BDAT 1000"),
            (ClientCommand::Bdat { size: 0, last: true }, "BDAT 0 LAST\r\n", "BDAT 0 LAST"),
            (ClientCommand::Rset, "RSET\r\n", "RSET"),
            (ClientCommand::Noop, "NOOP\r\n", "NOOP"),
            (ClientCommand::Quit, "QUIT\r\n", "QUIT"),
        ];
        for (command, wire, shown) in cases {
            assert_eq!(line(*command), *wire, "{command:?}");
            assert_eq!(command.to_string(), *shown, "{command:?}");
        }
    }

    #[test]
    fn an_argument_cannot_end_the_line() {
        assert_eq!(
            line(ClientCommand::Rcpt("evil@d.test>\r\nRSET")),
            "RCPT TO:<evil@d.test>??RSET>\r\n"
        );
        assert_eq!(line(ClientCommand::Ehlo("a\nb\x7f")), "EHLO a?b?\r\n");
    }

    #[test]
    fn secrets_stay_out_of_display_and_debug() {
        for command in [
            ClientCommand::AuthPlain {
                user: "relay",
                password: "hunter2",
            },
            ClientCommand::AuthLoginUser("relay"),
            ClientCommand::AuthLoginPassword("hunter2"),
        ] {
            let shown = format!("{command} {command:?}");
            assert!(
                !shown.contains("hunter2") && !shown.contains("relay"),
                "{shown}"
            );
        }
    }
}
