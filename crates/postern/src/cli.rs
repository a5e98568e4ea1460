//! The command line (interface: "Command line"). Glue only: parse arguments, load the
//! configuration, call into the library, turn errors into messages and exit codes.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::control;
use crate::delivery;
use crate::policy::RecipientList;
use crate::queue::{self, QueueId};

#[derive(Parser, Debug)]
#[command(
    name = "postern",
    about = "Postern SMTP relay",
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay (default config: ./postern.toml if present, else built-in defaults).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Parse and validate the configuration, print the effective relay policy.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Make the running server read its configuration again (also: SIGHUP). Checked
    /// here first; exit 1 with the error if it is invalid, and nothing changes.
    Reload {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Inspect and manage the queue (safe while the server runs).
    Queue {
        #[command(subcommand)]
        action: QueueAction,
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Manage the users file of SMTP AUTH (`[auth] users_file`).
    User {
        #[command(subcommand)]
        action: UserAction,
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Inspect and manage quarantined messages (held by a filter).
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Simulate a client: for each recipient, the reply it would get and the rule that
    /// decides, through the server's own session and policy code. Nothing is sent and no
    /// DNS is asked (unless --dnsbl); exit 0 whatever the verdicts.
    CheckPolicy {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(flatten)]
        question: PolicyQuestion,
    },
    /// Run every known relay trick through the configured policy; exit 1 if any relays.
    SelfTest {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The client the tricks come from.
        #[arg(long, value_name = "IP", default_value = "192.0.2.1")]
        client: IpAddr,
        /// Print every trick and its reply, not only those relayed.
        #[arg(long, short)]
        verbose: bool,
    },
    /// DKIM keys: make one, or check that the configured ones are published.
    Dkim {
        #[command(subcommand)]
        action: DkimAction,
    },
    /// Print the version.
    Version,
}

#[derive(Subcommand, Debug)]
enum DkimAction {
    /// Write a new private key (mode 0600) and print the DNS record to publish.
    Keygen {
        domain: String,
        selector: String,
        #[arg(long, value_enum, default_value = "rsa")]
        algorithm: KeyAlgorithm,
        /// RSA key size (2048 to 8192).
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Look up each [[dkim]] key record in DNS: published, missing or mismatch.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum KeyAlgorithm {
    Rsa,
    Ed25519,
}

#[derive(Subcommand, Debug)]
enum QuarantineAction {
    /// Every quarantined message: id, date, sender, recipients, subject, rule.
    List {
        /// One JSON object per message and line.
        #[arg(long)]
        json: bool,
    },
    /// One message: the reason and its header.
    Show { id: QueueId },
    /// Queue it for its original recipients, without screening it again.
    Release { id: QueueId },
    /// Remove it for good.
    Delete { id: QueueId },
}

#[derive(Subcommand, Debug)]
enum QueueAction {
    /// Every queued message: id, age, size, sender, recipients with state and last error.
    List {
        /// One JSON object per message and line.
        #[arg(long)]
        json: bool,
        /// Only messages with a pending recipient at this domain (exactly this one, not
        /// its subdomains).
        #[arg(long, value_name = "DOMAIN")]
        domain: Option<String>,
    },
    /// One message: envelope, recipients, headers.
    Show { id: QueueId },
    /// Attempt every deferred message now.
    Flush,
    /// Remove a message from the queue without delivering it further.
    Delete {
        /// The message to remove.
        #[arg(required_unless_present = "domain", conflicts_with = "domain")]
        id: Option<QueueId>,
        /// Instead: every message whose pending recipients are all at this domain (a
        /// message with recipients elsewhere too is kept, and counted).
        #[arg(long, value_name = "DOMAIN")]
        domain: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum UserAction {
    /// Add a user (fails if the name exists).
    Add {
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
        /// A sender address (MAIL FROM) the user may use with `[auth] restrict_senders`;
        /// repeat for several.
        #[arg(long = "address", value_name = "ADDR")]
        addresses: Vec<String>,
    },
    /// Set a user's password (fails if the name does not exist); with --address, also
    /// replace its sender addresses.
    Passwd {
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
        /// The user's sender addresses, replacing those in the file; repeat for several.
        #[arg(long = "address", value_name = "ADDR")]
        addresses: Vec<String>,
    },
    /// Remove a user.
    Del { name: String },
    /// List the users and their sender addresses (never the hashes).
    List,
}

#[derive(clap::Args, Debug)]
struct PasswordArgs {
    /// Read the password from the first line of standard input instead of a prompt.
    #[arg(long)]
    password_stdin: bool,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => check_config(config),
        Command::Reload { config } => reload(config),
        Command::Queue { action, config } => queue(action, config),
        Command::User { action, config } => match user(action, config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("postern: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Quarantine { action, config } => print_result(quarantine_cmd(action, config)),
        Command::CheckPolicy { config, question } => print_result(check_policy(config, question)),
        Command::SelfTest {
            config,
            client,
            verbose,
        } => self_test(config, client, verbose),
        Command::Dkim { action } => dkim(action),
        Command::Version => {
            println!("postern {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}

/// Sets up the log on stderr, in the configured `log_format`. Called once the
/// configuration is loaded (so a configuration error before it is printed as plain
/// text); a change of `log_format` therefore needs a restart.
fn init_logging(format: crate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        crate::config::LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // One object per line: `timestamp`, `level`, `target` and the event's fields
        // (`message` and the decision log's `key=value` fields) at the top level.
        crate::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

fn serve(path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load_default_or_file(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postern: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(config.log_format);
    match &config.source {
        Some(p) => tracing::info!(config = %p.display(), "configuration loaded"),
        None => tracing::info!("no configuration file: using built-in defaults"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("postern: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(crate::serve::serve(config));
    // Tasks still running (sessions past the grace period, a blocking password check)
    // are abandoned, not waited for: everything durable is already on disk.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("postern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load_default_or_file(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postern: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", config.describe());
    let mut ok = true;
    if let Some(file) = &config.relay.recipients_file {
        match RecipientList::load(file) {
            Ok(list) => println!("recipients file: {} entries", list.len()),
            Err(e) => {
                eprintln!("postern: {e}");
                ok = false;
            }
        }
    }
    match crate::dkim::Signer::new(&config.dkim) {
        Ok(signer) => {
            for line in signer.describe() {
                println!("dkim signing (trusted and authenticated clients): {line}");
            }
        }
        Err(e) => {
            eprintln!("postern: [[dkim]] key {e}");
            ok = false;
        }
    }
    for feature in config.unsupported_features() {
        eprintln!("postern: not available in this version: {feature}");
        ok = false;
    }
    // What `serve` would do, started by whoever runs this: root with a listener off
    // loopback and no user fails here too. A missing user, or "that needs root", is
    // only a warning: the file may be checked before the package creates the user, or
    // by an unprivileged account; serve refuses to start on either.
    use crate::privileges::{Plan, PrivilegeError};
    match crate::privileges::plan(&config) {
        Ok(Plan::Drop(a)) => println!(
            "user {}: uid {}, gid {}, groups {}",
            a.name,
            a.uid,
            a.gid,
            a.groups
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Ok(Plan::Stay) => {}
        Err(e @ (PrivilegeError::NeedsRoot { .. } | PrivilegeError::GroupNeedsRoot { .. })) => {
            println!("note: {e}");
        }
        Err(e @ (PrivilegeError::UnknownUser(_) | PrivilegeError::UnknownGroup(_))) => {
            println!("warning: {e} (yet): serve will refuse to start until it does");
        }
        Err(e) => {
            eprintln!("postern: {e}");
            ok = false;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `postern reload`: the file is validated here (to find the server's control socket in
/// its spool, and to show a mistake at once), then the server reads it again itself and
/// answers with what changed, or why it kept the configuration in use.
fn reload(path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load_default_or_file(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postern: {e}");
            eprintln!("postern: nothing reloaded");
            return ExitCode::FAILURE;
        }
    };
    let Some(answer) = control::request(&config.spool_dir, "RELOAD") else {
        eprintln!(
            "postern: no server answers on {} (is it running with this spool?)",
            control::socket_path(&config.spool_dir).display()
        );
        return ExitCode::FAILURE;
    };
    match answer.strip_prefix("ERR ") {
        Some(why) => {
            eprint!("postern: reload failed, the configuration in use is unchanged: {why}");
            ExitCode::FAILURE
        }
        None => {
            print!("{}", answer.strip_prefix("OK ").unwrap_or(&answer));
            ExitCode::SUCCESS
        }
    }
}

fn queue(action: QueueAction, path: Option<PathBuf>) -> ExitCode {
    // The command line first: a wrong one is exit 2 whatever the configuration.
    let request = match queue_request(&action) {
        Ok(r) => r,
        Err(why) => {
            eprintln!("postern: {why}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::load_default_or_file(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postern: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = &config.spool_dir;
    // The answer is copied as it arrives: a listing of a million starts at once.
    let mut stdout = std::io::stdout().lock();
    match control::request_to(dir, &request.line(), &mut stdout) {
        Ok(Some(true)) => ExitCode::SUCCESS,
        Ok(Some(false)) => ExitCode::FAILURE,
        // `postern queue list | head`: the reader has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postern: the server's answer was cut off: {e}");
            ExitCode::FAILURE
        }
        // No server answers: work on the spool itself.
        Ok(None) => print_result(queue_offline(request, dir)),
    }
}

/// The control request for a queue command (the domain checked and made canonical).
fn queue_request(action: &QueueAction) -> Result<control::Request, String> {
    use control::Request;
    let domain = |d: &Option<String>| d.as_deref().map(control::domain).transpose();
    Ok(match action {
        QueueAction::List { json, domain: d } => Request::List {
            json: *json,
            domain: domain(d)?,
        },
        QueueAction::Show { id } => Request::Show(*id),
        QueueAction::Flush => Request::Flush,
        QueueAction::Delete { id: Some(id), .. } => Request::Delete(*id),
        QueueAction::Delete { domain: d, .. } => {
            Request::DeleteDomain(domain(d)?.ok_or("a queue id or --domain is needed")?)
        }
    })
}

/// Prints a command's text, or its error chain; the exit code follows.
fn print_result(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("postern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn queue_offline(request: control::Request, dir: &std::path::Path) -> anyhow::Result<String> {
    use control::Request;
    use delivery::{AtDomain, pending_at, wanted_domain};
    if !dir.exists() {
        anyhow::bail!("no spool at {}", dir.display());
    }
    let find = |id: QueueId| -> anyhow::Result<queue::StoredMessage> {
        queue::scan(dir)?
            .into_iter()
            .find(|m| m.envelope.id == id)
            .ok_or_else(|| anyhow::anyhow!("{id}: no such message in the queue"))
    };
    let at = |m: &queue::StoredMessage, wanted: &str| {
        pending_at(
            m.envelope.recipients.iter().map(String::as_str),
            &m.states,
            wanted,
        )
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    Ok(match request {
        Request::List { json, domain } => {
            let mut messages = queue::scan(dir)?;
            if let Some(d) = &domain {
                let wanted = wanted_domain(d);
                messages.retain(|m| at(m, &wanted) != AtDomain::No);
            }
            let items = control::offline_items(messages);
            if json {
                control::format_list_json(&items, false)
            } else {
                format!(
                    "(postern is not running)\n{}",
                    control::format_list(&items, false, domain.as_deref())
                )
            }
        }
        Request::Show(id) => {
            let item = control::offline_items(vec![find(id)?]).remove(0);
            control::format_show(dir, &item, false)
        }
        Request::Flush => {
            "postern is not running: every queued message is attempted as soon as it starts\n"
                .to_string()
        }
        Request::Delete(id) => {
            // Take the spool (and its lock) so a server starting meanwhile cannot race us.
            let (spool, live) = queue::Spool::open(dir, queue::SpoolOptions::default())?;
            let msg = live
                .into_iter()
                .find(|m| m.envelope.id == id)
                .ok_or_else(|| anyhow::anyhow!("{id}: no such message in the queue"))?;
            runtime()?.block_on(spool.finish(id, msg.place, queue::Durability::Synced))?;
            crate::maillog::message_deleted(&id);
            spool.close();
            format!("OK {id} deleted\n")
        }
        Request::DeleteDomain(d) => {
            let (spool, live) = queue::Spool::open(dir, queue::SpoolOptions::default())?;
            let wanted = wanted_domain(&d);
            let mut result = delivery::DomainDeletion::default();
            let mut doomed = Vec::new();
            for m in &live {
                match at(m, &wanted) {
                    AtDomain::No => {}
                    AtDomain::AndElsewhere => result.kept += 1,
                    AtDomain::Only => doomed.push((m.envelope.id, m.place)),
                }
            }
            drop(live);
            let (done, failed) = runtime()?.block_on(delivery::finish_all(&spool, doomed));
            spool.close();
            result.deleted = done;
            result.failed = failed;
            let summary = control::deletion_summary(&d, result);
            if failed > 0 {
                // The same answer as online, and the same exit status.
                anyhow::bail!("{}", summary.trim_end());
            }
            summary
        }
        Request::Release(_) | Request::Reload => unreachable!("not a queue command"),
    })
}

/// `postern user ...`: edit the users file. The running server picks the change up by
/// itself (it checks the file at most once a second), so nothing needs a restart.
fn user(action: UserAction, path: Option<PathBuf>) -> anyhow::Result<()> {
    use crate::auth::{password, users};

    let config = Config::load_default_or_file(path.as_deref())?;
    let Some(file) = config.auth.users_file.clone() else {
        anyhow::bail!(
            "no users file: set users_file in the [auth] section of {}",
            match &config.source {
                Some(p) => p.display().to_string(),
                None => format!(
                    "the configuration (none given with --config, and no ./{} here)",
                    crate::config::DEFAULT_CONFIG_FILE
                ),
            }
        );
    };
    let check_addresses = |addresses: &[String]| -> anyhow::Result<()> {
        for a in addresses {
            users::check_address(a).map_err(anyhow::Error::msg)?;
        }
        Ok(())
    };
    match action {
        UserAction::List => {
            let list = users::UsersFile::load(&file, true)?;
            for u in list.users() {
                if u.addresses.is_empty() {
                    println!("{}", u.name);
                } else {
                    println!("{}\t{}", u.name, u.addresses.join(","));
                }
            }
        }
        UserAction::Add {
            name,
            password: how,
            addresses,
        } => {
            users::check_new_name(&name).map_err(anyhow::Error::msg)?;
            check_addresses(&addresses)?;
            let mut list = users::UsersFile::load(&file, true)?;
            if list.get(&name).is_some() {
                return Err(crate::auth::AuthError::UserExists(name).into());
            }
            let hash = password::hash(&read_password(&name, &how)?)?;
            list.add(users::User {
                name: name.clone(),
                hash,
                addresses,
            })?;
            list.save(&file)?;
            println!("user {name} added to {}", file.display());
        }
        UserAction::Passwd {
            name,
            password: how,
            addresses,
        } => {
            check_addresses(&addresses)?;
            let mut list = users::UsersFile::load(&file, true)?;
            if list.get(&name).is_none() {
                return Err(crate::auth::AuthError::NoSuchUser(name).into());
            }
            let hash = password::hash(&read_password(&name, &how)?)?;
            let addresses = (!addresses.is_empty()).then_some(addresses);
            list.set_password(&name, hash, addresses)?;
            list.save(&file)?;
            println!("password of {name} changed in {}", file.display());
        }
        UserAction::Del { name } => {
            let mut list = users::UsersFile::load(&file, true)?;
            list.remove(&name)?;
            list.save(&file)?;
            println!("user {name} removed from {}", file.display());
        }
    }
    Ok(())
}

/// The new password: one line of standard input with --password-stdin (its line ending
/// is not part of it), else typed twice at a prompt without echo.
fn read_password(name: &str, how: &PasswordArgs) -> anyhow::Result<String> {
    let password = if how.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| anyhow::anyhow!("cannot read the password from standard input: {e}"))?;
        let line = line.strip_suffix('\n').unwrap_or(&line);
        line.strip_suffix('\r').unwrap_or(line).to_string()
    } else {
        let prompt = |text: &str| {
            rpassword::prompt_password(text).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read the password from the terminal ({e}); use --password-stdin"
                )
            })
        };
        let first = prompt(&format!("New password for {name}: "))?;
        let second = prompt("Again: ")?;
        if first != second {
            anyhow::bail!("the two passwords differ; nothing changed");
        }
        first
    };
    if password.is_empty() {
        anyhow::bail!("empty password refused; nothing changed");
    }
    Ok(password)
}

fn quarantine_cmd(action: QuarantineAction, path: Option<PathBuf>) -> anyhow::Result<String> {
    let config = Config::load_default_or_file(path.as_deref())?;
    let dir = config.spool_dir.as_path();
    Ok(match action {
        // Read from the spool even while a server runs: quarantine files are written
        // whole (durable::write), so there is nothing half-done to see.
        QuarantineAction::List { json: false } => {
            control::format_quarantine(dir, &queue::quarantine::list(dir)?)
        }
        QuarantineAction::List { json: true } => {
            control::format_quarantine_json(dir, &queue::quarantine::list(dir)?)
        }
        QuarantineAction::Show { id } => {
            let (q, body) = queue::quarantine::load(dir, id)?;
            control::format_quarantined(&q, &body)
        }
        QuarantineAction::Delete { id } => {
            queue::quarantine::remove(dir, id)?;
            format!("OK {id} deleted from the quarantine\n")
        }
        QuarantineAction::Release { id } => {
            if let Some(answer) = control::request(dir, &format!("RELEASE {id}")) {
                if answer.starts_with("ERR") {
                    anyhow::bail!("{}", answer.trim_end());
                }
                answer
            } else {
                // No server: put it in the spool ourselves (taking its lock); the next
                // start delivers it.
                let (spool, _) = queue::Spool::open(dir, queue::SpoolOptions::default())?;
                let (mut q, body) = queue::quarantine::load(dir, id)?;
                q.envelope.arrived = queue::unix_now();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(spool.store_message(q.envelope, body))?;
                queue::quarantine::remove(dir, id)?;
                spool.close();
                format!("OK {id} released to the queue (delivered when postern starts)\n")
            }
        }
    })
}

/// `postern check-policy`'s arguments.
#[derive(clap::Args, Debug)]
struct PolicyQuestion {
    /// The client's address.
    #[arg(long, value_name = "IP")]
    client: IpAddr,
    /// The EHLO name (default: the client's address literal).
    #[arg(long, value_name = "NAME")]
    helo: Option<String>,
    /// The client authenticated as USER (no password is checked).
    #[arg(long, value_name = "USER")]
    auth: Option<String>,
    /// The client uses TLS (STARTTLS done).
    #[arg(long)]
    tls: bool,
    /// MAIL FROM address ("" for the null sender <>).
    #[arg(long, value_name = "ADDR")]
    from: String,
    /// RCPT TO address; repeat for several.
    #[arg(long = "to", value_name = "ADDR", required = true)]
    to: Vec<String>,
    /// The listener the client connects to (default: the first one).
    #[arg(long, value_name = "IP:PORT")]
    listener: Option<SocketAddr>,
    /// Look the client up in the configured DNS blocklists (real DNS queries).
    #[arg(long)]
    dnsbl: bool,
}

/// An address as a path: `bob@x` becomes `<bob@x>`, `""` the null path `<>`; a path
/// already in angle brackets is sent as written.
fn as_path(addr: &str) -> String {
    if addr.starts_with('<') {
        addr.to_string()
    } else {
        format!("<{addr}>")
    }
}

/// `postern check-policy`: one line per recipient, in the contract's form.
fn check_policy(path: Option<PathBuf>, q: PolicyQuestion) -> anyhow::Result<String> {
    use crate::simulate::{Probe, Simulator};
    use std::fmt::Write as _;

    let config = Config::load_default_or_file(path.as_deref())?;
    let sim = Simulator::new(&config)?;
    let listener = match q.listener {
        None => 0,
        Some(addr) => config
            .listeners
            .iter()
            .position(|l| l.address == addr)
            .ok_or_else(|| anyhow::anyhow!("no listener on {addr} in the configuration"))?,
    };
    if let Some(user) = &q.auth
        && sim.knows_user(user) == Some(false)
    {
        eprintln!("postern: note: {user} is not in the users file (decided as if it were)");
    }
    let exempt = sim.policy().dnsbl_exempt(q.client, q.auth.is_some());
    let listed = if config.relay.dnsbl.is_empty() || exempt {
        None
    } else if q.dnsbl {
        let resolver = crate::dns::Resolver::new(&config.delivery.dns_servers)?;
        let lists = crate::policy::dnsbl::Dnsbl::new(config.relay.dnsbl.clone(), resolver);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(lists.check(q.client))
    } else {
        eprintln!(
            "postern: note: the DNS blocklists were not queried (--dnsbl does); the client \
             is taken as not listed"
        );
        None
    };
    let helo = q.helo.unwrap_or_else(|| match q.client {
        IpAddr::V4(a) => format!("[{a}]"),
        IpAddr::V6(a) => format!("[IPv6:{a}]"),
    });
    let probe = Probe {
        client: q.client,
        helo: &helo,
        auth: q.auth.as_deref(),
        tls: q.tls,
        dnsbl: listed.as_deref(),
        listener,
    };
    let from = as_path(&q.from);
    let mut out = String::new();
    let mut mail_said = false;
    for to in &q.to {
        let verdict = sim.check(&probe, &from, &as_path(to))?;
        if let Some((sent, answer, rule)) = &verdict.mail_refused
            && !mail_said
        {
            mail_said = true;
            let _ = writeln!(out, "{sent}: {} (rule {rule})", answer_summary(answer));
        }
        let _ = writeln!(out, "{}", verdict.line());
    }
    Ok(out)
}

fn answer_summary(a: &crate::simulate::Answer) -> String {
    match &a.status {
        Some(s) => format!("{} {s} refused", a.code),
        None => format!("{} refused", a.code),
    }
}

/// `postern self-test`: exit 0 when no trick relays, 1 when one does or on an error.
fn self_test(path: Option<PathBuf>, client: IpAddr, verbose: bool) -> ExitCode {
    let run = || -> anyhow::Result<crate::simulate::SelfTest> {
        let config = Config::load_default_or_file(path.as_deref())?;
        let sim = crate::simulate::Simulator::new(&config)?;
        Ok(sim.self_test(client)?)
    };
    let report = match run() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("postern: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "self-test: relay tricks from {client} (accepted domain {}, outside domain {})",
        report.targets.accepted, report.targets.outside
    );
    let lines = if verbose {
        &report.all
    } else {
        &report.relayed
    };
    for line in lines {
        println!("{line}");
    }
    let n = report.relayed.len();
    if n == 0 {
        println!("open relay: NO (0 of {} tricks relayed)", report.runs);
        ExitCode::SUCCESS
    } else {
        println!("open relay: YES ({n} of {} tricks relayed)", report.runs);
        ExitCode::FAILURE
    }
}

/// `postern dkim keygen` and `postern dkim check`.
fn dkim(action: DkimAction) -> ExitCode {
    use crate::dkim::key;
    match action {
        DkimAction::Keygen {
            domain,
            selector,
            algorithm,
            bits,
            out,
        } => {
            let algorithm = match algorithm {
                KeyAlgorithm::Rsa => key::Algorithm::Rsa,
                KeyAlgorithm::Ed25519 => key::Algorithm::Ed25519,
            };
            let domain = match crate::config::normalize_domain(&domain) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("postern: domain {e}");
                    return ExitCode::FAILURE;
                }
            };
            let (pem, made) = match key::generate(algorithm, bits) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("postern: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let options = crate::durable::Options {
                replace: crate::durable::Replace::No,
                mode: crate::durable::Mode::PRIVATE,
            };
            if let Err(e) = crate::durable::write(&out, pem.as_bytes(), options) {
                eprintln!("postern: cannot write the key: {e}");
                return ExitCode::FAILURE;
            }
            eprintln!(
                "postern: key written to {} (mode 0600); publish:",
                out.display()
            );
            println!("{}", key::zone_line(&domain, &selector, &made));
            ExitCode::SUCCESS
        }
        DkimAction::Check { config } => {
            let config = match Config::load_default_or_file(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("postern: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("postern: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let (report, all_published) = runtime.block_on(crate::dkim::check(&config));
            print!("{report}");
            if all_published {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
