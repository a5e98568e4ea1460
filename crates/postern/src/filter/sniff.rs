//! Content sniffing: is this decoded attachment body a program, whatever its name says?
//!
//! Signatures recognised, at the very start of the decoded body (offset 0):
//!
//! | kind | test |
//! |---|---|
//! | Windows PE (`.exe`, `.dll`, `.scr`, `.sys`...) | `MZ`, and `PE\0\0` at the little-endian offset stored at 0x3C (`e_lfanew`) |
//! | ELF (Linux, BSD) | `\x7fELF`, class byte 1 or 2, data byte 1 or 2 |
//! | Mach-O (macOS) | `FE ED FA CE`/`CF`, `CE`/`CF FA ED FE`; universal `CA FE BA BE` with ≤ 30 architectures |
//! | Java class file | `CA FE BA BE` with a larger count (it is the class-file version) |
//! | script | `#!` then optional blanks then `/` (`#!/bin/sh`, `#! /usr/bin/env python`), after an optional UTF-8 BOM; only in parts that carry a file name or `Content-Disposition: attachment`, so a mail body that starts with a pasted script is not taken for an attachment |
//!
//! A bare `MZ` (a DOS program, or the text "MZ...") is not enough: only a PE header is.
//! Windows scripts (`.bat`, `.vbs`, `.js`, `.ps1`) have no signature and are caught by
//! name only. ZIP archives are not decompressed: their entry names are stored in clear
//! in every local and central directory header, so [`zip_entry_names`] reads them.
//!
//! Trust: the bytes are hostile. Every read is bounds-checked (`get`), nothing is
//! allocated in proportion to a length field, and the ZIP scan is one linear pass.

/// Executable content recognised by [`executable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Executable {
    WindowsPe,
    Elf,
    MachO,
    JavaClass,
    Script,
}

impl Executable {
    /// For the verdict's reason: "executable content (Windows PE) in ...".
    pub(crate) fn label(self) -> &'static str {
        match self {
            Executable::WindowsPe => "Windows PE",
            Executable::Elf => "ELF",
            Executable::MachO => "Mach-O",
            Executable::JavaClass => "Java class",
            Executable::Script => "#! script",
        }
    }
}

/// How many decoded bytes a signature check needs at most. PE headers sit after the DOS
/// stub, in practice within the first few hundred bytes; 64 KiB leaves room for odd
/// linkers while keeping the prefix decode of text-typed parts cheap.
pub(crate) const PREFIX: usize = 64 * 1024;

/// What the start of `body` says it is. `scripts`: also accept a `#!` line.
pub(crate) fn executable(body: &[u8], scripts: bool) -> Option<Executable> {
    let magic = |m: &[u8]| body.starts_with(m);
    if is_pe(body) {
        return Some(Executable::WindowsPe);
    }
    if magic(b"\x7fELF") && matches!(body.get(4), Some(1 | 2)) && matches!(body.get(5), Some(1 | 2))
    {
        return Some(Executable::Elf);
    }
    if magic(&[0xFE, 0xED, 0xFA, 0xCE])
        || magic(&[0xFE, 0xED, 0xFA, 0xCF])
        || magic(&[0xCE, 0xFA, 0xED, 0xFE])
        || magic(&[0xCF, 0xFA, 0xED, 0xFE])
    {
        return Some(Executable::MachO);
    }
    if magic(&[0xCA, 0xFE, 0xBA, 0xBE]) {
        // Shared by universal Mach-O (then a small architecture count follows) and Java
        // class files (then minor and major version, major >= 45). Both run code.
        return match be32(body, 4) {
            Some(n) if n <= 30 => Some(Executable::MachO),
            Some(_) => Some(Executable::JavaClass),
            None => None,
        };
    }
    if scripts {
        let text = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
        if let Some(rest) = text.strip_prefix(b"#!") {
            let first = rest.iter().find(|&&b| b != b' ' && b != b'\t');
            if first == Some(&b'/') {
                return Some(Executable::Script);
            }
        }
    }
    None
}

