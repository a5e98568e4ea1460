//! The policy simulator behind `postern check-policy` and `postern self-test`: what would
//! a client be told, and why?
//!
//! Nothing is re-implemented here. Each question runs a real `postern_smtp::Session` in
//! memory, with the listener's settings (`session::Settings`, as `serve` derives them):
//! EHLO, AUTH when asked (answered "yes" without a password check), MAIL FROM and one
//! RCPT TO, exactly as the bytes would come from a socket. So the address is parsed by the
//! session's parser with the session's options (SMTPUTF8, `<Postmaster>` and our
//! postmaster address), MAIL FROM meets `require_tls` and `auth = "required"`, and the
//! recipient is decided by [`RecipientCheck::decide`], the function the server's
//! sessions call (relay policy, recipients file, `sender_not_owned`, `literal_is_us`
//! through `ourselves`). The "-> route" part comes from `delivery::route::next_hop`, the
//! function delivery uses; nothing is looked up in DNS. DNSBL listings come in from the
//! caller (`--dnsbl` looks them up; by default nobody is listed).
//!
//! Trust: the arguments are an operator's, but they become SMTP command lines, so any
//! control character in them is refused (it could smuggle in a second command).

use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use postern_smtp::server::{Peer, TlsInfo};
use postern_smtp::{Address, Event, Session, catalogue};

use crate::auth::{AuthError, Authenticator};
use crate::config::{AuthMode, Config, TlsMode};
use crate::delivery::route::{Destination, domain_of, next_hop};
use crate::ourselves::Ourselves;
use crate::policy::rate::{RateLimits, Who};
use crate::policy::tricks::{self, TRICKS, Targets};
use crate::policy::{Client, Decision, RecipientList, RecipientListError, RelayPolicy};
use crate::session::{RecipientCheck, Settings};

/// The server's deciding parts, built from the configuration as `serve` builds them.
pub struct Simulator<'c> {
    config: &'c Config,
    policy: RelayPolicy,
    auth: Option<Authenticator>,
    ourselves: Ourselves,
}

/// Why a question could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The recipients file could not be loaded.
    #[error(transparent)]
    Recipients(#[from] RecipientListError),
    /// The users file could not be loaded.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The question does not fit the configuration or is not well-formed.
    #[error("{0}")]
    Invalid(String),
}

/// Who asks, and how.
#[derive(Clone, Copy, Debug)]
pub struct Probe<'a> {
    pub client: IpAddr,
    /// The EHLO name.
    pub helo: &'a str,
    /// The client authenticated as this user (no password is checked).
    pub auth: Option<&'a str>,
    /// The client has TLS (after STARTTLS, or on an implicit-TLS listener).
    pub tls: bool,
    /// The DNSBL zone that lists the client, if any.
    pub dnsbl: Option<&'a str>,
    /// Index of the listener in `config.listeners`.
    pub listener: usize,
}

/// The final line of a reply, taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub code: u16,
    /// The enhanced status code (RFC 3463), when the reply has one.
    pub status: Option<String>,
    /// The whole line.
    pub line: String,
}

