// app.js — browser front end of the PCB inspection viewer: routes on location.pathname, renders each page from the JSON API, keeps it live from /api/events.
'use strict';

// ---------- small helpers ----------

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
const app = $('#app');

// Ids, board names and class names come from users' files: everything from the API goes through esc() before it meets innerHTML.
function esc(v) {
  return String(v ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

const pad = (n) => String(n).padStart(2, '0');
function fmtTime(ms) {
  if (ms == null) return '–';
  const d = new Date(Number(ms));
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}
const fmtScore = (s) => (s == null ? '–' : Number(s).toFixed(2));
const fmtPct = (x) => (x == null ? '–' : (Number(x) * 100).toFixed(1) + '%');
const num = (x) => +Number(x).toFixed(1); // keeps generated SVG short
const boardHref = (id) => '/boards/' + encodeURIComponent(id);
const badge = (v) => `<span class="badge ${v === 'pass' ? 'pass' : 'fail'}">${esc(v)}</span>`;
const last = (a) => a[a.length - 1];
const plural = (n, word) => `${n} ${word}${Number(n) === 1 ? '' : 's'}`;

// Same class, same colour on every page, so an operator learns them; unknown classes still get a stable one.
const KNOWN_CLASSES = ['open', 'short', 'mousebite', 'spur', 'copper', 'pin-hole'];
const PALETTE = ['#d62728', '#1f77b4', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#bcbd22'];
function classColor(c) {
  let i = KNOWN_CLASSES.indexOf(c);
  if (i < 0) {
    i = 0;
    for (const ch of String(c)) i = (i * 31 + ch.charCodeAt(0)) >>> 0;
  }
  return PALETTE[i % PALETTE.length];
}

// Fetches JSON; a 4xx/5xx becomes an Error carrying the server's {"error": ...} message so the page can show it verbatim.
async function api(path, opts) {
  const r = await fetch(path, opts);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { /* not JSON; handled below */ }
  if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText || 'request failed'}`);
  if (body == null) throw new Error(`${path}: the server sent no JSON`);
  return body;
}

function showError(err) {
  const box = $('#error');
  box.textContent = (err && err.message) || String(err);
  box.hidden = false;
}
const clearError = () => { $('#error').hidden = true; };

// Coalesces bursts (a line can finish several boards a second) into at most one call per `ms`.
function throttle(fn, ms) {
  let last = 0;
  let timer = null;
  return () => {
    if (timer) return;
    timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, Math.max(0, last + ms - Date.now()));
  };
}

// One EventSource per page load, shared by whatever the page subscribes to; the browser reconnects it by itself.
const handlers = {};
let source = null;
function on(type, fn) {
  (handlers[type] = handlers[type] || []).push(fn);
  if (source || !window.EventSource) return;
  source = new EventSource('/api/events');
  const dot = $('#live');
  source.onopen = () => { dot.classList.add('on'); dot.title = 'live updates: connected'; };
  source.onerror = () => { dot.classList.remove('on'); dot.title = 'live updates: reconnecting'; };
  for (const t of ['detection', 'model', 'progress', 'rejected']) {
    source.addEventListener(t, (ev) => {
      let data;
      try { data = JSON.parse(ev.data); } catch { return; }
      for (const h of handlers[t] || []) h(data);
    });
  }
}

// ---------- SVG charts ----------

// Round tick steps (1, 2, 5 × 10^k) so axes read at a glance.
function ticks(max, count = 4, integer = true) {
  if (!(max > 0)) return [0];
  let step = Math.pow(10, Math.floor(Math.log10(max / count)));
  for (const m of [1, 2, 5, 10]) if (max / (step * m) <= count) { step *= m; break; }
  if (integer) step = Math.max(1, Math.round(step));
  // Ends on the first tick at or above max, so the top gridline frames the tallest bar.
  const out = [0];
  while (out[out.length - 1] < max - 1e-9) out.push(+(out[out.length - 1] + step).toPrecision(12));
  return out;
}

function emptySvg(id, w, h, msg) {
  return `<svg id="${id}" class="chart" viewBox="0 0 ${w} ${h}"><text class="empty" x="${w / 2}" y="${h / 2}" text-anchor="middle">${esc(msg)}</text></svg>`;
}

function paretoSvg(items) {
  const W = 560, H = 250, L = 40, R = 44, T = 16, B = 40, pw = W - L - R, ph = H - T - B;
  const total = items.reduce((a, p) => a + Number(p.count), 0);
  if (!items.length || !total) return emptySvg('pareto', W, H, 'No defects in this window');
  const max = Math.max(...items.map((p) => Number(p.count)));
  const tk = ticks(max), yMax = last(tk);
  const step = pw / items.length, bw = Math.min(56, step * 0.7);
  const y = (v) => T + ph * (1 - v / yMax);
  let out = `<svg id="pareto" class="chart" viewBox="0 0 ${W} ${H}">`;
  for (const t of tk) out += `<line class="grid" x1="${L}" x2="${W - R}" y1="${num(y(t))}" y2="${num(y(t))}"/><text class="axis" x="${L - 4}" y="${num(y(t)) + 3}" text-anchor="end">${t}</text>`;
  for (const p of [0, 50, 80, 100]) out += `<text class="axis" x="${W - R + 4}" y="${num(T + ph * (1 - p / 100)) + 3}">${p}%</text>`;
  let cum = 0;
  const pts = [];
  items.forEach((p, i) => {
    const c = Number(p.count), cx = L + i * step + step / 2;
    cum += c;
    const cy = T + ph * (1 - cum / total);
    pts.push(`${num(cx)},${num(cy)}`);
    out += `<g class="bar"><title>${esc(p.class)}: ${esc(c)} (${(c / total * 100).toFixed(1)}%, cumulative ${(cum / total * 100).toFixed(1)}%)</title>` +
      `<rect x="${num(cx - bw / 2)}" y="${num(y(c))}" width="${num(bw)}" height="${num(T + ph - y(c))}" fill="${classColor(p.class)}"/>` +
      `<text class="val" x="${num(cx)}" y="${num(y(c)) - 3}" text-anchor="middle">${esc(c)}</text>` +
      `<text class="lbl" x="${num(cx)}" y="${H - B + 14}" text-anchor="middle">${esc(p.class)}</text></g>`;
  });
  out += `<line class="axis-line" x1="${L}" x2="${W - R}" y1="${T + ph}" y2="${T + ph}"/>`;
  out += `<polyline class="cum" points="${pts.join(' ')}"/>`;
  out += pts.map((pt) => `<circle class="cum-dot" cx="${pt.split(',')[0]}" cy="${pt.split(',')[1]}" r="3"/>`).join('');
  return out + '</svg>';
}

// Fail rate 0 → pale green, 0.5 → amber, 1 → red: the eye finds the bad line/hour without reading numbers.
const heat = (r) => `hsl(${num((1 - r) * 120)}, 70%, ${num(50 + (1 - r) * 28)}%)`;

function heatmapSvg(hm, windowSecs) {
  const lines = (hm && hm.lines) || [], starts = (hm && hm.starts) || [];
  if (!lines.length || !starts.length) return emptySvg('heatmap', 900, 70, 'No boards in this window');
  const W = 900, L = 96, R = 8, T = 4, rowH = 22, B = 44, H = T + lines.length * rowH + B;
  const cw = (W - L - R) / starts.length, gap = cw > 5 ? 1 : 0;
  const bucket = Number(hm.bucket_ms) || 0;
  const short = (ms) => {
    const s = fmtTime(ms);
    return windowSecs && windowSecs <= 86400 ? s.slice(11, 16) : s.slice(5, 16);
  };
  let out = `<svg id="heatmap" class="chart" viewBox="0 0 ${W} ${H}">`;
  lines.forEach((ln, i) => {
    const y = T + i * rowH;
    out += `<text class="lbl" x="${L - 6}" y="${y + rowH / 2 + 4}" text-anchor="end">${esc(ln.line)}</text>`;
    starts.forEach((t, j) => {
      const c = (ln.cells && ln.cells[j]) || { boards: 0, failed: 0 };
      const boards = Number(c.boards) || 0, failed = Number(c.failed) || 0;
      const rate = boards ? failed / boards : null;
      const tip = `${ln.line} · ${fmtTime(t)} – ${fmtTime(Number(t) + bucket)}: ` +
        (boards ? `${failed}/${boards} failed (${(rate * 100).toFixed(1)}%)` : 'no boards');
      out += `<rect class="cell${boards ? '' : ' empty'}" data-line="${esc(ln.line)}" data-boards="${boards}" data-failed="${failed}" x="${num(L + j * cw)}" y="${y}" width="${num(Math.max(cw - gap, 0.5))}" height="${rowH - 2}" fill="${rate == null ? '#e5e7eb' : heat(rate)}"><title>${esc(tip)}</title></rect>`;
    });
  });
  // About six time labels, whatever the bucket count.
  const every = Math.max(1, Math.ceil(starts.length / 6));
  const yl = T + lines.length * rowH + 14;
  for (let j = 0; j < starts.length; j += every) {
    out += `<line class="grid" x1="${num(L + j * cw)}" x2="${num(L + j * cw)}" y1="${yl - 12}" y2="${yl - 8}"/><text class="axis" x="${num(L + j * cw)}" y="${yl}">${esc(short(starts[j]))}</text>`;
  }
  // Legend: grey = no boards, then the fail-rate scale.
  const ly = H - 6, lx = L;
  out += `<rect x="${lx}" y="${ly - 9}" width="12" height="10" fill="#e5e7eb"/><text class="axis" x="${lx + 16}" y="${ly}">no boards</text>`;
  for (let k = 0; k <= 10; k++) out += `<rect x="${lx + 100 + k * 14}" y="${ly - 9}" width="14" height="10" fill="${heat(k / 10)}"/>`;
  return out + `<text class="axis" x="${lx + 96}" y="${ly}" text-anchor="end">0%</text><text class="axis" x="${lx + 100 + 11 * 14 + 4}" y="${ly}">100% failed</text></svg>`;
}

function confidenceSvg(bins) {
  const W = 560, H = 250, L = 40, R = 20, T = 16, B = 36, pw = W - L - R, ph = H - T - B;
  const max = Math.max(0, ...bins.map((b) => Number(b.count)));
  if (!bins.length || !max) return emptySvg('confidence', W, H, 'No detections in this window');
  const tk = ticks(max), yMax = last(tk);
  const y = (v) => T + ph * (1 - v / yMax);
  const x = (v) => L + pw * Number(v);
  let out = `<svg id="confidence" class="chart" viewBox="0 0 ${W} ${H}">`;
  for (const t of tk) out += `<line class="grid" x1="${L}" x2="${W - R}" y1="${num(y(t))}" y2="${num(y(t))}"/><text class="axis" x="${L - 4}" y="${num(y(t)) + 3}" text-anchor="end">${t}</text>`;
  for (const b of bins) {
    const c = Number(b.count);
    out += `<rect class="hist" x="${num(x(b.lo) + 0.5)}" y="${num(y(c))}" width="${num(Math.max(x(b.hi) - x(b.lo) - 1, 0.5))}" height="${num(T + ph - y(c))}"><title>${fmtScore(b.lo)}–${fmtScore(b.hi)}: ${esc(c)}</title></rect>`;
  }
  out += `<line class="axis-line" x1="${L}" x2="${W - R}" y1="${T + ph}" y2="${T + ph}"/>`;
  for (const v of [0, 0.25, 0.5, 0.75, 1]) out += `<text class="axis" x="${num(x(v))}" y="${T + ph + 14}" text-anchor="middle">${v.toFixed(2)}</text>`;
  return out + `<text class="axis" x="${L + pw / 2}" y="${H - 4}" text-anchor="middle">detection score</text></svg>`;
}

function lossSvg(losses) {
  const W = 640, H = 200, L = 52, R = 12, T = 10, B = 28, pw = W - L - R, ph = H - T - B;
  const pts = (losses || []).filter((p) => Array.isArray(p) && isFinite(p[0]) && isFinite(p[1]));
  if (!pts.length) return emptySvg('loss-curve', W, H, 'No loss values yet');
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const padY = (y1 - y0) * 0.05;
  y0 -= padY; y1 += padY;
  const sx = (v) => L + pw * (v - x0) / (x1 - x0), sy = (v) => T + ph * (1 - (v - y0) / (y1 - y0));
  let out = `<svg id="loss-curve" class="chart" viewBox="0 0 ${W} ${H}">`;
  for (const v of [y0 + padY, (y0 + y1) / 2, y1 - padY]) out += `<line class="grid" x1="${L}" x2="${W - R}" y1="${num(sy(v))}" y2="${num(sy(v))}"/><text class="axis" x="${L - 4}" y="${num(sy(v)) + 3}" text-anchor="end">${v.toFixed(3)}</text>`;
  out += `<line class="axis-line" x1="${L}" x2="${W - R}" y1="${T + ph}" y2="${T + ph}"/>`;
  out += `<text class="axis" x="${L}" y="${H - 8}">step ${esc(x0)}</text><text class="axis" x="${W - R}" y="${H - 8}" text-anchor="end">step ${esc(x1)}</text>`;
  out += `<polyline class="loss-line" points="${pts.map((p) => `${num(sx(p[0]))},${num(sy(p[1]))}`).join(' ')}"/>`;
  return out + '</svg>';
}

// ---------- Overview ----------

function recentRow(s) {
  return `<li><a class="recent-row" data-image-id="${esc(s.image_id)}" href="${esc(boardHref(s.image_id))}">` +
    `<span class="t">${esc(fmtTime(s.detected_at ?? s.captured_at))}</span>${badge(s.verdict)}` +
    `<span class="b">${esc(s.board_id)}</span><span class="l">${esc(s.line_id)}</span>` +
    `<span class="d">${esc(plural(s.defects, 'defect'))}</span>` +
    `<span class="c">${s.top_class ? `<i class="swatch" style="background:${classColor(s.top_class)}"></i>${esc(s.top_class)} ${fmtScore(s.top_score)}` : ''}</span>` +
    `<span class="m">${esc(s.model)}</span></a></li>`;
}

async function overviewPage() {
  const WINDOWS = [['3600', 'Last hour'], ['86400', 'Last 24 h'], ['604800', 'Last 7 days'], ['0', 'All']];
  let win = new URLSearchParams(location.search).get('window') || '86400';
  if (!WINDOWS.some(([v]) => v === win)) win = '86400';
  app.innerHTML = `
    <div class="page-head"><h1>Overview</h1>
      <label>Window <select id="window">${WINDOWS.map(([v, l]) => `<option value="${v}"${v === win ? ' selected' : ''}>${l}</option>`).join('')}</select></label>
      <span id="range" class="muted"></span></div>
    <section class="kpis">
      <div class="kpi big"><div class="kpi-label">Yield</div><span id="yield" data-value="">–</span></div>
      <div class="kpi"><div class="kpi-label">Inspected</div><span id="inspected">–</span></div>
      <div class="kpi pass"><div class="kpi-label">Passed</div><span id="passed">–</span></div>
      <div class="kpi fail"><div class="kpi-label">Failed</div><span id="failed">–</span></div>
      <div class="kpi"><div class="kpi-label">Defects</div><span id="defects">–</span></div>
      <div class="kpi"><div class="kpi-label">Defects / board</div><span id="defect-rate" data-value="">–</span></div>
      <div class="kpi"><div class="kpi-label"><a href="/review">To review</a></div><span id="review-waiting">–</span></div>
      <div class="kpi"><div class="kpi-label">Corrected</div><span id="review-corrected">–</span></div>
    </section>
    <section class="grid2">
      <div class="card"><h2>Defect classes</h2><div id="pareto-box"></div></div>
      <div class="card"><h2>Detection confidence</h2><div id="confidence-box"></div></div>
    </section>
    <section class="card"><h2>Fail rate per line</h2><div id="heatmap-box"></div></section>
    <section class="card"><h2>Recent detections</h2><ol id="recent" class="recent"></ol></section>`;

  let recent = [];
  const renderRecent = () => {
    $('#recent').innerHTML = recent.map(recentRow).join('') || '<li class="muted">No detections yet.</li>';
  };
  let seq = 0;
  async function load() {
    const my = ++seq; // a slow answer for an older window must not overwrite a newer one
    const o = await api(`/api/overview?window=${encodeURIComponent($('#window').value)}`);
    if (my !== seq) return;
    clearError();
    const y = $('#yield');
    y.dataset.value = o.yield == null ? '' : String(o.yield);
    y.textContent = fmtPct(o.yield);
    y.className = o.yield == null ? '' : o.yield >= 0.95 ? 'good' : o.yield >= 0.8 ? 'warn' : 'bad';
    for (const k of ['inspected', 'passed', 'failed', 'defects']) $('#' + k).textContent = String(o[k] ?? '–');
    const dr = $('#defect-rate');
    dr.dataset.value = o.defect_rate == null ? '' : String(o.defect_rate);
    dr.textContent = o.defect_rate == null ? '–' : Number(o.defect_rate).toFixed(2);
    $('#review-waiting').textContent = String(o.review ? o.review.waiting : '–');
    $('#review-corrected').textContent = String(o.review ? o.review.corrected : '–');
    $('#range').textContent = Number(o.window_secs) === 0 ? 'all time' : `${fmtTime(o.from_ms)} → ${fmtTime(o.to_ms)}`;
    $('#pareto-box').innerHTML = paretoSvg(o.pareto || []);
    $('#confidence-box').innerHTML = confidenceSvg(o.confidence || []);
    $('#heatmap-box').innerHTML = heatmapSvg(o.heatmap, Number(o.window_secs));
    // Keep live rows the aggregate query has not caught up with yet, so a row never blinks out.
    const fetched = o.recent || [];
    const newest = Math.max(0, ...fetched.map((r) => Number(r.detected_at) || 0));
    recent = [...recent.filter((r) => Number(r.detected_at) > newest), ...fetched].slice(0, 20);
    renderRecent();
  }

  $('#window').addEventListener('change', () => {
    const p = new URLSearchParams(location.search);
    p.set('window', $('#window').value);
    history.replaceState(null, '', '/?' + p); // a reload or a shared link keeps the chosen window
    load().catch(showError);
  });
  const refresh = throttle(() => load().catch(showError), 2000);
  on('detection', (s) => {
    recent = [s, ...recent].slice(0, 20);
    renderRecent();
    refresh();
  });
  await load();
}

// ---------- Boards list ----------

const FILTERS = ['line', 'board', 'verdict', 'class', 'from', 'to'];

function toLocalInput(ms) {
  if (!ms || !isFinite(ms)) return '';
  const d = new Date(Number(ms));
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}
const fromLocalInput = (v) => {
  const t = v ? new Date(v).getTime() : NaN; // "YYYY-MM-DDTHH:MM" parses as local time
  return isFinite(t) ? String(t) : '';
};

function boardRow(s) {
  return `<tr class="board-row" data-image-id="${esc(s.image_id)}">` +
    `<td><a href="${esc(boardHref(s.image_id))}">${esc(s.board_id)}</a></td>` +
    `<td>${esc(s.line_id)}</td><td class="num">${esc(fmtTime(s.captured_at ?? s.detected_at))}</td>` +
    `<td>${badge(s.verdict)}</td><td class="num">${esc(s.defects)}</td>` +
    `<td>${s.top_class ? `<i class="swatch" style="background:${classColor(s.top_class)}"></i>${esc(s.top_class)} <span class="num">${fmtScore(s.top_score)}</span>` : '<span class="muted">–</span>'}</td>` +
    `<td class="muted">${esc(s.model)}</td></tr>`;
}

async function boardsPage() {
  app.innerHTML = `
    <div class="page-head"><h1>Boards</h1><button type="button" id="new-notice" class="notice" hidden></button></div>
    <form id="filters" class="filters" autocomplete="off">
      <label>Line <select id="f-line"><option value="">all</option></select></label>
      <label>Board <input id="f-board" placeholder="id contains…"></label>
      <label>Verdict <select id="f-verdict"><option value="">all</option><option value="pass">pass</option><option value="fail">fail</option></select></label>
      <label>Class <select id="f-class"><option value="">all</option></select></label>
      <label>From <input id="f-from" type="datetime-local"></label>
      <label>To <input id="f-to" type="datetime-local"></label>
      <button type="submit" class="primary">Apply</button><button type="button" id="f-clear">Clear</button>
    </form>
    <table id="boards" class="data"><thead><tr><th>Board</th><th>Line</th><th>Captured</th><th>Verdict</th><th>Defects</th><th>Top class</th><th>Model</th></tr></thead><tbody></tbody></table>
    <div class="pager"><button type="button" id="prev">‹ Prev</button><span id="page-info"></span><button type="button" id="next">Next ›</button></div>`;

  // The URL is the single source of truth for filters and page, so any filtered view can be linked and reloaded.
  const readQuery = () => Object.fromEntries(new URLSearchParams(location.search));
  const fields = { line: '#f-line', board: '#f-board', verdict: '#f-verdict', class: '#f-class' };
  function ensureOption(sel, v) {
    if (v && ![...sel.options].some((o) => o.value === v)) sel.insertAdjacentHTML('beforeend', `<option value="${esc(v)}">${esc(v)}</option>`);
  }
  function fillForm(q) {
    for (const [k, sel] of Object.entries(fields)) {
      const el = $(sel);
      if (el.tagName === 'SELECT') ensureOption(el, q[k]);
      el.value = q[k] || '';
    }
    $('#f-from').value = toLocalInput(Number(q.from));
    $('#f-to').value = toLocalInput(Number(q.to));
  }
  function formQuery() {
    const q = {};
    for (const [k, sel] of Object.entries(fields)) q[k] = $(sel).value.trim();
    // The inputs show minutes only; an untouched bound keeps the URL's exact millisecond value.
    const cur = readQuery();
    for (const k of ['from', 'to']) {
      const v = $('#f-' + k).value;
      q[k] = cur[k] && v === toLocalInput(Number(cur[k])) ? cur[k] : fromLocalInput(v);
    }
    return q;
  }
  function go(q, page) {
    const p = new URLSearchParams();
    for (const k of FILTERS) if (q[k]) p.set(k, q[k]);
    if (q.page_size) p.set('page_size', q.page_size);
    if (page > 1) p.set('page', page);
    const url = '/boards' + (String(p) ? '?' + p : '');
    if (url !== location.pathname + location.search) history.pushState(null, '', url);
    loadTable().catch(showError);
  }

  let seq = 0;
  let newCount = 0;
  const notice = $('#new-notice');
  async function loadTable() {
    const q = readQuery(), my = ++seq;
    const p = new URLSearchParams();
    for (const k of FILTERS) if (q[k]) p.set(k, q[k]);
    p.set('page', q.page || '1');
    p.set('page_size', q.page_size || '50');
    const r = await api('/api/detections?' + p);
    if (my !== seq) return;
    clearError();
    $('#boards tbody').innerHTML = (r.items || []).map(boardRow).join('') ||
      '<tr class="empty"><td colspan="7">No boards match these filters.</td></tr>';
    $('#page-info').textContent = `page ${r.page} of ${Math.max(r.pages, 1)} · ${plural(r.total, 'board')}`;
    $('#prev').disabled = r.page <= 1;
    $('#next').disabled = r.page >= r.pages;
    newCount = 0;
    notice.hidden = true;
  }

  // Filter dropdowns; a failure here should not stop the table from loading.
  try {
    const l = await api('/api/lines');
    $('#f-line').insertAdjacentHTML('beforeend', (l.lines || []).map((v) => `<option value="${esc(v)}">${esc(v)}</option>`).join(''));
    $('#f-class').insertAdjacentHTML('beforeend', (l.classes || []).map((v) => `<option value="${esc(v)}">${esc(v)}</option>`).join(''));
  } catch (e) { showError(e); }
  fillForm(readQuery());

  $('#filters').addEventListener('submit', (e) => { e.preventDefault(); go(formQuery(), 1); });
  $('#filters').addEventListener('change', () => go(formQuery(), 1));
  $('#f-clear').addEventListener('click', () => { fillForm({}); go({}, 1); });
  const turn = (d) => { const q = readQuery(); go(q, Math.max(1, Number(q.page || 1) + d)); };
  $('#prev').addEventListener('click', () => turn(-1));
  $('#next').addEventListener('click', () => turn(1));
  window.addEventListener('popstate', () => { fillForm(readQuery()); loadTable().catch(showError); });
  // The whole row is a target, not just the id link: quicker on a shop-floor touch screen.
  $('#boards tbody').addEventListener('click', (e) => {
    const tr = e.target.closest('tr.board-row');
    if (tr && !e.target.closest('a')) location.href = boardHref(tr.dataset.imageId);
  });

  // New boards would shift the rows under the reader's eye, so they are only counted; the reader refreshes when ready.
  // Matching is approximate for the class filter: a Summary carries only its top class.
  function matches(s, q) {
    const t = Number(s.captured_at ?? s.detected_at);
    return (!q.line || s.line_id === q.line) && (!q.board || String(s.board_id).includes(q.board)) &&
      (!q.verdict || s.verdict === q.verdict) && (!q.class || s.top_class === q.class) &&
      (!q.from || t >= Number(q.from)) && (!q.to || t <= Number(q.to));
  }
  on('detection', (s) => {
    if (!matches(s, readQuery())) return;
    newCount += 1;
    notice.textContent = `${newCount} new — refresh`;
    notice.hidden = false;
  });
  notice.addEventListener('click', () => loadTable().catch(showError));

  await loadTable();
}

// ---------- One board ----------

// Boxes greedily paired by class and IoU >= 0.5, best score first: how the model's answer stands against the labels.
function iou(a, c) {
  const w = Math.min(a.x2, c.x2) - Math.max(a.x1, c.x1), h = Math.min(a.y2, c.y2) - Math.max(a.y1, c.y1);
  if (w <= 0 || h <= 0) return 0;
  const inter = w * h;
  return inter / ((a.x2 - a.x1) * (a.y2 - a.y1) + (c.x2 - c.x1) * (c.y2 - c.y1) - inter);
}
function compareBoxes(model, labels) {
  const used = new Set();
  let matched = 0;
  for (const d of [...model].sort((x, y) => y.score - x.score)) {
    const j = labels.findIndex((g, k) => !used.has(k) && g.class === d.class && iou(d, g) >= 0.5);
    if (j >= 0) { used.add(j); matched++; }
  }
  return { matched, missed: labels.length - matched, extra: model.length - matched };
}

function boardSvg(b, W, H, diff) {
  const fs = Math.max(10, Math.round(W / 45)), sw = num(Math.max(1.5, W / 300));
  let out = `<svg id="board" class="board-svg" viewBox="0 0 ${W} ${H}">`;
  out += b.image_url
    ? `<image href="${esc(b.image_url)}" x="0" y="0" width="${W}" height="${H}"/>`
    : `<rect class="blank" x="0" y="0" width="${W}" height="${H}"/>`;
  if (diff) out += `<image class="template-diff" href="${esc(b.template_url)}" x="0" y="0" width="${W}" height="${H}" style="mix-blend-mode: difference"/>`;
  for (const g of b.labels || []) {
    out += `<rect class="gt" data-class="${esc(g.class)}" x="${num(g.x1)}" y="${num(g.y1)}" width="${num(g.x2 - g.x1)}" height="${num(g.y2 - g.y1)}" stroke-width="${sw}"><title>ground truth: ${esc(g.class)}</title></rect>`;
  }
  for (const d of b.defects || []) {
    const score = Number(d.score).toFixed(3), color = classColor(d.class);
    // Label above the box unless that would leave the picture.
    const ly = d.y1 - 3 > fs ? d.y1 - 3 : d.y2 + fs;
    out += `<rect class="det" data-score="${score}" data-class="${esc(d.class)}" x="${num(d.x1)}" y="${num(d.y1)}" width="${num(d.x2 - d.x1)}" height="${num(d.y2 - d.y1)}" stroke="${color}" stroke-width="${sw}"><title>${esc(d.class)} ${fmtScore(d.score)}</title></rect>`;
    out += `<text class="det-label" data-score="${score}" x="${num(d.x1)}" y="${num(ly)}" fill="${color}" font-size="${fs}">${esc(d.class)} ${fmtScore(d.score)}</text>`;
  }
  (b.edits || []).forEach((e, i) => {
    out += `<rect class="edit" data-i="${i}" data-class="${esc(e.class)}" x="${num(e.x1)}" y="${num(e.y1)}" width="${num(e.x2 - e.x1)}" height="${num(e.y2 - e.y1)}" stroke="${classColor(e.class)}" stroke-width="${sw}"><title>to save: ${esc(e.class)}</title></rect>`;
  });
  return out + '<rect id="drawing" class="edit" x="0" y="0" width="0" height="0" display="none"/></svg>';
}

async function boardPage(id) {
  app.innerHTML = '<p class="muted">Loading board…</p>';
  let b = null;
  // The review: the boxes the operator will save, kept across re-renders until saved.
  let edits = null, drawing = false;
  const box = (x) => ({ x1: +x.x1, y1: +x.y1, x2: +x.x2, y2: +x.y2, class: x.class });
  const modelBoxes = () => (b.defects || []).filter((d) => Number(d.score) >= Number($('#min-score')?.value ?? 0)).map(box);
  const startEdits = () => { edits = b.labels ? b.labels.map(box) : modelBoxes(); };

  function applyControls() {
    const min = Number($('#min-score').value);
    $('#min-score-value').textContent = min.toFixed(2);
    let visible = 0;
    for (const el of $$('#board .det, #board .det-label, #defects tr[data-score]')) {
      const show = Number(el.dataset.score) >= min;
      el.style.display = show ? '' : 'none';
      if (show && el.matches('rect.det')) visible++;
    }
    $('#visible-count').textContent = String(visible);
    const gt = $('#show-gt').checked;
    for (const r of $$('#board .gt')) r.style.display = gt ? '' : 'none';
  }

  function drawViews() {
    const W = Number(b.width) || 640, H = Number(b.height) || 640;
    b.edits = edits;
    const sel = $('#template-view');
    const view = sel ? sel.value : 'none';
    let html = `<figure><figcaption>${view === 'difference' ? 'Inspected − template (difference)' : 'Inspected'}</figcaption>${boardSvg(b, W, H, view === 'difference')}</figure>`;
    if (view === 'side-by-side') {
      html += `<figure><figcaption>Template</figcaption><svg id="template" class="board-svg" viewBox="0 0 ${W} ${H}"><image href="${esc(b.template_url)}" x="0" y="0" width="${W}" height="${H}"/></svg></figure>`;
    }
    $('#views').innerHTML = html;
    $('#views').classList.toggle('two', view === 'side-by-side');
    $('#board').classList.toggle('drawing', drawing);
    applyControls();
  }

  function renderEdits() {
    $('#edit-boxes tbody').innerHTML = edits.map((e, i) => `<tr class="edit-row" data-i="${i}"><td class="num">${i + 1}</td>
      <td><select class="edit-class" data-i="${i}">${KNOWN_CLASSES.map((c) => `<option${c === e.class ? ' selected' : ''}>${esc(c)}</option>`).join('')}</select></td>
      <td class="num muted">${[e.x1, e.y1, e.x2, e.y2].map((v) => esc(num(v))).join(', ')}</td>
      <td><button type="button" class="edit-delete" data-i="${i}">Delete</button></td></tr>`).join('') ||
      '<tr class="empty"><td colspan="4">No defect: saving says the board is clean.</td></tr>';
    const labels = b.labels || [];
    const c = compareBoxes(b.defects || [], labels);
    $('#versus').textContent = b.labels
      ? `Model ${(b.summary || {}).model || ''} against the current labels (${labels.length} ${labels.length === 1 ? 'box' : 'boxes'}): ${c.matched} matched, ${c.missed} missed by the model, ${c.extra} not in the labels.`
      : 'This board has no labels yet: the boxes below start from the model\'s answer.';
    drawViews();
  }

  function renderHistory() {
    const rows = (b.history || []).slice().reverse();
    $('#history tbody').innerHTML = rows.map((h) => `<tr class="history-row" data-digest="${esc(h.digest || '')}"><td>${esc(fmtTime(h.at_ms))}</td><td>${esc(h.from)}</td><td>${esc(h.by || '–')}</td>
      <td class="num">${h.labels ? esc(h.labels.length) : 'unlabelled'}</td><td>${esc(h.reviewed || '–')}</td><td>${esc(h.note || '')}</td></tr>`).join('') ||
      '<tr class="empty"><td colspan="6">No record of this board is left in the stream.</td></tr>';
  }

  // Client coordinates to the image's pixels (the SVG's viewBox), inside the picture.
  function toImage(ev) {
    const svg = $('#board');
    const pt = svg.createSVGPoint();
    pt.x = ev.clientX; pt.y = ev.clientY;
    const p = pt.matrixTransform(svg.getScreenCTM().inverse());
    const W = Number(b.width) || 640, H = Number(b.height) || 640;
    return { x: Math.min(W, Math.max(0, p.x)), y: Math.min(H, Math.max(0, p.y)) };
  }

  function wireDrawing() {
    let start = null;
    // On the page's root, which outlives each re-render of the board.
    app.addEventListener('mousedown', (ev) => {
      if (!drawing || !ev.target.closest('#board')) return;
      ev.preventDefault();
      start = toImage(ev);
    });
    window.addEventListener('mousemove', (ev) => {
      if (!start) return;
      const p = toImage(ev), r = $('#drawing');
      r.setAttribute('display', '');
      r.setAttribute('x', Math.min(start.x, p.x)); r.setAttribute('y', Math.min(start.y, p.y));
      r.setAttribute('width', Math.abs(p.x - start.x)); r.setAttribute('height', Math.abs(p.y - start.y));
    });
    window.addEventListener('mouseup', (ev) => {
      if (!start) return;
      const p = toImage(ev);
      const e = { x1: Math.min(start.x, p.x), y1: Math.min(start.y, p.y), x2: Math.max(start.x, p.x), y2: Math.max(start.y, p.y), class: $('#new-class').value };
      start = null;
      drawing = false;
      $('#draw-box').classList.remove('active');
      if (e.x2 - e.x1 >= 2 && e.y2 - e.y1 >= 2) edits.push(e);
      renderEdits();
    });
  }

  async function save(boxes) {
    const by = $('#review-by').value.trim();
    if (!by) { showError(new Error('Say who you are (Your name) before saving labels.')); return; }
    localStorage.setItem('pcb-review-by', by);
    const body = { labels: boxes.map(box), by, note: $('#review-note').value };
    if (b.token_required) body.token = $('#review-token') ? $('#review-token').value : '';
    const status = $('#review-status');
    status.dataset.state = 'saving';
    status.textContent = 'Saving…';
    try {
      const r = await api(`/api/boards/${encodeURIComponent(id)}/labels`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
      clearError();
      status.dataset.revision = r.revision;
      const digest = r.revision.split('.')[1];
      status.dataset.state = r.status;
      status.textContent = r.status === 'unchanged' ? 'Unchanged: these labels are already saved.' : `Saved ${r.boxes} ${r.boxes === 1 ? 'box' : 'boxes'} as revision ${digest}; waiting for the pipeline to store it…`;
      // The revision goes through the encoder like any board: shown once it is in the stream.
      for (let i = 0; i < 30 && r.status !== 'unchanged'; i++) {
        await new Promise((ok) => setTimeout(ok, 1000));
        b = await api('/api/boards/' + encodeURIComponent(id));
        if ((b.history || []).some((h) => h.digest === digest)) {
          edits = null;
          render();
          const st = $('#review-status');
          st.dataset.state = 'stored';
          st.dataset.revision = r.revision;
          st.textContent = `Saved: revision ${digest} is in the history and goes into the next training snapshot.`;
          return;
        }
      }
    } catch (e) {
      status.dataset.state = 'failed';
      status.textContent = '';
      showError(e);
    }
  }

  function render() {
    // A re-render (newer model) keeps what the reader set on the controls.
    const prev = { min: $('#min-score')?.value ?? '0', gt: $('#show-gt')?.checked ?? true, view: $('#template-view')?.value };
    const s = b.summary || {};
    const dets = b.defects || [];
    const hasTpl = Boolean(b.has_template && b.template_url);
    document.title = `${s.board_id ?? id} · PCB inspection`;
    app.innerHTML = `
      <div class="page-head board-head"><h1>Board <span id="board-id">${esc(s.board_id)}</span></h1>${badge(s.verdict)}
        <dl class="facts">
          <div><dt>Line</dt><dd>${esc(s.line_id)}</dd></div>
          <div><dt>Model</dt><dd>${esc(s.model)}</dd></div>
          <div><dt>Captured</dt><dd>${esc(fmtTime(s.captured_at))}</dd></div>
          <div><dt>Detected</dt><dd>${esc(fmtTime(s.detected_at))}</dd></div>
          <div><dt>Inference</dt><dd>${s.inference_ms == null ? '–' : esc(Number(s.inference_ms).toFixed(0)) + ' ms'}</dd></div>
          <div><dt>Source</dt><dd class="muted">${esc(s.source)}</dd></div>
        </dl></div>
      ${b.image_url ? '' : '<p class="note">The image is no longer in the stream; the boxes are drawn on a blank area.</p>'}
      <div class="controls">
        <label>Min score <input type="range" id="min-score" min="0" max="1" step="0.01" value="${esc(prev.min)}"> <span id="min-score-value" class="num">0.00</span></label>
        <span><b id="visible-count">0</b> of ${esc(plural(dets.length, 'defect'))} shown</span>
        <label${b.labels ? '' : ' class="muted" title="this image has no ground-truth labels"'}><input type="checkbox" id="show-gt"${prev.gt ? ' checked' : ''}${b.labels ? '' : ' disabled'}> ground truth${b.labels ? ` (${b.labels.length})` : ''} <i class="swatch gt-swatch"></i></label>
        ${hasTpl ? `<label>Template <select id="template-view"><option value="side-by-side">side by side</option><option value="difference"${prev.view === 'difference' ? ' selected' : ''}>difference</option></select></label>` : ''}
      </div>
      <div id="views" class="views"></div>
      <table id="defects" class="data compact"><thead><tr><th>Class</th><th>Score</th><th>Box (x1, y1 – x2, y2)</th></tr></thead><tbody>
        ${dets.map((d) => `<tr data-score="${Number(d.score).toFixed(3)}"><td><i class="swatch" style="background:${classColor(d.class)}"></i>${esc(d.class)}</td><td class="num">${fmtScore(d.score)}</td><td class="num muted">${[d.x1, d.y1, d.x2, d.y2].map((v) => esc(num(v))).join(', ')}</td></tr>`).join('') ||
          '<tr class="empty"><td colspan="3">No defects detected.</td></tr>'}
      </tbody></table>
      <section id="review" class="card">
        <h2>Review</h2>
        <p id="versus" class="muted"></p>
        <p class="muted">Delete a false box, change a class, or draw a missed box on the image (dashed boxes are what you will save), then save: the labels become a revision of this board that the next training uses.</p>
        <table id="edit-boxes" class="data compact"><thead><tr><th>#</th><th>Class</th><th>Box (x1, y1 – x2, y2)</th><th></th></tr></thead><tbody></tbody></table>
        <div class="controls">
          <button type="button" id="draw-box">Draw a missed box</button>
          <label>as <select id="new-class">${KNOWN_CLASSES.map((c) => `<option>${esc(c)}</option>`).join('')}</select></label>
          <button type="button" id="reset-model">Start again from the model's boxes</button>
        </div>
        <div class="controls">
          <label>Your name <input id="review-by" maxlength="64" value="${esc(localStorage.getItem('pcb-review-by') || '')}"></label>
          <label>Note <input id="review-note" maxlength="500" size="32"></label>
          ${b.token_required ? '<label>Token <input id="review-token" type="password"></label>' : ''}
          <button type="button" id="confirm-model">Confirm the model's answer</button>
          <button type="button" id="save-labels" class="primary">Save labels</button>
          <span id="review-status" class="muted" data-state="idle"></span>
        </div>
        <h3>Label history</h3>
        <table id="history" class="data compact"><thead><tr><th>When</th><th>From</th><th>By</th><th>Boxes</th><th>Reviewed</th><th>Note</th></tr></thead><tbody></tbody></table>
      </section>`;
    $('#min-score').addEventListener('input', applyControls);
    $('#show-gt').addEventListener('change', applyControls);
    if (hasTpl) $('#template-view').addEventListener('change', drawViews);
    if (!edits) startEdits();
    $('#edit-boxes').addEventListener('change', (ev) => {
      const sel = ev.target.closest('select.edit-class');
      if (sel) { edits[Number(sel.dataset.i)].class = sel.value; renderEdits(); }
    });
    $('#edit-boxes').addEventListener('click', (ev) => {
      const del = ev.target.closest('button.edit-delete');
      if (del) { edits.splice(Number(del.dataset.i), 1); renderEdits(); }
    });
    $('#draw-box').addEventListener('click', () => { drawing = !drawing; $('#draw-box').classList.toggle('active', drawing); drawViews(); });
    $('#reset-model').addEventListener('click', () => { edits = modelBoxes(); renderEdits(); });
    $('#confirm-model').addEventListener('click', () => save(modelBoxes()));
    $('#save-labels').addEventListener('click', () => save(edits));
    renderEdits();
    renderHistory();
  }

  async function load() {
    b = await api('/api/boards/' + encodeURIComponent(id));
    clearError();
    render();
  }
  // The same image inferred again (a newer model went live) replaces what is shown.
  on('detection', (s) => { if (s.image_id === id) load().catch(showError); });
  wireDrawing();
  try {
    await load();
  } catch (e) {
    app.innerHTML = `<p><a href="/boards">Back to the board list</a></p>`;
    throw e;
  }
}

// ---------- Review queue ----------

async function reviewPage() {
  app.innerHTML = `<div class="page-head"><h1>Review</h1><span id="queue-counts" class="muted"></span></div>
    <p class="muted">Boards whose correction would teach the next model most come first: those with boxes the model is torn on (scores near 0.5, summed over the board), taken from every line in proportion to its boards; boards a shadow version gives another verdict; and the last day's boards of a line whose fail rate moved away from the week before. Open one, correct it, save: it leaves the queue.</p>
    <p id="drifted" class="note" hidden></p>
    <table class="data"><thead><tr><th>Board</th><th>Line</th><th>Verdict</th><th>Best</th><th>Usefulness</th><th>Why</th></tr></thead><tbody id="queue"></tbody></table>`;
  async function load() {
    const q = await api('/api/review?limit=100');
    clearError();
    const counts = $('#queue-counts');
    counts.dataset.waiting = q.waiting;
    counts.dataset.corrected = q.corrected;
    counts.textContent = `${q.waiting} waiting · ${q.corrected} corrected`;
    const d = $('#drifted');
    d.hidden = !(q.drifted || []).length;
    d.textContent = (q.drifted || []).map((x) => `Line ${x.line} drifted: ${(x.recent * 100).toFixed(0)}% failed in the last day, ${(x.before * 100).toFixed(0)}% the week before.`).join(' ');
    $('#queue').innerHTML = (q.items || []).map((i) => `<tr class="queue-row" data-id="${esc(i.summary.image_id)}"><td><a href="${boardHref(i.summary.image_id)}">${esc(i.summary.board_id)}</a></td>
      <td>${esc(i.summary.line_id)}</td><td>${badge(i.summary.verdict)}</td><td class="num">${fmtScore(i.summary.top_score)}</td>
      <td class="num">${Number(i.usefulness).toFixed(2)}</td><td class="muted">${i.reasons.map(esc).join('; ')}</td></tr>`).join('') ||
      '<tr class="empty"><td colspan="6">Nothing waiting for a review.</td></tr>';
  }
  on('detection', throttle(() => load().catch(showError), 2000));
  await load();
}

// ---------- Models and training ----------

function apBars(per) {
  const keys = Object.keys(per || {}).sort((a, c) => {
    const ia = KNOWN_CLASSES.indexOf(a), ic = KNOWN_CLASSES.indexOf(c);
    return (ia < 0 ? 99 : ia) - (ic < 0 ? 99 : ic) || a.localeCompare(c);
  });
  if (!keys.length) return '<span class="muted">–</span>';
  return '<div class="ap-list">' + keys.map((k) => {
    const v = per[k];
    const w = v == null || !isFinite(v) ? 0 : Math.max(0, Math.min(100, Number(v) * 100));
    return `<span class="ap" title="${esc(k)} AP ${fmtScore(v)}"><span class="ap-name">${esc(k)}</span><span class="ap-bar"><i style="width:${num(w)}%;background:${classColor(k)}"></i></span><span class="ap-val">${fmtScore(v)}</span></span>`;
  }).join('') + '</div>';
}

// The shadow version against the live answers on the boards both answered.
function shadowHtml(m) {
  const sh = m.shadow;
  if (!sh) return '';
  const c = sh.comparison || { boards: 0, agree: 0, changed: 0, changed_boards: [], classes: [], unmatched: 0 };
  const verdict = (v) => `<span class="badge ${v === 'fail' ? 'fail' : 'pass'}">${esc(v)}</span>`;
  const changed = (c.changed_boards || []).map((b) =>
    `<li><a href="${boardHref(b.image_id)}">${esc(b.board_id)}</a> ${verdict(b.live)} → ${verdict(b.shadow)}</li>`).join('');
  const classes = (c.classes || []).map((k) =>
    `<tr><td>${esc(k.class)}</td><td class="num">${esc(k.live)}</td><td class="num">${esc(k.shadow)}</td></tr>`).join('');
  return `<div class="shadow">
    <h3>Shadow <b>@${esc(sh.version)}</b> <span class="muted">since ${esc(fmtTime(sh.since))}, set by ${esc(sh.by)}</span></h3>
    <p>Boards compared <b class="shadow-boards">${esc(c.boards)}</b> · verdict agreement <b class="shadow-agreement">${fmtPct(c.agreement)}</b>
      · verdict would change on <b class="shadow-changed">${esc(c.changed)}</b>${c.unmatched ? ` · ${esc(c.unmatched)} without a live answer` : ''}</p>
    ${(() => {
      const o = sh.on_corrected;
      if (!o || !o.boards) return '<p class="muted shadow-corrected">No corrected board answered by both yet: correct boards on the Review page to see who was right.</p>';
      return `<p class="shadow-corrected">On ${esc(o.boards)} corrected ${o.boards === 1 ? 'board' : 'boards'}, the correction confirms live's verdict on <b>${esc(o.live_right)}</b> and the shadow's on <b>${esc(o.shadow_right)}</b>.</p>`;
    })()}
    ${changed ? `<ul class="shadow-changed-boards">${changed}</ul>` : ''}
    ${classes ? `<table class="data shadow-classes"><thead><tr><th>Class</th><th>Live defects</th><th>Shadow defects</th></tr></thead><tbody>${classes}</tbody></table>` : ''}
  </div>`;
}

// The canary: the boards it answered for real since it was set, beside the live version's over the same period.
function canaryHtml(m) {
  const ca = m.canary;
  if (!ca) return '';
  const row = (who, t) => {
    if (!t) return '';
    const acc = t.corrected ? `${fmtPct(t.accuracy)} <span class="muted">(${esc(t.right)} of ${esc(t.corrected)})</span>` : '–';
    return `<tr class="canary-${who}"><td>${who === 'canary' ? 'Canary' : 'Live'} <b>@${esc(t.version)}</b></td><td class="num canary-boards">${esc(t.boards)}</td>` +
      `<td class="num canary-fail-rate">${fmtPct(t.fail_rate)}</td><td class="num canary-accuracy">${acc}</td></tr>`;
  };
  return `<div class="canary">
    <h3>Canary <b>@${esc(ca.version)}</b> for ${esc(ca.rule_text)} <span class="muted">since ${esc(fmtTime(ca.since))}, set by ${esc(ca.by)}</span></h3>
    <table class="data canary-figures"><thead><tr><th>Version</th><th>Boards answered</th><th>Fail rate</th><th>Right on corrected boards</th></tr></thead>
    <tbody>${row('canary', ca.canary)}${row('live', ca.live)}</tbody></table>
  </div>`;
}

function modelHtml(m, first) {
  // Ids (#versions, #live-version, #rollback) go to the first model only, so they stay unique; classes mark every model.
  const id = (name) => (first ? ` id="${name}"` : '');
  const rows = (m.versions || []).map((v) => {
    const live = m.live != null && Number(v.version) === Number(m.live);
    const shadow = m.shadow != null && Number(v.version) === Number(m.shadow.version);
    const canary = m.canary != null && Number(v.version) === Number(m.canary.version);
    return `<tr data-version="${esc(v.version)}"${live ? ' class="live"' : ''}>` +
      `<td class="num"><b>@${esc(v.version)}</b> ${live ? '<span class="badge live-badge">live</span>' : ''}${shadow ? '<span class="badge shadow-badge">shadow</span>' : ''}${canary ? '<span class="badge canary-badge">canary</span>' : ''}</td>` +
      `<td class="num">${esc(fmtTime(v.created_at))}</td><td class="num">${fmtPct(v.map)}</td><td class="num">${fmtPct(v.map50)}</td>` +
      `<td>${apBars(v.per_class_ap)}</td><td>${esc(v.job ?? '–')}</td><td class="num">${v.parent == null ? '–' : '@' + esc(v.parent)}</td>` +
      `<td>${live ? '' : '<button type="button" class="promote">Promote</button>'}</td></tr>`;
  }).join('');
  return `<section class="card model" data-model="${esc(m.name)}">
    <div class="model-head"><h2>${esc(m.name)}</h2>
      <span>live version <span class="live-version"${id('live-version')}>${m.live == null ? '–' : esc(m.live)}</span></span>
      <button type="button" class="rollback"${id('rollback')}${m.live == null ? ' disabled' : ''}>Roll back</button></div>
    <table class="data versions"${id('versions')}><thead><tr><th>Version</th><th>Created</th><th>mAP</th><th>mAP@0.5</th><th>Per-class AP</th><th>Job</th><th>Parent</th><th></th></tr></thead>
    <tbody>${rows || '<tr class="empty"><td colspan="8">No versions.</td></tr>'}</tbody></table>${shadowHtml(m)}${canaryHtml(m)}</section>`;
}

async function modelsPage() {
  app.innerHTML = `
    <div class="page-head"><h1>Models</h1><span id="token-box"></span></div>
    <div id="models"></div>
    <section class="card" id="training"><h2>Training</h2><div id="training-body"><p class="muted">Loading…</p></div></section>`;
  let data = { token_required: false, models: [] };

  async function loadModels() {
    data = await api('/api/models');
    // Created once, so a typed token survives re-renders.
    if (data.token_required && !$('#token')) {
      $('#token-box').innerHTML = '<label>Token <input type="password" id="token" autocomplete="off" placeholder="required to change models"></label>';
    }
    $('#models').innerHTML = (data.models || []).map((m, i) => modelHtml(m, i === 0)).join('') ||
      '<p class="muted card">No models registered yet.</p>';
  }

  async function post(url, body, btn) {
    if (data.token_required) body.token = $('#token') ? $('#token').value : '';
    btn.disabled = true;
    try {
      await api(url, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
      clearError();
      await loadModels();
    } catch (e) {
      showError(e);
      btn.disabled = false;
    }
  }

  $('#models').addEventListener('click', (e) => {
    const btn = e.target.closest('button');
    const card = btn && btn.closest('[data-model]');
    if (!card) return;
    const name = card.dataset.model;
    const base = `/api/models/${encodeURIComponent(name)}`;
    if (btn.classList.contains('promote')) {
      const v = Number(btn.closest('tr').dataset.version);
      if (window.confirm(`Promote ${name}@${v} to live?`)) post(`${base}/promote`, { version: v }, btn);
    } else if (btn.classList.contains('rollback')) {
      const live = card.querySelector('.live-version').textContent;
      if (window.confirm(`Roll back ${name} from @${live} to the previous live version?`)) post(`${base}/rollback`, {}, btn);
    }
  });

  let jobs = [];
  function renderTraining() {
    const j = jobs[0];
    const body = $('#training-body');
    if (!j) { body.innerHTML = '<p class="muted">No training jobs yet.</p>'; return; }
    const stat = (id, label, value) => `<div class="kpi"><div class="kpi-label">${label}</div><span id="${id}">${value}</span></div>`;
    body.innerHTML = `<div class="kpis small">
      ${stat('t-job', 'Job', `${esc(j.job)} ${j.done ? '<span class="badge pass">done</span>' : '<span class="badge running">running</span>'}`)}
      ${stat('t-epoch', 'Epoch', `${esc(j.epoch)} / ${esc(j.epochs)}`)}
      ${stat('t-step', 'Step', `${esc(j.step)} / ${esc(j.steps)}`)}
      ${stat('t-loss', 'Loss', j.loss == null ? '–' : esc(Number(j.loss).toFixed(4)))}
      ${stat('t-ips', 'Images / s', j.images_per_sec == null ? '–' : esc(Number(j.images_per_sec).toFixed(1)))}
      ${stat('t-val-map', 'Val mAP', fmtPct(j.val_map))}
      ${stat('t-updated', 'Updated', esc(fmtTime(j.updated_at)))}
      </div>${lossSvg(j.losses)}`;
  }
  async function loadTraining() {
    jobs = (await api('/api/training')).jobs || [];
    renderTraining();
  }

  on('model', throttle(() => loadModels().catch(showError), 500));
  // A shadow comparison and a canary's figures grow with every board: refreshed at most every 5 s while one runs.
  on('detection', throttle(() => {
    if ((data.models || []).some((m) => m.shadow || m.canary)) loadModels().catch(showError);
  }, 5000));
  // Numbers move at once from the event; the curve needs the job's loss history, so it is refetched at most every 2 s.
  const refetchTraining = throttle(() => loadTraining().catch(showError), 2000);
  on('progress', (p) => {
    const i = jobs.findIndex((j) => j.job === p.job);
    if (i >= 0) jobs[i] = { ...jobs[i], ...p, losses: jobs[i].losses };
    else jobs.unshift({ ...p, losses: [] });
    renderTraining();
    refetchTraining();
  });

  await Promise.all([loadModels(), loadTraining()]);
}

// ---------- Upload ----------

async function base64Of(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  let text = '';
  // In slices: String.fromCharCode takes a bounded number of arguments.
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

async function uploadPage() {
  app.innerHTML = `
    <div class="page-head"><h1>Upload</h1><span id="token-box"></span></div>
    <section class="card upload">
      <p class="muted">Send one board image through the pipeline; the result appears here as soon as the detector has run. A model that compares boards with their defect-free template (the default) needs the template too.</p>
      <div class="upload-row">
        <label>Image <input type="file" id="upload-file" accept="image/*"></label>
        <label>Template (defect-free, optional) <input type="file" id="upload-template" accept="image/*"></label>
        <label>Line <input id="upload-line" value="upload"></label>
        <button type="button" id="upload-go" class="primary">Upload</button>
      </div>
      <div id="upload-status" class="status"></div>
      <div id="upload-result" class="status"></div>
      <img id="upload-preview" alt="chosen image" hidden>
    </section>`;

  // Detections and refusals seen before the POST answered: the detector can be faster than the HTTP reply.
  const seen = new Map(), refused = new Map();
  function remember(map, id, value) {
    map.set(id, value);
    if (map.size > 500) map.delete(map.keys().next().value);
  }
  let waiting = null, poll = null;
  // A viewer with a token wants it for uploads too (sent as a bearer token).
  api('/api/models').then((m) => {
    if (m.token_required && !$('#token')) {
      $('#token-box').innerHTML = '<label>Token <input type="password" id="token" autocomplete="off" placeholder="required to upload"></label>';
    }
  }).catch(() => {});
  // Ends the wait when `id` is the upload waited for: `word` closes the status line, `html()` is the result.
  function settle(id, word, html) {
    if (!waiting || id !== waiting) return;
    waiting = null;
    clearInterval(poll);
    const wait = $('#upload-status .wait');
    if (wait) wait.textContent = `— ${word}`;
    $('#upload-result').innerHTML = html();
  }
  const done = (s) => settle(s.image_id, 'detected', () =>
    `<a href="${esc(boardHref(s.image_id))}">Open board ${esc(s.board_id)}</a> ${badge(s.verdict)} ${esc(plural(s.defects ?? 0, 'defect'))}`);
  // A refused upload never gets a detection: say which stage refused it and why.
  const fail = (r) => settle(r.image_id, 'refused', () =>
    `<span class="badge fail">refused</span> by the ${esc(r.stage)}: ${esc(r.reason)}`);
  on('detection', (s) => {
    remember(seen, s.image_id, s);
    done(s);
  });
  on('rejected', (r) => {
    if (!r.image_id) return;
    remember(refused, r.image_id, r);
    fail(r);
  });

  $('#upload-file').addEventListener('change', () => {
    const f = $('#upload-file').files[0], img = $('#upload-preview');
    if (img.src) URL.revokeObjectURL(img.src);
    img.hidden = !f;
    if (f) img.src = URL.createObjectURL(f);
  });

  $('#upload-go').addEventListener('click', async () => {
    const file = $('#upload-file').files[0];
    if (!file) { showError(new Error('Choose an image file first.')); return; }
    const line = $('#upload-line').value.trim() || 'upload';
    const btn = $('#upload-go');
    btn.disabled = true;
    clearInterval(poll);
    $('#upload-result').innerHTML = '';
    $('#upload-status').textContent = 'uploading…';
    try {
      const template = $('#upload-template').files[0];
      const target = `/api/upload?name=${encodeURIComponent(file.name)}&line=${encodeURIComponent(line)}`;
      const auth = $('#token') && $('#token').value ? { Authorization: `Bearer ${$('#token').value}` } : {};
      // With a template both files travel as base64 in one JSON body; alone, the image is the body.
      const r = template
        ? await api(target, {
            method: 'POST', headers: { 'Content-Type': 'application/json', ...auth },
            body: JSON.stringify({ image_b64: await base64Of(file), template_b64: await base64Of(template) }),
          })
        : await api(target, {
            method: 'POST', headers: { 'Content-Type': file.type || 'application/octet-stream', ...auth }, body: file,
          });
      clearError();
      waiting = r.image_id;
      $('#upload-status').innerHTML = `<span class="badge queued">${esc(r.status || 'queued')}</span> image <code>${esc(r.image_id)}</code> · board ${esc(r.board_id)} <span class="wait muted">— waiting for the detector…</span>`;
      if (seen.has(r.image_id)) done(seen.get(r.image_id));
      else if (refused.has(r.image_id)) fail(refused.get(r.image_id));
      // Safety net for a dropped event stream: the board page's endpoint answers once the detection is stored.
      else poll = setInterval(() => { api('/api/boards/' + encodeURIComponent(r.image_id)).then((b) => done(b.summary)).catch(() => {}); }, 5000);
    } catch (e) {
      $('#upload-status').textContent = '';
      showError(e);
    } finally {
      btn.disabled = false;
    }
  });
}

// ---------- router ----------

async function main() {
  const path = location.pathname.replace(/\/+$/, '') || '/';
  const section = path === '/' ? 'overview' : path.split('/')[1];
  for (const a of $$('header nav a')) {
    const active = a.dataset.nav === section;
    a.classList.toggle('active', active);
    if (active) a.setAttribute('aria-current', 'page');
  }
  const titles = { overview: 'Overview', boards: 'Boards', review: 'Review', models: 'Models', upload: 'Upload' };
  if (titles[section]) document.title = `${titles[section]} · PCB inspection`;
  try {
    let m;
    if (path === '/') await overviewPage();
    else if (path === '/boards') await boardsPage();
    else if ((m = path.match(/^\/boards\/([^/]+)$/))) await boardPage(decodeURIComponent(m[1]));
    else if (path === '/review') await reviewPage();
    else if (path === '/models') await modelsPage();
    else if (path === '/upload') await uploadPage();
    else app.innerHTML = `<h1>Not found</h1><p>No page at <code>${esc(path)}</code>. <a href="/">Back to the overview</a>.</p>`;
  } catch (e) {
    showError(e);
  }
  // Tests and page-load timing wait for this, so it is set even when the first render failed.
  document.body.dataset.ready = '1';
}

main();
