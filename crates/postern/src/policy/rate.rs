//! `[[rate_limit]]`: messages and recipients per user, client address, sender or sender
//! domain, each limit in its own sliding window (interface: "Rate limits and shared
//! state"; the window arithmetic and the memory bound are `policy::window`'s).
//!
//! **When it counts.** A message is taken at MAIL, when the sender is known: the MAIL
//! that would exceed a limit gets 451 4.7.1, and a taken message that does not end in
//! 250 (RSET, a refused or failed DATA, a client gone) is given back, so what stays
//! counted is what was accepted. Taking at MAIL, not at 250, is what holds the limit
//! when fifty sessions of one user send at once: they cannot all pass a check and then
//! all be counted. A recipient is taken at the RCPT that the policy accepted (after the
//! relay rules, before the milters: a milter that refuses it gives it back); the RCPT
//! that would exceed gets 451 4.7.1. It stays counted whatever becomes of the
//! transaction, unless the message is answered 4xx at its end ([`RecipientHolds`]). Deferring, never refusing, is the rule: a client
//! over its limit retries later and nothing bounces.
//!
//! **Which limits.** Every limit whose `clients` match the session, in file order; a
//! limit counts only if all the limits before it allowed (nothing is taken from a limit
//! for a message another one refused). Mail Postern makes itself (DSNs) never passes
//! through a session, so it is never counted.
//!
//! **Keys.** `user`: the authenticated name as the users file has it; `client_ip`: the
//! address, IPv6 per `ipv6_prefix` block (one site, one key); `sender`: the MAIL FROM
//! address, the local part in lower case and the domain in A-label form (changing case
//! or script buys no fresh count); `sender_domain`: that domain; the null sender is the
//! key `<>` of both.
//!
//! **Shared.** With `[cluster]` and Redis up, the counts that decide are Redis's
//! (`crate::cluster`, the same window arithmetic on Redis's clock): all the limits of one
//! MAIL or RCPT are taken in one atomic round trip, all or none, and given back in one.
//! The local tables record what Redis allowed as well, so when Redis goes away (down, or
//! slower than `[cluster] timeout`) this node goes on counting from what it has seen
//! itself: then each node allows up to the limit on its own.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postern_smtp::{Domain, ReversePath};

use super::client_block;
use super::window::{Bucket, DEFAULT_CAPACITY, Table};
use crate::cluster::{Cluster, Taken as SharedTaken, WindowCounter};
use crate::config::{RateClients, RateKey, RateLimit};

/// Who is sending, as far as rate limits are concerned.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub ip: IpAddr,
    /// In `trusted_networks`.
    pub trusted: bool,
    /// The authenticated name, if the session authenticated.
    pub user: Option<&'a str>,
    pub sender: &'a ReversePath,
}

/// What a limit counts: messages or recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counted {
    Messages,
    Recipients,
}

impl Counted {
    pub fn as_str(self) -> &'static str {
        match self {
            Counted::Messages => "messages",
            Counted::Recipients => "recipients",
        }
    }
}

/// A limit that said no: for the log line and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub limit: String,
    pub key: String,
    pub counted: Counted,
    /// The limit's value and window.
    pub max: u64,
    pub window: Duration,
}

/// One configured limit and its counters. The counters outlive a reload that keeps the
/// limit's name, clients, key and window (`RateLimits::new`).
#[derive(Debug)]
struct Limit {
    config: RateLimit,
    table: Arc<Mutex<Table>>,
}

impl Limit {
    fn table(&self) -> MutexGuard<'_, Table> {
        // Plain counters: consistent after any panic elsewhere, keep going.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn applies(&self, who: &Who<'_>) -> bool {
        match self.config.clients {
            RateClients::Any => true,
            RateClients::Authenticated => who.user.is_some(),
            RateClients::Trusted => who.trusted,
            RateClients::Untrusted => !who.trusted && who.user.is_none(),
        }
    }

    fn max(&self, counted: Counted) -> Option<u64> {
        match counted {
            Counted::Messages => self.config.messages,
            Counted::Recipients => self.config.recipients,
        }
    }

    /// This limit's key for `who`; `None` when it has none (no user name).
    fn key(&self, who: &Who<'_>, ipv6_prefix: u8) -> Option<String> {
        Some(match self.config.per {
            RateKey::User => who.user?.to_string(),
            RateKey::ClientIp => client_block(who.ip, ipv6_prefix).to_string(),
            RateKey::Sender => match who.sender {
                ReversePath::Null => "<>".to_string(),
                ReversePath::Mailbox(a) => {
                    // The local part as written on the wire (quoted if it needs it, so the
                    // key reads unambiguously in a log line), in lower case.
                    let written = a.to_string();
                    let local = written.rsplit_once('@').map_or("", |(l, _)| l);
                    format!("{}@{}", local.to_lowercase(), domain_key(a.domain()))
                }
            },
            RateKey::SenderDomain => match who.sender {
                ReversePath::Null => "<>".to_string(),
                ReversePath::Mailbox(a) => domain_key(a.domain()),
            },
        })
    }
}

