//! Inbound mail authentication (`[authentication]`, interface: "Mail authentication"): SPF
//! (RFC 7208), DKIM verification (RFC 6376, RFC 8463) and DMARC (RFC 7489) for mail from
//! clients that are neither trusted nor authenticated, the one `Authentication-Results:`
//! field that says what was found (RFC 8601), and what the results may refuse.
//!
//! Use: build one [`Checker`] per configuration; per message, [`Checker::check`] on the
//! message as received, then act on [`Verdict::action`] and store [`Verdict::rewrite`]
//! (our field on top, forged ones with our authserv-id removed, [`strip_forged`]).
//!
//! What is mail-auth's and what is ours:
//! - SPF is ours ([`spf`]): RFC 7208 `check_host()` with every mechanism, modifier and
//!   macro (5, 6, 7), a permerror for any syntax error (4.6, 12), and the limits of 4.6.4:
//!   10 terms that query DNS, 2 void lookups, 10 names per `mx` and `ptr`, and a 20 s
//!   budget past which the result is temperror. Its lookups go through `crate::dns`
//!   (hickory, whose bounded cache keeps each answer within its TTL, capped).
//! - DKIM is mail-auth's `verify_dkim`, over a resolver built like Postern's own
//!   ([`crate::dns::build`]: `delivery.dns_servers` or the system's, the same timeouts),
//!   with its key records kept in a bounded TTL cache ([`cache`]). SPF and DKIM run
//!   concurrently for one message.
//! - DMARC is ours ([`dmarc`]): mail-auth 0.13 implements DMARCbis (RFC 9989), whose
//!   organisational domain comes from a DNS tree walk and which has no `pct`; the issue
//!   and the contract ask for RFC 7489 with the Public Suffix List shipped, so the
//!   organisational domain is the `psl` crate's (the list compiled in), the `_dmarc`
//!   record is looked up through `crate::dns` (hickory's bounded cache, TTLs capped) and
//!   parsed here.
//!
//! Results never turn a DNS failure into a refusal: SPF or DKIM temperror makes DMARC
//! temperror whenever the failed check could have aligned, and only "fail" is enforced.

pub mod cache;
pub mod dmarc;
pub mod header;
pub mod spf;

#[cfg(test)]
mod tests;

use std::net::IpAddr;

use mail_auth::{
    AuthenticatedMessage, DkimOutput, DkimResult, DnsError, Error as AuthError,
    MessageAuthenticator, Parameters, Txt,
};
use postern_smtp::{Reply, catalogue};

use crate::config::{Authentication, Config};
use cache::TtlCache;
use dmarc::{Policy, Record, aligned, organizational_domain};
pub use header::strip_forged;
use spf::SpfResult;

/// DKIM key records kept. The few hundred bytes of a TXT answer times this bounds what
/// senders can make us hold.
pub const CACHE_ENTRIES: usize = 4096;

/// Signatures verified per message; the rest are reported as not verified. Each costs a
/// key lookup and a public-key operation, and a sender can add as many as it likes.
pub const MAX_SIGNATURES: usize = 10;

/// The longest all the checks of one message may take.
const CHECK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// The longest one SPF evaluation may take; past it the result is temperror (slow DNS is
/// a temporary condition, RFC 7208 2.6.7, and must not become a permerror that DMARC could
/// refuse on).
const SPF_BUDGET: std::time::Duration = std::time::Duration::from_secs(20);

/// What the session knows about the client, for SPF (RFC 7208 4.1 `check_host()`).
#[derive(Debug, Clone, Copy)]
pub struct ClientFacts<'a> {
    /// The client's address (`<ip>`).
    pub ip: IpAddr,
    /// The EHLO/HELO argument (`<helo>`; the identity checked for `<>`).
    pub helo: &'a str,
    /// The MAIL FROM address, `local@domain`; `None` for the null reverse-path `<>`.
    pub mail_from: Option<&'a str>,
    /// Our own name: the `%{r}` macro, and the authserv-id of our field.
    pub hostname: &'a str,
}

/// One check's result, by its RFC 8601 name (2.7.1 DKIM, 2.7.2 SPF, RFC 7489 11.2 DMARC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::SoftFail => "softfail",
            Outcome::Neutral => "neutral",
            Outcome::None => "none",
            Outcome::TempError => "temperror",
            Outcome::PermError => "permerror",
        }
    }
}

