// The mailbeat console: plain JavaScript over the JSON API, no build step.
// The admin token lives in sessionStorage only: gone when the browser tab closes.
"use strict";

const TOKEN_KEY = "mailbeat.token";
const REFRESH_MS = { mailboxes: 5000, account: 1000, "dead-letters": 10000, quarantine: 10000, system: 5000 };
const main = document.getElementById("main");
let refreshTimer = null;
let schemaFields = null; // AccountCreate's fields, read once from /openapi.json
let view = { name: "", refresh: null };
const listState = { sort: "id", dir: 1, filter: "", status: "" };

// -- helpers ------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    // A style attribute is inline style, which the console's CSP refuses; CSSOM is not.
    else if (key === "style") el.style.cssText = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(method, path, body, { raw = false } = {}) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    signOut("The admin token was refused; sign in again.");
    throw new ApiError(401, "unauthorized");
  }
  if (raw && response.ok) return response;
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, (data && data.detail) || response.statusText);
  return data;
}

function toast(text) {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (el.hidden = true), 6000);
}

function ago(value) {
  if (!value) return "never";
  const seconds = Math.max(0, (Date.now() - new Date(value).getTime()) / 1000);
  return `${duration(seconds)} ago`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function lagSeconds(account) {
  // How long since the mailbox was last read successfully.
  const since = account.last_success_at || account.created_at;
  return (Date.now() - new Date(since).getTime()) / 1000;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1048576).toFixed(1)} MB`;
}

function when(value) {
  return value ? new Date(value).toLocaleString() : "";
}

function badge(text, kind) {
  return h("span", { class: `badge ${kind || text}` }, text);
}

function message(kind, text) {
  return h("div", { class: `message ${kind}` }, text);
}

async function guarded(action) {
  try {
    await action();
  } catch (error) {
    if (error.status !== 401) toast(`Error: ${error.message}`);
  }
}

// -- sign-in ------------------------------------------------------------------------------

function signOut(reason) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopRefresh();
  renderSignIn(reason);
}

function renderSignIn(reason) {
  document.getElementById("nav").hidden = true;
  const input = h("input", {
    id: "token",
    type: "password",
    autocomplete: "off",
    placeholder: "ADMIN_API_TOKEN",
    required: true,
  });
  const form = h(
    "form",
    { class: "signin card", id: "signin" },
    h("h1", {}, "Sign in"),
    h(
      "p",
      { class: "muted" },
      "Paste the admin token (ADMIN_API_TOKEN). It is kept in this browser tab only.",
    ),
    reason ? message("bad", reason) : null,
    input,
    h("button", { type: "submit", class: "primary" }, "Sign in"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await api("GET", "/accounts?limit=1");
    } catch (error) {
      if (error.status !== 401) signOut(`The API did not answer: ${error.message}`);
      return;
    }
    route();
  });
  main.replaceChildren(form);
  input.focus();
}

// -- routing ------------------------------------------------------------------------------

function stopRefresh() {
  clearInterval(refreshTimer);
  refreshTimer = null;
}

function show(name, title, refresh) {
  stopRefresh();
  view = { name, refresh };
  document.title = `${title} - mailbeat`;
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    link.classList.toggle("active", link.dataset.view === name);
  }
  const run = () => guarded(refresh);
  run();
  if (REFRESH_MS[name]) refreshTimer = setInterval(run, REFRESH_MS[name]);
}

function route() {
  if (!token()) return renderSignIn();
  document.getElementById("nav").hidden = false;
  const hash = location.hash.replace(/^#/, "") || "/";
  let match;
  if (hash === "/") return mailboxesView();
  if (hash === "/accounts/new") return accountFormView(null);
  if ((match = hash.match(/^\/accounts\/(\d+)\/edit$/))) return accountFormView(Number(match[1]));
  if ((match = hash.match(/^\/accounts\/(\d+)$/))) return accountView(Number(match[1]));
  if (hash === "/dead-letters") return deadLettersView();
  if (hash === "/quarantine") return quarantineView();
  if (hash === "/system") return systemView();
  main.replaceChildren(h("h1", {}, "Not found"), h("a", { href: "#/" }, "Back to the mailboxes"));
}

// -- account actions (shared by the list and the mailbox page) ----------------------------

function accountActions(account, after) {
  const act = (label, run, cls) =>
    h("button", { type: "button", class: cls, "data-action": label.toLowerCase() }, label);
  const buttons = [
    act("Test"),
    act("Poll now"),
    account.enabled ? act("Disable") : act("Enable"),
    act("Edit"),
    act("Delete", null, "danger"),
  ];
  const handlers = {
    test: async () => {
      const result = await api("POST", `/accounts/${account.id}/test`);
      toast(
        result.ok
          ? `${account.email}: login and folders ok (${result.folders
              .map((f) => `${f.name}: ${f.messages}`)
              .join(", ")})`
          : `${account.email}: failed at ${result.stage}: ${result.detail}`,
      );
    },
    "poll now": async () => {
      const queued = await api("POST", `/accounts/${account.id}/poll`);
      toast(`${account.email}: poll queued (${queued.mode}, task ${queued.task_id})`);
    },
    enable: async () => {
      await api("PATCH", `/accounts/${account.id}`, { enabled: true });
      toast(`${account.email} enabled`);
    },
    disable: async () => {
      await api("PATCH", `/accounts/${account.id}`, { enabled: false });
      toast(`${account.email} disabled`);
    },
    edit: async () => {
      location.hash = `#/accounts/${account.id}/edit`;
    },
    delete: async () => {
      if (!confirm(`Delete ${account.email} with all its stored messages?`)) return;
      await api("DELETE", `/accounts/${account.id}`);
      toast(`${account.email} deleted`);
      if (location.hash !== "#/") location.hash = "#/";
    },
  };
  for (const button of buttons) {
    button.addEventListener("click", () =>
      guarded(async () => {
        button.disabled = true;
        try {
          await handlers[button.dataset.action]();
        } finally {
          button.disabled = false;
        }
        if (button.dataset.action !== "edit") await after();
      }),
    );
  }
  return h("div", { class: "actions" }, buttons);
}

