//! The per-connection SMTP state machine (RFC 5321 §4.1.4 ordering, RFC 6409
//! submission rules, RFC 3207 STARTTLS, RFC 4954 AUTH, RFC 2920 PIPELINING,
//! RFC 3030 CHUNKING).
//!
//! Generic over the transport (`AsyncRead + AsyncWrite`), so tests drive it
//! over an in-memory pipe as well as TCP.
//!
//! Trust boundary: everything read from the client is untrusted. Before TLS
//! nothing but EHLO/HELO/STARTTLS/NOOP/RSET/QUIT is useful on an
//! auth-required listener; MAIL is refused until the client authenticated,
//! so the session can never relay for an unknown client. Buffered input is
//! discarded when TLS starts (CVE-2011-0411). The session does not touch the
//! spool or the relay: accepted content goes to the [`MessageSink`].
//!
//! [`MessageSink`]: crate::submission::MessageSink

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{Instrument, debug, info, info_span, warn};

use super::conn::Conn;
use super::replies as r;
use super::{ListenerInfo, Shared};
use crate::config::{AuthMode, GuardMode, TlsMode};
use crate::events::{Check, Event, EventKind, ReplyRecord};
use crate::guard::{Guard, Verdict};
use crate::server::auth::{self, Identity, SaslError};
use crate::smtp::command::{self, Command, MailParams, ParseError};
use crate::smtp::data::{BdatReceiver, ContentError, DataReceiver};
use crate::smtp::line::{self, Framed};
use crate::smtp::{Mailbox, Reply};
use crate::submission::Submission;

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// Client said QUIT (221 already queued).
    Quit,
    /// Client closed or the transport failed.
    Gone,
    /// Send this reply, then close.
    Close(Reply),
}

struct Tx {
    from: Option<Mailbox>,
    params: MailParams,
    rcpts: Vec<Mailbox>,
}

struct Session<S> {
    /// Unique id: in the span (every log line of the session), the
    /// session's events and its messages' `received` events.
    session_id: Arc<str>,
    conn: Conn<S>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    peer: SocketAddr,
    listener: Arc<ListenerInfo>,
    shared: Arc<Shared>,
    helo: Option<String>,
    identity: Option<Identity>,
    tx: Option<Tx>,
    bdat: Option<BdatReceiver>,
    /// The sink was told a message is coming (content under way).
    expected: Option<Arc<crate::spool::Expected>>,
    errors: u32,
    /// After a MAIL refused by policy (until RSET, EHLO or another MAIL): how
    /// many more 503s to the RCPT/DATA/BDAT pipelined behind it go
    /// uncounted as protocol errors (at most `max_recipients` + 1).
    sequels_left: usize,
    span: tracing::Span,
    /// Checks the current transaction passed (or the guard warned about),
    /// for the trace; reset at MAIL.
    checks: Vec<Check>,
}

