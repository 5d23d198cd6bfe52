/* dicomsync console: draws the Chart.js charts a page declares and wires its buttons.
 * Charts: every <canvas data-chart="ID"> is drawn from the JSON in <script id="ID">;
 * the Chart objects are window.dicomsyncCharts[canvas id].
 * Buttons: <button data-post="URL" data-body='{"json": 1}' data-confirm="text"> POST to
 * URL with the X-DicomSync-Console header (the server refuses console POSTs without it,
 * which a cross-site form cannot send), then reload the page. */
(function () {
  "use strict";
  window.dicomsyncCharts = {};

  function drawCharts() {
    var canvases = document.querySelectorAll("canvas[data-chart]");
    canvases.forEach(function (canvas) {
      var box = canvas.parentNode;
      if (typeof Chart === "undefined") {
        box.classList.add("unavailable");
        box.textContent = "Chart.js did not load: the chart cannot be drawn.";
        return;
      }
      var config = JSON.parse(document.getElementById(canvas.dataset.chart).textContent);
      config.options = config.options || {};
      config.options.maintainAspectRatio = false;
      config.options.animation = false;
      window.dicomsyncCharts[canvas.id] = new Chart(canvas, config);
    });
    document.body.dataset.chartsDrawn = String(Object.keys(window.dicomsyncCharts).length);
  }

  function say(text, kind) {
    var out = document.getElementById("console-message");
    if (!out) { return; }
    out.className = "notice " + kind;
    out.textContent = text;
  }

  function post(button) {
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) { return; }
    button.disabled = true;
    fetch(button.dataset.post, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-DicomSync-Console": "1", "Content-Type": "application/json" },
      body: button.dataset.body || "{}"
    }).then(function (response) {
      return response.text().then(function (text) {
        var data = {};
        try { data = JSON.parse(text); } catch (e) { data = { Message: text }; }
        if (!response.ok) { throw new Error(data.Message || ("HTTP " + response.status)); }
        return data;
      });
    }).then(function (data) {
      var what = data.Requeued !== undefined ? data.Requeued + " job(s) requeued"
        : "job " + data.Id + " requeued (now " + data.State + ")";
      say(what, "info");  // and again after the reload, which shows the new states
      try { window.sessionStorage.setItem("dicomsync-message", what); } catch (e) { /* off */ }
      window.setTimeout(function () { window.location.reload(); }, 400);
    }).catch(function (error) {
      button.disabled = false;
      say(String(error.message || error), "error");
    });
  }

  function wireButtons() {
    document.querySelectorAll("button[data-post]").forEach(function (button) {
      button.addEventListener("click", function () { post(button); });
    });
  }

  function init() {
    var said = null;
    try {
      said = window.sessionStorage.getItem("dicomsync-message");
      window.sessionStorage.removeItem("dicomsync-message");
    } catch (e) { said = null; }
    if (said) { say(said, "info"); }
    wireButtons();
    drawCharts();
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