// -- mailboxes ----------------------------------------------------------------------------

const COLUMNS = [
  { key: "email", label: "Mailbox", value: (a) => a.email.toLowerCase() },
  { key: "status", label: "Status", value: (a) => a.status },
  { key: "priority", label: "Priority", value: (a) => a.priority, num: true, optional: true },
  { key: "push", label: "Push", value: (a) => pushText(a), optional: true },
  { key: "last_polled_at", label: "Last poll", value: (a) => a.last_polled_at || "" },
  { key: "lag", label: "Lag", value: (a) => lagSeconds(a), num: true },
  { key: "last_error", label: "Last error", value: (a) => a.last_error || "" },
  { key: "message_count", label: "Messages", value: (a) => a.message_count, num: true },
];

async function allAccounts() {
  // By cursor: a page never skips or repeats a mailbox added or deleted meanwhile.
  const items = [];
  let after = null;
  for (;;) {
    const cursor = after === null ? "" : `&after=${after}`;
    const page = await api("GET", `/accounts?limit=500${cursor}`);
    items.push(...page.items);
    if (page.next_after === null || page.next_after === undefined) return items;
    after = page.next_after;
  }
}

function mailboxesView() {
  const filter = h("input", {
    id: "filter",
    type: "search",
    placeholder: "Filter by address, host or error",
    value: listState.filter,
  });
  const status = h(
    "select",
    { id: "status-filter" },
    ["", "active", "error", "disabled"].map((s) =>
      h("option", { value: s, selected: s === listState.status }, s || "any status"),
    ),
  );
  const summary = h("div", { class: "stats", id: "summary" });
  const table = h("table", { id: "mailboxes" });
  let accounts = [];
  const draw = () => drawMailboxes(table, accounts);
  filter.addEventListener("input", () => {
    listState.filter = filter.value;
    draw();
  });
  status.addEventListener("change", () => {
    listState.status = status.value;
    draw();
  });
  main.replaceChildren(
    h("h1", {}, "Mailboxes"),
    summary,
    h(
      "div",
      { class: "toolbar" },
      filter,
      status,
      h("span", { class: "spacer" }),
      h("a", { class: "button primary", href: "#/accounts/new", id: "add-account" }, "Add mailbox"),
    ),
    table,
  );
  show("mailboxes", "Mailboxes", async () => {
    accounts = await allAccounts();
    const counts = { active: 0, error: 0, disabled: 0 };
    for (const a of accounts) counts[a.status] = (counts[a.status] || 0) + 1;
    summary.replaceChildren(
      stat("mailboxes", accounts.length),
      stat("active", counts.active),
      stat("in error", counts.error),
      stat("disabled", counts.disabled),
      stat(
        "messages",
        accounts.reduce((sum, a) => sum + a.message_count, 0),
      ),
    );
    draw();
  });
}

function stat(name, value) {
  return h("div", { class: "stat" }, h("div", { class: "value" }, value), h("div", { class: "name" }, name));
}