impl Answer {
    fn parse(output: &[u8]) -> Answer {
        let text = String::from_utf8_lossy(output);
        let line = text
            .split("\r\n")
            .filter(|l| !l.is_empty())
            .last()
            .unwrap_or("")
            .to_string();
        let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        let status = line
            .get(4..)
            .and_then(|r| r.split(' ').next())
            .filter(|s| {
                let parts: Vec<&str> = s.split('.').collect();
                parts.len() == 3
                    && parts
                        .iter()
                        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(str::to_string);
        Answer { code, status, line }
    }

    /// `250 accepted`, `554 5.7.1 refused`, `451 4.7.1 deferred`.
    fn summary(&self) -> String {
        let word = match self.code {
            200..=399 => return format!("{} accepted", self.code),
            400..=499 => "deferred",
            _ => "refused",
        };
        match &self.status {
            Some(s) => format!("{} {s} {word}", self.code),
            None => format!("{} {word}", self.code),
        }
    }
}

/// What became of one recipient.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// What followed `RCPT TO:`.
    pub sent: String,
    /// The reply to RCPT TO.
    pub reply: Answer,
    /// The rule: the policy's (as in the decision log), or the session's when it answered
    /// without asking the policy (`syntax`, `tls_required`, ...).
    pub rule: String,
    /// The recipient as decided (after `<Postmaster>` became our postmaster address), when
    /// the policy was asked.
    pub recipient: Option<Address>,
    pub decision: Option<Decision>,
    /// The session put our configured postmaster in place of what the client wrote.
    pub postmaster: bool,
    /// Where an accepted recipient would go: `route company.com 10.0.0.5:25`, `MX lookup
    /// for gmail.com`.
    pub route: Option<String>,
    /// The `[[rate_limit]]`s that would count this message or recipient, with the key
    /// (the simulator counts nothing, so it never answers 451 for them).
    pub rate_limits: Vec<String>,
    /// MAIL FROM was refused: what was sent, the reply and its rule.
    pub mail_refused: Option<(String, Answer, String)>,
}

impl Verdict {
    /// The line `check-policy` prints, in the contract's form:
    /// `<bob@company.com>: 250 accepted (rule accepted_domain) -> route company.com 10.0.0.5:25`.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{}: {} (rule {})",
            self.sent.trim(),
            self.reply.summary(),
            self.rule
        );
        if let Some(route) = &self.route {
            s.push_str(" -> ");
            s.push_str(route);
        }
        if !self.rate_limits.is_empty() {
            s.push_str("; counted by rate limits ");
            s.push_str(&self.rate_limits.join(", "));
        }
        s
    }

    /// True when the recipient was accepted for a destination that is not ours
    /// ([`tricks::is_relayed`]).
    pub fn relayed(&self, policy: &RelayPolicy) -> bool {
        if !(200..300).contains(&self.reply.code) {
            return false;
        }
        match (&self.recipient, &self.decision) {
            (Some(r), Some(d)) => tricks::is_relayed(policy, r, d, self.postmaster),
            // Accepted without the policy deciding: nothing says it stays here.
            _ => true,
        }
    }
}

/// The outcome of `self-test`.
#[derive(Debug)]
pub struct SelfTest {
    /// Tricks run (each on every listener).
    pub runs: usize,
    /// One line per trick that was relayed.
    pub relayed: Vec<String>,
    /// One line per trick run, relayed or not.
    pub all: Vec<String>,
    pub targets: Targets,
}

