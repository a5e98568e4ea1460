//! The counters in the Prometheus text exposition format, version 0.0.4.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    AUTH_CHECKS, AUTH_RESULTS, DeliveryStatus, LIMITS, ListenerCounters, MILTER_LATENCY_BUCKETS,
    Metrics, MilterAction, REDIS_LATENCY_BUCKETS, REJECTIONS,
};
use crate::config::FilterAction;
use crate::dkim::key::Algorithm;
use crate::policy::Rule;

impl Metrics {
    /// The text exposition format, version 0.0.4. `spool_fsyncs` comes from the spool
    /// ([`Spool::sync_count`]), which keeps its own count.
    pub fn render(&self, spool_fsyncs: u64) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::with_capacity(4096);
        let listener_label = |l: &ListenerCounters| l.address.to_string();
        let listeners = self.listeners.load();

        family(
            &mut out,
            "postern_connections_total",
            "counter",
            "SMTP connections given a session, per listener.",
            listeners.iter().map(|l| {
                (
                    labels(&[("listener", &listener_label(l))]),
                    get(&l.connections),
                )
            }),
        );
        family(
            &mut out,
            "postern_connections_refused_total",
            "counter",
            "SMTP connections refused with 421 because a connection limit was full.",
            listeners.iter().flat_map(|l| {
                LIMITS.iter().zip(&l.refused).map(move |(limit, n)| {
                    (
                        labels(&[("listener", &listener_label(l)), ("limit", limit)]),
                        get(n),
                    )
                })
            }),
        );
        family(
            &mut out,
            "postern_proxy_refused_total",
            "counter",
            "Connections of a proxy_protocol listener closed without a banner: peer not in \
             proxy_from, or a missing, malformed or late PROXY header.",
            listeners.iter().map(|l| {
                (
                    labels(&[("listener", &listener_label(l))]),
                    get(&l.proxy_refused),
                )
            }),
        );
        single(
            &mut out,
            "postern_connections_open",
            "gauge",
            "SMTP connections open now, all listeners.",
            get(&self.connections_open),
        );
        single(
            &mut out,
            "postern_messages_accepted_total",
            "counter",
            "Messages answered 250 (queued, quarantined or discarded by a filter).",
            get(&self.messages_accepted),
        );
        family(
            &mut out,
            "postern_messages_rejected_total",
            "counter",
            "Messages refused at or before the end of DATA/BDAT, by reason.",
            REJECTIONS
                .iter()
                .zip(&self.messages_rejected)
                .map(|((_, name), n)| (labels(&[("reason", name)]), get(n))),
        );
        family(
            &mut out,
            "postern_recipients_refused_total",
            "counter",
            "RCPT TO refused by the relay policy, by the rule that refused.",
            Rule::ALL
                .iter()
                .zip(&self.recipients_refused)
                .filter(|(rule, _)| rule.refuses())
                .map(|(rule, n)| (labels(&[("rule", rule.as_str())]), get(n))),
        );
        single(
            &mut out,
            "postern_auth_failures_total",
            "counter",
            "SMTP AUTH attempts answered 535 (wrong password or unknown user).",
            get(&self.auth_failures),
        );
        single(
            &mut out,
            "postern_auth_successes_total",
            "counter",
            "SMTP AUTH attempts answered 235.",
            get(&self.auth_successes),
        );
        family(
            &mut out,
            "postern_deliveries_total",
            "counter",
            "Delivery outcomes, one per recipient and attempt.",
            DeliveryStatus::ALL
                .iter()
                .zip(&self.deliveries)
                .map(|(status, n)| (labels(&[("status", status.as_str())]), get(n))),
        );
        single(
            &mut out,
            "postern_bounces_total",
            "counter",
            "Bounce messages (delivery status notifications) queued.",
            get(&self.bounces),
        );
        single(
            &mut out,
            "postern_queue_messages",
            "gauge",
            "Messages the delivery runner holds (waiting, deferred or being delivered).",
            get(&self.queue_messages),
        );
        let in_flight = get(&self.queue_in_flight);
        family(
            &mut out,
            "postern_queue_messages_by_state",
            "gauge",
            "Queued messages by state: an attempt running, or waiting (for their time, a \
             slot, or a suspended destination).",
            [
                (labels(&[("state", "in_flight")]), in_flight),
                (
                    labels(&[("state", "waiting")]),
                    get(&self.queue_messages).saturating_sub(in_flight),
                ),
            ]
            .into_iter(),
        );
        single(
            &mut out,
            "postern_queue_oldest_message_age_seconds",
            "gauge",
            "Age of the oldest queued message (0 when the queue is empty).",
            get(&self.queue_oldest_age),
        );
        single(
            &mut out,
            "postern_queue_loading",
            "gauge",
            "1 while the messages found in the spool at start are being loaded.",
            get(&self.queue_loading),
        );
        let (top, suspended) = self
            .queue_destinations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        family(
            &mut out,
            "postern_queue_destination_messages",
            "gauge",
            "Waiting messages of the destinations with the most (the ten largest only).",
            top.iter().map(|b| {
                let suspended = if b.suspended { "true" } else { "false" };
                (
                    labels(&[("destination", &b.destination), ("suspended", suspended)]),
                    b.messages as u64,
                )
            }),
        );
        single(
            &mut out,
            "postern_queue_destinations_suspended",
            "gauge",
            "Destinations where no host could be reached lately: their mail waits for a probe.",
            suspended as u64,
        );
        single(
            &mut out,
            "postern_spool_fsyncs_total",
            "counter",
            "Spool fdatasyncs since start (one per group-committed batch).",
            spool_fsyncs,
        );
        family(
            &mut out,
            "postern_filter_actions_total",
            "counter",
            "Messages a [[filter]] matched, by its action.",
            FilterAction::NAMES
                .iter()
                .zip(&self.filter_actions)
                .map(|(action, n)| (labels(&[("action", action)]), get(n))),
        );
        family(
            &mut out,
            "postern_authentication_results_total",
            "counter",
            "[authentication] results on mail from untrusted clients, per check and result.",
            AUTH_CHECKS
                .iter()
                .zip(&self.auth_results)
                .flat_map(|(check, results)| {
                    AUTH_RESULTS
                        .iter()
                        .zip(results)
                        .map(move |(r, n)| (labels(&[("check", check), ("result", r)]), get(n)))
                }),
        );
        family(
            &mut out,
            "postern_dkim_signatures_total",
            "counter",
            "DKIM signatures made on relayed mail, by algorithm.",
            Algorithm::ALL
                .iter()
                .zip(&self.dkim_signatures)
                .map(|(a, n)| (labels(&[("algorithm", a.signature_name())]), get(n))),
        );
        single(
            &mut out,
            "postern_dkim_unsigned_total",
            "counter",
            "Relayed messages whose From: is a [[dkim]] domain that were not signed (the \
             log says why; there should be none).",
            get(&self.dkim_unsigned),
        );
        let rate_limits = self
            .rate_limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        family(
            &mut out,
            "postern_rate_limit_hits_total",
            "counter",
            "MAIL and RCPT commands answered 451 4.7.1 by a [[rate_limit]], per limit.",
            rate_limits
                .iter()
                .map(|(name, n)| (labels(&[("limit", name)]), get(n))),
        );
        let milters = self
            .milters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        family(
            &mut out,
            "postern_milter_actions_total",
            "counter",
            "Milter decisions, per milter and action (failed: on_failure applied).",
            milters.iter().flat_map(|(name, c)| {
                MilterAction::ALL.iter().zip(&c.actions).map(move |(a, n)| {
                    (labels(&[("milter", name), ("action", a.as_str())]), get(n))
                })
            }),
        );
        out.push_str(
            "# HELP postern_milter_latency_seconds Time a milter took to answer a command \
             (or to connect and negotiate), per milter.\n\
             # TYPE postern_milter_latency_seconds histogram\n",
        );
        for (name, c) in &milters {
            for (i, n) in c.buckets.iter().enumerate() {
                let le = MILTER_LATENCY_BUCKETS
                    .get(i)
                    .map_or("+Inf".to_string(), |b| b.to_string());
                out.push_str(&format!(
                    "postern_milter_latency_seconds_bucket{} {}\n",
                    labels(&[("milter", name), ("le", &le)]),
                    get(n)
                ));
            }
            let l = labels(&[("milter", name)]);
            out.push_str(&format!(
                "postern_milter_latency_seconds_sum{l} {}\n",
                get(&c.sum_us) as f64 / 1e6
            ));
            out.push_str(&format!(
                "postern_milter_latency_seconds_count{l} {}\n",
                get(&c.buckets[MILTER_LATENCY_BUCKETS.len()])
            ));
        }
        let k = &self.cluster;
        let state = get(&k.state);
        if state != 0 {
            single(
                &mut out,
                "postern_cluster_redis_up",
                "gauge",
                "[cluster]: 1 while Redis answers within the timeout (counters shared), 0 \
                 while this node counts locally.",
                u64::from(state == 2),
            );
            out.push_str(
                "# HELP postern_cluster_redis_latency_seconds Time of each Redis round trip \
                 (calls and probes; a call given up at the timeout counts its wait).\n\
                 # TYPE postern_cluster_redis_latency_seconds histogram\n",
            );
            for (i, n) in k.buckets.iter().enumerate() {
                let le = REDIS_LATENCY_BUCKETS
                    .get(i)
                    .map_or("+Inf".to_string(), |b| b.to_string());
                out.push_str(&format!(
                    "postern_cluster_redis_latency_seconds_bucket{} {}\n",
                    labels(&[("le", &le)]),
                    get(n)
                ));
            }
            out.push_str(&format!(
                "postern_cluster_redis_latency_seconds_sum {}\n\
                 postern_cluster_redis_latency_seconds_count {}\n",
                get(&k.sum_us) as f64 / 1e6,
                get(&k.buckets[REDIS_LATENCY_BUCKETS.len()])
            ));
            single(
                &mut out,
                "postern_cluster_redis_failures_total",
                "counter",
                "[cluster]: Redis calls that failed or ran over the timeout, counted locally \
                 instead.",
                get(&k.failures),
            );
        }
        out
    }
}