/// Run one client connection to its end. `conn` is already TLS for
/// implicit-TLS listeners.
/// `slot`: the peer's connection slot when the caller already took it
/// (implicit TLS takes it before the handshake).
pub async fn run<S>(
    conn: Conn<S>,
    peer: SocketAddr,
    listener: Arc<ListenerInfo>,
    shared: Arc<Shared>,
    slot: Option<super::limits::ConnSlot>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let session_id: Arc<str> = crate::events::new_id(std::time::SystemTime::now()).into();
    let span = info_span!("session", session_id = %session_id, peer = %peer, listener = %listener.addr, tenant = tracing::field::Empty, user = tracing::field::Empty);
    let mut s = Session {
        session_id,
        conn,
        rbuf: Vec::with_capacity(4096),
        wbuf: Vec::with_capacity(1024),
        peer,
        listener,
        shared,
        helo: None,
        identity: None,
        tx: None,
        bdat: None,
        expected: None,
        errors: 0,
        sequels_left: 0,
        span: span.clone(),
        checks: Vec::new(),
    };
    let metrics = s.shared.events.metrics().cloned();
    if let Some(m) = &metrics {
        m.connection_opened(&s.listener.addr.to_string());
    }
    async move {
        let end = s.serve(slot).await;
        if let Some(m) = &metrics {
            m.connection_closed(match &end {
                End::Quit => "quit",
                End::Gone => "gone",
                End::Close(_) => "closed",
            });
        }
        match &end {
            End::Close(reply) => {
                info!(reply = %reply, "session closed by server");
                s.send(reply.clone());
            }
            End::Quit => debug!("session ended by QUIT"),
            End::Gone => debug!("client went away"),
        }
        let _ = s.flush().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), s.conn.shutdown()).await;
    }
    .instrument(span)
    .await
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Connection checks, greeting, then the command loop.
    async fn serve(&mut self, slot: Option<super::limits::ConnSlot>) -> End {
        let ip = self.peer.ip().to_canonical();
        let li = Arc::clone(&self.listener);
        let admission = if !li.networks.is_empty() && !li.networks.iter().any(|n| n.contains(&ip)) {
            Some(r::client_not_allowed())
        } else if li.auth == AuthMode::Required && self.shared.auth_limiter.is_locked(ip, Instant::now()) {
            Some(r::auth_locked())
        } else {
            None
        };
        if let Some(reply) = admission {
            self.refused("connect", &reply, None).await;
            return End::Close(reply);
        }
        let max_per_ip = self.shared.cfg.limits.max_connections_per_ip;
        let Some(_slot) = slot.or_else(|| self.shared.conn_counter.try_acquire(ip, max_per_ip)) else {
            let reply = r::too_many_connections();
            self.refused("connect", &reply, None).await;
            return End::Close(reply);
        };
        self.identity = li.identity.clone();
        self.record_identity();
        info!(tls = self.conn.is_tls(), "session started");
        self.send(r::greeting(&self.shared.cfg.server.hostname));
        loop {
            let line = match self.read_line().await {
                Ok(Some(l)) => l,
                Ok(None) => {
                    if let Some(end) = self.error(r::line_too_long()) {
                        return end;
                    }
                    continue;
                }
                Err(end) => return end,
            };
            // RCPT, DATA and BDAT a client pipelined behind a refused MAIL
            // (RFC 2920 §3.1) get their 503, but are not its errors.
            let mut sequel = false;
            let reply = match command::parse(&line) {
                Ok(cmd) => {
                    sequel = self.sequels_left > 0
                        && matches!(cmd, Command::Rcpt { .. } | Command::Data | Command::Bdat { .. });
                    match &cmd {
                        // Until it is accepted, below.
                        Command::Mail { .. } => self.sequels_left = self.shared.cfg.limits.max_recipients + 1,
                        Command::Rset | Command::Ehlo(_) | Command::Helo(_) => self.sequels_left = 0,
                        _ => {}
                    }
                    let is_mail = matches!(cmd, Command::Mail { .. });
                    let stage = match &cmd {
                        Command::Mail { .. } => Some("mail"),
                        Command::Rcpt { .. } => Some("rcpt"),
                        Command::Data | Command::Bdat { .. } => Some("data"),
                        Command::Auth { .. } => Some("auth"),
                        _ => None,
                    };
                    let rcpt = match &cmd {
                        Command::Rcpt { to } => Some(to.to_string()),
                        _ => None,
                    };
                    let from = match &cmd {
                        Command::Mail { from, .. } => Some(from.as_ref().map(|m| m.to_string()).unwrap_or_default()),
                        // The transaction is gone once content ends: keep its sender for the event.
                        Command::Data | Command::Bdat { .. } => self
                            .tx
                            .as_ref()
                            .map(|t| t.from.as_ref().map(|m| m.to_string()).unwrap_or_default()),
                        _ => None,
                    };
                    match self.dispatch(cmd).await {
                        Ok(Some(reply)) => {
                            // Only a policy refusal (4xx, 550...) has sequels: a
                            // MAIL the client got wrong counts, and so do they.
                            if is_mail && (reply.code < 400 || matches!(reply.code, 500..=504 | 555)) {
                                self.sequels_left = 0;
                            }
                            if let (Some(stage), true) = (stage, reply.code >= 400) {
                                self.refused_with(stage, &reply, rcpt, from).await;
                            }
                            reply
                        }
                        Ok(None) => continue,
                        Err(End::Close(reply)) => {
                            if let Some(stage) = stage {
                                self.refused_with(stage, &reply, rcpt, from).await;
                            }
                            return End::Close(reply);
                        }
                        Err(end) => return end,
                    }
                }
                Err(e) => parse_error_reply(e),
            };
            if sequel && reply.code == 503 {
                self.sequels_left -= 1;
                self.send(reply);
                continue;
            }
            if let Some(end) = self.error(reply) {
                return end;
            }
        }
    }

    /// Emit a `refused` event for a refusal at `stage`.
    async fn refused(&mut self, stage: &'static str, reply: &Reply, rcpt: Option<String>) {
        self.refused_with(stage, reply, rcpt, None).await;
    }

    async fn refused_with(&mut self, stage: &'static str, reply: &Reply, rcpt: Option<String>, from: Option<String>) {
        self.reply_event(EventKind::Refused, stage, reply, rcpt, from).await;
    }

    /// Emit a submission-side event carrying `reply`: `refused`, or
    /// `guard_warning` for what the guard would have refused.
    async fn reply_event(
        &mut self,
        kind: EventKind,
        stage: &'static str,
        reply: &Reply,
        rcpt: Option<String>,
        from: Option<String>,
    ) {
        if !self.shared.events.is_enabled() {
            return;
        }
        let mut ev = Event::new(kind);
        ev.session_id = Some(self.session_id.to_string());
        ev.stage = Some(stage);
        ev.peer = Some(self.peer.to_string());
        ev.tenant = self.identity.as_ref().map(|i| i.tenant_name.to_string());
        ev.user = self
            .identity
            .as_ref()
            .and_then(|i| i.username.as_deref().map(str::to_string));
        ev.sender = from.or_else(|| {
            self.tx
                .as_ref()
                .map(|t| t.from.as_ref().map(|m| m.to_string()).unwrap_or_default())
        });
        ev.rcpt = rcpt;
        ev.reply = Some(ReplyRecord::from_reply(reply));
        self.shared.events.emit(ev).await;
    }

    /// Queue a reply; count protocol errors toward `limits.max_errors`.
    fn error(&mut self, reply: Reply) -> Option<End> {
        let protocol_error = matches!(reply.code, 500..=504 | 555);
        self.send(reply);
        if protocol_error {
            self.errors += 1;
            if self.errors >= self.shared.cfg.limits.max_errors {
                return Some(End::Close(r::too_many_errors()));
            }
        }
        None
    }

    async fn dispatch(&mut self, cmd: Command) -> Result<Option<Reply>, End> {
        debug!(?cmd, "command");
        let reply = match cmd {
            Command::Ehlo(d) => Some(self.ehlo(d, true)),
            Command::Helo(d) => Some(self.ehlo(d, false)),
            Command::StartTls => return self.starttls().await,
            Command::Auth { mechanism, initial } => return self.auth(mechanism, initial).await,
            Command::Mail { from, params } => Some(self.mail(from, params).await),
            Command::Rcpt { to } => Some(self.rcpt(to).await),
            Command::Data => return self.data().await,
            Command::Bdat { size, last } => return self.bdat(size, last).await,
            Command::Rset => {
                self.reset();
                Some(r::ok())
            }
            Command::Noop => Some(r::ok()),
            Command::Quit => {
                self.send(r::closing(&self.shared.cfg.server.hostname));
                return Err(End::Quit);
            }
            Command::Vrfy => Some(r::vrfy()),
            Command::Expn => Some(r::not_implemented("EXPN")),
            Command::Help => Some(r::help()),
        };
        Ok(reply)
    }

    fn reset(&mut self) {
        self.tx = None;
        self.bdat = None;
        self.expected = None;
    }

    fn tls_pending(&self) -> bool {
        self.listener.tls == TlsMode::Starttls && !self.conn.is_tls()
    }

    fn ehlo(&mut self, domain: String, extended: bool) -> Reply {
        self.reset();
        self.helo = Some(domain);
        let host = &self.shared.cfg.server.hostname;
        if !extended {
            // RFC 2034 §3: no enhanced code on the HELO reply either.
            return Reply::bare(250, host.clone());
        }
        // RFC 2034 §3: no enhanced codes on the EHLO response.
        let mut reply = Reply::bare(250, host.clone())
            .line("PIPELINING")
            .line(format!("SIZE {}", self.shared.cfg.limits.max_message_bytes))
            .line("8BITMIME")
            .line("SMTPUTF8")
            .line("ENHANCEDSTATUSCODES")
            .line("CHUNKING");
        if self.tls_pending() {
            reply = reply.line("STARTTLS");
        }
        if self.listener.auth == AuthMode::Required && self.conn.is_tls() && self.identity.is_none() {
            reply = reply.line("AUTH PLAIN LOGIN");
        }
        reply
    }

    async fn starttls(&mut self) -> Result<Option<Reply>, End> {
        if self.conn.is_tls() {
            return Ok(Some(r::bad_sequence("TLS already active")));
        }
        let Some(acceptor) = self
            .listener
            .tls_acceptor
            .clone()
            .filter(|_| self.listener.tls == TlsMode::Starttls)
        else {
            return Ok(Some(r::not_implemented("STARTTLS on this listener")));
        };
        if self.helo.is_none() {
            return Ok(Some(r::need_helo()));
        }
        if self.tx.is_some() {
            return Ok(Some(r::bad_sequence(
                "STARTTLS not permitted during a mail transaction",
            )));
        }
        self.send(r::start_tls());
        self.flush().await.map_err(|_| End::Gone)?;
        // RFC 3207 §6 / CVE-2011-0411: anything the client pipelined after
        // STARTTLS was sent in clear and must not be acted upon.
        if !self.rbuf.is_empty() {
            warn!(bytes = self.rbuf.len(), "discarding plaintext pipelined after STARTTLS");
            self.rbuf.clear();
        }
        let Conn::Plain(io) = std::mem::replace(&mut self.conn, Conn::Closed) else {
            return Err(End::Gone);
        };
        let handshake = tokio::time::timeout(self.shared.cfg.limits.tls_handshake_timeout, acceptor.accept(io)).await;
        match handshake {
            Ok(Ok(tls)) => {
                self.conn = Conn::Tls(Box::new(tls));
                // RFC 3207 §4.2: forget everything learned before TLS.
                self.helo = None;
                self.reset();
                self.identity = self.listener.identity.clone();
                debug!(version = ?super::conn::tls_version(&self.conn), "TLS established");
                Ok(None)
            }
            Ok(Err(e)) => {
                info!(error = %e, "TLS handshake failed");
                Err(End::Gone)
            }
            Err(_) => {
                info!("TLS handshake timed out");
                Err(End::Gone)
            }
        }
    }

    async fn auth(&mut self, mechanism: String, initial: Option<String>) -> Result<Option<Reply>, End> {
        if self.listener.auth != AuthMode::Required {
            return Ok(Some(r::not_implemented("AUTH on this listener")));
        }
        if self.helo.is_none() {
            return Ok(Some(r::need_helo()));
        }
        if !self.conn.is_tls() {
            return Ok(Some(r::auth_needs_tls()));
        }
        if self.identity.is_some() {
            return Ok(Some(r::bad_sequence("Already authenticated")));
        }
        if self.tx.is_some() {
            return Ok(Some(r::bad_sequence("AUTH not permitted during a mail transaction")));
        }
        let ip = self.peer.ip().to_canonical();
        if self.shared.auth_limiter.is_locked(ip, Instant::now()) {
            return Err(End::Close(r::auth_locked()));
        }
        let creds = match mechanism.as_str() {
            "PLAIN" => {
                let msg = match initial {
                    Some(i) => auth::decode_b64(&i),
                    None => self.challenge("").await?,
                };
                msg.and_then(|m| auth::decode_plain(&m))
            }
            "LOGIN" => {
                // RFC 4954 permits an initial response: the username.
                let user = match initial {
                    Some(i) => auth::decode_b64(&i),
                    None => self.challenge("VXNlcm5hbWU6").await?,
                };
                match user {
                    Ok(u) => self
                        .challenge("UGFzc3dvcmQ6")
                        .await?
                        .and_then(|p| String::from_utf8(u).map(|u| (u, p)).map_err(|_| SaslError::Malformed)),
                    Err(e) => Err(e),
                }
            }
            _ => return Ok(Some(r::auth_mechanism())),
        };
        let (username, password) = match creds {
            Ok(c) => c,
            Err(SaslError::Cancelled) => return Ok(Some(r::auth_cancelled())),
            Err(SaslError::Malformed) => return Ok(Some(r::auth_bad_encoding())),
            Err(SaslError::AuthzMismatch) => (String::new(), Vec::new()),
        };
        let verified = if username.is_empty() {
            None
        } else {
            self.shared.authn.verify(username.clone(), password).await
        };
        match verified {
            Some(id) => {
                info!(user = %username, tenant = %id.tenant_name, "authenticated");
                self.identity = Some(id);
                self.record_identity();
                Ok(Some(r::auth_ok()))
            }
            None => {
                let locked = self.shared.auth_limiter.record_failure(ip, Instant::now());
                // Client-chosen text: Debug-escaped, so a CR or LF in it cannot
                // start a forged log line.
                warn!(user = ?username, locked, "authentication failed");
                tokio::time::sleep(self.shared.cfg.auth.failure_delay).await;
                if locked {
                    Err(End::Close(r::auth_locked()))
                } else {
                    Ok(Some(r::auth_failed()))
                }
            }
        }
    }

    /// Send a `334` challenge and read the client's base64 response.
    async fn challenge(&mut self, text: &str) -> Result<Result<Vec<u8>, SaslError>, End> {
        self.send(Reply::bare(334, text));
        match self.read_line().await? {
            Some(line) => Ok(std::str::from_utf8(&line)
                .map_err(|_| SaslError::Malformed)
                .and_then(auth::decode_b64)),
            None => Ok(Err(SaslError::Malformed)),
        }
    }

    fn record_identity(&self) {
        if let Some(id) = &self.identity {
            self.span.record("tenant", &*id.tenant_name);
            if let Some(u) = &id.username {
                self.span.record("user", &**u);
            }
        }
    }

    async fn mail(&mut self, from: Option<Mailbox>, params: MailParams) -> Reply {
        if self.helo.is_none() {
            return r::need_helo();
        }
        if self.tx.is_some() {
            return r::bad_sequence("Nested MAIL command");
        }
        if self.listener.auth == AuthMode::Required && self.tls_pending() {
            return r::need_starttls();
        }
        let Some(id) = &self.identity else {
            return r::need_auth();
        };
        let max = self.shared.cfg.limits.max_message_bytes;
        if params.size.is_some_and(|s| s > max as u64) {
            return r::message_too_big(max);
        }
        let tenant = &self.shared.cfg.tenants[id.tenant];
        self.checks.clear();
        match &from {
            Some(m) if m.is_utf8() && !params.smtputf8 => return r::smtputf8_required(),
            Some(m) if !sender_permitted(tenant, m) => {
                info!(from = %m, "sender not permitted");
                return r::sender_not_permitted(&m.to_string(), &tenant.name);
            }
            None if !tenant.allow_null_sender => return r::null_sender_not_permitted(&tenant.name),
            _ => {}
        }
        if let Some(p) = &self.shared.policy
            && let Err(open) = p.breakers.check(
                crate::throttle::now_ns(),
                &tenant.name,
                from.as_ref().map(|m| m.domain_lc()).as_deref(),
            )
        {
            info!(scope = open.scope.as_str(), key = %open.key, "circuit breaker open");
            return open.reply();
        }
        self.note("mail", "sender_rights", None);
        if self.shared.policy.is_some() {
            self.note("mail", "breakers", None);
        }
        if let (Some(m), Some((guard, mode))) = (&from, self.guard()) {
            let verdict = guard.mail_from(m).await;
            if let Some(reply) = self
                .judged(mode, "mail", "sender_domain_health", verdict, None, Some(m.to_string()))
                .await
            {
                return reply;
            }
        }
        self.tx = Some(Tx {
            from,
            params,
            rcpts: Vec::new(),
        });
        r::sender_ok()
    }

    async fn rcpt(&mut self, to: Mailbox) -> Reply {
        let max = self.shared.cfg.limits.max_recipients;
        let Some(tx) = &mut self.tx else {
            return r::bad_sequence("Need MAIL command first");
        };
        if to.is_utf8() && !tx.params.smtputf8 {
            return r::smtputf8_required();
        }
        if tx.rcpts.len() >= max {
            return r::too_many_recipients(max);
        }
        let norm = to.normalized();
        if tx.rcpts.iter().any(|m| m.normalized() == norm) {
            return r::rcpt_ok();
        }
        let mut suppression_checked = false;
        if let (Some(store), Some(id)) = (&self.shared.suppress, &self.identity)
            && let Ok(key) = crate::suppress::normalize_mailbox(&to)
        {
            suppression_checked = true;
            if let Some(entry) = store.lookup(&id.tenant_name, &key) {
                let reply = r::suppressed(&entry);
                info!(rcpt = %to, reason = entry.reason.as_str(), "recipient suppressed");
                return reply;
            }
        }
        // The checks count accepted recipients: a later refusal takes back
        // what the guard noted for this one.
        let noted = self.checks.clone();
        if let Some((guard, mode)) = self.guard() {
            let verdict = guard.rcpt(&to).await;
            if let Some(reply) = self
                .judged(mode, "rcpt", "recipient_domain", verdict, Some(to.to_string()), None)
                .await
            {
                return reply;
            }
        }
        if let Some(p) = &self.shared.policy
            && let Err(r) = p.runaway.check_recipient(crate::throttle::now_ns(), &norm)
        {
            info!(rcpt = %to, "runaway guard: recipient mailed too often today");
            self.checks = noted;
            return r.reply();
        }
        // Budgets last: only a recipient that would be taken is charged.
        if let Some(reply) = self.over_budget().await {
            self.checks = noted;
            return reply;
        }
        if let Some(tx) = &mut self.tx {
            tx.rcpts.push(to);
        }
        if suppression_checked {
            self.note("rcpt", "suppression", None);
        }
        if let Some(p) = &self.shared.policy {
            if p.runaway.enabled() {
                self.note("rcpt", "runaway", None);
            }
            self.note("rcpt", "budgets", None);
        }
        r::rcpt_ok()
    }

    /// Record a check the transaction passed (`detail: None`) or the
    /// guard warned about (`Some(reply)`): the same check again counts up.
    fn note(&mut self, stage: &'static str, check: &'static str, warning: Option<String>) {
        let result = if warning.is_some() { "warn" } else { "pass" };
        if let Some(c) = self
            .checks
            .iter_mut()
            .find(|c| c.stage == stage && c.check == check && c.result == result && c.detail == warning)
        {
            c.count += 1;
            return;
        }
        // Bounded: a warning per distinct reply, and recipients are capped.
        if self.checks.len() < 64 {
            self.checks.push(Check {
                stage: Cow::Borrowed(stage),
                check: Cow::Borrowed(check),
                result: Cow::Borrowed(result),
                count: 1,
                detail: warning,
            });
        }
    }

    /// Charge one recipient (and, for the first, one message) to the
    /// tenant's, credential's and sender domain's budgets and warm-up;
    /// the refusal when one is used up.
    async fn over_budget(&self) -> Option<Reply> {
        let (policy, id, tx) = (self.shared.policy.as_ref()?, self.identity.as_ref()?, self.tx.as_ref()?);
        let sender_domain = tx.from.as_ref().map(|m| m.domain_lc());
        let who = crate::rate::budget::Who {
            tenant: &id.tenant_name,
            credential: id.username.as_deref(),
            sender_domain: sender_domain.as_deref(),
        };
        let over = policy.charge_budgets(&who, tx.rcpts.is_empty()).await.err()?;
        info!(scope = over.scope.as_str(), key = %over.key, retry_after = ?over.retry_after, "over budget");
        Some(over.reply())
    }

    /// The guard and this session's tenant mode, unless the guard is off for it.
    fn guard(&self) -> Option<(Arc<Guard>, GuardMode)> {
        let guard = self.shared.guard.as_ref()?;
        let id = self.identity.as_ref()?;
        let mode = self.shared.cfg.tenants[id.tenant].guard;
        (mode != GuardMode::Off).then(|| (Arc::clone(guard), mode))
    }

    /// Apply the tenant's guard mode to a verdict: `enforce` returns the
    /// refusal to send; `warn` logs it, emits a `guard_warning` event and
    /// lets the command proceed.
    async fn judged(
        &mut self,
        mode: GuardMode,
        stage: &'static str,
        check: &'static str,
        verdict: Verdict,
        rcpt: Option<String>,
        from: Option<String>,
    ) -> Option<Reply> {
        let Some(reply) = verdict.refusal().cloned() else {
            self.note(stage, check, None);
            return None;
        };
        if mode == GuardMode::Enforce {
            info!(stage, reply = %reply, "guard refused");
            return Some(reply);
        }
        warn!(stage, reply = %reply, "guard would refuse (warn mode): accepted");
        self.note(stage, check, Some(reply.to_string()));
        self.reply_event(EventKind::GuardWarning, stage, &reply, rcpt, from)
            .await;
        None
    }

    /// The transaction-state checks shared by DATA and BDAT.
    fn ready_for_content(&self) -> Option<Reply> {
        match &self.tx {
            None => Some(r::bad_sequence("Need MAIL command first")),
            Some(tx) if tx.rcpts.is_empty() => Some(r::no_valid_recipients()),
            _ => None,
        }
    }

    async fn data(&mut self) -> Result<Option<Reply>, End> {
        if self.bdat.is_some() {
            return Ok(Some(r::bad_sequence("DATA not permitted after BDAT")));
        }
        if let Some(reply) = self.ready_for_content() {
            return Ok(Some(reply));
        }
        self.send(r::start_data());
        self.expected = self.shared.sink.expect();
        let limits = &self.shared.cfg.limits;
        let mut rx = DataReceiver::new(limits.max_message_bytes).with_max_line(limits.max_line_length);
        loop {
            let fed = rx.feed(&self.rbuf);
            self.rbuf.drain(..fed.consumed);
            if fed.done {
                break;
            }
            self.fill(self.shared.cfg.limits.data_timeout, true).await?;
        }
        let content = rx.finish();
        Ok(Some(self.finish_content(content).await))
    }

    async fn bdat(&mut self, size: u64, last: bool) -> Result<Option<Reply>, End> {
        // RFC 3030 §2: the chunk is always read, even when it will be refused.
        let refusal = self.ready_for_content();
        if refusal.is_none() && self.bdat.is_none() {
            let limits = &self.shared.cfg.limits;
            self.bdat = Some(BdatReceiver::new(limits.max_message_bytes).with_max_line(limits.max_line_length));
            self.expected = self.shared.sink.expect();
        }
        let mut remaining = size;
        loop {
            let take = remaining.min(self.rbuf.len() as u64) as usize;
            if let (None, Some(rx)) = (&refusal, &mut self.bdat) {
                rx.feed(&self.rbuf[..take]);
            }
            self.rbuf.drain(..take);
            remaining -= take as u64;
            if remaining == 0 {
                break;
            }
            self.fill(self.shared.cfg.limits.data_timeout, true).await?;
        }
        if let Some(reply) = refusal {
            return Ok(Some(reply));
        }
        let failed = self.bdat.as_ref().and_then(BdatReceiver::failed);
        if let Some(e) = failed {
            // RFC 3030 §2: a failed chunk ends the transaction.
            self.reset();
            return Ok(Some(self.content_error(e)));
        }
        if !last {
            return Ok(Some(r::chunk_ok(size)));
        }
        let rx = self.bdat.take().expect("receiver exists when not refused");
        Ok(Some(self.finish_content(rx.finish()).await))
    }

    fn content_error(&self, e: ContentError) -> Reply {
        let reply = match e {
            ContentError::TooBig => r::message_too_big(self.shared.cfg.limits.max_message_bytes),
            ContentError::BareLf => r::bare_lf(),
            ContentError::BareCr => r::bare_cr(),
            ContentError::Nul => r::nul_byte(),
            ContentError::LineTooLong { line } => {
                r::content_line_too_long(line, self.shared.cfg.limits.max_line_length)
            }
        };
        warn!(reply = %reply, "message content refused");
        reply
    }

    /// End of content: refuse it, or hand it to the sink for the 250.
    async fn finish_content(&mut self, content: Result<Vec<u8>, ContentError>) -> Reply {
        let tx = self.tx.take().expect("transaction checked before content");
        self.bdat = None;
        let expected = self.expected.take();
        let body = match content {
            Ok(b) => b,
            Err(e) => return self.content_error(e),
        };
        let id = self.identity.clone().expect("MAIL requires an identity");
        // The runaway guard: the same body to too many recipients from one
        // credential (or, without one, one tenant).
        let runaway = self.shared.policy.as_ref().filter(|p| p.runaway.enabled()).map(|p| {
            let key = id.username.as_deref().unwrap_or(&id.tenant_name).to_string();
            (Arc::clone(&p.runaway), key, crate::rate::runaway::body_hash(&body))
        });
        let norms: Vec<String> = match runaway {
            Some(_) => tx.rcpts.iter().map(|m| m.normalized()).collect(),
            None => Vec::new(),
        };
        let norm_refs: Vec<&str> = norms.iter().map(String::as_str).collect();
        if let Some((r, key, hash)) = &runaway
            && let Err(refusal) = r.check_body(crate::throttle::now_ns(), key, *hash, &norm_refs)
        {
            warn!(credential = %key, "runaway guard: same body to too many recipients");
            return refusal.reply();
        }
        if runaway.is_some() {
            self.note("data", "runaway_body", None);
        }
        if let Some((guard, mode)) = self.guard() {
            let tenant = &self.shared.cfg.tenants[id.tenant];
            let verdict = guard.message(tenant, tx.from.as_ref(), &body).await;
            let from = tx.from.as_ref().map(|m| m.to_string()).unwrap_or_default();
            if let Some(reply) = self
                .judged(mode, "data", "content_alignment", verdict, None, Some(from))
                .await
            {
                return reply;
            }
        }
        let mut body = body;
        if let Some(guard) = self.shared.guard.clone().filter(|g| g.signs()) {
            let tenant = &self.shared.cfg.tenants[id.tenant];
            let shared_body = Arc::new(body);
            let header = guard.sign(tenant, &shared_body).await;
            body = Arc::try_unwrap(shared_body).unwrap_or_else(|b| (*b).clone());
            if let Some(h) = header {
                let tags = crate::submission::dkim_tags(&h);
                self.note("data", "dkim_sign", None);
                if let Some(c) = self.checks.last_mut().filter(|c| c.check == "dkim_sign") {
                    c.detail = tags;
                }
                let mut signed = Vec::with_capacity(h.len() + body.len());
                signed.extend_from_slice(h.as_bytes());
                signed.extend_from_slice(&body);
                body = signed;
            }
        }
        let msg = Submission {
            session_id: Arc::clone(&self.session_id),
            tenant: id.tenant_name,
            username: id.username,
            peer: self.peer,
            helo: self.helo.clone().unwrap_or_default(),
            tls: super::conn::tls_version(&self.conn),
            mail_from: tx.from,
            smtputf8: tx.params.smtputf8,
            rcpts: tx.rcpts,
            body,
            checks: std::mem::take(&mut self.checks),
            expected,
        };
        let from = msg.mail_from.as_ref().map(|m| m.to_string()).unwrap_or_default();
        let (rcpts, bytes) = (msg.rcpts.len(), msg.body.len());
        let reply = self.shared.sink.submit(msg).await;
        // Accepted messages are logged by the sink with their id.
        if reply.is_positive() {
            debug!(from = %from, rcpts, bytes, reply = %reply, "message");
        } else {
            info!(from = %from, rcpts, bytes, reply = %reply, "message refused");
        }
        if let (Some((r, key, hash)), true) = (runaway, reply.is_positive()) {
            r.commit(crate::throttle::now_ns(), &key, hash, &norm_refs);
        }
        reply
    }

    /// Next command line; `Ok(None)` for a line over the limit (already
    /// discarded up to its LF).
    async fn read_line(&mut self) -> Result<Option<Vec<u8>>, End> {
        let max = self.shared.cfg.limits.max_command_line;
        let mut discarding = false;
        loop {
            if discarding {
                let (n, found) = line::skip_past_lf(&self.rbuf);
                self.rbuf.drain(..n);
                if found {
                    return Ok(None);
                }
            } else {
                match line::frame(&self.rbuf, max) {
                    Framed::Line { len, consumed } => {
                        let l = self.rbuf[..len].to_vec();
                        self.rbuf.drain(..consumed);
                        return Ok(Some(l));
                    }
                    Framed::TooLong => {
                        discarding = true;
                        continue;
                    }
                    Framed::NeedMore => {}
                }
            }
            self.fill(self.shared.cfg.limits.command_timeout, self.tx.is_some())
                .await?;
        }
    }

    /// Flush pending replies (RFC 2920: only when we need more input), then
    /// read more bytes. Outside a transaction a drain request closes the
    /// session; inside one, only the end of the grace period does.
    async fn fill(&mut self, timeout: Duration, in_transaction: bool) -> Result<(), End> {
        self.flush().await.map_err(|_| End::Gone)?;
        let shared = Arc::clone(&self.shared);
        if !in_transaction && shared.drain.is_cancelled() {
            return Err(End::Close(r::shutting_down()));
        }
        self.rbuf.reserve(16 * 1024);
        let read = tokio::time::timeout(timeout, self.conn.read_buf(&mut self.rbuf));
        tokio::select! {
            res = read => match res {
                Ok(Ok(0)) | Ok(Err(_)) => Err(End::Gone),
                Ok(Ok(_)) => Ok(()),
                Err(_) => Err(End::Close(r::timeout())),
            },
            _ = shared.drain.cancelled(), if !in_transaction => Err(End::Close(r::shutting_down())),
            _ = shared.abort.cancelled() => Err(End::Close(r::shutting_down())),
        }
    }

    fn send(&mut self, reply: Reply) {
        reply.write_to(&mut self.wbuf);
    }

    /// Write pending replies. A client that stops reading cannot hold the
    /// session (and its connection slots) beyond `limits.command_timeout`.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let timeout = self.shared.cfg.limits.command_timeout;
        let abort = self.shared.abort.clone();
        let write = async {
            self.conn.write_all(&self.wbuf).await?;
            self.conn.flush().await
        };
        let r = tokio::select! {
            r = tokio::time::timeout(timeout, write) => match r {
                Ok(r) => r,
                Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client does not read")),
            },
            _ = abort.cancelled() => Err(std::io::Error::other("shutting down")),
        };
        // Written or not, the bytes are done with: after a failed or
        // partial write the connection is unusable, and the final flush at
        // the session's end must not wait another `command_timeout` for it
        // (nor send part of them twice).
        self.wbuf.clear();
        r
    }
}

