// Redraws the fleet every few seconds from /status/panel, which the escrow renders and
// escapes; no framework, no inline script (the page's Content-Security-Policy forbids both).
"use strict";
(function () {
  const fleet = document.getElementById("fleet");
  const seconds = Number(fleet.dataset.refreshSeconds) || 5;
  async function redraw() {
    try {
      const answer = await fetch("/status/panel", {credentials: "same-origin", cache: "no-store"});
      if (answer.status === 401) {
        window.location.assign("/status");
        return;
      }
      if (answer.ok) {
        fleet.innerHTML = await answer.text();
        fleet.classList.remove("stale");
      } else {
        fleet.classList.add("stale");
      }
    } catch (error) {
      fleet.classList.add("stale");  // the escrow is unreachable: keep the last view, marked
    }
  }
  window.setInterval(redraw, seconds * 1000);
})();
