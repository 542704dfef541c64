// The search page of the HTTP/JSON front: pick or drop a photo, see every item found boxed on it,
// select one for its matches, draw a region to search only that. Vanilla JS, no build step, nothing
// fetched from outside this server. The API is the front's own (proto3 JSON mapping):
//   POST /v1/search (multipart: the file as "image", the rest of MultiProductSearchRequest as "request")
//   GET  /v1/products/{id}/images/{imageId}/thumbnail?alt=media&category=...
//   GET  /v1/stats
"use strict";

(() => {
  const TOKEN_KEY = "mps.token";
  const KIND_NAMES = {
    SIGNATURE_KIND_UNSPECIFIED: "the server's default signature",
    SIGNATURE_KIND_DEEP: "deep signatures",
    SIGNATURE_KIND_BOW: "colour-texture signatures",
    SIGNATURE_KIND_BLCF: "local convolutional features",
  };
  const SOURCE_NAMES = {
    ITEM_SOURCE_DETECTOR: "detector",
    ITEM_SOURCE_OBJECTNESS: "object",
    ITEM_SOURCE_SALIENT: "salient object",
    ITEM_SOURCE_SEGMENT: "segment",
    ITEM_SOURCE_WHOLE_IMAGE: "whole photo",
    ITEM_SOURCE_USER_REGION: "your region",
  };
  // Dark enough for white text (contrast >= 4.5), far enough apart to tell items apart.
  const COLOURS = ["#1f5fbf", "#c0392b", "#1b7a3a", "#8e44ad", "#a65400", "#00796b", "#ad1457", "#37474f"];
  const MIN_DRAG_PX = 6;

  const $ = (id) => document.getElementById(id);
  const el = {
    catalogue: $("catalogue"),
    categories: $("categories"),
    dropzone: $("dropzone"),
    file: $("file"),
    kind: $("kind"),
    topk: $("topk"),
    regionCategory: $("region-category"),
    draw: $("draw"),
    whole: $("whole"),
    auth: $("auth"),
    authWhy: $("auth-why"),
    authCancel: $("auth-cancel"),
    token: $("token"),
    status: $("status"),
    notice: $("notice"),
    error: $("error"),
    failed: $("failed"),
    stage: $("stage"),
    photo: $("photo"),
    overlay: $("overlay"),
    rubber: $("rubber"),
    drawHint: $("draw-hint"),
    items: $("items"),
    matches: $("matches"),
  };

  const state = {
    file: null, // the photo (a File or Blob)
    photoUrl: "",
    response: null, // the last MultiProductSearchResponse
    request: null, // the request it answered
    selected: -1,
    regions: null, // the regions of the last search (null: the whole photo)
    seq: 0, // newest search; older answers are dropped
    controller: null,
    drawing: false,
    drag: null,
    thumbUrls: [],
    retry: null, // what to run again once a token is given
  };

  // --- helpers --------------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "style") Object.assign(node.style, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined && child !== false) {
        node.append(child instanceof Node ? child : document.createTextNode(String(child)));
      }
    }
    return node;
  }

  const num = (value) => Number(value ?? 0) || 0;
  const score3 = (value) => num(value).toFixed(3);
  const colourOf = (index) => COLOURS[index % COLOURS.length];

  function boxOf(item) {
    const b = item.box || {};
    return { x0: num(b.xMin), y0: num(b.yMin), x1: num(b.xMax), y1: num(b.yMax) };
  }

  function itemName(item) {
    if (item.category && item.className) return `${item.category} (${item.className})`;
    if (item.category) return item.category;
    if (item.className) return item.className;
    if (item.source === "ITEM_SOURCE_USER_REGION") return "region, any category";
    return "no clear category";
  }

  function imageSize() {
    const r = state.response;
    if (r && num(r.imageWidth) > 0 && num(r.imageHeight) > 0) return [num(r.imageWidth), num(r.imageHeight)];
    return [el.photo.naturalWidth || 1, el.photo.naturalHeight || 1];
  }

  // --- the API ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.set("Authorization", `Bearer ${token}`);
    const response = await fetch(path, { ...options, headers });
    if (response.ok) return response;
    let message = `${response.status} ${response.statusText}`.trim();
    let body = null;
    try {
      body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) {
      /* not JSON: keep the HTTP status */
    }
    throw new ApiError(response.status, message, body);
  }

  function needsToken(error, retry) {
    if (!(error instanceof ApiError) || (error.status !== 401 && error.status !== 403)) return false;
    const had = Boolean(sessionStorage.getItem(TOKEN_KEY));
    el.authWhy.textContent = had
      ? `The gateway refused the token (${error.message}). Enter another one.`
      : `This gateway needs an access token (${error.message}).`;
    state.retry = retry;
    el.auth.hidden = false;
    el.token.value = "";
    el.token.focus();
    return true;
  }

  el.auth.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = el.token.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    el.auth.hidden = true;
    const retry = state.retry;
    state.retry = null;
    loadCatalogue();
    if (retry) retry();
  });
  el.authCancel.addEventListener("click", () => {
    el.auth.hidden = true;
    state.retry = null;
  });

  // --- messages -------------------------------------------------------------------------------

  function setStatus(stateName, text) {
    el.status.dataset.state = stateName;
    el.status.textContent = text;
  }

  function finished(stateName, text) {
    setStatus(stateName, text);
    el.status.dataset.searches = String(num(el.status.dataset.searches) + 1);
  }

  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = !text;
  }

  function showNotice(lines) {
    el.notice.replaceChildren(...lines.map((line) => h("li", { text: line })));
    el.notice.hidden = lines.length === 0;
  }

  function showFailed(failed) {
    if (!failed || failed.length === 0) {
      el.failed.hidden = true;
      el.failed.replaceChildren();
      return;
    }
    el.failed.replaceChildren(
      h("span", {
        text: `${failed.length === 1 ? "A category" : `${failed.length} categories`} could not be searched; the results leave them out:`,
      }),
      h(
        "ul",
        {},
        failed.map((f) =>
          h("li", {
            text: `${f.category ? `'${f.category}'` : "categories"}${f.backend ? ` at ${f.backend}` : ""}: ${f.reason || f.code}${f.code ? ` (${f.code})` : ""}`,
          }),
        ),
      ),
    );
    el.failed.hidden = false;
  }

  // --- the catalogue --------------------------------------------------------------------------

  async function loadCatalogue() {
    try {
      const stats = await (await api("/v1/stats")).json();
      const categories = (stats.categories || []).filter((c) => num(c.products) > 0);
      el.categories.replaceChildren(...categories.map((c) => h("option", { value: c.category })));
      if (categories.length === 0) {
        el.catalogue.textContent = "The catalogue is empty: index products first (e.g. mps import), or every search finds nothing.";
        el.catalogue.classList.add("empty");
        return;
      }
      el.catalogue.classList.remove("empty");
      el.catalogue.textContent =
        "Catalogue: " +
        categories
          .map((c) => `${c.category} (${num(c.products)} product${num(c.products) === 1 ? "" : "s"})`)
          .join(", ");
    } catch (error) {
      if (needsToken(error, null)) {
        el.catalogue.textContent = "Catalogue: give an access token to see it.";
        return;
      }
      el.catalogue.textContent = `Catalogue: could not be read (${error.message}).`;
    }
  }

  // --- choosing a photo ---------------------------------------------------------------------

  function usePhoto(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${file.name || "That file"} is not an image (${file.type}): choose a photo.`);
      return;
    }
    if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
    state.file = file;
    state.photoUrl = URL.createObjectURL(file);
    state.response = null;
    state.request = null;
    state.regions = null;
    el.stage.classList.remove("no-preview");
    el.stage.style.aspectRatio = "";
    el.photo.alt = `The photo searched: ${file.name || "pasted image"}`;
    el.photo.src = state.photoUrl;
    el.stage.hidden = false;
    el.draw.disabled = false;
    clearResults();
    search(null);
  }

  el.file.addEventListener("change", () => {
    if (el.file.files && el.file.files[0]) usePhoto(el.file.files[0]);
  });

  // Dropping anywhere on the page works; the drop zone shows it is ready.
  let dragDepth = 0;
  const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    dragDepth += 1;
    el.dropzone.classList.add("over");
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) el.dropzone.classList.remove("over");
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    el.dropzone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) usePhoto(file);
  });
  document.addEventListener("paste", (event) => {
    const file = Array.from(event.clipboardData?.files || []).find((f) => f.type.startsWith("image/"));
    if (file) usePhoto(file);
  });

  el.photo.addEventListener("error", () => {
    if (!state.file) return;
    // A format the browser cannot show (e.g. TIFF): the server may still read it; boxes go on a
    // placeholder of the photo's proportions once the answer says them.
    el.stage.classList.add("no-preview");
    layout();
  });
  el.photo.addEventListener("load", () => layout());

  // --- searching ------------------------------------------------------------------------------

  function topK() {
    const value = Math.round(num(el.topk.value));
    return value >= 1 ? value : 5;
  }

  async function search(regions) {
    if (!state.file) return;
    const seq = ++state.seq;
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    const request = { topK: topK(), signatureKind: el.kind.value };
    if (regions) request.regions = regions;
    const form = new FormData();
    form.append("image", state.file, state.file.name || "photo");
    form.append("request", JSON.stringify(request));
    showError("");
    el.auth.hidden = true;
    setStatus("searching", regions ? "Searching the region…" : "Searching the photo…");
    el.status.dataset.kind = request.signatureKind;
    try {
      const response = await api("/v1/search", { method: "POST", body: form, signal: controller.signal });
      const data = await response.json();
      if (seq !== state.seq) return;
      state.regions = regions;
      render(data, request);
    } catch (error) {
      if (seq !== state.seq || error.name === "AbortError") return;
      if (needsToken(error, () => search(regions))) {
        finished("error", "The search needs an access token.");
        return;
      }
      showError(error.message || String(error));
      finished("error", "The search failed.");
    } finally {
      if (state.controller === controller) state.controller = null;
      if (seq === state.seq) el.rubber.hidden = true;
    }
  }

  el.kind.addEventListener("change", () => search(state.regions));
  el.topk.addEventListener("change", () => {
    if (num(el.topk.value) >= 1) search(state.regions); // not while the field is being retyped
  });
  el.whole.addEventListener("click", () => search(null));

  // --- results --------------------------------------------------------------------------------

  function clearResults() {
    el.overlay.querySelectorAll(".box").forEach((node) => node.remove());
    el.overlay.classList.remove("has-selection");
    el.items.replaceChildren();
    showNotice([]);
    showFailed([]);
    state.selected = -1;
    renderMatches();
  }

  function render(data, request) {
    clearResults();
    state.response = data;
    state.request = request;
    const items = data.items || [];
    const [width, height] = imageSize();
    if (el.stage.classList.contains("no-preview")) el.stage.style.aspectRatio = `${width} / ${height}`;

    // Larger boxes first, so smaller ones lie on top and stay clickable.
    const order = items.map((_, i) => i);
    const area = (i) => {
      const b = boxOf(items[i]);
      return (b.x1 - b.x0) * (b.y1 - b.y0);
    };
    order.sort((a, b) => area(b) - area(a));
    for (const i of order) el.overlay.append(boxElement(items[i], i, width, height));
    el.overlay.append(el.rubber);
    el.rubber.hidden = true;
    items.forEach((item, i) => el.items.append(listEntry(item, i)));
    layout();

    showFailed(data.failedCategories);
    const found = items.filter((item) => (item.matches || []).length > 0).length;
    const kind = KIND_NAMES[request.signatureKind] || request.signatureKind;
    const ms = num(data.timings && data.timings.totalMs);
    const took = ms > 0 ? ` in ${Math.round(ms)} ms` : "";
    const where = request.regions ? "in the region" : "in this photo";
    if (found === 0) {
      finished("done", `No products found ${where} (searched with ${kind}${took}).`);
      showNotice(
        items
          .filter((item) => item.warning)
          .map((item) => `Item ${items.indexOf(item) + 1} (${itemName(item)}): ${item.warning}`),
      );
    } else {
      finished(
        "done",
        `${items.length} item${items.length === 1 ? "" : "s"} found ${where}, ${found} with matches ` +
          `(${kind}${took}). Select one to see its matches.`,
      );
    }
    el.whole.disabled = !request.regions;
    if (request.regions && items.length > 0) select(0, false);
  }

  function labelText(item) {
    const best = (item.matches || [])[0];
    const what = itemName(item);
    return best ? `${what} · ${best.productId} ${score3(best.score)}` : `${what} · no match`;
  }

  function boxElement(item, index, width, height) {
    const b = boxOf(item);
    const pct = (value, total) => `${Math.min(100, Math.max(0, (value / total) * 100))}%`;
    const best = (item.matches || [])[0];
    const button = h(
      "button",
      {
        type: "button",
        class: `box${item.source === "ITEM_SOURCE_WHOLE_IMAGE" ? " whole" : ""}${b.x0 / width > 0.55 ? " label-right" : ""}`,
        "aria-label": `Item ${index + 1}: ${labelText(item)}${item.warning ? ` (warning: ${item.warning})` : ""}`,
        "aria-pressed": "false",
        dataset: {
          testid: "item-box",
          index: String(index),
          category: item.category || "",
          className: item.className || "",
          source: item.source || "",
          product: best ? best.productId : "",
        },
        style: {
          left: pct(b.x0, width),
          top: pct(b.y0, height),
          width: pct(b.x1 - b.x0, width),
          height: pct(b.y1 - b.y0, height),
        },
      },
      h(
        "span",
        { class: "box-label", dataset: { testid: "item-label" }, "aria-hidden": "true" },
        h("span", { class: "box-number", text: String(index + 1) }),
        labelText(item),
        item.warning ? " ⚠" : "",
      ),
    );
    button.style.setProperty("--c", colourOf(index));
    button.addEventListener("click", () => select(index, true));
    return button;
  }

  function listEntry(item, index) {
    const best = (item.matches || [])[0];
    const button = h(
      "button",
      {
        type: "button",
        class: "item-entry",
        "aria-pressed": "false",
        dataset: { testid: "item-entry", index: String(index), category: item.category || "" },
      },
      h("span", { class: "num", text: String(index + 1), "aria-hidden": "true" }),
      h(
        "span",
        { class: "what" },
        h("span", { class: "visually-hidden", text: `Item ${index + 1}: ` }),
        itemName(item),
        item.warning ? h("span", { class: "flag", title: item.warning, text: " ⚠" }) : null,
        h("span", {
          class: "best",
          text: best ? `${best.productId} · ${score3(best.score)}` : "no match",
        }),
      ),
    );
    button.style.setProperty("--c", colourOf(index));
    button.addEventListener("click", () => select(index, false));
    return h("li", {}, button);
  }

  // Labels above their box, or inside it when the box touches the top of the shown photo.
  function layout() {
    const shown = el.overlay.getBoundingClientRect();
    for (const node of el.overlay.querySelectorAll(".box")) {
      const top = node.getBoundingClientRect().top - shown.top;
      node.classList.toggle("label-inside", top < 22);
    }
  }
  if (window.ResizeObserver) new ResizeObserver(() => layout()).observe(el.overlay);
  else window.addEventListener("resize", layout);

  function select(index, fromPhoto) {
    state.selected = index;
    el.overlay.classList.toggle("has-selection", index >= 0);
    for (const node of el.overlay.querySelectorAll(".box")) {
      const on = Number(node.dataset.index) === index;
      node.classList.toggle("selected", on);
      node.setAttribute("aria-pressed", String(on));
    }
    for (const node of el.items.querySelectorAll(".item-entry")) {
      node.setAttribute("aria-pressed", String(Number(node.dataset.index) === index));
    }
    renderMatches();
    if (fromPhoto && window.matchMedia("(max-width: 900px)").matches) {
      el.matches.scrollIntoView({ block: "nearest", behavior: "smooth" });
    }
  }

  function releaseThumbs() {
    for (const url of state.thumbUrls) URL.revokeObjectURL(url);
    state.thumbUrls = [];
  }

  function renderMatches() {
    releaseThumbs();
    const heading = h("h2", { id: "matches-heading", text: "Matches" });
    const items = (state.response && state.response.items) || [];
    const item = items[state.selected];
    if (!item) {
      el.matches.dataset.index = "";
      el.matches.replaceChildren(
        heading,
        h("p", { class: "placeholder", text: "Select an item on the photo or in the list to see its matches." }),
      );
      return;
    }
    el.matches.dataset.index = String(state.selected);
    heading.textContent = `Matches of item ${state.selected + 1}: ${itemName(item)}`;
    const b = boxOf(item);
    const facts = [
      SOURCE_NAMES[item.source] || item.source,
      item.source === "ITEM_SOURCE_USER_REGION" || item.source === "ITEM_SOURCE_WHOLE_IMAGE"
        ? null
        : `confidence ${score3(item.confidence)}`,
      `box ${Math.round(b.x0)},${Math.round(b.y0)}–${Math.round(b.x1)},${Math.round(b.y1)} px`,
      num(item.categoryMargin) > 0 ? `category margin ${score3(item.categoryMargin)}` : null,
    ].filter(Boolean);
    const nodes = [heading, h("p", { class: "item-facts", dataset: { testid: "item-facts" }, text: facts.join(" · ") })];
    if (item.warning) {
      nodes.push(h("p", { class: "item-warning", role: "note", dataset: { testid: "item-warning" } }, "⚠ ", item.warning));
    }
    if (item.degraded) {
      nodes.push(
        h("p", {
          class: "item-degraded",
          dataset: { testid: "item-degraded" },
          text: "Degraded: part of the catalogue did not answer; these matches may be incomplete.",
        }),
      );
    }
    const matches = item.matches || [];
    if (matches.length === 0) {
      nodes.push(h("p", { class: "placeholder", dataset: { testid: "no-matches" }, text: "No catalogue product matches this item." }));
    } else {
      nodes.push(h("ol", { class: "match-list", dataset: { testid: "match-list" } }, matches.map((m, rank) => matchRow(item, m, rank))));
    }
    el.matches.replaceChildren(...nodes);
  }

  function matchRow(item, match, rank) {
    const metadata = match.metadata || {};
    const attributes = match.attributes || {};
    const title = metadata.title || metadata.name || "";
    const thumb = h("img", {
      class: "thumb",
      alt: `Catalogue image of ${match.productId}`,
      width: 96,
      height: 96,
      dataset: { testid: "match-thumb" },
    });
    loadThumb(thumb, item, match);
    const otherMeta = Object.entries(metadata).filter(([key]) => key !== "title" && key !== "name");
    const labels = Object.entries(attributes.labels || {});
    const tags = attributes.tags || [];
    return h(
      "li",
      { class: "match", dataset: { testid: "match", productId: match.productId, rank: String(rank + 1) } },
      thumb,
      h(
        "div",
        { class: "match-body" },
        h(
          "div",
          { class: "match-head" },
          h("span", { class: "match-id", dataset: { testid: "match-id" }, text: match.productId }),
          h("span", { class: "match-score", dataset: { testid: "match-score" }, title: "similarity score", text: score3(match.score) }),
        ),
        title ? h("p", { class: "match-title", dataset: { testid: "match-title" }, text: title }) : null,
        attributes.path ? h("p", { class: "match-meta", dataset: { testid: "match-path" }, text: attributes.path }) : null,
        tags.length || labels.length
          ? h(
              "ul",
              { class: "chips", "aria-label": "tags and labels", dataset: { testid: "match-labels" } },
              tags.map((tag) => h("li", { class: "chip", text: tag })),
              labels.map(([key, value]) => h("li", { class: "chip label", text: `${key}: ${value}` })),
            )
          : null,
        otherMeta.length
          ? h("p", { class: "match-meta", text: otherMeta.map(([key, value]) => `${key}: ${value}`).join(" · ") })
          : null,
        h("p", { class: "match-meta", dataset: { testid: "match-image" }, text: `image ${match.imageId}` }),
      ),
    );
  }

  async function loadThumb(img, item, match) {
    const category = item.category || "";
    const url =
      `/v1/products/${encodeURIComponent(match.productId)}/images/${encodeURIComponent(match.imageId)}` +
      `/thumbnail?alt=media&category=${encodeURIComponent(category)}`;
    const selected = state.selected;
    try {
      const blob = await (await api(url)).blob();
      if (selected !== state.selected || !img.isConnected) return;
      const objectUrl = URL.createObjectURL(blob);
      state.thumbUrls.push(objectUrl);
      img.src = objectUrl;
    } catch (error) {
      if (!img.isConnected) return;
      img.replaceWith(h("span", { class: "thumb-missing", role: "img", "aria-label": `No image of ${match.productId}`, text: "no image" }));
    }
  }

  // --- drawing a region -----------------------------------------------------------------------

  function setDrawing(on) {
    state.drawing = on && Boolean(state.file);
    el.draw.setAttribute("aria-pressed", String(state.drawing));
    el.overlay.classList.toggle("drawing", state.drawing);
    el.drawHint.hidden = !state.drawing;
    if (!state.drawing) {
      state.drag = null;
    }
  }

  el.draw.addEventListener("click", () => setDrawing(!state.drawing));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.drawing) {
      el.rubber.hidden = true;
      setDrawing(false);
    }
  });

  function dragPoint(event) {
    const rect = el.overlay.getBoundingClientRect();
    return {
      x: Math.min(rect.width, Math.max(0, event.clientX - rect.left)),
      y: Math.min(rect.height, Math.max(0, event.clientY - rect.top)),
      w: rect.width,
      h: rect.height,
    };
  }

  function showRubber(a, b) {
    const x0 = Math.min(a.x, b.x);
    const y0 = Math.min(a.y, b.y);
    Object.assign(el.rubber.style, {
      left: `${(x0 / a.w) * 100}%`,
      top: `${(y0 / a.h) * 100}%`,
      width: `${(Math.abs(b.x - a.x) / a.w) * 100}%`,
      height: `${(Math.abs(b.y - a.y) / a.h) * 100}%`,
    });
    el.rubber.hidden = false;
  }

  el.overlay.addEventListener("pointerdown", (event) => {
    if (!state.drawing || event.button !== 0) return;
    event.preventDefault();
    el.overlay.setPointerCapture(event.pointerId);
    const start = dragPoint(event);
    state.drag = { start, pointerId: event.pointerId };
    showRubber(start, start);
  });
  el.overlay.addEventListener("pointermove", (event) => {
    if (!state.drag || event.pointerId !== state.drag.pointerId) return;
    showRubber(state.drag.start, dragPoint(event));
  });
  el.overlay.addEventListener("pointercancel", () => {
    state.drag = null;
    el.rubber.hidden = true;
  });
  el.overlay.addEventListener("pointerup", (event) => {
    if (!state.drag || event.pointerId !== state.drag.pointerId) return;
    const a = state.drag.start;
    const b = dragPoint(event);
    state.drag = null;
    if (Math.abs(b.x - a.x) < MIN_DRAG_PX || Math.abs(b.y - a.y) < MIN_DRAG_PX) {
      el.rubber.hidden = true;
      setStatus(el.status.dataset.state, "That region is too small: drag a larger rectangle.");
      return;
    }
    const [width, height] = imageSize();
    const sx = width / a.w;
    const sy = height / a.h;
    const box = {
      xMin: Math.max(0, Math.round(Math.min(a.x, b.x) * sx)),
      yMin: Math.max(0, Math.round(Math.min(a.y, b.y) * sy)),
      xMax: Math.min(width, Math.round(Math.max(a.x, b.x) * sx)),
      yMax: Math.min(height, Math.round(Math.max(a.y, b.y) * sy)),
    };
    setDrawing(false);
    search([{ box, category: el.regionCategory.value.trim() }]);
  });

  loadCatalogue();
})();
