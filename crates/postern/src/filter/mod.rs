//! The message screener: which `[[filter]]` rule, if any, does this message match?
//!
//! A pure function of the envelope sender and the message bytes: no I/O, no clock, no
//! async. [`Screener::new`] compiles the configured rules once; [`Screener::screen`]
//! parses a message at the end of DATA and returns the first rule, in configuration
//! order, that matches it, with a reason for the log. What happens next (reject,
//! discard, quarantine, redirect) is the session's business. Filters only ever restrict:
//! they never grant relay, and the relay policy never reads content.
//!
//! # What a rule matches
//!
//! A rule matches if ANY of its criteria matches: any attachment glob, any keyword or
//! any sender glob. Within a rule they are tried in the order senders, attachments,
//! keywords, which only decides which reason is reported.
//!
//! - **`senders`**: case-insensitive globs (`*`, `?`; see `filter/glob.rs`) against the envelope
//!   sender (MAIL FROM; the null sender `<>` is not matched) and against every address
//!   in every `From:` header of the message (a second `From:` is a known trick). Should
//!   mail-parser not read an address out of a `From:` header, the `@`-words of its raw
//!   text are matched instead. `From:` headers of attached messages are not senders.
//! - **`attachments`**: globs against the file name of every MIME part, in the message
//!   and in attached `message/rfc822` messages: the `Content-Disposition` `filename` and
//!   the `Content-Type` `name` are both checked (a sender may set them differently),
//!   after mail-parser has decoded RFC 2231 (`filename*=`, charsets, continuations) and
//!   RFC 2047 encoded words. Each name is also tried with trailing dots and blanks removed
//!   (Windows ignores them: `evil.exe.` runs as `evil.exe`) and as its last path
//!   component. Any part counts, not only those marked as attachments: a mail client
//!   will save a `text/plain; name="x.exe"` body part as `x.exe` too.
//! - **content** (beyond the name): an attachment rule with at least one glob that
//!   names an executable type also looks at what each part *is*. A glob names an
//!   executable type when the text after its last `.` matches one of the extensions in
//!   `EXECUTABLE_EXTENSIONS` of `filter/glob.rs` (`*.exe`, `*.scr`, `*.dll`, `*.js`, `*.sh`,
//!   `*.jar`, ... and also `*.ex?` or `*.*`; not `*.pdf` or `*`). Such a rule then also
//!   matches:
//!   - any part whose decoded body starts with a Windows PE, ELF, Mach-O or Java class
//!     header, whatever the part is called (a PE renamed `report.txt`), or with a `#!/`
//!     line if the part has a file name or is a `Content-Disposition: attachment`;
//!     see `filter/sniff.rs` for the exact signatures;
//!   - a ZIP archive (a body starting with a ZIP signature, or a part named `*.zip`)
//!     with an entry whose name matches one of the rule's executable globs (entry names
//!     are read from the archive's headers, nothing is decompressed, nested archives
//!     are not opened), or that is a renamed Java archive (a `.class` entry or
//!     `META-INF/MANIFEST.MF`) when one of those globs matches `x.jar`.
//!
//!   So `["*.exe", "*.pdf"]` catches a PE called `report.txt` and a ZIP holding
//!   `setup.exe`, while `["*.pdf"]` catches neither.
//! - **`keywords`**: case-insensitive phrases (Unicode lower-casing, whitespace runs
//!   collapsed; see `filter/text.rs`) in every `Subject:` (RFC 2047 decoded) and every text part
//!   (`text/*`, any transfer encoding, any charset mail-parser knows, decoded to UTF-8),
//!   HTML reduced to its text (tags stripped, entities decoded), in the message and in
//!   attached messages. "project\r\n x" and "pro<b>ject</b> X" both contain "project x".
//!
//! # Hostile input and bounds
//!
//! The message is hostile; the rules are the operator's. Parsing is mail-parser's
//! (`MessageParser::default()`), which is lenient and never fails on content: whatever
//! it can read is screened. Three bounds keep the work proportionate:
//!
//! - Before parsing, one cheap pass over the lines estimates how much structure
//!   mail-parser would build (its memory grows with the number of header fields, parts,
//!   addresses and attached messages, not with bytes: a 25 MB message of tiny parts or
//!   header lines costs it ~500 MiB). A message over that budget is not parsed; see
//!   `too_complex` in `filter/extract.rs`. Ordinary mail is two orders of magnitude
//!   below it.
//! - The walk over the parsed message follows attached messages [`MAX_DEPTH`] levels
//!   deep and examines at most [`MAX_PARTS`] parts in all, without recursion (and the
//!   parsed tree, which mail-parser nests as deep as the message does, is dropped
//!   without recursion too).
//! - What is not parsed or not walked is treated as opaque bytes: keywords are searched
//!   in its raw text (lossily read as UTF-8, no transfer decoding, no HTML reduction),
//!   its raw `name=`/`filename=` parameters are matched against attachment globs, and,
//!   for a message not parsed at all, the `@`-words of its top `From:` fields against
//!   sender globs. A best-effort fallback, so that padding a message with parts or
//!   nesting does not hide what follows. Likewise a text part whose transfer encoding
//!   mail-parser reports as broken (truncated base64, say) is decoded leniently by us and
//!   searched too, and a multipart body without a usable boundary is searched raw.
//!
//! Work is linear in the message size: the structure estimate, one parse, one walk, a
//! 64 KiB decoded prefix per part for content sniffing (whole bodies only for ZIP
//! archives), one fold per text part (done lazily, only once a keyword rule is reached)
//! and one substring search per keyword. Memory stays within a few times the message
//! size: mail-parser's decoded parts and bounded structure, plus one folded copy of the
//! text. Reasons quote names and addresses from the message, escaped (no line breaks
//! reach a log) and cut to 200 characters.