function drawMailboxes(table, accounts) {
  // Optional columns show when the API has the field.
  const columns = COLUMNS.filter((c) => !c.optional || accounts.some((a) => a[c.key] !== undefined));
  const needle = listState.filter.trim().toLowerCase();
  const rows = accounts
    .filter((a) => !listState.status || a.status === listState.status)
    .filter(
      (a) =>
        !needle ||
        [a.email, a.username, a.imap_host, a.last_error || ""].some((t) =>
          t.toLowerCase().includes(needle),
        ),
    );
  const column = columns.find((c) => c.key === listState.sort);
  if (column) {
    rows.sort((x, y) => {
      const a = column.value(x);
      const b = column.value(y);
      return (a < b ? -1 : a > b ? 1 : x.id - y.id) * listState.dir;
    });
  }
  const head = h(
    "tr",
    {},
    columns.map((c) => {
      const th = h(
        "th",
        {
          "data-sort": c.key,
          class: c.num ? "num" : null,
          "aria-sort":
            listState.sort === c.key ? (listState.dir > 0 ? "ascending" : "descending") : null,
        },
        c.label,
      );
      th.addEventListener("click", () => {
        listState.dir = listState.sort === c.key ? -listState.dir : 1;
        listState.sort = c.key;
        drawMailboxes(table, accounts);
      });
      return th;
    }),
    h("th", {}, "Actions"),
  );
  const body = rows.map((a) =>
    h(
      "tr",
      { "data-account": a.id },
      columns.map((c) => h("td", { class: c.num ? "num" : c.key === "last_error" ? "error" : null }, cell(a, c.key))),
      h("td", {}, accountActions(a, () => view.refresh())),
    ),
  );
  const empty = accounts.length
    ? rows.length
      ? null
      : h("tr", {}, h("td", { colspan: columns.length + 1, class: "muted" }, "No mailbox matches."))
    : h(
        "tr",
        {},
        h("td", { colspan: columns.length + 1, class: "muted" }, "No mailbox yet: add one."),
      );
  table.replaceChildren(h("thead", {}, head), h("tbody", {}, body, empty));
}

function cell(account, key) {
  switch (key) {
    case "email":
      return [
        h("a", { href: `#/accounts/${account.id}` }, account.email),
        h("div", { class: "muted" }, `${account.imap_host}:${account.imap_port}`),
      ];
    case "status":
      return [badge(account.status), staleBadge(account)];
    case "last_polled_at":
      return h("span", { title: when(account.last_polled_at) }, ago(account.last_polled_at));
    case "lag":
      return duration(lagSeconds(account));
    case "last_error":
      return account.last_error || "";
    case "push":
      return pushCell(account);
    default:
      return account[key] ?? "";
  }
}

// Stale: no complete poll within its freshness limit (FRESHNESS_INTERVALS x interval).
function staleBadge(account) {
  if (!account.stale_since) return null;
  return h(
    "span",
    { class: "badge degraded stale", title: `No complete poll within its freshness limit since ${when(account.stale_since)}` },
    "stale",
  );
}

// Push: off, on (no watcher has looked yet), watching (IDLE held), stale (no live
// watcher confirms it), or the fallback.
function pushText(account) {
  if (!account.push) return "";
  if (account.push_status === "unsupported") return "polling only";
  if (account.push_status === "stale") return "stale: no watcher";
  if (account.push_status === "failing") return "failing: reconnecting";
  return account.push_status === "watching" ? "watching" : "on";
}

function pushCell(account) {
  const text = pushText(account);
  if (text !== "polling only") return text;
  return h(
    "span",
    { class: "badge degraded", title: "The server has no IDLE: polled on its interval only" },
    text,
  );
}

// -- one mailbox --------------------------------------------------------------------------

function progressBar(done, total, id) {
  const percent = total > 0 ? Math.min(100, Math.floor((done * 100) / total)) : 100;
  return h(
    "div",
    {
      class: `progress${percent >= 100 ? " done" : ""}`,
      role: "progressbar",
      id,
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-valuenow": percent,
    },
    h("div", { class: "bar", style: `width: ${percent}%` }),
    h("div", { class: "label" }, `${done} / ${total} (${percent} %)`),
  );
}

