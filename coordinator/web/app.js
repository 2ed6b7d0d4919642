// vtox dashboard: follows the coordinator's frames (server-sent events, one a second), draws
// them with uPlot, and sends the controls as JSON POSTs. No build step, no external assets.
'use strict';

const $ = (sel) => document.querySelector(sel);
const $$ = (sel) => Array.from(document.querySelectorAll(sel));
const PAGE = 50;
const KEEP_POINTS = 4000;

const state = {
  frame: null,
  points: [],
  sort: { key: 'name', dir: 1 },
  page: 0,
  filter: '',
  drill: null,
  charts: {},
  rampCharts: {},
  source: null,
  defaultTarget: '',
};

// ---------------------------------------------------------------- formatting
const num = (x, digits = 0) => (x === null || x === undefined || Number.isNaN(x)) ? '–'
  : Number(x).toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
const ms = (x) => (x === null || x === undefined) ? '–' : (x >= 100 ? num(x, 0) : num(x, 1));
function duration(s) {
  if (s === null || s === undefined) return '–';
  s = Math.max(0, Math.floor(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h ${m}m ${sec}s` : (m ? `${m}m ${sec}s` : `${sec}s`);
}
const clock = (t) => new Date(t * 1000).toLocaleTimeString('en-GB');
function text(el, value) { if (el.textContent !== value) el.textContent = value; }
function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

// ---------------------------------------------------------------- talking to the coordinator
async function getJson(path) {
  const r = await fetch(path, { credentials: 'same-origin' });
  if (r.status === 401) { showLogin(); throw new Error('sign in first'); }
  return r.json();
}

async function post(path, body) {
  const r = await fetch(path, {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body || {}),
  });
  let data = {};
  try { data = await r.json(); } catch (e) { data = { error: `HTTP ${r.status}` }; }
  if (r.status === 401) showLogin();
  return { ok: r.ok, status: r.status, data };
}

// ---------------------------------------------------------------- sign-in
function showLogin() {
  if (state.source) { state.source.close(); state.source = null; }
  $('#app').hidden = true;
  $('#tabs').hidden = true;
  $('#logout').hidden = true;
  $('#login').hidden = false;
  text($('#conn'), 'signed out');
  $('#token').focus();
}

$('#login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const r = await post('/api/login', { token: $('#token').value });
  if (r.ok) {
    $('#token').value = '';
    text($('#login-error'), '');
    boot();
  } else {
    text($('#login-error'), r.data.error || 'refused');
  }
});

$('#logout').addEventListener('click', async () => { await post('/api/logout'); showLogin(); });

// ---------------------------------------------------------------- tabs
$$('#tabs button').forEach((b) => b.addEventListener('click', () => showTab(b.dataset.tab)));
function showTab(name) {
  $$('#tabs button').forEach((b) => b.classList.toggle('active', b.dataset.tab === name));
  $$('.tab').forEach((t) => { t.hidden = t.id !== name; });
  // Charts drawn while hidden have no width: size them now.
  resizeCharts();
}

// ---------------------------------------------------------------- charts
function chartWidth(el) { return Math.max(300, el.clientWidth - 14); }

function makeChart(id, series, opts = {}) {
  const el = document.getElementById(id);
  const data = [[], ...series.map(() => [])];
  const u = new uPlot({
    width: chartWidth(el),
    height: 200,
    legend: { live: false },
    scales: { x: { time: opts.time !== false }, y: opts.y || {} },
    axes: [{}, { size: 56, values: (u, v) => v.map((x) => (x === null ? '' : num(x, opts.digits || 0))) }],
    series: [{}, ...series.map((s) => Object.assign({ width: 1.5, spanGaps: false }, s))],
  }, data, el);
  return u;
}

function initCharts() {
  if (state.charts.rate) return;
  state.charts.rate = makeChart('chart-rate', [
    { label: 'expected', stroke: '#9aa4b5', dash: [6, 4] },
    { label: 'accepted', stroke: '#2a6fdb' },
    { label: 'failed', stroke: '#c62828' },
  ]);
  state.charts.success = makeChart('chart-success', [
    { label: 'success %', stroke: '#2e7d32' },
  ], { y: { range: (u, min, max) => [Math.min(90, min), 100] }, digits: 1 });
  state.charts.latency = makeChart('chart-latency', [
    { label: 'p50', stroke: '#7fb0ff' },
    { label: 'p95', stroke: '#2a6fdb' },
    { label: 'p99', stroke: '#123d87' },
    { label: 'delay p95', stroke: '#e08a00', dash: [5, 3] },
    { label: 'delay p99', stroke: '#b26a00', dash: [5, 3] },
  ], { digits: 1 });
  state.charts.drops = makeChart('chart-drops', [
    { label: 'dropped/s', stroke: '#c62828' },
    { label: 'buffered', stroke: '#6a1b9a' },
    { label: 'offline vehicles', stroke: '#00838f' },
  ]);
  state.rampCharts.rate = makeChart('chart-ramp-rate', [
    { label: 'expected', stroke: '#9aa4b5', dash: [6, 4], points: { show: true } },
    { label: 'accepted', stroke: '#2a6fdb', points: { show: true, size: 7 } },
  ], { time: false });
  const pts = { show: true, size: 7 };
  state.rampCharts.latency = makeChart('chart-ramp-latency', [
    { label: 'p50', stroke: '#7fb0ff', points: pts },
    { label: 'p95', stroke: '#2a6fdb', points: pts },
    { label: 'p99', stroke: '#123d87', points: pts },
    { label: 'p95 SLO', stroke: '#c62828', dash: [4, 4] },
  ], { time: false, digits: 1 });
  state.rampCharts.delay = makeChart('chart-ramp-delay', [
    { label: 'delay p50', stroke: '#f0b860', points: pts },
    { label: 'delay p95', stroke: '#e08a00', points: pts },
    { label: 'delay p99', stroke: '#b26a00', points: pts },
    { label: 'delay p95 SLO', stroke: '#c62828', dash: [4, 4] },
  ], { time: false, digits: 1 });
  state.rampCharts.success = makeChart('chart-ramp-success', [
    { label: 'success %', stroke: '#2e7d32', points: pts },
    { label: 'success SLO', stroke: '#c62828', dash: [4, 4] },
  ], { time: false, digits: 2 });
  state.rampCharts.diagnosis = makeChart('chart-ramp-diagnosis', [
    { label: 'ingested', stroke: '#2a6fdb', points: pts },
    { label: 'processed by the slowest live group', stroke: '#6a1b9a', points: pts },
  ], { time: false, digits: 1 });
  window.addEventListener('resize', resizeCharts);
}

function resizeCharts() {
  for (const [id, u] of Object.entries(state.charts)) {
    const el = document.getElementById(`chart-${id}`);
    if (el && el.clientWidth) u.setSize({ width: chartWidth(el), height: 200 });
  }
  const ids = {
    rate: 'chart-ramp-rate', latency: 'chart-ramp-latency', delay: 'chart-ramp-delay',
    success: 'chart-ramp-success', diagnosis: 'chart-ramp-diagnosis',
  };
  for (const [id, u] of Object.entries(state.rampCharts)) {
    const el = document.getElementById(ids[id]);
    if (el && el.clientWidth) u.setSize({ width: chartWidth(el), height: 200 });
  }
}

function drawCharts() {
  const p = state.points;
  const x = p.map((q) => q.t);
  const col = (f) => p.map(f);
  state.charts.rate.setData([x, col((q) => q.expected), col((q) => q.accepted), col((q) => q.failed)]);
  state.charts.success.setData([x, col((q) => q.success)]);
  state.charts.latency.setData([x, col((q) => q.p50), col((q) => q.p95), col((q) => q.p99),
    col((q) => q.delay_p95), col((q) => q.delay_p99)]);
  state.charts.drops.setData([x, col((q) => q.dropped), col((q) => q.buffered), col((q) => q.offline)]);
}

// ---------------------------------------------------------------- the live view
function renderHeader(f) {
  const r = f.run;
  const p = f.point;
  text($('#h-state'), r ? r.state : 'no run');
  text($('#h-id'), r ? r.id : 'start one under Control');
  text($('#h-vehicles'), r ? num(r.vehicles) : '–');
  text($('#h-target'), r ? `${r.target} · ${r.delivery}` : '');
  text($('#h-driving'), r ? num(r.driving) : '–');
  text($('#h-unassigned'), r ? `${num(r.unassigned)} unassigned` : '');
  text($('#h-elapsed'), r ? duration(r.elapsed_s) : '–');
  text($('#h-epoch'), r ? `epoch ${r.epoch}` : '');
  text($('#h-rate'), p ? num(p.accepted, 1) : '–');
  text($('#h-expected'), p ? `of ${num(p.expected, 1)} expected` : '');
  text($('#h-success'), r ? `${num(r.success, 2)} %` : '–');
  text($('#h-failed'), r ? `${num(r.failed)} failed of ${num(r.sent)} sent` : '');
  text($('#h-p95'), p && p.p95 !== null ? `${ms(p.p95)} ms` : '–');
  text($('#h-delay'), p && p.delay_p95 !== null ? `delay p95 ${ms(p.delay_p95)} ms` : '');
  text($('#h-buffered'), p ? `${num(p.buffered)} / ${num(p.offline)}` : '–');
  text($('#h-dropped'), r ? `${num(r.dropped)} ticks dropped` : '');
  text($('#h-restarts'), r ? `${num(r.restarts)} restarts · ${num(r.lease_expiries)} lease expiries` : '');
  // Nothing stops silently: undriven vehicles and a failed run are said at the top.
  const alarm = $('#h-alarm');
  let say = '';
  if (r && r.failure) say = `Run failed: ${r.failure}`;
  else if (r && r.not_driven > 0 && r.not_driven_s >= 5) {
    say = `${num(r.not_driven)} vehicles not driven for ${duration(r.not_driven_s)}`;
  }
  text(alarm, say);
  alarm.hidden = !say;
  const running = r && r.state === 'running';
  $('#stop').disabled = !running;
}

function sortedAgents() {
  const rows = (state.frame ? state.frame.agents : []).filter((a) => !state.filter
    || a.name.toLowerCase().includes(state.filter) || (a.host || '').toLowerCase().includes(state.filter));
  const { key, dir } = state.sort;
  rows.sort((a, b) => {
    const x = a[key], y = b[key];
    if (x === y) return a.name < b.name ? -1 : 1;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * dir;
  });
  return rows;
}

function renderAgents() {
  const rows = sortedAgents();
  const pages = Math.max(1, Math.ceil(rows.length / PAGE));
  state.page = Math.min(state.page, pages - 1);
  const shown = rows.slice(state.page * PAGE, (state.page + 1) * PAGE);
  const html = shown.map((a) => {
    const cls = [a.connected ? '' : 'off', a.failed ? 'fail' : ''].join(' ');
    const sim = a.sim_cpu === null ? '–' : num(a.sim_cpu, 0);
    return `<tr class="${cls}" data-name="${escapeHtml(a.name)}">`
      + `<td>${escapeHtml(a.name)}${a.connected ? '' : ' (lost)'}</td><td>${escapeHtml(a.host || '')}</td>`
      + `<td>${num(a.cores)}</td><td>${num(a.memory_gib, 0)} GiB</td>`
      + `<td>${a.up}/${a.restarting}/<span class="${a.failed ? 'bad' : ''}">${a.failed}</span> of ${a.planned}`
      + `${a.not_driven ? ` <span class="bad" title="${escapeHtml(a.not_driven_cause)}">${num(a.not_driven)} not driven</span>` : ''}</td>`
      + `<td>${num(a.restarts)}${a.lease_expiries ? ` <span class="bad">(${num(a.lease_expiries)} lease)</span>` : ''}</td>`
      + `<td>${num(a.vehicles)}</td><td>${num(a.msg_s, 1)}</td><td>${num(a.success, 2)}</td>`
      + `<td>${ms(a.p95_ms)}</td><td>${sim}${a.starved ? ' <span class="bad">starved</span>' : ''}</td><td>${num(a.rss_mib, 0)}</td>`
      + `<td>${a.heartbeat_s_ago === null ? '–' : num(a.heartbeat_s_ago, 1) + ' s'}</td></tr>`;
  }).join('');
  const body = $('#agent-table tbody');
  if (body.innerHTML !== html) body.innerHTML = html;
  const all = state.frame ? state.frame.agents.length : 0;
  const up = state.frame ? state.frame.agents.filter((a) => a.connected).length : 0;
  text($('#agent-count'), `${up} connected of ${all}`);
  text($('#page-info'), `page ${state.page + 1} of ${pages} (${rows.length} shown)`);
  $('#prev-page').disabled = state.page === 0;
  $('#next-page').disabled = state.page >= pages - 1;
  $$('#agent-table th').forEach((th) => {
    th.classList.toggle('sorted', th.dataset.key === state.sort.key);
    th.classList.toggle('up', th.dataset.key === state.sort.key && state.sort.dir === 1);
  });
}

$$('#agent-table th').forEach((th) => th.addEventListener('click', () => {
  const key = th.dataset.key;
  state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : (key === 'name' || key === 'host' ? 1 : -1) };
  renderAgents();
}));
$('#agent-filter').addEventListener('input', (e) => { state.filter = e.target.value.toLowerCase(); state.page = 0; renderAgents(); });
$('#prev-page').addEventListener('click', () => { state.page = Math.max(0, state.page - 1); renderAgents(); });
$('#next-page').addEventListener('click', () => { state.page += 1; renderAgents(); });
$('#agent-table tbody').addEventListener('click', (e) => {
  const tr = e.target.closest('tr');
  if (tr) { state.drill = tr.dataset.name; loadDrill(); }
});
$('#drill-close').addEventListener('click', () => { state.drill = null; $('#drill').hidden = true; });

async function loadDrill() {
  if (!state.drill) return;
  try {
    const d = await getJson(`/api/agents/${encodeURIComponent(state.drill)}`);
    text($('#drill-name'), state.drill);
    const rows = (d.instances || []).map((i) => `<tr class="${i.phase === 'failed' ? 'fail' : ''}"><td>${i.index}</td>`
      + `<td>${num(i.first_vehicle)}..${num(i.last_vehicle)}</td><td>${escapeHtml(i.phase)}</td><td>${i.restarts}</td>`
      + `<td>${num(i.sent)}</td><td>${num(i.accepted)}</td><td>${num(i.failed)}</td><td>${num(i.buffered)}</td>`
      + `<td style="text-align:left">${escapeHtml(i.last_error || '')}</td></tr>`).join('');
    $('#drill-table tbody').innerHTML = rows || '<tr><td colspan="9">no instances</td></tr>';
    $('#drill').hidden = false;
  } catch (e) { /* signed out meanwhile */ }
}

function addEvents(events) {
  const list = $('#event-list');
  for (const e of events) {
    const li = document.createElement('li');
    li.className = `k-${e.kind}`;
    li.innerHTML = `<time>${clock(e.t)}</time>${escapeHtml(e.text)}`;
    list.prepend(li);
  }
  while (list.children.length > 300) list.lastChild.remove();
}

function renderPipeline(f) {
  const w = f.pipeline;
  $('#pipeline').hidden = !w && !f.redis_error && !f.score;
  if (f.redis_error) text($('#pipe-summary'), `redis: ${f.redis_error}`);
  if (w) {
    text($('#pipe-summary'), `ingest ${num(w.ingest_msgs_per_s, 1)} msg/s, stream length ${num(w.raw_length)}`
      + (w.never_diagnosed ? `, ${num(w.never_diagnosed)} messages never diagnosed` : ''));
    $('#pipe-table tbody').innerHTML = (w.groups || []).map((g) => {
      const behind = (w.falling_behind || []).includes(g.name);
      const losing = (w.losing || []).includes(g.name);
      return `<tr class="${behind || losing ? 'fail' : ''}"><td>${escapeHtml(g.name)}</td><td>${num(g.consumers)}</td>`
        + `<td>${num(g.processed_msgs_per_s, 1)}</td><td>${num(g.backlog_end)}</td><td>${num(g.backlog_slope_per_s, 1)}</td>`
        + `<td>${num(g.trimmed_unread)}</td><td>${behind ? 'falling behind' : ''}${losing ? ' losing' : ''}</td></tr>`;
    }).join('');
    const idle = (w.idle_groups || []).map((g) => g.name);
    text($('#pipe-idle'), idle.length ? `Idle groups (no consumer, not judged): ${idle.join(', ')}` : '');
  }
  const s = f.score;
  if (s && s.analyzers) {
    $('#score-table tbody').innerHTML = Object.entries(s.analyzers).map(([name, a]) => `<tr><td>${escapeHtml(name)}</td>`
      + `<td>${num(a.results)}</td><td>${a.detection_percent === null ? '–' : num(a.detection_percent, 1) + ' %'}</td>`
      + `<td>${a.false_positive_percent === null ? '–' : num(a.false_positive_percent, 1) + ' %'}</td>`
      + `<td>${a.precision_percent === null ? '–' : num(a.precision_percent, 1) + ' %'}</td>`
      + `<td>${a.lag_ms ? ms(a.lag_ms.p95) + ' ms' : '–'}</td></tr>`).join('');
  }
}

// ---------------------------------------------------------------- the ramp view
function renderRamp(r) {
  if (!r) return;
  const steps = Array.isArray(r.steps) ? r.steps : [];
  text($('#ramp-state'), `${r.id}: ${r.state}${r.error ? ' — ' + r.error : ''}`);
  const c = r.current;
  if (c && r.state === 'running' && c.vehicles !== undefined) {
    const left = Math.max(0, c.total_s - (Date.now() / 1000 - c.started_unix));
    const search = c.search ? ` (searching for the knee between ${num(c.passing)} passing and ${num(c.failing)} failing)` : '';
    text($('#ramp-current'), `Now: ${num(c.vehicles)} vehicles${search}, about ${duration(left)} left in this step.`);
  } else {
    text($('#ramp-current'), '');
  }
  $('#ramp-files').hidden = !r.files;
  const rows = steps.slice().sort((a, b) => (a.vehicles - b.vehicles) || (a.search - b.search));
  $('#ramp-table tbody').innerHTML = rows.map((s) => `<tr class="${s.verdict === 'pass' ? '' : 'fail'}">`
    + `<td>${num(s.vehicles)}</td><td>${s.search ? 'search' : 'planned'}</td>`
    + `<td>${num(s.expected_msgs_per_s, 1)}</td><td>${num(s.accepted_msgs_per_s, 1)}</td><td>${num(s.success_percent, 2)}</td>`
    + `<td>${s.latency_ms ? ms(s.latency_ms.p95) : '–'}</td><td>${s.delay_ms ? ms(s.delay_ms.p95) : '–'}</td>`
    + `<td>${s.verdict}</td><td>${escapeHtml((s.failed_as || []).join(', '))}</td><td>${escapeHtml(s.limiting_side || '')}</td></tr>`).join('');
  const x = rows.map((s) => s.vehicles);
  const slo = (c && c.slo) || {};
  const flat = (v) => rows.map(() => (v === undefined ? null : v));
  const q = (f, k) => rows.map((s) => (s[f] ? s[f][k] : null));
  state.rampCharts.rate.setData([x, rows.map((s) => s.expected_msgs_per_s), rows.map((s) => s.accepted_msgs_per_s)]);
  state.rampCharts.latency.setData([x, q('latency_ms', 'p50'), q('latency_ms', 'p95'), q('latency_ms', 'p99'), flat(slo.p95_ms)]);
  state.rampCharts.delay.setData([x, q('delay_ms', 'p50'), q('delay_ms', 'p95'), q('delay_ms', 'p99'), flat(slo.delay_p95_ms)]);
  state.rampCharts.success.setData([x, rows.map((s) => s.success_percent), flat(slo.min_success)]);
  const piped = rows.some((s) => s.backend_pipeline);
  $('#chart-ramp-diagnosis').hidden = !piped;
  if (piped) {
    state.rampCharts.diagnosis.setData([x, rows.map((s) => (s.backend_pipeline ? s.backend_pipeline.ingest_msgs_per_s : null)),
      rows.map((s) => (s.backend_pipeline ? s.backend_pipeline.slowest_msgs_per_s : null))]);
  }
}

// ---------------------------------------------------------------- frames
function onFrame(f) {
  const newRun = !state.frame || !state.frame.run || !f.run || state.frame.run.id !== f.run.id;
  if (newRun && f.run && state.frame && state.frame.run) state.points = [];
  state.frame = f;
  if (f.point) {
    state.points.push(f.point);
    if (state.points.length > KEEP_POINTS) state.points.splice(0, state.points.length - KEEP_POINTS);
  }
  renderHeader(f);
  drawCharts();
  renderAgents();
  if (f.events && f.events.length) addEvents(f.events);
  renderPipeline(f);
  renderRamp(f.ramp);
  if (state.drill && Math.floor(f.t) % 5 === 0) loadDrill();
}

function follow() {
  if (state.source) state.source.close();
  const es = new EventSource('/api/events');
  state.source = es;
  es.addEventListener('frame', (e) => {
    text($('#conn'), `live · ${clock(Date.now() / 1000)}`);
    try { onFrame(JSON.parse(e.data)); } catch (err) { /* a frame that does not parse is skipped */ }
  });
  es.onerror = async () => {
    text($('#conn'), 'reconnecting…');
    try {
      const s = await (await fetch('/api/session', { credentials: 'same-origin' })).json();
      if (s.auth_required && !s.signed_in) showLogin();
    } catch (e) { /* the coordinator is away; EventSource retries by itself */ }
  };
}

// ---------------------------------------------------------------- controls
function formBody(form) {
  const body = {};
  new FormData(form).forEach((v, k) => { body[k] = String(v); });
  return body;
}

function showErrors(form, errors, message) {
  form.querySelectorAll('.field-error, .form-error').forEach((el) => { el.textContent = ''; });
  form.querySelector('.form-ok').textContent = '';
  for (const [field, msg] of Object.entries(errors || {})) {
    const el = form.querySelector(`[data-for="${field}"]`) || form.querySelector('.form-error');
    el.textContent = msg;
  }
  if (message) form.querySelector('.form-error').textContent = message;
}

$('#run-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const form = ev.target;
  const r = await post('/api/run', formBody(form));
  if (r.ok) {
    showErrors(form, {}, '');
    form.querySelector('.form-ok').textContent = `run ${r.data.run_id} started`;
    showTab('live');
  } else {
    showErrors(form, r.data.errors, r.data.error);
  }
});

$('#ramp-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const form = ev.target;
  const r = await post('/api/ramp', formBody(form));
  if (r.ok) {
    showErrors(form, {}, '');
    form.querySelector('.form-ok').textContent = 'ramp started';
    showTab('ramp');
  } else {
    showErrors(form, r.data.errors, r.data.error);
  }
});

$('#stop').addEventListener('click', async () => {
  const r = await post('/api/stop');
  text($('#action-msg'), r.ok ? (r.data.was_running ? 'stopping: simulators finish their requests in flight' : 'nothing was running') : (r.data.error || 'refused'));
});

$('#rebalance').addEventListener('click', async () => {
  const r = await post('/api/rebalance');
  text($('#action-msg'), r.ok ? `moved ${r.data.moved_instances} instances (${r.data.moved_vehicles} vehicles)` : (r.data.error || 'refused'));
});

// ---------------------------------------------------------------- start
async function boot() {
  let s;
  try {
    s = await (await fetch('/api/session', { credentials: 'same-origin' })).json();
  } catch (e) {
    text($('#conn'), 'the coordinator does not answer');
    setTimeout(boot, 2000);
    return;
  }
  if (s.auth_required && !s.signed_in) { showLogin(); return; }
  $('#login').hidden = true;
  $('#app').hidden = false;
  $('#tabs').hidden = false;
  $('#logout').hidden = !s.auth_required;
  state.defaultTarget = s.default_target;
  $$('.default-target').forEach((el) => { el.placeholder = s.default_target; });
  initCharts();
  try {
    const h = await getJson('/api/history');
    state.points = h.points || [];
    $('#event-list').innerHTML = '';
    addEvents(h.events || []);
    drawCharts();
  } catch (e) { return; }
  follow();
}

boot();
