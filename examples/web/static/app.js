// The tickets page: reads and writes through the gateway's JSON API, live
// changes straight from the broker over WebSocket (courier.js). No
// dependencies, no build step.

const CHANGES = "tickets.changed";
/** The live feed keeps this many entries; older ones are removed. */
const MAX_FEED = 50;
/** Rows kept in the list when live tickets are added on top. */
const MAX_ROWS = 200;
/** First and longest pause between attempts to reach the broker (ms). */
const RETRY_FIRST = 1000;
const RETRY_MAX = 15000;
/** Without the live feed, a created ticket is looked up this many times,
 * the pause doubling from FOLLOW_FIRST (ms): about 30 s in all. */
const FOLLOW_TRIES = 6;
const FOLLOW_FIRST = 500;

const $ = (id) => document.getElementById(id);

const el = {
  search: $("search"),
  searchForm: $("search-form"),
  searchButton: $("search-button"),
  results: $("results"),
  count: $("result-count"),
  answeredBy: $("answered-by"),
  listError: $("list-error"),
  createForm: $("create-form"),
  title: $("new-title"),
  body: $("new-body"),
  createButton: $("create-button"),
  createStatus: $("create-status"),
  live: $("live-status"),
  dot: $("live-dot"),
  feed: $("feed"),
};

/** The query whose results the list shows (live tickets must match it). */
let shownQuery = "";

/** Tickets added to the list after its snapshot (live, or followed after a
 * create), newest last, at most MAX_ROWS: a reload that raced them (the
 * snapshot taken before they were stored) keeps them. */
const added = new Map();

function remember(t) {
  added.delete(t.id);
  added.set(t.id, t);
  while (added.size > MAX_ROWS) added.delete(added.keys().next().value);
}

/** Newest first, as the service orders them. */
function newestFirst(a, b) {
  return b.created_at - a.created_at || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0);
}

// ------------------------------------------------------------- rendering

function timeText(ms) {
  const d = new Date(ms);
  return Number.isFinite(d.getTime()) ? d.toLocaleString() : "";
}

function ticketRow(t, fresh = false) {
  const li = document.createElement("li");
  li.className = fresh ? "ticket-row fresh" : "ticket-row";
  li.dataset.id = t.id;
  const title = document.createElement("div");
  title.className = "ticket-title";
  title.textContent = t.title; // text, never HTML: titles come from users
  const body = document.createElement("div");
  body.className = "ticket-body";
  body.textContent = t.body || "";
  const meta = document.createElement("div");
  meta.className = "ticket-meta";
  meta.textContent = `${t.id} · ${timeText(t.created_at)}`;
  li.append(title, body, meta);
  if (fresh) setTimeout(() => li.classList.remove("fresh"), 2000);
  return li;
}

function rowCount() {
  return el.results.querySelectorAll(".ticket-row").length;
}

function showTickets(snapshot) {
  // The snapshot, plus tickets added since that it does not hold yet.
  const ids = new Set(snapshot.map((t) => t.id));
  const extra = [...added.values()].filter((t) => !ids.has(t.id) && matchesShown(t));
  const tickets = extra.length ? [...snapshot, ...extra].sort(newestFirst).slice(0, MAX_ROWS) : snapshot;
  el.results.replaceChildren(...tickets.map((t) => ticketRow(t)));
  if (tickets.length === 0) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = shownQuery ? `No tickets match “${shownQuery}”.` : "No tickets yet.";
    el.results.append(li);
  }
  el.count.textContent = String(tickets.length);
}

function setLive(state) {
  el.live.textContent = state; // "live", "connecting…" or "offline"
  el.dot.className = state === "live" ? "dot live" : state === "offline" ? "dot offline" : "dot";
}

// ------------------------------------------------------------------- API

async function api(path, init) {
  const res = await fetch(path, { headers: { "Content-Type": "application/json" }, ...init });
  let data = null;
  try {
    data = await res.json();
  } catch {
    // not JSON: reported below by status
  }
  if (!res.ok) {
    throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  }
  return data;
}

async function load(query) {
  el.searchButton.disabled = true;
  el.listError.hidden = true;
  try {
    const data = await api(`/api/tickets?q=${encodeURIComponent(query)}`);
    shownQuery = query;
    showTickets(data.tickets);
    el.answeredBy.textContent = data.served_by;
  } catch (e) {
    el.listError.textContent = `Could not load tickets: ${e.message}`;
    el.listError.hidden = false;
  } finally {
    el.searchButton.disabled = false;
  }
}

