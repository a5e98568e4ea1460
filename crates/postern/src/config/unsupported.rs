//! Configuration this build accepts as valid but cannot act on yet.
//!
//! The file format is the full v1 contract (`docs/configuration.md`), so a configuration
//! written today keeps working as features land. Until then `postern serve` refuses to start
//! rather than run without a filter, TLS or AUTH the operator asked for: a relay that
//! silently skips a security setting is worse than one that does not start.
//!
//! This is the one place to shrink as features are implemented; keep
//! "Not yet available in this version" in `docs/configuration.md` in step with it.
//! Every feature of the format is implemented today, so the list is empty.

use super::Config;

pub(crate) fn unsupported_features(_c: &Config) -> Vec<String> {
    Vec::new()
}