/// HELP, TYPE and one line per label set.
fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    series: impl Iterator<Item = (String, u64)>,
) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    for (labels, value) in series {
        out.push_str(&format!("{name}{labels} {value}\n"));
    }
}

fn single(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    family(
        out,
        name,
        kind,
        help,
        std::iter::once((String::new(), value)),
    );
}

/// `{a="x",b="y"}`, values escaped as the format requires.
fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use super::*;
    use crate::metrics::{DeliveryStatus, Rejection};

    fn sample() -> Arc<Metrics> {
        let a: SocketAddr = "0.0.0.0:25".parse().unwrap();
        let b: SocketAddr = "[::]:587".parse().unwrap();
        Arc::new(Metrics::new([a, b, a]))
    }

    #[test]
    fn renders_every_family_with_help_and_type() {
        let m = sample();
        let a: SocketAddr = "0.0.0.0:25".parse().unwrap();
        let open = m.connection_opened(a);
        let _second = m.connection_opened(a);
        drop(open);
        m.connection_refused(a, "per_ip_connections");
        m.message_accepted();
        m.message_rejected(Rejection::Filter);
        m.core_refusals(postern_smtp::Refusals {
            size: 2,
            bare_line_ending: 1,
            line_too_long: 0,
            too_many_hops: 0,
        });
        m.recipient_refused(Rule::RelayDenied);
        m.recipient_refused(Rule::AcceptedDomain); // never a refusal: not counted
        m.auth_failed();
        m.auth_failed();
        m.auth_succeeded();
        m.delivery(DeliveryStatus::Deferred);
        m.bounce();
        m.set_queue_messages(7);
        m.filter_action(&FilterAction::Redirect("x@y.test".into()));
        m.add_milters(["rspamd"]);
        m.add_rate_limits(["users", "ips"]);
        m.rate_limit_hit("ips");
        m.milter_action("clamav", MilterAction::Reject);
        m.milter_latency("clamav", std::time::Duration::from_millis(7));
        // Without [cluster] its series are not shown at all.
        assert!(!m.render(42).contains("postern_cluster"));
        m.cluster_redis_up(true);
        m.cluster_redis_latency(std::time::Duration::from_micros(1500));
        m.cluster_redis_failure();
        let text = m.render(42);

        for line in [
            "# HELP postern_connections_total SMTP connections given a session, per listener.\n",
            "# TYPE postern_connections_total counter\n",
            "postern_connections_total{listener=\"0.0.0.0:25\"} 2\n",
            "postern_connections_total{listener=\"[::]:587\"} 0\n",
            "postern_connections_refused_total{listener=\"0.0.0.0:25\",limit=\"per_ip_connections\"} 1\n",
            "postern_connections_refused_total{listener=\"0.0.0.0:25\",limit=\"max_connections\"} 0\n",
            "postern_connections_refused_total{listener=\"0.0.0.0:25\",limit=\"connection_rate\"} 0\n",
            "# TYPE postern_connections_open gauge\npostern_connections_open 1\n",
            "postern_messages_accepted_total 1\n",
            "postern_messages_rejected_total{reason=\"filter\"} 1\n",
            "postern_messages_rejected_total{reason=\"size\"} 2\n",
            "postern_messages_rejected_total{reason=\"bare_line_ending\"} 1\n",
            "postern_messages_rejected_total{reason=\"line_too_long\"} 0\n",
            "postern_messages_rejected_total{reason=\"store_failed\"} 0\n",
            "postern_recipients_refused_total{rule=\"relay_denied\"} 1\n",
            "postern_recipients_refused_total{rule=\"unknown_recipient\"} 0\n",
            "postern_auth_failures_total 2\n",
            "# TYPE postern_cluster_redis_up gauge\npostern_cluster_redis_up 1\n",
            "postern_cluster_redis_latency_seconds_bucket{le=\"0.001\"} 0\n",
            "postern_cluster_redis_latency_seconds_bucket{le=\"0.0025\"} 1\n",
            "postern_cluster_redis_latency_seconds_sum 0.0015\n",
            "postern_cluster_redis_latency_seconds_count 1\n",
            "postern_cluster_redis_failures_total 1\n",
            "postern_auth_successes_total 1\n",
            "postern_deliveries_total{status=\"deferred\"} 1\n",
            "postern_deliveries_total{status=\"delivered\"} 0\n",
            "postern_bounces_total 1\n",
            "postern_rate_limit_hits_total{limit=\"users\"} 0\n",
            "postern_rate_limit_hits_total{limit=\"ips\"} 1\n",
            "# TYPE postern_queue_messages gauge\npostern_queue_messages 7\n",
            "postern_spool_fsyncs_total 42\n",
            "postern_filter_actions_total{action=\"redirect\"} 1\n",
            "postern_filter_actions_total{action=\"reject\"} 0\n",
            "postern_milter_actions_total{milter=\"clamav\",action=\"reject\"} 1\n",
            "postern_milter_actions_total{milter=\"rspamd\",action=\"continue\"} 0\n",
            "# TYPE postern_milter_latency_seconds histogram\n",
            "postern_milter_latency_seconds_bucket{milter=\"clamav\",le=\"0.005\"} 0\n",
            "postern_milter_latency_seconds_bucket{milter=\"clamav\",le=\"0.01\"} 1\n",
            "postern_milter_latency_seconds_bucket{milter=\"clamav\",le=\"+Inf\"} 1\n",
            "postern_milter_latency_seconds_sum{milter=\"clamav\"} 0.007\n",
            "postern_milter_latency_seconds_count{milter=\"clamav\"} 1\n",
            "postern_milter_latency_seconds_count{milter=\"rspamd\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(!text.contains("accepted_domain"), "{text}");
        // A shared address is one series, not two.
        assert_eq!(text.matches("postern_connections_total{").count(), 2);

        // Every sample line belongs to a family announced just before, with HELP and
        // TYPE once each, and every value is an integer.
        let mut families = Vec::new();
        let mut current = "";
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                current = rest.split(' ').next().unwrap();
                families.push(current);
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(name, current);
                assert!(
                    kind == "counter" || kind == "gauge" || kind == "histogram",
                    "{line}"
                );
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let histogram = ["_bucket", "_sum", "_count"].iter().any(|s| {
                    series.starts_with(&format!("{current}{s}{{"))
                        || series == format!("{current}{s}")
                });
                assert!(
                    series == current || series.starts_with(&format!("{current}{{")) || histogram,
                    "{line} outside {current}"
                );
                if series.starts_with(&format!("{current}_sum")) {
                    value.parse::<f64>().unwrap();
                } else {
                    value.parse::<u64>().unwrap();
                }
            }
        }
        assert_eq!(families.len(), 28, "{families:?}");
        let mut unique = families.clone();
        unique.dedup();
        assert_eq!(unique, families);
    }

    #[test]
    fn rules_are_listed_at_their_index() {
        for (i, rule) in Rule::ALL.iter().enumerate() {
            assert_eq!(*rule as usize, i, "{rule}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("a", "x\"y\\z\nw"), ("b", "c")]),
            r#"{a="x\"y\\z\nw",b="c"}"#
        );
    }
}