function accountView(id) {
  const title = h("h1", {}, `Mailbox ${id}`);
  const facts = h("div", { class: "card" });
  const sync = h("div", { class: "card", id: "first-sync" });
  const folders = h("table", { id: "folders" });
  const runs = h("table", { id: "poll-runs" });
  const audit = h("div", { id: "audit" });
  const quarantined = h("div", { id: "quarantine" });
  const messages = h("table", { id: "messages" });
  main.replaceChildren(
    h("p", {}, h("a", { href: "#/" }, "\u2190 Mailboxes")),
    title,
    facts,
    h("h2", {}, "Sync progress"),
    sync,
    h("h2", {}, "Folders and cursors"),
    folders,
    h("h2", {}, "Recent polls"),
    runs,
    h("h2", {}, "Latest audit"),
    audit,
    h("h2", {}, "Quarantined messages"),
    quarantined,
    h("h2", {}, "Recent messages"),
    messages,
  );
  show("account", `Mailbox ${id}`, async () => {
    const [account, folderList, runList, messageList, audited, held] = await Promise.all([
      api("GET", `/accounts/${id}`),
      api("GET", `/accounts/${id}/folders`),
      api("GET", `/accounts/${id}/poll-runs?limit=20`),
      api("GET", `/accounts/${id}/messages?limit=20`),
      api("GET", `/accounts/${id}/audit`),
      api("GET", `/accounts/${id}/messages?quarantined=true&limit=50`),
    ]);
    document.title = `${account.email} - mailbeat`;
    title.replaceChildren(account.email, badge(account.status), staleBadge(account));
    facts.replaceChildren(
      h(
        "dl",
        { class: "facts" },
        fact("Server", `${account.imap_host}:${account.imap_port} (${account.imap_security})`),
        fact("Username", `${account.username} (${account.auth_method})`),
        fact("Folders", account.folders.join(", ")),
        fact("Interval", duration(account.poll_interval_seconds)),
        account.priority !== undefined ? fact("Priority", account.priority) : null,
        account.push
          ? fact(
              "Push",
              account.push_status === "unsupported"
                ? "polling only: the server has no IDLE, so the mailbox is polled on its interval"
                : pushText(account),
            )
          : null,
        fact("Last poll", `${ago(account.last_polled_at)} ${when(account.last_polled_at)}`),
        fact("Last success", `${ago(account.last_success_at)} ${when(account.last_success_at)}`),
        account.stale_since
          ? fact("Stale", `since ${when(account.stale_since)}: no complete poll within its freshness limit`)
          : null,
        fact("Messages", account.message_count),
        account.last_error
          ? fact("Last error", `${account.last_error} (${account.last_error_kind})`)
          : null,
        account.consecutive_failures ? fact("Failures in a row", account.consecutive_failures) : null,
        account.backoff_until ? fact("Backing off until", when(account.backoff_until)) : null,
        account.disabled_reason ? fact("Disabled", account.disabled_reason) : null,
      ),
      h("p", {}, accountActions(account, () => view.refresh())),
    );
    drawSync(sync, folderList.items);
    drawAudit(audit, id, audited);
    drawQuarantine(quarantined, held, `/accounts/${id}/quarantine/replay`);
    folders.replaceChildren(
      h(
        "thead",
        {},
        h("tr", {}, ["Folder", "UIDVALIDITY", "Last UID", "Updated", "Latest sync"].map((t) => h("th", {}, t))),
      ),
      h(
        "tbody",
        {},
        folderList.items.map((f) =>
          h(
            "tr",
            {},
            h("td", {}, f.name),
            h("td", { class: "num" }, f.uidvalidity ?? "not polled yet"),
            h("td", { class: "num" }, f.last_uid ?? ""),
            h("td", {}, when(f.updated_at)),
            h("td", {}, f.sync_total === null || f.sync_total === undefined ? "" : `${f.sync_done} / ${f.sync_total}`),
          ),
        ),
      ),
    );
    runs.replaceChildren(
      h(
        "thead",
        {},
        h("tr", {}, ["Started", "Took", "Outcome", "Messages", "Bytes", "Error"].map((t) => h("th", {}, t))),
      ),
      h(
        "tbody",
        {},
        runList.items.length
          ? runList.items.map((r) =>
              h(
                "tr",
                {},
                h("td", {}, when(r.started_at)),
                h("td", { class: "num" }, duration(r.duration_seconds)),
                h("td", {}, badge(r.outcome, r.outcome.endsWith("_error") ? "failed" : r.outcome)),
                h("td", { class: "num" }, r.messages_count),
                h("td", { class: "num" }, bytes(r.bytes_count)),
                h("td", { class: "error" }, r.error || ""),
              ),
            )
          : h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No poll yet.")),
      ),
    );
    messages.replaceChildren(
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ["Subject", "From", "Date", "Folder", "Flags", "Size", ""].map((t) => h("th", {}, t)),
        ),
      ),
      h(
        "tbody",
        {},
        messageList.items.length
          ? messageList.items.map((m) =>
              h(
                "tr",
                { "data-message": m.id },
                h("td", {}, m.subject ?? "(no subject)"),
                h("td", {}, m.from_addr ?? ""),
                h("td", {}, when(m.date || m.internal_date)),
                h("td", {}, m.folder),
                // The server's flags as the last poll found them; "deleted" once expunged.
                h("td", {}, [...m.flags, m.deleted_at ? "deleted" : ""].join(" ").trim()),
                h("td", { class: "num" }, bytes(m.size)),
                h("td", {}, rawLink(m)),
              ),
            )
          : h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No message stored yet.")),
      ),
    );
  });
}

// The latest audit of each folder, and a button to audit now (a task: the result shows on
// the next refresh).
function drawAudit(container, id, audited) {
  const button = h("button", { type: "button", "data-action": "audit" }, "Audit now");
  button.addEventListener("click", () =>
    guarded(async () => {
      button.disabled = true;
      try {
        await api("POST", `/accounts/${id}/audit`);
        toast("audit queued");
      } finally {
        button.disabled = false;
      }
      await view.refresh();
    }),
  );
  const headers = ["Folder", "When", "Outcome", "On server", "Expected", "Stored", "Skipped", "Missing", "Repaired", "Objects", "Objects missing", "Objects repaired", "Note"];
  const table = h(
    "table",
    { id: "audit-folders" },
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      audited.folders.length
        ? audited.folders.map((f) =>
            h(
              "tr",
              { "data-folder": f.folder },
              h("td", {}, f.folder),
              h("td", {}, when(f.finished_at)),
              h("td", {}, badge(f.outcome, f.outcome === "failed" ? "failed" : f.missing || f.objects_missing ? "degraded" : "success")),
              [f.server, f.expected, f.stored, f.skipped, f.missing, f.repaired, f.objects_checked, f.objects_missing, f.objects_repaired].map((n) =>
                h("td", { class: "num" }, n),
              ),
              h("td", { class: "error" }, f.error || (f.deep ? "deep: hashes compared" : "")),
            ),
          )
        : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "Not audited yet.")),
    ),
  );
  container.replaceChildren(table, h("p", {}, button));
}

