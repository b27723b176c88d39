// The Adapters tab: the registry as a table (sorted and filtered in the page, so 1,000 rows stay quick: one
// pass to filter, one sort, one DocumentFragment), the row actions (activate, deactivate, pin, unpin, delete;
// deactivate and delete ask first) and the upload form, whose errors are the server's messages verbatim.
import { api, upload, ApiError } from "./api.js";
import { confirmAction, formatBytes, formatTime, show } from "./ui.js";

const $ = (id) => document.getElementById(id);
const ARCHIVE = /\.(zip|tar\.gz|tgz)$/i;
const CONFIG = "adapter_config.json";
const WEIGHTS = ["adapter_model.safetensors", "adapter_model.bin"];
const table = { rows: [], sortKey: "name", sortDir: 1, chosen: [] };

// ----- the table -----------------------------------------------------------------------------------------
export async function loadAdapters() {
  const started = performance.now();
  try {
    const answer = await api("GET", "admin/adapters");
    table.rows = answer.adapters;
    $("tier-summary").textContent = Object.entries(answer.tiers).map(([t, n]) => `${t} ${n}`).join(" · ");
    show("action-error", "");
  } catch (error) {
    show("action-error", error.message);
  }
  render();
  $("adapter-table").dataset.loadMs = (performance.now() - started).toFixed(1);
}

function matches(row, text, tier, state) {
  if (tier && row.tier !== tier) return false;
  if (state === "served" && !row.served) return false;
  if (state === "deactivated" && row.served) return false;
  if (state === "pinned" && !row.pinned) return false;
  if (state === "quarantined" && row.state !== "quarantined") return false;
  if (!text) return true;
  return row.name.toLowerCase().includes(text) || row.kind.toLowerCase().includes(text)
    || row.tier.includes(text) || row.targets.some((t) => t.toLowerCase().includes(text));
}

function sortValue(row, key) {
  const value = key === "targets" ? row.targets.join(",") : row[key];
  return value === null || value === undefined ? -Infinity : value;
}

function compare(a, b) {
  const x = sortValue(a, table.sortKey), y = sortValue(b, table.sortKey);
  const order = typeof x === "string" && typeof y === "string" ? x.localeCompare(y) : (x > y) - (x < y);
  return order * table.sortDir || a.name.localeCompare(b.name);
}

function cell(tr, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  tr.appendChild(td);
  return td;
}

function button(td, action, name, label, className) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  b.dataset.name = name;
  if (className) b.className = className;
  td.appendChild(b);
}

function row(r) {
  const tr = document.createElement("tr");
  tr.dataset.name = r.name;
  if (r.state === "quarantined") tr.className = "quarantined";
  else if (!r.served) tr.className = "deactivated";
  cell(tr, r.name, "name");
  cell(tr, r.kind);
  cell(tr, r.rank ?? "–", "num");
  cell(tr, r.targets.join(", "), "targets");
  cell(tr, formatBytes(r.size), "num");
  cell(tr, r.tier, `tier tier-${r.tier}`);
  cell(tr, r.state === "quarantined" ? "quarantined" : r.served ? "served" : "deactivated", "served");
  cell(tr, r.pinned ? "pinned" : "", "pinned");
  cell(tr, String(r.requests_served), "num");
  cell(tr, r.last_used_at ? formatTime(r.last_used_at) : "never", "time");
  const actions = cell(tr, "", "actions");
  if (r.error) actions.title = r.error;
  if (r.served) button(actions, "deactivate", r.name, "Deactivate");
  else button(actions, "activate", r.name, "Activate");
  button(actions, r.pinned ? "unpin" : "pin", r.name, r.pinned ? "Unpin" : "Pin");
  button(actions, "delete", r.name, "Delete", "danger");
  return tr;
}

export function render() {
  const started = performance.now();
  const text = $("filter").value.trim().toLowerCase();
  const tier = $("filter-tier").value, state = $("filter-state").value;
  const shown = table.rows.filter((r) => matches(r, text, tier, state)).sort(compare);
  const body = document.createElement("tbody");
  const fragment = document.createDocumentFragment();
  for (const r of shown) fragment.appendChild(row(r));
  body.appendChild(fragment);
  $("adapter-table").replaceChild(body, $("adapter-table").tBodies[0]);
  for (const th of document.querySelectorAll("#adapter-table th[data-sort]")) {
    const sorted = th.dataset.sort === table.sortKey;
    th.setAttribute("aria-sort", sorted ? (table.sortDir > 0 ? "ascending" : "descending") : "none");
  }
  $("row-count").textContent = `${shown.length} of ${table.rows.length} adapters`;
  $("adapter-table").dataset.renderMs = (performance.now() - started).toFixed(1);
}

const CONFIRM = {
  deactivate: (n) => `Deactivate ${n}? It stops being served (requests for it get 409) and its memory is freed; `
    + "it stays stored.",
  delete: (n) => `Delete ${n}? Its files are removed from the store; this cannot be undone.`,
};

