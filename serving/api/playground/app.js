// The genserve playground: plain JS over the public JSON APIs (no framework, no build step).
"use strict";

const CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"];  // index = class id; 10 = no class
const NO_CLASS = 10;
const SIDE = 28;
const PREVIEWS = 3;  // partial images per image of a streamed generation (OpenAI allows 0-3)
const $ = (id) => document.getElementById(id);

let models = [];        // GET /v1/models's data
let generated = [];     // the last generation's PNGs (base64)
let inputs = [];        // images to score: 28 rows of 28 integers 0..255 each

// ---- the APIs ---------------------------------------------------------------------------------------------

async function call(method, path, body) {
  const start = performance.now();
  const response = await send(method, path, body);
  if (!response.ok) throw await failure(response);
  const data = await response.json();
  data.round_trip_ms = performance.now() - start;
  return data;
}

function send(method, path, body) {
  return fetch(path, {
    method,
    headers: body === undefined ? {} : {"content-type": "application/json"},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

async function failure(response) {
  // the APIs answer errors as {"error": {message, ...}}; a proxy in between may answer anything
  const data = await response.json().catch(() => ({}));
  return errorOf(data.error, response.statusText || `HTTP ${response.status}`);
}

function errorOf(error, fallback) {
  return new Error(typeof error === "string" ? error : (error && error.message) || fallback);
}

async function* serverSentEvents(response) {
  // {event, data} per server-sent event of a streamed response. A frame ends at a blank line; a network
  // chunk may end inside a frame (or a UTF-8 character), so the unfinished tail waits for the next chunk.
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const {done, value} = await reader.read();
      buffer += decoder.decode(value, {stream: !done});
      const frames = buffer.split(/\r?\n\r?\n/);
      buffer = frames.pop();
      for (const frame of frames) {
        const event = {event: "message", data: []};
        for (const line of frame.split(/\r?\n/)) {
          const [, name, value] = line.match(/^([^:]+): ?(.*)$/) || [];  // lines starting ":" are comments
          if (name === "event") event.event = value;
          if (name === "data") event.data.push(value);
        }
        if (event.data.length) yield {event: event.event, data: JSON.parse(event.data.join("\n"))};
      }
      if (done) return;
    }
  } finally {
    // a no-op after the last chunk; when the caller stopped early (an error), it closes the connection,
    // which cancels the generation at the server
    reader.cancel().catch(() => {});
  }
}

function showError(id, error) {
  const box = $(id);
  box.hidden = error === null;
  box.textContent = error === null ? "" : String(error.message || error);
}

function pngImage(b64, label, kind) {
  const img = document.createElement("img");
  if (kind) img.dataset.kind = kind;  // a streamed generation's "preview" or "final"
  img.src = `data:image/png;base64,${b64}`;
  img.alt = label;
  img.width = img.height = 4 * SIDE;
  return img;
}

function fillClasses(select) {
  select.replaceChildren(new Option("any class", String(NO_CLASS)),
                         ...CLASSES.map((name, id) => new Option(name, String(id))));
}

function fillModels(select, operation, withAuto) {
  const able = models.filter((m) => (m.operations || ["generate"]).includes(operation));
  select.replaceChildren(...(withAuto ? [new Option("auto", "auto")] : []),
                         ...able.map((m) => new Option(`${m.id} (${m.family})`, m.id)));
}

async function loadModels() {
  models = (await call("GET", "/v1/models")).data;
  fillModels($("model"), "generate", true);
  fillModels($("interpolate-model"), "interpolate", false);
  const scorers = models.filter((m) => (m.operations || []).some((op) => op === "likelihood" || op === "reconstruct"));
  $("score-model").replaceChildren(...scorers.map((m) => new Option(
    `${m.id} (${m.operations.includes("likelihood") ? "likelihood" : "reconstruction"})`, m.id)));
  document.body.dataset.ready = "true";
}

// ---- generate ---------------------------------------------------------------------------------------------

async function generate(event) {
  // Streamed: an image's previews (diffusion's and PixelCNN's; none from one-pass models) are painted into
  // its slot as they arrive, and its final image replaces them.
  event.preventDefault();
  showError("generate-error", null);
  const body = {model: $("model").value, class_id: Number($("class").value), n: Number($("n").value),
                stream: true, partial_images: $("previews").checked ? PREVIEWS : 0};
  if ($("slo").value !== "") body.latency_slo_ms = Number($("slo").value);
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("steps").value !== "") body.steps = Number($("steps").value);  // diffusion's (or auto's) only
  if ($("best-effort").checked) body.best_effort = true;
  if ($("tier").value !== "" && body.model === "auto") body.quality = $("tier").value;  // the policy's tier
  $("generate-button").disabled = true;
  try {
    const start = performance.now();
    const response = await send("POST", "/v1/images/generations", body);
    if (!response.ok) throw await failure(response);  // refused or invalid: before any event
    const label = $("class").selectedOptions[0].text;
    const slots = Array.from({length: body.n}, () => Object.assign(document.createElement("figure"),
                                                                   {className: "slot"}));
    $("images").replaceChildren(...slots);
    const finals = [];
    let failed = null;  // an error event: the server's last; reading on to the end closes the request cleanly
    for await (const {event: type, data: d} of serverSentEvents(response)) {
      const slot = slots[d.image_index];
      if (type === "error") {
        failed = errorOf(d.error, "the generation failed");
      } else if (type === "image_generation.partial_image") {
        const caption = document.createElement("figcaption");
        caption.textContent = `preview ${d.partial_image_index + 1}/${body.partial_images} · ` +
                              `step ${d.step}/${d.steps}`;
        slot.replaceChildren(pngImage(d.b64_json, `${label} ${d.image_index + 1} (preview)`, "preview"), caption);
      } else if (type === "image_generation.completed") {
        finals[d.image_index] = d.b64_json;
        slot.replaceChildren(pngImage(d.b64_json, `${d.class_name || "any class"} ${d.image_index + 1}`, "final"));
        showServedBy(d, performance.now() - start, body.model);
      }
    }
    if (failed) throw failed;
    if (finals.filter(Boolean).length !== body.n) throw new Error("the stream ended before all the images did");
    generated = finals;
  } catch (error) {
    showError("generate-error", error);
  } finally {
    $("generate-button").disabled = false;
  }
}

