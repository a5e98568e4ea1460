//! The command line (interface: "Command line"). Glue only: parse arguments, load the
//! configuration, call into the library, turn errors into messages and exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Print the version.
    Version,
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

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => check_config(config),
        Command::Queue { action, config } => queue(action, config),
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
    match runtime.block_on(crate::server::serve(config)) {
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
    match queue_offline(action, dir) {
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
