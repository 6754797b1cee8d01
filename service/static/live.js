// rpnt live page: reads GET /events (server-sent events, see service/live.py) and draws it.
// No dependencies and nothing fetched from anywhere but this server.
"use strict";

const TRAIL = 500;          // bins of trajectory drawn
const $ = (id) => document.getElementById(id);
const fmt = (x, d = 0) => (x === undefined || x === null) ? "–" : Number(x).toLocaleString("en-US",
  { minimumFractionDigits: d, maximumFractionDigits: d });

const traj = { epoch: null, pos: null, trail: [], integrate: true, dims: 0, drawn: 0 };
let lastBins = null;

function setConn(text, cls) {
  const el = $("conn");
  el.textContent = text;
  el.className = "pill " + cls;
}

// one prediction [epoch, bin, flags, y0, y1, ...] → a point of the trail
function addPoint(p, binS) {
  const [epoch, bin, , ...y] = p;
  if (epoch !== traj.epoch) {  // a new stream: start a new path
    traj.epoch = epoch; traj.trail = []; traj.pos = null;
  }
  if (y.some((v) => v === null)) return;  // a bin the decoder could not decode
  let xy;
  if (y.length === 1) {
    xy = [bin * binS, y[0]];  // one output: its time course
  } else if (traj.integrate) {
    traj.pos = traj.pos ? [traj.pos[0] + y[0] * binS, traj.pos[1] + y[1] * binS] : [0, 0];
    xy = traj.pos;
  } else {
    xy = [y[0], y[1]];
  }
  traj.trail.push(xy);
  if (traj.trail.length > TRAIL) traj.trail.splice(0, traj.trail.length - TRAIL);
}

function drawTrajectory() {
  const c = $("traj");
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  const t = traj.trail;
  traj.drawn = t.length;
  c.dataset.points = String(t.length);
  if (t.length < 2) return;
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of t) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  const pad = 24, w = c.width - 2 * pad, h = c.height - 2 * pad;
  let sx = w / Math.max(x1 - x0, 1e-9), sy = h / Math.max(y1 - y0, 1e-9);
  if (traj.dims >= 2) { sx = sy = Math.min(sx, sy); }  // a path keeps its aspect ratio
  const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
  const X = (x) => c.width / 2 + (x - cx) * sx, Y = (y) => c.height / 2 - (y - cy) * sy;
  ctx.strokeStyle = "#e3e6ea"; ctx.lineWidth = 1;  // frame
  ctx.strokeRect(pad / 2, pad / 2, c.width - pad, c.height - pad);
  ctx.lineWidth = 2; ctx.lineJoin = "round";
  for (let i = 1; i < t.length; i++) {  // older segments fade
    ctx.strokeStyle = `rgba(37, 99, 235, ${0.15 + 0.85 * i / t.length})`;
    ctx.beginPath(); ctx.moveTo(X(t[i - 1][0]), Y(t[i - 1][1])); ctx.lineTo(X(t[i][0]), Y(t[i][1])); ctx.stroke();
  }
  const [lx, ly] = t[t.length - 1];
  ctx.fillStyle = "#b91c1c"; ctx.beginPath(); ctx.arc(X(lx), Y(ly), 5, 0, 2 * Math.PI); ctx.fill();
}

function row(cells, cls = []) {
  const tr = document.createElement("tr");
  cells.forEach((v, i) => { const td = document.createElement("td"); td.textContent = v; if (cls[i]) td.className = cls[i]; tr.append(td); });
  return tr;
}

function update(s) {
  const c = s.counters;
  $("model-version").textContent = s.model.version;
  $("generation").textContent = s.model.generation;
  $("registry-version").textContent = s.model.registry_version ?? "–";
  $("swap-pending").hidden = !s.model.swap_pending;
  $("bins").textContent = fmt(c.bins);
  if (lastBins) {
    const dt = s.t - lastBins.t;
    if (dt > 0) $("bins-rate").textContent = fmt((c.bins - lastBins.bins) / dt, 1);
  }
  lastBins = { t: s.t, bins: c.bins };
  const lost = c.bins_stalled + c.gaps + c.late_packets + c.publish_dropped + c.decode_errors;
  $("lost").textContent = fmt(lost);
  $("lost-detail").textContent = `stalled ${fmt(c.bins_stalled)} · gaps ${fmt(c.gaps)} · late ${fmt(c.late_packets)}` +
    ` · dropped ${fmt(c.publish_dropped)} · errors ${fmt(c.decode_errors)}`;
  $("rejects").textContent = fmt(s.rejected_total);
  const reasons = Object.entries(s.rejected).map(([r, n]) => `${r} ${fmt(n)}`);
  $("rejects-detail").textContent = reasons.length ? reasons.join(" · ") : "none";
  $("uptime").textContent = s.uptime_s < 120 ? `${fmt(s.uptime_s)} s` : `${fmt(s.uptime_s / 60, 1)} min`;
  $("running").textContent = s.running ? "decode loop running" : "decode loop stopped";

  const lat = $("latency");
  lat.replaceChildren(...Object.entries(s.latency_ms).map(([stage, l]) =>
    row([stage, fmt(l.p50_ms, 3), fmt(l.p99_ms, 3), fmt(l.max_ms, 3), fmt(l.count)])));

  const cal = s.calibration;
  $("cal-totals").textContent = Object.entries(cal.totals).map(([k, n]) => `${k} ${n}`).join(" · ");
  $("cal-running").textContent = cal.running ? `job ${cal.running} running` : "no job running";
  if (cal.jobs) {
    $("jobs").replaceChildren(...cal.jobs.map((j) => row(
      [j.id, j.state, j.source ?? "", j.version ?? "", j.phase ?? ""], [null, "state-" + j.state])));
  }

  traj.dims = s.n_outputs;
  traj.integrate = /velocity/i.test(s.target);
  $("traj-title").textContent = s.n_outputs === 1 ? `decoded ${s.target} over time`
    : traj.integrate ? `decoded ${s.target}, integrated (last ${TRAIL} bins)` : `decoded ${s.target} (last ${TRAIL} bins)`;
  for (const p of s.points) addPoint(p, s.bin_s);
  if (!s.trajectory) $("traj-note").textContent = "no predictions here: the daemon publishes on inproc://";
  else if (traj.trail.length) $("traj-note").textContent = `stream ${traj.epoch}, ${s.n_outputs} outputs`;
  drawTrajectory();
}

const es = new EventSource("/events");
es.addEventListener("state", (e) => { setConn("live", "ok"); update(JSON.parse(e.data)); });
es.onerror = () => setConn("reconnecting…", "bad");
