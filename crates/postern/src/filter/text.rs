//! Text for keyword search: HTML reduced to what a reader sees, then folded.
//!
//! Folding ([`fold`]): Unicode lower-casing per character (`ς` folded to `σ`), every run
//! of whitespace (Unicode `White_Space`, so CR LF, tabs and no-break spaces too)
//! collapsed to one space, leading and trailing whitespace dropped, and invisible format
//! characters (soft hyphen, zero-width space/joiners, word joiner, BOM) removed so that
//! "pro\u{AD}ject" still reads "project". A keyword is folded the same way and found
//! with a plain substring search (`str::contains`, linear time).
//!
//! HTML ([`html_to_text`]): tags and comments removed, block-level tags (`p`, `div`,
//! `br`, `td`, `li`, headings...) replaced by a space so that cells and paragraphs do not
//! run together, inline tags by nothing so that `pro<b>ject</b>` reads "project"; named
//! entities from a common set and all numeric entities decoded. The text inside
//! `<script>` and `<style>` is kept (searching more is the safe side for a filter). A
//! `<` not followed by a letter, `/`, `!` or `?` is text, as in browsers.
//!
//! Trust: the input is hostile text; both functions are single linear passes that
//! allocate at most a small multiple of their input.

/// Fold text for matching; see the module documentation.
pub(crate) fn fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        // ASCII first: most mail text is, and the Unicode tables are slow by comparison.
        let ascii = c.is_ascii();
        if ascii && matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C')
            || !ascii && c.is_whitespace()
        {
            space = true;
            continue;
        }
        if !ascii && is_invisible(c) {
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        if ascii {
            out.push(c.to_ascii_lowercase());
        } else {
            for l in c.to_lowercase() {
                out.push(if l == 'ς' { 'σ' } else { l });
            }
        }
    }
    out
}

fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{AD}' | '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}'
    )
}

/// The text a reader of this HTML would see, roughly; see the module documentation.
pub(crate) fn html_to_text(html: &str) -> String {
    let bytes = html.as_bytes();
    let mut out = String::with_capacity(html.len() / 2);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'<' => {
                if html[i..].starts_with("<!--") {
                    i = match html[i + 4..].find("-->") {
                        Some(end) => i + 4 + end + 3,
                        None => bytes.len(),
                    };
                    continue;
                }
                match bytes.get(i + 1) {
                    Some(c) if c.is_ascii_alphabetic() || matches!(c, b'/' | b'!' | b'?') => {
                        let (end, block) = scan_tag(bytes, i + 1);
                        if block {
                            out.push(' ');
                        }
                        i = end;
                    }
                    _ => {
                        out.push('<');
                        i += 1;
                    }
                }
            }
            b'&' => match entity(&html[i + 1..]) {
                Some((c, len)) => {
                    out.push(c);
                    i += 1 + len;
                }
                None => {
                    out.push('&');
                    i += 1;
                }
            },
            _ => {
                // Copy the run up to the next markup character in one go. Both are ASCII,
                // so the slice boundaries are character boundaries.
                let end = bytes[i..]
                    .iter()
                    .position(|&b| b == b'<' || b == b'&')
                    .map_or(bytes.len(), |p| i + p);
                out.push_str(&html[i..end]);
                i = end;
            }
        }
    }
    out
}

/// Skip a tag starting after its `<`: returns the index after its `>` (or the end of
/// the input for an unterminated tag) and whether it is a block-level element. Quoted
/// attribute values may contain `>`.
fn scan_tag(bytes: &[u8], start: usize) -> (usize, bool) {
    let mut i = start;
    if bytes.get(i) == Some(&b'/') {
        i += 1;
    }
    let name_start = i;
    while bytes.get(i).is_some_and(|b| b.is_ascii_alphanumeric()) {
        i += 1;
    }
    let block = is_block(&bytes[name_start..i]);
    let mut after_eq = false;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'>' => return (i + 1, block),
            b'"' | b'\'' if after_eq => {
                i = match bytes[i + 1..].iter().position(|&q| q == b) {
                    Some(p) => i + 1 + p + 1,
                    None => bytes.len(),
                };
                after_eq = false;
                continue;
            }
            b'=' => after_eq = true,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => after_eq = false,
        }
        i += 1;
    }
    (bytes.len(), block)
}

fn is_block(name: &[u8]) -> bool {
    const BLOCK: &[&str] = &[
        "address",
        "article",
        "aside",
        "blockquote",
        "body",
        "br",
        "caption",
        "center",
        "dd",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "head",
        "header",
        "hr",
        "html",
        "img",
        "li",
        "main",
        "nav",
        "ol",
        "option",
        "p",
        "pre",
        "section",
        "table",
        "tbody",
        "td",
        "tfoot",
        "th",
        "thead",
        "title",
        "tr",
        "ul",
    ];
    BLOCK
        .iter()
        .any(|b| b.as_bytes().eq_ignore_ascii_case(name))
}

