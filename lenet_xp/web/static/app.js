// lenet_xp.serve: draw a digit (mouse, pen or finger) or open / drop / paste a photo; the
// picture goes to POST /predict as a PNG (or the photo's own bytes), prepared on the server
// exactly as `python -m lenet_xp.predict` prepares a file, and the answer is drawn here:
// the ten probabilities, the picture the network sees, the feature maps of its layers.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const pad = $("pad");
  const ctx = canvas.getContext("2d");
  const status = $("status");
  const body = document.body;

  /** Internal pixels of the drawing canvas (its CSS size is set by the page's width). */
  const SIZE = 560;
  /** Pen width: a digit drawn across most of the canvas gets MNIST's stroke proportions. */
  const LINE = SIZE / 14;
  /** Wait this long after the last stroke change before asking (ms) ... */
  const DEBOUNCE_MS = 120;
  /** ... but while the pen keeps moving, ask at least this often (ms). */
  const MAX_WAIT_MS = 350;

  canvas.width = SIZE;
  canvas.height = SIZE;

  let empty = true; // nothing drawn since the last clear
  let photoShown = false; // the canvas shows an opened photo, not strokes
  let lastAnswer = null;
  const pens = new Map(); // pointerId -> last point of its stroke

  // -- the drawing canvas -----------------------------------------------------------------
  function clearCanvas() {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, SIZE, SIZE);
    empty = true;
    photoShown = false;
    pad.classList.remove("used");
  }

  function point(event) {
    const rect = canvas.getBoundingClientRect();
    const scale = SIZE / canvas.clientWidth;
    return {
      x: (event.clientX - rect.left - canvas.clientLeft) * scale,
      y: (event.clientY - rect.top - canvas.clientTop) * scale,
    };
  }

  /** A dot where the pen touched down (a zero-length line draws nothing on a canvas). */
  function dot(at) {
    ctx.fillStyle = "#000";
    ctx.beginPath();
    ctx.arc(at.x, at.y, LINE / 2, 0, 2 * Math.PI);
    ctx.fill();
  }

  function segment(from, to) {
    ctx.strokeStyle = "#000";
    ctx.lineWidth = LINE;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }

  function started() {
    if (photoShown) clearCanvas(); // drawing after a photo starts a fresh page
    empty = false;
    pad.classList.add("used");
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    event.preventDefault();
    started();
    canvas.setPointerCapture(event.pointerId);
    const p = point(event);
    pens.set(event.pointerId, p);
    dot(p);
    changed();
  });

  canvas.addEventListener("pointermove", (event) => {
    let last = pens.get(event.pointerId);
    if (!last) return;
    event.preventDefault();
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) {
      const p = point(e);
      segment(last, p);
      last = p;
    }
    pens.set(event.pointerId, last);
    changed();
  });

  for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
    canvas.addEventListener(type, (event) => {
      if (pens.delete(event.pointerId)) changed(true);
    });
  }

  $("clear").addEventListener("click", reset);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") reset();
  });

  function reset() {
    clearTimeout(timer);
    timer = null;
    again = false;
    clearCanvas();
    sequence += 1; // answers still on their way are for a drawing that is gone
    showNothing();
    updateBusy();
  }

  // -- asking the server: debounced while drawing, one request in flight --------------------
  let timer = null;
  let firstChange = 0; // when the changes not yet sent began
  let encoding = false; // the canvas is being made into a PNG
  let inFlight = false;
  let again = false; // the drawing changed while a request was in flight
  let sequence = 0; // answers to anything but the latest request are dropped

  /** ``<body data-busy="1">`` while an answer for the latest drawing is still to come. */
  function updateBusy() {
    body.dataset.busy = timer !== null || encoding || inFlight ? "1" : "0";
  }

  function changed(now = false) {
    const t = performance.now();
    if (!firstChange) firstChange = t;
    clearTimeout(timer);
    const wait = now || t - firstChange >= MAX_WAIT_MS ? 0 : DEBOUNCE_MS;
    timer = setTimeout(sendDrawing, wait);
    updateBusy();
  }

  function sendDrawing() {
    timer = null;
    firstChange = 0;
    if (inFlight) again = true;
    else if (!empty && !photoShown) {
      encoding = true;
      canvas.toBlob((blob) => {
        encoding = false;
        ask(blob, "image/png");
      }, "image/png");
    }
    updateBusy();
  }

  async function ask(data, type) {
    const mine = ++sequence;
    inFlight = true;
    updateBusy();
    try {
      let response;
      let answer;
      try {
        response = await fetch("/predict", {
          method: "POST",
          headers: { "Content-Type": type || "application/octet-stream" },
          body: data,
        });
        answer = await response.json();
      } catch {
        answer = {
          error: response
            ? `the server answered ${response.status} ${response.statusText}`
            : "cannot reach the server: is python -m lenet_xp.serve still running?",
        };
      }
      if (mine !== sequence) return;
      if (response && response.ok) show(answer);
      else showError(answer.error || `the server answered ${response.status}`);
    } finally {
      inFlight = false;
      if (again) {
        again = false;
        sendDrawing();
      }
      updateBusy();
    }
  }

  // -- photos: the file picker, drag and drop, paste -------------------------------------
  function openPhoto(file) {
    if (!file) return;
    clearTimeout(timer);
    timer = null;
    again = false;
    const url = URL.createObjectURL(file);
    const image = new Image();
    image.onload = () => {
      clearCanvas();
      const s = Math.min(SIZE / image.naturalWidth, SIZE / image.naturalHeight);
      const w = image.naturalWidth * s;
      const h = image.naturalHeight * s;
      ctx.drawImage(image, (SIZE - w) / 2, (SIZE - h) / 2, w, h);
      URL.revokeObjectURL(url);
      photoShown = true;
      empty = false;
      pad.classList.add("used");
    };
    image.onerror = () => URL.revokeObjectURL(url); // the server says what is wrong with it
    image.src = url;
    setStatus(`reading ${file.name || "the picture"}…`);
    ask(file, file.type);
  }

  $("file").addEventListener("change", (event) => {
    openPhoto(event.target.files[0]);
    event.target.value = ""; // the same file again is a new choice
  });

  const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    pad.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.target === document.documentElement || event.target === canvas) {
      pad.classList.remove("dragging");
    }
  });
  document.addEventListener("drop", (event) => {
    pad.classList.remove("dragging");
    if (!hasFiles(event)) return;
    event.preventDefault();
    openPhoto(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...(event.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
    if (item) openPhoto(item.getAsFile());
  });

  // -- the answer -----------------------------------------------------------------------
  const bars = $("bars");
  const rows = [];
  for (let d = 0; d < 10; d++) {
    const li = document.createElement("li");
    li.innerHTML =
      `<span class="label">${d}</span>` +
      '<span class="track"><span class="fill"></span></span><span class="value"></span>';
    bars.append(li);
    rows.push({ li, fill: li.querySelector(".fill"), value: li.querySelector(".value") });
  }

  function setStatus(text, error = false) {
    status.textContent = text;
    status.classList.toggle("error", error);
  }

  function showNothing() {
    lastAnswer = null;
    body.dataset.digit = "";
    $("digit").textContent = "–";
    $("confidence").textContent = "";
    for (const row of rows) {
      row.li.classList.remove("top");
      row.fill.style.width = "0";
      row.value.textContent = "";
    }
    const seen = $("seen").getContext("2d");
    seen.clearRect(0, 0, seen.canvas.width, seen.canvas.height);
    $("maps").replaceChildren();
    delete $("maps").dataset.key;
    setStatus("");
  }

  function showError(message) {
    showNothing();
    body.dataset.digit = "error";
    setStatus(message, true);
  }

  function show(answer) {
    lastAnswer = answer;
    const { digit, probabilities } = answer;
    $("digit").textContent = String(digit);
    $("confidence").textContent = `probability ${(100 * answer.probability).toFixed(1)} %`;
    rows.forEach((row, d) => {
      const p = probabilities[d];
      row.li.classList.toggle("top", d === digit);
      row.fill.style.width = `${(100 * p).toFixed(1)}%`;
      row.value.textContent = p >= 0.001 ? `${(100 * p).toFixed(1)} %` : "0 %";
    });
    drawSeen(answer.input);
    drawMaps(answer.feature_maps || []);
    setStatus("");
    body.dataset.digit = String(digit);
  }

  function drawSeen(picture) {
    const n = picture.length;
    const seen = $("seen");
    if (seen.width !== n) {
      seen.width = seen.height = n;
      $("seen-size").textContent = `${n}×${n}`;
    }
    const data = new ImageData(n, n);
    for (let y = 0; y < n; y++) {
      for (let x = 0; x < n; x++) {
        const v = Math.round(255 * picture[y][x]);
        const i = 4 * (y * n + x);
        data.data[i] = data.data[i + 1] = data.data[i + 2] = v;
        data.data[i + 3] = 255;
      }
    }
    seen.getContext("2d").putImageData(data, 0, 0);
  }

  // -- feature maps: one small canvas per map, coloured by sign, scaled per layer ---------
  const allLayers = $("all-layers");
  allLayers.addEventListener("change", () => lastAnswer && drawMaps(lastAnswer.feature_maps || []));

  function drawMaps(layers) {
    const shown = layers.filter((l) => allLayers.checked || /conv/i.test(l.type));
    const box = $("maps");
    const key = shown.map((l) => `${l.layer}:${l.shape.join("x")}`).join(",");
    if (box.dataset.key !== key) {
      box.replaceChildren(...shown.map(layerBlock));
      box.dataset.key = key;
    }
    shown.forEach((layer, i) => paintLayer(layer, box.children[i]));
  }

  function layerBlock(layer) {
    const [c, h, w] = layer.shape;
    const div = document.createElement("div");
    div.className = h * w <= 4 ? "layer dots" : c > 8 ? "layer small" : "layer";
    const title = document.createElement("h3");
    title.textContent = `${layer.layer} `;
    const what = document.createElement("span");
    what.className = "muted";
    what.textContent = `${layer.type} · ${c} maps of ${h}×${w}`;
    title.append(what);
    const grid = document.createElement("div");
    grid.className = "grid";
    for (let k = 0; k < c; k++) {
      const map = document.createElement("canvas");
      map.width = w;
      map.height = h;
      map.title = `${layer.layer} map ${k}`;
      grid.append(map);
    }
    div.append(title, grid);
    return div;
  }

  function paintLayer(layer, div) {
    let top = 1e-6;
    for (const map of layer.maps) for (const row of map) for (const v of row) top = Math.max(top, Math.abs(v));
    const canvases = div.querySelectorAll("canvas");
    layer.maps.forEach((map, k) => {
      const h = map.length;
      const w = map[0].length;
      const data = new ImageData(w, h);
      for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
          const v = map[y][x] / top;
          const t = Math.sqrt(Math.abs(v)); // lifts the faint parts
          const [r, g, b] = v >= 0 ? [255, 140, 40] : [50, 130, 255];
          const i = 4 * (y * w + x);
          data.data[i] = r * t;
          data.data[i + 1] = g * t;
          data.data[i + 2] = b * t;
          data.data[i + 3] = 255;
        }
      }
      canvases[k].getContext("2d").putImageData(data, 0, 0);
    });
  }

  // -- start ------------------------------------------------------------------------------
  clearCanvas();
  showNothing();
  updateBusy();
  fetch("/info")
    .then((r) => r.json())
    .then((info) => {
      const epoch = info.epoch == null ? "" : ` · epoch ${info.epoch}`;
      const params = Number(info.parameters).toLocaleString("en");
      $("model").textContent = `${info.arch}${epoch} · ${params} parameters · on ${info.device}`;
      body.dataset.ready = "1";
    })
    .catch(() => setStatus("cannot reach the server: is python -m lenet_xp.serve running?", true));
})();
