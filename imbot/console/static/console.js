// The console's only script: refresh live panels (data-refresh, every data-every seconds)
// and load slow panels once after the page is shown (data-load: a message's trace); a link
// with data-swap="#id" loads its fragment into that element instead of navigating.
"use strict";
(function () {
  // A live panel keeps its last content when a refresh fails; a panel loaded once says so.
  async function fill(el, url, once) {
    let failed = "";
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html-fragment" } });
      if (response.status === 401) { window.location.assign("/login"); return; }
      if (response.ok) {
        el.innerHTML = await response.text();
      } else {
        failed = "the console answered " + response.status;
      }
    } catch (_) {
      failed = "the console did not answer";
    }
    if (failed && once) {
      el.innerHTML = "";
      const note = document.createElement("p");
      note.className = "bad";
      note.textContent = failed;
      el.appendChild(note);
    }
    el.dataset.failed = failed;
  }
  document.addEventListener("click", function (event) {
    const link = event.target.closest("a[data-swap]");
    if (!link) { return; }
    const target = document.querySelector(link.dataset.swap);
    if (!target) { return; }
    event.preventDefault();
    target.innerHTML = "<p class=\"muted\">reading the topics…</p>";
    fill(target, link.getAttribute("href"), true);
  });
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-load]").forEach(function (el) { fill(el, el.dataset.load, true); });
    document.querySelectorAll("[data-refresh]").forEach(function (el) {
      const every = Math.max(2, Number(el.dataset.every || "5")) * 1000;
      window.setInterval(function () {
        if (!document.hidden) { fill(el, el.dataset.refresh, false); }
      }, every);
    });
  });
})();
