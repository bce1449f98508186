// Labelling page: keyboard shortcuts and submission through POST /api/labels.
// Served from /static because the Content-Security-Policy forbids inline script.
//
// Keys (ignored while typing in the rationale box; Escape leaves it):
//   1 left better · 2 right better · t tie · s skip · q/w/e strength slight/clear/strong
//   f flag unsafe · r write a rationale
//
// A submission keeps one submission_id across its retries, so a retried POST whose first attempt
// did reach the server stores nothing new (the server answers 200 "replayed"). Only a lost
// connection or a gateway error (502/503/504: the server is restarting) is retried; any other
// error means the server could not store this answer, and the page says so instead of retrying.
(function () {
  "use strict";
  var form = document.getElementById("label-form");
  if (!form) { return; }
  var statusLine = document.getElementById("status");
  var buttons = form.querySelectorAll("button[name=choice]");
  var shownAt = Date.now();
  var submissionId = randomId();
  var busy = false;
  var RETRY_STATUSES = [502, 503, 504];

  function randomId() {
    var bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }

  function say(text) { statusLine.textContent = text; }

  function setBusy(value) {
    busy = value;
    for (var i = 0; i < buttons.length; i++) { buttons[i].disabled = value; }
  }

  function strength() {
    var checked = form.querySelector("input[name=strength]:checked");
    return checked ? Number(checked.value) : null;
  }

  function sleep(ms) { return new Promise(function (resolve) { setTimeout(resolve, ms); }); }

  async function submit(choice) {
    if (busy) { return; }
    setBusy(true);
    var body = JSON.stringify({
      submission_id: submissionId,
      assignment_id: Number(form.elements.assignment_id.value),
      choice: choice,
      strength: (choice === "left" || choice === "right") ? strength() : null,
      rationale: form.elements.rationale.value.trim() || null,
      unsafe: form.elements.unsafe.checked,
      duration_ms: Date.now() - shownAt
    });
    for (var attempt = 0; attempt < 5; attempt++) {
      var response = null;
      try {
        response = await fetch("/api/labels", {
          method: "POST",
          credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": form.elements.csrf_token.value },
          body: body
        });
      } catch (err) {
        response = null;
      }
      if (response && response.ok) { window.location.replace("/label"); return; }
      if (response && response.status >= 500 && RETRY_STATUSES.indexOf(response.status) < 0) {
        say("Not saved: the server could not store this answer (HTTP " + response.status + "). " +
            "Copy your rationale if you wrote one, reload the page, and tell your annotation lead if it happens again.");
        setBusy(false);
        return;
      }
      if (response && response.status < 500) {
        var problem = await response.json().catch(function () { return {}; });
        var text = problem.message || (typeof problem.detail === "string" ? problem.detail : "") || ("HTTP " + response.status);
        if (response.status === 409 && problem.field === "assignment_id") {
          say("Already answered (another tab?). Loading the next pair…");
          window.location.replace("/label");
          return;
        }
        say("Not saved: " + text);
        setBusy(false);
        return;
      }
      say("Connection problem; retrying (" + (attempt + 1) + ")…");
      await sleep(300 * Math.pow(2, attempt));
    }
    say("Not saved: the server cannot be reached. Press the key again to retry; nothing is lost.");
    setBusy(false);
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var choice = event.submitter && event.submitter.value;
    if (choice) { submit(choice); }
  });

  function toggleStrength(value) {
    var radio = form.querySelector("input[name=strength][value='" + value + "']");
    radio.checked = !radio.checked;
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var target = event.target;
    var typing = target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type === "text"));
    if (typing) {
      if (event.key === "Escape") { target.blur(); }
      return;
    }
    var actions = {
      "1": function () { submit("left"); },
      "2": function () { submit("right"); },
      "t": function () { submit("tie"); },
      "s": function () { submit("skip"); },
      "q": function () { toggleStrength(1); },
      "w": function () { toggleStrength(2); },
      "e": function () { toggleStrength(3); },
      "f": function () { form.elements.unsafe.checked = !form.elements.unsafe.checked; },
      "r": function () { form.elements.rationale.focus(); }
    };
    var action = actions[event.key.toLowerCase()];
    if (action) {
      event.preventDefault();
      action();
    }
  });
}());
