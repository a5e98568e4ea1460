//! DKIM (RFC 6376, RFC 8463 for Ed25519): the keys ([`key`]: load, make, publish, compare
//! with DNS) and signing accepted mail ([`sign`]). The cryptography and canonicalisation
//! are mail-auth's; what is signed, when, and with which key is decided here.

pub mod key;
pub mod sign;

pub use sign::{Signed, Signer};
