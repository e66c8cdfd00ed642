// crystal-locator operator console: live session view, prompt cards, controls, explore view.
// Plain browser JavaScript, no build step, no network beyond this server.
"use strict";

const API_TOKEN = document.querySelector('meta[name="console-api-token"]').content;
const URL_TOKEN = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, children = []) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
};

async function post(path, body, extraHeaders = {}) {
  const isJson = !(body instanceof Blob || body instanceof ArrayBuffer);
  const response = await fetch(path, {
    method: "POST",
    headers: { "X-Console-Token": API_TOKEN, ...(isJson ? { "Content-Type": "application/json" } : {}), ...extraHeaders },
    body: isJson ? JSON.stringify(body) : body,
    credentials: "same-origin",
  });
  let data = {};
  try { data = await response.json(); } catch (e) { data = {}; }
  return { ok: response.ok, status: response.status, data };
}

function fmtSeconds(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const s = Number(value);
  if (s < 120) return `${s.toFixed(0)} s`;
  if (s < 7200) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(2)} h`;
}

// ------------------------------------------------------------------------------------------------
// Live session view
// ------------------------------------------------------------------------------------------------
const view = { state: "unknown", progress: {}, targets: new Map(), chart: [], atlasVersion: 0, atlasShape: null,
               selected: null, journal: [] };

function setConnected(connected, text) {
  const link = $("link");
  link.dataset.connected = String(connected);
  link.textContent = text || (connected ? "live" : "agent unreachable");
}

function setState(state) {
  view.state = state || "unknown";
  const node = $("state");
  node.dataset.state = view.state;
  node.textContent = view.state;
}

function renderProgress() {
  const p = view.progress || {};
  $("stat-found").textContent = p.targets_found ?? view.targets.size ?? "–";
  $("stat-confirmed").textContent = p.targets_confirmed ?? "–";
  $("stat-visited").textContent = p.targets_visited ?? "–";
  $("stat-time").textContent = fmtSeconds(Math.max(p.microscope_time_s ?? 0, view.microscopeTime ?? 0));
  $("stat-diffracting").textContent = p.diffracting_crystals ?? p.targets_recorded ?? "–";
  $("stat-per").textContent = fmtSeconds(p.time_per_diffracting_s);
  $("stat-prompts").textContent = p.prompts ?? "–";
}

function renderChart() {
  const svg = $("chart");
  svg.replaceChildren();
  const points = view.chart;
  if (!points.length) {
    $("chart-label").textContent = "diffracting crystals over microscope time: none yet";
    return;
  }
  const tMax = Math.max(points[points.length - 1][0], view.microscopeTime || 0, 1);
  const nMax = Math.max(points[points.length - 1][1], 1);
  const coords = [[0, 90]];
  let last = 0;
  for (const [t, n] of points) {
    const x = (300 * t) / tMax;
    coords.push([x, 90 - (80 * last) / nMax], [x, 90 - (80 * n) / nMax]);
    last = n;
  }
  coords.push([300 * Math.max(view.microscopeTime || 0, points[points.length - 1][0]) / tMax, 90 - (80 * last) / nMax]);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", coords.map((c) => c.join(",")).join(" "));
  svg.append(line);
  $("chart-label").textContent = `diffracting crystals over microscope time: ${last} in ${fmtSeconds(tMax)}`;
}

function renderJournal() {
  const pre = $("journal");
  pre.textContent = view.journal.slice().reverse().join("\n");
}

function renderAtlas() {
  const wrap = $("atlas-wrap");
  if (!view.atlasVersion) { wrap.hidden = true; $("atlas-empty").hidden = false; return; }
  wrap.hidden = false; $("atlas-empty").hidden = true;
  const img = $("atlas-img");
  const src = `/session/atlas/heatmap.png?v=${view.atlasVersion}`;
  if (img.dataset.src !== src) { img.dataset.src = src; img.src = src; }
  drawTargets();
}

function drawTargets() {
  const svg = $("atlas-overlay");
  const img = $("atlas-img");
  const rows = view.atlasShape ? view.atlasShape[0] : img.naturalHeight;
  const cols = view.atlasShape ? view.atlasShape[1] : img.naturalWidth;
  if (!rows || !cols) return;
  svg.setAttribute("viewBox", `0 0 ${cols} ${rows}`);
  svg.replaceChildren();
  const radius = Math.max(cols, rows) / 60;
  for (const target of view.targets.values()) {
    if (target.atlas_col_px === undefined) continue;
    const c = document.createElementNS("http://www.w3.org/2000/svg", "circle");
    c.setAttribute("cx", target.atlas_col_px); c.setAttribute("cy", target.atlas_row_px);
    c.setAttribute("r", radius);
    c.setAttribute("class", `${target.outcome || "pending"}${view.selected === target.target_id ? " selected" : ""}`);
    c.dataset.targetId = target.target_id;
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = `${target.target_id}: ${target.outcome || "pending"}`;
    c.append(title);
    c.addEventListener("click", () => showTarget(target.target_id));
    svg.append(c);
  }
}

function showTarget(id) {
  const target = view.targets.get(id);
  if (!target) return;
  view.selected = id;
  $("target-detail").hidden = false;
  $("target-title").textContent = `${id}: ${target.outcome || "pending"}`;
  const where = target.x_um !== undefined ? `stage ${Number(target.x_um).toFixed(1)}, ${Number(target.y_um).toFixed(1)} µm` : "";
  const spots = target.n_spots !== undefined && target.n_spots !== null ? ` · ${target.n_spots} spots` : "";
  $("target-info").textContent = `${where}${spots}${target.reason ? " · " + target.reason : ""}`;
  const stamp = Date.now();
  $("target-thumb").src = `/session/targets/${encodeURIComponent(id)}/thumb?t=${stamp}`;
  $("target-diff").src = `/session/targets/${encodeURIComponent(id)}/diffraction?t=${stamp}`;
  drawTargets();
}

function setTargets(list) {
  if (!list) return;
  view.targets = new Map(list.map((t) => [t.target_id, t]));
}

function applySnapshot(snap) {
  setConnected(snap.agent_connected, snap.agent_connected ? "live" : "agent unreachable");
  setState(snap.state);
  view.microscopeTime = snap.microscope_time_s;
  view.progress = snap.progress || {};
  setTargets(snap.targets);
  view.chart = snap.chart || [];
  view.journal = snap.journal || [];
  view.atlasVersion = snap.atlas_version || 0;
  view.atlasShape = snap.atlas_shape_px || null;
  const seen = new Set();
  for (const prompt of snap.prompts || []) { renderPrompt(prompt); seen.add(prompt.id); }
  renderProgress(); renderChart(); renderJournal(); renderAtlas();
}

function applyEvent(msg) {
  setState(msg.state);
  view.microscopeTime = msg.microscope_time_s;
  if (msg.topic === "progress" || msg.topic === "summary") view.progress = msg.event;
  if (msg.targets) setTargets(msg.targets);
  if (msg.chart) view.chart = msg.chart;
  if (msg.journal_line) { view.journal.push(msg.journal_line); if (view.journal.length > 40) view.journal.shift(); }
  if (msg.atlas_shape_px) view.atlasShape = msg.atlas_shape_px;
  const atlasChanged = msg.atlas_version !== view.atlasVersion;
  view.atlasVersion = msg.atlas_version;
  renderProgress();
  if (msg.chart || msg.topic === "state") renderChart();
  if (msg.journal_line) renderJournal();
  if (atlasChanged) renderAtlas(); else if (msg.targets) drawTargets();
  if (view.selected && msg.topic === "journal" && msg.targets) {
    const t = view.targets.get(view.selected);
    if (t) $("target-title").textContent = `${view.selected}: ${t.outcome || "pending"}`;
  }
}

// ------------------------------------------------------------------------------------------------
// Prompt cards
// ------------------------------------------------------------------------------------------------
const prompts = new Map(); // id -> {card, deadline, prompt}

function statusText(prompt) {
  if (prompt.state === "answered") {
    const opts = (prompt.option_ids || []).join(", ");
    return `answered${prompt.answered_by ? " by " + prompt.answered_by : ""}${opts ? ": " + opts : ""}`;
  }
  if (prompt.state === "expired") return "expired: the agent went on with its fallback";
  if (prompt.state === "cancelled") return "withdrawn by the agent";
  return "";
}

function renderPrompt(prompt) {
  let entry = prompts.get(prompt.id);
  if (!entry) {
    const card = el("article", { class: "card", dataset: { promptId: prompt.id, state: prompt.state } });
    card.append(el("p", { class: "question", text: prompt.question }));
    const images = el("div", { class: "images" });
    for (const url of prompt.image_urls || []) {
      const img = el("img", { src: url, alt: url.split("/").pop(), loading: "lazy" });
      images.append(img);
    }
    card.append(images);
    const options = el("div", { class: "options" });
    const chosen = new Set();
    for (const option of prompt.options) {
      const button = el("button", { type: "button", dataset: { option: option.id }, "aria-pressed": "false" },
                        [option.label]);
      if (option.description) button.append(el("span", { class: "desc", text: option.description }));
      button.addEventListener("click", () => {
        if (prompt.multiple) {
          if (chosen.has(option.id)) chosen.delete(option.id); else chosen.add(option.id);
          button.setAttribute("aria-pressed", String(chosen.has(option.id)));
        } else {
          sendAnswer(prompt.id, [option.id]);
        }
      });
      options.append(button);
    }
    if (prompt.multiple) {
      const send = el("button", { type: "button", class: "send", text: "Send answer" });
      send.addEventListener("click", () => sendAnswer(prompt.id, [...chosen]));
      options.append(send);
    }
    card.append(options);
    card.append(el("p", { class: "countdown" }));
    card.append(el("p", { class: "status", role: "status" }));
    $("prompts").prepend(card);
    entry = { card, deadline: performance.now() + 1000 * (prompt.seconds_left || 0), prompt };
    prompts.set(prompt.id, entry);
  }
  entry.prompt = prompt;
  if (prompt.state === "open") entry.deadline = performance.now() + 1000 * (prompt.seconds_left || 0);
  setCardState(entry, prompt.state, statusText(prompt));
  tickCountdowns();
}

function setCardState(entry, state, text) {
  const card = entry.card;
  card.dataset.state = state;
  card.querySelector(".status").textContent = text;
  const closed = state !== "open";
  for (const button of card.querySelectorAll("button")) button.disabled = closed;
  if (closed) card.querySelector(".countdown").textContent = "";
  // keep the page tidy: at most 5 closed cards
  const closedCards = [...$("prompts").querySelectorAll('.card:not([data-state="open"])')];
  for (const old of closedCards.slice(5)) { prompts.delete(old.dataset.promptId); old.remove(); }
}

async function sendAnswer(promptId, optionIds) {
  const entry = prompts.get(promptId);
  if (!entry || entry.card.dataset.state !== "open") return;
  if (!optionIds.length) { entry.card.querySelector(".status").textContent = "choose at least one option"; return; }
  for (const button of entry.card.querySelectorAll("button")) button.disabled = true;
  entry.card.querySelector(".status").textContent = "sending…";
  const name = localStorage.getItem("operator") || "console";
  const result = await post(`/api/prompts/${encodeURIComponent(promptId)}/answer`, { option_ids: optionIds, operator: name });
  if (result.ok) {
    setCardState(entry, "answered", `answered by ${name}: ${optionIds.join(", ")}`);
  } else if (result.status === 409) {
    const code = result.data.code;
    setCardState(entry, code === "expired" ? "expired" : code === "cancelled" ? "cancelled" : "answered",
                 result.data.error || "already closed");
  } else {
    for (const button of entry.card.querySelectorAll("button")) button.disabled = false;
    entry.card.querySelector(".status").textContent = `not sent: ${result.data.error || result.status}`;
  }
}

function tickCountdowns() {
  const now = performance.now();
  for (const entry of prompts.values()) {
    if (entry.card.dataset.state !== "open") continue;
    const left = Math.max(0, (entry.deadline - now) / 1000);
    entry.card.querySelector(".countdown").textContent = left > 0 ? `${Math.ceil(left)} s left to answer` : "deadline passed";
    if (left <= 0 && now - entry.deadline > 5000) setCardState(entry, "expired", "expired: the agent went on with its fallback");
  }
}
setInterval(tickCountdowns, 500);

// ------------------------------------------------------------------------------------------------
// WebSocket: pushed updates, reconnects by itself
// ------------------------------------------------------------------------------------------------
let socketDelay = 500;
function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = URL_TOKEN ? `?token=${encodeURIComponent(URL_TOKEN)}` : "";
  const socket = new WebSocket(`${scheme}://${location.host}/ws${query}`);
  socket.onopen = () => { socketDelay = 500; };
  socket.onmessage = (message) => {
    const msg = JSON.parse(message.data);
    if (msg.type === "snapshot") applySnapshot(msg);
    else if (msg.type === "event") applyEvent(msg);
    else if (msg.type === "prompt") renderPrompt(msg.prompt);
    else if (msg.type === "agent") { setConnected(msg.connected); setState(msg.state); }
  };
  socket.onclose = () => {
    setConnected(false, "console offline, reconnecting…");
    setTimeout(connect, socketDelay);
    socketDelay = Math.min(socketDelay * 2, 5000);
  };
}

