// Clearsight page behaviour: explanations fetched per card, evidence toggle, the search form's image input.
// No build step and no dependencies: the page works without this file, it only adds to it.
"use strict";

(function () {
  const EXPLAIN_IN_FLIGHT = 4; // the server bounds LLM concurrency too; this keeps the browser polite

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // Same markup as the `explanation` macro in _card.html.
  function renderExplanation(box, ex) {
    box.replaceChildren();
    box.appendChild(el("p", "ex-text", ex.text));
    const meta = el("div", "ex-meta");
    const backend = el("span", "backend" + (ex.fallback_reason ? " fallback" : ""), ex.backend);
    backend.title = ex.fallback_reason ? "fell back to offline: " + ex.fallback_reason : "written by " + ex.backend;
    meta.appendChild(backend);
    meta.appendChild(el("span", "conf-label", "confidence " + Math.round(ex.confidence * 100) + "%"));
    const conf = el("span", "confidence");
    conf.setAttribute("aria-hidden", "true");
    const bar = el("span");
    bar.style.width = Math.round(ex.confidence * 100) + "%";
    conf.appendChild(bar);
    meta.appendChild(conf);
    box.appendChild(meta);
    if ((ex.matched_concepts || []).length || (ex.mismatches || []).length) {
      const ul = el("ul", "concepts");
      const item = (cls, tag, text) => {
        const li = el("li", cls);
        li.append(el("span", "tag", tag), " " + text);
        return li;
      };
      for (const c of ex.matched_concepts || []) ul.appendChild(item("hit", "matches", c));
      for (const c of ex.mismatches || []) ul.appendChild(item("miss", "missing", c));
      box.appendChild(ul);
    }
  }

  function renderFailure(box, message) {
    box.replaceChildren(el("p", "ex-failed", message));
  }

  async function explainCard(card, query) {
    const box = card.querySelector(".explanation");
    const { kind, ...spec } = query;  // the echo is the query spec plus its kind
    const body = { ...spec, ids: [Number(card.dataset.id)], ranks: [Number(card.dataset.rank)] };
    try {
      const res = await fetch("/api/explain", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      const data = await res.json();
      if (!res.ok) throw new Error((data.error && data.error.message) || "HTTP " + res.status);
      const item = (data.explanations || [])[0];
      if (!item) throw new Error("this image is no longer in the index");
      renderExplanation(box, item.explanation);
      card.dataset.explain = "done";
    } catch (err) {
      renderFailure(box, "No explanation: " + err.message);
      card.dataset.explain = "failed";
    }
  }

  async function explainAll() {
    const data = document.getElementById("query-data");
    if (!data) return;
    const query = JSON.parse(data.textContent);
    const queue = Array.from(document.querySelectorAll('.card[data-explain="pending"]'));
    async function worker() {
      while (queue.length) await explainCard(queue.shift(), query);
    }
    await Promise.all(Array.from({ length: Math.min(EXPLAIN_IN_FLIGHT, queue.length) }, worker));
  }

  function evidenceToggle() {
    const toggle = document.getElementById("toggle-evidence");
    if (!toggle) return;
    const stored = localStorage.getItem("clearsight.evidence");
    if (stored !== null) toggle.checked = stored === "1";
    const apply = () => document.body.classList.toggle("hide-evidence", !toggle.checked);
    toggle.addEventListener("change", () => {
      localStorage.setItem("clearsight.evidence", toggle.checked ? "1" : "0");
      apply();
    });
    apply();
  }

  function searchForm() {
    const form = document.getElementById("search-form");
    if (!form) return;
    const weight = document.getElementById("weight");
    const out = document.getElementById("weight-out");
    if (weight && out) {
      const show = () => (out.textContent = Math.round(Number(weight.value) * 100) + "% text");
      weight.addEventListener("input", show);
      show();
    }
    const file = document.getElementById("image");
    const chip = document.getElementById("query-image");
    const setPreview = (f) => {
      chip.querySelectorAll("img, input[type=hidden]").forEach((n) => n.remove());
      const img = el("img");
      img.alt = "query image";
      img.src = URL.createObjectURL(f);
      chip.prepend(img);
      chip.querySelector(".qi-label").textContent = f.name;
      chip.hidden = false;
    };
    // The weight slider only means something when the query has both text and an image.
    const text = document.getElementById("q");
    const weightRow = document.getElementById("weight-row");
    const syncWeight = () => {
      if (weightRow) weightRow.hidden = !(text.value.trim() && !chip.hidden);
    };
    text.addEventListener("input", syncWeight);
    syncWeight();
    file.addEventListener("change", () => { if (file.files.length) setPreview(file.files[0]); syncWeight(); });
    // An image pasted from the clipboard becomes the query image, like a dropped one.
    document.addEventListener("paste", (e) => {
      const items = Array.from((e.clipboardData && e.clipboardData.files) || []).filter((f) => f.type.startsWith("image/"));
      if (!items.length) return;
      e.preventDefault();
      const dt = new DataTransfer();
      dt.items.add(items[0]);
      file.files = dt.files;
      setPreview(items[0]);
      syncWeight();
    });
    document.getElementById("clear-image").addEventListener("click", () => {
      file.value = "";
      chip.querySelectorAll("img, input[type=hidden]").forEach((n) => n.remove());
      chip.hidden = true;
      syncWeight();
    });
    // Dropping an image anywhere on the form sets it as the query image.
    form.addEventListener("dragover", (e) => { e.preventDefault(); form.classList.add("drop"); });
    form.addEventListener("dragleave", () => form.classList.remove("drop"));
    form.addEventListener("drop", (e) => {
      e.preventDefault();
      form.classList.remove("drop");
      if (e.dataTransfer.files.length) {
        file.files = e.dataTransfer.files;
        setPreview(file.files[0]);
        syncWeight();
      }
    });
  }

  // The Content-Security-Policy forbids style attributes in the markup, so geometry arrives as data
  // attributes and is applied here through the CSSOM (which the policy allows).
  function applyGeometry(root) {
    root.querySelectorAll("[data-ar]").forEach((e) => e.style.setProperty("--ar", e.dataset.ar));
    root.querySelectorAll("[data-width]").forEach((e) => { e.style.width = Number(e.dataset.width) + "%"; });
    root.querySelectorAll("[data-box]").forEach((e) => {
      const [left, top, width, height] = e.dataset.box.split(" ").map(Number);
      Object.assign(e.style, { left: left + "%", top: top + "%", width: width + "%", height: height + "%" });
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    applyGeometry(document);
    evidenceToggle();
    searchForm();
    explainAll();
  });
})();
