// CallFS web interface (docs/ui.md). Plain ES2020, no build step, no dependencies.
// The API key lives in sessionStorage and is sent only in the Authorization header: never in a
// URL (downloads go through fetch + a blob URL), never logged.
"use strict";

const KEY_SLOT = "callfs.key";
const TUS_SLOT = "callfs.tus."; // + file fingerprint -> upload URL, to resume after a reload
const PAGE = 1000; // listing page size (the server allows up to 10000)
const WINDOW = 200; // rows added to the table each time the end of the list scrolls into view
const TUS_CHUNK = 8 << 20; // bytes per tus PATCH
const UPLOAD_PARALLEL = 2;

const $ = (id) => document.getElementById(id);

// ---- small helpers ---------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}

function humanSize(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = n;
  let i = -1;
  do { v /= 1024; i += 1; } while (v >= 1024 && i < units.length - 1);
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

function humanTime(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

// "/a b/c" -> "a%20b/c": each segment percent-encoded once (docs/api.md "Paths")
function encodePath(path) {
  return path.split("/").filter((s) => s !== "").map(encodeURIComponent).join("/");
}

function joinPath(dir, name) {
  return (dir.endsWith("/") ? dir : dir + "/") + name;
}

function parentOf(path) {
  const i = path.replace(/\/+$/, "").lastIndexOf("/");
  return i <= 0 ? "/" : path.slice(0, i);
}

function baseName(path) {
  return path.replace(/\/+$/, "").split("/").pop() || "/";
}

let statusTimer = 0;
function say(message, isError) {
  const s = $("status");
  s.textContent = message;
  s.classList.toggle("error", Boolean(isError));
  clearTimeout(statusTimer);
  if (!isError) statusTimer = setTimeout(() => { s.textContent = ""; }, 6000);
}

// ---- the API ----------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

function key() {
  return sessionStorage.getItem(KEY_SLOT);
}

function authHeaders(extra) {
  return { Authorization: `Bearer ${key()}`, ...(extra || {}) };
}

async function failure(resp) {
  let code = "";
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    code = body.code || "";
    message = body.message || body.error || message;
  } catch (_) { /* not JSON */ }
  if (resp.status === 401) {
    signOut("Your key was refused; sign in again.");
  }
  return new ApiError(resp.status, code, message);
}

async function api(method, path, { body, json, headers, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal, cache: "no-store" };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await failure(resp);
  return resp;
}

// ---- session -----------------------------------------------------------------------------------
async function signIn(candidate) {
  const resp = await fetch("/v1/status", {
    headers: { Authorization: `Bearer ${candidate}` },
    cache: "no-store",
  });
  if (resp.status === 401) throw new ApiError(401, "AUTHENTICATION_FAILED", "That key was refused.");
  if (!resp.ok) throw await failure(resp);
  sessionStorage.setItem(KEY_SLOT, candidate);
}

function signOut(message) {
  sessionStorage.removeItem(KEY_SLOT);
  for (let i = sessionStorage.length - 1; i >= 0; i -= 1) {
    const k = sessionStorage.key(i);
    if (k && k.startsWith(TUS_SLOT)) sessionStorage.removeItem(k);
  }
  listing.abort();
  uploads.cancelAll();
  $("rows").replaceChildren();
  $("upload-list").replaceChildren();
  $("uploads").hidden = true;
  for (const d of document.querySelectorAll("dialog[open]")) d.close();
  location.hash = "";
  route();
  if (message) say(message, true);
}

// ---- directory listing ---------------------------------------------------------------------
const listing = {
  dir: "/",
  items: [], // every entry loaded so far
  view: [], // items in display order
  shown: 0, // rows in the table
  sortKey: "name",
  ascending: true,
  done: false,
  controller: null,

  abort() {
    if (this.controller) this.controller.abort();
    this.controller = null;
  },

  async open(dir) {
    this.abort();
    this.dir = dir;
    this.items = [];
    this.view = [];
    this.shown = 0;
    this.done = false;
    $("rows").replaceChildren();
    $("empty").hidden = true;
    renderCrumbs(dir);
    const controller = new AbortController();
    this.controller = controller;
    let after = null;
    try {
      // pages arrive one after another; each is shown at once (sorted into what is loaded)
      for (;;) {
        const q = new URLSearchParams({ limit: String(PAGE) });
        if (after) q.set("after", after);
        const url = `/v1/directories/${encodePath(dir)}?${q}`;
        const resp = await api("GET", url, { signal: controller.signal });
        const page = await resp.json();
        if (controller.signal.aborted) return;
        this.items.push(...page.items);
        this.resort();
        if (!page.next) break;
        after = page.next;
      }
      this.done = true;
      this.updateCount();
    } catch (err) {
      if (err.name === "AbortError") return;
      say(`Cannot list ${dir}: ${err.message}`, true);
    }
  },

  compare() {
    const k = this.sortKey;
    const sign = this.ascending ? 1 : -1;
    return (a, b) => {
      if (a.type !== b.type) return a.type === "directory" ? -1 : 1; // folders first, always
      let d = 0;
      if (k === "size") d = a.size - b.size;
      else if (k === "mtime") d = a.mtime < b.mtime ? -1 : a.mtime > b.mtime ? 1 : 0;
      if (d === 0) d = a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
      return d * sign;
    };
  },

  resort() {
    this.view = this.items.slice().sort(this.compare());
    const keep = Math.max(this.shown, WINDOW);
    this.shown = 0;
    $("rows").replaceChildren();
    this.more(keep);
    $("empty").hidden = this.items.length > 0;
    this.updateCount();
  },

  // append up to n more rows (the table never holds more than the user scrolled to)
  more(n) {
    const end = Math.min(this.view.length, this.shown + n);
    if (end <= this.shown) return;
    const frag = document.createDocumentFragment();
    for (let i = this.shown; i < end; i += 1) frag.append(renderRow(this.view[i]));
    $("rows").append(frag);
    this.shown = end;
  },

  updateCount() {
    const n = this.items.length;
    const label = `${n} item${n === 1 ? "" : "s"}${this.done ? "" : " (loading…)"}`;
    $("count").textContent = label;
  },

  setSort(key) {
    if (this.sortKey === key) this.ascending = !this.ascending;
    else { this.sortKey = key; this.ascending = true; }
    for (const th of document.querySelectorAll("th[data-key]")) {
      const on = th.dataset.key === key;
      th.setAttribute("aria-sort", on ? (this.ascending ? "ascending" : "descending") : "none");
    }
    this.shown = 0;
    this.resort();
  },
};

function dirHref(path) {
  return `#/files/${encodePath(path)}`;
}

function renderCrumbs(dir) {
  const ol = $("crumbs");
  ol.replaceChildren();
  const parts = dir.split("/").filter((s) => s !== "");
  const trail = [["Home", "/"]];
  let acc = "";
  for (const p of parts) { acc += `/${p}`; trail.push([p, acc]); }
  trail.forEach(([label, path], i) => {
    const last = i === trail.length - 1;
    const a = el("a", { href: dirHref(path), text: label });
    if (last) a.setAttribute("aria-current", "page");
    ol.append(el("li", {}, a));
  });
}

function renderRow(item) {
  const isDir = item.type === "directory";
  const name = el("button", {
    type: "button",
    class: `name ${isDir ? "dir" : "file"}`,
    text: item.name + (isDir ? "/" : ""),
    "aria-label": isDir ? `Open folder ${item.name}` : `Details of ${item.name}`,
    onclick: () => {
      if (isDir) location.hash = dirHref(item.path);
      else showDetails(item);
    },
  });
  const cells = [el("td", {}, name)];
  if (isDir) {
    const more = el("button", {
      type: "button",
      class: "more",
      text: "⋯",
      "aria-label": `Actions for folder ${item.name}`,
      onclick: () => showDetails(item),
    });
    cells[0].append(more);
  }
  cells.push(el("td", { class: "num wide", text: isDir ? "" : humanSize(item.size) }));
  cells.push(el("td", { class: "wide", text: humanTime(item.mtime) }));
  return el("tr", {}, ...cells);
}

// ---- details and actions ---------------------------------------------------------------------
let current = null; // the item the details dialog is about

function fact(dl, term, value) {
  dl.append(el("dt", { text: term }), el("dd", { text: value }));
}

async function showDetails(item) {
  current = item;
  const dialog = $("details");
  $("details-title").textContent = item.name;
  const dl = $("details-facts");
  dl.replaceChildren();
  const isFile = item.type === "file";
  $("act-download").hidden = !isFile;
  $("act-share").hidden = !isFile;
  fact(dl, "Path", item.path);
  fact(dl, "Type", item.type);
  if (isFile) fact(dl, "Size", `${humanSize(item.size)} (${item.size} bytes)`);
  fact(dl, "Owner", item.owner);
  fact(dl, "Modified", humanTime(item.mtime));
  dialog.showModal();
  if (!isFile) return;
  const storage = el("dd", { text: "…" });
  dl.append(el("dt", { text: "Stored" }), storage);
  try {
    storage.textContent = await describeStorage(item);
  } catch (err) {
    storage.textContent = `unknown (${err.message})`;
  }
}

// Where the bytes live: HEAD names the node for local-disk files; otherwise the file is on S3 or
// erasure-coded, and only an erasure-coded file answers ?manifest=true with JSON (any other file
// would answer with its bytes, so that request is cut off as soon as its headers arrive).
async function describeStorage(item) {
  const url = `/v1/files/${encodePath(item.path)}`;
  const head = await api("HEAD", url);
  const node = head.headers.get("X-CallFS-Instance-ID");
  if (node) return `local disk of node ${node}`;
  const controller = new AbortController();
  const resp = await api("GET", `${url}?manifest=true`, { signal: controller.signal });
  if (!(resp.headers.get("Content-Type") || "").startsWith("application/json")) {
    controller.abort();
    return "S3 (shared object store)";
  }
  const m = await resp.json();
  const p = m.erasure_profile;
  const nodes = [...new Set(m.shards.map((s) => new URL(s.endpoint).host))];
  return `erasure-coded: ${p.data_shards} data + ${p.parity_shards} parity shards of ` +
    `${humanSize(p.shard_size)} on ${nodes.join(", ")}`;
}

async function download(item) {
  say(`Downloading ${item.name}…`);
  const resp = await api("GET", `/v1/files/${encodePath(item.path)}`);
  const blob = await resp.blob();
  const href = URL.createObjectURL(blob);
  const a = el("a", { href, download: item.name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 60000);
  say(`Downloaded ${item.name}`);
}

// A modal form: resolves true when submitted with the "ok" button, false when cancelled.
function ask(dialog, focus) {
  return new Promise((resolve) => {
    dialog.returnValue = "";
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    if (focus) { focus.focus(); if (focus.select) focus.select(); }
  });
}

async function createFolder() {
  $("folder-name").value = "";
  if (!(await ask($("folder-dialog"), $("folder-name")))) return;
  const name = $("folder-name").value.trim();
  if (!name) return;
  try {
    await api("POST", `/v1/files/${encodePath(joinPath(listing.dir, name))}/`);
    say(`Created folder ${name}`);
    listing.open(listing.dir);
  } catch (err) {
    say(`Cannot create ${name}: ${err.message}`, true);
  }
}

async function renameOrMove(item) {
  $("details").close();
  const input = $("rename-path");
  input.value = item.name;
  if (!(await ask($("rename-dialog"), input))) return;
  const target = input.value.trim();
  if (!target || target === item.name) return;
  const body = target.startsWith("/")
    ? { destination: target, create_parents: true }
    : target.includes("/")
      ? { destination: joinPath(parentOf(item.path), target), create_parents: true }
      : { name: target };
  try {
    const resp = await api("PATCH", `/v1/files/${encodePath(item.path)}`, { json: body });
    const moved = await resp.json();
    say(`Moved ${item.name} to ${moved.path}`);
    listing.open(listing.dir);
  } catch (err) {
    say(`Cannot move ${item.name}: ${err.message}`, true);
  }
}

async function remove(item) {
  $("details").close();
  const isDir = item.type === "directory";
  $("delete-title").textContent = `Delete ${item.name}?`;
  $("delete-text").textContent = isDir
    ? `The folder ${item.path} and everything in it will be deleted. This cannot be undone.`
    : `The file ${item.path} will be deleted. This cannot be undone.`;
  if (!(await ask($("delete-dialog")))) return;
  try {
    await api("DELETE", `/v1/files/${encodePath(item.path)}${isDir ? "?recursive=true" : ""}`);
    say(`Deleted ${item.name}`);
    listing.open(listing.dir);
  } catch (err) {
    say(`Cannot delete ${item.name}: ${err.message}`, true);
  }
}

function share(item) {
  $("details").close();
  $("share-title").textContent = `Share ${item.name}`;
  $("share-result").hidden = true;
  $("share-url").value = "";
  $("share-dialog").showModal();
  $("share-expiry").focus();
}

async function createLink() {
  const item = current;
  try {
    const resp = await api("POST", "/v1/links/generate", {
      json: { path: item.path, expiry_seconds: Number($("share-expiry").value) },
    });
    const link = await resp.json();
    $("share-url").value = link.url;
    $("share-expires").textContent = `Single use; expires ${humanTime(link.expires)}.`;
    $("share-result").hidden = false;
    $("share-url").focus();
    $("share-url").select();
  } catch (err) {
    say(`Cannot share ${item.name}: ${err.message}`, true);
  }
}

async function copyLink() {
  const input = $("share-url");
  try {
    await navigator.clipboard.writeText(input.value);
  } catch (_) {
    input.select();
    document.execCommand("copy"); // older browsers, or the clipboard permission refused
  }
  $("share-copy").textContent = "Copied";
  setTimeout(() => { $("share-copy").textContent = "Copy link"; }, 2000);
  say("Link copied");
}

// ---- uploads ---------------------------------------------------------------------------------
const uploads = {
  queue: [],
  running: 0,
  active: new Set(), // XMLHttpRequests in flight
  tus: null, // null: not asked yet; true/false: whether OPTIONS /v1/uploads speaks tus

  add(files, dir) {
    if (!files.length) return;
    $("uploads").hidden = false;
    for (const file of files) {
      const bar = el("progress", { max: "100", value: "0", "aria-label": `Progress of ${file.name}` });
      const state = el("span", { class: "muted", text: "waiting" });
      const row = el("li", {}, el("span", { class: "up-name", text: file.name }), bar, state);
      $("upload-list").append(row);
      this.queue.push({ file, dir, bar, state, row });
    }
    this.pump();
  },

  pump() {
    while (this.running < UPLOAD_PARALLEL && this.queue.length) {
      const job = this.queue.shift();
      this.running += 1;
      this.run(job).finally(() => {
        this.running -= 1;
        this.pump();
        if (!this.running && !this.queue.length && listing.dir === job.dir) listing.open(job.dir);
      });
    }
  },

  async run(job) {
    const path = joinPath(job.dir, job.file.name);
    job.state.textContent = "uploading";
    try {
      if (this.tus === null) this.tus = await tusAvailable();
      if (this.tus) await tusUpload(job, path);
      else await putUpload(job, path);
      job.bar.value = 100;
      job.state.textContent = "done";
      job.row.classList.add("done");
    } catch (err) {
      job.state.textContent = `failed: ${err.message}`;
      job.row.classList.add("failed");
      say(`Upload of ${job.file.name} failed: ${err.message}`, true);
    }
  },

  cancelAll() {
    this.queue = [];
    for (const xhr of this.active) xhr.abort();
    this.active.clear();
    this.tus = null;
  },
};

async function tusAvailable() {
  try {
    const resp = await fetch("/v1/uploads", { method: "OPTIONS", headers: authHeaders() });
    return resp.ok && resp.headers.get("Tus-Resumable") === "1.0.0";
  } catch (_) {
    return false;
  }
}

// One request with upload progress (fetch cannot report it). Resolves with the XHR.
function send(method, url, headers, body, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, url);
    for (const [k, v] of Object.entries(authHeaders(headers))) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable && onProgress) onProgress(e.loaded); };
    xhr.onload = () => {
      uploads.active.delete(xhr);
      if (xhr.status >= 200 && xhr.status < 300) { resolve(xhr); return; }
      let message = `HTTP ${xhr.status}`;
      try { message = JSON.parse(xhr.responseText).message || message; } catch (_) { /* empty */ }
      if (xhr.status === 401) signOut("Your key was refused; sign in again.");
      reject(new ApiError(xhr.status, "", message));
    };
    xhr.onerror = () => { uploads.active.delete(xhr); reject(new Error("network error")); };
    xhr.onabort = () => { uploads.active.delete(xhr); reject(new Error("cancelled")); };
    uploads.active.add(xhr);
    xhr.send(body);
  });
}