for (const button of document.querySelectorAll("[data-control]")) {
  button.addEventListener("click", async () => {
    const command = button.dataset.control;
    if (!window.confirm(`${command[0].toUpperCase()}${command.slice(1)} the session?`)) return;
    const result = await post(`/api/control/${command}`, {});
    $("control-msg").textContent = result.ok ? `${command} sent (state: ${result.data.state})`
                                             : `${command} failed: ${result.data.error || result.status}`;
  });
}

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll(".tab")) other.setAttribute("aria-selected", String(other === tab));
    $("view-session").hidden = tab.dataset.tab !== "session";
    $("view-explore").hidden = tab.dataset.tab !== "explore";
    if (tab.dataset.tab === "explore") loadExploreSources();
  });
}
$("atlas-img").addEventListener("load", drawTargets);
for (const id of ["target-thumb", "target-diff"]) {  // a rejected target has no images: hide the frame
  $(id).addEventListener("error", () => { $(id).parentElement.hidden = true; });
  $(id).addEventListener("load", () => { $(id).parentElement.hidden = false; });
}

// ------------------------------------------------------------------------------------------------
// Explore view
// ------------------------------------------------------------------------------------------------
const PALETTE = [[68, 119, 170], [238, 102, 119], [34, 136, 51], [204, 187, 68], [102, 204, 238],
                 [170, 51, 119], [255, 153, 0], [187, 187, 187], [0, 153, 136], [153, 68, 255],
                 [255, 255, 255], [120, 80, 40]];
