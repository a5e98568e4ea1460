//! The effective configuration in plain words, for `postern check-config`.
//!
//! Written for the operator who wants to know "who can send what through this box" without
//! re-deriving it from defaults: every line states a fact after defaults were applied, and
//! the relay policy comes first because it is the part that can hurt other people.

use std::fmt::Write;

use super::units::{format_duration, format_size};
use super::{AuthMode, Config, FilterAction, Listener, NextHop, Route, RouteTls, TlsMode};

pub(crate) fn describe(c: &Config) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };

    line(match &c.source {
        Some(path) => format!("configuration: {}", path.display()),
        None => "configuration: built-in defaults (no configuration file)".to_string(),
    });
    line(format!("hostname: {}", c.hostname));

    // Relay policy.
    let r = &c.relay;
    line(if r.open_relay {
        "open relay: YES -- DANGER: anyone on the Internet can relay through this server \
         (relay.open_relay = true)"
            .to_string()
    } else if let Some(all) = r.trusted_networks.iter().find(|n| n.prefix_len() == 0) {
        format!(
            "open relay: YES -- DANGER: relay.trusted_networks contains {all}, so anyone on \
             the Internet can relay through this server"
        )
    } else if let everyone @ [_, ..] = r.trusted_everyone().as_slice() {
        format!(
            "open relay: YES -- DANGER: relay.trusted_networks together cover {}, so anyone \
             on the Internet can relay through this server",
            super::every_address_of(everyone)
        )
    } else {
        "open relay: NO".to_string()
    });
    line(if r.accepted_domains.is_empty() {
        "anonymous inbound: none (no accepted domains)".to_string()
    } else {
        format!("anonymous inbound for: {}", r.accepted_domains.join(", "))
    });
    line(if r.trusted_networks.is_empty() {
        "relay for trusted networks: none".to_string()
    } else {
        format!(
            "relay for trusted networks: {}",
            join(r.trusted_networks.iter().map(ToString::to_string))
        )
    });
    let auth_offered = c.listeners.iter().any(|l| l.auth != AuthMode::None);
    line(match (r.authenticated_relay, auth_offered) {
        (false, _) => "relay for authenticated users: no".to_string(),
        (true, true) => "relay for authenticated users: yes".to_string(),
        (true, false) => "relay for authenticated users: yes (but no listener offers AUTH)".into(),
    });
    line(match &r.recipients_file {
        Some(path) => format!(
            "recipients checked against: {} (others in accepted domains get 550)",
            path.display()
        ),
        None if r.accepted_domains.is_empty() => {
            "recipients checked against: nothing (no accepted domains)".into()
        }
        // Every address is taken, so mail the internal server refuses later is bounced
        // to its sender, which spam forges: backscatter to innocent third parties.
        None => "recipients checked against: nothing (any address in an accepted domain) -- \
                 WARNING: mail for addresses the next hop refuses is bounced to its (often \
                 forged) sender (backscatter); set relay.recipients_file"
            .into(),
    });
    line(match &c.postmaster {
        Some(p) => format!("postmaster: <Postmaster> and double-bounce notices go to {p}"),
        None => "postmaster: none -- <Postmaster> is treated like any recipient and \
                 double-bounce notices are only logged; set postmaster (postmaster@hostname \
                 would go by MX to this host and loop)"
            .into(),
    });
    line(if r.dnsbl.is_empty() {
        "dnsbl: none".to_string()
    } else {
        format!(
            "dnsbl: {} (not applied to trusted or authenticated clients)",
            r.dnsbl.join(", ")
        )
    });

    for l in &c.listeners {
        line(describe_listener(l));
    }
    if let Some(tls) = &c.tls {
        line(format!(
            "tls certificate: {} (key {})",
            tls.cert.display(),
            tls.key.display()
        ));
    }
    if auth_offered || c.auth.users_file.is_some() {
        let a = &c.auth;
        line(format!(
            "auth: users from {}, mechanisms {}, lockout for {} after {} failures in {} \
             (per client IP{})",
            a.users_file
                .as_ref()
                .map_or("(none)".to_string(), |p| p.display().to_string()),
            join(a.mechanisms.iter().map(|m| m.name().to_string())),
            format_duration(a.lockout),
            a.max_failures,
            format_duration(a.failure_window),
            if a.per_user_lockout {
                " and per user name"
            } else {
                " only"
            },
        ));
        if a.restrict_senders {
            line(
                "auth: senders restricted: a user may send only as its own address and the \
                 addresses listed for it in the users file"
                    .to_string(),
            );
        }
    }

    for route in &c.routes {
        line(describe_route(route));
    }
    if !c.routes.iter().any(|r| r.domains.iter().any(|d| d == "*")) {
        let others = if c.routes.is_empty() {
            "all domains"
        } else {
            "all other domains"
        };
        line(format!("route: {others} -> MX (tls opportunistic)"));
    }

    if c.filters.is_empty() {
        line("filters: none".to_string());
    }
    for f in &c.filters {
        let mut criteria = Vec::new();
        if !f.attachments.is_empty() {
            criteria.push(format!("attachments {}", f.attachments.join(", ")));
        }
        if !f.keywords.is_empty() {
            criteria.push(format!("keywords {}", quoted(&f.keywords)));
        }
        if !f.senders.is_empty() {
            criteria.push(format!("senders {}", f.senders.join(", ")));
        }
        let action = match &f.action {
            FilterAction::Reject => format!("{} (550)", f.action.as_str()),
            FilterAction::Discard | FilterAction::Quarantine => f.action.as_str().to_string(),
            FilterAction::Redirect(to) => format!("{} to {to}", f.action.as_str()),
        };
        line(format!(
            "filter {}: {} -> {action}",
            f.name,
            criteria.join("; ")
        ));
    }

    for m in &c.milters {
        line(format!(
            "milter {}: {} for {} clients, connect timeout {}, reply timeout {}, on failure {}, {}",
            m.name,
            m.address,
            match m.clients {
                crate::config::MilterClients::Any => "all",
                crate::config::MilterClients::Untrusted => "untrusted",
                crate::config::MilterClients::Relayed => "relayed (trusted or authenticated)",
            },
            format_duration(m.connect_timeout),
            format_duration(m.timeout),
            match m.on_failure {
                crate::config::OnFailure::Tempfail => "tempfail (451 4.7.1)",
                crate::config::OnFailure::Accept => "accept (skip it)",
            },
            match m.pool_size {
                0 => "a new connection for every session".to_string(),
                n => format!(
                    "connections kept for the next session (up to {n} idle, {} each)",
                    format_duration(m.pool_idle_timeout)
                ),
            },
        ));
    }

    for r in &c.rate_limits {
        let mut what = Vec::new();
        if let Some(n) = r.messages {
            what.push(format!("{n} messages"));
        }
        if let Some(n) = r.recipients {
            what.push(format!("{n} recipients"));
        }
        line(format!(
            "rate limit {}: {} per {} per {} ({} clients), then 451 4.7.1",
            r.name,
            what.join(" and "),
            r.per.as_str(),
            format_duration(r.window),
            r.clients.as_str(),
        ));
    }

    line(describe_authentication(c));
    line(format!("spool: {}", c.spool_dir.display()));
    line(describe_privileges(c));
    line(format!(
        "limits: messages up to {} ({} bytes), {} recipients per transaction, command \
         timeout {}, transfer timeout {}, {} protocol errors and {} junk commands per \
         session, {} hops, {} of message bodies in memory",
        format_size(c.max_message_size),
        c.max_message_size,
        c.max_recipients,
        format_duration(c.command_timeout),
        format_duration(c.data_timeout),
        c.max_errors,
        c.max_junk_commands,
        c.max_hops,
        format_size(c.max_message_memory),
    ));
    let d = &c.delivery;
    let last = d.retry_schedule.last().copied().unwrap_or_default();
    line(format!(
        "delivery: DNS {}, MX port {}, retry after {} then every {}, bounce after {}, \
         {} connections ({} per domain)",
        if d.dns_servers.is_empty() {
            "system resolver".to_string()
        } else {
            join(d.dns_servers.iter().map(ToString::to_string))
        },
        d.mx_port,
        join(d.retry_schedule.iter().map(|d| format_duration(*d))),
        format_duration(last),
        format_duration(d.max_queue_lifetime),
        d.max_concurrency,
        d.per_domain_concurrency,
    ));
    line(match &c.metrics {
        Some(m) => format!("metrics: http://{}/metrics", m.address),
        None => "metrics: off".to_string(),
    });
    line(match &c.cluster {
        Some(k) => {
            let mut tls = String::new();
            if let Some(ca) = &k.ca_file {
                tls.push_str(&format!(", server checked against {}", ca.display()));
            }
            if let Some((cert, _)) = &k.client_cert {
                tls.push_str(&format!(", client certificate {}", cert.display()));
            }
            if !k.sentinels.is_empty() {
                tls.push_str(&format!(
                    ", master found by the sentinels {}",
                    k.sentinels.join(", ")
                ));
            }
            format!(
                "cluster: node {}, AUTH lockouts and rate-limit counters shared through {}{tls} \
                 (over {} or down: counted on this node alone until it answers)",
                k.node,
                k.shown_url(),
                format_duration(k.timeout)
            )
        }
        None => "cluster: off (counters are this node's own)".to_string(),
    });
    out
}