mod extract;
mod glob;
mod sniff;
mod text;

#[cfg(test)]
mod tests;

use std::cell::OnceCell;

use crate::config::{Filter, FilterAction};

use extract::{Facts, Needs};
use glob::Glob;

pub use extract::{MAX_DEPTH, MAX_PARTS};

/// The configured `[[filter]]` rules, compiled; built once, shared by all sessions.
#[derive(Debug, Clone)]
pub struct Screener {
    rules: Vec<Rule>,
    /// What [`Screener::screen`] has to extract, the union over all rules.
    needs: Needs,
}

/// The rule a message matched, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The filter's `name`.
    pub rule: String,
    pub action: FilterAction,
    /// For the log, e.g. `attachment "invoice.pdf.exe" matches *.exe`, `keyword "project
    /// x" in the subject`, `sender bad@evil.example matches *@evil.example (envelope)`,
    /// `executable content (Windows PE) in attachment "report.txt"`.
    pub reason: String,
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    action: FilterAction,
    senders: Vec<Glob>,
    attachments: Vec<Glob>,
    /// The attachment globs that name an executable type; non-empty turns on content
    /// sniffing for this rule.
    executable: Vec<Glob>,
    /// One of `executable` matches `x.jar`: a ZIP that is a Java archive matches.
    jar: bool,
    keywords: Vec<Keyword>,
}

#[derive(Debug, Clone)]
struct Keyword {
    /// As configured, for the reason.
    source: String,
    /// Folded like the text it is searched in.
    folded: String,
}

impl Screener {
    pub fn new(filters: &[Filter]) -> Screener {
        let rules: Vec<Rule> = filters.iter().map(Rule::new).collect();
        let needs = Needs {
            senders: rules.iter().any(|r| !r.senders.is_empty()),
            names: rules.iter().any(|r| !r.attachments.is_empty()),
            content: rules.iter().any(|r| !r.executable.is_empty()),
            texts: rules.iter().any(|r| !r.keywords.is_empty()),
        };
        Screener { rules, needs }
    }

    /// No rules: [`Screener::screen`] always returns `None` (without parsing).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// First matching rule, in configuration order, or None. `message` is the complete
    /// message as received (CRLF lines, without our Received: header);
    /// `envelope_sender` is MAIL FROM without brackets ("" = null sender).
    pub fn screen(&self, envelope_sender: &str, message: &[u8]) -> Option<Verdict> {
        if self.rules.is_empty() {
            return None;
        }
        let parser = mail_parser::MessageParser::default();
        let parsed = if extract::too_complex(message) {
            None
        } else if self.needs.names || self.needs.content || self.needs.texts {
            parser.parse(message)
        } else {
            // Sender rules only: the top header block is all they read.
            parser.parse_headers(message)
        };
        let verdict = {
            let facts = Facts::gather(envelope_sender, message, parsed.as_ref(), self.needs);
            // Folding the text parts is the costly step for text-heavy mail: do it only
            // once the first keyword rule is reached, and only once.
            let folded = OnceCell::new();
            self.rules.iter().find_map(|rule| {
                rule.check(&facts, &folded).map(|reason| Verdict {
                    rule: rule.name.clone(),
                    action: rule.action.clone(),
                    reason,
                })
            })
        };
        if let Some(parsed) = parsed {
            extract::dismantle(parsed);
        }
        verdict
    }
}