fn domain_key(d: &Domain) -> String {
    match d.ascii_name() {
        Some(name) => name.into_owned(),
        None => d.to_string(),
    }
}

/// What one session took from the limits: given back when dropped, unless kept.
#[derive(Debug, Default)]
#[must_use = "dropping a hold gives back what it took"]
pub struct Hold {
    taken: Vec<Taken>,
    /// What Redis counted.
    shared: Option<SharedHold>,
}

/// The Redis part of a hold: the client, and each counter's key and bucket.
#[derive(Debug)]
struct SharedHold {
    cluster: Arc<Cluster>,
    counted: Vec<(String, i64)>,
}

#[derive(Debug)]
struct Taken {
    table: Arc<Mutex<Table>>,
    counted: Counted,
    key: String,
    bucket: Bucket,
}

impl Hold {
    /// What was taken stays counted (the message got its 250).
    pub fn keep(mut self) {
        self.taken.clear();
        self.shared = None;
    }

    /// Nothing was taken (no limit applied).
    pub fn is_empty(&self) -> bool {
        self.taken.is_empty()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        for t in self.taken.drain(..) {
            let mut table = t.table.lock().unwrap_or_else(|p| p.into_inner());
            table.refund(&(t.counted, t.key.as_str()), t.bucket, 1);
        }
        if let Some(shared) = self.shared.take() {
            shared.give_back();
        }
    }
}

impl SharedHold {
    /// Gives Redis its part back, off the session's path (one call, bounded like every
    /// call; lost if Redis does not answer, which errs towards refusing).
    fn give_back(self) {
        let SharedHold { cluster, counted } = self;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let given: Vec<(&str, i64, u64)> =
                    counted.iter().map(|(k, b)| (k.as_str(), *b, 1)).collect();
                cluster.window_give_back(&given).await;
            });
        }
    }
}

/// The recipients one transaction took: counted at RCPT 250, and they stay counted when
/// the transaction ends without a message (RSET, a client gone) or with a refused one, so
/// that harvesting addresses with RSET between gets no fresh count. The one exception is
/// a message answered 4xx at its end (a full disk, a milter's tempfail): the client will
/// send the same recipients again, and they must not count twice.
#[derive(Debug, Default)]
pub struct RecipientHolds(Vec<Hold>);

impl RecipientHolds {
    pub fn push(&mut self, hold: Hold) {
        self.0.push(hold);
    }

    /// The transaction is over: what it took stays counted.
    pub fn settle(&mut self) {
        for hold in self.0.drain(..) {
            hold.keep();
        }
    }

    /// The message got a 4xx at its end: give its recipients back (to Redis in one
    /// call, however many there were).
    pub fn give_back(&mut self) {
        let mut batch: Option<SharedHold> = None;
        for mut hold in self.0.drain(..) {
            if let Some(shared) = hold.shared.take() {
                match &mut batch {
                    Some(b) if Arc::ptr_eq(&b.cluster, &shared.cluster) => {
                        b.counted.extend(shared.counted)
                    }
                    _ => {
                        if let Some(other) = batch.replace(shared) {
                            other.give_back();
                        }
                    }
                }
            }
            // The local counts are given back as the hold drops.
        }
        if let Some(b) = batch {
            b.give_back();
        }
    }
}

impl Drop for RecipientHolds {
    fn drop(&mut self) {
        self.settle();
    }
}