function fact(name, value) {
  return [h("dt", {}, name), h("dd", {}, value)];
}

function drawSync(container, folders) {
  const known = folders.filter((f) => f.sync_total !== null && f.sync_total !== undefined);
  if (!known.length) {
    container.replaceChildren(h("span", { class: "muted" }, "Waiting for the first poll."));
    return;
  }
  const done = known.reduce((sum, f) => sum + f.sync_done, 0);
  const total = known.reduce((sum, f) => sum + f.sync_total, 0);
  const parts = [progressBar(done, total, "sync-progress")];
  if (known.length > 1) {
    parts.push(
      h(
        "dl",
        { class: "facts", style: "margin-top: .6rem" },
        known.map((f) => fact(f.name, progressBar(f.sync_done, f.sync_total))),
      ),
    );
  }
  container.replaceChildren(...parts);
}

function rawLink(m) {
  // The raw route needs the token, which a plain link cannot carry: fetch, then save.
  const link = h("a", { href: `/messages/${m.id}/raw`, class: "raw" }, "raw");
  link.addEventListener("click", (event) => {
    event.preventDefault();
    guarded(async () => {
      const response = await api("GET", `/messages/${m.id}/raw`, undefined, { raw: true });
      const url = URL.createObjectURL(await response.blob());
      const save = h("a", { href: url, download: `message-${m.id}.eml` });
      document.body.append(save);
      save.click();
      save.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    });
  });
  return link;
}

// -- add / edit ---------------------------------------------------------------------------

async function accountFields() {
  if (schemaFields === null) {
    // The schema needs the token too unless API_DOCS_PUBLIC is on.
    const schema = await api("GET", "/openapi.json");
    schemaFields = Object.keys(schema.components.schemas.AccountCreate.properties);
  }
  return schemaFields;
}

function accountFormView(id) {
  main.replaceChildren(h("h1", {}, id ? `Edit mailbox ${id}` : "Add a mailbox"));
  show("form", id ? "Edit mailbox" : "Add mailbox", async () => {
    const [fields, account, presets] = await Promise.all([
      accountFields(),
      id ? api("GET", `/accounts/${id}`) : null,
      api("GET", "/accounts/providers").then((list) => list.items, () => []),
    ]);
    drawForm(id, account, fields, presets);
  });
}

