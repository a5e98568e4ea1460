//! Case-insensitive `*` / `?` globs for attachment file names and sender addresses.
//!
//! Why not a glob crate: file names and addresses are single strings with no path
//! structure we care about, so `**`, character classes, braces and escapes would only
//! add syntax an operator could get wrong. `*` matches any run of characters (dots and
//! `@` included, possibly none), `?` exactly one character, everything else itself,
//! compared after Unicode lower-casing. There is no escape: a literal `*` or `?` cannot
//! be matched on its own, which no file name or address rule needs.
//!
//! Trust: the pattern comes from the configuration; the text from a hostile message. The
//! matcher is the classic two-pointer algorithm that backtracks only to the last `*`, so
//! its cost is at most pattern length × text length, never exponential.

/// A compiled glob: the pattern lower-cased once, as characters.
#[derive(Debug, Clone)]
pub(crate) struct Glob {
    /// As written in the configuration, for the verdict's reason.
    source: String,
    pattern: Vec<char>,
}

impl Glob {
    pub(crate) fn new(source: &str) -> Glob {
        Glob {
            source: source.to_owned(),
            pattern: fold(source),
        }
    }

    /// The pattern as configured.
    pub(crate) fn as_str(&self) -> &str {
        &self.source
    }

    /// Does the (already folded, see [`fold`]) text match?
    pub(crate) fn matches(&self, text: &[char]) -> bool {
        wildcard_match(&self.pattern, text)
    }

    /// Does this glob name an executable file type? True when the pattern's extension
    /// (the text after its last `.`) matches one of [`EXECUTABLE_EXTENSIONS`]: `*.exe`,
    /// `invoice*.exe`, `*.ex?` and `*.*` do; `*.pdf`, `*` and `bad@evil.example` do not.
    pub(crate) fn names_executable(&self) -> bool {
        let Some(dot) = self.pattern.iter().rposition(|&c| c == '.') else {
            return false;
        };
        let extension = &self.pattern[dot + 1..];
        EXECUTABLE_EXTENSIONS.iter().any(|e| {
            let e: Vec<char> = e.chars().collect();
            wildcard_match(extension, &e)
        })
    }
}

/// File extensions whose mention in an attachment rule turns on content sniffing
/// (see the module documentation of `filter`). Programs, libraries, installers and
/// scripts that Windows, macOS, Linux or a Java runtime will run when opened.
#[rustfmt::skip] // one group of related extensions per line
pub(crate) const EXECUTABLE_EXTENSIONS: &[&str] = &[
    // Windows programs, libraries, installers, scripts and shortcuts that run code
    "exe", "scr", "com", "dll", "pif", "cpl", "sys", "msi", "msp", "msc", "ocx", "drv", "efi",
    "bat", "cmd", "vbs", "vbe", "js", "jse", "wsf", "wsh", "ps1", "psm1", "hta", "lnk", "reg",
    "scf",
    // Unix and macOS
    "sh", "bash", "csh", "ksh", "zsh", "run", "bin", "elf", "so", "dylib", "app", "command",
    "pkg", "dmg",
    // Java and other runtimes
    "jar", "class", "py", "pyc", "pl", "rb", "php", "apk",
];

/// Lower-case for matching: per character (`char::to_lowercase`, so no context-dependent
/// final sigma), with `ς` folded to `σ` so either spelling matches the other.
pub(crate) fn fold(s: &str) -> Vec<char> {
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        for l in c.to_lowercase() {
            out.push(if l == 'ς' { 'σ' } else { l });
        }
    }
    out
}

/// `*` = any run (possibly empty), `?` = one character. On a mismatch, retry from the
/// most recent `*` with it swallowing one more character; earlier stars never need
/// revisiting, which keeps this O(pattern × text).
fn wildcard_match(pattern: &[char], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    // (position of the last `*` in the pattern, text position it was tried at)
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, text: &str) -> bool {
        Glob::new(pattern).matches(&fold(text))
    }

    #[test]
    fn table() {
        let cases = [
            ("*.exe", "invoice.pdf.exe", true),
            ("*.exe", "INVOICE.EXE", true),
            ("*.EXE", "setup.exe", true),
            ("*.exe", "setup.exe.txt", false),
            ("*.exe", "exe", false),
            ("*.exe", ".exe", true),
            ("*.ex?", "a.exe", true),
            ("*.ex?", "a.ex", false),
            ("?", "a", true),
            ("?", "", false),
            ("?", "ab", false),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*@evil.example", "bad@evil.example", true),
            ("*@evil.example", "bad@notevil.example", false),
            ("*@*.evil.example", "x@mx.evil.example", true),
            ("bad@evil.example", "BAD@Evil.Example", true),
            ("Ölbild*.jpg", "ölbild 2.JPG", true),
            ("*σ", "ΟΔΟΣ", true),
            ("*ς", "οδοσ", true),
            ("**a", "a", true),
            ("*a*", "bbb", false),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(m(pattern, text), want, "{pattern:?} against {text:?}");
        }
    }

    #[test]
    fn pathological_patterns_stay_polynomial() {
        let text: String = "a".repeat(5_000);
        assert!(!m("*a*a*a*a*a*a*a*a*a*a*b", &text));
        assert!(m("*a*a*a*a*a*a*a*a*a*a*", &text));
    }

    #[test]
    fn executable_names() {
        for g in [
            "*.exe",
            "*.EXE",
            "invoice*.exe",
            "*.ex?",
            "*.*",
            "*.js",
            "x.tar.sh",
        ] {
            assert!(Glob::new(g).names_executable(), "{g}");
        }
        for g in [
            "*.pdf",
            "*",
            "*exe",
            "bad@evil.example",
            "*.docx",
            "*.exe.txt",
        ] {
            assert!(!Glob::new(g).names_executable(), "{g}");
        }
    }
}