const ex = { image: null, display: null, result: null, seq: 0, drawn: 0, timer: null, crystal: null };

async function loadExploreSources() {
  const response = await fetch("/api/explore/files", { credentials: "same-origin" });
  if (!response.ok) return;
  const data = await response.json();
  const select = $("ex-source");
  const current = select.value;
  select.replaceChildren(el("option", { value: "", text: "choose…" }));
  if (data.atlas) select.append(el("option", { value: "atlas:", text: "session atlas" }));
  for (const name of data.files) select.append(el("option", { value: `file:${name}`, text: name }));
  select.value = current;
}

function exploreSettings() {
  const mode = $("ex-mode").value;
  const crystal = $("ex-crystal").value;
  const settings = {
    mode, k: Number($("ex-k").value),
    grid_rows: Number($("ex-rows").value), grid_cols: Number($("ex-cols").value),
    window_px: Number($("ex-window").value), stride_px: Number($("ex-stride").value),
    crystal_cluster: crystal === "" ? null : Number(crystal),
  };
  if ($("ex-similar").checked && ex.reference) settings.reference_cell = ex.reference;
  return settings;
}

function exploreMessage(text) { $("ex-msg").textContent = text; }

async function openImage(response) {
  if (!response.ok) { exploreMessage(`cannot open: ${response.data.error || response.status}`); return; }
  ex.image = response.data;
  ex.reference = null;
  const img = new Image();
  img.src = ex.image.display_url;
  await img.decode();
  ex.display = img;
  const canvas = $("ex-canvas");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  exploreMessage(`${ex.image.name}: ${ex.image.shape[1]}×${ex.image.shape[0]} px ${ex.image.dtype}`);
  requestAnalysis();
}