function progress(job, loaded) {
  job.bar.value = job.file.size ? Math.min(100, (100 * loaded) / job.file.size) : 100;
}

async function putUpload(job, path) {
  await send("PUT", `/v1/files/${encodePath(path)}`, {}, job.file, (n) => progress(job, n));
}

function b64(text) {
  return btoa(String.fromCharCode(...new TextEncoder().encode(text)));
}

// tus 1.0.0 (docs/uploads.md): create, then PATCH chunks; after a failed chunk, ask the server
// for its offset (HEAD) and go on from there. The upload URL is kept for this tab, so picking
// the same file again after a reload resumes it.
async function tusUpload(job, path) {
  const file = job.file;
  const slot = `${TUS_SLOT}${path}:${file.size}:${file.lastModified}`;
  const tus = { "Tus-Resumable": "1.0.0" };
  let location = sessionStorage.getItem(slot);
  let offset = 0;
  if (location) {
    try {
      const head = await api("HEAD", location, { headers: tus });
      offset = Number(head.headers.get("Upload-Offset"));
    } catch (_) {
      location = null;
    }
  }
  if (!location) {
    const created = await send("POST", "/v1/uploads", {
      ...tus,
      "Upload-Length": String(file.size),
      "Upload-Metadata": `path ${b64(path)},filename ${b64(file.name)}`,
    }, null);
    location = created.getResponseHeader("Location");
    sessionStorage.setItem(slot, location);
  }
  let failures = 0;
  while (offset < file.size) {
    const chunk = file.slice(offset, offset + TUS_CHUNK);
    const base = offset;
    try {
      const xhr = await send("PATCH", location, {
        ...tus,
        "Upload-Offset": String(offset),
        "Content-Type": "application/offset+octet-stream",
      }, chunk, (n) => progress(job, base + n));
      offset = Number(xhr.getResponseHeader("Upload-Offset"));
      failures = 0;
    } catch (err) {
      failures += 1;
      if (err.message === "cancelled" || failures > 3 || (err.status && err.status < 500 && err.status !== 409)) {
        throw err;
      }
      job.state.textContent = `retrying (${failures})`;
      await new Promise((r) => setTimeout(r, 500 * failures));
      const head = await api("HEAD", location, { headers: tus });
      offset = Number(head.headers.get("Upload-Offset"));
      job.state.textContent = "uploading";
    }
    progress(job, offset);
  }
  sessionStorage.removeItem(slot);
}

