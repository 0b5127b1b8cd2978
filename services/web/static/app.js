// Progressive enhancement only: every page works without this script.
(function () {
  "use strict";

  function setupDropzone() {
    var zone = document.getElementById("dropzone");
    var input = document.getElementById("file");
    var chosen = document.getElementById("file-chosen");
    if (!zone || !input) { return; }
    function showChosen() {
      // The name stays in this browser; it is never sent to the server's logs or pages.
      chosen.textContent = input.files && input.files.length ? "Selected: " + input.files[0].name : "";
    }
    input.addEventListener("change", showChosen);
    ["dragenter", "dragover"].forEach(function (name) {
      zone.addEventListener(name, function (event) { event.preventDefault(); zone.classList.add("is-dragover"); });
    });
    ["dragleave", "drop"].forEach(function (name) {
      zone.addEventListener(name, function (event) { event.preventDefault(); zone.classList.remove("is-dragover"); });
    });
    zone.addEventListener("drop", function (event) {
      if (event.dataTransfer && event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        showChosen();
      }
    });
    var form = document.getElementById("predict-form");
    if (form) {
      form.addEventListener("submit", function () {
        var button = document.getElementById("analyse-button");
        var note = document.getElementById("analysing");
        if (button) { button.disabled = true; button.textContent = "Analysing…"; }
        if (note) { note.hidden = false; }
      });
    }
  }

  function setupStudyForm() {
    // The study page: name how many files are chosen, and show progress while they are analysed.
    var input = document.getElementById("files");
    var chosen = document.getElementById("files-chosen");
    var form = document.getElementById("study-form");
    if (!input || !form) { return; }
    input.addEventListener("change", function () {
      var count = input.files ? input.files.length : 0;
      chosen.textContent = count ? "Selected: " + count + (count === 1 ? " file" : " files") : "";
    });
    form.addEventListener("submit", function () {
      var button = document.getElementById("study-button");
      var note = document.getElementById("study-progress");
      var count = input.files ? input.files.length : 0;
      var started = Date.now();
      if (button) { button.disabled = true; button.textContent = "Analysing…"; }
      if (note) {
        note.hidden = false;
        window.setInterval(function () {
          var seconds = Math.round((Date.now() - started) / 1000);
          note.textContent = "Analysing " + count + (count === 1 ? " file" : " files") + "… " + seconds +
            " s so far. A study of 150 slices takes about half a minute; large studies longer.";
        }, 1000);
      }
    });
  }

  function setupJobPolling() {
    var container = document.getElementById("jobs");
    if (!container) { return; }
    var url = container.getAttribute("data-poll-url");
    function active() {
      var table = document.getElementById("jobs-table");
      return table && table.getAttribute("data-active") === "true";
    }
    function poll() {
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (response) { return response.ok ? response.text() : null; })
        .then(function (html) { if (html !== null) { container.innerHTML = html; } })
        .catch(function () { /* keep the last table; the next poll may work */ })
        .then(function () { window.setTimeout(poll, active() ? 3000 : 15000); });
    }
    window.setTimeout(poll, active() ? 3000 : 15000);
  }

  function showResult() {
    // On a phone the answer comes first (CSS order); scroll past the header to it, so that
    // "Analyse" visibly did something.
    var result = document.querySelector(".result-card.has-result");
    if (result && window.matchMedia("(max-width: 860px)").matches) {
      result.scrollIntoView({ block: "start" });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    showResult();
    setupDropzone();
    setupStudyForm();
    setupJobPolling();
  });
})();
