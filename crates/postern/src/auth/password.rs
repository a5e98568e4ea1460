//! Password hashing and checking with Argon2id (the `argon2` crate, PHC strings).
//!
//! New hashes use the crate's default parameters, the OWASP recommendation for Argon2id:
//! 19 MiB of memory (m=19456 KiB), 2 passes (t=2), 1 lane (p=1), a 16-byte random salt
//! from the operating system, a 32-byte output. Checking uses the parameters written in
//! each hash, so a file may mix hashes made with other parameters.
//!
//! Everything here is CPU-heavy on purpose (tens of milliseconds per call in a release
//! build): the server calls it only from blocking threads, never on the async executor.
//!
//! Trust: passwords come from hostile clients and are only ever handed to Argon2; hashes
//! come from the operator's users file, already checked by [`check_hash`].

use std::sync::OnceLock;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, Params};

use super::AuthError;

/// Hash `password` with Argon2id and a fresh random salt, as a PHC string
/// (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`).
pub fn hash(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Whether `password` matches the PHC string `phc`. A hash that does not parse never
/// matches (the users file is checked at load, so that does not happen in practice).
pub fn verify(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Check that `phc` is an argon2id PHC string with usable parameters, a salt and a hash.
/// The reason returned never quotes `phc` (it may be a plain password pasted by mistake).
pub fn check_hash(phc: &str) -> Result<(), String> {
    if phc.is_empty() {
        return Err("the field is empty".into());
    }
    let parsed = PasswordHash::new(phc).map_err(|_| "not a PHC string".to_string())?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err("another algorithm".into());
    }
    Params::try_from(&parsed).map_err(|e| format!("bad parameters: {e}"))?;
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err("salt or hash missing".into());
    }
    Ok(())
}

/// A hash of a random password, made once, with the default parameters. An unknown user
/// name is checked against it, so that answering costs the same time as for a known one
/// and the timing does not tell which names exist.
pub fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let random = SaltString::generate(&mut OsRng);
        hash(random.as_str()).unwrap_or_else(|_| {
            // Hashing with the default parameters cannot fail; should it, a hash that
            // matches nothing keeps unknown names failing (only the timing differs).
            String::new()
        })
    })
}

/// A hash with the smallest parameters Argon2 allows: for tests, where the default
/// parameters would make every test slow.
#[cfg(test)]
pub fn hash_cheap(password: &str) -> String {
    let params = Params::new(Params::MIN_M_COST, 1, 1, None).expect("valid parameters");
    let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut OsRng);
    argon
        .hash_password(password.as_bytes(), &salt)
        .expect("hashing works")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hash_verifies_and_salts() {
        let h = hash_cheap("correct horse");
        assert!(h.starts_with("$argon2id$v=19$"), "{h}");
        assert!(check_hash(&h).is_ok());
        assert!(verify("correct horse", &h));
        assert!(!verify("correct horse ", &h));
        assert!(!verify("", &h));
        assert_ne!(h, hash_cheap("correct horse"), "a fresh salt each time");
        assert!(!verify("x", "not a hash"));
    }

    #[test]
    fn password_default_parameters_are_documented_ones() {
        let h = hash("pw").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify("pw", &h));
        assert!(check_hash(dummy_hash()).is_ok());
        assert!(!verify("", dummy_hash()));
    }

    #[test]
    fn password_check_hash_refuses_other_things() {
        for bad in [
            "",
            "hunter2",
            "$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
            "$argon2d$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
            "$argon2id$v=19$m=1,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
            "$argon2id$v=19$m=16,t=2,p=1",
            "$2b$12$abcdefghijklmnopqrstuu",
        ] {
            let why = check_hash(bad).expect_err(bad);
            assert!(!why.contains("hunter2"));
        }
    }
}
