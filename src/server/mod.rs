//! Listeners, connection limits, TLS and graceful shutdown around the
//! per-connection [`session`].
//!
//! Trust boundary: accepts TCP connections from anywhere the listener is
//! bound; admission (trusted networks, per-IP limits, AUTH lock-out) is
//! decided in the session before the greeting. Total connections are bounded
//! by a semaphore taken *before* accept, so overload stays in the kernel's
//! backlog instead of in memory.

pub mod auth;
pub mod conn;
pub mod limits;
pub mod replies;
pub mod session;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{AuthMode, Config, TlsMode};
use crate::events::Events;
use crate::submission::SharedSink;
use auth::{AuthFailureLimiter, Authenticator, Identity};
use conn::Conn;
use limits::ConnCounter;

/// What a session needs to know about the listener it came in on.
pub struct ListenerInfo {
    pub addr: SocketAddr,
    pub tls: TlsMode,
    pub auth: AuthMode,
    pub networks: Vec<IpNet>,
    /// For `auth = "none"`: the tenant trusted clients act as.
    pub identity: Option<Identity>,
    pub tls_acceptor: Option<TlsAcceptor>,
}

/// What sessions hand their work to: the sink for accepted messages, the
/// events log, and the suppression list checked at RCPT.
#[derive(Clone)]
pub struct Handles {
    pub sink: SharedSink,
    pub events: Events,
    pub suppress: Option<Arc<dyn crate::suppress::SuppressionStore>>,
    /// The resolver (and its cache) the guard shares with provider
    /// grouping; `None`: the guard makes its own.
    pub dns: Option<Arc<crate::dns::Dns>>,
    /// Rate policy at submission: budgets and warm-up (RCPT), breakers
    /// (MAIL), the runaway guard (RCPT, end of DATA).
    pub policy: Option<crate::pipeline::PolicyHandle>,
    /// The guard (shared with the admin API's preflight); `None`: the
    /// server builds one from the config if any tenant needs it.
    pub guard: Option<Arc<crate::guard::Guard>>,
    /// Drain and session count shared with the admin API; `None`: the
    /// server keeps its own.
    pub health: Option<Arc<crate::health::Health>>,
    /// Where sessions run; `None`: on the runtime that calls [`run`].
    pub shards: Option<Arc<crate::shards::Shards>>,
}

impl Handles {
    /// A sink and events, no suppression list.
    pub fn new(sink: SharedSink, events: Events) -> Handles {
        Handles {
            sink,
            events,
            suppress: None,
            dns: None,
            policy: None,
            guard: None,
            health: None,
            shards: None,
        }
    }
}

/// State shared by all sessions of a server.
pub struct Shared {
    pub cfg: Arc<Config>,
    pub authn: Arc<Authenticator>,
    pub auth_limiter: AuthFailureLimiter,
    pub conn_counter: Arc<ConnCounter>,
    pub sink: SharedSink,
    /// `None` when every tenant has `guard = "off"`.
    pub guard: Option<Arc<crate::guard::Guard>>,
    pub suppress: Option<Arc<dyn crate::suppress::SuppressionStore>>,
    pub policy: Option<crate::pipeline::PolicyHandle>,
    pub events: Events,
    /// Cancelled at drain or shutdown: stop accepting; idle sessions say
    /// 421 and close.
    pub drain: CancellationToken,
    /// Counts sessions and reports readiness.
    pub health: Arc<crate::health::Health>,
    /// Cancelled when the grace period is over: every session closes.
    pub abort: CancellationToken,
}

/// Bind every configured listener (in config order).
pub async fn bind(cfg: &Config) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for (i, l) in cfg.listeners.iter().enumerate() {
        let sock = TcpListener::bind(l.addr)
            .await
            .map_err(|e| anyhow::anyhow!("listeners[{i}].addr: cannot bind {}: {e}", l.addr))?;
        out.push(sock);
    }
    Ok(out)
}