/// What the results do to the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Accept,
    /// Refuse at the end of DATA with this reply (nothing queued).
    Reject(Reply),
    /// Accept (250) and hold in the quarantine, for this reason.
    Quarantine(String),
}

/// Everything [`Checker::check`] found about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Our `Authentication-Results:` field, CRLF-terminated, to put on top.
    pub header: String,
    pub action: Action,
    /// Each check's result for the decision log; `None` when the check is off.
    pub spf: Option<Outcome>,
    pub dkim: Option<Outcome>,
    pub dmarc: Option<Outcome>,
    authserv_id: String,
}

impl Verdict {
    /// `spf=pass dkim=none dmarc=fail` for the decision log (`off` for a check not run).
    pub fn log_fields(&self) -> String {
        let w = |o: Option<Outcome>| o.map_or("off", Outcome::as_str);
        format!(
            "spf={} dkim={} dmarc={}",
            w(self.spf),
            w(self.dkim),
            w(self.dmarc)
        )
    }

    /// The message to store: our field, then `message` without forged fields.
    pub fn rewrite(&self, message: &[u8]) -> Vec<u8> {
        let rest = strip_forged(message, &self.authserv_id);
        let mut out = Vec::with_capacity(self.header.len() + rest.len());
        out.extend_from_slice(self.header.as_bytes());
        out.extend_from_slice(&rest);
        out
    }
}

/// The inbound checks of one configuration. `Send + Sync`; share it.
pub struct Checker {
    settings: Authentication,
    auth: MessageAuthenticator,
    resolver: crate::dns::Resolver,
    /// mail-auth's cache of DKIM key records (the only lookups it still makes).
    dkim_keys: TtlCache<Box<str>, Txt>,
}

/// SPF as evaluated.
struct Spf {
    result: SpfResult,
    /// The domain checked: MAIL FROM's, or the HELO name for `<>`.
    domain: String,
    helo_identity: bool,
    /// For permerror and temperror: what went wrong.
    detail: Option<String>,
}

/// DMARC as evaluated.
struct Dmarc {
    outcome: Outcome,
    from: Option<String>,
    /// The policy that applies after `pct`, when the result is fail.
    applied: Option<Policy>,
    reason: Option<String>,
}

impl Checker {
    /// Checks as `config.authentication` says, asking `config.delivery.dns_servers` (or
    /// the system's resolvers when empty).
    pub fn new(config: &Config) -> Result<Checker, String> {
        let hickory = crate::dns::build(&config.delivery.dns_servers)
            .map_err(|e| format!("cannot set up DNS for the inbound checks: {e}"))?;
        Ok(Checker {
            settings: config.authentication,
            auth: MessageAuthenticator(hickory.clone()),
            resolver: crate::dns::Resolver::from_hickory(hickory),
            dkim_keys: TtlCache::new(CACHE_ENTRIES),
        })
    }

    /// The settings it checks with.
    pub fn settings(&self) -> Authentication {
        self.settings
    }

    /// Runs the configured checks on `message` (header and body as received, CRLF lines,
    /// before [`strip_forged`]) from the client described by `facts`.
    /// All the checks of one message take at most [`CHECK_DEADLINE`]: a client whose
    /// message names ten signatures with unresponsive selectors must not hold its session
    /// (and its body's memory) for minutes. Past it, every check is temperror (the DNS
    /// did not answer in time), which never refuses.
    pub async fn check(&self, facts: &ClientFacts<'_>, message: &[u8]) -> Verdict {
        match tokio::time::timeout(CHECK_DEADLINE, self.check_all(facts, message)).await {
            Ok(v) => v,
            Err(_) => self.timed_out(facts),
        }
    }

    fn timed_out(&self, facts: &ClientFacts<'_>) -> Verdict {
        let s = self.settings;
        let mut h = header::Builder::new(facts.hostname);
        let why = Some("DNS did not answer in time");
        let mut result = |on: bool, method: &str| {
            on.then(|| {
                h.result(method, Outcome::TempError.as_str(), why, &[]);
                Outcome::TempError
            })
        };
        let (spf, dkim, dmarc) = (
            result(s.spf, "spf"),
            result(s.dkim, "dkim"),
            result(s.dmarc, "dmarc"),
        );
        Verdict {
            header: h.finish(),
            action: Action::Accept,
            spf,
            dkim,
            dmarc,
            authserv_id: facts.hostname.to_string(),
        }
    }

