// Clearsight page behaviour: explanations fetched a page of cards per request (visible cards first),
// evidence toggle, the search form's image input.
// No build step and no dependencies: the page works without this file, it only adds to it.
"use strict";

(function () {
  // Cards per /api/explain request: the server explains them in one LLM call (its page size is 12), and a
  // page of 96 cards is 8 requests, not 96 against the per-client limit.
  const EXPLAIN_BATCH = 12;
  const EXPLAIN_IN_FLIGHT = 2;
  // How long the server may hold a request before answering the rest "pending" (queued for the LLM's
  // rate budget), so a waiting card can say so; it is asked again after about the wait it was given.
  const EXPLAIN_WAIT_S = 20;

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
    const unsupported = ex.unsupported_concepts || [];
    if ((ex.matched_concepts || []).length || (ex.mismatches || []).length || unsupported.length) {
      const ul = el("ul", "concepts");
      const item = (cls, tag, text) => {
        const li = el("li", cls);
        li.append(el("span", "tag", tag), " " + text);
        return li;
      };
      for (const c of ex.matched_concepts || []) ul.appendChild(item("hit", "matches", c));
      for (const c of ex.mismatches || []) ul.appendChild(item("miss", "missing", c));
      for (const c of unsupported) ul.appendChild(item("unsupported", "claimed, not in captions", c));
      box.appendChild(ul);
    }
    if (unsupported.length) {
      const n = unsupported.length;
      box.appendChild(el("p", "ex-unsupported", n + (n === 1 ? " claimed match is" : " claimed matches are") +
        " not supported by the captions or regions"));
    }
  }

  function renderFailure(box, message) {
    box.replaceChildren(el("p", "ex-failed", message));
  }

  function renderQueued(box, seconds) {
    const text = seconds === null || seconds === undefined
      ? "explanation being written…"
      : "explanation queued: LLM rate limit, about " + Math.max(1, Math.round(seconds)) + " s";
    box.replaceChildren(el("p", "ex-queued", text));
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // One request for a batch of cards of the same query; cards still pending are asked again later.
  async function explainBatch(cards, query) {
    const byId = new Map(cards.map((c) => [Number(c.dataset.id), c]));
    const { kind, ...spec } = query;  // the echo is the query spec plus its kind
    const body = {
      ...spec, wait_s: EXPLAIN_WAIT_S,
      ids: cards.map((c) => Number(c.dataset.id)), ranks: cards.map((c) => Number(c.dataset.rank)),
    };
    let retryIn = 0;
    try {
      const res = await fetch("/api/explain", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      const data = await res.json();
      if (!res.ok) throw new Error((data.error && data.error.message) || "HTTP " + res.status);
      const later = [];
      for (const item of data.explanations || []) {
        const card = byId.get(item.id);
        if (!card) continue;
        byId.delete(item.id);
        const box = card.querySelector(".explanation");
        if (item.pending) {
          renderQueued(box, item.queued_s);
          later.push(card);
          retryIn = Math.max(retryIn, Math.min(EXPLAIN_WAIT_S, item.queued_s || 2));
        } else {
          renderExplanation(box, item.explanation);
          card.dataset.explain = "done";
        }
      }
      for (const card of byId.values()) {
        renderFailure(card.querySelector(".explanation"), "No explanation: this image is no longer in the index");
        card.dataset.explain = "failed";
      }
      return later.length ? { later, retryIn } : null;
    } catch (err) {
      for (const card of byId.values()) {
        renderFailure(card.querySelector(".explanation"), "No explanation: " + err.message);
        card.dataset.explain = "failed";
      }
      return null;
    }
  }

  function visibleFirst(cards) {
    const seen = (c) => {
      const r = c.getBoundingClientRect();
      return r.bottom > 0 && r.top < window.innerHeight;
    };
    return cards.filter(seen).concat(cards.filter((c) => !seen(c)));
  }

  async function explainAll() {
    const data = document.getElementById("query-data");
    if (!data) return;
    const query = JSON.parse(data.textContent);
    // A card whose caption is still being generated is explained by captionAll() once it has it.
    const cards = visibleFirst(
      Array.from(document.querySelectorAll('.card[data-explain="pending"]:not([data-caption="pending"])'))
    );
    const queue = [];
    for (let i = 0; i < cards.length; i += EXPLAIN_BATCH) queue.push(cards.slice(i, i + EXPLAIN_BATCH));
    async function worker() {
      while (queue.length) {
        const result = await explainBatch(queue.shift(), query);
        if (result) {
          await sleep(Math.max(1, result.retryIn) * 1000);
          queue.push(result.later);
        }
      }
    }
    await Promise.all(Array.from({ length: Math.min(EXPLAIN_IN_FLIGHT, queue.length) }, worker));
  }

  // Captions the server is still generating: one held request per page asks for every pending card,
  // visible ones first, and answers as soon as any is ready; each card is explained once its caption
  // is there, so the caption grounds the explanation.
  const CAPTION_WAIT_S = 20;

  function onScreen(card) {
    const r = card.getBoundingClientRect();
    return r.bottom > 0 && r.top < window.innerHeight;
  }

  // Same markup as the caption paragraph in _card.html.
  function renderCaption(card, item) {
    const p = card.querySelector(".caption");
    if (!p) return;
    if (!item.caption) {
      p.className = "caption none";
      p.textContent = "No caption";
      return;
    }
    const source = item.caption_source || "";
    p.className = "caption";
    p.replaceChildren(item.caption + " ", el("span", "src", source.startsWith("generated:") ? "generated" : source));
    const img = card.querySelector(".stage img");
    if (img && img.alt.startsWith("result ")) img.alt = item.caption;
  }

  function renderCaptionProgress(progress) {
    const line = document.getElementById("caption-progress");
    if (line && progress && progress.enabled) line.textContent = "captions " + progress.done + "/" + progress.total;
  }

  function captionDone(card, item) {
    renderCaption(card, item || {});
    card.dataset.caption = "done";
  }

  // Cards whose captions came together are explained together, in batches, as explainAll() does.
  async function explainCards(cards, query) {
    const pending = cards.filter((c) => c.dataset.explain === "pending");
    for (let i = 0; i < pending.length; i += EXPLAIN_BATCH) {
      let batch = pending.slice(i, i + EXPLAIN_BATCH);
      while (batch.length) {
        const result = await explainBatch(batch, query);
        if (!result) break;
        await sleep(Math.max(1, result.retryIn) * 1000);
        batch = result.later;
      }
    }
  }

  async function captionAll() {
    const data = document.getElementById("query-data");
    let cards = Array.from(document.querySelectorAll('.card[data-caption="pending"]'));
    if (!data || !cards.length) return;
    const query = JSON.parse(data.textContent);
    let failures = 0;
    while (cards.length && failures < 3) {
      cards.sort((a, b) => Number(onScreen(b)) - Number(onScreen(a)));
      try {
        const res = await fetch("/api/captions", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ ids: cards.map((c) => Number(c.dataset.id)), wait_s: CAPTION_WAIT_S }),
        });
        const body = await res.json();
        if (!res.ok) throw new Error((body.error && body.error.message) || "HTTP " + res.status);
        renderCaptionProgress(body.progress);
        const byId = new Map((body.captions || []).map((c) => [c.id, c]));
        const still = [];
        const done = [];
        for (const card of cards) {
          const item = byId.get(Number(card.dataset.id));
          if (item && item.pending) still.push(card);
          else {
            captionDone(card, item);
            done.push(card);
          }
        }
        explainCards(done, query); // not awaited: the next captions are asked for meanwhile
        cards = still;
      } catch (err) {
        failures += 1;
        await new Promise((resolve) => setTimeout(resolve, 2000));
      }
    }
    for (const card of cards) captionDone(card, null);
    explainCards(cards, query); // explained without a caption, not never
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

  // The detail view of a loopback server shows the file's path in a read-only field (select it and copy
  // by hand anywhere); where the Clipboard API is there (secure contexts: localhost is one), a button
  // copies it, and a refused copy falls back to selecting the field.
  function copyPath() {
    const field = document.getElementById("file-path");
    const button = document.getElementById("copy-path");
    if (!field || !button) return;
    const note = document.getElementById("copy-note");
    const say = (text) => { if (note) note.textContent = text; };
    const selectField = () => { field.focus(); field.select(); };
    field.addEventListener("focus", () => field.select());
    if (!(navigator.clipboard && window.isSecureContext)) return;
    button.hidden = false;
    button.addEventListener("click", () => {
      navigator.clipboard.writeText(field.value).then(
        () => say("Copied."),
        () => { selectField(); say("Copy was refused: the path is selected, press Ctrl+C (⌘C on a Mac)."); },
      );
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
    captionAll();
    copyPath();
  });
})();
