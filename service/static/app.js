// acs-serve's try-it page: calls the public /v1 API only. No build step, nothing fetched
// from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], image: null, seq: 0 };

function headers() {
  const key = localStorage.getItem("acs-api-key") || "";
  return key ? { "X-API-Key": key } : {};
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (response.status === 401) $("key-row").hidden = false;
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function model() {
  return state.models.find((m) => m.name === $("model").value);
}

async function loadModels() {
  try {
    const body = await call("/v1/models");
    state.models = body.models;
    $("model").innerHTML = "";
    for (const m of body.models) {
      const option = new Option(m.name + (m.name === body.default ? " (default)" : ""), m.name);
      option.selected = m.name === body.default;
      $("model").add(option);
    }
    showError("");
    resetBudget();
  } catch (e) {
    showError(e.message);
  }
}

function resetBudget() {
  const m = model();
  if (!m) return;
  $("budget").value = m.default.budget;
  $("policy").value = m.default.policy;
  $("budget-value").textContent = Number($("budget").value).toFixed(2);
  $("floor-mark").innerHTML = m.gated ? `<span style="left:${(100 * m.budget_floor).toFixed(1)}%"></span>` : "";
  $("budget").disabled = !m.gated;
  $("budget-help").textContent = m.gated
    ? `The budget is the share of the dense model's MACs a request may spend. Below the floor ` +
      `(${m.budget_floor.toFixed(2)}, every gated channel skipped) it cannot go lower.`
    : `${m.name} is a dense model: its budget is fixed at 1.0, every image runs all of it.`;
}

async function predict(budget = Number($("budget").value)) {
  const m = model();
  if (!m || !state.image) return null;
  const form = new FormData();
  form.append("file", state.image, state.image.name || "image");
  const query = new URLSearchParams({ budget, policy: $("policy").value, top_k: 5 });
  return call(`/v1/models/${encodeURIComponent(m.name)}/predict?${query}`, { method: "POST", body: form });
}

async function update() {
  const seq = ++state.seq;
  try {
    const body = await predict();
    if (!body || seq !== state.seq) return;
    showError("");
    render(body);
  } catch (e) {
    if (seq === state.seq) showError(e.message);
  }
}

function render(body) {
  const p = body.predictions[0];
  $("topk").innerHTML = p.top_k.map((t) =>
    `<li><span class="label">${t.label}</span> ${(100 * t.probability).toFixed(1)}%</li>`).join("");
  $("effective").textContent = p.budget.effective.toFixed(3);
  $("expected").textContent = p.budget.expected_top1 === null ? "not measured"
    : `${(100 * p.budget.expected_top1).toFixed(1)}% (held-out data, this budget and policy)`;
  const notes = (p.budget.lowered ? [`Lowered: ${p.budget.lowered}`] : []).concat(p.budget.notes);
  $("notes").replaceChildren(...notes.map((n) => Object.assign(document.createElement("li"), { textContent: n })));
  $("macs").textContent = `${(p.cost.executed_macs / 1e6).toFixed(1)} M of ${(p.cost.dense_macs / 1e6).toFixed(1)} M`;
  $("ratio").textContent = p.cost.executed_ratio.toFixed(3);
  $("skipped").textContent = p.cost.skipped_channel_ratio.toFixed(3);
  $("latency").textContent = `${body.timing.inference_ms.toFixed(1)} ms inference, ${body.timing.total_ms.toFixed(1)} ms in the server`;
  $("layers").innerHTML = p.cost.layer_skipped_ratio.map((r, i) =>
    `<div class="bar">layer ${i + 1} <div style="width:${(150 * r).toFixed(0)}px"></div> ${(100 * r).toFixed(0)}%</div>`).join("");
}

function setImage(file) {
  state.image = file;
  $("preview").src = URL.createObjectURL(file);
  update();
}

async function loadSamples() {
  const names = await (await fetch("/static/samples/index.json")).json();
  for (const name of names) {
    const img = new Image();
    img.src = `/static/samples/${name}`;
    img.alt = img.title = name;
    img.addEventListener("click", async () => {
      const blob = await (await fetch(img.src)).blob();
      setImage(new File([blob], name, { type: blob.type }));
    });
    $("samples").append(img);
  }
}

async function sweep() {
  const points = [];
  for (let i = 1; i <= 10; i++) {
    try {
      const runs = [];
      for (let r = 0; r < 3; r++) {
        const body = await predict(i / 10);
        if (!body) return;
        runs.push(body);
      }
      const ms = runs.map((b) => b.timing.inference_ms).sort((a, b) => a - b)[1];
      const p = runs[0].predictions[0];
      points.push({ ratio: p.cost.executed_ratio, ms, confidence: p.top_k[0].probability });
    } catch (e) {
      showError(e.message);
      return;
    }
  }
  window.sweepPoints = points;
  draw(points);
}

function draw(points) {
  const canvas = $("sweep-chart");
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 40;
  const maxMs = Math.max(...points.map((p) => p.ms)) * 1.1;
  g.clearRect(0, 0, w, h);
  g.strokeStyle = "#999";
  g.strokeRect(pad, 10, w - 2 * pad, h - pad - 10);
  g.fillStyle = "#222";
  g.fillText("executed-MAC ratio", w / 2 - 40, h - 8);
  g.fillText("0", pad - 4, h - pad + 12);
  g.fillText("1", w - pad - 4, h - pad + 12);
  const x = (r) => pad + r * (w - 2 * pad);
  const series = [["#47a", (p) => p.ms / maxMs, `latency (ms, max ${maxMs.toFixed(1)})`],
                  ["#c63", (p) => p.confidence, "top-1 confidence"]];
  series.forEach(([color, value, label], k) => {
    g.strokeStyle = g.fillStyle = color;
    g.beginPath();
    points.forEach((p, i) => {
      const y = h - pad - value(p) * (h - pad - 10);
      i ? g.lineTo(x(p.ratio), y) : g.moveTo(x(p.ratio), y);
    });
    g.stroke();
    g.fillText(label, pad + 8, 24 + 14 * k);
  });
}

function wire() {
  const host = location.hostname || "localhost";
  $("grafana-budgets").href = `http://${host}:3000/d/acs-serve-budgets`;
  $("grafana-overview").href = `http://${host}:3000/d/acs-serve-overview`;
  $("api-key").value = localStorage.getItem("acs-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("acs-api-key", $("api-key").value);
    loadModels().then(update);
  });
  $("model").addEventListener("change", () => { resetBudget(); update(); });
  $("policy").addEventListener("change", update);
  $("budget").addEventListener("input", () => { $("budget-value").textContent = Number($("budget").value).toFixed(2); });
  $("budget").addEventListener("change", update);
  $("file").addEventListener("change", () => $("file").files[0] && setImage($("file").files[0]));
  $("sweep").addEventListener("click", sweep);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) setImage(e.dataTransfer.files[0]);
  });
}

wire();
loadSamples();
loadModels();