function drawForm(id, account, fields, presets = []) {
  const a = account || {
    imap_port: 993,
    imap_security: "ssl",
    folders: ["INBOX"],
    poll_interval_seconds: 300,
    enabled: true,
  };
  const input = (name, attrs) =>
    h("input", { name, id: `field-${name}`, value: a[name] ?? "", ...attrs });
  const row = (label, name, control) => [h("label", { for: `field-${name}` }, label), control];
  const security = h(
    "select",
    { name: "imap_security", id: "field-imap_security" },
    ["ssl", "starttls", "none"].map((s) =>
      h("option", { value: s, selected: s === a.imap_security }, s),
    ),
  );
  const result = h("div", { id: "form-result" });
  // A preset fills the server's fields (they stay editable) and says what it needs.
  const needs = h("div", { class: "muted", id: "provider-needs" });
  const provider = h(
    "select",
    { name: "provider", id: "field-provider" },
    h("option", { value: "" }, "Other IMAP server"),
    presets.map((p) => h("option", { value: p.name, selected: p.name === a.provider }, p.label)),
  );
  const form = h(
    "form",
    { class: "account card", id: "account-form" },
    row("Email", "email", input("email", { required: true })),
    presets.length ? row("Provider", "provider", h("div", {}, provider, needs)) : null,
    row("IMAP host", "imap_host", input("imap_host", { required: true })),
    row("Port", "imap_port", input("imap_port", { type: "number", min: 1, max: 65535 })),
    row("Security", "imap_security", security),
    row("Username", "username", input("username", { required: true })),
    row(
      "Password",
      "password",
      input("password", {
        type: "password",
        value: "",
        autocomplete: "new-password",
        placeholder: id ? "unchanged" : "",
      }),
    ),
    row("Folders", "folders", input("folders", { value: (a.folders || []).join(", ") })),
    row(
      "Poll every (s)",
      "poll_interval_seconds",
      input("poll_interval_seconds", { type: "number", min: 1 }),
    ),
    fields.includes("priority")
      ? row("Priority (0-9)", "priority", input("priority", { type: "number", min: 0, max: 9, value: a.priority ?? 5 }))
      : null,
    row(
      "Enabled",
      "enabled",
      h("input", { type: "checkbox", name: "enabled", id: "field-enabled", checked: a.enabled }),
    ),
    fields.includes("push")
      ? row(
          "Push (IDLE)",
          "push",
          h("input", { type: "checkbox", name: "push", id: "field-push", checked: !!a.push }),
        )
      : null,
    h(
      "div",
      { class: "buttons" },
      h("button", { type: "button", id: "test-settings" }, "Test settings"),
      h("button", { type: "submit", class: "primary" }, id ? "Save" : "Add mailbox"),
      h("a", { class: "button", href: id ? `#/accounts/${id}` : "#/" }, "Cancel"),
    ),
  );
  const preset = () => presets.find((p) => p.name === provider.value);
  needs.textContent = preset() ? `Needs: ${preset().needs}` : "";
  provider.addEventListener("change", () => {
    const chosen = preset();
    needs.textContent = chosen ? `Needs: ${chosen.needs}` : "";
    if (!chosen) return;
    form.elements.imap_host.value = chosen.imap_host;
    form.elements.imap_port.value = chosen.imap_port;
    form.elements.imap_security.value = chosen.imap_security;
  });
  const values = () => {
    const data = Object.fromEntries(new FormData(form));
    const body = {
      email: data.email,
      imap_host: data.imap_host,
      imap_port: Number(data.imap_port),
      imap_security: data.imap_security,
      username: data.username,
      folders: data.folders.split(",").map((f) => f.trim()).filter(Boolean),
      poll_interval_seconds: Number(data.poll_interval_seconds),
      enabled: form.elements.enabled.checked,
    };
    if (data.priority !== undefined) body.priority = Number(data.priority);
    if (form.elements.push) body.push = form.elements.push.checked;
    if (data.password) body.password = data.password;
    if (data.provider) body.provider = data.provider;
    return body;
  };
  form.querySelector("#test-settings").addEventListener("click", () =>
    guarded(async () => {
      const body = values();
      result.replaceChildren(message("", "Trying the server..."));
      const check = body.password
        ? await api("POST", "/accounts/test", {
            ...(body.provider ? { provider: body.provider } : {}),
            imap_host: body.imap_host,
            imap_port: body.imap_port,
            imap_security: body.imap_security,
            username: body.username,
            password: body.password,
            folders: body.folders,
          })
        : id
          ? await api("POST", `/accounts/${id}/test`)
          : null;
      if (check === null) {
        result.replaceChildren(message("bad", "Type the password to test the settings."));
        return;
      }
      const folders = check.folders.map((f) => `${f.name}: ${f.detail}`).join("\n");
      result.replaceChildren(
        check.ok
          ? message("good", `Login and folders ok.\n${folders}`)
          : message("bad", `Failed at ${check.stage}: ${check.detail}${folders ? `\n${folders}` : ""}`),
      );
    }).catch(() => {}),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    (async () => {
      try {
        const saved = id
          ? await api("PATCH", `/accounts/${id}`, values())
          : await api("POST", "/accounts", values());
        toast(`${saved.email} saved`);
        location.hash = `#/accounts/${saved.id}`;
      } catch (error) {
        if (error.status !== 401) result.replaceChildren(message("bad", error.message));
      }
    })();
  });
  main.replaceChildren(h("h1", {}, id ? `Edit ${a.email}` : "Add a mailbox"), form, result);
}

// -- dead letters -------------------------------------------------------------------------

function deadLettersView() {
  const table = h("table", { id: "dead-letters" });
  const total = h("p", { class: "muted" });
  const all = h("button", { type: "button", "data-action": "replay all", hidden: true }, "Replay all");
  all.addEventListener("click", () =>
    guarded(async () => {
      all.disabled = true;
      try {
        const done = await api("POST", "/admin/dead-letters/replay");
        toast(`Replayed ${done.replayed} deliver${done.replayed === 1 ? "y" : "ies"}`);
      } finally {
        all.disabled = false;
      }
      await view.refresh();
    }),
  );
  main.replaceChildren(
    h("h1", {}, "Dead letters"),
    h(
      "p",
      { class: "muted" },
      "Webhook deliveries that ran out of attempts or were refused. Replay sends one again " +
        "with a full set of attempts and the same event id.",
    ),
    total,
    table,
    h("p", {}, all),
  );
  show("dead-letters", "Dead letters", async () => {
    const page = await api("GET", "/admin/dead-letters?limit=200");
    total.textContent = `${page.total} dead letter${page.total === 1 ? "" : "s"}`;
    all.hidden = !page.total;
    const head = ["Id", "Event", "Mailbox", "Target", "Attempts", "Last answer", "Last attempt", ""];
    table.replaceChildren(
      h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))),
      h(
        "tbody",
        {},
        page.items.length
          ? page.items.map((d) => {
              const replay = h("button", { type: "button", "data-action": "replay" }, "Replay");
              replay.addEventListener("click", () =>
                guarded(async () => {
                  replay.disabled = true;
                  const done = await api("POST", `/admin/dead-letters/${d.id}/replay`);
                  toast(`Replayed ${done.replayed} delivery (event ${d.event_id})`);
                  await view.refresh();
                }),
              );
              return h(
                "tr",
                { "data-delivery": d.id },
                h("td", { class: "num" }, d.id),
                h("td", {}, d.event_type, h("div", { class: "muted" }, d.event_id)),
                h("td", {}, h("a", { href: `#/accounts/${d.account_id}` }, d.account_id)),
                h("td", {}, d.target, h("div", { class: "muted" }, d.url || "")),
                h("td", { class: "num" }, d.attempts),
                h(
                  "td",
                  { class: "error" },
                  [d.last_status_code, d.last_error].filter((x) => x !== null).join(": "),
                ),
                h("td", {}, when(d.last_attempt_at)),
                h("td", {}, replay),
              );
            })
          : h("tr", {}, h("td", { colspan: head.length, class: "muted" }, "No dead letters.")),
      ),
    );
  });
}