impl<'c> Simulator<'c> {
    /// Loads what the server would load at start: the recipients file and, when a
    /// listener offers AUTH, the users file.
    pub fn new(config: &'c Config) -> Result<Simulator<'c>, SimError> {
        let recipients = match &config.relay.recipients_file {
            Some(path) => Some(RecipientList::load(path)?),
            None => None,
        };
        let auth = if config.listeners.iter().any(|l| l.auth != AuthMode::None) {
            Some(Authenticator::new(&config.auth, config.ipv6_prefix)?)
        } else {
            None
        };
        Ok(Simulator {
            config,
            policy: RelayPolicy::new(&config.relay, recipients),
            auth,
            ourselves: Ourselves::from_config(config),
        })
    }

    pub fn policy(&self) -> &RelayPolicy {
        &self.policy
    }

    /// Whether `user` is in the users file; `None` when no listener offers AUTH (then
    /// no users file is read).
    pub fn knows_user(&self, user: &str) -> Option<bool> {
        self.auth.as_ref().map(|a| a.knows(user))
    }

    /// What a client described by `probe` is told for `MAIL FROM:from` then
    /// `RCPT TO:to` (both as sent after the colon), in a session of its own.
    pub fn check(&self, probe: &Probe<'_>, from: &str, to: &str) -> Result<Verdict, SimError> {
        for (what, text) in [("--helo", probe.helo), ("--from", from), ("--to", to)] {
            if text.chars().any(char::is_control) {
                return Err(SimError::Invalid(format!(
                    "{what} holds a control character"
                )));
            }
        }
        let listener = self.config.listeners.get(probe.listener).ok_or_else(|| {
            SimError::Invalid(format!("there is no listener number {}", probe.listener))
        })?;
        let tls = probe.tls || listener.tls == TlsMode::Implicit;
        if tls && listener.tls == TlsMode::None {
            return Err(SimError::Invalid(format!(
                "listener {} has tls = \"none\": no client can have TLS there",
                listener.address
            )));
        }
        let settings = Settings::new(self.config, listener, true, self.auth.is_some());
        let mut session = Session::new(
            settings.protocol.clone(),
            Peer {
                addr: SocketAddr::new(probe.client, 40000),
                tls: tls.then(|| TlsInfo {
                    version: "simulated".into(),
                    cipher: "simulated".into(),
                }),
            },
        );
        let mut driver = Driver {
            session: &mut session,
            check: RecipientCheck {
                policy: &self.policy,
                auth: self.auth.as_ref(),
                ourselves: &self.ourselves,
                mx_port: settings.mx_port,
            },
            client: probe.client,
            dnsbl: probe.dnsbl,
            last: None,
        };
        driver.session.take_output();
        let ehlo = driver.send(&format!("EHLO {}", probe.helo));
        if ehlo.code != 250 {
            return Err(SimError::Invalid(format!(
                "EHLO {} is answered {}",
                probe.helo, ehlo.line
            )));
        }
        if let Some(user) = probe.auth {
            self.authenticate(&mut driver, &settings, listener, tls, user)?;
        }
        let utf8 = if from.is_ascii() && to.is_ascii() {
            ""
        } else {
            " SMTPUTF8"
        };
        let mail = format!("MAIL FROM:{from}{utf8}");
        let mail_answer = driver.send(&mail);
        let mail_refused = (mail_answer.code != 250).then(|| {
            let rule = session_rule(&mail_answer).to_string();
            (format!("MAIL FROM:{from}"), mail_answer, rule)
        });
        let reply = driver.send(&format!("RCPT TO:{to}"));
        let (recipient, decision, postmaster) = match driver.last.take() {
            Some((req, d)) => (Some(req.recipient), Some(d), req.postmaster),
            None => (None, None, false),
        };
        let rule = match &decision {
            Some(d) => d.rule().as_str().to_string(),
            None => session_rule(&reply).to_string(),
        };
        let route = match (&recipient, &decision) {
            (Some(r), Some(Decision::Accept(_))) if (200..300).contains(&reply.code) => {
                Some(self.route(r, settings.mx_port))
            }
            _ => None,
        };
        let rate_limits = match (&recipient, postern_smtp::address::parse_reverse_path(from)) {
            (Some(_), Ok(sender)) if (200..300).contains(&reply.code) => {
                let who = Who {
                    ip: probe.client,
                    trusted: self.policy.is_trusted(probe.client),
                    user: probe.auth,
                    sender: &sender,
                };
                RateLimits::new(&self.config.rate_limits, self.config.ipv6_prefix, None)
                    .applying(&who)
                    .into_iter()
                    .map(|(name, key)| format!("{name} (key {key})"))
                    .collect()
            }
            _ => Vec::new(),
        };
        Ok(Verdict {
            sent: to.to_string(),
            reply,
            rule,
            recipient,
            decision,
            postmaster,
            route,
            rate_limits,
            mail_refused,
        })
    }

    /// AUTH as `user`, answered "yes" by us in place of the password check.
    fn authenticate(
        &self,
        driver: &mut Driver<'_, '_>,
        settings: &Settings,
        listener: &crate::config::Listener,
        tls: bool,
        user: &str,
    ) -> Result<(), SimError> {
        let mechanisms = &settings.protocol.auth_mechanisms;
        if mechanisms.is_empty() {
            return Err(SimError::Invalid(format!(
                "listener {} does not offer AUTH (auth = \"none\")",
                listener.address
            )));
        }
        if !tls && !listener.allow_plaintext_auth {
            return Err(SimError::Invalid(format!(
                "listener {} accepts AUTH only over TLS: add --tls",
                listener.address
            )));
        }
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        // The password is never looked at: the simulator answers the check itself.
        let lines = if mechanisms.iter().any(|m| m == "PLAIN") {
            vec![format!("AUTH PLAIN {}", b64(&format!("\0{user}\0-")))]
        } else {
            vec!["AUTH LOGIN".to_string(), b64(user), b64("-")]
        };
        let mut last = None;
        for line in lines {
            last = Some(driver.send(&line));
        }
        match last {
            Some(a) if a.code == 235 => Ok(()),
            Some(a) => Err(SimError::Invalid(format!(
                "AUTH as {user} is answered {}",
                a.line
            ))),
            None => Err(SimError::Invalid("AUTH not sent".into())),
        }
    }

    /// Where delivery would take `recipient`, in words, without DNS.
    fn route(&self, recipient: &Address, mx_port: u16) -> String {
        let stored = recipient.to_string();
        let domain = domain_of(&stored);
        let hop = next_hop(&self.config.routes, domain, mx_port);
        let dest = match &hop.destination {
            Destination::Mx(d) => format!("MX lookup for {d}"),
            Destination::Host(h, p) => format!("{h}:{p}"),
            Destination::Ip(a) => a.to_string(),
        };
        match hop.route.and_then(|i| self.config.routes.get(i)) {
            Some(route) => {
                let ascii = postern_smtp::address::ascii_domain(domain);
                let pattern = route
                    .domains
                    .iter()
                    .find(|d| **d == ascii)
                    .or_else(|| route.domains.iter().find(|d| *d == "*"))
                    .map_or("*", String::as_str);
                format!("route {pattern} {dest}")
            }
            None if matches!(hop.destination, Destination::Ip(_)) => {
                format!("address literal {dest}")
            }
            None => dest,
        }
    }

    /// Runs every trick in [`TRICKS`] on every listener, as `client` with no AUTH (and with
    /// TLS wherever a listener offers it, as a client would). No DNSBL lists the client.
    pub fn self_test(&self, client: IpAddr) -> Result<SelfTest, SimError> {
        let targets = Targets::from_config(self.config);
        let mut out = SelfTest {
            runs: 0,
            relayed: Vec::new(),
            all: Vec::new(),
            targets: targets.clone(),
        };
        for (i, listener) in self.config.listeners.iter().enumerate() {
            let probe = Probe {
                client,
                helo: "self-test.example",
                auth: None,
                tls: listener.tls != TlsMode::None,
                dnsbl: None,
                listener: i,
            };
            for trick in TRICKS {
                let from = trick.from_path(&targets);
                let verdict = self.check(&probe, &from, &trick.to_path(&targets))?;
                out.runs += 1;
                let relayed = verdict.relayed(&self.policy);
                let mail = match &verdict.mail_refused {
                    Some((_, a, rule)) => format!("; MAIL FROM {} (rule {rule})", a.summary()),
                    None => String::new(),
                };
                let line = format!(
                    "{} {} on {}: MAIL FROM:{from} RCPT TO:{}{mail}",
                    if relayed { "RELAYED" } else { "ok" },
                    trick.name,
                    listener.address,
                    verdict.line()
                );
                if relayed {
                    out.relayed.push(line.clone());
                }
                out.all.push(line);
            }
        }
        Ok(out)
    }
}

/// One in-memory session, driven like `session::drive` drives one over a socket.
struct Driver<'s, 'p> {
    session: &'s mut Session,
    check: RecipientCheck<'p>,
    client: IpAddr,
    dnsbl: Option<&'p str>,
    /// The last recipient question and its answer.
    last: Option<(postern_smtp::RecipientRequest, Decision)>,
}

impl Driver<'_, '_> {
    /// Sends one command line; answers the session's questions; returns the final reply.
    fn send(&mut self, line: &str) -> Answer {
        self.session.receive(line.as_bytes());
        self.session.receive(b"\r\n");
        loop {
            match self.session.poll() {
                Event::Flush => continue,
                // Never asked for (no milters here).
                Event::Sender(_) => self.session.answer_sender(Ok(())),
                Event::Recipient(req) => {
                    let client = Client {
                        ip: self.client,
                        authenticated: req.authenticated.as_deref(),
                        dnsbl: self.dnsbl,
                    };
                    let decision = self.check.decide(client, &req);
                    self.session
                        .answer_recipient(decision.clone().into_result());
                    self.last = Some((req, decision));
                }
                Event::Authenticate(req) => self.session.answer_auth(Ok(req.username.clone())),
                // Never asked for: no DATA, BDAT or STARTTLS is sent.
                Event::NeedInput | Event::Close | Event::Message(_) | Event::StartTls => break,
            }
        }
        Answer::parse(&self.session.take_output())
    }
}

/// The name of a refusal the session made by itself, before any policy was asked.
fn session_rule(answer: &Answer) -> &'static str {
    let known = [
        (catalogue::tls_required(), "tls_required"),
        (catalogue::auth_required(), "auth_required"),
        (catalogue::needs_smtputf8(), "smtputf8_required"),
    ];
    if let Some((_, name)) = known.iter().find(|(r, _)| r.one_line() == answer.line) {
        return name;
    }
    match answer.code {
        200..=299 => "accepted",
        501 | 553 => "syntax",
        503 => "sequence",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::from_str(text, Path::new("t.toml")).unwrap()
    }