impl Rule {
    fn new(filter: &Filter) -> Rule {
        let attachments: Vec<Glob> = filter.attachments.iter().map(|g| Glob::new(g)).collect();
        let executable: Vec<Glob> = attachments
            .iter()
            .filter(|g| g.names_executable())
            .cloned()
            .collect();
        let jar_name = glob::fold("x.jar");
        let jar = executable.iter().any(|g| g.matches(&jar_name));
        let keywords = filter
            .keywords
            .iter()
            .map(|k| Keyword {
                source: k.clone(),
                folded: text::fold(k),
            })
            // An empty phrase would match every message; validation rejects it anyway.
            .filter(|k| !k.folded.is_empty())
            .collect();
        Rule {
            name: filter.name.clone(),
            action: filter.action.clone(),
            senders: filter.senders.iter().map(|g| Glob::new(g)).collect(),
            attachments,
            executable,
            jar,
            keywords,
        }
    }

    /// The reason this rule matches, if it does.
    fn check(
        &self,
        facts: &Facts<'_>,
        folded: &OnceCell<Vec<extract::FoldedText>>,
    ) -> Option<String> {
        for sender in &facts.senders {
            if let Some(g) = self.senders.iter().find(|g| g.matches(&sender.folded)) {
                return Some(format!(
                    "sender {} matches {} ({})",
                    quote_plain(&sender.shown),
                    g.as_str(),
                    sender.origin
                ));
            }
        }
        if !self.attachments.is_empty() {
            for part in &facts.parts {
                if let Some(reason) = self.check_part(part) {
                    return Some(reason);
                }
            }
        }
        if !self.keywords.is_empty() {
            let texts = folded.get_or_init(|| facts.fold_texts());
            for text in texts {
                if let Some(k) = self
                    .keywords
                    .iter()
                    .find(|k| text.folded.contains(&k.folded))
                {
                    return Some(format!("keyword {} in {}", quote(&k.source), text.origin));
                }
            }
        }
        None
    }

    fn check_part(&self, part: &extract::Part) -> Option<String> {
        let within = if part.nested {
            " (in an attached message)"
        } else {
            ""
        };
        for name in &part.names {
            if let Some(g) = self.attachments.iter().find(|g| name.matches(g)) {
                return Some(format!(
                    "attachment {} matches {}{within}",
                    quote(&name.shown),
                    g.as_str()
                ));
            }
        }
        if self.executable.is_empty() {
            return None;
        }
        let what = match part.names.first() {
            Some(name) => format!("attachment {}", quote(&name.shown)),
            None => "an unnamed part".to_owned(),
        };
        if let Some(kind) = part.content {
            return Some(format!(
                "executable content ({}) in {what}{within}",
                kind.label()
            ));
        }
        for entry in &part.zip_entries {
            if let Some(g) = self.executable.iter().find(|g| entry.matches(g)) {
                return Some(format!(
                    "{what} contains {} matching {}{within}",
                    quote(&entry.shown),
                    g.as_str()
                ));
            }
        }
        if self.jar && part.zip_is_jar {
            return Some(format!("{what} is a Java archive{within}"));
        }
        None
    }
}

/// The fixed rules of the fuzz target (`fuzz/fuzz_targets/screen.rs`) and of the unit
/// test that stands in for it: every kind of criterion, content sniffing included.
#[doc(hidden)]
pub fn fuzz_rules() -> Vec<Filter> {
    let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        Filter {
            name: "senders".into(),
            attachments: Vec::new(),
            keywords: Vec::new(),
            senders: list(&["*@evil.example", "bad?@*.example"]),
            action: FilterAction::Reject,
        },
        Filter {
            name: "executables".into(),
            attachments: list(&["*.exe", "*.scr", "*.js", "*.jar", "*.sh", "*.pdf"]),
            keywords: Vec::new(),
            senders: Vec::new(),
            action: FilterAction::Quarantine,
        },
        Filter {
            name: "keywords".into(),
            attachments: Vec::new(),
            keywords: list(&["project x", "grüße", "ΟΔΟΣ"]),
            senders: Vec::new(),
            action: FilterAction::Redirect("security@example.org".into()),
        },
        Filter {
            name: "never".into(),
            attachments: list(&["*.never-used-extension"]),
            keywords: list(&["a phrase that the seeds never contain"]),
            senders: list(&["nobody@nowhere.invalid"]),
            action: FilterAction::Discard,
        },
    ]
}

/// The longest text from the message that a reason quotes.
const QUOTE_LIMIT: usize = 200;

/// `"text"`, escaped like a Rust string literal (so no control character or line break
/// from the message reaches a log) and cut to [`QUOTE_LIMIT`] characters.
fn quote(s: &str) -> String {
    format!("\"{}\"", escape(s))
}

/// Like [`quote`], without the quotes (for addresses).
fn quote_plain(s: &str) -> String {
    escape(s)
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(QUOTE_LIMIT) + 8);
    for (i, c) in s.chars().enumerate() {
        if i == QUOTE_LIMIT {
            out.push('…');
            break;
        }
        out.extend(c.escape_debug());
    }
    out
}
