// seadragon-proxy dashboard: plain JavaScript, no dependencies, no build step.
// Everything shown comes from the admin API; the token (if any) lives in sessionStorage and
// travels only in the Authorization header. Each panel refreshes on its own timer, so one
// failing call never stops the others; failures are reported in the status line.
"use strict";

(() => {
  const TOKEN_KEY = "seadragon-admin-token";
  const FETCH_TIMEOUT_MS = 10000;
  const QUEUE_ROWS_SHOWN = 200; // a soak test can queue 10 000; the table shows the head
  const CHART_MINUTES = 60;
  const CHART_STEP = 60;
  const ARM_MS = 5000; // a remove button stays armed this long after the first click
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);

  // -- small DOM helpers ----------------------------------------------------------------------

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "className") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(child instanceof Node ? child : document.createTextNode(String(child)));
      }
    }
    return node;
  }

  function svg(tag, attrs = {}, children = []) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function placeholder(tbody, columns, text) {
    tbody.replaceChildren(
      el("tr", { className: "placeholder" }, [el("td", { colspan: columns, text })]),
    );
  }

  // -- formatting -------------------------------------------------------------------------------

  const pad2 = (n) => String(n).padStart(2, "0");
  const clock = new Intl.DateTimeFormat(undefined, {
    hour: "2-digit", minute: "2-digit", hour12: false,
  });
  const clockSeconds = new Intl.DateTimeFormat(undefined, {
    hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
  });
  const dateTime = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
    hour12: false,
  });
  const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
    const s = Math.max(0, seconds);
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.floor(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${pad2(Math.floor(s % 60))}s`;
    return `${Math.floor(s / 3600)}h ${pad2(Math.floor((s % 3600) / 60))}m`;
  }

  function fmtWait(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    return fmtDuration(seconds);
  }

  function fmtCount(n) {
    return Number.isFinite(n) ? integer.format(n) : "—";
  }

  function fmtTick(v) {
    if (v >= 10000) return `${(v / 1000).toFixed(0)}k`;
    if (v >= 1000) return `${(v / 1000).toFixed(1).replace(/\.0$/, "")}k`;
    return String(Number(v.toFixed(2)));
  }

  function sourceLabel(name) {
    return name === null || name === undefined || name === "" ? "(none)" : name;
  }

  // -- colours per source: derived from the name (colours.js), the same on every load -------

  function sourceColour(name) {
    return globalThis.seadragonColour(sourceLabel(name));
  }

  function sourceTag(name) {
    const swatch = el("span", { className: "swatch", "aria-hidden": "true" });
    swatch.style.background = sourceColour(name);
    return el("span", { className: "source-tag" }, [swatch, sourceLabel(name)]);
  }

  // -- the token ------------------------------------------------------------------------------

  let memoryToken = "";
  function readToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return memoryToken;
    }
  }
  function writeToken(value) {
    memoryToken = value;
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // storage disabled: the token lives in memory until the page closes
    }
  }

  const auth = { refused: false, message: "" };

  function renderAuth() {
    const banner = $("auth-message");
    if (!auth.refused) {
      banner.hidden = true;
      banner.replaceChildren();
      return;
    }
    const hasToken = readToken() !== "";
    const children = hasToken
      ? [
        el("strong", { text: "Admin token refused." }),
        " The admin API did not accept the token you entered. Check it and enter it again in the “Admin token” field above.",
      ]
      : [
        el("strong", { text: "Admin token needed." }),
        " This dashboard needs the admin token: enter it in the “Admin token” field above.",
      ];
    if (auth.message) {
      children.push(el("br"), el("span", { className: "hint", text: `The proxy said: ${auth.message}` }));
    }
    banner.replaceChildren(...children);
    banner.hidden = false;
  }

  // -- talking to the API ---------------------------------------------------------------------

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.name = "ApiError";
      this.status = status;
    }
  }

  /** JSON from the proxy. Throws ApiError with the API's own message on any failure. */
  async function api(path, { method = "GET", body, admin = true, accept = [] } = {}) {
    const token = readToken();
    const headers = { Accept: "application/json" };
    if (admin && token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
        signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
      });
    } catch (err) {
      const timedOut = err && err.name === "TimeoutError";
      throw new ApiError(timedOut ? "no answer within 10 s" : "cannot reach the proxy", 0);
    }
    let doc = null;
    try {
      const text = await response.text();
      doc = text ? JSON.parse(text) : null;
    } catch {
      doc = null;
    }
    const stale = token !== readToken(); // the token changed while this call was out
    if (response.ok || accept.includes(response.status)) {
      if (admin && !stale && auth.refused) {
        auth.refused = false;
        renderAuth();
      }
      return doc;
    }
    const message = doc && typeof doc.error === "string" ? doc.error : `HTTP ${response.status}`;
    if (response.status === 403 && admin && !stale) {
      auth.refused = true;
      auth.message = message;
      renderAuth();
    }
    throw new ApiError(message, response.status);
  }

  // -- the status line ------------------------------------------------------------------------

  const problems = new Map(); // panel name → message, or "auth"
  let lastGood = null;

  function renderStatus() {
    const line = $("status-line");
    const failures = [...problems].filter(([, message]) => message !== "auth");
    const suffix = lastGood ? ` (last good refresh ${clockSeconds.format(lastGood)})` : "";
    if (failures.length) {
      line.dataset.state = "error";
      line.textContent = `Could not refresh — ${failures.map(([name, m]) => `${name}: ${m}`).join("; ")}${suffix}`;
    } else if (problems.size) {
      line.dataset.state = "auth";
      line.textContent = "Waiting for the admin token.";
    } else {
      line.dataset.state = "ok";
      line.textContent = `Live · updated ${clockSeconds.format(lastGood || new Date())}`;
    }
  }

  function succeeded(name) {
    problems.delete(name);
    lastGood = new Date();
    renderStatus();
  }

  function failed(name, err) {
    const message = err instanceof ApiError ? err.message : `the page failed: ${err}`;
    problems.set(name, err instanceof ApiError && err.status === 403 ? "auth" : message);
    renderStatus();
  }

  // -- pollers: one timer per panel ---------------------------------------------------------

  class Poller {
    constructor(name, intervalMs, run, onError) {
      this.name = name;
      this.intervalMs = intervalMs;
      this.run = run;
      this.onError = onError;
      this.timer = null;
      this.busy = false;
      this.again = false;
    }

    poke() {
      clearTimeout(this.timer);
      this.timer = null;
      if (this.busy) {
        this.again = true;
        return;
      }
      this.tick();
    }

    async tick() {
      this.timer = null;
      if (document.hidden) {
        // nothing to look at: wait for the next tick (or for visibilitychange to poke)
        this.timer = setTimeout(() => this.tick(), this.intervalMs);
        return;
      }
      this.busy = true;
      try {
        await this.run();
        succeeded(this.name);
      } catch (err) {
        failed(this.name, err);
        try {
          if (this.onError) this.onError(err);
        } catch (inner) {
          console.warn("seadragon: error display failed", inner);
        }
      } finally {
        this.busy = false;
        if (this.again) {
          this.again = false;
          this.timer = setTimeout(() => this.tick(), 0);
        } else {
          this.timer = setTimeout(() => this.tick(), this.intervalMs);
        }
      }
    }
  }

  const isAuth = (err) => err instanceof ApiError && err.status === 403;
  const NEEDS_TOKEN = "Enter the admin token to see this.";

  // -- upstream health --------------------------------------------------------------------------

  let upstreamFromQueue = null; // {health, url, at}
  let probe = null; // /health answer

  const HEALTH_NOTES = {
    up: "answering",
    down: "unreachable — the queue is paused",
    failing: "unreachable for a while — requests get 502",
    unknown: "",
  };

  // The queue view reports what the proxy saw on its last request to Ollama; /health asks
  // Ollama now. The badge shows the worse of the two, so an idle proxy still shows an outage.
  function renderUpstream() {
    const now = Date.now();
    const fromQueue = upstreamFromQueue && now - upstreamFromQueue.at < 10000 ? upstreamFromQueue.health : null;
    const reachable = probe && probe.ollama && now - probe.at < 30000 ? probe.ollama.reachable : null;
    let state = fromQueue || (reachable === null ? "unknown" : reachable ? "up" : "down");
    let note = HEALTH_NOTES[state] || "";
    if (reachable === false && (state === "up" || state === "unknown")) {
      state = "down";
      note = "does not answer /api/version";
    }
    const badge = $("upstream-health");
    badge.dataset.health = state;
    badge.textContent = state;
    badge.title = note;
    $("upstream-url").textContent = upstreamFromQueue ? upstreamFromQueue.url : "";
    let version = "";
    if (probe && probe.ollama) {
      version = probe.ollama.reachable && probe.ollama.version ? `Ollama ${probe.ollama.version}` : "no answer to /api/version";
    }
    $("ollama-version").textContent = version;
  }

  async function refreshHealth() {
    probe = { ...(await api("/health", { admin: false, accept: [503] })), at: Date.now() };
    renderUpstream();
  }

  // -- queue and processing -------------------------------------------------------------------

  let queueFetchedAt = 0;

  function cell(col, content, className) {
    const td = el("td", { className, dataset: { col } });
    if (content instanceof Node) td.append(content);
    else td.textContent = content;
    return td;
  }

  function priorityCell(entry) {
    const td = cell("priority", String(entry.priority), "num");
    if (entry.effective_priority !== undefined) {
      td.append(" ", el("span", {
        className: "aged",
        text: `(now ${Number(entry.effective_priority).toFixed(1)})`,
        title: "effective priority after aging",
      }));
    }
    return td;
  }

  function tickingCell(col, base) {
    const td = cell(col, fmtDuration(base), "num");
    td.dataset.base = String(base);
    return td;
  }

  function entryCells(entry) {
    return [
      cell("source", sourceTag(entry.source)),
      priorityCell(entry),
      cell("model", entry.model || "—"),
      // With queue.backend: redis the entry names the replica it waits (or runs) at.
      cell("client", entry.replica ? `${entry.client_ip} @ ${entry.replica}` : entry.client_ip, "mono"),
      cell("path", entry.path, "mono"),
    ];
  }

  function renderQueue(view) {
    queueFetchedAt = performance.now();
    delete document.body.dataset.queueStale;
    $("queue-count").textContent = fmtCount(view.queue_length);
    $("in-flight").textContent = fmtCount(view.in_flight);
    $("slots").textContent = fmtCount(view.slots);
    document.title = view.queue_length > 0
      ? `(${view.queue_length}) seadragon-proxy`
      : "seadragon-proxy";

    const running = $("processing-body");
    if (!view.running.length) {
      placeholder(running, 7, "Nothing is running.");
      running.firstChild.dataset.testid = "processing-empty";
    } else {
      running.replaceChildren(...view.running.map((entry) => el(
        "tr", { dataset: { testid: "processing-row", id: entry.id, source: sourceLabel(entry.source) }, title: entry.server ? `request ${entry.id} on ${entry.server}` : `request ${entry.id}` },
        [...entryCells(entry), cell("waited", fmtDuration(entry.wait_time), "num"), tickingCell("running", entry.running_time)],
      )));
    }

    const queue = $("queue-body");
    const shown = view.entries.slice(0, QUEUE_ROWS_SHOWN);
    if (!shown.length) {
      placeholder(queue, 7, "Nobody is waiting.");
      queue.firstChild.dataset.testid = "queue-empty";
    } else {
      queue.replaceChildren(...shown.map((entry, i) => el(
        "tr", { dataset: { testid: "queue-row", id: entry.id, source: sourceLabel(entry.source) }, title: `request ${entry.id}` },
        [cell("position", String(i + 1), "num"), ...entryCells(entry), tickingCell("wait", entry.wait_time)],
      )));
    }
    const more = $("queue-more");
    const hiddenCount = view.entries.length - shown.length;
    more.hidden = hiddenCount <= 0;
    more.textContent = hiddenCount > 0 ? `… and ${fmtCount(hiddenCount)} more waiting.` : "";

    renderServers(view.servers || []);
    renderTenants(view.tenants || []);
    upstreamFromQueue = { ...view.upstream, at: Date.now() };
    renderUpstream();
  }

  function renderServers(servers) {
    const body = $("servers-body");
    if (!servers.length) {
      placeholder(body, 6, "No servers.");
      return;
    }
    body.replaceChildren(...servers.map((s) => {
      const health = el("span", { className: "health", text: s.health });
      health.dataset.health = s.health;
      const costs = Object.entries(s.swap_cost).map(([m, c]) => `${m} ${Number(c).toFixed(1)} s`);
      return el("tr", { dataset: { testid: "server-row", server: s.name } }, [
        cell("name", s.name, "mono"),
        cell("health", health),
        cell("running", `${fmtCount(s.in_flight)} / ${fmtCount(s.slots)}`, "num"),
        cell("loaded", s.loaded.length ? s.loaded.join(", ") : "—", "mono"),
        cell("swap_cost", costs.length ? costs.join(", ") : "—", "mono"),
        cell("swaps", fmtCount(s.swaps), "num"),
      ]);
    }));
  }

  function renderTenants(tenants) {
    const body = $("tenants-body");
    if (!tenants.length) {
      placeholder(body, 5, "No tenant has waited or used tokens in the last hour.");
      body.firstChild.dataset.testid = "tenants-empty";
      return;
    }
    body.replaceChildren(...tenants.map((t) => {
      const percent = Math.round(Number(t.share) * 1000) / 10;
      const fill = el("span", { className: "share-fill" });
      fill.style.width = `${Math.min(100, percent)}%`; // CSSOM: the page's CSP allows no inline style
      const bar = el("span", { className: "share-bar", title: `${percent}% of the last hour's tokens` }, [fill]);
      return el("tr", { dataset: { testid: "tenant-row", tenant: t.tenant } }, [
        cell("tenant", t.tenant, "mono"),
        cell("waiting", fmtCount(t.waiting), "num"),
        cell("running", fmtCount(t.running), "num"),
        cell("tokens", fmtCount(t.tokens_last_hour), "num"),
        cell("share", el("span", {}, [bar, ` ${percent}%`])),
      ]);
    }));
  }

  function tickWaits() {
    if (!queueFetchedAt || document.body.dataset.queueStale === "true") return;
    const elapsed = (performance.now() - queueFetchedAt) / 1000;
    for (const td of document.querySelectorAll("td[data-base]")) {
      td.textContent = fmtDuration(Number(td.dataset.base) + elapsed);
    }
  }

  async function refreshQueue() {
    renderQueue(await api("/api/admin/queue"));
  }

  function queueFailed(err) {
    if (!isAuth(err)) {
      document.body.dataset.queueStale = "true"; // keep the last view, dimmed and not ticking
      return;
    }
    delete document.body.dataset.queueStale;
    queueFetchedAt = 0;
    for (const id of ["queue-count", "in-flight", "slots"]) $(id).textContent = "–";
    placeholder($("processing-body"), 7, NEEDS_TOKEN);
    placeholder($("queue-body"), 7, NEEDS_TOKEN);
    placeholder($("servers-body"), 6, NEEDS_TOKEN);
    placeholder($("tenants-body"), 5, NEEDS_TOKEN);
    $("queue-more").hidden = true;
    upstreamFromQueue = null;
    renderUpstream();
  }

  // -- stats ------------------------------------------------------------------------------------

  function statsRows(groups, key, testid) {
    return groups.map((g) => el("tr", { dataset: { testid, [key]: sourceLabel(g[key]) } }, [
      cell(key, key === "source" ? sourceTag(g[key]) : sourceLabel(g[key])),
      cell("requests", fmtCount(g.requests), "num"),
      cell("errors", fmtCount(g.errors), "num"),
      cell("hung_up", fmtCount(g.hung_up), "num"),
      cell("queued", fmtCount(g.queued), "num"),
      cell("wait_p50", fmtWait(g.wait_p50), "num"),
      cell("wait_p95", fmtWait(g.wait_p95), "num"),
      cell("tokens", fmtCount(g.tokens), "num"),
      cell("prompt_tokens", fmtCount(g.prompt_tokens), "num"),
    ]));
  }

  function historyOff(err) {
    return err instanceof ApiError && err.status === 404;
  }

  async function refreshStats() {
    let summary;
    try {
      summary = await api("/api/admin/stats?since=1h");
    } catch (err) {
      if (!historyOff(err)) throw err;
      $("stats-range").textContent = "";
      placeholder($("stats-sources-body"), 9, `No totals: ${err.message}.`);
      placeholder($("stats-models-body"), 9, `No totals: ${err.message}.`);
      return;
    }
    $("stats-range").textContent = `since ${clock.format(new Date(summary.since))}`;
    const sources = $("stats-sources-body");
    if (summary.sources.length) sources.replaceChildren(...statsRows(summary.sources, "source", "stats-row"));
    else placeholder(sources, 9, "No requests in the last hour.");
    const models = $("stats-models-body");
    if (summary.models.length) models.replaceChildren(...statsRows(summary.models, "model", "stats-model-row"));
    else placeholder(models, 9, "No requests in the last hour.");
  }

  function statsFailed(err) {
    if (!isAuth(err)) return;
    $("stats-range").textContent = "";
    placeholder($("stats-sources-body"), 9, NEEDS_TOKEN);
    placeholder($("stats-models-body"), 9, NEEDS_TOKEN);
  }

  // -- charts -----------------------------------------------------------------------------------

  let timeseries = null;

  /** A round step for about `ticks` intervals up to `max`, and the axis top. */
  function niceScale(max, ticks, wholeNumbers) {
    if (!(max > 0)) return { top: wholeNumbers ? 4 : 1, step: wholeNumbers ? 1 : 0.25 };
    const raw = max / ticks;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const f = raw / magnitude;
    let step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * magnitude;
    if (wholeNumbers) step = Math.max(1, Math.round(step));
    return { top: step * Math.ceil(max / step - 1e-9), step };
  }

  /**
   * Draw one line chart into `box` as inline SVG.
   * spec: {label, yTitle, unit, whole, t0, t1, step, series: [{name, colour, points: [{t, v}], connectGaps}]}
   */
  function drawChart(box, spec) {
    const width = Math.max(280, Math.round(box.clientWidth || 600));
    const height = Math.round(Math.min(260, Math.max(190, width * 0.42)));
    const m = { left: 56, right: 16, top: 14, bottom: 40 };
    const iw = width - m.left - m.right;
    const ih = height - m.top - m.bottom;
    let max = 0;
    for (const s of spec.series) for (const p of s.points) if (p.v !== null && p.v > max) max = p.v;
    const { top, step } = niceScale(max, 4, spec.whole);
    const x = (t) => m.left + ((t - spec.t0) / (spec.t1 - spec.t0)) * iw;
    const y = (v) => m.top + ih - (v / top) * ih;

    const root = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": spec.label,
    }, [svg("title", { text: spec.label })]);

    const grid = svg("g", { class: "grid" });
    const axis = svg("g", { class: "axis" });
    for (let v = 0; v <= top + step / 2; v += step) {
      const yy = y(v);
      if (v > 0) grid.append(svg("line", { x1: m.left, x2: m.left + iw, y1: yy, y2: yy }));
      axis.append(svg("text", {
        x: m.left - 8, y: yy, "text-anchor": "end", "dominant-baseline": "middle",
        text: `${fmtTick(v)}${spec.unit}`,
      }));
    }
    // x ticks on whole quarter hours (or every 10 min when the window is short)
    const tickEvery = (spec.t1 - spec.t0) > 1800 ? 900 : 600;
    for (let t = Math.ceil(spec.t0 / tickEvery) * tickEvery; t <= spec.t1; t += tickEvery) {
      const xx = x(t);
      grid.append(svg("line", { x1: xx, x2: xx, y1: m.top, y2: m.top + ih }));
      axis.append(svg("line", { x1: xx, x2: xx, y1: m.top + ih, y2: m.top + ih + 4 }));
      axis.append(svg("text", {
        x: xx, y: m.top + ih + 16, "text-anchor": "middle", text: clock.format(new Date(t * 1000)),
      }));
    }
    axis.append(svg("path", { d: `M${m.left},${m.top} V${m.top + ih} H${m.left + iw}`, fill: "none" }));
    axis.append(svg("text", {
      class: "axis-title", x: m.left + iw, y: height - 4, "text-anchor": "end",
      text: "time (local, last hour)",
    }));
    axis.append(svg("text", {
      class: "axis-title", x: 0, y: 0, "text-anchor": "middle",
      transform: `translate(12 ${m.top + ih / 2}) rotate(-90)`, text: spec.yTitle,
    }));
    root.append(grid, axis);

    const plot = svg("g", { class: "plot" });
    for (const s of spec.series) {
      const group = svg("g", {
        class: "series", dataset: { series: s.name, points: String(s.points.filter((p) => p.v !== null).length), total: String(s.total) },
      });
      let d = "";
      let previous = null;
      for (const p of s.points) {
        if (p.v === null) {
          previous = null;
          continue;
        }
        const joined = previous !== null && (s.connectGaps || p.t - previous.t <= spec.step * 1.5);
        d += `${joined ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`;
        previous = p;
      }
      if (d) group.append(svg("path", { d, stroke: s.colour }));
      for (const p of s.points) {
        if (p.v === null || (s.dotsForNonZeroOnly && p.v === 0)) continue;
        group.append(svg("circle", {
          cx: x(p.t).toFixed(1), cy: y(p.v).toFixed(1), r: 2.8, fill: s.colour,
        }, [svg("title", { text: `${s.name} · ${clock.format(new Date(p.start * 1000))} · ${spec.describe(p.v)}` })]));
      }
      plot.append(group);
    }
    root.append(plot);
    if (!spec.series.length) {
      root.append(svg("text", {
        class: "empty", x: m.left + iw / 2, y: m.top + ih / 2, "text-anchor": "middle",
        text: "No requests in the last hour",
      }));
    }
    box.replaceChildren(root);
  }

  function renderCharts() {
    const waitBox = $("chart-wait");
    const throughputBox = $("chart-throughput");
    if (!timeseries) return;
    const { since, step, series } = timeseries;
    const buckets = Math.ceil((CHART_MINUTES * 60) / step);
    let lastBucket = buckets - 1;
    for (const points of Object.values(series)) {
      for (const p of points) lastBucket = Math.max(lastBucket, Math.round((p.t - since) / step));
    }
    const t0 = since;
    const t1 = since + (lastBucket + 1) * step;
    const metric = $("throughput-metric").value === "tokens" ? "tokens" : "requests";
    $("chart-throughput-caption").textContent = metric === "tokens"
      ? "Tokens generated per minute"
      : "Requests per minute";

    const names = Object.keys(series).sort((a, b) => sourceLabel(a).localeCompare(sourceLabel(b)));
    const totals = new Map(names.map((n) => [n, series[n].reduce((sum, p) => sum + (p.requests || 0), 0)]));
    const ordered = [...names].sort((a, b) => totals.get(b) - totals.get(a) || sourceLabel(a).localeCompare(sourceLabel(b)));

    const waitSeries = ordered.map((name) => ({
      name: sourceLabel(name),
      colour: sourceColour(name),
      total: totals.get(name),
      connectGaps: false,
      points: series[name]
        .filter((p) => p.wait_avg !== null && p.wait_avg !== undefined)
        .map((p) => ({ t: p.t + step / 2, start: p.t, v: p.wait_avg })),
    }));
    const throughputSeries = ordered.map((name) => {
      const byBucket = new Map(series[name].map((p) => [Math.round((p.t - since) / step), p]));
      const points = [];
      for (let i = 0; i <= lastBucket; i++) {
        const found = byBucket.get(i);
        const start = since + i * step;
        points.push({ t: start + step / 2, start, v: found ? (found[metric] || 0) : 0 });
      }
      return {
        name: sourceLabel(name), colour: sourceColour(name), total: totals.get(name),
        connectGaps: true, dotsForNonZeroOnly: true, points,
      };
    });

    drawChart(waitBox, {
      label: "Average queue wait per minute, per source",
      yTitle: "wait (s)", unit: "", whole: false, t0, t1, step,
      series: waitSeries,
      describe: (v) => `average wait ${fmtWait(v)}`,
    });
    drawChart(throughputBox, {
      label: `${metric === "tokens" ? "Tokens generated" : "Requests"} per minute, per source`,
      yTitle: metric === "tokens" ? "tokens / min" : "requests / min", unit: "", whole: true, t0, t1, step,
      series: throughputSeries,
      describe: (v) => `${fmtCount(v)} ${metric}`,
    });

    const legend = $("chart-legend");
    legend.replaceChildren(...ordered.map((name) => {
      const swatch = el("span", { className: "swatch", "aria-hidden": "true" });
      swatch.style.background = sourceColour(name);
      const total = totals.get(name);
      return el("li", { dataset: { source: sourceLabel(name) } }, [
        swatch, sourceLabel(name),
        el("span", { className: "legend-total", text: `${fmtCount(total)} request${total === 1 ? "" : "s"}` }),
      ]);
    }));
    $("chart-message").hidden = true;
  }

  async function refreshCharts() {
    try {
      timeseries = await api(`/api/admin/timeseries?minutes=${CHART_MINUTES}&step=${CHART_STEP}`);
    } catch (err) {
      if (!historyOff(err)) throw err;
      timeseries = null;
      $("chart-wait").replaceChildren();
      $("chart-throughput").replaceChildren();
      $("chart-legend").replaceChildren();
      const message = $("chart-message");
      message.textContent = `No charts: ${err.message}.`;
      message.hidden = false;
      return;
    }
    renderCharts();
  }

  function chartsFailed(err) {
    if (!isAuth(err)) return;
    timeseries = null;
    $("chart-wait").replaceChildren();
    $("chart-throughput").replaceChildren();
    $("chart-legend").replaceChildren();
    const message = $("chart-message");
    message.textContent = NEEDS_TOKEN;
    message.hidden = false;
  }

  // -- whitelist --------------------------------------------------------------------------------

  let whitelist = null;
  let armed = null; // {network, timer}

  function showWhitelistMessage(text, isError) {
    const message = $("wl-message");
    message.textContent = text;
    message.dataset.state = isError ? "error" : "ok";
    message.setAttribute("role", isError ? "alert" : "status");
    message.hidden = false;
  }

  function disarm() {
    if (armed) clearTimeout(armed.timer);
    armed = null;
  }

  function renderWhitelist() {
    const body = $("whitelist-body");
    if (!whitelist) return;
    if (!whitelist.length) {
      placeholder(body, 4, "The whitelist is empty: only sources that do not require it are served.");
      return;
    }
    body.replaceChildren(...whitelist.map((entry) => {
      const isArmed = armed !== null && armed.network === entry.network;
      const button = el("button", {
        type: "button",
        className: "remove",
        dataset: { testid: "whitelist-remove", network: entry.network, armed: String(isArmed) },
        "aria-label": isArmed ? `Confirm removing ${entry.network}` : `Remove ${entry.network}`,
        text: isArmed ? "Confirm remove" : "Remove",
      });
      const added = new Date(entry.added_at);
      return el("tr", { dataset: { testid: "whitelist-row", network: entry.network } }, [
        cell("network", entry.network, "mono"),
        cell("note", entry.note || "—", "wrap"),
        el("td", { dataset: { col: "added" }, title: entry.added_at, text: Number.isNaN(added.getTime()) ? entry.added_at : dateTime.format(added) }),
        el("td", { className: "num" }, [button]),
      ]);
    }));
  }

  async function refreshWhitelist() {
    const doc = await api("/api/admin/whitelist");
    whitelist = doc.entries;
    renderWhitelist();
  }

  function whitelistFailed(err) {
    if (!isAuth(err)) return;
    whitelist = null;
    disarm();
    placeholder($("whitelist-body"), 4, NEEDS_TOKEN);
  }

  async function addToWhitelist(event) {
    event.preventDefault();
    const networkInput = $("wl-network");
    const noteInput = $("wl-note");
    const network = networkInput.value.trim();
    if (!network) {
      showWhitelistMessage("Give an address (10.0.0.7) or a network (10.0.0.0/8).", true);
      networkInput.focus();
      return;
    }
    const button = $("wl-add");
    button.disabled = true;
    try {
      const answer = await api("/api/admin/whitelist", {
        method: "POST", body: { network, note: noteInput.value.trim() },
      });
      showWhitelistMessage(
        answer.added
          ? `Added ${answer.network}. It applies to new requests now.`
          : `${answer.network} was already on the whitelist; its note is updated.`,
        false,
      );
      networkInput.value = "";
      noteInput.value = "";
      networkInput.focus();
    } catch (err) {
      showWhitelistMessage(err.message, true);
      networkInput.focus();
    } finally {
      button.disabled = false;
      pollers.whitelist.poke();
    }
  }

  async function removeFromWhitelist(button) {
    const network = button.dataset.network;
    if (!armed || armed.network !== network) {
      disarm();
      armed = { network, timer: setTimeout(() => { armed = null; renderWhitelist(); }, ARM_MS) };
      renderWhitelist();
      const again = document.querySelector(`button[data-testid="whitelist-remove"][data-network="${CSS.escape(network)}"]`);
      if (again) again.focus();
      return;
    }
    disarm();
    button.disabled = true;
    try {
      const answer = await api("/api/admin/whitelist", { method: "DELETE", body: { network } });
      showWhitelistMessage(`Removed ${answer.network}. It is refused from now on unless another entry covers it.`, false);
    } catch (err) {
      showWhitelistMessage(err.message, true);
    } finally {
      pollers.whitelist.poke();
    }
  }

  // -- wiring -----------------------------------------------------------------------------------

  const pollers = {
    queue: new Poller("queue", 2000, refreshQueue, queueFailed),
    health: new Poller("health", 10000, refreshHealth, null),
    whitelist: new Poller("whitelist", 15000, refreshWhitelist, whitelistFailed),
    stats: new Poller("stats", 20000, refreshStats, statsFailed),
    chart: new Poller("chart", 20000, refreshCharts, chartsFailed),
  };

  function pokeAll() {
    for (const poller of Object.values(pollers)) poller.poke();
  }

  function start() {
    const tokenInput = $("token-input");
    tokenInput.value = readToken();
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      writeToken(tokenInput.value.trim());
      auth.refused = false;
      renderAuth();
      pokeAll();
    });
    $("token-clear").addEventListener("click", () => {
      tokenInput.value = "";
      writeToken("");
      pokeAll();
    });
    $("whitelist-form").addEventListener("submit", addToWhitelist);
    $("whitelist-body").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-testid='whitelist-remove']");
      if (button && !button.disabled) removeFromWhitelist(button);
    });
    $("throughput-metric").addEventListener("change", () => renderCharts());
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) pokeAll();
    });

    // Redraw the charts at their new width (in the next frame, so a resize never loops).
    let drawnWidth = 0;
    let frame = 0;
    new ResizeObserver(() => {
      cancelAnimationFrame(frame);
      frame = requestAnimationFrame(() => {
        const width = Math.round($("chart-wait").clientWidth);
        if (Math.abs(width - drawnWidth) > 1) {
          drawnWidth = width;
          renderCharts();
        }
      });
    }).observe($("chart-wait"));

    setInterval(tickWaits, 250);
    pokeAll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
