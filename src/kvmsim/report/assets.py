"""The inline stylesheet and script of the HTML timeline (written for kvmsim; no library, no network).

The script reads the ``kvmsim-data`` JSON block (a list of runs, :meth:`Timeline.data`) and, per run,
draws an SVG timeline: one column per observation (0 = set-up, then each step), a header row naming
the step (red when the checker found a violation after it) with the invariants it broke, then lanes.
A lane of one page shows four rows: ``folio_ref_count`` and pin count, PG_dirty / PG_referenced /
freed, the stage-2 leaf (level and W/A/D) and the number of journal facts on that page in the step.
More than :data:`DETAIL` lanes in view are drawn as at most :data:`GROUPS` range rows of heat strips;
a click on one zooms into it (a breadcrumb zooms back out; ``#run0=LO-HI`` in the address opens
the first run zoomed into lanes LO..HI-1).  A click on a step header or a cell
filters the operations table below to that step (and page).
"""

CSS = r"""
body{font:13px/1.35 system-ui,-apple-system,"Segoe UI",sans-serif;margin:12px 16px;color:#1d232a;background:#fff}
h1{font-size:20px;margin:4px 0}h1 small{font-weight:normal;color:#555}
h2{font-size:16px;margin:6px 0}
.desc{max-width:1400px;color:#333}.meta{color:#555;margin:4px 0}
.legend{background:#f5f7fa;border:1px solid #dde3ea;padding:6px 8px;border-radius:4px;max-width:1400px}
.lg{display:inline-block;padding:0 4px;border-radius:3px;font-family:ui-monospace,monospace;font-size:12px}
.lg.ref{background:#dbe9fb}.lg.dirty{background:#f7b267}.lg.acc{background:#9cc7f0}.lg.freed{background:#555;color:#fff}
.lg.spte{background:#a7dba0}.lg.ops{color:#6a3fb5}.lg.viol{background:#d62828;color:#fff}
.runs{display:grid;grid-template-columns:repeat(var(--n),minmax(0,1fr));gap:14px;align-items:start}
.run{border:1px solid #ccd3db;border-radius:6px;padding:6px 8px;min-width:0;overflow-x:auto}
.pol{font-family:ui-monospace,monospace}
.verdict{padding:1px 6px;border-radius:3px;font-size:12px;font-weight:600}
.v-clean{background:#d7f0d2;color:#1e6b1a}.v-violations{background:#fde2c4;color:#8a4500}.v-error{background:#f8c9c9;color:#8a0000}
.invs{color:#b00020;font-size:13px}.match{font-size:12px;font-weight:normal}.match.ok{color:#1e6b1a}.match.bad{color:#b00020}
.err{color:#b00020}
.tl{margin:6px 0;border:1px solid #e2e6ea;border-radius:4px}
.tl-nav{padding:3px 6px;background:#f5f7fa;border-bottom:1px solid #e2e6ea;font-size:12px;min-height:18px}
.tl-nav a{color:#1a5fb4;cursor:pointer;text-decoration:underline}
.tl-scroll{overflow:auto;max-height:78vh}
svg text{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:11px}
svg .lbl{font-size:11px;fill:#222}svg .sub{font-size:9px;fill:#777}
svg .hdr{cursor:pointer}svg .hdr:hover rect{stroke:#1a5fb4}
svg .grp{cursor:zoom-in}svg .grp:hover .bgr{fill:#eef4fb}
svg .cell{cursor:pointer}
table{border-collapse:collapse;margin:4px 0;font-size:12px}
th,td{border:1px solid #e2e6ea;padding:2px 5px;text-align:left;vertical-align:top}
th{background:#f5f7fa}
table.steps td.txt{font-family:ui-monospace,monospace;word-break:break-word}
tr.has-viol td.vi{color:#b00020;font-weight:600}tr.sel td{background:#fff4c2}
tr.mism td{color:#b00020}
td.inv{color:#b00020;font-weight:600}
td.caller{font-family:ui-monospace,monospace}
td.lock-held{color:#1e6b1a}td.lock-no{color:#b00020;font-weight:600}td.lock-na{color:#777}
tr.hidden{display:none}
details{margin:4px 0}summary{cursor:pointer;font-weight:600}
.filter{font-weight:normal;color:#555}
table.index td{padding:4px 8px}
"""

