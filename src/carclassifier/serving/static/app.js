// The page: each chosen or dropped file is sent to POST /v1/predict on its own, so one bad file
// shows its error while the others show their top classes. No external code, no inline script.
"use strict";

(function () {
  const body = document.body;
  const topK = Number(body.dataset.topK || 3);
  const maxFiles = Number(body.dataset.maxFiles || 16);
  const input = document.getElementById("files");
  const dropzone = document.getElementById("dropzone");
  const results = document.getElementById("results");
  const statusLine = document.getElementById("status");
  const tta = document.getElementById("tta");

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function card(file) {
    const item = el("article", "card pending");
    item.dataset.file = file.name;
    const figure = el("figure");
    const img = el("img");
    img.alt = file.name;
    img.src = URL.createObjectURL(file);
    img.addEventListener("error", () => { img.classList.add("broken"); });
    figure.appendChild(img);
    figure.appendChild(el("figcaption", "", file.name));
    item.appendChild(figure);
    const out = el("div", "outcome", "classifying…");
    item.appendChild(out);
    results.prepend(item);
    return { item, out };
  }

  function showTop(view, prediction) {
    view.item.classList.remove("pending");
    view.item.classList.add("ok");
    view.out.textContent = "";
    const list = el("ol", "top");
    prediction.top.forEach((entry) => {
      const row = el("li", "row");
      const pct = (entry.probability * 100).toFixed(1) + "%";
      row.appendChild(el("span", "name", entry.class));
      const bar = el("span", "bar");
      const fill = el("span", "fill");
      fill.style.width = Math.max(0.5, entry.probability * 100).toFixed(1) + "%";
      bar.appendChild(fill);
      row.appendChild(bar);
      row.appendChild(el("span", "pct", pct));
      list.appendChild(row);
    });
    view.out.appendChild(list);
  }

  function showError(view, message) {
    view.item.classList.remove("pending");
    view.item.classList.add("error");
    view.out.textContent = "";
    view.out.appendChild(el("p", "error-message", message));
  }

  async function classify(file) {
    const view = card(file);
    const form = new FormData();
    form.append("file", file, file.name);
    const url = "/v1/predict?top_k=" + topK + (tta.checked ? "&tta=1" : "");
    try {
      const response = await fetch(url, { method: "POST", body: form });
      const payload = await response.json().catch(() => null);
      if (!response.ok) {
        const message = payload && payload.error ? payload.error.message : response.statusText;
        showError(view, "Not classified: " + message);
        return false;
      }
      showTop(view, payload.predictions[0]);
      return true;
    } catch (err) {
      showError(view, "The server did not answer (" + err + ")");
      return false;
    }
  }

  async function handle(fileList) {
    const files = Array.from(fileList).slice(0, maxFiles);
    if (fileList.length > maxFiles) {
      statusLine.textContent = "Only the first " + maxFiles + " files are sent.";
    }
    let ok = 0;
    for (const file of files) {
      if (await classify(file)) ok += 1;
    }
    statusLine.textContent = ok + " of " + files.length + " photo(s) classified.";
    body.dataset.done = String(Number(body.dataset.done || 0) + files.length);
  }

  input.addEventListener("change", () => {
    if (input.files.length) handle(input.files);
    input.value = "";
  });
  ["dragenter", "dragover"].forEach((name) =>
    dropzone.addEventListener(name, (event) => {
      event.preventDefault();
      dropzone.classList.add("over");
    })
  );
  ["dragleave", "drop"].forEach((name) =>
    dropzone.addEventListener(name, () => dropzone.classList.remove("over"))
  );
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) handle(event.dataTransfer.files);
  });
})();