    async fn check_all(&self, facts: &ClientFacts<'_>, message: &[u8]) -> Verdict {
        let s = self.settings;
        let mut parsed = if s.dkim {
            AuthenticatedMessage::parse(message)
        } else {
            None
        };
        // At most MAX_SIGNATURES results in all: mail-auth reports every malformed
        // DKIM-Signature field (`errors`) as a result of its own too, and a message with
        // thousands of them must not make a field of hundreds of kilobytes.
        let unverified = parsed.as_mut().map_or(0, |m| {
            let n = m.dkim_headers.len().saturating_sub(MAX_SIGNATURES);
            m.dkim_headers.truncate(MAX_SIGNATURES);
            let room = MAX_SIGNATURES - m.dkim_headers.len();
            let dropped = m.errors.len().saturating_sub(room);
            m.errors.truncate(room);
            n + dropped
        });
        let (spf, dkim) = tokio::join!(
            async {
                if s.spf {
                    Some(self.spf(facts).await)
                } else {
                    None
                }
            },
            async {
                match &parsed {
                    Some(m) => {
                        let params = Parameters::new(m).with_txt_cache(&self.dkim_keys);
                        self.auth.verify_dkim(params).await
                    }
                    None => Vec::new(),
                }
            }
        );
        let dmarc = if s.dmarc {
            Some(self.dmarc(message, spf.as_ref(), &dkim).await)
        } else {
            None
        };

        let mut h = header::Builder::new(facts.hostname);
        let spf_outcome = spf.as_ref().map(|spf| {
            let outcome = spf_outcome(spf.result);
            let reason = spf_reason(spf, facts.ip);
            let prop = if spf.helo_identity {
                "smtp.helo"
            } else {
                "smtp.mailfrom"
            };
            h.result(
                "spf",
                outcome.as_str(),
                reason.as_deref(),
                &[(prop, &spf.domain)],
            );
            outcome
        });
        let dkim_outcome = s.dkim.then(|| {
            if dkim.is_empty() {
                h.result("dkim", "none", None, &[]);
            }
            if unverified > 0 {
                let why =
                    format!("{unverified} more signatures not verified (at most {MAX_SIGNATURES})");
                h.result("dkim", "neutral", Some(&why), &[]);
            }
            for o in &dkim {
                let (outcome, reason) = dkim_outcome(o);
                let mut props = Vec::new();
                if let Some(sig) = o.signature() {
                    props.push(("header.d", sig.d.as_str()));
                    props.push(("header.s", sig.s.as_str()));
                }
                h.result("dkim", outcome.as_str(), reason.as_deref(), &props);
            }
            overall_dkim(&dkim)
        });
        let dmarc_outcome = dmarc.as_ref().map(|d| {
            let props: Vec<(&str, &str)> = d
                .from
                .as_deref()
                .map(|f| ("header.from", f))
                .into_iter()
                .collect();
            h.result("dmarc", d.outcome.as_str(), d.reason.as_deref(), &props);
            d.outcome
        });

        let action = self.action(spf.as_ref(), dmarc.as_ref(), facts.ip);
        Verdict {
            header: h.finish(),
            action,
            spf: spf_outcome,
            dkim: dkim_outcome,
            dmarc: dmarc_outcome,
            authserv_id: facts.hostname.to_string(),
        }
    }

    /// Enforcement (interface: `spf_reject`, `dmarc_enforce`). Only "fail" results act;
    /// temperror never does.
    fn action(&self, spf: Option<&Spf>, dmarc: Option<&Dmarc>, ip: IpAddr) -> Action {
        if self.settings.spf_reject
            && let Some(spf) = spf
            && spf.result == SpfResult::Fail
        {
            return Action::Reject(catalogue::spf_rejected(&spf.domain, ip));
        }
        if self.settings.dmarc_enforce
            && let Some(d) = dmarc
            && d.outcome == Outcome::Fail
            && let Some(from) = &d.from
        {
            match d.applied {
                Some(Policy::Reject) => return Action::Reject(catalogue::dmarc_rejected(from)),
                Some(Policy::Quarantine) => {
                    return Action::Quarantine(format!("DMARC policy of {from} says quarantine"));
                }
                _ => {}
            }
        }
        Action::Accept
    }

