// The console's entry point: asks for a key, learns from `GET /console/session` what it may see, and shows
// those tabs only (admin or no keys: adapters, playground, live; an inference key: the playground, and the live
// view only if it is also the metrics key). "Forget key" drops the key from memory and hides everything again.
import { api, setKey } from "./api.js";
import { loadAdapters, setupAdapters } from "./adapters.js";
import { startLive, stopLive } from "./live.js";
import { loadModels, setupPlayground } from "./playground.js";
import { show } from "./ui.js";

const $ = (id) => document.getElementById(id);
const TABS = ["adapters", "playground", "live"];
let session = null;

function allowedTabs(s) {
  if (s.role === "inference") return s.metrics ? ["playground", "live"] : ["playground"];
  return TABS;
}

function showTab(name) {
  for (const tab of TABS) {
    $(tab).hidden = tab !== name;
    const button = document.querySelector(`#tabs button[data-tab="${tab}"]`);
    button.setAttribute("aria-selected", String(tab === name));
  }
  document.body.dataset.tab = name;
  if (name === "live") startLive(); else stopLive();
  if (name === "adapters") loadAdapters();
  if (name === "playground") loadModels(session);
}

async function connect(event) {
  event.preventDefault();
  setKey($("key-input").value);
  $("connect").disabled = true;
  try {
    session = await api("GET", "console/session");
  } catch (error) {
    setKey("");
    show("key-error", error.message);
    return;
  } finally {
    $("connect").disabled = false;
  }
  $("key-input").value = "";
  show("key-error", "");
  const tabs = allowedTabs(session);
  for (const button of document.querySelectorAll("#tabs button")) {
    // tabs this key may not use are hidden and never loaded (the server refuses their routes to it anyway)
    button.hidden = !tabs.includes(button.dataset.tab);
  }
  for (const tab of TABS) if (!tabs.includes(tab)) $(tab).hidden = true;
  $("model-id").textContent = session.model;
  $("who").textContent = {
    admin: "admin key", open: "no keys configured (every route is open)",
    inference: `inference key${session.adapters ? ` (adapters: ${session.adapters.join(", ") || "none"})` : ""}`,
  }[session.role];
  document.body.dataset.role = session.role;
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("forget").hidden = false;
  showTab(tabs[0]);
}

function forget() {
  setKey("");
  session = null;
  stopLive();
  for (const tab of TABS) $(tab).hidden = true;
  $("tabs").hidden = true;
  $("forget").hidden = true;
  $("who").textContent = "";
  $("model-id").textContent = "";
  delete document.body.dataset.role;
  $("login").hidden = false;
}

setupAdapters();
setupPlayground();
$("key-form").addEventListener("submit", connect);
$("forget").addEventListener("click", forget);
for (const button of document.querySelectorAll("#tabs button")) {
  button.addEventListener("click", () => showTab(button.dataset.tab));
}
