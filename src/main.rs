//! The `sendguard` command: CLI parsing, logging and signals only; the
//! work is in the library.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use sendguard::config::{Config, LogFormat};

#[derive(Parser)]
#[command(name = "sendguard", version, about = "Outbound send-guard SMTP proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
        /// Log as JSON lines (overrides log.format).
        #[arg(long)]
        log_json: bool,
    },
    /// Validate a config file; exits 1 with the offending key on error.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Read a password on stdin and print its argon2id PHC hash.
    HashPassword,
    /// Inspect the queue (reads the spool; works with the server running or not).
    Queue {
        #[command(subcommand)]
        cmd: QueueCmd,
    },
}

#[derive(Subcommand)]
enum QueueCmd {
    /// One line per queued message, oldest first.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// A message's envelope, per-recipient state and attempt history.
    Show {
        id: String,
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn queue_cmd(cmd: QueueCmd) -> ExitCode {
    use sendguard::queue::inspect;
    let config = match &cmd {
        QueueCmd::List { config, .. } | QueueCmd::Show { config, .. } => config.clone(),
    };
    let cfg = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", config.display());
            return ExitCode::FAILURE;
        }
    };
    let Some(spool) = &cfg.spool else {
        eprintln!("{}: spool: no [spool] section, so there is no queue", config.display());
        return ExitCode::FAILURE;
    };
    let dir = cfg.resolve(&spool.dir);
    let result = match cmd {
        QueueCmd::List { json, .. } => inspect::list(&dir).map(|items| {
            if json {
                items.iter().map(|s| serde_json::to_string(s).unwrap() + "\n").collect()
            } else {
                inspect::render_list(&items)
            }
        }),
        QueueCmd::Show { id, json, .. } => match inspect::show(&dir, &id) {
            Ok(Some(env)) if json => Ok(serde_json::to_string_pretty(&env).unwrap() + "\n"),
            Ok(Some(env)) => Ok(inspect::render_show(&env)),
            Ok(None) => {
                eprintln!("no queued message {id}");
                return ExitCode::from(2);
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Queue { cmd } => queue_cmd(cmd),
        Cmd::CheckConfig { config } => match Config::load(&config) {
            Ok(cfg) => {
                let users: usize = cfg.tenants.iter().map(|t| t.users.len()).sum();
                println!(
                    "{}: OK ({} listeners, {} tenants, {} users)",
                    config.display(),
                    cfg.listeners.len(),
                    cfg.tenants.len(),
                    users
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::FAILURE
            }
        },
        Cmd::HashPassword => {
            let mut input = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut input) {
                eprintln!("cannot read stdin: {e}");
                return ExitCode::FAILURE;
            }
            let password = input
                .strip_suffix('\n')
                .map(|s| s.strip_suffix('\r').unwrap_or(s))
                .unwrap_or(&input);
            if password.is_empty() {
                eprintln!("empty password on stdin");
                return ExitCode::FAILURE;
            }
            match sendguard::server::auth::hash_password(password) {
                Ok(h) => {
                    println!("{h}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("hashing failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Serve { config, log_json } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    return ExitCode::FAILURE;
                }
            };
            init_logging(&cfg, log_json);
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(serve(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("sendguard: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(cfg: &Config, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SENDGUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json || cfg.log.format == LogFormat::Json {
        builder.json().with_current_span(true).with_span_list(false).init();
    } else {
        builder.init();
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let listeners = sendguard::server::bind(&cfg).await?;
    let pipeline = sendguard::pipeline::Pipeline::start(&cfg).await?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        trigger.cancel();
    });
    let served = sendguard::server::run(
        Arc::clone(&cfg),
        listeners,
        Arc::clone(&pipeline.sink),
        pipeline.events.clone(),
        shutdown,
    )
    .await;
    pipeline.shutdown(cfg.server.shutdown_grace).await;
    served
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