    /// RFC 7208 2.4: the MAIL FROM identity; for the null reverse-path, the HELO
    /// identity (2.3), checked as `postmaster@helo`.
    async fn spf(&self, facts: &ClientFacts<'_>) -> Spf {
        let helo_sender;
        let (sender, helo_identity) = match facts.mail_from {
            Some(from) => (from, false),
            None => {
                helo_sender = format!("postmaster@{}", facts.helo);
                (helo_sender.as_str(), true)
            }
        };
        let domain = sender.rsplit_once('@').map_or(sender, |(_, d)| d);
        let request = spf::Request {
            ip: facts.ip.to_canonical(),
            domain,
            sender,
            helo: facts.helo,
            receiver: facts.hostname,
        };
        let out = spf::check_host(&self.resolver, &request, SPF_BUDGET).await;
        Spf {
            result: out.result,
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            helo_identity,
            detail: out.detail,
        }
    }

    /// RFC 7489 6.6: policy discovery, identifier alignment, the result and the policy
    /// that applies.
    async fn dmarc(&self, message: &[u8], spf: Option<&Spf>, dkim: &[DkimOutput<'_>]) -> Dmarc {
        // 6.6.1: exactly one From: domain; otherwise DMARC does not apply.
        let from = match crate::dkim::sign::from_domain(message) {
            Ok(d) => d,
            Err(why) => {
                return Dmarc {
                    outcome: Outcome::None,
                    from: None,
                    applied: None,
                    reason: Some(why),
                };
            }
        };
        let (record, found_at) = match self.dmarc_record(&from).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                return Dmarc {
                    outcome: Outcome::None,
                    from: Some(from),
                    applied: None,
                    reason: None,
                };
            }
            Err(why) => {
                return Dmarc {
                    outcome: Outcome::TempError,
                    from: Some(from),
                    applied: None,
                    reason: Some(why),
                };
            }
        };
        let pass = |d: &str, mode| aligned(&d.to_ascii_lowercase(), &from, mode);
        // 4.2: a pass of either, aligned (3.1), is a DMARC pass.
        let spf_aligned = spf.is_some_and(|s| pass(&s.domain, record.aspf));
        let spf_ok = spf_aligned && spf.is_some_and(|s| s.result == SpfResult::Pass);
        let dkim_ok = dkim.iter().any(|o| {
            *o.result() == DkimResult::Pass
                && o.signature().is_some_and(|s| pass(&s.d, record.adkim))
        });
        if spf_ok || dkim_ok {
            return Dmarc {
                outcome: Outcome::Pass,
                from: Some(from),
                applied: None,
                reason: None,
            };
        }
        // A check that failed for DNS reasons might have passed: no verdict (RFC 7489
        // 6.6.2 leaves it to the receiver; a temporary failure must not reject).
        let spf_temp = spf_aligned && spf.is_some_and(|s| s.result == SpfResult::TempError);
        let dkim_temp = dkim.iter().any(|o| {
            matches!(o.result(), DkimResult::TempError(_))
                && o.signature().is_some_and(|s| pass(&s.d, record.adkim))
        });
        if spf_temp || dkim_temp {
            return Dmarc {
                outcome: Outcome::TempError,
                reason: Some(format!(
                    "an {} check that could align with {from} failed temporarily",
                    if spf_temp { "SPF" } else { "DKIM" }
                )),
                from: Some(from),
                applied: None,
            };
        }
        // 6.6.3, 6.3: sp= for a subdomain whose policy came from its organisational
        // domain; 6.6.4: pct, the rest get the next less strict policy.
        let requested = if found_at == from {
            record.p
        } else {
            record.sp
        };
        let sampled = record.pct >= 100 || rand::random_range(0..100u8) < record.pct;
        let applied = if sampled {
            requested
        } else {
            requested.weaker()
        };
        let mut reason = format!(
            "no SPF or DKIM pass aligned with {from}; its DMARC policy is {}",
            requested.as_str()
        );
        if !sampled {
            reason.push_str(&format!(
                " (pct={}: this message not sampled, treated as {})",
                record.pct,
                applied.as_str()
            ));
        }
        Dmarc {
            outcome: Outcome::Fail,
            from: Some(from),
            applied: Some(applied),
            reason: Some(reason),
        }
    }

    /// RFC 7489 6.6.3: `_dmarc.FROM`, else `_dmarc.ORGANISATIONAL-DOMAIN`; the record and
    /// the domain it was found at. `Ok(None)`: no policy (none published, several, or one
    /// without a usable `p`). `Err`: DNS failed temporarily.
    async fn dmarc_record(&self, from: &str) -> Result<Option<(Record, String)>, String> {
        let org = organizational_domain(from);
        let mut names = vec![from];
        if org != from {
            names.push(org);
        }
        for name in names {
            let query = format!("_dmarc.{name}");
            let texts = match self.resolver.txt(&query).await {
                Ok(t) => t,
                Err(crate::dns::ResolveError::Temporary(why)) => {
                    return Err(format!("DNS lookup of {query} failed: {why}"));
                }
                Err(_) => Vec::new(),
            };
            let found: Vec<&String> = texts.iter().filter(|t| dmarc::is_dmarc(t)).collect();
            match found.as_slice() {
                [] => continue,
                [one] => return Ok(dmarc::parse(one).map(|r| (r, name.to_string()))),
                _ => return Ok(None),
            }
        }
        Ok(None)
    }
}

