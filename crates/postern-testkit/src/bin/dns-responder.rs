//! A standalone DNS responder for the benchmarks (bench/authentication.sh): the test
//! kit's [`DnsServer`] on 127.0.0.1, serving the records given on the command line, until
//! its standard input closes. It prints `127.0.0.1:PORT` once it listens.
//!
//! Usage: `dns-responder [--ttl SECONDS] [--txt NAME=TEXT]... [--a NAME=IPV4]...`

use std::io::Read;
use std::net::Ipv4Addr;

use postern_testkit::DnsServer;

fn main() {
    let server = DnsServer::start();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            fail(&format!("{flag} needs a value"));
        };
        match flag.as_str() {
            "--ttl" => match value.parse() {
                Ok(ttl) => server.set_ttl(ttl),
                Err(_) => fail(&format!("--ttl {value}: not a number of seconds")),
            },
            "--txt" | "--a" => {
                let Some((name, data)) = value.split_once('=') else {
                    fail(&format!("{flag} {value}: expected NAME=VALUE"));
                };
                if flag == "--txt" {
                    server.add_txt(name, data);
                } else {
                    match data.parse::<Ipv4Addr>() {
                        Ok(ip) => server.add_a(name, ip),
                        Err(_) => fail(&format!("--a {value}: not an IPv4 address")),
                    }
                }
            }
            _ => fail(&format!("unknown option {flag}")),
        }
    }
    println!("{}", server.addr());
    // Serve until whoever started us closes our standard input (or kills us).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

fn fail(why: &str) -> ! {
    eprintln!("dns-responder: {why}");
    std::process::exit(2);
}