fn parse_error_reply(e: ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand => r::unknown_command(),
        ParseError::BadCharacters => r::bad_characters(),
        ParseError::Syntax(d) => r::syntax(d),
        ParseError::BadSender(_) => r::bad_sender_syntax(),
        ParseError::BadRecipient(_) => r::bad_rcpt_syntax(),
        ParseError::UnsupportedParam(p) => r::unsupported_param(&p),
    }
}

/// Sender rights: the address or its domain is among the tenant's.
/// `*.example.com` covers subdomains of example.com (not example.com itself).
pub fn sender_permitted(tenant: &crate::config::TenantConfig, from: &Mailbox) -> bool {
    let domain = from.domain_lc();
    let norm = from.normalized();
    tenant.sender_addresses.contains(&norm)
        || tenant
            .sender_domains
            .iter()
            .any(|d| crate::config::sender_domain_matches(d, &domain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantConfig;

    /// U+212A KELVIN SIGN must not pass as "k" (Unicode case folding).
    #[test]
    fn kelvin_sign_is_not_k() {
        let t = TenantConfig {
            name: "acme".into(),
            sender_domains: vec![],
            sender_addresses: vec!["kevin@partner.example".into()],
            allow_null_sender: false,
            users: vec![],
            guard: Default::default(),
            dsn: true,
        };
        let m = crate::smtp::address::parse_mailbox("\u{212A}evin@partner.example").unwrap();
        assert!(!sender_permitted(&t, &m));
        let m = crate::smtp::address::parse_mailbox("KEVIN@partner.example").unwrap();
        assert!(sender_permitted(&t, &m));
    }

    #[test]
    fn sender_rights() {
        let t = TenantConfig {
            name: "acme".into(),
            sender_domains: vec!["acme.example".into(), "*.mail.acme.example".into()],
            sender_addresses: vec!["bot@partner.example".into()],
            allow_null_sender: false,
            users: vec![],
            guard: Default::default(),
            dsn: true,
        };
        let mb = |s: &str| crate::smtp::address::parse_mailbox(s).unwrap();
        let cases = [
            ("a@acme.example", true),
            ("a@ACME.example", true),
            ("a@sub.acme.example", false),
            ("a@x.mail.acme.example", true),
            ("a@mail.acme.example", false),
            ("a@evilmail.acme.example", false),
            ("a@acme.example.evil", false),
            ("Bot@Partner.example", true),
            ("other@partner.example", false),
        ];
        for (addr, want) in cases {
            assert_eq!(sender_permitted(&t, &mb(addr)), want, "{addr}");
        }
    }
}