$("ex-source").addEventListener("change", async () => {
  const value = $("ex-source").value;
  if (!value) return;
  const [source, ...rest] = value.split(":");
  exploreMessage("opening…");
  await openImage(await post("/api/explore/open", source === "atlas" ? { source } : { source, name: rest.join(":") }));
});

$("ex-upload").addEventListener("change", async () => {
  const file = $("ex-upload").files[0];
  if (!file) return;
  exploreMessage(`uploading ${file.name}…`);
  await openImage(await post("/api/explore/upload", file, { "X-Filename": file.name }));
});

function requestAnalysis(delayMs = 0) {
  clearTimeout(ex.timer);
  ex.timer = setTimeout(runAnalysis, delayMs);
}

async function runAnalysis() {
  if (!ex.image) return;
  const seq = ++ex.seq;
  const started = performance.now();
  const result = await post(`/api/explore/${ex.image.image_id}/analyse`, exploreSettings());
  if (seq !== ex.seq) return; // a newer request is on its way
  if (!result.ok) { exploreMessage(`cannot analyse: ${result.data.error || result.status}`); return; }
  ex.result = result.data;
  ex.labels = decode(result.data.labels_b64);
  drawExplore();
  const t = result.data.timing_ms;
  const masked = result.data.masked_fraction ? ` (${(100 * result.data.masked_fraction).toFixed(0)} % on bars)` : "";
  exploreMessage(`${result.data.grid[0]}×${result.data.grid[1]} patches${masked} · features ${result.data.features_cached ? "cached" : t.features + " ms"}` +
                 ` · clustering ${result.data.clusters_cached ? "cached" : t.clusters + " ms"} · round trip ${(performance.now() - started).toFixed(0)} ms`);
}

