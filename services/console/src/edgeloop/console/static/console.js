// edgeloop console: the live parts of a page. An element with data-live="URL" is
// replaced by each `update` event of that server-sent event stream (the server renders
// the HTML; nothing is built here). Bars take their width from data-ratio.
"use strict";

function bars(root) {
  root.querySelectorAll(".fill[data-ratio]").forEach((el) => {
    el.style.width = `${Math.min(100, Number(el.dataset.ratio) || 0)}%`;
  });
  root.querySelectorAll("[data-colour]").forEach((el) => {
    el.style.borderColor = el.dataset.colour;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  bars(document);
  document.querySelectorAll("[data-live]").forEach((el) => {
    const source = new EventSource(el.dataset.live);
    source.addEventListener("update", (event) => {
      el.innerHTML = event.data;
      el.dataset.updates = String(Number(el.dataset.updates || 0) + 1);
      bars(el);
    });
    source.addEventListener("error", () => {
      el.dataset.stale = "true";
    });
  });
});
