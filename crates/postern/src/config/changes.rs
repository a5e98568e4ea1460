//! What a reload changes, for the log and `postern reload`: the keys whose values differ
//! between the configuration in use and the new one, and those of them that only a
//! restart applies.
//!
//! The structs are destructured whole, so a key added to the configuration without a
//! line here does not compile.

use super::{Auth, Config, Delivery, Relay};

/// The differences between two configurations, as key names.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Every key that differs, in file order (`relay.accepted_domains`,
    /// `listener 127.0.0.1:25 added`, ...).
    pub changed: Vec<String>,
    /// Those that a reload does not apply; the running value stays until a restart.
    pub need_restart: Vec<String>,
}

impl Changes {
    /// One line: what changed, and what needs a restart.
    pub fn summary(&self) -> String {
        let mut out = if self.changed.is_empty() {
            "no key changed (the files it names were read again)".to_string()
        } else {
            format!("changed: {}", self.changed.join(", "))
        };
        if !self.need_restart.is_empty() {
            out.push_str(&format!(
                "; only a restart applies: {}",
                self.need_restart.join(", ")
            ));
        }
        out
    }

    /// A key that only a restart applies.
    fn restart_note<T: PartialEq>(&mut self, key: &str, old: &T, new: &T) {
        if old != new {
            self.changed.push(key.to_string());
            self.need_restart.push(key.to_string());
        }
    }

    fn note<T: PartialEq>(&mut self, key: &str, old: &T, new: &T) {
        if old != new {
            self.changed.push(key.to_string());
        }
    }
}

/// The keys that differ from `old` to `new`.
pub fn changes(old: &Config, new: &Config) -> Changes {
    let mut c = Changes::default();
    let Config {
        source: _,
        hostname,
        spool_dir,
        max_message_size,
        max_recipients,
        command_timeout,
        max_errors,
        ipv6_prefix,
        postmaster,
        own_addresses,
        max_hops,
        max_junk_commands,
        data_timeout,
        max_message_memory,
        log_format,
        privileges,
        listeners,
        tls,
        relay,
        auth,
        routes,
        delivery,
        filters,
        dkim,
        milters,
        authentication,
        metrics,
        rate_limits,
        cluster,
    } = new;
    c.note("hostname", &old.hostname, hostname);
    // Refused before it gets here (the spool cannot move under a running server).
    c.note("spool_dir", &old.spool_dir, spool_dir);
    c.note("max_message_size", &old.max_message_size, max_message_size);
    c.note("max_recipients", &old.max_recipients, max_recipients);
    c.note("command_timeout", &old.command_timeout, command_timeout);
    c.note("max_errors", &old.max_errors, max_errors);
    c.note("ipv6_prefix", &old.ipv6_prefix, ipv6_prefix);
    c.note("postmaster", &old.postmaster, postmaster);
    c.note("own_addresses", &old.own_addresses, own_addresses);
    c.note("max_hops", &old.max_hops, max_hops);
    c.note(
        "max_junk_commands",
        &old.max_junk_commands,
        max_junk_commands,
    );
    c.note("data_timeout", &old.data_timeout, data_timeout);
    c.note(
        "max_message_memory",
        &old.max_message_memory,
        max_message_memory,
    );
    c.restart_note("log_format", &old.log_format, log_format);
    // Root is given up at start: a new user, group or allow_root needs a restart.
    c.restart_note("user", &old.privileges, privileges);
    for l in listeners {
        match old.listeners.iter().find(|o| o.address == l.address) {
            None => c.changed.push(format!("listener {} added", l.address)),
            Some(o) if o != l => c.changed.push(format!("listener {} changed", l.address)),
            Some(_) => {}
        }
    }
    for o in &old.listeners {
        if !listeners.iter().any(|l| l.address == o.address) {
            c.changed.push(format!("listener {} removed", o.address));
        }
    }
    c.note("tls", &old.tls, tls);
    relay_changes(&mut c, &old.relay, relay);
    auth_changes(&mut c, &old.auth, auth);
    c.note("route", &old.routes, routes);
    delivery_changes(&mut c, &old.delivery, delivery);
    c.note("filter", &old.filters, filters);
    c.note("dkim", &old.dkim, dkim);
    c.note("milter", &old.milters, milters);
    c.note("authentication", &old.authentication, authentication);
    // Counters of a limit whose name, clients, key and window stay carry over.
    c.note("rate_limit", &old.rate_limits, rate_limits);
    c.restart_note("metrics", &old.metrics, metrics);
    // A reload makes a new Redis client (serve.rs keeps the old one when unchanged).
    c.note("cluster", &old.cluster, cluster);
    c
}

