// Review controls, offline: decisions live in localStorage (keyed by this page) until exported
// as decisions.csv, which `jaguar-kit review` applies to the catalogue. Names are only ever
// read from data attributes and written with textContent / value, never as markup.
(function () {
  "use strict";
  var STORE = "jaguar-kit-review:" + document.body.dataset.page;
  var COLUMNS = ["photo", "path", "key", "box", "kind", "group", "proposed", "action", "name", "reviewer", "decided_at"];
  var entries = Array.prototype.slice.call(document.querySelectorAll("[data-review]"));
  var byId = {};
  entries.forEach(function (e) { byId[e.dataset.id] = e; });
  var $ = function (id) { return document.getElementById(id); };
  var state = load();

  function load() {
    try {
      var s = JSON.parse(window.localStorage.getItem(STORE) || "null");
      if (s && typeof s === "object" && s.decisions) { return s; }
    } catch (err) { /* storage off or damaged: start afresh */ }
    return {reviewer: "", decisions: {}};
  }
  function save() {
    try { window.localStorage.setItem(STORE, JSON.stringify(state)); } catch (err) { /* private mode */ }
  }
  function say(text) { $("message").textContent = text; }

  // --- one entry's decision -------------------------------------------------------------
  function decide(entry, action) {
    var id = entry.dataset.id;
    if (action === null) {
      delete state.decisions[id];
    } else {
      var name = "";
      if (action === "rename") {
        name = entry.querySelector(".rename-name").value.trim();
        if (!name) { say("type a name before Rename"); return; }
      }
      state.decisions[id] = {action: action, name: name, decided_at: new Date().toISOString()};
    }
    say("");
    save();
    show(entry);
    counts();
  }
  function show(entry) {
    var d = state.decisions[entry.dataset.id];
    entry.classList.remove("r-confirm", "r-reject", "r-rename");
    var status = entry.querySelector(".status");
    if (!d) { status.textContent = ""; entry.dataset.reviewed = ""; return; }
    entry.classList.add("r-" + d.action);
    entry.dataset.reviewed = d.action;
    var proposed = entry.dataset.proposed;
    var unnamed = entry.dataset.decision === "new";  // `new`, `new-001`: no individual to join yet
    status.textContent = d.action === "confirm" && unnamed ? "confirmed new: Rename it to add it to the catalogue"
      : d.action === "confirm" ? "confirmed: " + proposed
      : d.action === "reject" ? "rejected: not " + proposed : "renamed: " + d.name;
    if (d.action === "rename") { entry.querySelector(".rename-name").value = d.name; }
  }
  entries.forEach(function (entry) {
    var on = function (cls, action) {
      entry.querySelector("button." + cls).addEventListener("click", function () { decide(entry, action); });
    };
    on("confirm", "confirm");
    on("reject", "reject");
    on("rename", "rename");
    on("undo", null);
    entry.querySelector(".rename-name").addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") { decide(entry, "rename"); }
    });
    show(entry);
  });

  // --- sorting and filtering ------------------------------------------------------------
  var individuals = {};
  entries.forEach(function (e) { individuals[e.dataset.proposed] = true; });
  Object.keys(individuals).sort().forEach(function (name) {
    var o = document.createElement("option");
    o.value = name;
    o.textContent = name;
    $("filter-individual").appendChild(o);
  });
  function num(e, key) { var v = parseFloat(e.dataset[key]); return isNaN(v) ? -1 : v; }
  var SORTS = {
    order: function (a, b) { return num(a, "order") - num(b, "order"); },
    uncertain: function (a, b) { return num(b, "uncertainty") - num(a, "uncertainty") || SORTS.order(a, b); },
    probability: function (a, b) { return num(b, "probability") - num(a, "probability") || SORTS.order(a, b); },
    individual: function (a, b) {
      return a.dataset.proposed.localeCompare(b.dataset.proposed) || SORTS.order(a, b);
    }
  };
  var sortedBy = "order";  // the page is written in this order
  function view() {
    var who = $("filter-individual").value, what = $("filter-decision").value;
    var text = $("filter-text").value.trim().toLowerCase();
    entries.forEach(function (e) {
      var reviewed = e.dataset.reviewed || "";
      var hide = !((!who || e.dataset.proposed === who)
        && (!what || e.dataset.decision === what || reviewed === what || (what === "undecided" && !reviewed))
        && (!text || e.dataset.search.toLowerCase().indexOf(text) >= 0));
      if (e.hidden !== hide) { e.hidden = hide; }
    });
    var how = SORTS[$("sort").value] ? $("sort").value : "order";
    if (how !== sortedBy) {  // moving 1,000 entries costs a few hundred ms: only when the order changes
      entries.slice().sort(SORTS[how]).forEach(function (e) { e.parentNode.appendChild(e); });
      sortedBy = how;
    }
    counts();
  }
  function counts() {
    var shown = entries.filter(function (e) { return !e.hidden; }).length;
    var decided = entries.filter(function (e) { return state.decisions[e.dataset.id]; }).length;
    $("counts").textContent = decided + " of " + entries.length + " reviewed; " + shown + " shown";
  }
  ["sort", "filter-individual", "filter-decision"].forEach(function (id) { $(id).addEventListener("change", view); });
  $("filter-text").addEventListener("input", view);

  // --- export -----------------------------------------------------------------------------
  $("reviewer").value = state.reviewer || "";
  $("reviewer").addEventListener("input", function () { state.reviewer = this.value.trim(); save(); });
  function cell(v) { return '"' + String(v === undefined || v === null ? "" : v).replace(/"/g, '""') + '"'; }
  function rows() {
    var out = [];
    entries.forEach(function (entry) {
      var d = state.decisions[entry.dataset.id];
      if (!d) { return; }  // not reviewed: left out
      var photos = entry.dataset.kind === "group"
        ? Array.prototype.slice.call(entry.querySelectorAll(".member")) : [entry];
      var name = d.action === "rename" ? d.name : d.action === "confirm" ? entry.dataset.proposed : "";
      photos.forEach(function (p) {
        out.push([p.dataset.name, p.dataset.path, p.dataset.key, p.dataset.box, entry.dataset.kind,
                  entry.dataset.group || "", entry.dataset.proposed, d.action, name, state.reviewer, d.decided_at]);
      });
    });
    return out;
  }
  $("export").addEventListener("click", function () {
    if (!state.reviewer) { say("enter your name as reviewer first"); $("reviewer").focus(); return; }
    var data = rows();
    if (!data.length) { say("nothing reviewed yet"); return; }
    var csv = [COLUMNS].concat(data).map(function (r) { return r.map(cell).join(","); }).join("\r\n") + "\r\n";
    var a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([csv], {type: "text/csv;charset=utf-8"}));
    a.download = "decisions.csv";
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
    say("");
    $("counts").textContent = data.length + " rows exported to decisions.csv";
  });
  view();
}());