function bindDrop() {
  const zone = $("drop");
  let depth = 0;
  zone.addEventListener("dragenter", (e) => { e.preventDefault(); depth += 1; zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => { depth -= 1; if (depth <= 0) { depth = 0; zone.classList.remove("over"); } });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); e.dataTransfer.dropEffect = "copy"; });
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    zone.classList.remove("over");
    uploads.add([...(e.dataTransfer.files || [])], listing.dir);
  });
}

// ---- cluster page ----------------------------------------------------------------------------
async function showCluster() {
  const summary = $("cluster-summary");
  const rows = $("node-rows");
  try {
    const s = await (await api("GET", "/v1/status")).json();
    summary.replaceChildren();
    fact(summary, "This node", s.node_id);
    if (s.raft) {
      fact(summary, "Metadata", `Raft; this node is ${s.raft.role}, term ${s.raft.term ?? "?"}`);
      fact(summary, "Leader", s.leader || "none (no quorum)");
    } else {
      fact(summary, "Metadata", "shared store (no Raft)");
    }
    fact(summary, "Replication backlog", `${s.replication_backlog} change(s)`);
    fact(summary, "Degraded erasure files", String(s.erasure.degraded_files));
    fact(summary, "Erasure repair backlog", String(s.erasure.repair_backlog));
    const counted = s.nodes.filter((n) => n.stored_bytes != null);
    if (counted.length) {
      const total = counted.reduce((sum, n) => sum + n.stored_bytes, 0);
      const of = counted.length === s.nodes.length ? "" : ` (${counted.length} of ${s.nodes.length} nodes)`;
      fact(summary, "Stored on node disks", `${humanSize(total)}${of}`);
    }
    rows.replaceChildren(...s.nodes.map((n) => el("tr", {},
      el("td", { text: n.id + (n.self ? " (this node)" : "") }),
      el("td", { class: n.healthy ? "ok" : "bad", text: n.healthy ? "healthy" : "unreachable" }),
      el("td", { text: n.leader ? "leader" : s.raft ? "follower" : "—" }),
      storedCell(n),
      el("td", { class: "wide", text: n.endpoint }))));
  } catch (err) {
    say(`Cannot load the cluster status: ${err.message}`, true);
  }
}

