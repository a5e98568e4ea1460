//! The optional list of valid recipients in the accepted domains (`recipients_file`).
//!
//! One address per line, `@domain` for a catch-all, `#` comments and blank lines
//! ignored. Matching ignores case in the domain and in the local part, as Postfix's
//! relay_recipient_maps does: mailbox names that differ only in case are, in practice,
//! the same person, and refusing one of them would lose mail.
//!
//! Trust: an operator's file; every line is parsed with the same address parser as the
//! network input, and a bad line is an error naming file and line.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use postern_smtp::Address;
use postern_smtp::address::{ascii_domain, parse_domain, parse_mailbox};

#[derive(Debug, Default)]
pub struct RecipientList {
    /// "local@domain", lower-cased.
    addresses: HashSet<String>,
    /// Domains with a catch-all.
    catch_all: HashSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecipientListError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line is neither an address nor `@domain`.
    #[error("{path}:{line}: `{text}` is not an address or @domain")]
    Syntax {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

impl RecipientList {
    pub fn load(path: &Path) -> Result<RecipientList, RecipientListError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipientListError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, text)| RecipientListError::Syntax {
            path: path.to_owned(),
            line,
            text,
        })
    }

    /// Parses the file's text; on error returns the 1-based line number and its text.
    pub fn parse(text: &str) -> Result<RecipientList, (usize, String)> {
        let mut list = RecipientList::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || (i + 1, line.to_string());
            if let Some(domain) = line.strip_prefix('@') {
                let domain = parse_domain(domain).map_err(|_| bad())?;
                list.catch_all.insert(ascii_domain(&domain).into_owned());
            } else {
                let addr = parse_mailbox(line).map_err(|_| bad())?;
                list.addresses.insert(key(&addr));
            }
        }
        Ok(list)
    }

    pub fn contains(&self, addr: &Address) -> bool {
        addr.domain()
            .ascii_name()
            .is_some_and(|d| self.catch_all.contains(d.as_ref()))
            || self.addresses.contains(&key(addr))
    }

    pub fn len(&self) -> usize {
        self.addresses.len() + self.catch_all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The lookup key: the local part lower-cased, the domain in A-label form (IDNA).
fn key(addr: &Address) -> String {
    match addr.domain().ascii_name() {
        Some(domain) => format!("{}@{domain}", addr.local().to_lowercase()),
        None => format!("{}@{}", addr.local().to_lowercase(), addr.domain()),
    }
}