fn relay_changes(c: &mut Changes, old: &Relay, new: &Relay) {
    let Relay {
        accepted_domains,
        trusted_networks,
        authenticated_relay,
        open_relay,
        recipients_file,
        dnsbl,
    } = new;
    c.note(
        "relay.accepted_domains",
        &old.accepted_domains,
        accepted_domains,
    );
    c.note(
        "relay.trusted_networks",
        &old.trusted_networks,
        trusted_networks,
    );
    c.note(
        "relay.authenticated_relay",
        &old.authenticated_relay,
        authenticated_relay,
    );
    c.note("relay.open_relay", &old.open_relay, open_relay);
    c.note(
        "relay.recipients_file",
        &old.recipients_file,
        recipients_file,
    );
    c.note("relay.dnsbl", &old.dnsbl, dnsbl);
}

fn auth_changes(c: &mut Changes, old: &Auth, new: &Auth) {
    let Auth {
        users_file,
        mechanisms,
        max_failures,
        failure_window,
        lockout,
        per_user_lockout,
        restrict_senders,
    } = new;
    c.note("auth.users_file", &old.users_file, users_file);
    c.note("auth.mechanisms", &old.mechanisms, mechanisms);
    c.note("auth.max_failures", &old.max_failures, max_failures);
    c.note("auth.failure_window", &old.failure_window, failure_window);
    c.note("auth.lockout", &old.lockout, lockout);
    c.note(
        "auth.per_user_lockout",
        &old.per_user_lockout,
        per_user_lockout,
    );
    c.note(
        "auth.restrict_senders",
        &old.restrict_senders,
        restrict_senders,
    );
}

fn delivery_changes(c: &mut Changes, old: &Delivery, new: &Delivery) {
    let Delivery {
        dns_servers,
        mx_port,
        retry_schedule,
        max_queue_lifetime,
        max_concurrency,
        per_domain_concurrency,
        max_mx_addresses,
        max_mx_sessions,
        connect_timeout,
        resolve_timeout,
    } = new;
    c.note("delivery.dns_servers", &old.dns_servers, dns_servers);
    c.note("delivery.mx_port", &old.mx_port, mx_port);
    c.note(
        "delivery.retry_schedule",
        &old.retry_schedule,
        retry_schedule,
    );
    c.note(
        "delivery.max_queue_lifetime",
        &old.max_queue_lifetime,
        max_queue_lifetime,
    );
    c.note(
        "delivery.max_concurrency",
        &old.max_concurrency,
        max_concurrency,
    );
    c.note(
        "delivery.per_domain_concurrency",
        &old.per_domain_concurrency,
        per_domain_concurrency,
    );
    c.note(
        "delivery.max_mx_addresses",
        &old.max_mx_addresses,
        max_mx_addresses,
    );
    c.note(
        "delivery.max_mx_sessions",
        &old.max_mx_sessions,
        max_mx_sessions,
    );
    c.note(
        "delivery.connect_timeout",
        &old.connect_timeout,
        connect_timeout,
    );
    c.note(
        "delivery.resolve_timeout",
        &old.resolve_timeout,
        resolve_timeout,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Config {
        Config::from_str(text, Path::new("test.toml")).unwrap()
    }

    #[test]
    fn nothing_changed() {
        let a = parse("hostname = \"a.test\"\n");
        let c = changes(&a, &a.clone());
        assert_eq!(c, Changes::default());
        assert_eq!(
            c.summary(),
            "no key changed (the files it names were read again)"
        );
    }

    #[test]
    fn keys_listeners_and_restart_keys_are_named() {
        let a = parse(
            "hostname = \"a.test\"\n[relay]\naccepted_domains = [\"a.test\"]\n\
             [[listener]]\naddress = \"127.0.0.1:2525\"\ntls = \"none\"\n\
             [[listener]]\naddress = \"127.0.0.1:2526\"\ntls = \"none\"\n",
        );
        let b = parse(
            "hostname = \"a.test\"\n[relay]\naccepted_domains = [\"b.test\"]\n\
             [[listener]]\naddress = \"127.0.0.1:2525\"\ntls = \"none\"\nmax_connections = 5\n\
             [[listener]]\naddress = \"127.0.0.1:2527\"\ntls = \"none\"\n\
             [metrics]\naddress = \"127.0.0.1:9100\"\n",
        );
        let c = changes(&a, &b);
        assert_eq!(
            c.changed,
            [
                "listener 127.0.0.1:2525 changed",
                "listener 127.0.0.1:2527 added",
                "listener 127.0.0.1:2526 removed",
                "relay.accepted_domains",
                "metrics",
            ]
        );
        assert_eq!(c.need_restart, ["metrics"]);
        assert!(c.summary().ends_with("; only a restart applies: metrics"));
    }

    #[test]
    fn log_format_needs_a_restart() {
        let c = changes(&parse(""), &parse("log_format = \"json\"\n"));
        assert_eq!(c.changed, ["log_format"]);
        assert_eq!(c.need_restart, ["log_format"]);
    }
}