/// Decode the entity after an `&`: returns the character and how many bytes it used
/// (the `;` included when present). Names are matched case-insensitively: the result
/// is folded afterwards anyway, so `&Auml;` and `&auml;` may as well agree.
fn entity(s: &str) -> Option<(char, usize)> {
    let b = s.as_bytes();
    if b.first() == Some(&b'#') {
        let (radix, digits_at) = match b.get(1) {
            Some(b'x' | b'X') => (16, 2),
            _ => (10, 1),
        };
        let digits = b[digits_at..]
            .iter()
            .take(8)
            .take_while(|d| d.is_ascii_hexdigit() && (radix == 16 || d.is_ascii_digit()))
            .count();
        if digits == 0 {
            return None;
        }
        let value = u32::from_str_radix(&s[digits_at..digits_at + digits], radix).ok()?;
        let c = match char::from_u32(value) {
            Some('\0') | None => '\u{FFFD}',
            Some(c) => c,
        };
        let mut len = digits_at + digits;
        if b.get(len) == Some(&b';') {
            len += 1;
        }
        return Some((c, len));
    }
    let name_len = b
        .iter()
        .take(32)
        .take_while(|c| c.is_ascii_alphanumeric())
        .count();
    if name_len == 0 {
        return None;
    }
    let name = s[..name_len].to_ascii_lowercase();
    let c = ENTITIES.iter().find(|(n, _)| *n == name).map(|&(_, c)| c)?;
    let mut len = name_len;
    if b.get(len) == Some(&b';') {
        len += 1;
    }
    Some((c, len))
}

/// Named entities worth knowing for keyword search: markup characters, spaces and
/// invisible characters, punctuation, and the Latin-1 letters.
const ENTITIES: &[(&str, char)] = &[
    ("amp", '&'),
    ("lt", '<'),
    ("gt", '>'),
    ("quot", '"'),
    ("apos", '\''),
    ("nbsp", '\u{A0}'),
    ("ensp", '\u{2002}'),
    ("emsp", '\u{2003}'),
    ("thinsp", '\u{2009}'),
    ("shy", '\u{AD}'),
    ("zwsp", '\u{200B}'),
    ("zerowidthspace", '\u{200B}'),
    ("zwj", '\u{200D}'),
    ("zwnj", '\u{200C}'),
    ("ndash", '–'),
    ("mdash", '—'),
    ("lsquo", '‘'),
    ("rsquo", '’'),
    ("sbquo", '‚'),
    ("ldquo", '“'),
    ("rdquo", '”'),
    ("bdquo", '„'),
    ("laquo", '«'),
    ("raquo", '»'),
    ("hellip", '…'),
    ("bull", '•'),
    ("middot", '·'),
    ("copy", '©'),
    ("reg", '®'),
    ("trade", '™'),
    ("euro", '€'),
    ("pound", '£'),
    ("yen", '¥'),
    ("cent", '¢'),
    ("sect", '§'),
    ("para", '¶'),
    ("deg", '°'),
    ("times", '×'),
    ("divide", '÷'),
    ("iexcl", '¡'),
    ("iquest", '¿'),
    ("agrave", 'à'),
    ("aacute", 'á'),
    ("acirc", 'â'),
    ("atilde", 'ã'),
    ("auml", 'ä'),
    ("aring", 'å'),
    ("aelig", 'æ'),
    ("ccedil", 'ç'),
    ("egrave", 'è'),
    ("eacute", 'é'),
    ("ecirc", 'ê'),
    ("euml", 'ë'),
    ("igrave", 'ì'),
    ("iacute", 'í'),
    ("icirc", 'î'),
    ("iuml", 'ï'),
    ("eth", 'ð'),
    ("ntilde", 'ñ'),
    ("ograve", 'ò'),
    ("oacute", 'ó'),
    ("ocirc", 'ô'),
    ("otilde", 'õ'),
    ("ouml", 'ö'),
    ("oslash", 'ø'),
    ("ugrave", 'ù'),
    ("uacute", 'ú'),
    ("ucirc", 'û'),
    ("uuml", 'ü'),
    ("yacute", 'ý'),
    ("yuml", 'ÿ'),
    ("thorn", 'þ'),
    ("szlig", 'ß'),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding() {
        assert_eq!(fold("  Project\r\n\t X  "), "project x");
        assert_eq!(fold("PRO\u{AD}JECT\u{A0}\u{200B}X"), "project x");
        assert_eq!(fold("ΟΔΟΣ"), fold("οδος"));
        assert_eq!(fold("İSTANBUL"), fold("i\u{307}stanbul"));
        assert_eq!(fold(""), "");
        assert_eq!(fold(" \r\n "), "");
    }

    #[test]
    fn html() {
        let cases = [
            ("<p>Pro<b>ject</b>&nbsp;X</p>", "project x"),
            ("<td>project</td><td>x</td>", "project x"),
            ("proj&#101;ct &#x58;", "project x"),
            ("a &lt; b &amp;&amp; c &gt; d", "a < b && c > d"),
            ("a < b", "a < b"),
            ("x <!-- project x --> y", "x y"),
            ("x <!-- unterminated", "x"),
            ("<a title=\"a > b\" href='x>y'>link</a>", "link"),
            ("<img alt=\"project x\">after", "after"),
            (
                "&Auml;rger &uuml;ber &UNKNOWN; &; &#; &#xZZ; &#0;",
                "ärger über &unknown; &; &#; &#xzz; \u{FFFD}",
            ),
            ("&ampproject", "&ampproject"),
            ("&#99999999999;", "\u{FFFD}999;"),
            ("<br/>line<br />two", "line two"),
            ("unterminated <div class=\"x", "unterminated"),
            ("ünïcödé <b>tëxt</b>", "ünïcödé tëxt"),
        ];
        for (html, want) in cases {
            assert_eq!(fold(&html_to_text(html)), want, "{html:?}");
        }
    }
}