    const BASE: &str = r#"
hostname = "relay.test"
[[listener]]
address = "127.0.0.1:2525"
tls = "none"
[relay]
accepted_domains = ["company.test"]
trusted_networks = ["10.0.0.0/8"]
[[route]]
domains = ["company.test"]
next_hop = "10.0.0.5:25"
"#;

    fn probe(ip: &str) -> Probe<'static> {
        Probe {
            client: ip.parse().unwrap(),
            helo: "client.example",
            auth: None,
            tls: false,
            dnsbl: None,
            listener: 0,
        }
    }

    #[test]
    fn lines_in_the_contract_form() {
        let c = config(BASE);
        let sim = Simulator::new(&c).unwrap();
        let p = probe("192.0.2.1");
        let v = sim
            .check(&p, "<a@x.example>", "<bob@company.test>")
            .unwrap();
        assert_eq!(
            v.line(),
            "<bob@company.test>: 250 accepted (rule accepted_domain) -> route company.test 10.0.0.5:25"
        );
        let v = sim.check(&p, "<a@x.example>", "<x@gmail.example>").unwrap();
        assert_eq!(
            v.line(),
            "<x@gmail.example>: 554 5.7.1 refused (rule relay_denied)"
        );
        let v = sim
            .check(&p, "<a@x.example>", "<u@a.example@company.test>")
            .unwrap();
        assert_eq!(
            v.line(),
            "<u@a.example@company.test>: 501 5.1.3 refused (rule syntax)"
        );
        let inside = probe("10.1.1.1");
        let v = sim
            .check(&inside, "<a@x.example>", "<x@gmail.example>")
            .unwrap();
        assert_eq!(
            v.line(),
            "<x@gmail.example>: 250 accepted (rule trusted_network) -> MX lookup for gmail.example"
        );
        assert!(v.relayed(sim.policy()));
        let v = sim
            .check(&inside, "<a@x.example>", "<x@[192.0.2.9]>")
            .unwrap();
        assert!(
            v.line().ends_with("-> address literal 192.0.2.9:25"),
            "{}",
            v.line()
        );
    }

    #[test]
    fn control_characters_are_refused() {
        let c = config(BASE);
        let sim = Simulator::new(&c).unwrap();
        let err = sim
            .check(
                &probe("192.0.2.1"),
                "<a@x.example>",
                "<b@company.test>\r\nRSET",
            )
            .unwrap_err();
        assert!(err.to_string().contains("control character"), "{err}");
    }

    #[test]
    fn mail_from_refusals_are_reported() {
        let c = config(&BASE.replace("tls = \"none\"", "tls = \"starttls\"\nrequire_tls = true"));
        let sim = Simulator::new(&c).unwrap();
        let v = sim
            .check(&probe("192.0.2.1"), "<a@x.example>", "<b@company.test>")
            .unwrap();
        let (_, answer, rule) = v.mail_refused.clone().unwrap();
        assert_eq!((answer.code, rule.as_str()), (530, "tls_required"));
        assert_eq!(v.reply.code, 503);
        let tls = Probe {
            tls: true,
            ..probe("192.0.2.1")
        };
        let v = sim
            .check(&tls, "<a@x.example>", "<b@company.test>")
            .unwrap();
        assert!(v.mail_refused.is_none());
        assert_eq!(v.reply.code, 250);
    }

    #[test]
    fn self_test_says_no_for_a_closed_relay_and_yes_for_an_open_one() {
        let c = config(BASE);
        let sim = Simulator::new(&c).unwrap();
        let t = sim.self_test("192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(t.runs, TRICKS.len());
        assert!(t.relayed.is_empty(), "{:#?}", t.relayed);
        let open = config(&BASE.replace("[relay]", "[relay]\nopen_relay = true"));
        let sim = Simulator::new(&open).unwrap();
        let t = sim.self_test("192.0.2.1".parse().unwrap()).unwrap();
        assert!(!t.relayed.is_empty());
        assert!(
            t.relayed.iter().any(|l| l.contains("plain outside domain")),
            "{:#?}",
            t.relayed
        );
        let sim = Simulator::new(&c).unwrap();
        let t = sim.self_test("10.0.0.1".parse().unwrap()).unwrap();
        assert!(t.relayed.len() > 10, "{:#?}", t.relayed);
    }
}
