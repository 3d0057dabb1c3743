// sendguard dashboard: polls the admin API every 2 s with the bearer token
// the operator typed (kept in sessionStorage). Plain DOM, no framework.
// Every value from the API goes in through textContent: addresses, replies
// and reasons come from clients and upstreams.
"use strict";

(function () {
  const POLL_MS = 2000;
  const WINDOW_MS = 5 * 60 * 1000;
  const KEY = "sendguard.token";
  const OUTCOMES = ["delivered", "deferred", "bounced", "expired"];

  let timer = null;
  let inFlight = false;
  // Metric snapshots {t, sums} for rates and the refusal window.
  let history = [];

  const $ = (id) => document.getElementById(id);

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      if (c instanceof Node) {
        if (c.tagName === "TD") tr.appendChild(c);
        else {
          const td = document.createElement("td");
          td.appendChild(c);
          tr.appendChild(td);
        }
      } else {
        tr.appendChild(el("td", c === undefined || c === null ? "" : c));
      }
    }
    return tr;
  }

  function num(v) {
    const td = el("td", v === undefined || v === null ? "" : v, "num");
    return td;
  }

  function fill(tableId, rows, cols, emptyText) {
    const body = $(tableId).tBodies[0];
    body.replaceChildren();
    if (rows.length === 0) {
      const td = el("td", emptyText, "empty");
      td.colSpan = cols;
      const tr = document.createElement("tr");
      tr.appendChild(td);
      body.appendChild(tr);
      return;
    }
    for (const r of rows) body.appendChild(r);
  }

  function stateCell(state) {
    const td = el("td", state, "state state-" + String(state).replace(/[^a-z_]/g, ""));
    return td;
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "";
    return new Date(ms).toISOString().replace(".000Z", "Z");
  }

  function fmtRate(perSec) {
    if (perSec === null || !isFinite(perSec)) return "rate: -";
    return (perSec * 60).toFixed(perSec * 60 < 10 ? 1 : 0) + " / min";
  }

  function token() {
    return sessionStorage.getItem(KEY) || "";
  }

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const opts = { method, headers: { Authorization: "Bearer " + token() }, cache: "no-store" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const r = await fetch(path, opts);
    const text = await r.text();
    if (!r.ok) {
      let msg = text;
      try {
        const j = JSON.parse(text);
        msg = j.error + (j.field ? " (" + j.field + ")" : "");
      } catch (_) { /* not JSON */ }
      throw new HttpError(r.status, method + " " + path + ": " + r.status + " " + msg);
    }
    if ((r.headers.get("Content-Type") || "").startsWith("application/json")) return JSON.parse(text);
    return text;
  }

  // --- metrics -----------------------------------------------------------

  function unescapeLabel(v) {
    return v.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
  }

  // OpenMetrics text -> [{name, labels, value}].
  function parseMetrics(text) {
    const out = [];
    const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
    const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    for (const l of text.split("\n")) {
      if (l === "" || l[0] === "#") continue;
      const m = line.exec(l);
      if (!m) continue;
      const labels = {};
      if (m[2]) for (const x of m[2].matchAll(label)) labels[x[1]] = unescapeLabel(x[2]);
      out.push({ name: m[1], labels, value: Number(m[3]) });
    }
    return out;
  }

  function sums(samples) {
    const s = { received: 0, refusals: 0, outcomes: {}, reasons: {} };
    for (const o of OUTCOMES) s.outcomes[o] = 0;
    for (const x of samples) {
      if (x.name === "sendguard_messages_received_total") s.received += x.value;
      else if (x.name === "sendguard_recipients_total") {
        const o = x.labels.outcome || "other";
        s.outcomes[o] = (s.outcomes[o] || 0) + x.value;
      } else if (x.name === "sendguard_refusals_total") {
        s.refusals += x.value;
        const reason = x.labels.reason || "unknown";
        const r = (s.reasons[reason] = s.reasons[reason] || { total: 0, stages: new Set() });
        r.total += x.value;
        if (x.labels.stage && x.value > 0) r.stages.add(x.labels.stage);
      }
    }
    return s;
  }

  function renderMetrics(text) {
    const now = Date.now();
    const cur = sums(parseMetrics(text));
    const prev = history.length ? history[history.length - 1] : null;
    history.push({ t: now, s: cur });
    while (history.length > 2 && now - history[1].t >= WINDOW_MS) history.shift();
    const oldest = history[0];
    const dt = prev ? (now - prev.t) / 1000 : 0;
    const rate = (a, b) => (prev && dt > 0 ? Math.max(0, a - b) / dt : null);

    $("received-total").textContent = String(cur.received);
    $("received-rate").textContent = fmtRate(rate(cur.received, prev && prev.s.received));
    for (const o of OUTCOMES) {
      $("outcome-" + o).textContent = String(cur.outcomes[o] || 0);
      $("outcome-" + o + "-rate").textContent = fmtRate(rate(cur.outcomes[o] || 0, prev && (prev.s.outcomes[o] || 0)));
    }
    $("refusals-total").textContent = String(cur.refusals);
    $("refusals-rate").textContent = fmtRate(rate(cur.refusals, prev && prev.s.refusals));

    const reasons = Object.keys(cur.reasons)
      .filter((r) => cur.reasons[r].total > 0)
      .sort((a, b) => cur.reasons[b].total - cur.reasons[a].total || a.localeCompare(b));
    const rows = reasons.map((r) => {
      const before = oldest.s.reasons[r] ? oldest.s.reasons[r].total : 0;
      const tr = row([r, Array.from(cur.reasons[r].stages).sort().join(", "), num(cur.reasons[r].total - before), num(cur.reasons[r].total)]);
      tr.dataset.reason = r;
      return tr;
    });
    fill("refusals", rows, 4, "no refusals");
  }

  // --- fleet ---------------------------------------------------------------

  function renderCluster(c) {
    const p = $("fleet");
    if (c.backend !== "redis") {
      p.hidden = true;
      return;
    }
    p.hidden = false;
    p.className = c.degraded ? "warn" : "";
    p.dataset.degraded = String(Boolean(c.degraded));
    p.textContent = c.degraded
      ? "Fleet degraded: Redis unavailable for node " + c.node + ". Limits run at this node's fair share (1/" +
        c.live_nodes + "), suppression from its local replica; removals are refused until Redis returns."
      : "Fleet: node " + c.node + ", " + c.live_nodes + " live node" + (c.live_nodes === 1 ? "" : "s") + ", Redis connected.";
  }

  // --- queues, holds, breakers --------------------------------------------

  function actionButton(label, cls, onClick, attrs) {
    const b = el("button", label, cls);
    b.type = "button";
    for (const k in attrs || {}) b.dataset[k] = attrs[k];
    b.addEventListener("click", async () => {
      b.disabled = true;
      try {
        await onClick();
        showError(null);
      } catch (e) {
        showError(e);
      }
      poll();
    });
    return b;
  }

  function resume(body) {
    return () => api("POST", "/api/v1/resume", body);
  }

  function renderQueues(q) {
    $("queue-messages").textContent = String(q.messages);
    $("queue-detail").textContent = "ready " + q.ready + ", scheduled " + q.scheduled;
    const paused = $("paused");
    if (q.paused) {
      paused.textContent = "All delivery paused until " + q.paused.until + ": " + (q.paused.reason || "");
      paused.hidden = false;
    } else paused.hidden = true;

    const held = new Set((q.provider_holds || []).map((h) => h.key));
    const rows = (q.providers || []).map((p) => {
      const pairs = (p.pairs || []).map((x) => {
        const what = x.suspended_until_ms ? "suspended until " + fmtMs(x.suspended_until_ms) : "slowed x" + x.factor;
        return x.sender_domain + ": " + what;
      });
      const actions = document.createElement("td");
      if (held.has(p.provider)) {
        actions.appendChild(
          actionButton("Resume", "resume", resume({ scope: "provider", provider: p.provider }), {
            resumeProvider: p.provider,
          }),
        );
      }
      const tr = row([
        p.provider,
        stateCell(p.state),
        num(p.ready),
        num(p.scheduled),
        num(p.in_flight),
        num(p.sent_last_minute),
        p.rate,
        num(p.max_concurrency),
        pairs.join("; "),
        actions,
      ]);
      tr.dataset.provider = p.provider;
      return tr;
    });
    fill("providers", rows, 10, "no queued or shaped mail");

    const holds = [];
    const holdRow = (scope, key, h, body) => {
      const tr = row([
        scope,
        key === null ? "(all delivery)" : key,
        h.until,
        h.reason,
        actionButton("Resume", "resume", resume(body), { resumeScope: scope, resumeKey: key === null ? "" : key }),
      ]);
      tr.dataset.scope = scope;
      return tr;
    };
    if (q.paused) holds.push(holdRow("delivery", null, q.paused, { scope: "delivery" }));
    for (const h of q.provider_holds || []) holds.push(holdRow("provider", h.key, h, { scope: "provider", provider: h.key }));
    for (const h of q.tenant_holds || []) holds.push(holdRow("tenant", h.key, h, { scope: "tenant", tenant: h.key }));
    for (const h of q.sender_holds || [])
      holds.push(holdRow("sender_domain", h.key, h, { scope: "sender_domain", sender_domain: h.key }));
    for (const p of q.providers || []) {
      for (const x of p.pairs || []) {
        if (!x.suspended_until_ms && !x.slowed_until_ms) continue;
        holds.push(
          holdRow(
            "pair",
            p.provider + " / " + x.sender_domain,
            { until: fmtMs(x.suspended_until_ms || x.slowed_until_ms), reason: x.rule || (x.suspended_until_ms ? "suspended" : "slowed") },
            { scope: "pair", provider: p.provider, sender_domain: x.sender_domain },
          ),
        );
      }
    }
    fill("holds", holds, 5, "no suspensions");
  }

  function renderPolicy(pol) {
    const list = (pol.breakers || []).slice().sort((a, b) => (a.state === "closed") - (b.state === "closed"));
    const rows = list.map((b) => {
      const actions = document.createElement("td");
      if (b.state !== "closed") {
        actions.appendChild(
          actionButton("Reset", "reset", () => api("POST", "/api/v1/breakers/reset", { scope: b.scope, key: b.key }), {
            resetScope: b.scope,
            resetKey: b.key,
          }),
        );
      }
      const tr = row([
        b.scope,
        b.key,
        stateCell(b.state),
        b.reason,
        fmtMs(b.until_ms),
        num(b.sends),
        num((100 * b.bounce_rate).toFixed(2) + "%"),
        num((100 * b.complaint_rate).toFixed(3) + "%"),
        actions,
      ]);
      tr.dataset.breaker = b.scope + ":" + b.key;
      return tr;
    });
    fill("breakers", rows, 9, "no breakers");
  }

  function renderDomains(d) {
    const rows = (d.domains || []).map((x) => {
      const ul = el("ul", null, "findings");
      for (const f of x.findings || []) {
        const li = el("li", "[" + f.severity + "] " + f.check + " " + f.token + ": " + f.message);
        ul.appendChild(li);
      }
      const tr = row([x.domain, stateCell(x.status), ul]);
      tr.dataset.domain = x.domain;
      return tr;
    });
    fill("domains", rows, 3, "no sender domains configured");
  }

  // --- trace ---------------------------------------------------------------

  function traceError(e) {
    const t = $("trace-error");
    t.textContent = e ? String(e.message || e) : "";
    t.hidden = !e;
  }

  function details(ev) {
    const skip = new Set(["event", "at", "time", "ts", "rcpt", "message_id", "id"]);
    const parts = [];
    for (const k of Object.keys(ev)) {
      if (skip.has(k)) continue;
      const v = ev[k];
      parts.push(k + "=" + (typeof v === "string" ? v : JSON.stringify(v)));
    }
    return el("span", parts.join("  "), "mono");
  }

  async function showMessage(id) {
    traceError(null);
    try {
      const t = await api("GET", "/api/v1/messages/" + encodeURIComponent(id));
      $("trace-id").textContent = t.message_id;
      const rows = (t.events || []).map((ev) => row([ev.at || ev.time || ev.ts || "", ev.event, ev.rcpt || "", details(ev)]));
      for (const d of t.dsns || []) rows.push(row(["", "dsn", "", el("span", d.message_id, "mono")]));
      fill("trace-events", rows, 4, "no events");
      $("trace-detail").hidden = false;
    } catch (e) {
      traceError(e);
    }
  }

  async function search(q) {
    traceError(null);
    $("trace-detail").hidden = true;
    q = q.trim();
    if (!q) return;
    try {
      let found;
      if (/^[A-Za-z0-9]{1,64}$/.test(q)) {
        const t = await api("GET", "/api/v1/messages/" + q);
        found = [t.summary];
      } else {
        const r = await api("GET", "/api/v1/messages?limit=50&since=7d&rcpt=" + encodeURIComponent(q));
        found = r.messages || [];
      }
      const rows = found.map((m) => {
        const rcpts = (m.rcpts || []).map((r) => r.address + " (" + r.status + ")").join(", ");
        return row([
          el("span", m.message_id, "mono"),
          m.received_at,
          m.sender === "" ? "<>" : m.sender,
          rcpts,
          actionButton("Events", "events", () => showMessage(m.message_id), { message: m.message_id }),
        ]);
      });
      fill("trace-results", rows, 5, "no messages found");
      if (found.length === 1) showMessage(found[0].message_id);
    } catch (e) {
      fill("trace-results", [], 5, "no messages found");
      traceError(e);
    }
  }

  // --- polling -----------------------------------------------------------

  function showError(e) {
    const box = $("error");
    box.textContent = e ? String(e.message || e) : "";
    box.hidden = !e;
  }

  function setStatus(text, ok) {
    const s = $("status");
    s.textContent = text;
    s.className = "status " + (ok ? "ok" : "bad");
  }

  function askToken(message) {
    if (timer) clearInterval(timer);
    timer = null;
    $("main").hidden = true;
    $("token-form").hidden = false;
    setStatus("disconnected", false);
    showError(message ? new Error(message) : null);
    $("token-input").focus();
  }

  async function poll() {
    if (inFlight || !token()) return;
    inFlight = true;
    try {
      const jobs = [
        ["metrics", api("GET", "/metrics"), renderMetrics],
        ["queues", api("GET", "/api/v1/queues"), renderQueues],
        ["policy", api("GET", "/api/v1/policy"), renderPolicy],
        ["domains", api("GET", "/api/v1/domains"), renderDomains],
        ["cluster", api("GET", "/api/v1/cluster"), renderCluster],
      ];
      const results = await Promise.allSettled(jobs.map((j) => j[1]));
      const errors = [];
      results.forEach((r, i) => {
        if (r.status === "fulfilled") {
          try {
            jobs[i][2](r.value);
          } catch (e) {
            errors.push(jobs[i][0] + ": " + e.message);
          }
        } else errors.push(r.reason);
      });
      if (errors.some((e) => e instanceof HttpError && e.status === 401)) {
        sessionStorage.removeItem(KEY);
        askToken("The token was refused (401): enter the admin token.");
        return;
      }
      if (errors.length) {
        showError(new Error(errors.map((e) => String(e.message || e)).join("; ")));
        setStatus("errors", false);
      } else {
        showError(null);
        setStatus("live", true);
      }
      const now = new Date();
      const u = $("updated");
      u.textContent = now.toLocaleTimeString();
      u.dateTime = now.toISOString();
      document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    } finally {
      inFlight = false;
    }
  }

  function start() {
    $("token-form").hidden = true;
    $("main").hidden = false;
    history = [];
    poll();
    if (!timer) timer = setInterval(poll, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
      history_replace();
    }
    $("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, $("token-input").value.trim());
      $("token-input").value = "";
      start();
    });
    $("logout").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      askToken(null);
    });
    $("trace-form").addEventListener("submit", (e) => {
      e.preventDefault();
      search($("trace-query").value);
    });
    if (token()) start();
    else askToken(null);
  });

  // Drop the token from the address bar (and from the browser history).
  function history_replace() {
    window.history.replaceState(null, "", location.pathname + location.search);
  }
})();