function decode(b64) {
  const raw = atob(b64);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function drawExplore() {
  const r = ex.result, canvas = $("ex-canvas"), ctx = canvas.getContext("2d");
  const [rows, cols] = r.grid;
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(ex.display, 0, 0, canvas.width, canvas.height);
  const overlay = document.createElement("canvas");
  overlay.width = cols; overlay.height = rows;
  const octx = overlay.getContext("2d");
  const pixels = octx.createImageData(cols, rows);
  const out = new Uint32Array(pixels.data.buffer);  // one RGBA pixel per write (little-endian: ABGR)
  const lut = new Uint32Array(256);
  const rgba = (r, g, b, a) => ((a << 24) | (b << 16) | (g << 8) | r) >>> 0;
  let values;
  if (r.similarity_b64) {
    values = decode(r.similarity_b64);
    for (let v = 0; v < 256; v++) {
      // similarity 0.5 .. 1 -> transparent .. strong (yellow to red); below 0.5 not drawn
      const strength = Math.max(0, (v - 128) / 127);
      lut[v] = rgba(255, Math.round(220 * (1 - strength)), 0, Math.round(200 * strength));
    }
  } else {
    values = ex.labels;
    // the background (largest) cluster stays faint so that the image shows through
    const background = r.clusters.reduce((a, b) => (b.n_cells > a.n_cells ? b : a)).cluster_id;
    for (let v = 0; v < 256; v++) {
      const colour = PALETTE[v % PALETTE.length];
      const alpha = v === r.crystal_cluster ? 170 : v === background ? 30 : 95;
      lut[v] = rgba(colour[0], colour[1], colour[2], alpha);
    }
    lut[255] = rgba(0, 0, 0, 150);  // masked: grid bars, black areas, annotation bands
  }
  for (let i = 0; i < values.length; i++) out[i] = lut[values[i]];
  octx.putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(overlay, 0, 0, canvas.width, canvas.height);
  const scale = ex.image.display_scale;
  ctx.lineWidth = Math.max(2, canvas.width / 400);
  ctx.strokeStyle = "#ffffff";
  for (const c of r.candidates.slice(0, 30)) {
    ctx.beginPath();
    ctx.arc(c.col_px * scale, c.row_px * scale, Math.max(6, canvas.width / 80), 0, 2 * Math.PI);
    ctx.stroke();
  }
  drawLegend();
  ex.drawn++;
  canvas.dataset.renderSeq = String(ex.drawn);
  canvas.dataset.k = String(r.k);
  canvas.dataset.crystalCluster = String(r.crystal_cluster);
}

function drawLegend() {
  const r = ex.result, legend = $("ex-legend");
  legend.replaceChildren();
  const select = $("ex-crystal");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "", text: `suggested (${r.suggested_cluster ?? "none"})` }));
  const [rows, cols] = r.grid;
  const cellW = ex.display.naturalWidth / cols, cellH = ex.display.naturalHeight / rows;
  for (const cluster of r.clusters) {
    select.append(el("option", { value: String(cluster.cluster_id), text: `cluster ${cluster.cluster_id}` }));
    const colour = PALETTE[cluster.cluster_id % PALETTE.length];
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = `rgb(${colour.join(",")})`;
    const head = el("span", {}, [swatch, `${cluster.cluster_id}: ${(100 * cluster.fraction).toFixed(1)} %`]);
    const examples = el("div", { class: "examples" });
    for (const [row, col] of cluster.example_cells) {
      const crop = el("canvas", { width: "40", height: "40" });
      let box = [col * cellW, row * cellH, cellW, cellH];
      if (r.settings_mode === "window") {  // the window around the sampled centre pixel
        const scale = ex.image.display_scale, size = r.window_px * scale;
        box = [col * r.stride_px * scale - size / 2, row * r.stride_px * scale - size / 2, size, size];
      }
      crop.getContext("2d").drawImage(ex.display, ...box, 0, 0, 40, 40);
      examples.append(crop);
    }
    const entry = el("div", { class: "entry", dataset: { cluster: String(cluster.cluster_id) },
                              "aria-selected": String(cluster.cluster_id === r.crystal_cluster) }, [head, examples]);
    entry.addEventListener("click", () => { $("ex-crystal").value = String(cluster.cluster_id); requestAnalysis(); });
    legend.append(entry);
  }
  select.value = chosen;
}

