//! Durations ("30s", "10m") and sizes ("25MB") as written in the configuration file.
//!
//! Input is a single value an operator typed. The parsers accept one number and one unit,
//! nothing fancier, so that what is written is what is meant: no fractions, no compound
//! "1h30m", no signs. Overflow is an error, never a wrap or a saturation.

use std::time::Duration;

/// Duration units, smallest first. Lower case only: "5M" could be read as months.
const DURATION_UNITS: &[(&str, u64)] = &[
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// Size units. Binary multiples: mail software has long meant 1024 by "KB", and an
/// operator who writes "25MB" gets a limit slightly above 25 million bytes, never below.
const SIZE_UNITS: &[(&str, u64)] = &[
    ("b", 1),
    ("kb", 1 << 10),
    ("kib", 1 << 10),
    ("mb", 1 << 20),
    ("mib", 1 << 20),
    ("gb", 1 << 30),
    ("gib", 1 << 30),
];

/// Parse a duration: a non-negative integer followed by `ms`, `s`, `m`, `h` or `d`.
///
/// `"30s"`, `"10m"`, `"4h"`, `"5d"`, `"500ms"`; a space between number and unit is allowed.
/// Whether zero is acceptable is up to the caller.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = split_number(s)?;
    if unit.is_empty() {
        return Err(format!(
            "`{s}` has no unit (write e.g. \"{number}s\"; units: ms, s, m, h, d)"
        ));
    }
    let Some(&(_, millis)) = DURATION_UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(format!(
            "`{s}`: unknown unit `{unit}` (units: ms, s, m, h, d, in lower case)"
        ));
    };
    number
        .checked_mul(millis)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parse a size: digits alone (bytes), or digits followed by `B`, `KB`, `MB`, `GB`
/// (also `KiB`, `MiB`, `GiB`), case-insensitive. `KB` = 1024 bytes, `MB` = 1024 KB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (number, unit) = split_number(s)?;
    if unit.is_empty() {
        return Ok(number);
    }
    let lower = unit.to_ascii_lowercase();
    let Some(&(_, factor)) = SIZE_UNITS.iter().find(|(name, _)| *name == lower) else {
        return Err(format!(
            "`{s}`: unknown unit `{unit}` (units: B, KB, MB, GB; or a plain number of bytes)"
        ));
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Split "25MB" into (25, "MB"). The number must be plain ASCII digits.
fn split_number(s: &str) -> Result<(u64, &str), String> {
    let trimmed = s.trim();
    if trimmed.is_empty() {
        return Err("empty value".to_string());
    }
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, rest) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        // Catches "-5m", "+5m", ".5h" and "m" alike: only plain digits start a value.
        return Err(format!("`{s}` does not start with a number"));
    }
    let number = digits
        .parse::<u64>()
        .map_err(|_| format!("`{s}` is too large"))?;
    Ok((number, rest.trim_start()))
}

/// Render a duration in the largest unit that divides it exactly, the inverse of
/// [`parse_duration`] for every value it produces.
pub fn format_duration(d: Duration) -> String {
    let millis = d.as_millis();
    if millis == 0 {
        return "0s".to_string();
    }
    for &(name, factor) in DURATION_UNITS.iter().rev() {
        let factor = u128::from(factor);
        if millis.is_multiple_of(factor) {
            return format!("{}{name}", millis / factor);
        }
    }
    // Sub-millisecond durations cannot come from a config file; show them honestly anyway.
    format!("{d:?}")
}

/// Render a size in the largest binary unit that divides it exactly ("25MB", "1000B").
pub fn format_size(bytes: u64) -> String {
    for (name, factor) in [("GB", 1u64 << 30), ("MB", 1 << 20), ("KB", 1 << 10)] {
        if bytes != 0 && bytes.is_multiple_of(factor) {
            return format!("{}{name}", bytes / factor);
        }
    }
    format!("{bytes}B")
}
