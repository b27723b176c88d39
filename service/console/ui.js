// Small page helpers the tabs share: messages, the confirmation dialog, number and time formats.

export function show(id, text) {
  const element = document.getElementById(id);
  element.textContent = text;
  element.hidden = !text;
}

// Resolves true when the operator confirms in the modal dialog, false on Cancel or Escape.
export function confirmAction(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

export function formatBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

const pad = (n) => String(n).padStart(2, "0");

// Unix seconds as local "YYYY-MM-DD HH:MM:SS".
export function formatTime(seconds) {
  const d = new Date(seconds * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
    + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function formatRate(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}