/// Serve on already-bound listeners (one per `cfg.listeners` entry, same
/// order) until `shutdown` is cancelled, then drain: stop accepting, let
/// transactions in flight finish within `server.shutdown_grace`, close the
/// rest with `421 4.3.2`.
pub async fn run(
    cfg: Arc<Config>,
    listeners: Vec<TcpListener>,
    handles: Handles,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        listeners.len() == cfg.listeners.len(),
        "{} sockets for {} configured listeners",
        listeners.len(),
        cfg.listeners.len()
    );
    let server_tls = match &cfg.tls {
        Some(t) => Some(
            tls::load_server_config(&cfg.resolve(&t.cert), &cfg.resolve(&t.key))
                .map_err(|e| anyhow::anyhow!("{}: {}", e.key, e.message))?,
        ),
        None => None,
    };
    let health = handles
        .health
        .unwrap_or_else(|| crate::health::Health::new(cfg.spool.as_ref().map(|s| cfg.resolve(&s.dir)), None));
    let shared = Arc::new(Shared {
        authn: Arc::new(Authenticator::from_config(&cfg)),
        auth_limiter: AuthFailureLimiter::new(cfg.auth.max_failures, cfg.auth.failure_window, auth::AUTH_IPV6_PREFIX),
        conn_counter: Arc::new(ConnCounter::new(cfg.limits.ipv6_prefix_length)),
        sink: handles.sink,
        guard: match handles.guard {
            Some(g) => Some(g),
            None => crate::guard::Guard::from_config(&cfg, handles.dns)?,
        },
        suppress: handles.suppress,
        policy: handles.policy,
        events: handles.events,
        drain: health.drain_token(),
        health,
        abort: CancellationToken::new(),
        cfg: Arc::clone(&cfg),
    });
    let shards = handles.shards;
    let sem = Arc::new(Semaphore::new(cfg.limits.max_connections));
    let tracker = TaskTracker::new();
    let mut listening = Vec::with_capacity(listeners.len());
    for (lc, sock) in cfg.listeners.iter().zip(listeners) {
        let identity = lc.tenant.as_ref().map(|name| {
            let idx = cfg
                .tenants
                .iter()
                .position(|t| &t.name == name)
                .expect("validated tenant");
            Identity {
                tenant: idx,
                tenant_name: Arc::from(name.as_str()),
                username: None,
            }
        });
        let info = Arc::new(ListenerInfo {
            addr: sock.local_addr()?,
            tls: lc.tls,
            auth: lc.auth,
            networks: lc.networks.clone(),
            identity,
            tls_acceptor: match lc.tls {
                TlsMode::None => None,
                _ => server_tls.clone().map(TlsAcceptor::from),
            },
        });
        info!(addr = %info.addr, tls = ?lc.tls, auth = ?lc.auth, "listening");
        listening.push((sock, info));
    }
    tracker.spawn(accept_loop(
        listening,
        Arc::clone(&shared),
        sem,
        tracker.clone(),
        shards,
    ));
    shutdown.cancelled().await;
    info!(grace = ?cfg.server.shutdown_grace, "shutting down: no new connections, draining sessions");
    shared.drain.cancel();
    tracker.close();
    if tokio::time::timeout(cfg.server.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!("grace period over: closing remaining sessions");
        shared.abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
    info!("shutdown complete");
    Ok(())
}

/// One loop accepts on every listener: a connection permit is taken
/// *before* accepting (overload waits in the kernel backlog, not in memory),
/// and since only this loop waits with a permit, exactly
/// `limits.max_connections` sessions can run. The listener polled first
/// rotates, so a busy listener cannot starve the others.
async fn accept_loop(
    listeners: Vec<(TcpListener, Arc<ListenerInfo>)>,
    shared: Arc<Shared>,
    sem: Arc<Semaphore>,
    tracker: TaskTracker,
    shards: Option<Arc<crate::shards::Shards>>,
) {
    let mut start = 0usize;
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&sem).acquire_owned() => p.expect("semaphore never closed"),
            _ = shared.drain.cancelled() => break,
        };
        let accepted = std::future::poll_fn(|cx| {
            let n = listeners.len();
            for k in 0..n {
                let i = (start + k) % n;
                if let std::task::Poll::Ready(r) = listeners[i].0.poll_accept(cx) {
                    return std::task::Poll::Ready((i, r));
                }
            }
            std::task::Poll::Pending
        });
        let (i, result) = tokio::select! {
            a = accepted => a,
            _ = shared.drain.cancelled() => break,
        };
        start = (i + 1) % listeners.len();
        let (tcp, peer) = match result {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (info, shared) = (Arc::clone(&listeners[i].1), Arc::clone(&shared));
        let session = shared.health.session_started();
        let serve = move |tcp: TcpStream| async move {
            let _permit = permit;
            let _session = session;
            handle(tcp, peer, info, shared).await;
        };
        let Some(shards) = &shards else {
            tracker.spawn(serve(tcp));
            continue;
        };
        // The session's socket moves to its shard's reactor, so its
        // readiness wakes that thread, not this one.
        let tcp = match tcp.into_std() {
            Ok(t) => t,
            Err(e) => {
                warn!(%peer, error = %e, "cannot hand the connection to an I/O thread");
                continue;
            }
        };
        shards.spawn(&tracker, async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => serve(tcp).await,
                Err(e) => warn!(%peer, error = %e, "cannot register the connection on an I/O thread"),
            }
        });
    }
    debug!("listeners closed");
}

async fn handle(tcp: TcpStream, peer: SocketAddr, info: Arc<ListenerInfo>, shared: Arc<Shared>) {
    let mut slot = None;
    let conn = match (info.tls, &info.tls_acceptor) {
        (TlsMode::Implicit, Some(acceptor)) => {
            // The per-address limit holds before the handshake: one address
            // opening connections that never finish it must not hold every
            // connection permit for `tls_handshake_timeout`. Over the limit,
            // the connection closes without a handshake (no reply can be
            // read before one).
            let max = shared.cfg.limits.max_connections_per_ip;
            match shared.conn_counter.try_acquire(peer.ip().to_canonical(), max) {
                Some(s) => slot = Some(s),
                None => {
                    info!(%peer, max_connections_per_ip = max, "too many connections from this address; closed before the TLS handshake");
                    return;
                }
            }
            let hs = tokio::time::timeout(shared.cfg.limits.tls_handshake_timeout, acceptor.accept(tcp)).await;
            match hs {
                Ok(Ok(tls)) => Conn::Tls(Box::new(tls)),
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "implicit TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "implicit TLS handshake timed out");
                    return;
                }
            }
        }
        _ => Conn::Plain(tcp),
    };
    session::run(conn, peer, info, shared, slot).await;
}