fn is_pe(body: &[u8]) -> bool {
    if !body.starts_with(b"MZ") {
        return false;
    }
    let Some(offset) = le32(body, 0x3C) else {
        return false;
    };
    let offset = offset as usize;
    offset >= 2
        && offset.checked_add(4).and_then(|end| body.get(offset..end)) == Some(&b"PE\0\0"[..])
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le16(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(usize::from(u16::from_le_bytes([s[0], s[1]])))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Does the body start like a ZIP archive (a local file header, or the end record of
/// an empty archive)?
pub(crate) fn looks_like_zip(body: &[u8]) -> bool {
    body.starts_with(b"PK\x03\x04") || body.starts_with(b"PK\x05\x06")
}

/// The most entry names read from one archive; a ZIP bomb of empty entries gets no
/// further than this.
pub(crate) const MAX_ZIP_ENTRIES: usize = 20_000;

/// The entry names of a ZIP archive, from every local file header (`PK\3\4`, name at
/// +30) and central directory header (`PK\1\2`, name at +46) found in one pass over the
/// bytes, at most [`MAX_ZIP_ENTRIES`]. Scanning for signatures rather than
/// following the central directory also reads truncated archives and archives with
/// data descriptors; a signature that happens to occur inside compressed data yields a
/// junk name, which could only matter if it ended in an executable extension.
pub(crate) fn zip_entry_names(body: &[u8]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut at = 0;
    while names.len() < MAX_ZIP_ENTRIES {
        let Some(p) = find_pk(body, at) else { break };
        at = p + 2;
        let (len_at, name_at) = match body.get(p + 2..p + 4) {
            Some([3, 4]) => (p + 26, p + 30),
            Some([1, 2]) => (p + 28, p + 46),
            _ => continue,
        };
        let Some(len) = le16(body, len_at) else {
            continue;
        };
        let Some(raw) = body.get(name_at..name_at + len) else {
            continue;
        };
        if raw.is_empty() {
            continue;
        }
        // ZIP names are UTF-8 (flag bit 11) or CP437; extensions are ASCII either way.
        // Not deduplicated (each file appears twice, local and central): a repeat costs
        // one more match, a search would cost a quadratic.
        names.push(String::from_utf8_lossy(raw).into_owned());
        at = name_at + len;
    }
    names
}

fn find_pk(body: &[u8], from: usize) -> Option<usize> {
    memchr::memmem::find(body.get(from..)?, b"PK").map(|p| from + p)
}

/// Does a ZIP with these entries look like a Java archive (a `.jar` renamed)?
pub(crate) fn looks_like_jar(entries: &[String]) -> bool {
    entries.iter().any(|n| {
        n.eq_ignore_ascii_case("META-INF/MANIFEST.MF") || n.to_ascii_lowercase().ends_with(".class")
    })
}

/// Base64, leniently: bytes outside the alphabet (line breaks, blanks, junk) are
/// skipped, `=` drops any partial group (so concatenated encodings still decode), and
/// decoding stops after `limit` output bytes. Used to recover the bytes of parts that
/// mail-parser hands over as (lossily converted) text, and of truncated encodings.
pub(crate) fn base64_lenient(input: &[u8], limit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(limit.min(input.len() / 4 * 3 + 3));
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &b in input {
        if out.len() >= limit {
            break;
        }
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => {
                acc = 0;
                bits = 0;
                continue;
            }
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out.truncate(limit);
    out
}

/// Quoted-printable, leniently: `=` + line break is a soft break, `=XX` a byte, any
/// other `=` itself. Stops after `limit` output bytes.
pub(crate) fn quoted_printable_lenient(input: &[u8], limit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(limit.min(input.len()));
    let mut i = 0;
    while i < input.len() && out.len() < limit {
        let b = input[i];
        if b != b'=' {
            out.push(b);
            i += 1;
            continue;
        }
        match (input.get(i + 1), input.get(i + 2)) {
            (Some(b'\r'), Some(b'\n')) => i += 3,
            (Some(b'\n'), _) => i += 2,
            (Some(&h), Some(&l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                out.push((hex(h) << 4) | hex(l));
                i += 3;
            }
            _ => {
                out.push(b'=');
                i += 1;
            }
        }
    }
    out
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal but structurally valid PE prefix: DOS header, `e_lfanew` = 0x80,
    /// `PE\0\0` there, followed by a COFF header stub.
    pub(crate) fn tiny_pe() -> Vec<u8> {
        let mut b = vec![0u8; 0x100];
        b[0] = b'M';
        b[1] = b'Z';
        b[0x3C] = 0x80;
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        b[0x84] = 0x4C; // machine: i386
        b[0x85] = 0x01;
        b
    }

    #[test]
    fn signatures() {
        assert_eq!(executable(&tiny_pe(), false), Some(Executable::WindowsPe));
        let mut dos = tiny_pe();
        dos[0x80] = b'X';
        assert_eq!(executable(&dos, false), None, "MZ without PE header");
        assert_eq!(executable(b"MZ is a nice place", true), None);
        let mut far = tiny_pe();
        far[0x3C..0x40].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert_eq!(executable(&far, false), None, "e_lfanew past the end");
        assert_eq!(
            executable(b"\x7fELF\x02\x01\x01\0", false),
            Some(Executable::Elf)
        );
        assert_eq!(executable(b"\x7fELF", false), None);
        assert_eq!(
            executable(&[0xCF, 0xFA, 0xED, 0xFE, 7, 0, 0, 1], false),
            Some(Executable::MachO)
        );
        assert_eq!(
            executable(&[0xCA, 0xFE, 0xBA, 0xBE, 0, 0, 0, 2], false),
            Some(Executable::MachO)
        );
        assert_eq!(
            executable(&[0xCA, 0xFE, 0xBA, 0xBE, 0, 0, 0, 52], false),
            Some(Executable::JavaClass)
        );
        assert_eq!(
            executable(b"#!/bin/sh\necho hi\n", true),
            Some(Executable::Script)
        );
        assert_eq!(
            executable(b"\xEF\xBB\xBF#! /usr/bin/env python3\n", true),
            Some(Executable::Script)
        );
        assert_eq!(
            executable(b"#!/bin/sh\n", false),
            None,
            "scripts only when asked"
        );
        assert_eq!(executable(b"#!important news", true), None);
        assert_eq!(executable(b"", true), None);
        assert_eq!(executable(b"plain text", true), None);
    }

    /// A stored (uncompressed) ZIP with the given entries: local headers, then a
    /// central directory, then the end record.
    pub(crate) fn tiny_zip(entries: &[&str]) -> Vec<u8> {
        let mut local = Vec::new();
        let mut central = Vec::new();
        for name in entries {
            let offset = local.len() as u32;
            local.extend_from_slice(b"PK\x03\x04");
            local.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            local.extend_from_slice(&[0; 12]); // crc, sizes
            local.extend_from_slice(&(name.len() as u16).to_le_bytes());
            local.extend_from_slice(&[0, 0]);
            local.extend_from_slice(name.as_bytes());
            central.extend_from_slice(b"PK\x01\x02");
            central.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend_from_slice(&[0; 12]);
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 12]);
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        let cd_offset = local.len() as u32;
        let cd_len = central.len() as u32;
        let mut zip = local;
        zip.extend_from_slice(&central);
        zip.extend_from_slice(b"PK\x05\x06\0\0\0\0");
        zip.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        zip.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        zip.extend_from_slice(&cd_len.to_le_bytes());
        zip.extend_from_slice(&cd_offset.to_le_bytes());
        zip.extend_from_slice(&[0, 0]);
        zip
    }

    #[test]
    fn zip_names() {
        let zip = tiny_zip(&["readme.txt", "bin/setup.exe"]);
        assert!(looks_like_zip(&zip));
        assert_eq!(
            zip_entry_names(&zip),
            ["readme.txt", "bin/setup.exe", "readme.txt", "bin/setup.exe"]
        );
        // Truncated before the central directory: the local headers still tell.
        assert_eq!(zip_entry_names(&zip[..83]), ["readme.txt", "bin/setup.exe"]);
        assert_eq!(zip_entry_names(&zip[..82]), ["readme.txt"]);
        assert!(zip_entry_names(b"PK").is_empty());
        assert!(
            zip_entry_names(b"PK\x03\x04\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\xff\xff")
                .is_empty()
        );
        assert!(looks_like_jar(&zip_entry_names(&tiny_zip(&[
            "META-INF/MANIFEST.MF",
            "a/B.class"
        ]))));
        assert!(!looks_like_jar(&zip_entry_names(&zip)));
    }

    #[test]
    fn lenient_decoders() {
        assert_eq!(base64_lenient(b"aGVs\r\nbG8=", 100), b"hello");
        assert_eq!(base64_lenient(b"aGVsbG8=\r\nIHdvcmxk", 100), b"hello world");
        assert_eq!(base64_lenient(b"aGVsbG8gd29y", 5), b"hello");
        assert_eq!(base64_lenient(b"aGVsbG8gd2", 100), b"hello w", "truncated");
        assert_eq!(base64_lenient(b"!!**", 100), b"");
        assert_eq!(
            quoted_printable_lenient(b"proj=\r\nect =58=\nx=zz=", 100),
            b"project Xx=zz="
        );
        assert_eq!(quoted_printable_lenient(b"abcdef", 3), b"abc");
    }
}