function showServedBy(r, roundTripMs, asked) {
  // which model made the images and why: the same on each image's completed event
  const chosen = document.createElement("strong");
  chosen.textContent = r.model;
  $("chosen-model").replaceChildren(chosen, ` — ${r.family}, version ${r.version}, seed ${r.seed}`);
  const policy = r.policy;
  $("policy").textContent = policy
    ? [policy.reason, policy.predicted_ms !== undefined ? `predicted ${policy.predicted_ms} ms` : ""]
        .filter(Boolean).join("; ")
    : (asked === "auto" ? "auto: the server's choice" : "model named in the request");
  $("latency").textContent = `${r.latency_ms.toFixed(1)} ms at the server (replica ${r.replica_ms.toFixed(1)} ms), ` +
                             `${roundTripMs.toFixed(1)} ms round trip`;
  $("settings").textContent = JSON.stringify(r.settings);
}

// ---- interpolate ------------------------------------------------------------------------------------------

async function interpolate(event) {
  event.preventDefault();
  showError("interpolate-error", null);
  const body = {model: $("interpolate-model").value, class_id: Number($("interpolate-class").value),
                seeds: [Number($("seed-a").value), Number($("seed-b").value)], frames: Number($("frames").value)};
  try {
    const r = await call("POST", "/v1/images/interpolations", body);
    $("interpolation").replaceChildren(...r.data.map((d, i) => pngImage(d.b64_json, `frame ${i + 1}`)));
    $("interpolate-info").textContent = `${r.model}, ${r.settings.path} between seeds ${body.seeds.join(" and ")}: ` +
                                        `${r.latency_ms.toFixed(1)} ms`;
  } catch (error) {
    showError("interpolate-error", error);
  }
}

// ---- score: likelihood (flow, pixelcnn) or reconstruction (vae) -----------------------------------------

