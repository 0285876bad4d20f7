// lorasup dashboard: the job list (/) and a run page (/jobs/<id>), live from /events.
// Trainer text is only ever set as textContent, never as HTML.
"use strict";

(function () {
  const FINAL = new Set(["completed", "failed", "cancelled", "lost"]);
  const POINTS = 2000;

  // --- on --listen the token was exchanged for an HttpOnly session cookie (/?token=...,
  // once); the browser sends it on its own, and every change carries X-Lorasup-CSRF -------
  function headers(extra) {
    return Object.assign({"X-Lorasup-CSRF": "1"}, extra || {});
  }

  const SIGN_IN = "not signed in: open this page once as /?token=<the --token-file token>";

  async function api(path, options) {
    const opts = Object.assign({credentials: "same-origin", cache: "no-store"}, options || {});
    opts.headers = headers(opts.headers);
    if (opts.body !== undefined) opts.headers["Content-Type"] = "application/json";
    const r = await fetch(path, opts);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (r.status === 401) throw new Error(SIGN_IN);
    if (!r.ok) throw new Error((data && data.error) || ("HTTP " + r.status));
    return data;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined)
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "";
    if (typeof x === "string") return x;
    if (!isFinite(x)) return String(x);
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(digits || 3);
    return x.toFixed(digits || 4).replace(/\.?0+$/, "") || "0";
  }

  function duration(s) {
    if (s === null || s === undefined || !isFinite(s) || s < 0) return "";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(sec).padStart(2, "0")}s`
      : `${sec}s`;
  }

  // GPU memory as the daemon sampled it (absent: not measured, and gpu_memory_absent says why)
  function mib(x) { return x >= 10240 ? (x / 1024).toFixed(1) + " GiB" : Math.round(x) + " MiB"; }
  function gpuMemory(job) {
    const m = job.gpu_memory;
    if (!m) return "";
    const device = `${mib(m.used_mib)}/${mib(m.total_mib)} on GPU ${m.device}`;
    return m.job_mib !== undefined ? `job ${mib(m.job_mib)} · ${device}` : device;
  }
  function gpuMemoryWords(job) {
    const parts = [];
    if (job.gpu_memory) parts.push(gpuMemory(job));
    else if (job.gpu_memory_absent) parts.push("not measured — " + job.gpu_memory_absent);
    const peak = job.gpu_memory_peak;
    if (peak) parts.push("peak " + [peak.job_mib !== undefined ? "job " + mib(peak.job_mib) : null,
      peak.used_mib !== undefined ? "GPU " + mib(peak.used_mib) : null]
      .filter(Boolean).join(", "));
    return parts.join("; ");
  }
  // what "add N steps" can continue: a job that ended well enough (the daemon decides)
  function extendable(job) {
    return job.state === "completed" || job.state === "cancelled" ||
      (job.state === "failed" && job.outcome === "preempted");
  }

  function eta(job) {
    if (job.state !== "running" || !job.steps || job.step === null || !job.steps_per_second)
      return null;
    return (job.steps - job.step) / job.steps_per_second;
  }

  // --- confirmation: an on-page dialog (data-testid="confirm") -------------------------
  function ask(text) {
    const dialog = document.getElementById("dialog");
    document.getElementById("dialog-text").textContent = text;
    dialog.hidden = false;
    return new Promise((resolve) => {
      const ok = document.getElementById("dialog-ok");
      const no = document.getElementById("dialog-no");
      function done(answer) {
        dialog.hidden = true;
        ok.onclick = null; no.onclick = null;
        resolve(answer);
      }
      ok.onclick = () => done(true);
      no.onclick = () => done(false);
      ok.focus();
    });
  }

  async function cancelJob(job) {
    if (!(await ask(`Cancel job ${job.id} (${job.name})? A running job is stopped and saved.`)))
      return;
    try { await api(`/jobs/${job.id}/cancel`, {method: "POST", body: "{}"}); }
    catch (e) { alert("cancel: " + e.message); }
  }

  async function movePriority(job, delta) {
    const to = job.priority + delta;
    if (!(await ask(`Set job ${job.id}'s priority to ${to}?`))) return;
    try {
      await api(`/jobs/${job.id}/priority`,
                {method: "POST", body: JSON.stringify({priority: to})});
    } catch (e) { alert("priority: " + e.message); }
  }

  // --- the daemon-wide stream, read with fetch (Last-Event-ID set by hand on a resume) ---
  function connect(handlers) {
    let lastId = null;
    const conn = document.getElementById("conn");
    async function run() {
      for (;;) {
        try {
          const h = headers({Accept: "text/event-stream"});
          if (lastId) h["Last-Event-ID"] = lastId;
          const r = await fetch("/events",
                                {headers: h, credentials: "same-origin", cache: "no-store"});
          if (r.status === 400 && lastId) { lastId = null; continue; }
          if (r.status === 401) throw new Error(SIGN_IN);
          if (!r.ok) throw new Error("HTTP " + r.status);
          conn.textContent = "live"; conn.className = "conn live";
          const reader = r.body.getReader();
          const decoder = new TextDecoder();
          let buffer = "";
          for (;;) {
            const {value, done} = await reader.read();
            if (done) break;
            buffer += decoder.decode(value, {stream: true});
            let cut;
            while ((cut = buffer.indexOf("\n\n")) >= 0) {
              const block = buffer.slice(0, cut);
              buffer = buffer.slice(cut + 2);
              let kind = "message", data = "";
              for (const line of block.split("\n")) {
                if (line.startsWith("event: ")) kind = line.slice(7);
                else if (line.startsWith("data: ")) data += line.slice(6);
                else if (line.startsWith("id: ")) lastId = line.slice(4);
              }
              if (!data) continue;
              let payload;
              try { payload = JSON.parse(data); } catch (e) { continue; }
              (handlers[kind] || handlers.record || (() => {}))(payload, kind);
            }
          }
        } catch (e) {
          if (e.message === SIGN_IN) {  // waiting changes nothing: say what to do
            conn.textContent = SIGN_IN; conn.className = "conn";
            return;
          }
        }
        conn.textContent = "reconnecting…"; conn.className = "conn";
        await new Promise((r) => setTimeout(r, 1000));  // never faster than 1 s
      }
    }
    run();
  }

  // --- the job list ----------------------------------------------------------------------
  function listPage(main) {
    const jobs = new Map();
    const body = el("tbody");
    const empty = el("div", {class: "empty", text: "No jobs yet. Submit one with lorasup submit."});
    main.append(el("h1", {text: "Jobs"}), el("table", {},
      el("thead", {}, el("tr", {}, ...["id", "name", "state", "priority", "slot", "attempt",
        "step", "last loss", "ETA", "outcome", "GPU memory",
        ""].map((t) => el("th", {text: t})))),
      body), empty);

    function row(job) {
      const tr = el("tr", {"data-testid": "job-row", "data-job-id": job.id,
                           "data-state": job.state});
      const step = job.step === null || job.step === undefined ? "" :
        (job.steps ? `${job.step}/${job.steps}` : String(job.step));
      const actions = el("td");
      if (job.state === "queued") {
        actions.append(el("button", {title: "priority up", "data-testid": "priority-up",
                                     onclick: () => movePriority(job, 1)}, "▲"), " ",
                       el("button", {title: "priority down", "data-testid": "priority-down",
                                     onclick: () => movePriority(job, -1)}, "▼"), " ");
      }
      if (!FINAL.has(job.state)) {
        actions.append(el("button", {class: "danger", "data-testid": "cancel",
                                     onclick: () => cancelJob(job)}, "cancel"));
      }
      tr.append(
        el("td", {class: "num", text: job.id}),
        el("td", {}, el("a", {href: `/jobs/${job.id}`, text: job.name})),
        el("td", {}, el("span", {class: "state state-" + job.state, text: job.state})),
        el("td", {class: "num", text: job.priority}),
        el("td", {text: job.slot || ""}),
        el("td", {class: "num", text: job.attempt || ""}),
        el("td", {class: "num", text: step}),
        el("td", {class: "num", text: fmt(job.loss)}),
        el("td", {class: "num", text: duration(eta(job))}),
        el("td", {text: job.outcome || "", title: job.reason || ""}),
        el("td", {class: "num", "data-testid": "gpu-memory", text: gpuMemory(job),
                  title: job.gpu_memory ? "" : (job.gpu_memory_absent || "")}),
        actions);
      return tr;
    }

    function render() {
      const sorted = [...jobs.values()].sort((a, b) => b.id - a.id);
      body.replaceChildren(...sorted.map(row));
      empty.hidden = sorted.length > 0;
    }

    connect({
      jobs: (data) => { jobs.clear(); for (const j of data.jobs) jobs.set(j.id, j); render(); },
      job: (job) => { jobs.set(job.id, job); render(); },
      step: (rec) => {
        const job = jobs.get(rec.job);
        if (!job) return;
        job.step = rec.step;
        if (rec.loss !== undefined) job.loss = rec.loss;
        render();
      },
      record: () => {},
    });
  }

  // --- a run page ------------------------------------------------------------------------
  function runPage(main, id) {
    let job = null;
    let series = null;          // the last /series answer
    let tail = [];              // live steps after it: {step, loss, lr, t}
    let plot = null, pacePlot = null;
    const state = {alpha: 0.9, log: false, x: "step"};

    const title = el("h1", {text: `Job ${id}`});
    const facts = el("div", {class: "facts"});
    const buttons = el("div", {class: "controls"});
    const memory = el("div", {class: "facts", "data-testid": "gpu-memory"});
    // "add N steps": kept across redraws of the buttons (a number being typed stays)
    const extendSteps = el("input", {type: "number", min: "1", step: "1", value: "100",
                                     "data-testid": "extend-steps", "aria-label": "steps to add"});
    const extendError = el("span", {class: "error", "data-testid": "extend-error"});
    const extendBox = el("span", {class: "extend"}, "add ", extendSteps, " steps ",
      el("button", {"data-testid": "extend", onclick: () => extendJob()}, "add steps"), " ",
      extendError);
    const emaLabel = el("span", {text: "0.90"});
    const controls = el("div", {class: "controls"},
      el("label", {}, "EMA ", el("input", {type: "range", min: "0", max: "0.99", step: "0.01",
        value: "0.9", "data-testid": "ema", oninput: (e) => {
          state.alpha = Number(e.target.value); emaLabel.textContent = state.alpha.toFixed(2);
          draw();
        }}), " ", emaLabel),
      el("label", {}, el("input", {type: "checkbox", "data-testid": "log-y", onchange: (e) => {
        state.log = e.target.checked; draw(true); }}), " log y"),
      el("label", {}, "x: ", el("select", {"data-testid": "x-axis", onchange: (e) => {
        state.x = e.target.value; draw(true); }},
        el("option", {value: "step", text: "steps"}),
        el("option", {value: "time", text: "wall clock"}))));
    const chart = el("div", {"data-testid": "loss-chart", "data-last-step": "",
                             "data-points": "0"});
    const paceChart = el("div", {"data-testid": "pace-chart"});
    const markerList = el("div", {class: "markers"});
    const stall = el("div", {class: "stall", hidden: true});
    const logTail = el("pre", {"data-testid": "log-tail"});
    main.append(title, facts, memory, buttons, stall, controls, chart, markerList,
                el("h2", {text: "seconds per step"}), paceChart,
                el("h2", {text: "trainer log (last 200 lines)"}), logTail);

    function showJob() {
      if (!job) return;
      title.textContent = `Job ${job.id}: ${job.name}`;
      const items = [["state", job.state], ["priority", job.priority], ["slot", job.slot],
        ["attempt", job.attempt], ["step", job.steps ? `${job.step ?? "?"}/${job.steps}`
          : job.step], ["loss", fmt(job.loss)], ["ETA", duration(eta(job))],
        ["outcome", job.outcome], ["reason", job.reason]];
      facts.replaceChildren(...items.filter(([, v]) => v !== null && v !== undefined && v !== "")
        .map(([k, v]) => el("span", {"data-testid": "fact-" + k}, el("b", {text: k}), String(v))));
      memory.replaceChildren(el("b", {text: "GPU memory"}),
                             gpuMemoryWords(job) || "not measured");
      buttons.replaceChildren();
      if (extendable(job)) buttons.append(extendBox);
      if (job.state === "queued") {
        buttons.append(el("button", {"data-testid": "priority-up",
                                     onclick: () => movePriority(job, 1)}, "priority ▲"),
                       el("button", {"data-testid": "priority-down",
                                     onclick: () => movePriority(job, -1)}, "priority ▼"));
      }
      if (!FINAL.has(job.state)) {
        buttons.append(el("button", {class: "danger", "data-testid": "cancel",
                                     onclick: () => cancelJob(job)}, "cancel (stop and save)"));
      }
    }

    async function extendJob() {
      extendError.textContent = "";
      const n = Number(extendSteps.value);
      if (!Number.isInteger(n) || n < 1) {
        extendError.textContent = "steps: a whole number of at least 1";
        return;
      }
      const total = (job.steps || 0) + n;
      if (!(await ask(`Add ${n} steps to job ${job.id} (${job.name})? A new job continues it ` +
                      `from its last save to ${total} steps in all.`))) return;
      try {
        const made = await api(`/jobs/${job.id}/extend`,
                               {method: "POST", body: JSON.stringify({steps: n})});
        location.assign(`/jobs/${made.id}`);
      } catch (e) { extendError.textContent = "add steps: " + e.message; }
    }

    // the points: history buckets, then the live tail (one point per step)
    function points() {
      const rows = [];
      if (series) {
        for (let i = 0; i < series.points; i++) {
          rows.push({step: series.last[i], t: series.t ? series.t[i] : null,
                     mean: series.mean[i], min: series.min[i], max: series.max[i],
                     count: series.count[i], nonfinite: series.nonfinite[i],
                     lr: series.lr ? series.lr[i] : null,
                     pace: series.s_per_step ? series.s_per_step[i] : null});
        }
      }
      const last = rows.length ? rows[rows.length - 1].step : -Infinity;
      for (const p of tail) if (p.step > last) {
        const finite = typeof p.loss === "number" && isFinite(p.loss);
        rows.push({step: p.step, t: p.t, mean: finite ? p.loss : null,
                   min: finite ? p.loss : null, max: finite ? p.loss : null,
                   count: p.loss === undefined ? 0 : 1, nonfinite: finite ? 0 : 1,
                   lr: p.lr ?? null, pace: null});
      }
      return rows;
    }

    function markers() {
      const list = series ? series.markers.slice() : [];
      for (const p of tail) {
        if (p.marker) list.push(p.marker);
      }
      return list;
    }

    function draw(rebuild) {
      const rows = points();
      const x = rows.map((r) => state.x === "time" && r.t !== null ? r.t : r.step);
      const pos = (v) => (state.log && v !== null && v <= 0 ? null : v);
      const ema = [], avg = [];
      let v = 0, k = 0, sum = 0, n = 0;
      for (const r of rows) {
        if (r.mean !== null && r.mean !== undefined) {
          v = state.alpha * v + (1 - state.alpha) * r.mean; k += 1;
          sum += r.mean * Math.max(r.count - r.nonfinite, 1); n += Math.max(r.count - r.nonfinite, 1);
        }
        // de-biased: divide by the weight the zero start took away
        ema.push(k ? pos(state.alpha === 0 ? v : v / (1 - Math.pow(state.alpha, k))) : null);
        avg.push(n ? pos(sum / n) : null);
      }
      // per-epoch mean: a point at each epoch's last step
      const epochMean = rows.map(() => null);
      const ep = series && series.epochs;
      if (ep) {
        let at = 0;
        for (let e = 0; e < ep.epoch.length; e++) {
          while (at < rows.length - 1 && rows[at].step < ep.last[e]) at++;
          if (rows.length) epochMean[at] = pos(ep.mean[e]);
        }
      }
      const data = [x, rows.map((r) => pos(r.mean)), rows.map((r) => pos(r.min)),
                    rows.map((r) => pos(r.max)), ema, avg, rows.map((r) => r.lr), epochMean];
      const lastStep = rows.length ? rows[rows.length - 1].step : "";
      chart.dataset.lastStep = String(lastStep);
      chart.dataset.points = String(rows.length);
      const marks = markers();
      markerList.replaceChildren(...marks.map((m) => el("span", {
        class: "marker marker-" + m.kind, "data-testid": "marker", "data-kind": m.kind,
        "data-step": m.step ?? "", title: m.label || "",
        text: `${m.kind}${m.step !== null && m.step !== undefined ? " @" + m.step : ""}` +
          (m.label ? ": " + m.label : "")})));
      if (typeof uPlot === "undefined") return;
      const width = Math.max(320, main.clientWidth - 8);
      if (plot && !rebuild) {
        plot.setData(data);
      } else {
        if (plot) plot.destroy();
        const hasLr = rows.some((r) => r.lr !== null && r.lr !== undefined);
        plot = new uPlot({
          width, height: 340, title: "loss",
          scales: {x: {time: state.x === "time"}, y: {distr: state.log ? 3 : 1},
                   lr: {auto: true}},
          series: [
            {label: state.x === "time" ? "time" : "step"},
            {label: "loss (bucket mean)", stroke: "#2563eb", width: 1, spanGaps: false},
            {label: "min", stroke: "rgba(37,99,235,0.25)", width: 1},
            {label: "max", stroke: "rgba(37,99,235,0.25)", width: 1},
            {label: "EMA", stroke: "#e8590c", width: 2},
            {label: "running avg", stroke: "#2b8a3e", width: 1, dash: [4, 4]},
            {label: "lr", stroke: "#7048e8", width: 1, scale: "lr", show: hasLr},
            {label: "epoch mean", stroke: "#c2255c", width: 2, spanGaps: true,
             points: {show: true, size: 7}},
          ],
          bands: [{series: [3, 2], fill: "rgba(37,99,235,0.08)"}],
          axes: [{}, {label: "loss"}, {scale: "lr", side: 1, label: "lr", grid: {show: false},
                  values: (u, ticks) => ticks.map((t) => t.toExponential(1))}],
          hooks: {draw: [(u) => drawMarkers(u)]},
        }, data, chart);
      }
      const pace = rows.filter((r) => r.pace !== null && r.pace !== undefined);
      if (pace.length && typeof uPlot !== "undefined") {
        const pd = [pace.map((r) => state.x === "time" && r.t !== null ? r.t : r.step),
                    pace.map((r) => r.pace)];
        if (pacePlot && !rebuild) pacePlot.setData(pd);
        else {
          if (pacePlot) pacePlot.destroy();
          pacePlot = new uPlot({width, height: 140, scales: {x: {time: state.x === "time"}},
            series: [{}, {label: "s/step", stroke: "#495057", width: 1}],
            axes: [{}, {size: 64,
                        values: (u, ticks) => ticks.map((t) => Number(t.toPrecision(3)))}]},
            pd, paceChart);
        }
      }
    }

    const COLORS = {nan: "#c0262d", checkpoint: "#18794e", resume: "#b54708",
                    signal: "#b54708", outcome: "#1e40af", problem: "#c0262d",
                    stacks: "#c0262d"};
    function drawMarkers(u) {
      const ctx = u.ctx;
      ctx.save();
      for (const m of markers()) {
        const at = state.x === "time" ? m.t : m.step;
        if (at === null || at === undefined) continue;
        const px = u.valToPos(at, "x", true);
        if (!isFinite(px)) continue;
        ctx.strokeStyle = COLORS[m.kind] || "#666";
        ctx.lineWidth = m.kind === "nan" ? 2 : 1;
        ctx.setLineDash(m.kind === "checkpoint" ? [3, 3] : []);
        ctx.beginPath();
        ctx.moveTo(px, u.bbox.top);
        ctx.lineTo(px, u.bbox.top + u.bbox.height);
        ctx.stroke();
      }
      ctx.restore();
    }

    function showStall() {
      if (!series || (!series.stall && !series.stacks)) { stall.hidden = true; return; }
      stall.hidden = false;
      const parts = [el("b", {text: "No progress / hung"})];
      if (series.stall) parts.push(el("div", {text:
        `${series.stall.problem} at step ${series.stall.step ?? "?"}: ${series.stall.line}`}));
      if (series.stacks) {
        parts.push(el("div", {text: "stacks: " + series.stacks.reason}));
        const text = [];
        for (const p of series.stacks.processes) {
          text.push(`${p.role || "process"} pid ${p.pid ?? "?"}: ${p.where || p.error || ""}`);
          for (const th of Array.isArray(p.threads) ? p.threads : []) {
            text.push(`  thread ${th.name || "?"}${th.active ? " (active)" : ""}`);
            for (const f of Array.isArray(th.frames) ? th.frames : [])
              text.push(`    ${f.file}:${f.line} ${f.function}`);
          }
        }
        parts.push(el("pre", {"data-testid": "stacks", text: text.join("\n")}));
      }
      stall.replaceChildren(...parts);
    }

    let fetching = false;
    async function refetch() {
      if (fetching) return;
      fetching = true;
      try {
        series = await api(`/jobs/${id}/series?points=${POINTS}`);
        tail = tail.filter((p) => p.step > (series.last_step ?? -1));
      } catch (e) { /* shown by the job facts */ }
      fetching = false;
      draw(true);
      showStall();
    }

    async function refreshLog() {
      try {
        const data = await api(`/jobs/${id}/tail`);
        logTail.textContent = data.lines.join("\n");
        logTail.scrollTop = logTail.scrollHeight;
      } catch (e) { /* keep the last text */ }
    }

    api(`/jobs/${id}`).then((j) => { job = j; showJob(); }).catch((e) => {
      title.textContent = `Job ${id}: ${e.message}`;
    });
    refetch();
    refreshLog();
    // the log is not on the event stream: refreshed every 2 s while the job is not final
    setInterval(() => { if (job && !FINAL.has(job.state)) refreshLog(); }, 2000);

    const MARKED = {checkpoint: "checkpoint", resumed: "resume", signal: "signal",
                    outcome: "outcome"};
    connect({
      jobs: (data) => {
        for (const j of data.jobs) if (j.id === id) { job = j; showJob(); }
      },
      job: (j) => {
        if (j.id !== id) return;
        const was = job && job.state;
        job = j; showJob();
        if (FINAL.has(j.state) && was !== j.state) { refetch(); refreshLog(); }
      },
      step: (rec) => {
        if (rec.job !== id) return;
        const loss = rec.loss ?? rec.avg_loss;
        const value = typeof loss === "string" ? Number(loss) : loss;
        const t = series && series.attempt_start !== undefined && typeof rec.t === "number"
          ? series.attempt_start + rec.t : null;
        const p = {step: rec.step, loss: value, lr: rec.lr, t};
        if (value !== undefined && value !== null && !isFinite(value))
          p.marker = {kind: "nan", step: rec.step, t, label: String(loss)};
        tail.push(p);
        if (job) { job.step = rec.step; if (loss !== undefined) job.loss = loss; }
        if (tail.length > 4 * POINTS) refetch(); else draw(false);
      },
      resync: (rec) => { if (rec.job === id) refetch(); },
      record: (rec, kind) => {
        if (rec.job !== id) return;
        if (MARKED[kind] || kind === "stacks" || kind === "problem") refetch();
      },
    });
    window.addEventListener("resize", () => draw(true));
  }

  function start() {
    const main = document.getElementById("main");
    const m = /^\/jobs\/([0-9]{1,18})$/.exec(location.pathname);
    if (m) runPage(main, Number(m[1])); else listPage(main);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
