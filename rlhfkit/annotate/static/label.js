// Labelling page: keyboard shortcuts and submission through POST /api/labels.
// Served from /static because the Content-Security-Policy forbids inline script.
//
// Keys (ignored while typing in the rationale box; Escape leaves it):
//   pair:    1 left better · 2 right better · t tie · s skip · q/w/e strength slight/clear/strong
//   ranking: 1..K place that reply next (best first) · = tie the next one with the one before ·
//            Backspace take the last one back · Enter submit · s skip
//   both:    f flag unsafe · r write a rationale
//
// A submission keeps one submission_id across its retries, so a retried POST whose first attempt
// did reach the server stores nothing new (the server answers 200 "replayed"). Only a lost
// connection or a gateway error (502/503/504: the server is restarting) is retried; any other
// error means the server could not store this answer, and the page says so instead of retrying.
(function () {
  "use strict";
  var form = document.getElementById("label-form");
  if (!form) { return; }
  var ranking = form.dataset.kind === "ranking";
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

  // Ratings (when the project asks for them): {aspect: [rating per reply as shown, or null]}.
  function ratings() {
    var selects = form.querySelectorAll("select[data-aspect]"), out = {}, any = false;
    Array.prototype.forEach.call(selects, function (sel) {
      var name = sel.dataset.aspect, pos = Number(sel.dataset.pos);
      if (!out[name]) { out[name] = []; for (var i = 0; i < n; i++) { out[name].push(null); } }
      if (sel.value) { out[name][pos] = Number(sel.value); any = true; }
    });
    return any ? out : null;
  }

  function sleep(ms) { return new Promise(function (resolve) { setTimeout(resolve, ms); }); }

  // ---- ranking: tiers of reply positions (0-based, as shown), best first ----------------------
  var n = ranking ? Number(form.dataset.n) : 2;
  var tiers = [];
  var tieNext = false;

  function placed(pos) {
    return tiers.some(function (tier) { return tier.indexOf(pos) >= 0; });
  }

  function ranksFromSelects() {
    var ranks = [];
    for (var i = 0; i < n; i++) { ranks.push(Number(form.elements["rank_" + i].value) || null); }
    return ranks;
  }

  function showRanking() {
    for (var i = 0; i < n; i++) { form.elements["rank_" + i].value = ""; }
    var list = document.getElementById("ranking");
    list.textContent = "";
    tiers.forEach(function (tier, k) {
      tier.forEach(function (pos) { form.elements["rank_" + pos].value = String(k + 1); });
      var li = document.createElement("li");
      li.textContent = tier.map(function (pos) { return "Reply " + (pos + 1); }).join(" = ");
      list.appendChild(li);
    });
    var left = n - tiers.reduce(function (a, t) { return a + t.length; }, 0);
    say(left ? (left + " to place" + (tieNext ? " (next one ties)" : "")) : "All placed: Enter submits.");
  }

  function place(pos) {
    if (pos >= n || placed(pos)) { return; }
    if (tieNext && tiers.length) { tiers[tiers.length - 1].push(pos); } else { tiers.push([pos]); }
    tieNext = false;
    showRanking();
  }

  function unplace() {
    if (tieNext) { tieNext = false; } else if (tiers.length) {
      tiers[tiers.length - 1].pop();
      if (!tiers[tiers.length - 1].length) { tiers.pop(); }
    }
    showRanking();
  }

  if (ranking) {
    form.addEventListener("change", function (event) {
      if (event.target.tagName !== "SELECT") { return; }
      // Chosen with the mouse: rebuild the tiers from the selects.
      var ranks = ranksFromSelects(), levels = [];
      ranks.forEach(function (r) { if (r && levels.indexOf(r) < 0) { levels.push(r); } });
      levels.sort(function (a, b) { return a - b; });
      tiers = levels.map(function (r) {
        return ranks.map(function (x, i) { return x === r ? i : -1; }).filter(function (i) { return i >= 0; });
      });
      showRanking();
    });
  }

  // ---- submitting -----------------------------------------------------------------------------
  async function submit(choice) {
    if (busy) { return; }
    var ranks = null;
    if (choice === "rank") {
      ranks = ranksFromSelects();
      if (ranks.indexOf(null) >= 0) { say("Place every reply first (" + ranks.filter(function (r) { return !r; }).length + " left)."); return; }
    }
    setBusy(true);
    var body = JSON.stringify({
      submission_id: submissionId,
      assignment_id: Number(form.elements.assignment_id.value),
      choice: choice,
      ranks: ranks,
      ratings: choice === "skip" ? null : ratings(),
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
          say("Already answered (another tab?). Loading the next item…");
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

  var common = {
    "s": function () { submit("skip"); },
    "f": function () { form.elements.unsafe.checked = !form.elements.unsafe.checked; },
    "r": function () { form.elements.rationale.focus(); }
  };
  var pairKeys = {
    "1": function () { submit("left"); },
    "2": function () { submit("right"); },
    "t": function () { submit("tie"); },
    "q": function () { toggleStrength(1); },
    "w": function () { toggleStrength(2); },
    "e": function () { toggleStrength(3); }
  };
  var rankKeys = {
    "=": function () { if (tiers.length) { tieNext = true; showRanking(); } },
    "backspace": unplace,
    "enter": function () { submit("rank"); }
  };

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var target = event.target;
    var typing = target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type === "text"));
    if (typing) {
      if (event.key === "Escape") { target.blur(); }
      return;
    }
    var key = event.key.toLowerCase();
    var action = common[key] || (ranking ? rankKeys[key] : pairKeys[key]);
    if (!action && ranking && /^[1-9]$/.test(key)) {
      action = function () { place(Number(key) - 1); };
    }
    if (action) {
      event.preventDefault();
      action();
    }
  });

  // ---- a visible hint while a reply has more text below ----------------------------------------
  Array.prototype.forEach.call(document.querySelectorAll(".completion"), function (box) {
    var hint = box.parentNode.querySelector(".more");
    if (!hint) { return; }
    function update() { hint.hidden = box.scrollTop + box.clientHeight >= box.scrollHeight - 4; }
    box.addEventListener("scroll", update);
    window.addEventListener("resize", update);
    update();
  });
  // The question's last user turn stays in view: a long conversation starts scrolled to its end.
  var prompt = document.querySelector(".prompt");
  if (prompt) { prompt.scrollTop = prompt.scrollHeight; }
}());