/// Which inbound checks run, and what they may refuse (interface: "Mail authentication").
fn describe_authentication(c: &Config) -> String {
    let a = &c.authentication;
    if !a.any() {
        return "inbound checks (untrusted, unauthenticated clients): none".to_string();
    }
    let mut checks = Vec::new();
    if a.spf {
        checks.push(if a.spf_reject {
            "spf (fail refused, 550 5.7.23)"
        } else {
            "spf"
        });
    }
    if a.dkim {
        checks.push("dkim");
    }
    if a.dmarc {
        checks.push(if a.dmarc_enforce {
            "dmarc (enforced: p=reject refused, p=quarantine held)"
        } else {
            "dmarc (not enforced: header only)"
        });
    }
    format!(
        "inbound checks (untrusted, unauthenticated clients): {}; results in \
         Authentication-Results: {}",
        checks.join(", "),
        c.hostname
    )
}

/// Whom `serve` runs as; whether the user exists is checked by `check-config` itself.
fn describe_privileges(c: &Config) -> String {
    let p = &c.privileges;
    match (&p.user, c.off_loopback()) {
        (Some(user), _) => format!(
            "privileges: binds, opens the spool and reads keys as root, then runs as user \
             {user} ({})",
            p.group
                .as_ref()
                .map_or("its primary group".to_string(), |g| format!("group {g}"))
        ),
        (None, _) if p.allow_root => {
            "privileges: no user; allow_root = true: started as root, it runs as root".into()
        }
        (None, Some(exposed)) => format!(
            "privileges: no user -- started as root, serve refuses to run ({exposed} is not \
             loopback); set user, or allow_root = true"
        ),
        (None, None) => {
            "privileges: no user: runs as whoever starts it (every listener is on loopback)".into()
        }
    }
}