async function act(action, name) {
  if (CONFIRM[action] && !(await confirmAction(CONFIRM[action](name)))) return;
  const path = `admin/adapters/${encodeURIComponent(name)}`;
  try {
    if (action === "delete") await api("DELETE", path);
    else await api("POST", `${path}/${action}`);
    show("action-error", "");
  } catch (error) {
    show("action-error", error.message);
  }
  await loadAdapters();
}

// ----- upload --------------------------------------------------------------------------------------------
// The form fields the server expects, from whatever was chosen or dropped: an archive, or the config and weights
// files (by their names, wherever they sit in a folder). Anything else is left out and listed as ignored.
function formFor(name, files) {
  const form = new FormData();
  form.append("name", name);
  const ignored = [];
  for (const file of files) {
    if (ARCHIVE.test(file.name)) form.append("archive", file, file.name);
    else if (file.name === CONFIG || WEIGHTS.includes(file.name)) form.append(file.name, file, file.name);
    else ignored.push(file.name);
  }
  return { form, ignored };
}

function choose(files, folderName) {
  table.chosen = files;
  const nameInput = $("upload-name");
  if (!nameInput.value) {
    const archive = files.find((f) => ARCHIVE.test(f.name));
    const guess = folderName || (archive ? archive.name.replace(ARCHIVE, "") : "");
    nameInput.value = guess.replace(/[^A-Za-z0-9._-]/g, "-").replace(/^[^A-Za-z0-9]+/, "").slice(0, 64);
  }
  $("upload-chosen").textContent = files.length
    ? `chosen: ${files.map((f) => `${f.name} (${formatBytes(f.size)})`).join(", ")}` : "";
}

async function submitUpload(event) {
  event.preventDefault();
  const name = $("upload-name").value.trim();
  const { form, ignored } = formFor(name, table.chosen);
  const progress = $("upload-progress");
  progress.value = 0;
  progress.dataset.events = "0";
  show("upload-error", "");
  show("upload-status", ignored.length ? `ignored: ${ignored.join(", ")}` : "");
  $("upload-submit").disabled = true;
  const replace = $("upload-replace").checked ? "?replace=true" : "";
  try {
    const record = await upload(`admin/adapters${replace}`, form, (loaded, total) => {
      progress.dataset.events = String(Number(progress.dataset.events) + 1);
      if (total) progress.value = Math.round((100 * loaded) / total);
      $("upload-percent").textContent = total ? `${progress.value}% of ${formatBytes(total)}` : formatBytes(loaded);
    });
    progress.value = 100;
    show("upload-status", `uploaded ${record.name} (${record.kind}, ${formatBytes(record.size)})`);
    $("upload-form").reset();
    choose([]);
    await loadAdapters();
  } catch (error) {
    show("upload-error", error instanceof ApiError ? error.message : String(error));
  } finally {
    $("upload-submit").disabled = false;
  }
}

// Dropped folders arrive as FileSystemEntry trees; read them down to their files.
async function entryFiles(entry) {
  if (entry.isFile) return [await new Promise((ok, fail) => entry.file(ok, fail))];
  const reader = entry.createReader(), files = [];
  for (;;) {
    const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
    if (!batch.length) return files;
    for (const child of batch) files.push(...(await entryFiles(child)));
  }
}

async function dropped(event) {
  event.preventDefault();
  $("drop-zone").classList.remove("over");
  const items = [...event.dataTransfer.items].filter((i) => i.kind === "file");
  const entries = items.map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null));
  let files = [], folder = "";
  if (entries.length && entries.every(Boolean)) {
    for (const entry of entries) {
      if (entry.isDirectory && !folder) folder = entry.name;
      files.push(...(await entryFiles(entry)));
    }
  } else {
    files = [...event.dataTransfer.files];
  }
  choose(files, folder);
}

export function setupAdapters() {
  for (const id of ["filter", "filter-tier", "filter-state"]) $(id).addEventListener("input", render);
  $("refresh").addEventListener("click", loadAdapters);
  document.querySelector("#adapter-table thead").addEventListener("click", (event) => {
    const th = event.target.closest("th[data-sort]");
    if (!th) return;
    table.sortDir = th.dataset.sort === table.sortKey ? -table.sortDir : 1;
    table.sortKey = th.dataset.sort;
    render();
  });
  $("adapter-table").addEventListener("click", (event) => {
    const b = event.target.closest("button[data-action]");
    if (b) act(b.dataset.action, b.dataset.name);
  });
  $("upload-files").addEventListener("change", (e) => choose([...e.target.files]));
  $("upload-folder").addEventListener("change", (e) => {
    const files = [...e.target.files];
    choose(files, files.length ? (files[0].webkitRelativePath || "").split("/")[0] : "");
  });
  $("upload-form").addEventListener("submit", submitUpload);
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", dropped);
}
