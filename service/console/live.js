// The Live tab: reads `GET /stats` every 1.5 s while the tab is shown and draws requests running / waiting,
// tokens per second (the difference of the running token totals between two reads: generated tokens, and the
// tokens the engine computed, prompt chunks and decode rows), KV cache use, adapters and their stored bytes per
// tier against the tiers' limits, and the server's recent errors.
import { api } from "./api.js";
import { Sparkline } from "./charts.js";
import { formatBytes, formatRate, formatTime } from "./ui.js";

const $ = (id) => document.getElementById(id);
export const INTERVAL_MS = 1500;
const live = { timer: null, previous: null, charts: null, busy: false };

function charts() {
  if (!live.charts) {
    live.charts = {
      requests: new Sparkline($("chart-requests"), { floor: 1, format: (v) => v.toFixed(0) }),
      tps: new Sparkline($("chart-tps"), { floor: 1, format: formatRate }),
      kv: new Sparkline($("chart-kv"), { colors: ["#2f855a"], floor: 1, format: (v) => `${(v * 100).toFixed(0)}%` }),
    };
  }
  return live.charts;
}

function rates(stats) {
  const previous = live.previous;
  live.previous = { time: stats.time, totals: stats.totals };
  if (!previous || stats.time <= previous.time) return { generated: null, computed: null };
  const dt = stats.time - previous.time;
  return {
    generated: (stats.totals.generated_tokens - previous.totals.generated_tokens) / dt,
    computed: (stats.totals.computed_tokens - previous.totals.computed_tokens) / dt,
  };
}

function tierBars(adapters) {
  const rows = [["device", adapters.limits.device], ["cpu", adapters.limits.cpu], ["stored", null]];
  $("live-tiers").replaceChildren(...rows.map(([tier, limit]) => {
    const count = adapters.tiers[tier] ?? 0;
    const line = document.createElement("div");
    line.className = "tier-row";
    line.dataset.tier = tier;
    line.dataset.count = String(count);
    const label = document.createElement("span");
    label.textContent = `${tier} ${count}${limit === null ? "" : ` / ${limit}`}`;
    const bytes = document.createElement("span");
    bytes.className = "muted";
    const budget = tier === "device" && adapters.limits.device_bytes
      ? ` of ${formatBytes(adapters.limits.device_bytes)}` : "";
    bytes.textContent = `${formatBytes((adapters.bytes || {})[tier] ?? 0)}${budget}`;
    const bar = document.createElement("meter");
    bar.min = 0;
    bar.max = limit ?? Math.max(adapters.total, 1);
    bar.value = count;
    line.append(label, bar, bytes);
    return line;
  }));
  $("live-adapter-states").textContent = `${adapters.total} registered · ${adapters.deactivated} deactivated · `
    + `${adapters.pinned} pinned · ${adapters.quarantined} quarantined`;
}

function errorRows(errors) {
  $("live-error-total").textContent = `(${errors.total} since start)`;
  $("error-table").tBodies[0].replaceChildren(...errors.recent.map((e) => {
    const tr = document.createElement("tr");
    const where = e.status === null ? "in a stream" : `${e.method} ${e.path}`;
    for (const text of [formatTime(e.time), e.status ?? "–", where, e.message, e.request_id ?? ""]) {
      const td = document.createElement("td");
      td.textContent = String(text);
      tr.appendChild(td);
    }
    return tr;
  }));
}

function draw(stats) {
  const r = stats.requests, c = charts(), rate = rates(stats);
  $("live-running").textContent = r.running;
  $("live-waiting").textContent = r.waiting;
  $("live-limits").textContent = `at most ${r.max_running} running, ${r.max_waiting} waiting`;
  c.requests.push(r.running, r.waiting);
  $("live-tps").textContent = formatRate(rate.generated);
  $("live-computed-tps").textContent = formatRate(rate.computed);
  c.tps.push(rate.generated ?? 0, rate.computed ?? 0);
  const outcomes = Object.entries(stats.totals.requests).map(([k, v]) => `${k} ${v}`).join(", ");
  $("live-totals").textContent = `${stats.totals.generated_tokens} tokens generated, `
    + `${stats.totals.prompt_tokens} prompt tokens; requests finished: ${outcomes || "none yet"}`;
  $("live-kv").textContent = `${(stats.kv_cache.usage * 100).toFixed(0)}%`;
  const kv = stats.kv_cache;
  $("live-kv-slots").textContent = `${kv.slots - kv.free_slots} of ${kv.slots} slots`;
  c.kv.push(stats.kv_cache.usage);
  tierBars(stats.adapters);
  errorRows(stats.errors);
  $("live-updated").textContent = `updated ${formatTime(stats.time)}`;
  $("live").dataset.updates = String(Number($("live").dataset.updates || 0) + 1);
}

async function poll() {
  if (live.busy) return;
  live.busy = true;
  try {
    draw(await api("GET", "stats"));
  } catch (error) {
    $("live-updated").textContent = `cannot read /stats: ${error.message}`;
  } finally {
    live.busy = false;
  }
}

export function startLive() {
  if (live.timer === null) {
    poll();
    live.timer = setInterval(poll, INTERVAL_MS);
  }
}

export function stopLive() {
  clearInterval(live.timer);
  live.timer = null;
  live.previous = null;
}