// Bytes a node keeps on its own disk, as it last counted them; "unknown" before its first count
// or when it did not answer.
function storedCell(n) {
  if (n.stored_bytes == null) return el("td", { class: "num muted", text: "unknown" });
  const files = n.stored_files == null ? "" : `${n.stored_files} object(s), `;
  return el("td", {
    class: "num",
    title: `${files}${n.stored_bytes} bytes`,
    text: humanSize(n.stored_bytes),
  });
}

// ---- routing ---------------------------------------------------------------------------------
function show(view) {
  for (const id of ["signin-view", "files-view", "cluster-view"]) $(id).hidden = id !== view;
  const signedIn = view !== "signin-view";
  $("nav").hidden = !signedIn;
  $("sign-out").hidden = !signedIn;
  $("nav-files").toggleAttribute("aria-current", view === "files-view");
  $("nav-cluster").toggleAttribute("aria-current", view === "cluster-view");
}

function route() {
  if (!key()) {
    listing.abort();
    show("signin-view");
    $("api-key").focus();
    return;
  }
  const hash = location.hash.slice(1);
  if (hash === "/cluster") {
    listing.abort();
    show("cluster-view");
    showCluster();
    return;
  }
  let dir = "/";
  if (hash.startsWith("/files/")) {
    try {
      dir = `/${hash.slice("/files/".length).split("/").filter((p) => p).map(decodeURIComponent).join("/")}`;
    } catch (_) { /* a malformed address: the root */ }
  }
  show("files-view");
  listing.open(dir);
}