function modeChanged() {
  const grid = $("ex-mode").value === "grid";
  for (const node of document.querySelectorAll(".grid-only")) node.hidden = !grid;
  for (const node of document.querySelectorAll(".window-only")) node.hidden = grid;
  ex.reference = null;
  requestAnalysis(150);
}
$("ex-mode").addEventListener("change", modeChanged);
for (const id of ["ex-rows", "ex-cols", "ex-window", "ex-stride"]) {
  $(id).addEventListener("change", () => { ex.reference = null; requestAnalysis(150); });
}
$("ex-k").addEventListener("input", () => {
  $("ex-k-out").textContent = $("ex-k").value;
  $("ex-crystal").value = "";
  requestAnalysis(0);
});
$("ex-crystal").addEventListener("change", () => requestAnalysis(0));
$("ex-similar").addEventListener("change", () => requestAnalysis(0));
$("ex-canvas").addEventListener("click", (event) => {
  if (!ex.result) return;
  const canvas = $("ex-canvas"), box = canvas.getBoundingClientRect();
  const [rows, cols] = ex.result.grid;
  const col = Math.min(cols - 1, Math.floor(((event.clientX - box.left) / box.width) * cols));
  const row = Math.min(rows - 1, Math.floor(((event.clientY - box.top) / box.height) * rows));
  if ($("ex-similar").checked) { ex.reference = [row, col]; requestAnalysis(0); return; }
  const cluster = ex.labels[row * cols + col];
  $("ex-crystal").value = String(cluster);
  requestAnalysis(0);
});

async function markCluster(isCrystal) {
  if (!ex.result || ex.result.crystal_cluster === null) { exploreMessage("choose a cluster first"); return; }
  const settings = exploreSettings();
  delete settings.reference_cell;
  const result = await post(`/api/explore/${ex.image.image_id}/label`, {
    settings, cluster_id: ex.result.crystal_cluster, is_crystal: isCrystal,
    specimen: $("ex-specimen").value || "unknown", operator: localStorage.getItem("operator") || "console",
  });
  exploreMessage(result.ok ? `cluster ${ex.result.crystal_cluster} stored in label memory as ${isCrystal ? "crystals" : "not crystals"}`
                           : `not stored: ${result.data.error || result.status}`);
}
$("ex-mark-yes").addEventListener("click", () => markCluster(true));
$("ex-mark-no").addEventListener("click", () => markCluster(false));

connect();