fn describe_listener(l: &Listener) -> String {
    let tls = match l.tls {
        TlsMode::None => "tls none",
        TlsMode::StartTls => "tls starttls",
        TlsMode::Implicit => "tls implicit",
    };
    let mut parts = vec![tls.to_string()];
    if l.require_tls {
        parts.push("TLS required before MAIL/AUTH".to_string());
    }
    parts.push(
        match l.auth {
            AuthMode::None => "auth none",
            AuthMode::Optional => "auth optional",
            AuthMode::Required => "auth required",
        }
        .to_string(),
    );
    if l.auth != AuthMode::None && l.allow_plaintext_auth {
        parts.push("AUTH allowed without TLS".to_string());
    }
    parts.push(format!(
        "max {} connections, {} per IP",
        l.max_connections, l.per_ip_connections
    ));
    if let Some(rate) = l.connection_rate {
        parts.push(format!("at most {rate} new connections per IP"));
    }
    if l.proxy_protocol {
        let from: Vec<String> = l.proxy_from.iter().map(|n| n.to_string()).collect();
        parts.push(format!("PROXY protocol from {}", from.join(", ")));
    }
    format!("listener {}: {}", l.address, parts.join(", "))
}

fn describe_route(r: &Route) -> String {
    let domains = if r.domains.iter().any(|d| d == "*") {
        "any domain".to_string()
    } else {
        r.domains.join(", ")
    };
    let hop = match &r.next_hop {
        NextHop::Mx => "MX".to_string(),
        other => other.to_string(),
    };
    let mut tls = match r.tls {
        RouteTls::None => "tls none".to_string(),
        RouteTls::Opportunistic => "tls opportunistic".to_string(),
        RouteTls::Required => "tls required".to_string(),
    };
    if let Some(ca) = &r.ca_file {
        let _ = write!(tls, ", CA file {}", ca.display());
    }
    if let Some(user) = &r.auth_user {
        let _ = write!(tls, ", AUTH as {user}");
    }
    format!("route: {domains} -> {hop} ({tls})")
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

fn quoted(items: &[String]) -> String {
    join(items.iter().map(|s| format!("\"{s}\"")))
}