async function create() {
  const title = el.title.value.trim();
  if (!title) {
    el.createStatus.textContent = "A title is needed.";
    el.title.focus();
    return;
  }
  el.createButton.disabled = true;
  el.createStatus.textContent = "Sending…";
  delete el.createStatus.dataset.id;
  try {
    const data = await api("/api/tickets", {
      method: "POST",
      body: JSON.stringify({ title, body: el.body.value }),
    });
    el.createStatus.textContent = `Queued as ${data.id}; it appears below once stored.`;
    el.createStatus.dataset.id = data.id;
    el.title.value = "";
    el.body.value = "";
    // Without the live feed, the ticket is looked up until it is stored.
    if (el.live.textContent !== "live") follow(data.id);
  } catch (e) {
    el.createStatus.textContent = `Not queued: ${e.message}`;
  } finally {
    el.createButton.disabled = false;
  }
}

/** Looks `id` up until the worker has stored it (or FOLLOW_TRIES pass),
 * then lists it as the live feed would have. */
async function follow(id) {
  let pause = FOLLOW_FIRST;
  for (let n = 0; n < FOLLOW_TRIES; n++) {
    await new Promise((r) => setTimeout(r, pause));
    pause *= 2;
    try {
      const data = await api(`/api/tickets/${encodeURIComponent(id)}`);
      if (data && data.ticket) {
        addTicket(data.ticket);
        return;
      }
    } catch {
      // 404 until stored; other errors: try again too
    }
  }
}

/** Puts `t` on top of the list (once), if it matches the query shown. */
function addTicket(t) {
  remember(t);
  if (matchesShown(t) && !el.results.querySelector(`.ticket-row[data-id="${CSS.escape(t.id)}"]`)) {
    el.results.querySelector(".empty")?.remove();
    el.results.prepend(ticketRow(t, true));
    while (rowCount() > MAX_ROWS) el.results.lastElementChild.remove();
    el.count.textContent = String(rowCount());
  }
}

// ------------------------------------------------------------- live feed

/** Whether `t` belongs in the list for the query shown (as the service's LIKE). */
function matchesShown(t) {
  if (!shownQuery) return true;
  const q = shownQuery.toLowerCase();
  return t.title.toLowerCase().includes(q) || (t.body || "").toLowerCase().includes(q);
}

function onChange(message) {
  let t;
  try {
    t = message.json();
  } catch {
    return; // not a ticket: ignored
  }
  if (!t || typeof t.id !== "string" || typeof t.title !== "string") return;
  // A redelivered write is announced again: each id once.
  if (!el.feed.querySelector(`.change[data-id="${CSS.escape(t.id)}"]`)) {
    const li = document.createElement("li");
    li.className = "change";
    li.dataset.id = t.id;
    const when = document.createElement("time");
    when.textContent = new Date().toLocaleTimeString();
    const what = document.createElement("span");
    what.textContent = `New: ${t.title}`;
    li.append(when, what);
    el.feed.prepend(li);
    while (el.feed.children.length > MAX_FEED) el.feed.lastElementChild.remove();
  }
  addTicket(t);
}

async function goLive(wsUrl) {
  let pause = RETRY_FIRST;
  for (;;) {
    setLive("connecting…");
    let conn = null;
    // Only this attempt's connection may set the status: an earlier one,
    // closed below, must not flip it later.
    let current = true;
    try {
      const { connect } = await import("/courier.js");
      conn = await connect(wsUrl, {
        name: "tickets page",
        onStatus: (status) => {
          if (current) setLive(status === "connected" ? "live" : status === "closed" ? "offline" : "connecting…");
        },
      });
      const sub = conn.subscribe(CHANGES);
      sub.onMessage = onChange;
      await sub.ready;
      setLive("live");
      pause = RETRY_FIRST;
      // courier.js reconnects by itself; this resolves only once it gave up.
      await conn.closed;
    } catch (e) {
      console.warn("live updates unavailable:", e);
    }
    current = false;
    // A subscription refused leaves the connection open: close it, so the
    // next attempt does not add one more.
    if (conn) conn.close().catch(() => {});
    setLive("offline");
    await new Promise((r) => setTimeout(r, pause));
    pause = Math.min(pause * 2, RETRY_MAX);
  }
}

// ----------------------------------------------------------------- start

el.searchForm.addEventListener("submit", (e) => {
  e.preventDefault();
  load(el.search.value.trim());
});
el.createForm.addEventListener("submit", (e) => {
  e.preventDefault();
  create();
});

load("");
api("/api/config")
  .then((config) => goLive(config.ws))
  .catch((e) => {
    console.warn("no configuration:", e);
    setLive("offline");
  });
