// jobcast UI: plain JavaScript, no build step. Every action calls the same JSON API a script would;
// the session cookie authenticates fetch, EventSource and WebSocket alike.
"use strict";

const API = "/api/v1";

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(API + path, init);
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) throw new Error((data && data.detail) || `${res.status} ${res.statusText}`);
  return data;
}

function show(el, message) {
  el.textContent = message;
  el.hidden = !message;
}

// ---- status badge and progress bar (same markup as the _status.html macros) ----

// "about 3 min": the same rounding as the about() macro of _status.html.
function about(seconds) {
  if (seconds < 60) return `${Math.max(5, Math.round(seconds / 5) * 5)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// A running job's time left from its events' eta_s; a pending one keeps the wait its page showed.
function paintEta(scope, status, etaS) {
  const eta = scope.querySelector("[data-role=eta]");
  if (!eta || !status || (status === "pending" && etaS == null)) return;
  eta.textContent = status === "running" && etaS != null ? `about ${about(etaS)} left` : "";
}

function paint(scope, status, progress, etaS) {
  paintEta(scope, status, etaS);
  const badge = scope.querySelector("[data-role=status]");
  if (badge && status) {
    badge.textContent = status;
    badge.className = `status status-${status}`;
  }
  const bar = scope.querySelector("[role=progressbar]");
  if (bar && status) bar.className = `bar bar-${status}`;
  if (progress === undefined || progress === null) return;
  if (bar) {
    bar.setAttribute("aria-valuenow", progress.toFixed(1));
    bar.querySelector(".fill").style.width = `${progress}%`;
  }
  const pct = scope.querySelector("[data-role=pct]");
  if (pct) pct.textContent = `${Math.round(progress)} %`;
}

// ---- submit page ----

function initSubmit() {
  const form = document.getElementById("submit-form");
  const operation = document.getElementById("operation");
  const files = document.getElementById("files");
  const error = document.getElementById("form-error");
  const button = document.getElementById("submit-button");

  const stageList = document.getElementById("stages");
  // The options of an added stage are copies of the first stage's, taken before anyone types in them.
  const pristine = [...form.querySelectorAll(":scope > fieldset.options")].map((f) => f.cloneNode(true));
  const fileOps = [...operation.options].filter((o) => o.dataset.needsFile === "true").map((o) => o.value);

  const needsFile = () => operation.selectedOptions[0].dataset.needsFile === "true";
  function choose() {
    for (const el of form.querySelectorAll(":scope > [data-op]")) {
      const active = el.dataset.op === operation.value;
      el.hidden = !active;
      if (el.tagName === "FIELDSET") el.disabled = !active;
    }
    document.getElementById("files-row").hidden = !needsFile();
    document.getElementById("count-row").hidden = needsFile();
    document.getElementById("stages-row").hidden = !needsFile();
  }
  operation.addEventListener("change", choose);
  choose();

  function params(fieldset = form.querySelector(`:scope > fieldset[data-op="${operation.value}"]`)) {
    const out = {};
    for (const input of fieldset.querySelectorAll("[data-kind]")) {
      const kind = input.dataset.kind;
      if (kind === "bool") out[input.name] = input.checked;
      else if (input.value === "") continue;
      else if (kind === "int" || kind === "float") out[input.name] = Number(input.value);
      else if (kind === "list") out[input.name] = input.value.split(/[\s,]+/).filter(Boolean);
      else out[input.name] = input.value;
    }
    return out;
  }

  function addStage() {
    const item = document.createElement("li");
    item.className = "stage";
    const select = document.createElement("select");
    select.dataset.role = "stage-op";
    for (const name of fileOps) select.add(new Option(name, name));
    const label = document.createElement("label");
    label.append("Then ", select);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.dataset.role = "remove-stage";
    remove.textContent = "Remove stage";
    remove.addEventListener("click", () => item.remove());
    const row = document.createElement("div");
    row.className = "row";
    row.append(label, remove);
    item.append(row, ...pristine.map((f) => f.cloneNode(true)));
    const chooseOp = () => {
      for (const fieldset of item.querySelectorAll("fieldset[data-op]")) {
        fieldset.hidden = fieldset.disabled = fieldset.dataset.op !== select.value;
      }
    };
    select.addEventListener("change", chooseOp);
    chooseOp();
    stageList.append(item);
  }
  document.getElementById("add-stage").addEventListener("click", addStage);

  // The stages added after the first, as POST /api/v1/pipelines takes them.
  function laterStages() {
    if (!needsFile()) return [];
    return [...stageList.children].map((item) => {
      const type = item.querySelector("[data-role=stage-op]").value;
      return { type, params: params(item.querySelector(`fieldset[data-op="${type}"]`)) };
    });
  }

  function upload(file, index, total) {
    const bar = document.getElementById("upload-progress");
    const status = document.getElementById("upload-status");
    document.getElementById("upload").hidden = false;
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `${API}/files`);
      xhr.upload.onprogress = (e) => {
        if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total;
        status.textContent = `Uploading ${file.name} (${index + 1} of ${total})`;
      };
      xhr.onload = () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText || "{}"); } catch { /* not JSON */ }
        if (xhr.status >= 200 && xhr.status < 300) resolve(body);
        else reject(new Error(`${file.name}: ${body.detail || xhr.statusText}`));
      };
      xhr.onerror = () => reject(new Error(`${file.name}: the upload failed (network error)`));
      const data = new FormData();
      data.append("file", file);
      xhr.send(data);
    });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    show(error, "");
    const chosen = needsFile() ? [...files.files] : [];
    if (needsFile() && chosen.length === 0) {
      show(error, `Choose a file: ${operation.value} works on one (several make a batch).`);
      return;
    }
    const later = laterStages();
    if (later.length && chosen.length !== 1) {
      show(error, "A pipeline runs on one file: choose one, or remove the stages added.");
      return;
    }
    button.disabled = true;
    try {
      const common = { type: operation.value, params: params(),
                       title: document.getElementById("title").value,
                       priority: Number(document.getElementById("priority").value || 0) };
      const ids = [];
      for (const [i, file] of chosen.entries()) ids.push((await upload(file, i, chosen.length)).id);
      const count = Number(document.getElementById("count").value || 1);
      let job;
      if (later.length) {
        const stages = [{ type: common.type, params: common.params }, ...later];
        job = await api("POST", "/pipelines", { file_id: ids[0], stages, title: common.title, priority: common.priority });
      } else if (ids.length > 1) job = await api("POST", "/jobs/batch", { ...common, file_ids: ids });
      else if (ids.length === 1) job = await api("POST", "/jobs", { ...common, file_id: ids[0] });
      else if (count > 1) job = await api("POST", "/jobs/batch", { ...common, items: Array.from({ length: count }, () => ({})) });
      else job = await api("POST", "/jobs", common);
      window.location.assign(`${document.body.dataset.prefix || "/ui"}/jobs/${job.id}`);
    } catch (err) {
      show(error, err.message);
      button.disabled = false;
    }
  });
}

// ---- job page ----

function describe(env) {
  const e = env.event || {};
  switch (env.kind) {
    case "submitted": return `${e.type} queued${e.priority ? `, priority ${e.priority}` : ""}`;
    case "started": return `on ${e.worker}${e.delivery > 1 ? `, delivery ${e.delivery}` : ""}`;
    case "progress": return `${Math.round(env.progress)} %${env.current_step ? ` · ${env.current_step}` : ""}`;
    case "completed": return e.derived ? "every child ended" : "done";
    case "failed": return e.error || (e.derived ? "children did not complete" : "");
    case "retrying": return `${e.error || ""} (retry in ${Number(e.delay_s || 0).toFixed(1)} s)`;
    case "cancel_requested":
    case "cancelled": return e.reason || "";
    case "callback": return e.delivered ? `delivered (HTTP ${e.http_status})` : `not delivered: ${e.error}`;
    default: return "";
  }
}

function initJob() {
  const root = document.getElementById("job");
  const id = root.dataset.jobId;
  const prefix = document.body.dataset.prefix || "/ui";
  const renderedUpTo = Number(root.dataset.lastEventId);
  const terminal = new Set(JSON.parse(root.dataset.terminal));
  const timeline = document.getElementById("timeline");
  const step = document.getElementById("step");
  const live = root.querySelector(".live");
  const actionError = document.getElementById("action-error");

  function addToTimeline(env) {
    const li = document.createElement("li");
    li.dataset.kind = env.kind;
    const time = document.createElement("time");
    time.dateTime = env.ts;
    time.textContent = new Date(env.ts).toLocaleTimeString([], { hour12: false }) +
      `.${String(new Date(env.ts).getMilliseconds()).padStart(3, "0")}`;
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = env.kind.replace("_", " ");
    const text = document.createElement("span");
    text.textContent = describe(env);
    li.append(time, kind, text);
    timeline.append(li);
  }

  async function refreshSummary() {
    const res = await fetch(`${prefix}/jobs/${id}?part=summary`);
    if (res.ok) document.getElementById("summary").innerHTML = await res.text();
  }

  // The whole history replays first (after=0), then live events; the server ends the stream
  // after the job's last event, and EventSource would reconnect, so close it ourselves then.
  const source = new EventSource(`${API}/jobs/${id}/events`);
  function onEvent(message) {
    const env = JSON.parse(message.data);
    addToTimeline(env);
    root.dataset.status = env.status;
    paint(live, env.status, env.progress, env.eta_s);
    step.textContent = env.current_step;
    document.getElementById("attempt").textContent = env.attempt;
    const ended = terminal.has(env.status) && ["completed", "failed", "cancelled", "deleted"].includes(env.kind);
    if (ended && env.seq >= renderedUpTo) {
      source.close();
      refreshSummary();
    }
  }
  for (const kind of JSON.parse(root.dataset.kinds)) source.addEventListener(kind, onEvent);

  const actions = {
    cancel: () => api("POST", `/jobs/${id}/cancel`),
    retry: async () => { await api("POST", `/jobs/${id}/retry`); window.location.reload(); },
    delete: async () => {
      if (!window.confirm("Delete this job and its events? Its output files are kept.")) return;
      await api("DELETE", `/jobs/${id}`);
      window.location.assign(`${prefix}/jobs`);
    },
  };
  for (const button of root.querySelectorAll("[data-action]")) {
    button.addEventListener("click", async () => {
      show(actionError, "");
      button.disabled = true;
      try { await actions[button.dataset.action](); }
      catch (err) { show(actionError, err.message); }
      finally { button.disabled = false; }
    });
  }

  followRows(root, "childId");
}

// ---- rows of jobs (a batch's children, the recent jobs list) ----

// One WebSocket for every row on the page, subscribed in messages of 100 ids (the socket
// refuses messages over 16 KB); each event repaints its row's badge and bar.
function followRows(scope, key) {
  const attribute = key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
  const rows = new Map([...scope.querySelectorAll(`[data-${attribute}]`)].map((tr) => [tr.dataset[key], tr]));
  if (!rows.size) return;
  const scheme = window.location.protocol === "https:" ? "wss" : "ws";
  connectRows(rows, `${scheme}://${window.location.host}${API}/ws`, null);
}

// A socket the server closes with 4008 (the page fell too far behind) comes back, resuming
// after the last_event_id its close reason names.
function connectRows(rows, url, lastEventId) {
  const socket = new WebSocket(url);
  socket.addEventListener("open", () => {
    const ids = [...rows.keys()];
    for (let i = 0; i < ids.length; i += 100) {
      const subscribe = { action: "subscribe", job_ids: ids.slice(i, i + 100) };
      if (lastEventId !== null) subscribe.last_event_id = lastEventId;
      socket.send(JSON.stringify(subscribe));
    }
  });
  socket.addEventListener("close", (event) => {
    const resume = event.code === 4008 && /last_event_id=(\d+)/.exec(event.reason);
    if (resume) setTimeout(() => connectRows(rows, url, Number(resume[1])), 1000);
  });
  socket.addEventListener("message", (message) => {
    const env = JSON.parse(message.data);
    const row = env.job_id && env.kind && rows.get(env.job_id);
    if (row) paint(row, env.status, env.progress, env.eta_s);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "submit") initSubmit();
  if (page === "job") initJob();
  if (page === "jobs") followRows(document, "jobId");
});
