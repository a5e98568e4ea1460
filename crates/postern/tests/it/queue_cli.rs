//! `postern queue` at size (issue 14): a listing streamed over many pages, `--domain` for a
//! dead destination's backlog, and deletions that are final once answered (a `kill -9`
//! right after the answer brings nothing back), with the server running and without.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::{INSIDE, Server, message, run_cli, wait_until};

/// Runs `postern queue ...` against the server's configuration; (exit code, stdout).
fn queue(server: &Server, args: &[&str]) -> (i32, String) {
    let mut all = vec!["queue"];
    all.extend_from_slice(args);
    all.extend(["--config", server.config.to_str().unwrap()]);
    let (code, out, err) = run_cli(&all);
    (code, format!("{out}{err}"))
}

/// The ids a text listing shows (the lines that start with one).
fn listed(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split(' ').next())
        .filter(|w| w.len() == 16 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
        .collect()
}

/// Sends `count` messages to `to`, 100 per connection; returns their ids.
fn send(server: &Server, to: &[&str], count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let body = message("backlog");
    while ids.len() < count {
        let mut c = server.client(INSIDE);
        c.hello();
        for _ in 0..(count - ids.len()).min(100) {
            let r = c.send_mail("sender@company.test", to, &body);
            assert_eq!(r.code, 250, "{}", r.text());
            ids.push(r.lines[0].rsplit(' ').next().unwrap().to_string());
        }
        c.expect("QUIT", 221);
    }
    ids
}

/// Waits until the running server has loaded its queue (after a start the backlog loads
/// in the background; a listing says so until then) and returns the listing.
fn wait_loaded(server: &Server) -> Vec<String> {
    let mut text = String::new();
    wait_until("the queue loaded", Duration::from_secs(30), || {
        text = queue(server, &["list"]).1;
        !text.contains("still being loaded")
    });
    listed(&text)
}

/// The numbers in a `delete --domain` answer: (deleted, deleted when the running attempt
/// ends, kept).
fn deletion_counts(answer: &str) -> (usize, usize, usize) {
    let number_in = |what: &str| {
        answer
            .split(';')
            .find(|part| part.contains(what))
            .and_then(|part| {
                part.split_whitespace()
                    .filter_map(|w| w.parse::<usize>().ok())
                    .next()
            })
            .unwrap_or(0)
    };
    (
        number_in("messages deleted"),
        number_in("more when"),
        number_in("kept"),
    )
}

#[test]
fn a_dead_destinations_backlog_is_listed_over_pages_and_deleted_for_good() {
    // Every destination is a closed port (the base configuration's fallback).
    let mut server = Server::start("", "");
    let dead = send(&server, &["a@dead.test"], 2_050);
    let sub = send(&server, &["b@sub.dead.test"], 30);
    let mixed = send(&server, &["c@dead.test", "d@other.test"], 20);
    let all: BTreeSet<String> = dead.iter().chain(&sub).chain(&mixed).cloned().collect();
    assert_eq!(all.len(), 2_100);

    // The whole queue, over three pages of the runner's listing, each message once, in
    // arrival order, and the count at the end.
    let (code, text) = queue(&server, &["list"]);
    assert_eq!(code, 0, "{}", &text[..text.len().min(500)]);
    let ids = listed(&text);
    assert_eq!(ids.len(), 2_100);
    assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), all);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "not in id order");
    assert!(text.starts_with("id "), "{}", &text[..80]);
    assert!(
        text.ends_with("2100 message(s)\n"),
        "{}",
        &text[text.len() - 80..]
    );
    let (_, json) = queue(&server, &["list", "--json"]);
    let objects: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objects.len(), 2_100);
    assert_eq!(objects[2_099]["id"], mixed[19].as_str());

    // --domain: exactly that domain (a subdomain is another destination), in any case,
    // a trailing dot tolerated.
    let at_dead = listed(&queue(&server, &["list", "--domain", "DEAD.test."]).1);
    assert_eq!(at_dead.len(), 2_070);
    assert!(at_dead.iter().all(|id| !sub.contains(id)));
    let (_, json) = queue(&server, &["list", "--json", "--domain", "sub.dead.test"]);
    assert_eq!(json.lines().count(), 30);
    let (code, text) = queue(&server, &["list", "--domain", "nowhere.test"]);
    assert_eq!(
        (code, text.as_str()),
        (0, "no queued message for nowhere.test\n")
    );

    // A bad domain or no target is the caller's mistake, refused before anything runs.
    assert_eq!(queue(&server, &["delete", "--domain", "bad domain"]).0, 2);
    assert_eq!(queue(&server, &["delete"]).0, 2);
    assert_eq!(
        queue(&server, &["delete", &dead[0], "--domain", "dead.test"]).0,
        2
    );

    // Delete dead.test's backlog: the mixed messages stay (their other recipients would
    // lose mail), and are counted.
    // (A probe of the suspended destination may be running on one: it goes when that
    // attempt ends.)
    let (code, text) = queue(&server, &["delete", "--domain", "dead.test"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("OK dead.test: "), "{text}");
    assert!(
        text.ends_with("; 20 kept (they have pending recipients at other domains too)\n"),
        "{text}"
    );
    let (deleted, later, kept) = deletion_counts(&text);
    assert_eq!((deleted + later, kept), (2_050, 20), "{text}");
    // One message by id, then a crash at once: both answers came after the DONE records
    // were on disk, so nothing deleted comes back.
    let (code, text) = queue(&server, &["delete", &sub[0]]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with(&format!("OK {} deleted", sub[0])),
        "{text}"
    );
    // What was deleted "when its running attempt ends" is gone once that attempt is.
    wait_until(
        "the running attempts to end",
        Duration::from_secs(30),
        || listed(&queue(&server, &["list"]).1).len() == 49,
    );
    server.kill9();
    server.spawn();
    let left = wait_loaded(&server);
    let expected: BTreeSet<String> = sub[1..].iter().chain(&mixed).cloned().collect();
    assert_eq!(left.into_iter().collect::<BTreeSet<_>>(), expected);
    let (code, text) = queue(&server, &["delete", &sub[0]]);
    assert_eq!(code, 1);
    assert!(text.contains("no such message"), "{text}");

    // Without a server: the same listing and deletion on the spool itself.
    server.terminate(Duration::from_secs(20));
    let (code, text) = queue(&server, &["list", "--domain", "sub.dead.test"]);
    assert_eq!(code, 0);
    assert!(text.starts_with("(postern is not running)"), "{text}");
    assert_eq!(listed(&text).len(), 29);
    let (code, text) = queue(&server, &["delete", "--domain", "sub.dead.test"]);
    assert_eq!(
        (code, text.as_str()),
        (0, "OK sub.dead.test: 29 messages deleted\n")
    );
    let (code, text) = queue(&server, &["delete", "--domain", "dead.test"]);
    assert_eq!(code, 0);
    assert!(
        text.starts_with("OK dead.test: 0 messages deleted; 20 kept"),
        "{text}"
    );
    assert_eq!(listed(&queue(&server, &["list"]).1), mixed);
    server.spawn();
    assert_eq!(wait_loaded(&server), mixed);
    assert!(server.log().contains("message deleted by the operator"));
}
