//! The command line (interface: "Command line"). Glue only: parse arguments, load the
//! configuration, call into the library, turn errors into messages and exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::control;
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
    /// Print the version.
    Version,
}

#[derive(Subcommand, Debug)]
enum QuarantineAction {
    /// Every quarantined message: id, date, sender, recipients, subject, rule.
    List,
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
    List,
    /// One message: envelope, recipients, headers.
    Show { id: QueueId },
    /// Attempt every deferred message now.
    Flush,
    /// Remove a message from the queue without delivering it further.
    Delete { id: QueueId },
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
        Command::Queue { action, config } => queue(action, config),
        Command::User { action, config } => match user(action, config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("postern: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Quarantine { action, config } => print_result(quarantine_cmd(action, config)),
        Command::Version => {
            println!("postern {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn serve(path: Option<PathBuf>) -> ExitCode {
    init_logging();
    let config = match Config::load_default_or_file(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postern: {e}");
            return ExitCode::FAILURE;
        }
    };
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

fn queue(action: QueueAction, path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load_default_or_file(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postern: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = &config.spool_dir;
    let online = match &action {
        QueueAction::List => control::request(dir, "LIST"),
        QueueAction::Show { id } => control::request(dir, &format!("SHOW {id}")),
        QueueAction::Flush => control::request(dir, "FLUSH"),
        QueueAction::Delete { id } => control::request(dir, &format!("DELETE {id}")),
    };
    if let Some(answer) = online {
        print!("{answer}");
        return if answer.starts_with("ERR") {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    // No server answers: work on the spool itself.
    print_result(queue_offline(action, dir))
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

fn queue_offline(action: QueueAction, dir: &std::path::Path) -> anyhow::Result<String> {
    if !dir.exists() {
        anyhow::bail!("no spool at {}", dir.display());
    }
    let find = |id: QueueId| -> anyhow::Result<queue::StoredMessage> {
        queue::scan(dir)?
            .into_iter()
            .find(|m| m.envelope.id == id)
            .ok_or_else(|| anyhow::anyhow!("{id}: no such message in the queue"))
    };
    Ok(match action {
        QueueAction::List => {
            let items = control::offline_items(queue::scan(dir)?);
            format!(
                "(postern is not running)\n{}",
                control::format_list(&items, false)
            )
        }
        QueueAction::Show { id } => {
            let item = control::offline_items(vec![find(id)?]).remove(0);
            control::format_show(dir, &item, false)
        }
        QueueAction::Flush => {
            "postern is not running: every queued message is attempted as soon as it starts\n"
                .to_string()
        }
        QueueAction::Delete { id } => {
            // Take the spool (and its lock) so a server starting meanwhile cannot race us.
            let (spool, live) = queue::Spool::open(dir, queue::SpoolOptions::default())?;
            let msg = live
                .into_iter()
                .find(|m| m.envelope.id == id)
                .ok_or_else(|| anyhow::anyhow!("{id}: no such message in the queue"))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(spool.finish(id, msg.place))?;
            spool.close();
            format!("OK {id} deleted\n")
        }
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
        QuarantineAction::List => control::format_quarantine(dir, &queue::quarantine::list(dir)?),
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
                runtime.block_on(spool.store_message(q.envelope, &body))?;
                queue::quarantine::remove(dir, id)?;
                spool.close();
                format!("OK {id} released to the queue (delivered when postern starts)\n")
            }
        }
    })
}