/// Every `[[rate_limit]]` of a configuration.
#[derive(Default)]
pub struct RateLimits {
    limits: Vec<Limit>,
    ipv6_prefix: u8,
    /// `[cluster]`: the counts are Redis's while it answers.
    cluster: Option<Arc<Cluster>>,
}

/// The clock: tokio's, so that tests with paused time control it too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl RateLimits {
    /// The limits of a configuration; with `previous` (a reload) a limit whose name,
    /// clients, key and window are unchanged keeps what it has counted.
    pub fn new(limits: &[RateLimit], ipv6_prefix: u8, previous: Option<&RateLimits>) -> Self {
        RateLimits::shared(limits, ipv6_prefix, previous, None)
    }

    /// [`RateLimits::new`], counting in Redis through `cluster` while it answers.
    pub fn shared(
        limits: &[RateLimit],
        ipv6_prefix: u8,
        previous: Option<&RateLimits>,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        let limits = limits
            .iter()
            .map(|config| {
                let kept = previous.and_then(|p| {
                    p.limits.iter().find(|old| {
                        let o = &old.config;
                        o.name == config.name
                            && o.clients == config.clients
                            && o.per == config.per
                            && o.window == config.window
                    })
                });
                Limit {
                    config: config.clone(),
                    table: match kept {
                        Some(old) => Arc::clone(&old.table),
                        None => Arc::new(Mutex::new(Table::new(
                            config.window,
                            DEFAULT_CAPACITY,
                            now(),
                        ))),
                    },
                }
            })
            .collect();
        RateLimits {
            limits,
            ipv6_prefix,
            cluster,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Takes one message (at MAIL) or one recipient (at an accepted RCPT) from every
    /// limit that applies to `who`; on the first that would exceed, gives back what the
    /// others took and says which. With `[cluster]` up, Redis decides (one round trip,
    /// at most `[cluster] timeout`); otherwise, or when it does not answer, this node.
    pub async fn take(&self, counted: Counted, who: &Who<'_>) -> Result<Hold, Exceeded> {
        let wanted: Vec<(&Limit, String, u64)> = self
            .counting(who)
            .into_iter()
            .filter_map(|(l, key)| Some((l, key, l.max(counted)?)))
            .collect();
        if wanted.is_empty() {
            return Ok(Hold::default());
        }
        if let Some(cluster) = self.cluster.as_ref().filter(|c| c.is_up()) {
            // What this node counted itself is a part of what Redis should hold, except
            // what it counted while Redis was away (or what a Redis that restarted
            // empty forgot): that still counts here, so a node never lets more through
            // than it would alone.
            let now = now();
            for (limit, key, max) in &wanted {
                if limit.table().count(&(counted, key.as_str()), now) >= *max {
                    return Err(exceeded(limit, key, counted, *max));
                }
            }
            let keys: Vec<String> = wanted
                .iter()
                .map(|(l, key, _)| shared_key(l, counted, key))
                .collect();
            let counters: Vec<WindowCounter<'_>> = wanted
                .iter()
                .zip(&keys)
                .map(|((l, _, max), key)| WindowCounter {
                    key,
                    window: l.config.window,
                    limit: *max,
                    amount: 1,
                })
                .collect();
            match cluster.window_take(&counters).await {
                Some(SharedTaken::Added(buckets)) => {
                    let mut hold = self.record(counted, &wanted);
                    hold.shared = Some(SharedHold {
                        cluster: Arc::clone(cluster),
                        counted: keys.into_iter().zip(buckets).collect(),
                    });
                    return Ok(hold);
                }
                Some(SharedTaken::Over { index, .. }) => {
                    let (l, key, max) = &wanted[index.min(wanted.len() - 1)];
                    return Err(exceeded(l, key, counted, *max));
                }
                None => {} // down or slow: this node counts
            }
        }
        let mut hold = Hold::default();
        let now = now();
        for (limit, key, max) in wanted {
            match limit.table().add(&(counted, key.as_str()), max, 1, now) {
                Ok(bucket) => hold.taken.push(Taken {
                    table: Arc::clone(&limit.table),
                    counted,
                    key,
                    bucket,
                }),
                Err(_) => return Err(exceeded(limit, &key, counted, max)),
            }
        }
        Ok(hold)
    }

    /// Records in the local tables what Redis allowed.
    fn record(&self, counted: Counted, wanted: &[(&Limit, String, u64)]) -> Hold {
        let now = now();
        let taken = wanted
            .iter()
            .map(|(limit, key, _)| Taken {
                table: Arc::clone(&limit.table),
                counted,
                bucket: limit.table().record(&(counted, key.as_str()), 1, now),
                key: key.clone(),
            })
            .collect();
        Hold {
            taken,
            shared: None,
        }
    }

    /// The limits that would count `who`, for `postern check-policy`: name and key.
    pub fn applying(&self, who: &Who<'_>) -> Vec<(&str, String)> {
        self.counting(who)
            .into_iter()
            .map(|(l, key)| (l.config.name.as_str(), key))
            .collect()
    }

    /// The limits whose clients `who` is, each with its key for `who`.
    fn counting(&self, who: &Who<'_>) -> Vec<(&Limit, String)> {
        self.limits
            .iter()
            .filter(|l| l.applies(who))
            .filter_map(|l| Some((l, l.key(who, self.ipv6_prefix)?)))
            .collect()
    }
}

/// The Redis key of a limit's counter: the limit's name, what it counts, its clients,
/// key kind and window (a change of any of them is a new counter, as it is locally),
/// then the key.
fn shared_key(limit: &Limit, counted: Counted, key: &str) -> String {
    let c = &limit.config;
    format!(
        "rl:{}:{}:{}:{}:{}:{key}",
        c.name,
        match counted {
            Counted::Messages => "m",
            Counted::Recipients => "r",
        },
        c.clients.as_str(),
        c.per.as_str(),
        crate::config::format_duration(c.window),
    )
}

fn exceeded(limit: &Limit, key: &str, counted: Counted, max: u64) -> Exceeded {
    Exceeded {
        limit: limit.config.name.clone(),
        key: key.to_string(),
        counted,
        max,
        window: limit.config.window,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(name: &str, clients: RateClients, per: RateKey, messages: u64) -> RateLimit {
        RateLimit {
            name: name.to_string(),
            clients,
            per,
            messages: Some(messages),
            recipients: None,
            window: Duration::from_secs(60),
        }
    }

    fn sender(s: &str) -> ReversePath {
        ReversePath::Mailbox(postern_smtp::address::parse_mailbox(s).expect("address"))
    }

    fn who<'a>(ip: &str, user: Option<&'a str>, sender: &'a ReversePath) -> Who<'a> {
        Who {
            ip: ip.parse().unwrap(),
            trusted: ip.starts_with("10."),
            user,
            sender,
        }
    }

    #[tokio::test]
    async fn rate_counts_per_key_and_gives_back_what_was_not_kept() {
        let limits = RateLimits::new(
            &[limit("users", RateClients::Authenticated, RateKey::User, 2)],
            64,
            None,
        );
        let from = sender("bob@example.com");
        let bob = who("192.0.2.1", Some("bob"), &from);
        limits.take(Counted::Messages, &bob).await.unwrap().keep();
        let held = limits.take(Counted::Messages, &bob).await.unwrap();
        let over = limits.take(Counted::Messages, &bob).await.unwrap_err();
        assert_eq!((over.limit.as_str(), over.key.as_str()), ("users", "bob"));
        drop(held); // that message never got its 250
        limits.take(Counted::Messages, &bob).await.unwrap().keep();
        limits.take(Counted::Messages, &bob).await.unwrap_err();
        // Another user, and a client that did not authenticate, are not bob.
        let alice = who("192.0.2.1", Some("alice"), &from);
        limits.take(Counted::Messages, &alice).await.unwrap().keep();
        let anon = who("192.0.2.1", None, &from);
        assert!(
            limits
                .take(Counted::Messages, &anon)
                .await
                .unwrap()
                .is_empty()
        );
        // The limit counts messages only.
        assert!(
            limits
                .take(Counted::Recipients, &bob)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn rate_a_refusal_gives_back_what_earlier_limits_took() {
        let limits = RateLimits::new(
            &[
                limit("ip", RateClients::Any, RateKey::ClientIp, 2),
                limit("sender", RateClients::Any, RateKey::Sender, 1),
            ],
            64,
            None,
        );
        let (bob, bob_again) = (sender("bob@example.com"), sender("Bob@Example.COM"));
        let (carol, dave) = (sender("carol@example.com"), sender("dave@example.com"));
        let ip = "192.0.2.1";
        limits
            .take(Counted::Messages, &who(ip, None, &bob))
            .await
            .unwrap()
            .keep();
        let over = limits
            .take(Counted::Messages, &who(ip, None, &bob_again))
            .await
            .unwrap_err();
        assert_eq!(
            (over.limit.as_str(), over.key.as_str()),
            ("sender", "bob@example.com")
        );
        // The address limit took nothing for that refused message: carol still fits.
        limits
            .take(Counted::Messages, &who(ip, None, &carol))
            .await
            .unwrap()
            .keep();
        let over = limits
            .take(Counted::Messages, &who(ip, None, &dave))
            .await
            .unwrap_err();
        assert_eq!(over.limit, "ip");
    }

    #[tokio::test]
    async fn rate_keys_ipv6_blocks_domains_and_the_null_sender() {
        let limits = RateLimits::new(
            &[
                limit("ip", RateClients::Untrusted, RateKey::ClientIp, 1),
                limit("dom", RateClients::Trusted, RateKey::SenderDomain, 1),
            ],
            64,
            None,
        );
        let null = ReversePath::Null;
        limits
            .take(Counted::Messages, &who("2001:db8::1", None, &null))
            .await
            .unwrap()
            .keep();
        let over = limits
            .take(Counted::Messages, &who("2001:db8::2", None, &null))
            .await
            .unwrap_err();
        assert_eq!(over.key, "2001:db8::");
        limits
            .take(Counted::Messages, &who("10.0.0.1", None, &null))
            .await
            .unwrap()
            .keep();
        assert_eq!(
            limits
                .take(Counted::Messages, &who("10.0.0.2", None, &null))
                .await
                .unwrap_err()
                .key,
            "<>"
        );
        let idn = sender("a@BÜCHER.example");
        let idn_key = limits.applying(&who("10.0.0.1", None, &idn));
        assert_eq!(idn_key, vec![("dom", "xn--bcher-kva.example".to_string())]);
    }

    #[tokio::test]
    async fn rate_recipients_stay_counted_unless_given_back() {
        let mut config = limit("rcpts", RateClients::Any, RateKey::ClientIp, 1);
        (config.messages, config.recipients) = (None, Some(2));
        let limits = RateLimits::new(&[config], 64, None);
        let from = sender("a@example.com");
        let a = who("192.0.2.1", None, &from);
        // A transaction's recipients, then a 4xx at the end: given back.
        let mut holds = RecipientHolds::default();
        holds.push(limits.take(Counted::Recipients, &a).await.unwrap());
        holds.push(limits.take(Counted::Recipients, &a).await.unwrap());
        limits.take(Counted::Recipients, &a).await.unwrap_err();
        holds.give_back();
        // Settled (RSET, a 250, a 5xx) or dropped (the client went away): kept.
        holds.push(limits.take(Counted::Recipients, &a).await.unwrap());
        holds.settle();
        let mut gone = RecipientHolds::default();
        gone.push(limits.take(Counted::Recipients, &a).await.unwrap());
        drop(gone);
        limits.take(Counted::Recipients, &a).await.unwrap_err();
    }

    #[tokio::test]
    async fn rate_a_reload_keeps_the_counts_of_an_unchanged_limit() {
        let mut config = vec![limit("users", RateClients::Authenticated, RateKey::User, 1)];
        let first = RateLimits::new(&config, 64, None);
        let from = sender("bob@example.com");
        let bob = who("192.0.2.1", Some("bob"), &from);
        first.take(Counted::Messages, &bob).await.unwrap().keep();
        // A new value judges what was counted: 1 of 2 used, one more fits.
        config[0].messages = Some(2);
        let second = RateLimits::new(&config, 64, Some(&first));
        second.take(Counted::Messages, &bob).await.unwrap().keep();
        second.take(Counted::Messages, &bob).await.unwrap_err();
        // Back to 1: the two counted are over it.
        config[0].messages = Some(1);
        let third = RateLimits::new(&config, 64, Some(&second));
        third.take(Counted::Messages, &bob).await.unwrap_err();
        // Another window is another limit: it starts at zero.
        config[0].window = Duration::from_secs(30);
        let fourth = RateLimits::new(&config, 64, Some(&third));
        fourth.take(Counted::Messages, &bob).await.unwrap().keep();
    }
}
