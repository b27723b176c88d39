// The Playground tab: one prompt, up to four columns, each with its own model (the base or an adapter the key
// may use) and sampling settings, all streamed at once from the OpenAI routes (so the server batches them
// together). Under each column: time to first token, tokens/s after the first token, tokens and finish reason.
import { api, stream } from "./api.js";
import { formatRate, show } from "./ui.js";

const $ = (id) => document.getElementById(id);
const MAX_COLUMNS = 4;
const pg = { models: [], columns: [], controller: null, maxTokens: 1024, baseModel: "" };

function field(parent, label, input) {
  const wrap = document.createElement("label");
  wrap.textContent = `${label} `;
  wrap.appendChild(input);
  parent.appendChild(wrap);
  return input;
}

function numberInput(cls, value, min, max, step) {
  const input = document.createElement("input");
  Object.assign(input, { type: "number", value, min, max, step, className: cls });
  return input;
}

function fillModels(select, preferred) {
  const current = select.value || preferred;
  select.replaceChildren(...pg.models.map((id) => {
    const option = document.createElement("option");
    option.value = option.textContent = id;
    if (id === pg.baseModel) option.textContent = `${id} (base)`;
    return option;
  }));
  if (pg.models.includes(current)) select.value = current;
}

function addColumn(preferred) {
  if (pg.columns.length >= MAX_COLUMNS) return;
  const el = document.createElement("div");
  el.className = "pg-column panel";
  const settings = document.createElement("div");
  settings.className = "pg-settings";
  const col = {
    el,
    model: field(settings, "Model", document.createElement("select")),
    temperature: field(settings, "temperature", numberInput("pg-temperature", "0", "0", "2", "0.1")),
    topP: field(settings, "top_p", numberInput("pg-top-p", "1", "0.01", "1", "0.05")),
    maxTokens: field(settings, "max_tokens", numberInput("pg-max-tokens", String(Math.min(128, pg.maxTokens)),
      "1", String(pg.maxTokens), "1")),
    seed: field(settings, "seed", numberInput("pg-seed", "", "0", "", "1")),
    out: document.createElement("pre"),
    stats: document.createElement("p"),
    error: document.createElement("pre"),
  };
  col.model.className = "pg-model";
  const remove = document.createElement("button");
  Object.assign(remove, { type: "button", textContent: "Remove", className: "pg-remove" });
  remove.addEventListener("click", () => removeColumn(col));
  settings.appendChild(remove);
  col.out.className = "pg-output";
  col.stats.className = "pg-stats muted";
  col.error.className = "pg-error error";
  col.error.hidden = true;
  el.append(settings, col.out, col.stats, col.error);
  fillModels(col.model, preferred);
  pg.columns.push(col);
  $("pg-columns").appendChild(el);
  updateButtons();
}

function removeColumn(col) {
  if (pg.columns.length === 1) return;
  pg.columns = pg.columns.filter((c) => c !== col);
  col.el.remove();
  updateButtons();
}

function updateButtons() {
  $("pg-add").disabled = pg.columns.length >= MAX_COLUMNS;
  $("pg-columns").dataset.columns = String(pg.columns.length);
  for (const col of pg.columns) col.el.querySelector(".pg-remove").disabled = pg.columns.length === 1;
}

export async function loadModels(session) {
  pg.baseModel = session.model;
  pg.maxTokens = session.max_tokens_limit;
  try {
    pg.models = (await api("GET", "v1/models")).data.map((m) => m.id);
    show("pg-error", "");
  } catch (error) {
    show("pg-error", error.message);
  }
  if (!pg.columns.length) {
    addColumn(pg.baseModel);
    addColumn(pg.models.find((id) => id !== pg.baseModel) || pg.baseModel);
  } else {
    for (const col of pg.columns) fillModels(col.model, pg.baseModel);
  }
}

function requestBody(col, mode, prompt) {
  const body = {
    model: col.model.value, max_tokens: Number(col.maxTokens.value), temperature: Number(col.temperature.value),
    top_p: Number(col.topP.value), stream: true, stream_options: { include_usage: true },
  };
  if (col.seed.value !== "") body.seed = Number(col.seed.value);
  if (mode === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  return body;
}

function writeStats(col, s) {
  const ttft = s.first === null ? null : s.first - s.start;
  const tps = s.tokens > 1 && s.last > s.first ? ((s.tokens - 1) * 1000) / (s.last - s.first) : null;
  Object.assign(col.stats.dataset, {
    ttftMs: ttft === null ? "" : ttft.toFixed(0), tps: tps === null ? "" : tps.toFixed(2),
    tokens: String(s.tokens ?? ""), finish: s.finish || "",
  });
  col.stats.textContent = [`TTFT ${ttft === null ? "–" : `${ttft.toFixed(0)} ms`}`, `${formatRate(tps)} tok/s`,
    `${s.tokens ?? "–"} tokens`, s.finish ? `finish: ${s.finish}` : "running"].join(" · ");
}

async function runColumn(col, mode, prompt, signal) {
  col.out.textContent = "";
  col.error.hidden = true;
  col.el.dataset.state = "running";
  const path = mode === "chat" ? "v1/chat/completions" : "v1/completions";
  const s = { start: performance.now(), first: null, last: null, tokens: null, finish: null };
  writeStats(col, s);
  try {
    for await (const chunk of stream(path, requestBody(col, mode, prompt), signal)) {
      if (chunk.usage) s.tokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices || []) {
        const piece = mode === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        if (piece) {
          const now = performance.now();
          if (s.first === null) s.first = now;
          s.last = now;
          col.out.append(piece);
        }
        if (choice.finish_reason) s.finish = choice.finish_reason;
      }
      writeStats(col, s);
    }
    if (s.finish === "error") throw new Error("generation failed on the server (see the Live tab's recent errors)");
  } catch (error) {
    if (error.name !== "AbortError") {
      col.error.textContent = error.message;
      col.error.hidden = false;
    } else {
      s.finish = s.finish || "stopped";
    }
  }
  writeStats(col, s);
  col.el.dataset.state = "done";
}

async function run() {
  const prompt = $("pg-prompt").value;
  const mode = $("pg-mode").value;
  pg.controller = new AbortController();
  $("pg-run").disabled = true;
  $("pg-stop").disabled = false;
  $("pg-columns").dataset.state = "running";
  await Promise.all(pg.columns.map((col) => runColumn(col, mode, prompt, pg.controller.signal)));
  $("pg-columns").dataset.state = "done";
  $("pg-run").disabled = false;
  $("pg-stop").disabled = true;
}

export function setupPlayground() {
  $("pg-add").addEventListener("click", () => addColumn(pg.baseModel));
  $("pg-run").addEventListener("click", run);
  $("pg-stop").addEventListener("click", () => pg.controller && pg.controller.abort());
}