JS = r"""
(function () {
  "use strict";
  var RUNS = JSON.parse(document.getElementById("kvmsim-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var CW = 64, LW = 200, HDR = 34, VROW = 18, SUB = 14, DETAIL = 24, GROUPS = 32, HS = 7;
  var LEVEL = {1: "4K", 2: "2M", 3: "1G", 4: "512G"};

  function el(tag, attrs, parent, text) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function hex(n) { return "0x" + n.toString(16); }
  function title(parent, text) { el("title", {}, parent, text); }

  function prepare(run) {
    var T = run.nsteps, F = {};
    run.fields.forEach(function (f, i) { F[f] = i + 1; });
    run.F = F;
    run.state = run.lanes.map(function (l) {
      var out = new Array(T), k = 0, cur = null;
      for (var t = 0; t < T; t++) {
        while (k < l.s.length && l.s[k][0] <= t) { cur = l.s[k]; k++; }
        out[t] = cur;
      }
      return out;
    });
    run.opsAt = {}; run.violAt = {};
    run.ops_cells.forEach(function (c) { run.opsAt[c[0] + ":" + c[1]] = c[2]; });
    run.viol_cells.forEach(function (c) { run.violAt[c[0] + ":" + c[1]] = c[2]; });
    run.stepInfo = [{i: 0, op: "set-up", text: "set-up: memslots, VMAs, drivers", violations: {}}].concat(run.steps);
  }

  function laneName(l) {
    var p = l.pfn[0] === l.pfn[1] ? "pfn " + hex(l.pfn[0]) : "pfn " + hex(l.pfn[0]) + "–" + hex(l.pfn[1]);
    var g = l.gfn ? (l.gfn[0] === l.gfn[1] ? "gfn " + hex(l.gfn[0]) : "gfn " + hex(l.gfn[0]) + "–" + hex(l.gfn[1])) : "no gfn";
    return [p, g];
  }

  function aggregate(run, lo, hi, t) {
    var F = run.F, s = {n: 0, ref: 0, pin: 0, dirty: 0, accessed: 0, freed: 0, present: 0, w: 0, a: 0, d: 0, level: 0, ops: 0, viol: 0};
    for (var j = lo; j < hi; j++) {
      var r = run.state[j][t];
      s.n += run.lanes[j].n;
      if (r) {
        ["ref", "pin", "dirty", "accessed", "freed", "present", "w", "a", "d"].forEach(function (f) { s[f] += r[F[f]]; });
        s.level = Math.max(s.level, r[F.level]);
      }
      s.ops += run.opsAt[t + ":" + j] || 0;
      s.viol += run.violAt[t + ":" + j] || 0;
    }
    return s;
  }

  function selectFilter(k, step, lane) {
    var sec = document.getElementById("run-" + k);
    var rows = sec.querySelectorAll("table.ops tr.op, table.ops tr.more");
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i];
      var ok = (step === null || r.getAttribute("data-step") === String(step)) &&
               (lane === null || r.getAttribute("data-lane") === String(lane));
      r.classList.toggle("hidden", !ok);
    }
    var srows = sec.querySelectorAll("table.steps tr[data-step]");
    for (i = 0; i < srows.length; i++) srows[i].classList.toggle("sel", step !== null && srows[i].getAttribute("data-step") === String(step));
    var f = sec.querySelector(".filter");
    f.textContent = "";
    if (step !== null || lane !== null) {
      f.appendChild(document.createTextNode("— showing " + (step !== null ? "step " + step : "every step") +
        (lane !== null ? ", " + laneName(RUNS[k].lanes[lane]).join(" ") : "") + " "));
      var a = document.createElement("a"); a.textContent = "(show all)"; a.href = "#";
      a.onclick = function (ev) { ev.preventDefault(); selectFilter(k, null, null); };
      f.appendChild(a);
    }
    sec.querySelector("details.ops").open = true;
  }

  function drawHeader(svg, run, k) {
    var T = run.nsteps;
    for (var t = 0; t < T; t++) {
      var info = run.stepInfo[t] || {i: t, op: "?", text: "", violations: {}};
      var invs = Object.keys(info.violations || {});
      var g = el("g", {"class": "hdr", "data-step": t}, svg);
      el("rect", {x: LW + t * CW + 1, y: 1, width: CW - 2, height: HDR - 2, rx: 3,
                  fill: invs.length ? "#fbd3d3" : "#eef1f5", stroke: invs.length ? "#d62828" : "#ccd3db"}, g);
      el("text", {x: LW + t * CW + 5, y: 14, "font-weight": "bold"}, g, String(t));
      el("text", {x: LW + t * CW + 5, y: 27, "class": "sub"}, g, info.op.length > 11 ? info.op.slice(0, 10) + "…" : info.op);
      title(g, "step " + t + ": " + info.text + (info.result ? " → " + info.result + (info.errno ? " " + info.errno : "") : ""));
      (function (t) { g.addEventListener("click", function () { selectFilter(k, t === 0 ? 0 : t, null); }); })(t);
      if (invs.length) {
        var vg = el("g", {"class": "vmark", "data-step": t, "data-inv": invs.join(" ")}, svg);
        el("rect", {x: LW + t * CW + 1, y: HDR + 1, width: CW - 2, height: VROW - 2, rx: 2, fill: "#d62828"}, vg);
        el("text", {x: LW + t * CW + 4, y: HDR + 13, fill: "#fff", "font-size": "10px"}, vg,
           invs[0] + (invs.length > 1 ? " +" + (invs.length - 1) : ""));
        title(vg, "violations after step " + t + ": " + invs.map(function (i) { return i + "×" + info.violations[i]; }).join(", "));
      }
    }
    el("text", {x: 4, y: 14, "class": "lbl", "font-weight": "bold"}, svg, "step");
    el("text", {x: 4, y: 27, "class": "sub"}, svg, "click: its operations");
    el("text", {x: 4, y: HDR + 13, "class": "sub"}, svg, "violations");
  }

  function cellRect(g, x, y, w, h, fill, opacity) {
    return el("rect", {x: x, y: y, width: w, height: h, fill: fill, "fill-opacity": opacity === undefined ? 1 : opacity}, g);
  }

  function drawDetail(svg, run, k, j, y) {
    var F = run.F, lane = run.lanes[j], H = 4 * SUB + 4, T = run.nsteps;
    var g = el("g", {"class": "lane", "data-lane": j, "data-pfn": lane.pfn[0]}, svg);
    el("line", {x1: 0, x2: LW + T * CW, y1: y + H, y2: y + H, stroke: "#e2e6ea"}, g);
    var nm = laneName(lane);
    el("text", {x: 4, y: y + 13, "class": "lbl"}, g, nm[0]);
    el("text", {x: 4, y: y + 27, "class": "lbl", fill: "#555"}, g, nm[1]);
    ["ref/pin", "PG", "SPTE", "ops"].forEach(function (s, i) {
      el("text", {x: LW - 38, y: y + i * SUB + 11, "class": "sub"}, g, s);
    });
    var prev = null;
    for (var t = 0; t < T; t++) {
      var r = run.state[j][t], x = LW + t * CW + 1, w = CW - 2;
      var c = el("g", {"class": "cell", "data-step": t, "data-lane": j}, g);
      if (r) {
        var ref = r[F.ref], pin = r[F.pin], chg = prev && (prev[F.ref] !== ref || prev[F.pin] !== pin);
        cellRect(c, x, y + 1, w, SUB - 1, ref > 0 ? "#dbe9fb" : "#f6f7f9");
        el("text", {x: x + 3, y: y + 11, "font-weight": chg ? "bold" : "normal"}, c, String(ref) + (pin ? " p" + pin : ""));
        if (r[F.freed]) {
          cellRect(c, x, y + SUB + 1, w, SUB - 1, "#555");
          el("text", {x: x + 3, y: y + SUB + 11, fill: "#fff"}, c, "freed");
        } else {
          if (r[F.dirty]) { cellRect(c, x, y + SUB + 1, w / 2 - 1, SUB - 1, "#f7b267"); el("text", {x: x + 3, y: y + SUB + 11}, c, "D"); }
          if (r[F.accessed]) { cellRect(c, x + w / 2, y + SUB + 1, w / 2, SUB - 1, "#9cc7f0"); el("text", {x: x + w / 2 + 3, y: y + SUB + 11}, c, "A"); }
        }
        if (r[F.present]) {
          cellRect(c, x, y + 2 * SUB + 1, w, SUB - 1, r[F.w] ? "#6cc463" : "#a7dba0");
          el("text", {x: x + 3, y: y + 2 * SUB + 11}, c,
             (LEVEL[r[F.level]] || "L" + r[F.level]) + " " + (r[F.w] ? "W" : "-") + (r[F.a] ? "A" : "-") + (r[F.d] ? "D" : "-"));
        } else {
          el("text", {x: x + 3, y: y + 2 * SUB + 11, fill: "#bbb"}, c, "—");
        }
      }
      var n = run.opsAt[t + ":" + j] || 0;
      if (n) el("text", {x: x + 3, y: y + 3 * SUB + 11, fill: "#6a3fb5"}, c, "● " + n);
      var v = run.violAt[t + ":" + j] || 0;
      if (v) {
        el("rect", {x: x, y: y + 1, width: w, height: H - 2, fill: "none", stroke: "#d62828", "stroke-width": 2, "class": "vcell"}, c);
        el("text", {x: x + w - 10, y: y + 3 * SUB + 11, fill: "#d62828", "font-weight": "bold"}, c, "!");
      }
      var tip = "step " + t + " · " + nm.join(" ");
      if (r) tip += "\nfolio_ref_count " + r[F.ref] + ", pin " + r[F.pin] + (r[F.dirty] ? ", PG_dirty" : "") +
        (r[F.accessed] ? ", PG_referenced" : "") + (r[F.freed] ? ", freed" : "") +
        (r[F.present] ? "\nSPTE present " + (LEVEL[r[F.level]] || r[F.level]) + (r[F.w] ? " W" : "") + (r[F.a] ? " A" : "") + (r[F.d] ? " D" : "") : "\nno SPTE");
      tip += "\n" + n + " journal fact(s)" + (v ? ", " + v + " violation(s)" : "");
      title(c, tip);
      (function (t) { c.addEventListener("click", function () { selectFilter(k, t, j); }); })(t);
      prev = r;
    }
    return H;
  }

  function drawGroup(svg, run, k, lo, hi, y, zoomable, onZoom) {
    var H = 7 * HS + 4, T = run.nsteps, first = run.lanes[lo], last = run.lanes[hi - 1];
    var g = el("g", {"class": zoomable ? "grp" : "grp1", "data-lo": lo, "data-hi": hi}, svg);
    el("rect", {x: 0, y: y, width: LW, height: H, fill: "#fff", "class": "bgr"}, g);
    el("line", {x1: 0, x2: LW + T * CW, y1: y + H, y2: y + H, stroke: "#e2e6ea"}, g);
    var pages = 0;
    for (var j = lo; j < hi; j++) pages += run.lanes[j].n;
    var g0 = first.gfn, g1 = last.gfn;
    el("text", {x: 4, y: y + 12, "class": "lbl"}, g, g0 ? "gfn " + hex(g0[0]) + "–" + hex((g1 || g0)[1]) : "pfn " + hex(first.pfn[0]) + "…");
    el("text", {x: 4, y: y + 25, "class": "sub"}, g, pages + " pages" + (zoomable ? " · click to zoom" : " (one lane)"));
    el("text", {x: 4, y: y + 37, "class": "sub"}, g, "rows: P W D · PG_dirty A · ops · !");
    var rows = [["present", "#2e9e3e"], ["w", "#136b1f"], ["d", "#8a6d00"], ["dirty", "#e07b00"], ["accessed", "#1f6fc2"]];
    for (var t = 0; t < T; t++) {
      var s = aggregate(run, lo, hi, t), x = LW + t * CW + 1, w = CW - 2;
      rows.forEach(function (rw, i) {
        cellRect(g, x, y + 1 + i * HS, w, HS - 1, "#f1f3f5");
        if (s[rw[0]]) cellRect(g, x, y + 1 + i * HS, w, HS - 1, rw[1], 0.15 + 0.85 * s[rw[0]] / s.n);
      });
      cellRect(g, x, y + 1 + 5 * HS, w, HS - 1, "#f1f3f5");
      if (s.ops) cellRect(g, x, y + 1 + 5 * HS, w, HS - 1, "#6a3fb5", Math.min(1, 0.25 + Math.log(1 + s.ops) / Math.log(1 + 4 * s.n)));
      cellRect(g, x, y + 1 + 6 * HS, w, HS - 1, s.viol ? "#d62828" : "#f1f3f5");
      if (s.viol) el("rect", {x: x, y: y + 1, width: w, height: H - 2, fill: "none", stroke: "#d62828", "stroke-width": 1.5, "class": "vcell"}, g);
      title(el("rect", {x: x, y: y, width: w, height: H, fill: "transparent"}, g),
        "step " + t + " · " + s.n + " pages\nSPTE present " + s.present + ", W " + s.w + ", A " + s.a + ", D " + s.d +
        (s.level ? ", largest " + (LEVEL[s.level] || s.level) : "") + "\nPG_dirty " + s.dirty + ", PG_referenced " + s.accessed +
        ", freed " + s.freed + "\nrefcount sum " + s.ref + ", pins " + s.pin + "\n" + s.ops + " journal fact(s), " + s.viol + " violation(s)");
    }
    if (zoomable) g.addEventListener("click", onZoom);
    return H;
  }

  function render(k) {
    var run = RUNS[k], pane = panes[k], T = run.nsteps;
    var box = document.querySelector('.tl[data-run="' + k + '"]');
    var scroll = box.querySelector(".tl-scroll"), nav = box.querySelector(".tl-nav");
    scroll.textContent = ""; nav.textContent = "";
    var lo = pane.lo, hi = pane.hi, n = hi - lo;
    // breadcrumb
    pane.stack.forEach(function (z, i) {
      var a = document.createElement("a");
      a.textContent = i === 0 ? "all " + run.pages + " pages" : "lanes " + z[0] + "–" + (z[1] - 1);
      a.onclick = function () { pane.lo = z[0]; pane.hi = z[1]; pane.stack = pane.stack.slice(0, i); render(k); };
      nav.appendChild(a); nav.appendChild(document.createTextNode(" › "));
    });
    nav.appendChild(document.createTextNode(n === run.lanes.length ? "all " + run.pages + " pages (" + n + " lanes)" : "lanes " + lo + "–" + (hi - 1)));
    var svg = el("svg", {xmlns: NS, "class": "timeline", "data-policy": run.policy});
    drawHeader(svg, run, k);
    var y = HDR + VROW + 2;
    if (n === 0) {
      el("text", {x: 4, y: y + 14, "class": "lbl"}, svg, run.error ? "no pages: " + run.error : "no pages touched");
      y += 24;
    } else if (n <= DETAIL) {
      for (var j = lo; j < hi; j++) {
        y += run.lanes[j].n === 1 ? drawDetail(svg, run, k, j, y) : drawGroup(svg, run, k, j, j + 1, y, false);
      }
    } else {
      var per = Math.ceil(n / GROUPS);
      for (var a = lo; a < hi; a += per) {
        (function (a, b) {
          y += drawGroup(svg, run, k, a, b, y, true, function () {
            pane.stack.push([pane.lo, pane.hi]); pane.lo = a; pane.hi = b; render(k);
          });
        })(a, Math.min(hi, a + per));
      }
    }
    for (var t = 0; t <= T; t++) el("line", {x1: LW + t * CW, x2: LW + t * CW, y1: HDR + VROW, y2: y, stroke: "#e8ebee"}, svg);
    svg.setAttribute("width", LW + T * CW + 2);
    svg.setAttribute("height", y + 2);
    scroll.appendChild(svg);
  }

  var panes = RUNS.map(function (run) { return {lo: 0, hi: run.lanes.length, stack: []}; });
  // a link can open zoomed in: #run0=LO-HI (lanes LO..HI-1 of the first run), several joined by "&"
  (location.hash || "").replace(/^#/, "").split("&").forEach(function (part) {
    var m = /^run(\d+)=(\d+)-(\d+)$/.exec(part);
    if (!m || !RUNS[+m[1]]) return;
    var k = +m[1], lo = Math.max(0, +m[2]), hi = Math.min(RUNS[k].lanes.length, +m[3]);
    if (lo < hi) panes[k] = {lo: lo, hi: hi, stack: [[0, RUNS[k].lanes.length]]};
  });
  RUNS.forEach(function (run, k) { prepare(run); render(k); });
  document.body.setAttribute("data-rendered", String(RUNS.length));
})();
"""
