// batchd's live dashboard: an overview snapshot (GET /v1/overview), then every event after it
// (GET /v1/events, Server-Sent Events). No framework, no build step, nothing loaded from elsewhere.
//
// Totals are the snapshot's plus what each job.succeeded / job.failed / job.canceled after the snapshot's
// event id adds; a fresh snapshot (every 30 s, and soon after batch events) replaces the base and keeps only
// the events after its own id, so nothing is counted twice. Every piece of text from the server goes into
// the page through textContent or attributes, never as HTML.
(() => {
  "use strict";

  const FEED_LIMIT = 200; // completions the page keeps (in memory; the table shows one page of them)
  const PAGE_SIZE = 25; // rows of the completions table: the page's height does not grow with the count
  const BACKFILL_EVENTS = 200; // events before the snapshot replayed into the feed (not the totals) on open
  const REFRESH_MS = 30_000;
  // The charts move with the job events; reading the series again only corrects what events cannot tell
  // (money, a job's path when its event does not say it, rollups of another process's clock).
  const SERIES_REFRESH_MS = 300_000;
  // Events after the snapshot kept one by one to re-base the totals on the next snapshot. Past this many the
  // oldest are let go: a snapshot older than them is then not re-based on (its counts would lack events the
  // page cannot re-add), only its money taken, so memory stays bounded however fast completions arrive.
  const MAX_DELTAS = 5_000;
  const COUNT_FIELDS = [
    "succeeded",
    "failed",
    "canceled",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
  ];
  const INTERVAL_MS = { minute: 60_000, hour: 3_600_000, day: 86_400_000 };
  const SYNC_REASONS = {
    route: ["route = sync", "the producer asked for the Messages API"],
    deadline: ["deadline too near", "an auto job whose deadline was nearer than the flush + batch p90 + margin"],
    other: ["other", "another reason"],
  };
  const BATCH_REFRESH_MS = 1_000; // after batch.submitted / batch.ended, at most once per this
  const RETRY_MIN_MS = 2_000;
  const RETRY_MAX_MS = 30_000;
  const JOB_EVENTS = ["job.succeeded", "job.failed", "job.canceled", "job.retrying"];
  const OTHER_EVENTS = ["job.submitted", "batch.submitted", "batch.ended"];
  const TOTAL_FIELDS = [
    ...COUNT_FIELDS,
    "cost_usd", // from the ledger, in each overview (job events carry no cost: it moves when batches end)
    "sync_cost_usd",
    "saved_usd",
  ];
  // The statuses' labels come with every overview (batchd/statuses.py): the page keeps no list of its own.
  // `retrying` is an event (job.retrying: the job is queued again), not a status.
  const EVENT_LABELS = { retrying: { label: "Retrying", hint: "Queued again, to be tried once more" } };

  const $ = (selector, root = document) => root.querySelector(selector);
  const byTestId = (id) => $(`[data-testid="${id}"]`);

  // ---- state ---------------------------------------------------------------------------------------

  const state = {
    session: null, // {tenant, admin} once signed in
    generation: 0, // bumped on every sign-in / sign-out: late answers of an older session are dropped
    snapshot: null, // the last overview
    jobLabels: new Map(Object.entries(EVENT_LABELS)), // status -> {label, hint}, from the overviews
    batchLabels: new Map(),
    snapshotAt: 0, // performance.now() when it arrived (ages tick from there)
    snapshotWallClock: null,
    baseId: 0, // the snapshot's last_event_id: events up to it are in the snapshot's numbers
    wantId: 0, // the last batch event's id: a snapshot taken before it lacks what the batch changed
    deltas: [], // [{id, tenant, counts}] of events after baseId, to re-base on the next snapshot
    deltasFrom: 0, // the id of the last delta let go (MAX_DELTAS): a snapshot before it is not re-based on
    totals: new Map(), // tenant -> {succeeded, failed, ...}: snapshot + deltas
    cursor: 0, // the last event id received (where a reopened stream resumes)
    source: null,
    connection: "connecting",
    retryMs: RETRY_MIN_MS,
    retryTimer: null,
    refreshTimer: null,
    refreshing: false,
    refreshAgain: false,
    needStream: false, // open the stream after the next snapshot
    backfill: false, // …from a little before it, to fill the feed
    intervals: [],
    pendingRows: [], // events waiting to become feed rows at the next render
    feed: [], // the completions kept, newest first (at most FEED_LIMIT)
    feedStart: 0, // index in `feed` of the first row shown (0: the newest page)
    dialogJob: null, // the job the detail dialog shows, or is loading
    chartWindow: "1d", // the charts' window: 1h, 1d or 30d (GET /v1/series)
    seriesAsked: 0, // bumped on every series request: only the latest answer is drawn
    series: null, // the last series drawn, moved on by job events
    seriesDirty: false, // redraw the charts at the next render
    // The last event the series' reading holds, as the stream numbers them: later job events are counted
    // into it, whatever snapshot the cards were re-based on since. null: not known yet (the series was read
    // before the stream opened: the snapshot the stream opens from stands for it).
    seriesFrom: null,
    renderTimer: null,
  };

  // ---- small helpers -------------------------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === undefined || value === null || value === false) continue;
        if (key === "className") node.className = value;
        else if (key === "text") node.textContent = String(value);
        else if (key === "dataset") Object.assign(node.dataset, value);
        else node.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
  const percent = new Intl.NumberFormat(undefined, { style: "percent", maximumFractionDigits: 1 });
  const decimal = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
  const dollars = (value) => {
    const amount = Number(value) || 0;
    const digits = amount !== 0 && Math.abs(amount) < 1 ? 4 : 2; // cents hide a small bill
    return `$${amount.toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits })}`;
  };

  const num = (value) => integer.format(Number(value) || 0);
  // A share that rounds to 0% but is not nothing says so.
  const share = (part, whole) => (part > 0 && part / whole < 0.0005 ? "< 0.1%" : percent.format(part / whole));
  // Compact only in a narrow cell, which then carries the exact number in its title.
  const big = (value) => ((Number(value) || 0) >= 100_000 ? compact.format(value) : num(value));
  const compactDollars = (value) =>
    `$${new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 2 }).format(Number(value) || 0)}`;
  // The end of an id: ids made at the same moment (UUIDv7) share their start, not their random tail.
  const shortId = (id) => (id ? `…${String(id).slice(-8)}` : "—");

  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function clockTime(value) {
    const date = value instanceof Date ? value : new Date(value);
    if (Number.isNaN(date.getTime())) return "—";
    const time = date.toLocaleTimeString(undefined, { hour12: false });
    const today = new Date();
    if (date.toDateString() === today.toDateString()) return time;
    return `${date.toLocaleDateString(undefined, { month: "short", day: "numeric" })} ${time}`;
  }

  // The API's times are ISO 8601 with `T` and an offset, which every browser's Date reads.
  function dateTime(value) {
    const date = value ? new Date(value) : null;
    return date && !Number.isNaN(date.getTime()) ? date.toLocaleString() : "—";
  }

  function clip(text, limit) {
    return text.length > limit ? `${text.slice(0, limit - 1)}…` : text;
  }

  function metadataSummary(metadata) {
    if (metadata === undefined || metadata === null) return "";
    if (typeof metadata !== "object") return String(metadata);
    if (Array.isArray(metadata)) return JSON.stringify(metadata);
    return Object.entries(metadata)
      .map(([key, value]) => `${key}=${typeof value === "string" ? value : JSON.stringify(value)}`)
      .join("  ·  ");
  }

  /** A status's label as the server names it (a status it did not name: as it is). */
  function statusLabel(labels, status) {
    const known = labels.get(status);
    return known ? known.label : status;
  }

  function badge(labels, status, title) {
    const known = labels.get(status);
    return el("span", {
      className: `badge badge-${status}`,
      text: statusLabel(labels, status),
      title: title ?? (known ? known.hint : ""),
    });
  }

  function emptyTotals() {
    return Object.fromEntries(TOTAL_FIELDS.map((field) => [field, 0]));
  }

  async function api(method, path, token) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, { method, headers, credentials: "same-origin", cache: "no-store" });
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    return { status: response.status, ok: response.ok, body };
  }

  // ---- connection indicator ------------------------------------------------------------------------

  const CONNECTION_TEXT = {
    connecting: "Connecting…",
    live: "Live",
    reconnecting: "Reconnecting…",
    offline: "Offline",
    "signed-out": "Signed out",
  };

  function setConnection(kind, detail) {
    state.connection = kind;
    const node = byTestId("connection");
    node.dataset.state = kind;
    $(".conn-text", node).textContent = CONNECTION_TEXT[kind] || kind;
    node.title = detail || "";
  }

  // ---- sign-in -------------------------------------------------------------------------------------

  function showSignIn(message) {
    teardown();
    state.session = null;
    setConnection("signed-out");
    $("#dashboard-view").hidden = true;
    $("#signin-view").hidden = false;
    byTestId("identity").hidden = true;
    $("#sign-out").hidden = true;
    const error = $("#signin-error");
    error.textContent = message || "";
    error.hidden = !message;
    $("#token-input").focus();
  }

  async function signIn(token) {
    const answer = await api("POST", "/v1/session", token);
    if (answer.status === 200 && answer.body) return answer.body;
    if (answer.status === 401) return null;
    throw new Error(`the server answered ${answer.status}`);
  }

  async function onSignInSubmit(event) {
    event.preventDefault();
    const input = $("#token-input");
    const token = input.value.trim();
    if (!token) return;
    const button = $('button[type="submit"]', event.currentTarget);
    button.disabled = true;
    try {
      const session = await signIn(token);
      if (session) {
        input.value = "";
        start(session);
      } else {
        showSignIn("That token was not accepted.");
      }
    } catch (error) {
      showSignIn(`Could not sign in: ${error.message}`);
    } finally {
      button.disabled = false;
    }
  }

  async function onSignOut() {
    teardown();
    try {
      await api("DELETE", "/v1/session");
    } catch {
      // the cookie stays until the server answers; the page is signed out all the same
    }
    showSignIn();
  }

  // ---- the dashboard's life ------------------------------------------------------------------------

  function start(session) {
    teardown();
    state.session = session;
    document.body.classList.toggle("is-admin", Boolean(session.admin));
    const identity = byTestId("identity");
    identity.replaceChildren(
      el("span", { className: "who-label", text: session.admin ? "signed in as" : "tenant" }),
      el("strong", { text: session.admin ? "admin" : session.tenant }),
    );
    identity.hidden = false;
    $("#sign-out").hidden = false;
    $("#signin-view").hidden = true;
    $("#dashboard-view").hidden = false;
    clearView();
    setConnection("connecting");
    state.intervals.push(setInterval(tick, 1000));
    state.intervals.push(setInterval(refresh, REFRESH_MS));
    state.intervals.push(setInterval(loadSeries, SERIES_REFRESH_MS));
    loadSeries();
    state.needStream = state.backfill = true;
    refresh();
  }

  function teardown() {
    state.generation += 1;
    closeStream();
    for (const id of state.intervals) clearInterval(id);
    state.intervals = [];
    clearTimeout(state.retryTimer);
    clearTimeout(state.refreshTimer);
    clearTimeout(state.renderTimer);
    state.retryTimer = state.refreshTimer = state.renderTimer = null;
    state.refreshing = state.refreshAgain = state.needStream = state.backfill = false;
    state.snapshot = null;
    state.deltas = [];
    state.deltasFrom = 0;
    state.series = null;
    state.seriesDirty = false;
    state.seriesFrom = null;
    state.totals = new Map();
    state.pendingRows = [];
    state.feed = [];
    state.feedStart = 0;
    closeJob();
    state.cursor = state.baseId = state.wantId = 0;
    state.retryMs = RETRY_MIN_MS;
  }

  /** Loads a fresh overview and re-bases the totals on it. When the page has no stream yet (it just
   * started, or the server said `reset`), opens one right after the snapshot, or with backfill a little
   * before it: the events up to the snapshot then only fill the feed. */
  async function refresh() {
    const generation = state.generation;
    if (state.refreshing) {
      state.refreshAgain = true;
      return;
    }
    state.refreshing = true;
    clearTimeout(state.refreshTimer);
    state.refreshTimer = null;
    try {
      let answer;
      try {
        answer = await api("GET", "/v1/overview");
      } catch (error) {
        answer = {
          status: 0,
          ok: false,
          body: null,
          problem: `the server cannot be reached (${error.message})`,
        };
      }
      if (generation !== state.generation) return;
      if (answer.status === 401) {
        showSignIn("Your session ended: sign in again.");
        return;
      }
      if (!answer.ok || !answer.body) {
        // Try again soon; a stream already open carries on meanwhile.
        const problem = answer.problem || `the overview failed (${answer.status})`;
        if (!state.source) setConnection("offline", `${problem}; retrying`);
        scheduleRefresh(RETRY_MIN_MS * 2);
        return;
      }
      applySnapshot(answer.body);
      // The server shares one snapshot among its askers for a moment (`[http] overview_interval_s`): one
      // taken before the batch event that asked for it comes again a little later.
      if (answer.body.last_event_id < state.wantId) scheduleRefresh();
      if (state.needStream) {
        const head = answer.body.last_event_id;
        if (state.seriesFrom === null) state.seriesFrom = head;
        openStream(state.backfill ? Math.max(0, head - BACKFILL_EVENTS) : head);
        state.needStream = state.backfill = false;
      }
    } finally {
      if (generation === state.generation) {
        state.refreshing = false;
        if (state.refreshAgain) {
          state.refreshAgain = false;
          refresh();
        }
      }
    }
  }

  function scheduleRefresh(delay = BATCH_REFRESH_MS) {
    if (state.refreshTimer !== null || !state.session) return;
    state.refreshTimer = setTimeout(() => {
      state.refreshTimer = null;
      refresh();
    }, delay);
  }

  function applySnapshot(overview) {
    state.snapshot = overview;
    state.snapshotAt = performance.now();
    state.snapshotWallClock = new Date();
    // Taken before events the page no longer holds one by one: its counts cannot be re-based on, the
    // page's own (an earlier snapshot plus every event since) are exact and stay; its money is taken.
    const rebase = overview.last_event_id >= state.deltasFrom;
    state.baseId = Math.max(state.baseId, overview.last_event_id);
    state.deltas = state.deltas.filter((delta) => delta.id > state.baseId);
    for (const [labels, described] of [
      [state.jobLabels, overview.statuses.jobs],
      [state.batchLabels, overview.statuses.batches],
    ]) {
      for (const { status, label, hint } of described) labels.set(status, { label, hint });
    }
    const totals = new Map();
    for (const row of overview.totals) {
      const entry = rebase ? emptyTotals() : { ...(state.totals.get(row.tenant_id) || emptyTotals()) };
      for (const field of TOTAL_FIELDS) {
        if (rebase || !COUNT_FIELDS.includes(field)) entry[field] = Number(row[field]) || 0;
      }
      totals.set(row.tenant_id, entry);
    }
    if (!rebase) {
      for (const [tenant, entry] of state.totals) if (!totals.has(tenant)) totals.set(tenant, entry);
    }
    state.totals = totals;
    if (rebase) for (const delta of state.deltas) addToTotals(delta);
    renderOverview();
    renderTotals();
    renderFlow();
    sampleIntoFlow(overview);
  }

  function addToTotals(delta) {
    let entry = state.totals.get(delta.tenant);
    if (!entry) {
      entry = emptyTotals();
      state.totals.set(delta.tenant, entry);
    }
    for (const [field, value] of Object.entries(delta.counts)) entry[field] += value;
  }

  // ---- the event stream ----------------------------------------------------------------------------

  function openStream(fromId) {
    closeStream();
    state.cursor = fromId;
    const source = new EventSource(`/v1/events?last_event_id=${encodeURIComponent(fromId)}`);
    state.source = source;
    const generation = state.generation;
    const guard = (handler) => (event) => {
      if (state.source === source && generation === state.generation) handler(event);
    };
    let opened = false;
    source.onopen = guard(() => {
      state.retryMs = RETRY_MIN_MS;
      setConnection("live", `Streaming events since #${state.cursor}`);
      // Reconnected (the browser resumes after the last event it got): queues and batches may have
      // moved meanwhile, so take a fresh snapshot too.
      if (opened) scheduleRefresh(0);
      opened = true;
    });
    source.onerror = guard(() => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused outright (401, 429, …): EventSource gives up; find out why, then try again.
        closeStream();
        setConnection("reconnecting", "The event stream was refused; retrying");
        retryLater();
      } else if (state.connection !== "reconnecting") {
        setConnection("reconnecting", "The connection dropped; reconnecting");
      }
    });
    for (const type of [...JOB_EVENTS, ...OTHER_EVENTS]) {
      source.addEventListener(
        type,
        guard((event) => onEvent(type, event)),
      );
    }
    source.addEventListener(
      "reset",
      guard(() => {
        // Our position is gone (pruned, or another database): start over from a fresh snapshot.
        closeStream();
        setConnection("reconnecting", "Catching up from a fresh snapshot");
        state.needStream = true;
        state.seriesFrom = null;
        refresh();
        loadSeries();
      }),
    );
    source.addEventListener(
      "disconnect",
      guard((event) => {
        let data = {};
        try {
          data = JSON.parse(event.data);
        } catch {
          data = {};
        }
        if (data.reason === "revoked") {
          // Reconnecting with this token would only be refused: sign in again, with another.
          showSignIn("This token was revoked: sign in with another.");
          return;
        }
        // The server ends the stream; EventSource reconnects by itself and resumes after the last event.
        const reason =
          {
            shutdown: "The server is restarting",
            slow_consumer: "This page fell behind the event stream",
          }[data.reason] || `The server closed the stream (${data.reason || "no reason given"})`;
        setConnection("reconnecting", `${reason}; reconnecting…`);
      }),
    );
  }

  function closeStream() {
    if (state.source) {
      state.source.close();
      state.source = null;
    }
  }

  function retryLater() {
    clearTimeout(state.retryTimer);
    const generation = state.generation;
    const delay = state.retryMs;
    state.retryMs = Math.min(RETRY_MAX_MS, state.retryMs * 2);
    state.retryTimer = setTimeout(async () => {
      if (generation !== state.generation) return;
      try {
        const answer = await api("GET", "/v1/session");
        if (generation !== state.generation) return;
        if (answer.status === 401) {
          showSignIn("Your session ended: sign in again.");
          return;
        }
        openStream(state.cursor || state.baseId);
        scheduleRefresh(0);
      } catch (error) {
        if (generation !== state.generation) return;
        setConnection("offline", `The server cannot be reached (${error.message}); retrying`);
        retryLater();
      }
    }, delay);
  }

  function onEvent(type, event) {
    const id = Number(event.lastEventId) || 0;
    if (id && id <= state.cursor) return; // already seen (a resumed stream never repeats, but be sure)
    if (id) state.cursor = id;
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    const live = id > state.baseId; // older ones are already in the snapshot: feed only
    if (type.startsWith("batch.")) {
      if (live) {
        state.wantId = Math.max(state.wantId, id);
        scheduleRefresh();
      }
      return;
    }
    if (!JOB_EVENTS.includes(type)) return;
    if (live && type !== "job.retrying") {
      const usage = data.usage || {};
      const counts = {
        input_tokens: Number(usage.input_tokens) || 0,
        output_tokens: Number(usage.output_tokens) || 0,
        cache_read_input_tokens: Number(usage.cache_read_input_tokens) || 0,
        cache_creation_input_tokens: Number(usage.cache_creation_input_tokens) || 0,
      };
      counts[type.slice(4)] = 1;
      const delta = { id, tenant: data.tenant, counts };
      state.deltas.push(delta);
      if (state.deltas.length > MAX_DELTAS) {
        const gone = state.deltas.splice(0, state.deltas.length - MAX_DELTAS);
        state.deltasFrom = gone[gone.length - 1].id;
      }
      addToTotals(delta);
    }
    // The charts follow their own reading, not the cards' snapshot: a snapshot taken ahead of the stream
    // (the stream lagging under load) must not leave the events between out of the charts.
    const inSeries = state.seriesFrom === null ? live : id > state.seriesFrom;
    if (inSeries && type !== "job.retrying") countInSeries(type.slice(4), data);
    state.pendingRows.push({ id, type, data, live });
    if (state.pendingRows.length > FEED_LIMIT)
      state.pendingRows.splice(0, state.pendingRows.length - FEED_LIMIT);
    scheduleRender();
  }

  function scheduleRender() {
    if (state.renderTimer !== null) return;
    state.renderTimer = setTimeout(() => {
      state.renderTimer = null;
      renderTotals();
      renderFeed();
      if (state.seriesDirty) {
        state.seriesDirty = false;
        drawCharts(state.series);
      }
    }, 30);
  }

  // ---- rendering -----------------------------------------------------------------------------------

  /** A card's number, exact (with thousands separators); only when that does not fit the card, compact,
   * the exact value staying in the title. */
  function setCard(testId, value, sub, format = num, short = (v) => compact.format(v)) {
    const card = byTestId(testId);
    const valueNode = $(".card-value", card);
    valueNode.dataset.value = String(value);
    valueNode.dataset.exact = format(value);
    valueNode.dataset.short = short(Number(value) || 0);
    valueNode.title = format(value);
    fitCard(valueNode);
    $(".card-sub", card).textContent = sub || "\u00a0";
  }

  function fitCard(valueNode) {
    valueNode.textContent = valueNode.dataset.exact;
    if (valueNode.scrollWidth > valueNode.clientWidth) valueNode.textContent = valueNode.dataset.short;
  }

  function fitCards() {
    for (const node of document.querySelectorAll(".card-value[data-exact]")) fitCard(node);
  }

  /** Each cell names its column (data-label): narrow screens show a table's rows as stacked label: value. */
  function labelCells(table) {
    const labels = [...table.tHead.rows[0].cells].map((cell) => cell.textContent.trim());
    for (const row of table.tBodies[0].rows) {
      [...row.cells].forEach((cell, index) => {
        cell.dataset.label = labels[index] || "";
      });
    }
  }

  function sumTotals() {
    const sum = emptyTotals();
    for (const entry of state.totals.values()) {
      for (const field of TOTAL_FIELDS) sum[field] += entry[field];
    }
    return sum;
  }

  function elapsed() {
    return (performance.now() - state.snapshotAt) / 1000;
  }

  function renderTotals() {
    if (!state.snapshot) return;
    const sum = sumTotals();
    const finished = sum.succeeded + sum.failed;
    setCard(
      "card-succeeded",
      sum.succeeded,
      sum.canceled ? `jobs succeeded · ${num(sum.canceled)} canceled` : "jobs succeeded",
    );
    setCard(
      "card-failed",
      sum.failed,
      finished ? `${share(sum.failed, finished)} of finished jobs` : "no finished jobs yet",
    );
    const cache = sum.cache_read_input_tokens + sum.cache_creation_input_tokens;
    setCard(
      "card-input-tokens",
      sum.input_tokens,
      cache
        ? `cache read ${num(sum.cache_read_input_tokens)} · write ${num(sum.cache_creation_input_tokens)}`
        : "no cache use",
    );
    setCard(
      "card-output-tokens",
      sum.output_tokens,
      sum.succeeded
        ? `≈ ${num(sum.output_tokens / sum.succeeded)} per completed job`
        : "no completed jobs yet",
    );
    const sync = sum.sync_cost_usd;
    setCard(
      "card-cost",
      sum.cost_usd,
      sync ? `Messages API price ${dollars(sync)}` : "nothing spent yet",
      dollars,
      compactDollars,
    );
    setCard(
      "card-saved",
      sum.saved_usd,
      sync ? `${percent.format(sum.saved_usd / sync)} less than the Messages API` : "nothing spent yet",
      dollars,
      compactDollars,
    );
    renderTenants();
    renderMoney();
  }

  /** Budgets' words: "$12.30 of $25.00", or what was spent when there is no such budget. */
  function spentOf(spent, limit) {
    return limit === null || limit === undefined ? `${dollars(spent)} · no limit` : `${dollars(spent)} of ${dollars(limit)}`;
  }

  function heldText(budget) {
    const since = budget.held_since ? `since ${dateTime(budget.held_since)}` : "";
    return [since, budget.hold_reason].filter(Boolean).join(": ");
  }

  function renderMoney() {
    const overview = state.snapshot;
    const budgets = new Map((overview.budgets || []).map((row) => [row.tenant_id, row]));
    const names = [...new Set([...state.totals.keys(), ...budgets.keys()])].sort();
    const rows = names.map((name) => {
      const totals = state.totals.get(name) || emptyTotals();
      const budget = budgets.get(name);
      let state_;
      if (!budget) state_ = el("td", { className: "muted", text: "no budget" });
      else if (budget.held) {
        const doing = budget.over_budget === "fail" ? "queued jobs fail" : "jobs wait in the queue";
        state_ = el(
          "td",
          { className: "budget-state" },
          el(
            "span",
            {},
            el("span", { className: "badge badge-held", text: "Held", title: doing }),
            el("span", { className: "hold-reason", text: ` ${heldText(budget)}` }),
          ),
        );
      } else state_ = el("td", {}, el("span", { className: "badge badge-within", text: "Within budget" }));
      return el(
        "tr",
        { dataset: { tenant: name, held: budget && budget.held ? "true" : "false" } },
        el("td", { className: "tenant", text: name, title: name }),
        el("td", { className: "num", text: dollars(totals.cost_usd) }),
        el("td", { className: "num", text: dollars(totals.sync_cost_usd) }),
        el("td", { className: "num good", text: dollars(totals.saved_usd) }),
        el("td", {
          className: "num",
          text: budget ? spentOf(budget.spent_day_usd, budget.day_usd) : "—",
        }),
        el("td", {
          className: "num",
          text: budget ? spentOf(budget.spent_month_usd, budget.month_usd) : "—",
        }),
        state_,
      );
    });
    const table = byTestId("table-money");
    $("tbody", table).replaceChildren(...rows);
    labelCells(table);
    byTestId("money-empty").hidden = rows.length > 0;
    renderHeld([...budgets.values()].filter((row) => row.held));
  }

  /** Why queued jobs wait: the held tenants (a tenant sees only itself), above the tables. */
  function renderHeld(held) {
    const node = byTestId("held");
    node.hidden = held.length === 0;
    const lines = held.map((budget) => {
      const who = state.session.admin ? `${budget.tenant_id} is held` : "Your jobs are held";
      const doing =
        budget.over_budget === "fail"
          ? "Queued jobs fail"
          : "Queued jobs wait (none is sent)";
      return el(
        "p",
        { dataset: { testid: "held-line", tenant: budget.tenant_id } },
        el("strong", { text: who }),
        ` ${heldText(budget)}. ${doing} until the budget allows again: a new UTC day or month, or a raised budget.`,
      );
    });
    node.replaceChildren(...lines);
  }

  function renderOverview() {
    const overview = state.snapshot;
    const queued = overview.queued.reduce((total, row) => total + (Number(row.jobs) || 0), 0);
    const tenantsQueued = overview.queued.length;
    setCard("card-queued", queued, queued ? "" : "queue is empty");
    updateQueuedSub();
    const inFlight = overview.open_batches.reduce((total, row) => total + (Number(row.in_flight) || 0), 0);
    setCard(
      "card-batches",
      overview.open_batches.length,
      overview.open_batches.length
        ? `${num(inFlight)} ${state.session.admin ? "requests" : "of your requests"} in flight`
        : "nothing in flight",
    );
    renderBatches();
    $("#tenants-note").textContent = tenantsQueued > 1 ? `${tenantsQueued} tenants waiting` : "";
    const taken = clockTime(state.snapshotWallClock);
    byTestId("snapshot-note").textContent =
      `Snapshot at event #${overview.last_event_id}, ${taken} · refreshed every ${REFRESH_MS / 1000} s`;
  }

  function updateQueuedSub() {
    const overview = state.snapshot;
    if (!overview || !overview.queued.length) return;
    const oldest = Math.max(...overview.queued.map((row) => Number(row.oldest_s) || 0));
    const held = (overview.budgets || []).filter((row) => row.held);
    const waiting = `oldest waiting ${duration(oldest + elapsed())}`;
    let why = "";
    if (held.length && state.session.admin) why = ` · ${num(held.length)} tenant${held.length > 1 ? "s" : ""} held`;
    else if (held.length) why = " · held: over budget";
    byTestId("card-queued").classList.toggle("card-warn", held.length > 0);
    $(".card-sub", byTestId("card-queued")).textContent = `${waiting}${why}`;
  }

  function ageCell(seconds) {
    const cell = el("td", { className: "num age", dataset: { ageBase: String(seconds) } });
    cell.textContent = duration(seconds + elapsed());
    return cell;
  }

  function renderTenants() {
    const overview = state.snapshot;
    const queued = new Map(overview.queued.map((row) => [row.tenant_id, row]));
    const names = [...new Set([...queued.keys(), ...state.totals.keys()])].sort();
    const held = new Map((overview.budgets || []).filter((row) => row.held).map((row) => [row.tenant_id, row]));
    const rows = names.map((name) => {
      const waiting = queued.get(name);
      const totals = state.totals.get(name) || emptyTotals();
      const hold = held.get(name);
      return el(
        "tr",
        { dataset: { tenant: name } },
        el("td", { className: "tenant", text: name, title: name }),
        el(
          "td",
          { className: "num strong" },
          hold ? el("span", { className: "badge badge-held", text: "Held", title: heldText(hold) }) : null,
          ` ${num(waiting ? waiting.jobs : 0)}`,
        ),
        waiting ? ageCell(Number(waiting.oldest_s) || 0) : el("td", { className: "num muted", text: "—" }),
        el("td", { className: "num", text: num(totals.succeeded) }),
        el("td", { className: totals.failed ? "num bad" : "num", text: num(totals.failed) }),
        el("td", {
          className: "num",
          text: `${big(totals.input_tokens)} / ${big(totals.output_tokens)}`,
          title: `${num(totals.input_tokens)} input / ${num(totals.output_tokens)} output tokens`,
        }),
      );
    });
    $("tbody", byTestId("table-tenants")).replaceChildren(...rows);
    labelCells(byTestId("table-tenants"));
    byTestId("tenants-empty").hidden = rows.length > 0;
  }

  function renderBatches() {
    const batches = state.snapshot.open_batches;
    const rows = batches.map((batch) =>
      el(
        "tr",
        { dataset: { batchId: batch.id, status: batch.status } },
        el(
          "td",
          { className: "batch-cell" },
          el("span", { className: "mono strong", text: shortId(batch.id), title: batch.id }),
          el("span", {
            className: "mono provider-id",
            text: batch.provider_batch_id || "not created yet",
            title: batch.provider_batch_id || "",
          }),
        ),
        el(
          "td",
          {},
          badge(state.batchLabels, batch.status),
        ),
        el("td", { className: "num strong", text: num(batch.in_flight) }),
        el("td", {
          className: "num admin-only",
          text: batch.request_count === undefined ? "" : num(batch.request_count),
        }),
        ageCell(Number(batch.age_s) || 0),
      ),
    );
    $("tbody", byTestId("table-batches")).replaceChildren(...rows);
    labelCells(byTestId("table-batches"));
    byTestId("batches-empty").hidden = rows.length > 0;
    $("#batches-note").textContent = rows.length ? `${rows.length} open` : "";
  }

  function tick() {
    if (!state.snapshot) return;
    const since = elapsed();
    for (const cell of document.querySelectorAll("td[data-age-base]")) {
      cell.textContent = duration(Number(cell.dataset.ageBase) + since);
    }
    updateQueuedSub();
  }

  /** Blank numbers and tables until the first snapshot: nothing of a previous session stays on screen. */
  function clearView() {
    for (const valueNode of document.querySelectorAll(".card-value")) {
      valueNode.textContent = "—";
      valueNode.dataset.value = "";
      delete valueNode.dataset.exact;
      valueNode.title = "";
    }
    for (const sub of document.querySelectorAll(".card-sub")) sub.textContent = "\u00a0";
    state.feed = [];
    state.feedStart = 0;
    drawFeed();
    for (const figure of document.querySelectorAll(".chart")) {
      for (const part of [".chart-plot", ".chart-total", ".chart-from", ".chart-to", ".flow-facts"]) {
        const node = $(part, figure);
        if (node) node.replaceChildren(); // the flow's facts have no plot, the charts no facts
      }
    }
    delete byTestId("charts").dataset.state;
    delete byTestId("charts").dataset.window;
    drawMoneyKeys(null); // the admin's tenants leave the legend with the admin
    for (const id of ["table-tenants", "table-batches", "table-money", "feed"]) {
      $("tbody", byTestId(id)).replaceChildren();
    }
    for (const id of ["tenants-empty", "batches-empty", "money-empty", "feed-empty"]) byTestId(id).hidden = false;
    byTestId("held").hidden = true;
    byTestId("card-queued").classList.remove("card-warn");
    for (const id of ["#tenants-note", "#batches-note"]) $(id).textContent = "";
    $("#feed-note").textContent = "newest first";
    byTestId("snapshot-note").textContent = "";
  }

  function feedRow(item) {
    const { data, type } = item;
    const status = type.slice(4);
    const usage = data.usage;
    const tokens = usage ? `${num(usage.input_tokens)} / ${num(usage.output_tokens)}` : "—";
    const detail = el("td", { className: "col-detail" });
    const summary = metadataSummary(data.metadata);
    if (data.error && (data.error.message || data.error.type)) {
      const message = [data.error.type, data.error.message].filter(Boolean).join(": ");
      detail.append(
        el("span", { className: "error-text", text: clip(message, 400), title: clip(message, 4000) }),
      );
    }
    if (summary) {
      detail.append(
        el("span", { className: "meta-text", text: clip(summary, 400), title: clip(summary, 4000) }),
      );
    }
    if (!detail.childNodes.length) detail.append(el("span", { className: "muted", text: "—" }));
    const attempts = data.attempts ? ` (attempt ${data.attempts + (status === "retrying" ? 0 : 1)})` : "";
    return el(
      "tr",
      {
        className: item.fresh ? "feed-row is-new" : "feed-row",
        tabindex: "0",
        "aria-haspopup": "dialog",
        title: "Show the job",
        dataset: {
          testid: "feed-row",
          jobId: data.job_id,
          status,
          tenant: data.tenant,
          eventId: String(item.id),
        },
      },
      el("td", { className: "col-time mono", text: clockTime(data.at), title: data.at }),
      el("td", { className: "col-tenant tenant", text: data.tenant, title: data.tenant }),
      el("td", { className: "col-job mono", text: shortId(data.job_id), title: data.job_id }),
      el(
        "td",
        { className: "col-status" },
        badge(state.jobLabels, status, `${status}${attempts}`),
      ),
      el("td", { className: "num col-tokens", text: tokens }),
      detail,
    );
  }

  /** New events join the kept completions (newest first, FEED_LIMIT of them); a reader on an older page
   * keeps the rows they look at (the page moves down by what arrived). */
  function renderFeed() {
    const items = state.pendingRows;
    state.pendingRows = [];
    if (!items.length) return;
    const arrived = items.reverse();
    for (const item of arrived) item.fresh = item.live;
    state.feed = arrived.concat(state.feed).slice(0, FEED_LIMIT);
    if (state.feedStart > 0) state.feedStart += arrived.length;
    drawFeed();
    for (const item of arrived) item.fresh = false; // highlighted on arrival only, not on a later page turn
  }

  /** The table holds one page (PAGE_SIZE rows) of the kept completions, whatever their count. */
  function drawFeed() {
    const count = state.feed.length;
    const lastStart = Math.max(0, count - 1);
    state.feedStart = Math.max(0, Math.min(state.feedStart, lastStart));
    const start = state.feedStart;
    const shown = state.feed.slice(start, start + PAGE_SIZE);
    $("tbody", byTestId("feed")).replaceChildren(...shown.map(feedRow));
    byTestId("feed-empty").hidden = count > 0;
    byTestId("feed-pager").hidden = count <= PAGE_SIZE;
    byTestId("feed-range").textContent = count
      ? `${num(start + 1)}–${num(start + shown.length)} of ${num(count)}`
      : "";
    byTestId("feed-newer").disabled = start === 0;
    byTestId("feed-older").disabled = start + PAGE_SIZE >= count;
    $("#feed-note").textContent = count ? `newest first · the last ${num(count)} kept` : "newest first";
  }

  function turnFeed(step) {
    state.feedStart = Math.max(0, state.feedStart + step * PAGE_SIZE);
    if (step < 0 && state.feedStart < PAGE_SIZE) state.feedStart = 0;
    drawFeed();
  }

  // ---- a job's details, in a dialog ----------------------------------------------------------------

  async function openJob(jobId) {
    const dialog = byTestId("job-dialog");
    const body = byTestId("job-detail");
    const generation = state.generation;
    state.dialogJob = jobId;
    body.dataset.jobId = jobId;
    body.dataset.state = "loading";
    $("#job-dialog-title").textContent = `Job ${shortId(jobId)}`;
    body.replaceChildren(el("p", { className: "muted", text: "Loading…" }));
    if (!dialog.open) dialog.showModal();
    const show = (...nodes) => {
      if (state.dialogJob !== jobId || generation !== state.generation) return false;
      body.replaceChildren(...nodes);
      return true;
    };
    try {
      const answer = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}`);
      if (state.dialogJob !== jobId || generation !== state.generation) return;
      if (answer.status === 401) {
        showSignIn("Your session ended: sign in again.");
        return;
      }
      if (!answer.ok || !answer.body) {
        show(el("p", { className: "error-text", text: `Could not load the job (${answer.status}).` }));
        body.dataset.state = "failed";
        return;
      }
      if (show(...jobDetails(answer.body))) body.dataset.state = "loaded";
    } catch (error) {
      show(el("p", { className: "error-text", text: `Could not load the job: ${error.message}` }));
      body.dataset.state = "failed";
    }
  }

  function closeJob() {
    state.dialogJob = null;
    const dialog = byTestId("job-dialog");
    if (dialog && dialog.open) dialog.close();
  }

  function resultText(result) {
    if (!result || !Array.isArray(result.content)) return null;
    const texts = result.content.filter((block) => block && block.type === "text").map((block) => block.text);
    return texts.length ? texts.join("\n\n") : null;
  }

  function usageText(usage) {
    const parts = [`${num(usage.input_tokens)} in`, `${num(usage.output_tokens)} out`];
    if (usage.cache_read_input_tokens) parts.push(`${num(usage.cache_read_input_tokens)} cache read`);
    if (usage.cache_creation_input_tokens)
      parts.push(`${num(usage.cache_creation_input_tokens)} cache write`);
    return parts.join(" · ");
  }

  /** The job's facts, each a <div data-field> whose <dd> carries the server's value in data-value. */
  function jobDetails(job) {
    const took =
      job.created_at && job.completed_at
        ? duration((new Date(job.completed_at) - new Date(job.created_at)) / 1000)
        : null;
    // A job's cost is often a fraction of a cent: the ledger's exact amount, without trailing zeros.
    const money = (value) =>
      value === null || value === undefined
        ? "—"
        : `$${String(value).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "")}`;
    const saved =
      job.cost_usd !== null && job.sync_cost_usd !== null && job.cost_usd !== undefined
        ? (Number(job.sync_cost_usd) - Number(job.cost_usd)).toFixed(10)
        : null;
    const facts = [
      ["status", "Status", `${statusLabel(state.jobLabels, job.status)} · attempts: ${job.attempts}`, job.status],
      ["tenant", "Tenant", job.tenant_id, job.tenant_id],
      ["type", "Type", job.job_type || "raw request", job.job_type],
      ["path", "Path", job.path ? `${job.path} (route: ${job.route})` : `not decided (route: ${job.route})`, job.path],
      ["path-reason", "Why this path", job.path_reason || "—", job.path_reason],
      ["batch", "Batch", job.batch_id || "—", job.batch_id],
      ["created", "Created", dateTime(job.created_at), job.created_at],
      ["submitted", "Submitted", dateTime(job.submitted_at), job.submitted_at],
      ["completed", "Completed", took ? `${dateTime(job.completed_at)} (after ${took})` : dateTime(job.completed_at), job.completed_at],
      ["usage", "Tokens", job.usage ? usageText(job.usage) : "—", job.usage ? JSON.stringify(job.usage) : null],
      ["cost", "Cost", money(job.cost_usd), job.cost_usd],
      ["sync-cost", "Messages API price", money(job.sync_cost_usd), job.sync_cost_usd],
      ["saved", "Saved", money(saved), null], // a difference of doubles, to 10 places: not exact
    ];
    const list = el("dl", { className: "facts" });
    for (const [field, term, text, value] of facts) {
      list.append(
        el(
          "div",
          { dataset: { field } },
          el("dt", { text: term }),
          el("dd", { text, title: value === null || value === undefined ? "" : String(value), dataset: { value: value ?? "" } }),
        ),
      );
    }
    const parts = [el("p", { className: "mono job-id", text: job.id, dataset: { field: "id" } }), list];
    // Results, errors and metadata are text from elsewhere (the model, the API, a producer): textContent only.
    const text = resultText(job.result);
    if (text !== null)
      parts.push(el("h3", { text: "Result" }), el("pre", { className: "result-text", dataset: { field: "result" }, text }));
    else if (job.result)
      parts.push(
        el("h3", { text: "Result" }),
        el("pre", { dataset: { field: "result" }, text: JSON.stringify(job.result, null, 2) }),
      );
    if (job.error)
      parts.push(
        el("h3", { text: "Error" }),
        el("pre", { className: "error-text", dataset: { field: "error" }, text: JSON.stringify(job.error, null, 2) }),
      );
    if (job.metadata !== null && job.metadata !== undefined) {
      parts.push(
        el("h3", { text: "Metadata" }),
        el("pre", { dataset: { field: "metadata" }, text: JSON.stringify(job.metadata, null, 2) }),
      );
    }
    return parts;
  }

  function onFeedClick(event) {
    const row = event.target.closest("tr.feed-row");
    if (row) openJob(row.dataset.jobId);
  }

  function onFeedKey(event) {
    if (event.key !== "Enter" && event.key !== " ") return;
    const row = event.target.closest("tr.feed-row");
    if (!row || event.target !== row) return;
    event.preventDefault();
    openJob(row.dataset.jobId);
  }

  // ---- charts (GET /v1/series), hand-drawn SVG --------------------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";
  const PLOT_HEIGHT = 100; // the viewBox's height; each interval is 10 wide (a bar of 8 and a gap)
  const MIN_SLOTS = 12;

  function svg(tag, attributes, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, String(value));
    node.append(...children);
    return node;
  }

  function svgTitle(text) {
    const title = document.createElementNS(SVG, "title");
    title.textContent = text;
    return title;
  }

  /** An interval's name, in UTC as the series counts: "2026-12-07 14:00 UTC" (an hour or a minute) or
   * "2026-12-07 UTC" (a day). */
  function intervalName(start, interval) {
    const iso = new Date(start).toISOString();
    return interval === "day" ? `${iso.slice(0, 10)} UTC` : `${iso.slice(0, 10)} ${iso.slice(11, 16)} UTC`;
  }

  /** Amounts in titles to the 10th decimal, not to cents: a job's cost is often a fraction of one (and the
   * API's doubles leave noise past that: 6.6 - 3.6 is 2.9999999999999996). */
  const exactDollars = (value) => `$${Number((Number(value) || 0).toFixed(10))}`;
  const ratio = (value) => (value === null || value === undefined ? "—" : percent.format(value));

  async function loadSeries() {
    if (!state.session) return;
    const generation = state.generation;
    state.seriesAsked += 1;
    const asked = state.seriesAsked;
    const window_ = state.chartWindow;
    const panel = byTestId("charts");
    panel.dataset.state = "loading";
    let answer;
    try {
      answer = await api("GET", `/v1/series?window=${encodeURIComponent(window_)}`);
    } catch {
      answer = { status: 0, ok: false, body: null };
    }
    if (generation !== state.generation || asked !== state.seriesAsked) return;
    if (answer.status === 401) {
      showSignIn("Your session ended: sign in again.");
      return;
    }
    if (!answer.ok || !answer.body) {
      panel.dataset.state = "failed"; // the charts drawn before stay until the next try
      return;
    }
    state.series = answer.body;
    state.seriesFrom = state.source ? state.cursor : null;
    state.seriesDirty = false;
    drawCharts(answer.body);
    panel.dataset.window = window_;
    panel.dataset.state = "loaded";
  }

  /** A job that finished, counted in the interval of the series it finished in (a new one when it is
   * past the last: the window then moves on by one), as the next reading of the series would count it. Its
   * path is known when it says so: a job with a batch went in one; one that succeeded without, sync. */
  function countInSeries(outcome, data) {
    const series = state.series;
    if (!series || !series.intervals.length || !(outcome in series.intervals[0])) return;
    const length = INTERVAL_MS[series.interval];
    const at = data.at ? Date.parse(data.at) : Date.now();
    if (!length || Number.isNaN(at)) return;
    const rows = series.intervals;
    moveWindow(rows, length, at, (start, last) => {
      // The admin's spend by tenant stays aligned with the intervals (nothing spent yet in the new one).
      for (const entry of [...(series.spend_by_tenant || []), ...(series.spend_others ? [series.spend_others] : [])]) {
        entry.intervals.push({ cost_usd: 0, saved_usd: 0 });
        entry.intervals.shift();
      }
      return emptyInterval(start, last);
    });
    let row = null;
    for (let index = rows.length - 1; index >= 0 && row === null; index -= 1) {
      if (at >= Date.parse(rows[index].start)) row = rows[index];
    }
    if (row === null) return;
    row[outcome] += 1;
    if (outcome === "succeeded" || outcome === "failed") {
      if (data.batch_id) row.batch_jobs += 1;
      else if (outcome === "succeeded") row.sync_jobs += 1;
      const sent = row.batch_jobs + row.sync_jobs;
      row.batch_share = sent ? row.batch_jobs / sent : null;
    }
    state.seriesDirty = true;
  }

  /** Moves a window of intervals `length` ms long on until `at` falls in its last: each new interval made
   * by `empty(start, last)` at the end, the oldest dropped. Returns the last interval. */
  function moveWindow(rows, length, at, empty) {
    let last = rows[rows.length - 1];
    let lastStart = Date.parse(last.start);
    while (at >= lastStart + length) {
      lastStart += length;
      last = empty(new Date(lastStart).toISOString(), last);
      rows.push(last);
      rows.shift();
    }
    return last;
  }

  function emptyInterval(start, like) {
    const row = { start };
    for (const key of Object.keys(like)) if (key !== "start") row[key] = 0;
    row.batch_share = row.cache_hit_ratio = null; // nothing sent, no prompt tokens: yet
    return row;
  }

  function chooseWindow(window_) {
    state.chartWindow = window_;
    for (const button of document.querySelectorAll(".windows button")) {
      button.setAttribute("aria-pressed", String(button.dataset.window === window_));
    }
    loadSeries();
  }

  /** One chart: per interval a <g data-start> carrying the interval's numbers (data-*) and, in its <title>,
   * what they are exactly; in it a hit area the interval's height, and the stacked bars scaled to `top`.
   * `series` is anything with `intervals` and their `interval` (GET /v1/series' answer, or its `flow`).
   * `lines`: [key, value of a row (null: no point), the line's own top] drawn over the bars, one
   * <polyline data-line> per run of intervals with a value. */
  function drawChart(testId, series, parts, top, describe, total, lines = []) {
    const figure = byTestId(testId);
    const count = series.intervals.length;
    // At least MIN_SLOTS wide, the intervals at the right end: the hour window's two bars stay bars.
    const offset = Math.max(0, MIN_SLOTS - count);
    const plot = svg("svg", {
      viewBox: `0 0 ${(count + offset) * 10} ${PLOT_HEIGHT}`,
      preserveAspectRatio: "none",
      role: "img",
      "aria-label": $(".chart-title", figure).textContent,
    });
    series.intervals.forEach((row, position) => {
      const index = position + offset;
      const group = svg("g", { class: "bar", "data-start": row.start }, svgTitle(describe(row, series.interval)));
      for (const [key, value] of Object.entries(row)) {
        if (key !== "start") group.setAttribute(`data-${key.replaceAll("_", "-")}`, value === null ? "" : String(value));
      }
      group.append(svg("rect", { class: "hit", x: index * 10, y: 0, width: 10, height: PLOT_HEIGHT }));
      let y = PLOT_HEIGHT;
      // A part may carry its own attributes (data-*) and title: one tenant's share of the admin's spend.
      for (const [key, value, own] of parts(row, position)) {
        const height = top > 0 ? (Math.max(0, value) / top) * PLOT_HEIGHT : 0;
        if (height <= 0) continue;
        y -= height;
        const rect = svg("rect", {
          ...(own ? own.attributes : {}),
          class: `part part-${key}`,
          "data-part": key,
          x: index * 10 + 1,
          y,
          width: 8,
          height,
        });
        if (own) rect.append(svgTitle(own.title));
        group.append(rect);
      }
      plot.append(group);
    });
    for (const [key, value, lineTop] of lines) {
      let run = [];
      const flush = () => {
        // A run of one interval is a short level line across its slot, so that it shows.
        if (run.length === 1) run = [[run[0][0] - 4, run[0][1]], [run[0][0] + 4, run[0][1]]];
        if (run.length) plot.append(svg("polyline", { class: `line line-${key}`, "data-line": key, points: run.join(" ") }));
        run = [];
      };
      series.intervals.forEach((row, position) => {
        const point = value(row);
        if (point === null || point === undefined) return flush();
        const y = lineTop > 0 ? PLOT_HEIGHT - (Math.min(Math.max(0, point), lineTop) / lineTop) * (PLOT_HEIGHT - 2) - 1 : PLOT_HEIGHT - 1;
        run.push([(position + offset) * 10 + 5, y]);
      });
      flush();
    }
    $(".chart-plot", figure).replaceChildren(plot);
    $(".chart-total", figure).textContent = total;
    const first = series.intervals[0];
    const last = series.intervals[count - 1];
    // Minutes by their time alone (the window is the last hour); titles carry the date.
    const axis = (start) =>
      series.interval === "minute" ? `${new Date(start).toISOString().slice(11, 16)} UTC` : intervalName(start, series.interval);
    $(".chart-from", figure).textContent = first ? axis(first.start) : "";
    $(".chart-to", figure).textContent = last ? `${axis(last.start)} (so far)` : "";
  }

  const spendText = (spend) => `cost ${exactDollars(spend.cost_usd)} · saved ${exactDollars(spend.saved_usd)}`;

  /** The admin's spend by tenant (GET /v1/series gives the tenants that spent most and the rest summed):
   * one stacked part each, or null for a tenant's page (whose answer has no such thing). */
  function spendParts(series) {
    if (!Array.isArray(series.spend_by_tenant)) return null;
    const parts = series.spend_by_tenant.map((entry, index) => ({
      key: `tenant-${index}`,
      tenant: entry.tenant,
      name: entry.tenant,
      intervals: entry.intervals,
    }));
    const others = series.spend_others;
    if (others) {
      const name = `${num(others.tenants)} other tenant${others.tenants === 1 ? "" : "s"}`;
      parts.push({ key: "others", tenant: "", name, intervals: others.intervals });
    }
    return parts;
  }

  /** The spend chart's legend: the cost and what was saved, the cost split by tenant for the admin. */
  function drawMoneyKeys(spenders) {
    const keys = $(".chart-keys", byTestId("chart-money"));
    const saved = el("span", { className: "key key-saved", text: "saved (to the Messages API price)" });
    if (!spenders) {
      keys.replaceChildren(el("span", { className: "key key-cost", text: "cost" }), saved);
      return;
    }
    keys.replaceChildren(
      ...spenders.map((spender) =>
        el("span", {
          className: `key key-${spender.key}`,
          text: `${spender.name} (cost)`,
          dataset: { tenant: spender.tenant },
        }),
      ),
      saved,
    );
  }

  function drawCharts(series) {
    const rows = series.intervals;
    const sum = (key) => rows.reduce((total, row) => total + (Number(row[key]) || 0), 0);
    const finished = (row) => row.succeeded + row.failed + row.canceled;
    drawChart(
      "chart-jobs",
      series,
      (row) => [
        ["succeeded", row.succeeded],
        ["failed", row.failed],
        ["canceled", row.canceled],
      ],
      Math.max(0, ...rows.map(finished)),
      (row, interval) =>
        `${intervalName(row.start, interval)}: ${num(row.succeeded)} succeeded · ${num(row.failed)} failed · ${num(row.canceled)} canceled`,
      `${num(sum("succeeded") + sum("failed") + sum("canceled"))} jobs`,
    );
    const spenders = spendParts(series);
    drawMoneyKeys(spenders);
    drawChart(
      "chart-money",
      series,
      (row, position) =>
        spenders
          ? [
              ...spenders.map((spender) => {
                const spend = spender.intervals[position] || { cost_usd: 0, saved_usd: 0 };
                return [
                  spender.key,
                  spend.cost_usd,
                  {
                    attributes: {
                      "data-tenant": spender.tenant,
                      "data-cost-usd": spend.cost_usd,
                      "data-saved-usd": spend.saved_usd,
                    },
                    title: `${spender.name}, ${intervalName(row.start, series.interval)}: ${spendText(spend)}`,
                  },
                ];
              }),
              ["saved", row.saved_usd],
            ]
          : [
              ["cost", row.cost_usd],
              ["saved", row.saved_usd],
            ],
      Math.max(0, ...rows.map((row) => Math.max(row.sync_cost_usd, row.cost_usd))),
      (row, interval) => {
        const whole = `${intervalName(row.start, interval)}: cost ${exactDollars(row.cost_usd)} · saved ${exactDollars(row.saved_usd)} · Messages API price ${exactDollars(row.sync_cost_usd)}`;
        if (!spenders) return whole;
        const index = rows.indexOf(row);
        const lines = spenders.map((spender) => `${spender.name}: ${spendText(spender.intervals[index] || {})}`);
        return [whole, ...lines].join("\n");
      },
      `${dollars(sum("cost_usd"))} spent · ${dollars(sum("saved_usd"))} saved`,
    );
    const sent = sum("batch_jobs") + sum("sync_jobs");
    drawChart(
      "chart-share",
      series,
      (row) =>
        row.batch_share === null
          ? []
          : [
              ["batch", row.batch_share],
              ["sync", 1 - row.batch_share],
            ],
      1,
      (row, interval) =>
        `${intervalName(row.start, interval)}: ${num(row.batch_jobs)} in batches · ${num(row.sync_jobs)} sync` +
        (row.batch_share === null ? " · none sent" : ` · batch share ${ratio(row.batch_share)}`),
      sent ? `${ratio(sum("batch_jobs") / sent)} in batches` : "none sent",
    );
    const hits = rows.filter((row) => row.cache_hit_ratio !== null);
    drawChart(
      "chart-cache",
      series,
      (row) => (row.cache_hit_ratio === null ? [] : [["hits", row.cache_hit_ratio]]),
      1,
      (row, interval) =>
        `${intervalName(row.start, interval)}: cache hit ratio ${row.cache_hit_ratio === null ? "— (no prompt tokens)" : `${ratio(row.cache_hit_ratio)} (${row.cache_hit_ratio})`}`,
      hits.length ? `best ${ratio(Math.max(...hits.map((row) => row.cache_hit_ratio)))}` : "no prompt tokens",
    );
    if (series.flow) drawFlowCharts(series.flow);
  }

  /** The queue over the window (the average queued per interval as bars, the longest wait as a line on
   * its own scale) and batch turnaround (p50 and p90 as stacked bars, the routing p90 in use as a line on
   * the same scale), from GET /v1/series' `flow`. */
  function drawFlowCharts(flow) {
    const rows = flow.intervals;
    const most = (key) => Math.max(0, ...rows.map((row) => Number(row[key]) || 0));
    const sampled = rows.filter((row) => row.samples > 0);
    drawChart(
      "chart-queue",
      flow,
      (row) => (row.queued === null ? [] : [["queued", row.queued]]),
      most("queued"),
      (row, interval) =>
        row.queued === null
          ? `${intervalName(row.start, interval)}: not sampled`
          : `${intervalName(row.start, interval)}: ${decimal.format(row.queued)} queued on average, ${num(row.queued_max)} at most · oldest waited ${seconds(row.oldest_wait_s)}`,
      !sampled.length
        ? "not sampled yet"
        : most("queued_max")
          ? `at most ${num(most("queued_max"))} · longest wait ${seconds(most("oldest_wait_s"))}`
          : "nothing queued",
      [["wait", (row) => row.oldest_wait_s, most("oldest_wait_s")]],
    );
    const finished = rows.filter((row) => row.turnaround_jobs > 0);
    const turnaroundTop = Math.max(most("turnaround_p90_s"), most("routing_p90_s"));
    const last = sampled[sampled.length - 1];
    drawChart(
      "chart-turnaround",
      flow,
      (row) =>
        row.turnaround_p50_s === null
          ? []
          : [
              ["p50", row.turnaround_p50_s],
              ["p90", row.turnaround_p90_s - row.turnaround_p50_s],
            ],
      turnaroundTop,
      (row, interval) =>
        `${intervalName(row.start, interval)}: ` +
        (row.turnaround_jobs
          ? `${num(row.turnaround_jobs)} jobs · p50 ${seconds(row.turnaround_p50_s)} · p90 ${seconds(row.turnaround_p90_s)}`
          : "no batch job finished") +
        (row.routing_p90_s === null ? "" : ` · routing p90 ${seconds(row.routing_p90_s)}`),
      finished.length
        ? `p90 up to ${seconds(most("turnaround_p90_s"))}` + (last ? ` · routing ${seconds(last.routing_p90_s)}` : "")
        : last
          ? `routing p90 ${seconds(last.routing_p90_s)}`
          : "no batch job finished",
      [["routing", (row) => row.routing_p90_s, turnaroundTop]],
    );
  }

  /** A snapshot's queue (the principal's share) and routing p90 counted as one more sample of the flow's
   * last interval (a new interval when it is past the last: the window moves on by one), so the queue
   * chart moves with every overview without reading the series again; the next reading corrects it. */
  function sampleIntoFlow(overview) {
    const flow = state.series && state.series.flow;
    if (!flow || !flow.intervals.length) return;
    const last = moveWindow(flow.intervals, INTERVAL_MS[flow.interval], Date.now(), (start) => ({
      start,
      samples: 0,
      queued: null,
      queued_max: null,
      oldest_wait_s: null,
      routing_p90_s: null,
      turnaround_jobs: 0,
      turnaround_p50_s: null,
      turnaround_p90_s: null,
    }));
    const queued = overview.queued.reduce((total, row) => total + (Number(row.jobs) || 0), 0);
    const oldest = Math.max(0, ...overview.queued.map((row) => Number(row.oldest_s) || 0));
    const routing = overview.turnaround ? overview.turnaround.routing_p90_s : null;
    const samples = last.samples;
    last.queued = ((last.queued || 0) * samples + queued) / (samples + 1);
    last.queued_max = Math.max(last.queued_max || 0, queued);
    last.oldest_wait_s = Math.max(last.oldest_wait_s || 0, oldest);
    if (routing !== null && routing !== undefined) {
      last.routing_p90_s = ((last.routing_p90_s || 0) * samples + routing) / (samples + 1);
    }
    last.samples = samples + 1;
    drawFlowCharts(flow);
  }

  // ---- the flow now: batch turnaround, what went sync and why (the queue over time is a chart) -------

  /** One <div data-field> of a facts list, its exact value in data-value. */
  function fact(field, term, text, value, ...extra) {
    return el(
      "div",
      { dataset: { field } },
      el("dt", { text: term }),
      el("dd", { text, title: value === null || value === undefined ? "" : String(value), dataset: { value: value ?? "" } }, ...extra),
    );
  }

  const seconds = (value) => (value === null || value === undefined ? "—" : duration(value));

  function renderFlow() {
    const overview = state.snapshot;
    const turnaround = overview.turnaround || {};
    const measured = turnaround.samples > 0;
    const turnaroundFigure = byTestId("flow-turnaround");
    $(".chart-total", turnaroundFigure).textContent = measured
      ? `last ${num(turnaround.samples)} applied batches`
      : "no batch applied yet";
    const routing = turnaround.measured
      ? `${seconds(turnaround.routing_p90_s)} (the p90 of ${num(turnaround.samples)} batches) + margin ${seconds(turnaround.margin_s)}`
      : `${seconds(turnaround.routing_p90_s)} assumed (${num(turnaround.samples)} of ${num(turnaround.min_samples)} batches measured) + margin ${seconds(turnaround.margin_s)}`;
    $(".flow-facts", turnaroundFigure).replaceChildren(
      fact("p50", "p50", seconds(turnaround.p50_s), turnaround.p50_s),
      fact("p90", "p90", seconds(turnaround.p90_s), turnaround.p90_s),
      fact("routing-p90", "Routing uses", routing, turnaround.routing_p90_s),
    );

    const rows = overview.sync_last_hour || [];
    const sent = rows.reduce((total, row) => total + (Number(row.jobs) || 0), 0);
    const syncFigure = byTestId("flow-sync");
    $(".chart-total", syncFigure).textContent = sent ? `${num(sent)} jobs` : "none";
    $(".flow-facts", syncFigure).replaceChildren(
      ...Object.entries(SYNC_REASONS).map(([reason, [term, hint]]) => {
        const row = rows.find((entry) => entry.reason === reason);
        const jobs = row ? Number(row.jobs) || 0 : 0;
        const meter = el("span", { className: "meter", title: hint });
        meter.style.width = sent ? `${(jobs / sent) * 100}%` : "0";
        return fact(reason, term, sent ? `${num(jobs)} · ${share(jobs, sent)}` : num(jobs), jobs, meter);
      }),
    );
  }

  // ---- start ---------------------------------------------------------------------------------------

  /** A token in the address's fragment (`#token=…`, from a link batchd printed) is used once: it becomes
   * the session cookie and leaves the address bar (and the history) at once. */
  function takeFragmentToken() {
    if (!location.hash) return null;
    // Split by hand rather than with URLSearchParams, which would read a "+" in a token as a space.
    const parts = location.hash.slice(1).split("&");
    const index = parts.findIndex((part) => part.startsWith("token="));
    if (index < 0) return null;
    const [part] = parts.splice(index, 1);
    const rest = parts.join("&");
    history.replaceState(null, "", `${location.pathname}${location.search}${rest ? `#${rest}` : ""}`);
    let token = part.slice("token=".length);
    try {
      token = decodeURIComponent(token);
    } catch {
      // not percent-encoded after all: use it as it is
    }
    return token.trim() || null;
  }

  async function boot() {
    $("#signin-form").addEventListener("submit", onSignInSubmit);
    $("#sign-out").addEventListener("click", onSignOut);
    window.addEventListener("resize", fitCards);
    const feed = byTestId("feed");
    feed.addEventListener("click", onFeedClick);
    feed.addEventListener("keydown", onFeedKey);
    byTestId("feed-newer").addEventListener("click", () => turnFeed(-1));
    for (const button of document.querySelectorAll(".windows button")) {
      button.addEventListener("click", () => chooseWindow(button.dataset.window));
    }
    byTestId("feed-older").addEventListener("click", () => turnFeed(1));
    const dialog = byTestId("job-dialog");
    byTestId("job-dialog-close").addEventListener("click", closeJob);
    // A click on the backdrop (the dialog element itself, outside its box) closes it too.
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) closeJob();
    });
    dialog.addEventListener("close", () => {
      state.dialogJob = null;
    });
    // A new row's highlight plays once (not again when a resize shows a hidden column).
    feed.addEventListener("animationend", (event) => {
      const row = event.target.closest("tr.is-new");
      if (row) row.classList.remove("is-new");
    });
    try {
      const token = takeFragmentToken();
      if (token) {
        const session = await signIn(token);
        if (session) {
          start(session);
          return;
        }
        showSignIn("The token in the link was not accepted.");
        return;
      }
      const answer = await api("GET", "/v1/session");
      if (answer.status === 200 && answer.body) start(answer.body);
      else showSignIn();
    } catch (error) {
      showSignIn(`The server cannot be reached (${error.message}).`);
    }
  }

  boot();
})();