// -- quarantined messages ----------------------------------------------------------------

// Messages whose processing failed too often on their own, set aside with the reason; a
// replay (one, or all of the list) hands them on again once the cause is fixed.
function drawQuarantine(container, page, replayAllPath) {
  const replayed = (done) => toast(`Replayed ${done.replayed} message${done.replayed === 1 ? "" : "s"}`);
  const head = ["Id", "Mailbox", "Subject", "Folder / UID", "Failures", "Since", "Reason", ""];
  const rows = page.items.map((m) => {
    const replay = h("button", { type: "button", "data-action": "replay" }, "Replay");
    replay.addEventListener("click", () =>
      guarded(async () => {
        replay.disabled = true;
        replayed(await api("POST", `/messages/${m.id}/replay`));
        await view.refresh();
      }),
    );
    return h(
      "tr",
      { "data-message": m.id },
      h("td", { class: "num" }, m.id),
      h("td", {}, h("a", { href: `#/accounts/${m.account_id}` }, m.account_id)),
      h("td", {}, m.subject ?? "(no subject)"),
      h("td", {}, `${m.folder} / ${m.uid}`),
      h("td", { class: "num" }, m.process_failures),
      h("td", {}, when(m.quarantined_at)),
      h("td", { class: "error" }, m.process_error || ""),
      h("td", {}, replay),
    );
  });
  const table = h(
    "table",
    { class: "quarantined" },
    h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      rows.length
        ? rows
        : h("tr", {}, h("td", { colspan: head.length, class: "muted" }, "None: every message was processed or is on its way.")),
    ),
  );
  const parts = [h("p", { class: "muted" }, `${page.total} quarantined`), table];
  if (page.total) {
    const all = h("button", { type: "button", "data-action": "replay all" }, "Replay all");
    all.addEventListener("click", () =>
      guarded(async () => {
        all.disabled = true;
        replayed(await api("POST", replayAllPath));
        await view.refresh();
      }),
    );
    parts.push(h("p", {}, all));
  }
  container.replaceChildren(...parts);
}

function quarantineView() {
  const container = h("div", { id: "quarantine" });
  main.replaceChildren(
    h("h1", {}, "Quarantined messages"),
    h(
      "p",
      { class: "muted" },
      "Messages whose processing failed too often on their own: set aside with the reason " +
        "while the others flow. Fix the cause, then replay: each is handed on again, and a " +
        "receiver that had it is not sent it twice.",
    ),
    container,
  );
  show("quarantine", "Quarantined messages", async () => {
    drawQuarantine(container, await api("GET", "/admin/quarantine?limit=200"), "/admin/quarantine/replay");
  });
}

// -- schedule and workers -----------------------------------------------------------------