fn spf_outcome(r: SpfResult) -> Outcome {
    match r {
        SpfResult::Pass => Outcome::Pass,
        SpfResult::Fail => Outcome::Fail,
        SpfResult::SoftFail => Outcome::SoftFail,
        SpfResult::Neutral => Outcome::Neutral,
        SpfResult::None => Outcome::None,
        SpfResult::TempError => Outcome::TempError,
        SpfResult::PermError => Outcome::PermError,
    }
}

/// A sentence for `reason=` where SPF did not pass (RFC 7208 8).
fn spf_reason(spf: &Spf, ip: IpAddr) -> Option<String> {
    let d = &spf.domain;
    let ip = ip.to_canonical();
    match spf.result {
        SpfResult::Fail => Some(format!("{ip} is not allowed by {d}'s SPF record")),
        SpfResult::SoftFail => Some(format!(
            "{ip} is not allowed by {d}'s SPF record (softfail: ~all)"
        )),
        SpfResult::TempError => Some(match &spf.detail {
            Some(why) => {
                format!("a DNS lookup failed temporarily while evaluating {d}'s SPF record ({why})")
            }
            None => format!("a DNS lookup failed temporarily while evaluating {d}'s SPF record"),
        }),
        SpfResult::PermError => Some(format!(
            "{d}'s SPF record cannot be evaluated: {}",
            spf.detail
                .as_deref()
                .unwrap_or("a syntax error, or too many DNS lookups (RFC 7208 4.6)")
        )),
        SpfResult::Pass | SpfResult::Neutral | SpfResult::None => None,
    }
}

/// One signature's result and its reason (RFC 8601 2.7.1). mail-auth calls a body hash
/// mismatch "neutral"; RFC 6376 6.1.3 makes it a verification failure, so it is "fail".
fn dkim_outcome(o: &DkimOutput<'_>) -> (Outcome, Option<String>) {
    let key = o
        .signature()
        .map(|s| format!("{}._domainkey.{}", s.s, s.d))
        .unwrap_or_default();
    match o.result() {
        DkimResult::Pass => (Outcome::Pass, None),
        DkimResult::None => (Outcome::None, None),
        DkimResult::Neutral(AuthError::Dkim(mail_auth::dkim::DkimError::FailedBodyHashMatch)) => (
            Outcome::Fail,
            Some("the body hash does not match: the body changed after signing".to_string()),
        ),
        DkimResult::Neutral(e) => (Outcome::Neutral, Some(e.to_string())),
        DkimResult::Fail(e) => (
            Outcome::Fail,
            Some(format!("the signature does not verify: {e}")),
        ),
        DkimResult::PermError(AuthError::Dns(
            DnsError::RecordNotFound(_) | DnsError::InvalidRecordType,
        )) => (Outcome::PermError, Some(format!("no usable key at {key}"))),
        DkimResult::PermError(e) => (Outcome::PermError, Some(e.to_string())),
        DkimResult::TempError(_) => (
            Outcome::TempError,
            Some(format!("DNS lookup of {key} failed temporarily")),
        ),
    }
}

/// One word for all signatures, for the log: pass if one passed, else the most telling.
fn overall_dkim(outputs: &[DkimOutput<'_>]) -> Outcome {
    let all: Vec<Outcome> = outputs.iter().map(|o| dkim_outcome(o).0).collect();
    [
        Outcome::Pass,
        Outcome::Fail,
        Outcome::TempError,
        Outcome::PermError,
        Outcome::Neutral,
    ]
    .into_iter()
    .find(|o| all.contains(o))
    .unwrap_or(Outcome::None)
}
