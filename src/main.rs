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
    /// Triage a sender domain's authentication setup (SPF, DKIM, DMARC, MX,
    /// blocklists). Exit 0 healthy, 1 degraded, 2 broken, 3 could not check.
    CheckDomain {
        domain: String,
        /// DKIM selector that must be published (repeatable).
        #[arg(long = "selector", short = 's')]
        selectors: Vec<String>,
        /// IP receivers will see for mail from the relay; SPF must pass for it (repeatable).
        #[arg(long = "relay-ip")]
        relay_ips: Vec<std::net::IpAddr>,
        /// Resolver to ask, `IP` or `IP:PORT` (default: the system's, repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// DNSBL zone to look the relay IPs up in (repeatable).
        #[arg(long = "dnsbl-ip-zone")]
        ip_zones: Vec<String>,
        /// Domain blocklist zone to look the domain up in (repeatable).
        #[arg(long = "dnsbl-domain-zone")]
        domain_zones: Vec<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
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
        Cmd::CheckDomain {
            domain,
            selectors,
            relay_ips,
            dns,
            ip_zones,
            domain_zones,
            json,
        } => check_domain(domain, selectors, relay_ips, dns, ip_zones, domain_zones, json),
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

fn check_domain(
    domain: String,
    selectors: Vec<String>,
    relay_ips: Vec<std::net::IpAddr>,
    dns: Vec<String>,
    ip_zones: Vec<String>,
    domain_zones: Vec<String>,
    json: bool,
) -> ExitCode {
    use sendguard::guard::{health, report};
    let Some(ascii) = sendguard::dns::ascii_domain(&domain) else {
        eprintln!("{domain:?} is not a domain name");
        return ExitCode::from(3);
    };
    for ns in &dns {
        if sendguard::config::parse_nameserver(ns).is_none() {
            eprintln!("--dns {ns:?}: not an IP address or IP:PORT");
            return ExitCode::from(3);
        }
    }
    let cfg = sendguard::config::DnsConfig {
        nameservers: dns,
        ..Default::default()
    };
    let inputs = health::Inputs {
        relay_ips,
        helo: "sendguard.invalid".to_string(),
        selectors,
        dnsbl_ip_zones: ip_zones,
        dnsbl_domain_zones: domain_zones,
        signing_key: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        let dns = sendguard::dns::Dns::new(&cfg)?;
        anyhow::Ok(health::evaluate(&dns, &ascii, &inputs).await)
    });
    match result {
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::from(3)
        }
        Ok(Err(temp)) => {
            if json {
                let v = serde_json::json!({"domain": ascii, "status": "unknown", "error": temp.to_string()});
                println!("{v}");
            } else {
                println!("{ascii}: could not check (DNS: {temp})");
            }
            ExitCode::from(3)
        }
        Ok(Ok(h)) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&h).expect("serializable"));
            } else {
                print!("{}", report::render(&h));
            }
            ExitCode::from(match h.status {
                report::Status::Healthy => 0,
                report::Status::Degraded => 1,
                report::Status::Broken => 2,
            })
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
