// The console's only way to the server: the key (held in this module's memory, never in storage or cookies),
// JSON calls whose errors carry the server's message verbatim, uploads with progress (XMLHttpRequest: fetch
// cannot report upload progress) and server-sent event streams read from fetch's body.

let key = "";

export function setKey(value) { key = value || ""; }
export function hasKey() { return key !== ""; }

function authHeaders(extra = {}) {
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// An error answered by the server: `message` is its `error.message` exactly as sent.
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function errorMessage(status, text) {
  try {
    const body = JSON.parse(text);
    if (body && body.error && typeof body.error.message === "string") return body.error.message;
    if (body && typeof body.error === "string") return body.error;
  } catch (e) { /* not JSON: the text itself */ }
  return text || `HTTP ${status}`;
}

// Relative paths, so the console works behind a proxy that mounts the service under a prefix.
export async function api(method, path, body) {
  const init = { method, headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  const text = await response.text();
  if (!response.ok) throw new ApiError(response.status, errorMessage(response.status, text));
  return text ? JSON.parse(text) : null;
}

// POST a multipart form; onProgress(loaded, total) as the body goes out. Resolves to the JSON answer.
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    if (key) xhr.setRequestHeader("Authorization", `Bearer ${key}`);
    xhr.upload.onprogress = (event) => onProgress(event.loaded, event.lengthComputable ? event.total : 0);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else reject(new ApiError(xhr.status, errorMessage(xhr.status, xhr.responseText)));
    };
    xhr.onerror = () => reject(new ApiError(0, "the upload failed: the connection to the server was lost"));
    xhr.send(form);
  });
}

// POST a JSON body that answers with server-sent events; yields each `data:` payload parsed, until [DONE].
export async function* stream(path, body, signal) {
  const response = await fetch(path, {
    method: "POST", signal, body: JSON.stringify(body),
    headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
  });
  if (!response.ok) throw new ApiError(response.status, errorMessage(response.status, await response.text()));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}