function pixelsOf(source) {
  // 28 rows of 28 gray levels from anything drawable, scaled to 28x28 (luma of RGB; exact for gray PNGs)
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = SIDE;
  const context = canvas.getContext("2d", {willReadFrequently: true});
  context.drawImage(source, 0, 0, SIDE, SIDE);
  const rgba = context.getImageData(0, 0, SIDE, SIDE).data;
  const rows = [];
  for (let y = 0; y < SIDE; y++) {
    const row = [];
    for (let x = 0; x < SIDE; x++) {
      const i = 4 * (y * SIDE + x);
      row.push(Math.round(0.299 * rgba[i] + 0.587 * rgba[i + 1] + 0.114 * rgba[i + 2]));
    }
    rows.push(row);
  }
  return rows;
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not read that image"));
    img.src = src;
  });
}

function pixelsToCanvas(rows) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = SIDE;
  const context = canvas.getContext("2d");
  const data = context.createImageData(SIDE, SIDE);
  rows.flat().forEach((v, i) => data.data.set([v, v, v, 255], 4 * i));
  context.putImageData(data, 0, 0);
  canvas.className = "thumb";
  return canvas;
}

function showInputs() {
  const body = $("scores").tBodies[0];
  body.replaceChildren(...inputs.map((rows, i) => {
    const tr = document.createElement("tr");
    tr.append(cell(String(i + 1)), cell(pixelsToCanvas(rows)), cell("—"), cell("—"), cell("—"));
    return tr;
  }));
  $("score-info").textContent = `${inputs.length} image${inputs.length === 1 ? "" : "s"} to score`;
}

function cell(content) {
  const td = document.createElement("td");
  td.append(content);
  return td;
}

async function addFiles(files) {
  showError("score-error", null);
  try {
    for (const file of files) {
      const url = URL.createObjectURL(file);
      try {
        inputs.push(pixelsOf(await loadImage(url)));
      } finally {
        URL.revokeObjectURL(url);
      }
    }
  } catch (error) {
    showError("score-error", error);
  }
  showInputs();
}

async function useGenerated() {
  showError("score-error", null);
  if (generated.length === 0) {
    showError("score-error", "generate some images first (Generate tab)");
    return;
  }
  for (const b64 of generated) inputs.push(pixelsOf(await loadImage(`data:image/png;base64,${b64}`)));
  showInputs();
}

function addNoise() {
  inputs.push(Array.from({length: SIDE}, () => Array.from({length: SIDE}, () => Math.floor(Math.random() * 256))));
  showInputs();
}

async function score(event) {
  event.preventDefault();
  showError("score-error", null);
  if (inputs.length === 0) {
    showError("score-error", "add images first: upload PNGs, use the generated images, or add noise");
    return;
  }
  const model = models.find((m) => m.id === $("score-model").value);
  const likelihood = model.operations.includes("likelihood");
  const images = inputs.slice(0, 64);
  try {
    const r = await call("POST", likelihood ? "/v1/likelihood" : "/v1/images/reconstructions",
                         {model: model.id, images});
    [...$("scores").tBodies[0].rows].forEach((tr, i) => {
      const d = r.data[i];
      if (!d) return;
      tr.cells[2].textContent = likelihood ? d.bits_per_dim.toFixed(3) : "—";
      tr.cells[3].textContent = (likelihood ? d.anomaly_score : d.reconstruction_mse).toFixed(likelihood ? 3 : 4);
      tr.cells[4].replaceChildren(likelihood ? "—" : pngImage(d.b64_json, `reconstruction ${i + 1}`));
    });
    $("score-info").textContent = `${r.model} (${r.family}): ${images.length} image${images.length === 1 ? "" : "s"} ` +
                                  `in ${r.latency_ms.toFixed(1)} ms`;
  } catch (error) {
    showError("score-error", error);
  }
}

// ---- tabs and wiring --------------------------------------------------------------------------------------

function selectTab(tab) {
  for (const other of document.querySelectorAll("[role=tab]")) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  fillClasses($("class"));
  fillClasses($("interpolate-class"));
  for (const tab of document.querySelectorAll("[role=tab]")) tab.addEventListener("click", () => selectTab(tab));
  $("generate-form").addEventListener("submit", generate);
  $("interpolate-form").addEventListener("submit", interpolate);
  $("score-form").addEventListener("submit", score);
  $("upload").addEventListener("change", (event) => addFiles(event.target.files));
  $("use-generated").addEventListener("click", useGenerated);
  $("use-noise").addEventListener("click", addNoise);
  loadModels().catch((error) => showError("generate-error", error));
});