function guard(fn) {
  return (...args) => Promise.resolve(fn(...args)).catch((err) => say(err.message, true));
}

function init() {
  $("signin-form").addEventListener("submit", guard(async (e) => {
    e.preventDefault();
    const input = $("api-key");
    $("signin-error").textContent = "";
    try {
      await signIn(input.value.trim());
      input.value = "";
      route();
      $("main").focus();
    } catch (err) {
      $("signin-error").textContent = err.message;
    }
  }));
  $("sign-out").addEventListener("click", () => { signOut(); say("Signed out"); });
  $("new-folder").addEventListener("click", guard(createFolder));
  $("file-input").addEventListener("change", (e) => {
    uploads.add([...e.target.files], listing.dir);
    e.target.value = "";
  });
  for (const b of document.querySelectorAll("button[data-sort]")) {
    b.addEventListener("click", () => listing.setSort(b.dataset.sort));
  }
  $("act-download").addEventListener("click", guard(() => download(current)));
  $("act-share").addEventListener("click", () => share(current));
  $("act-rename").addEventListener("click", guard(() => renameOrMove(current)));
  $("act-delete").addEventListener("click", guard(() => remove(current)));
  $("share-create").addEventListener("click", guard(createLink));
  $("share-copy").addEventListener("click", guard(copyLink));
  $("cluster-refresh").addEventListener("click", guard(showCluster));
  bindDrop();
  // the table grows as its end scrolls into view: a 10,000-entry folder never renders at once
  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) listing.more(WINDOW);
  }, { rootMargin: "400px" }).observe($("sentinel"));
  window.addEventListener("hashchange", route);
  route();
}

document.addEventListener("DOMContentLoaded", init);
