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
    /// Classify an upstream reply: outcome, failure category, stage and the
    /// rule that matched. Accepts `550-5.1.1 text`, multi-line replies and
    /// DSN `Diagnostic-Code: smtp; ...` lines. A text without a reply code
    /// is read as a bounce text; in delivery, a failure without a reply
    /// (connection, timeout, TLS) is always retried.
    Classify {
        reply: String,
        /// Use this config's `classify.rules_file` as well.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print `{"outcome", "category", "stage", "rule"}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage the suppression list through a running server's admin API.
    Suppress {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        cmd: SuppressCmd,
    },
    /// Show one message's whole life (`sendguard trace ID`), or search the
    /// trace (`sendguard trace --rcpt a@b.example --since 2h`).
    Trace {
        #[command(flatten)]
        api: ApiArgs,
        /// The message id (`queued as ID`); omit to search.
        id: Option<String>,
        #[arg(long)]
        rcpt: Option<String>,
        /// Envelope sender ("" for the null sender).
        #[arg(long)]
        sender: Option<String>,
        /// The Message-ID header.
        #[arg(long)]
        message_id: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        /// RFC 3339 time or a duration ago (90m, 2d).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drain a running node (Kubernetes preStop, systemd ExecStop): it stops
    /// accepting SMTP connections and reports not ready; delivery goes on.
    /// Waits until its sessions have ended, at most `--wait`. Exit 0 when
    /// none is left, 1 when some still are (or on error).
    Drain {
        #[command(flatten)]
        api: ApiArgs,
        /// Longest wait for open sessions to end (humantime, e.g. 25s).
        #[arg(long, default_value = "25s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Inspect the queue (reads the spool; works with the server running or not).
    Queue {
        #[command(subcommand)]
        cmd: QueueCmd,
    },
}

/// Where the admin API is: `--config` reads `[admin]` addr and token;
/// `--url`/`--token` (or SENDGUARD_ADMIN_URL / SENDGUARD_ADMIN_TOKEN) override.
#[derive(clap::Args)]
struct ApiArgs {
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[arg(long, global = true, env = "SENDGUARD_ADMIN_URL")]
    url: Option<String>,
    #[arg(long, global = true, env = "SENDGUARD_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum SuppressCmd {
    /// Suppress an address (for every tenant, or one with --tenant).
    Add {
        address: String,
        #[arg(long)]
        tenant: Option<String>,
        /// hard_bounce, complaint, unsubscribe or manual (default).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        source: Option<String>,
        /// RFC 3339 time after which the entry no longer applies.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Lift a suppression (global, or the tenant's with --tenant).
    Remove {
        address: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List entries (filters: address substring, tenant, reason).
    List {
        #[arg(long)]
        address: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Import a CSV or JSON-lines file (format from --format or the extension).
    Import {
        file: PathBuf,
        #[arg(long)]
        format: Option<String>,
    },
    /// Export every entry as CSV or JSON lines to stdout or --output.
    Export {
        #[arg(long, default_value = "jsonl")]
        format: String,
        #[arg(long, short)]
        output: Option<PathBuf>,
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
        Cmd::Drain { api, wait } => drain_cmd(api, wait),
        Cmd::Suppress { api, cmd } => suppress_cmd(api, cmd),
        Cmd::Trace {
            api,
            id,
            rcpt,
            sender,
            message_id,
            tenant,
            since,
            until,
            limit,
            json,
        } => {
            let search = [
                ("rcpt", rcpt),
                ("sender", sender),
                ("message_id", message_id),
                ("tenant", tenant),
                ("since", since),
                ("until", until),
                ("limit", limit.map(|n| n.to_string())),
            ];
            trace_cmd(api, id, &search, json)
        }
        Cmd::Classify { reply, config, json } => classify(&reply, config, json),
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
            match rt.block_on(serve(cfg, config)) {
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

/// The admin API client `--config` or `--url`/`--token` point at; the
/// error is printed.
fn admin_client(api: ApiArgs) -> Result<sendguard::admin::client::AdminClient, ExitCode> {
    let (mut url, mut token) = (None, None);
    if let Some(path) = &api.config {
        match Config::load(path) {
            Ok(cfg) => match &cfg.admin {
                Some(a) => {
                    url = Some(format!("http://{}", a.addr));
                    token = Some(a.token.clone());
                }
                None => {
                    eprintln!(
                        "{}: admin: no [admin] section, so there is no API to talk to",
                        path.display()
                    );
                    return Err(ExitCode::FAILURE);
                }
            },
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                return Err(ExitCode::FAILURE);
            }
        }
    }
    let (Some(url), Some(token)) = (api.url.or(url), api.token.or(token)) else {
        eprintln!(
            "say where the admin API is: --config FILE, or --url and --token (SENDGUARD_ADMIN_URL, SENDGUARD_ADMIN_TOKEN)"
        );
        return Err(ExitCode::FAILURE);
    };
    sendguard::admin::client::AdminClient::new(&url, token).map_err(|e| {
        eprintln!("--url: {e}");
        ExitCode::FAILURE
    })
}

/// One API call; a failure is printed (`status: field: error`) and becomes
/// exit code 2 for 404, 1 otherwise.
fn api_call(
    client: &sendguard::admin::client::AdminClient,
    method: hyper::Method,
    path: &str,
    ct: Option<&str>,
    body: Vec<u8>,
) -> Result<Vec<u8>, ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let call =
        async { tokio::time::timeout(std::time::Duration::from_secs(60), client.call(method, path, ct, body)).await };
    let (status, resp) = match rt.block_on(call) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            eprintln!("{e:#}");
            return Err(ExitCode::FAILURE);
        }
        Err(_) => {
            eprintln!("the admin API did not answer within 60 s");
            return Err(ExitCode::FAILURE);
        }
    };
    if status.is_success() {
        return Ok(resp);
    }
    let text = String::from_utf8_lossy(&resp);
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => match v["field"].as_str() {
            Some(f) => eprintln!("{}: {f}: {}", status.as_u16(), v["error"].as_str().unwrap_or("")),
            None => eprintln!("{}: {}", status.as_u16(), v["error"].as_str().unwrap_or(&text)),
        },
        Err(_) => eprintln!("{}: {}", status.as_u16(), text.trim()),
    }
    Err(if status == hyper::StatusCode::NOT_FOUND {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    })
}

fn trace_cmd(api: ApiArgs, id: Option<String>, search: &[(&str, Option<String>)], json: bool) -> ExitCode {
    use sendguard::admin::client::encode;
    use sendguard::trace::{MessageSummary, MessageTrace, render};
    let filters: Vec<String> = search
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    let path = match (&id, filters.is_empty()) {
        (Some(_), false) => {
            eprintln!("give a message id or search options, not both");
            return ExitCode::FAILURE;
        }
        (None, true) => {
            eprintln!("give a message id, or search with --rcpt, --sender, --message-id, --tenant, --since, --until");
            return ExitCode::FAILURE;
        }
        (Some(id), true) => format!("/api/v1/messages/{}", encode(id)),
        (None, false) => format!("/api/v1/messages?{}", filters.join("&")),
    };
    let client = match admin_client(api) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let resp = match api_call(&client, hyper::Method::GET, &path, None, Vec::new()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if json {
        print!("{}", String::from_utf8_lossy(&resp));
        return ExitCode::SUCCESS;
    }
    let text = if id.is_some() {
        serde_json::from_slice::<MessageTrace>(&resp).map(|t| render::message(&t))
    } else {
        #[derive(serde::Deserialize)]
        struct Found {
            messages: Vec<MessageSummary>,
        }
        serde_json::from_slice::<Found>(&resp).map(|f| render::summaries(&f.messages))
    };
    match text {
        Ok(t) => {
            print!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unexpected answer from the API: {e}");
            ExitCode::FAILURE
        }
    }
}

fn suppress_cmd(api: ApiArgs, cmd: SuppressCmd) -> ExitCode {
    use sendguard::admin::client::encode;
    let client = match admin_client(api) {
        Ok(c) => c,
        Err(code) => return code,
    };
    use hyper::Method;
    let q = |pairs: &[(&str, &Option<String>)]| -> String {
        let parts: Vec<String> = pairs
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    };
    let mut list_json = false;
    let mut output: Option<PathBuf> = None;
    let request = match cmd {
        SuppressCmd::Add {
            address,
            tenant,
            reason,
            source,
            expires_at,
        } => {
            let body = serde_json::json!({"address": address, "tenant": tenant, "reason": reason, "source": source, "expires_at": expires_at});
            (
                Method::POST,
                "/api/v1/suppressions".to_string(),
                Some("application/json"),
                body.to_string().into_bytes(),
            )
        }
        SuppressCmd::Remove { address, tenant } => (
            Method::DELETE,
            format!("/api/v1/suppressions/{}{}", encode(&address), q(&[("tenant", &tenant)])),
            None,
            Vec::new(),
        ),
        SuppressCmd::List {
            address,
            tenant,
            reason,
            limit,
            json,
        } => {
            list_json = json;
            let limit = Some(limit.to_string());
            (
                Method::GET,
                format!(
                    "/api/v1/suppressions{}",
                    q(&[
                        ("address", &address),
                        ("tenant", &tenant),
                        ("reason", &reason),
                        ("limit", &limit)
                    ])
                ),
                None,
                Vec::new(),
            )
        }
        SuppressCmd::Import { file, format } => {
            let format = format.or_else(|| {
                file.extension().and_then(|e| e.to_str()).map(|e| match e {
                    "csv" => "csv".to_string(),
                    _ => "jsonl".to_string(),
                })
            });
            let body = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            let ct = if format.as_deref() == Some("csv") {
                "text/csv"
            } else {
                "application/x-ndjson"
            };
            (
                Method::POST,
                format!("/api/v1/suppressions/import{}", q(&[("format", &format)])),
                Some(ct),
                body,
            )
        }
        SuppressCmd::Export { format, output: o } => {
            output = o;
            (
                Method::GET,
                format!("/api/v1/suppressions/export{}", q(&[("format", &Some(format))])),
                None,
                Vec::new(),
            )
        }
    };
    let (method, path, ct, body) = request;
    let resp = match api_call(&client, method, &path, ct, body) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if let Some(out) = output {
        if let Err(e) = std::fs::write(&out, &resp) {
            eprintln!("{}: {e}", out.display());
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    if path.starts_with("/api/v1/suppressions?") && !list_json {
        let v: serde_json::Value = serde_json::from_slice(&resp).unwrap_or_default();
        for e in v["entries"].as_array().into_iter().flatten() {
            println!(
                "{}\t{}\t{}\t{}\t{}",
                e["address"].as_str().unwrap_or(""),
                e["tenant"].as_str().unwrap_or("*"),
                e["reason"].as_str().unwrap_or(""),
                e["created_at"].as_str().unwrap_or(""),
                e["source"].as_str().unwrap_or("")
            );
        }
        return ExitCode::SUCCESS;
    }
    print!("{}", String::from_utf8_lossy(&resp));
    ExitCode::SUCCESS
}

fn drain_cmd(api: ApiArgs, wait: std::time::Duration) -> ExitCode {
    let client = match admin_client(api) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let sessions = |resp: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(resp)
            .ok()
            .and_then(|v| v["sessions"].as_u64())
    };
    let resp = match api_call(&client, hyper::Method::POST, "/api/v1/drain", None, Vec::new()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let deadline = std::time::Instant::now() + wait;
    let mut left = sessions(&resp);
    eprintln!("draining: {} SMTP sessions open", left.unwrap_or(0));
    while left.is_some_and(|n| n > 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(250));
        // A failed poll (a slow answer) is retried until the wait is over.
        if let Ok(r) = api_call(&client, hyper::Method::GET, "/api/v1/drain", None, Vec::new()) {
            left = sessions(&r);
        }
    }
    match left {
        Some(0) | None => {
            eprintln!("drained: no SMTP session open");
            ExitCode::SUCCESS
        }
        Some(n) => {
            eprintln!(
                "still {n} SMTP sessions open after {}",
                humantime::format_duration(wait)
            );
            ExitCode::FAILURE
        }
    }
}

fn classify(reply: &str, config: Option<PathBuf>, json: bool) -> ExitCode {
    use sendguard::classify::{Classifier, parse_reply};
    let classifier = match &config {
        None => Classifier::builtin(),
        Some(path) => match Config::load(path).and_then(|cfg| cfg.classifier()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let parsed = parse_reply(reply);
    let c = classifier.classify(&parsed);
    let category = c.category.map(|c| c.as_str());
    let stage = c.stage.map(|s| s.as_str());
    if json {
        // field order: outcome, category, stage, rule
        println!("{}", serde_json::to_string(&c).expect("serializable"));
    } else {
        println!("outcome:  {}", c.outcome.as_str());
        println!("category: {}", category.unwrap_or("-"));
        println!("stage:    {}", stage.unwrap_or("-"));
        println!("rule:     {}", c.rule);
        let code = parsed.code.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
        println!(
            "parsed:   code {code}, enhanced {}, text {:?}",
            parsed.enhanced.as_deref().unwrap_or("none"),
            parsed.text
        );
    }
    ExitCode::SUCCESS
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

async fn serve(cfg: Config, path: std::path::PathBuf) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let listeners = sendguard::server::bind(&cfg).await?;
    let admin_listener = match &cfg.admin {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a.addr)
                .await
                .map_err(|e| anyhow::anyhow!("admin.addr: cannot bind {}: {e}", a.addr))?,
        ),
        None => None,
    };
    let pipeline = sendguard::pipeline::Pipeline::start(&cfg).await?;
    let shutdown = CancellationToken::new();
    if let Some(l) = admin_listener {
        let state = Arc::new(sendguard::admin::AdminState::new(
            Arc::clone(&cfg),
            &pipeline,
            Some(path.clone()),
        ));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = sendguard::admin::serve(l, state, stop).await {
                tracing::error!(error = %e, "admin API stopped");
            }
        });
    }
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        trigger.cancel();
    });
    tokio::spawn(reload_on_hup(path, pipeline.policy_handle()));
    let served = sendguard::server::run(Arc::clone(&cfg), listeners, pipeline.handles(), shutdown).await;
    pipeline.shutdown(cfg.server.shutdown_grace).await;
    served
}

/// SIGHUP: read the config file again and apply its rate policy. A config
/// that does not validate changes nothing (the error names the key).
async fn reload_on_hup(path: std::path::PathBuf, policy: sendguard::pipeline::PolicyHandle) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("no SIGHUP handler: policy reload by signal is off");
        return;
    };
    while hup.recv().await.is_some() {
        let loaded = tokio::task::spawn_blocking({
            let path = path.clone();
            move || Config::load(&path)
        })
        .await;
        match loaded {
            Ok(Ok(cfg)) => match policy.reload(&cfg) {
                Ok(()) => tracing::info!(
                    config = %path.display(),
                    "SIGHUP: rate policy reloaded (listeners, TLS, relay and spool settings need a restart)"
                ),
                Err(e) => tracing::error!(config = %path.display(), "SIGHUP: reload refused, policy unchanged: {e}"),
            },
            Ok(Err(e)) => tracing::error!(config = %path.display(), "SIGHUP: reload refused, policy unchanged: {e}"),
            Err(e) => tracing::error!("SIGHUP: reload failed: {e}"),
        }
    }
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