function systemView() {
  const stats = h("div", { class: "stats", id: "system-stats" });
  const chart = h("div", { class: "card", id: "activity" });
  const health = h("div", { class: "card", id: "health" });
  const workers = h("div", { id: "workers" });
  main.replaceChildren(
    h("h1", {}, "Schedule and workers"),
    stats,
    h("h2", {}, "Polls and messages, last hour"),
    chart,
    h("div", { class: "grid" }, h("div", {}, h("h2", {}, "Health"), health), h("div", {}, h("h2", {}, "Workers"), workers)),
  );
  show("system", "Schedule and workers", async () => {
    const [activity, capacity, status] = await Promise.all([
      api("GET", "/admin/activity?minutes=60"),
      api("GET", "/admin/capacity").catch((e) => ({ error: e.message })),
      fetch("/health").then((r) => r.json()),
    ]);
    const number = (value, digits) => (value === null || value === undefined ? "n/a" : Number(value).toFixed(digits));
    stats.replaceChildren(
      stat("mode", capacity.mode || "unknown"),
      stat("scheduled mailboxes", capacity.mailboxes ?? "?"),
      stat("queue length", capacity.queue_length ?? "n/a"),
      stat("oldest waiting poll", capacity.oldest_pending_seconds ? duration(capacity.oldest_pending_seconds) : "none"),
      stat("polls/s asked", number(capacity.demanded_polls_per_second, 2)),
      stat("polls/s done (last minute)", number(capacity.completed_polls_per_second, 2)),
      stat("interval stretch", capacity.interval_stretch ? `x${number(capacity.interval_stretch, 1)}` : "n/a"),
      stat("stale mailboxes", capacity.stale_mailboxes ?? "n/a"),
    );
    if (capacity.stale_mailboxes) {
      stats.append(message("bad", `${capacity.stale_mailboxes} mailbox(es) stale: no complete poll within their freshness limit.`));
    }
    if (capacity.behind) stats.append(message("bad", "Polls are falling behind: add workers or lengthen intervals."));
    if (capacity.error) stats.append(message("bad", capacity.error));
    chart.replaceChildren(activityChart(activity), legend());
    health.replaceChildren(
      h("p", {}, badge(status.status)),
      h(
        "dl",
        { class: "facts" },
        Object.entries(status.checks).map(([name, value]) => fact(name, value)),
      ),
    );
    if (capacity.mode === "local") {
      workers.replaceChildren(
        h("p", { class: "muted" }, "Local mode: polls run inside the API process; there are no Celery workers."),
      );
      return;
    }
    try {
      const list = await api("GET", "/admin/celery/workers");
      workers.replaceChildren(
        h(
          "table",
          {},
          h("thead", {}, h("tr", {}, ["Worker", "Queues", "Running", "Processes", "Processed"].map((t) => h("th", {}, t)))),
          h(
            "tbody",
            {},
            list.workers.length
              ? list.workers.map((w) =>
                  h(
                    "tr",
                    {},
                    h("td", {}, w.name),
                    h("td", {}, w.queues.join(", ")),
                    h("td", { class: "num" }, w.active),
                    h("td", { class: "num" }, w.concurrency ?? ""),
                    h("td", { class: "num" }, w.processed),
                  ),
                )
              : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No worker answered.")),
          ),
        ),
      );
    } catch (error) {
      workers.replaceChildren(message("bad", error.message));
    }
  });
}

function legend() {
  return h(
    "div",
    { class: "legend" },
    h("span", { class: "polls" }, "polls"),
    h("span", { class: "failed" }, "failed polls"),
    h("span", { class: "messages" }, "messages stored"),
  );
}

function activityChart(activity) {
  // Bars: polls (failed ones on top); line: messages, on its own scale.
  const NS = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs, ...children) => {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    el.append(...children);
    return el;
  };
  const width = 1200;
  const height = 180;
  const pad = { left: 36, right: 36, top: 10, bottom: 20 };
  const buckets = activity.buckets;
  const step = (width - pad.left - pad.right) / buckets.length;
  const maxPolls = Math.max(1, ...buckets.map((b) => b.polls));
  const maxMessages = Math.max(1, ...buckets.map((b) => b.messages));
  const plot = height - pad.top - pad.bottom;
  const y = (value, max) => pad.top + plot - (value / max) * plot;
  const parts = [];
  buckets.forEach((b, i) => {
    const x = pad.left + i * step + 1;
    const ok = b.polls - b.failed;
    parts.push(
      svg("rect", { class: "polls", x, width: step - 2, y: y(ok, maxPolls), height: (ok / maxPolls) * plot }),
      svg("rect", {
        class: "failed",
        x,
        width: step - 2,
        y: y(b.polls, maxPolls),
        height: (b.failed / maxPolls) * plot,
      }),
    );
  });
  const points = buckets
    .map((b, i) => `${pad.left + (i + 0.5) * step},${y(b.messages, maxMessages)}`)
    .join(" ");
  parts.push(svg("polyline", { class: "messages", points }));
  const label = (x, yy, text, anchor) =>
    svg("text", { x, y: yy, "text-anchor": anchor }, text);
  const first = new Date(buckets[0].start);
  parts.push(
    label(pad.left - 4, pad.top + 8, String(maxPolls), "end"),
    label(pad.left - 4, height - pad.bottom, "0", "end"),
    label(width - pad.right + 4, pad.top + 8, String(maxMessages), "start"),
    label(pad.left, height - 4, first.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }), "start"),
    label(width - pad.right, height - 4, "now", "end"),
  );
  return svg(
    "svg",
    {
      class: "chart",
      id: "activity-chart",
      viewBox: `0 0 ${width} ${height}`,
      width,
      height,
      role: "img",
      "aria-label": `polls and messages per ${activity.bucket_seconds} s`,
      "data-polls": buckets.reduce((s, b) => s + b.polls, 0),
      "data-messages": buckets.reduce((s, b) => s + b.messages, 0),
    },
    ...parts,
  );
}

// -- start --------------------------------------------------------------------------------

document.getElementById("sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);
route();
