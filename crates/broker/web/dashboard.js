// The Courier broker's dashboard.
//
// Polls /api/stats (documented in crates/broker/src/metrics.rs) once a
// second and draws what it sees: rates from the deltas of counters between
// polls (over the broker's own uptime, so a slow poll does not skew them),
// the last two minutes as SVG line charts, and tables of queues, durable
// subscriptions and cluster members. No dependencies and nothing from the
// network but this endpoint.
//
// Every number on the page sits in an element with a `data-metric`
// attribute: its text is formatted for people ("1.2k"), its `data-value`
// is the raw number (absent while unknown), for scripts and tests.
//
// A broker that restarts sends counters smaller than the last ones: the
// series start again. An endpoint that does not answer marks the page
// disconnected and leaves a gap in the charts; polling goes on.

'use strict';

(() => {
  const POLL_MS = 1000;
  const FETCH_TIMEOUT_MS = 3000;
  const WINDOW_MS = 120000; // what the charts show
  const AVERAGE_MS = 5000; // what the tiles' rates average over
  const MAX_SAMPLES = 240; // bound on history, whatever the clock does
  // A broker whose start (our clock less its uptime) moved later by more
  // than this has restarted, even if its counters have grown past the old
  // ones meanwhile. Above the fetch timeout: a slow answer is not a restart.
  const RESTART_SLACK_MS = 5000;
  const SVG = 'http://www.w3.org/2000/svg';

  /** Samples, oldest first: {t, up, published, delivered, dropped,
   *  connections, web, latency, queues: Map} or {t, gap: true}. */
  let samples = [];
  let last = null; // the latest stats received
  let lastSeen = 0; // client time of the latest answer
  let restartedAt = 0;
  let runStart = null; // the earliest estimate of the broker's start, our clock

  // ----- formatting -----

  function compact(n, digits) {
    const units = [[1e12, 'T'], [1e9, 'G'], [1e6, 'M'], [1e3, 'k']];
    for (const [size, unit] of units) {
      if (n >= size) {
        const v = n / size;
        const text = v >= 100 ? v.toFixed(0) : v.toFixed(digits);
        return text.replace(/\.0+$/, '') + unit;
      }
    }
    return String(n);
  }

  function fmtRate(v) {
    if (v === null || v === undefined || !isFinite(v)) return '–';
    if (v === 0) return '0';
    if (v < 0.1) return v.toFixed(2);
    if (v < 10) return v.toFixed(1);
    if (v < 1000) return Math.round(v).toString();
    return compact(v, 1);
  }

  function fmtCount(n) {
    if (n === null || n === undefined || !isFinite(n)) return '–';
    if (n < 1e6) return Math.round(n).toLocaleString('en-US');
    return compact(n, 2);
  }

  function fmtBytes(n) {
    if (n === null || n === undefined || !isFinite(n)) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? n.toString() : n.toFixed(n < 10 ? 1 : 0)) + ' ' + units[i];
  }

  function fmtMicros(us) {
    if (us === null || us === undefined || !isFinite(us)) return '–';
    if (us < 1000) return Math.round(us) + ' µs';
    if (us < 1e6) return (us / 1000).toFixed(us < 10000 ? 2 : us < 100000 ? 1 : 0) + ' ms';
    return (us / 1e6).toFixed(2) + ' s';
  }

  function fmtUptime(ms) {
    let s = Math.floor(ms / 1000);
    const d = Math.floor(s / 86400);
    s -= d * 86400;
    const h = Math.floor(s / 3600);
    s -= h * 3600;
    const m = Math.floor(s / 60);
    s -= m * 60;
    if (d > 0) return d + 'd ' + h + 'h';
    if (h > 0) return h + 'h ' + m + 'm';
    if (m > 0) return m + 'm ' + s + 's';
    return s + 's';
  }

  function fmtClock(t) {
    return new Date(t).toLocaleTimeString('en-GB', { hour12: false });
  }

  // ----- writing numbers -----

  /** Sets an element's text and its raw `data-value` (null: unknown). */
  function put(el, value, text) {
    if (el.textContent !== text) el.textContent = text;
    if (value === null || value === undefined || (typeof value === 'number' && !isFinite(value))) {
      el.removeAttribute('data-value');
    } else {
      el.setAttribute('data-value', String(value));
    }
  }

  const metricCache = new Map();
  /** Sets every element with `data-metric="name"` on the static page. */
  function metric(name, value, text) {
    let els = metricCache.get(name);
    if (!els) {
      els = Array.from(document.querySelectorAll('[data-metric="' + name + '"]'));
      metricCache.set(name, els);
    }
    for (const el of els) put(el, value, text);
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }

  // ----- rates -----

  function good() {
    return samples.filter((s) => !s.gap);
  }

  /** Per second, between two samples of one run, from the broker's clock. */
  function rate(a, b, pick) {
    if (!a || !b) return null;
    const dt = (b.up - a.up) / 1000;
    if (dt <= 0) return null;
    const va = pick(a);
    const vb = pick(b);
    if (va === undefined || vb === undefined || va === null || vb === null) return null;
    return Math.max(0, vb - va) / dt;
  }

  /** The sample to average from: the oldest within AVERAGE_MS of the latest. */
  function averageBase(list) {
    const latest = list[list.length - 1];
    for (const s of list) {
      if (s !== latest && latest.t - s.t <= AVERAGE_MS + POLL_MS / 2) return s;
    }
    return list.length > 1 ? list[list.length - 2] : null;
  }

  /** Whether `s` comes from a broker that started after the last one seen. */
  function restarted(s, now) {
    if (!last) return false;
    return (
      now - s.uptime_ms - runStart > RESTART_SLACK_MS ||
      s.uptime_ms < last.uptime_ms ||
      s.published < last.published ||
      s.delivered < last.delivered ||
      s.dropped < last.dropped ||
      s.stored < last.stored ||
      s.version !== last.version
    );
  }

  function record(s, now) {
    if (restarted(s, now)) {
      samples = [];
      restartedAt = now;
      runStart = null;
    }
    const start = now - s.uptime_ms;
    runStart = runStart === null ? start : Math.min(runStart, start);
    const queues = new Map();
    for (const q of s.queues || []) {
      queues.set(q.name, { delivered: q.delivered, acknowledged: q.acknowledged, enqueued: q.enqueued });
    }
    samples.push({
      t: now,
      up: s.uptime_ms,
      published: s.published,
      delivered: s.delivered,
      dropped: s.dropped,
      connections: s.connections,
      web: s.web_connections || 0,
      latency: (s.publish_latency && s.publish_latency.counts) || [],
      queues,
    });
    trim(now);
    last = s;
    lastSeen = now;
  }

  function markGap(now) {
    if (samples.length && !samples[samples.length - 1].gap) samples.push({ t: now, gap: true });
    trim(now);
  }

  function trim(now) {
    // Keep one sample older than the window so lines reach its left edge.
    while (samples.length > 2 && samples[1].t < now - WINDOW_MS) samples.shift();
    while (samples.length > MAX_SAMPLES) samples.shift();
    while (samples.length && samples[0].gap) samples.shift();
  }

  // ----- latency -----

  function quantile(bounds, counts, q) {
    const total = counts.reduce((a, b) => a + b, 0);
    if (!total) return null;
    const target = q * total;
    let cumulative = 0;
    for (let i = 0; i < counts.length; i++) {
      const c = counts[i];
      if (c > 0 && cumulative + c >= target) {
        if (i >= bounds.length) return { over: bounds[bounds.length - 1] };
        const lower = i === 0 ? 0 : bounds[i - 1];
        const upper = bounds[i];
        return { value: lower + ((upper - lower) * (target - cumulative)) / c };
      }
      cumulative += c;
    }
    return null;
  }

  function showQuantile(name, result) {
    if (!result) metric(name, null, '–');
    else if (result.over !== undefined) metric(name, result.over, '> ' + fmtMicros(result.over));
    else metric(name, Math.round(result.value), fmtMicros(result.value));
  }

  function updateLatency(s, list) {
    const bounds = (s.publish_latency && s.publish_latency.bounds_us) || [];
    const now = (s.publish_latency && s.publish_latency.counts) || [];
    const first = list[0];
    let counts = now.map((c, i) => Math.max(0, c - ((first && first.latency[i]) || 0)));
    let scope = 'last 2 min';
    if (!counts.some((c) => c > 0)) {
      counts = now;
      scope = 'since start';
    }
    showQuantile('latency-p50', quantile(bounds, counts, 0.5));
    showQuantile('latency-p99', quantile(bounds, counts, 0.99));
    const scopeEl = document.getElementById('latency-scope');
    if (scopeEl) scopeEl.textContent = scope;
  }

  // ----- charts -----

  function niceCeil(v, integer) {
    if (!(v > 0)) return integer ? 2 : 1;
    const exp = Math.pow(10, Math.floor(Math.log10(v)));
    const f = v / exp;
    let top = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * exp;
    if (integer) {
      top = Math.max(2, Math.ceil(top));
      if (top % 2) top += 1;
    }
    return top;
  }

  /** Points of each series at each sample time (null: no value there). */
  function seriesPoints(defs) {
    const times = [];
    const values = defs.map(() => []);
    for (let i = 0; i < samples.length; i++) {
      const s = samples[i];
      times.push(s.t);
      defs.forEach((d, k) => {
        if (s.gap) values[k].push(null);
        else values[k].push(d.value(s, samples[i - 1]));
      });
    }
    return { times, values };
  }

  const charts = [
    {
      id: 'chart-messages',
      format: fmtRate,
      series: [
        { name: 'published', cls: 's-published', value: (s, p) => (p && !p.gap ? rate(p, s, (x) => x.published) : null) },
        { name: 'delivered', cls: 's-delivered', value: (s, p) => (p && !p.gap ? rate(p, s, (x) => x.delivered) : null) },
      ],
    },
    {
      id: 'chart-drops',
      format: fmtRate,
      series: [{ name: 'dropped', cls: 's-dropped', value: (s, p) => (p && !p.gap ? rate(p, s, (x) => x.dropped) : null) }],
    },
    {
      id: 'chart-connections',
      format: fmtCount,
      integer: true,
      series: [
        { name: 'Courier', cls: 's-courier', value: (s) => s.connections },
        { name: 'browser', cls: 's-web', value: (s) => s.web },
      ],
    },
  ];

  function drawChart(chart, now) {
    const fig = document.getElementById(chart.id);
    if (!fig) return;
    const svg = fig.querySelector('svg');
    const w = Math.max(200, Math.round(svg.clientWidth || 600));
    const h = Math.max(80, Math.round(svg.clientHeight || 170));
    const pad = { l: 46, r: 10, t: 8, b: 20 };
    const t0 = now - WINDOW_MS;
    const x = (t) => pad.l + ((t - t0) / WINDOW_MS) * (w - pad.l - pad.r);
    const data = seriesPoints(chart.series);
    let max = 0;
    for (const vs of data.values) for (const v of vs) if (v !== null && v > max) max = v;
    const top = niceCeil(max, chart.integer);
    const y = (v) => pad.t + (1 - v / top) * (h - pad.t - pad.b);

    while (svg.firstChild) svg.removeChild(svg.firstChild);
    svg.setAttribute('viewBox', '0 0 ' + w + ' ' + h);

    // Disconnected stretches, shaded.
    for (let i = 0; i < samples.length; i++) {
      if (!samples[i].gap) continue;
      const start = x(Math.max(t0, samples[i - 1] ? samples[i - 1].t : samples[i].t));
      const next = samples.slice(i + 1).find((s) => !s.gap);
      const end = x(next ? next.t : now);
      if (end > start) svg.appendChild(svgEl('rect', { class: 'gap', x: start, y: pad.t, width: end - start, height: h - pad.t - pad.b }));
    }

    for (const f of [0, 0.5, 1]) {
      const v = top * f;
      const gy = y(v);
      svg.appendChild(svgEl('line', { class: 'grid', x1: pad.l, x2: w - pad.r, y1: gy, y2: gy }));
      const label = svgEl('text', { x: pad.l - 8, y: gy + 4, 'text-anchor': 'end' });
      label.textContent = chart.format(v);
      svg.appendChild(label);
    }
    for (const [ago, text] of [[120, '2m'], [90, '90s'], [60, '1m'], [30, '30s'], [0, 'now']]) {
      const label = svgEl('text', { x: x(now - ago * 1000), y: h - 4, 'text-anchor': ago === 120 ? 'start' : ago === 0 ? 'end' : 'middle' });
      label.textContent = text;
      svg.appendChild(label);
    }

    let any = false;
    chart.series.forEach((def, k) => {
      const vs = data.values[k];
      let line = '';
      let area = '';
      let run = [];
      const flush = () => {
        if (run.length) {
          line += 'M' + run.map(([px, py]) => px.toFixed(1) + ',' + py.toFixed(1)).join('L');
          if (k === 0 && run.length > 1) {
            area += 'M' + run[0][0].toFixed(1) + ',' + y(0).toFixed(1) + 'L' +
              run.map(([px, py]) => px.toFixed(1) + ',' + py.toFixed(1)).join('L') +
              'L' + run[run.length - 1][0].toFixed(1) + ',' + y(0).toFixed(1) + 'Z';
          }
        }
        run = [];
      };
      for (let i = 0; i < vs.length; i++) {
        if (vs[i] === null) {
          flush();
          continue;
        }
        any = true;
        run.push([Math.max(pad.l, x(data.times[i])), y(vs[i])]);
      }
      flush();
      if (area) svg.appendChild(svgEl('path', { class: 'area ' + def.cls, d: area }));
      if (line) svg.appendChild(svgEl('path', { class: 'line ' + def.cls, d: line }));
    });
    if (!any) {
      const text = svgEl('text', { class: 'no-data', x: (pad.l + w - pad.r) / 2, y: (pad.t + h - pad.b) / 2, 'text-anchor': 'middle' });
      text.textContent = samples.length ? 'collecting…' : 'waiting for the broker…';
      svg.appendChild(text);
    }

    const cursor = svgEl('line', { class: 'cursor', x1: 0, x2: 0, y1: pad.t, y2: h - pad.b, visibility: 'hidden' });
    svg.appendChild(cursor);
    const dots = chart.series.map((def) => {
      const dot = svgEl('circle', { class: def.cls, r: 3.5, visibility: 'hidden' });
      svg.appendChild(dot);
      return dot;
    });
    chart.view = { data, x, y, cursor, dots, now, w, pad };
    if (chart.hoverX !== undefined) hover(chart, chart.hoverX);
  }

  function hover(chart, px) {
    const fig = document.getElementById(chart.id);
    const tip = fig.querySelector('.tooltip');
    const view = chart.view;
    if (!view) return;
    const { data, x, y, cursor, dots } = view;
    let best = -1;
    let bestDistance = Infinity;
    for (let i = 0; i < data.times.length; i++) {
      if (!data.values.some((vs) => vs[i] !== null)) continue;
      const d = Math.abs(x(data.times[i]) - px);
      if (d < bestDistance) {
        bestDistance = d;
        best = i;
      }
    }
    if (best < 0 || bestDistance > 40) {
      unhover(chart, false);
      return;
    }
    const cx = x(data.times[best]);
    cursor.setAttribute('x1', cx);
    cursor.setAttribute('x2', cx);
    cursor.setAttribute('visibility', 'visible');
    while (tip.firstChild) tip.removeChild(tip.firstChild);
    const ago = Math.round((view.now - data.times[best]) / 1000);
    tip.appendChild(el('div', { class: 'when' }, fmtClock(data.times[best]) + (ago > 0 ? ' · ' + ago + ' s ago' : '')));
    chart.series.forEach((def, k) => {
      const v = data.values[k][best];
      if (v === null) {
        dots[k].setAttribute('visibility', 'hidden');
      } else {
        dots[k].setAttribute('cx', cx);
        dots[k].setAttribute('cy', y(v));
        dots[k].setAttribute('visibility', 'visible');
      }
      const row = el('div', { class: 'row' });
      row.appendChild(el('i', { class: 'key ' + def.cls.replace('s-', '') }));
      row.appendChild(el('span', {}, def.name));
      row.appendChild(el('b', {}, chart.format(v)));
      tip.appendChild(row);
    });
    tip.hidden = false;
    // SVG elements have no offsetLeft: place it from the boxes.
    const svgBox = fig.querySelector('svg').getBoundingClientRect();
    const figBox = fig.getBoundingClientRect();
    const scale = view.w ? svgBox.width / view.w : 1;
    const at = svgBox.left - figBox.left + cx * scale;
    const width = tip.offsetWidth;
    tip.style.left = (at + 14 + width > figBox.width ? at - width - 14 : at + 14) + 'px';
    tip.style.top = svgBox.top - figBox.top + 8 + 'px';
  }

  function unhover(chart, forget) {
    if (forget) chart.hoverX = undefined;
    const fig = document.getElementById(chart.id);
    if (!fig || !chart.view) return;
    fig.querySelector('.tooltip').hidden = true;
    chart.view.cursor.setAttribute('visibility', 'hidden');
    for (const dot of chart.view.dots) dot.setAttribute('visibility', 'hidden');
  }

  function drawCharts() {
    const now = Date.now();
    for (const chart of charts) drawChart(chart, now);
  }

  for (const chart of charts) {
    const fig = document.getElementById(chart.id);
    if (!fig) continue;
    const svg = fig.querySelector('svg');
    svg.addEventListener('mousemove', (event) => {
      const box = svg.getBoundingClientRect();
      chart.hoverX = ((event.clientX - box.left) / box.width) * (chart.view ? chart.view.w : box.width);
      hover(chart, chart.hoverX);
    });
    svg.addEventListener('mouseleave', () => unhover(chart, true));
  }

  // ----- tables -----

  const queueRows = new Map();

  function queueCells(name) {
    const tr = el('tr', { 'data-queue': name });
    const nameCell = el('td', { class: 'name' }, name);
    const dlq = name.endsWith('.dlq');
    if (dlq) nameCell.appendChild(el('span', { class: 'tag' }, 'dead letters'));
    tr.appendChild(nameCell);
    const cell = (key) => {
      const td = el('td', { class: 'num', 'data-metric': 'queue-' + key + '-' + name });
      tr.appendChild(td);
      return td;
    };
    const depth = cell('depth');
    const barCell = el('td', { class: 'bar-col' });
    const bar = el('div', { class: 'bar' });
    const fill = el('i', dlq ? { class: 'dlq' } : {});
    bar.appendChild(fill);
    barCell.appendChild(bar);
    tr.appendChild(barCell);
    return {
      tr,
      depth,
      fill,
      inFlight: cell('in-flight'),
      consumers: cell('consumers'),
      enqueueRate: cell('enqueue-rate'),
      deliveredRate: cell('delivered-rate'),
      ackRate: cell('ack-rate'),
      redelivered: cell('redelivered'),
      deadLettered: cell('dead-lettered'),
      disk: cell('disk-bytes'),
    };
  }

  function numberCell(td, value, text, warn) {
    put(td, value, text);
    td.classList.toggle('zero', value === 0);
    td.classList.toggle('warn', !!warn && value > 0);
  }

  function updateQueues(s, list) {
    const tbody = document.getElementById('queue-rows');
    const queues = s.queues || [];
    const latest = list[list.length - 1];
    const base = averageBase(list);
    const maxDepth = queues.reduce((m, q) => Math.max(m, q.depth), 0);
    const seen = new Set();
    queues.forEach((q, index) => {
      seen.add(q.name);
      let row = queueRows.get(q.name);
      if (!row) {
        row = queueCells(q.name);
        queueRows.set(q.name, row);
      }
      // Keep the rows in the API's (name) order.
      if (tbody.children[index] !== row.tr) tbody.insertBefore(row.tr, tbody.children[index] || null);
      const then = base && base.queues.get(q.name);
      const now = latest.queues.get(q.name);
      const r = (pick) => (then && now ? rate({ up: base.up, v: pick(then) }, { up: latest.up, v: pick(now) }, (x) => x.v) : null);
      numberCell(row.depth, q.depth, fmtCount(q.depth));
      // On a log scale, so a queue of 10 beside one of 100,000 still shows.
      const width = maxDepth ? (100 * Math.log1p(q.depth)) / Math.log1p(maxDepth) : 0;
      row.fill.style.width = width.toFixed(1) + '%';
      // A dead-letter queue that never held anything is quiet.
      const quiet = q.name.endsWith('.dlq') && q.depth === 0 && q.delivered === 0 && q.bytes_on_disk === 0;
      row.tr.classList.toggle('quiet', quiet);
      numberCell(row.inFlight, q.in_flight, fmtCount(q.in_flight));
      numberCell(row.consumers, q.consumers, fmtCount(q.consumers));
      // Messages waiting with nobody to take them (usual for dead letters,
      // so not flagged there).
      const unserved = !q.name.endsWith('.dlq') && q.consumers === 0 && q.depth > 0;
      row.consumers.classList.toggle('warn', unserved);
      if (unserved) row.consumers.setAttribute('title', 'messages wait and no consumer is attached');
      else row.consumers.removeAttribute('title');
      const enq = r((x) => x.enqueued);
      const del = r((x) => x.delivered);
      const ack = r((x) => x.acknowledged);
      numberCell(row.enqueueRate, enq, fmtRate(enq));
      numberCell(row.deliveredRate, del, fmtRate(del));
      numberCell(row.ackRate, ack, fmtRate(ack));
      numberCell(row.redelivered, q.redelivered, fmtCount(q.redelivered), true);
      numberCell(row.deadLettered, q.dead_lettered, fmtCount(q.dead_lettered), true);
      numberCell(row.disk, q.bytes_on_disk, fmtBytes(q.bytes_on_disk));
    });
    for (const [name, row] of queueRows) {
      if (!seen.has(name)) {
        row.tr.remove();
        queueRows.delete(name);
      }
    }
    metric('queue-count', queues.length, String(queues.length));
    document.getElementById('queues-empty').hidden = queues.length > 0;
  }

  let durableKey = '';
  function updateDurable(s) {
    const durable = s.durable || [];
    metric('durable-count', durable.length, String(durable.length));
    document.getElementById('durable-empty').hidden = durable.length > 0;
    const key = JSON.stringify(durable);
    if (key === durableKey) return;
    durableKey = key;
    const tbody = document.getElementById('durable-rows');
    while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
    for (const d of durable) {
      const tr = el('tr', { 'data-durable': d.name });
      tr.appendChild(el('td', { class: 'name' }, d.name));
      tr.appendChild(el('td', { class: 'name' }, d.filter));
      tbody.appendChild(tr);
    }
  }

  const memberRows = new Map();
  function updateCluster(s) {
    const section = document.getElementById('cluster');
    const badge = document.getElementById('node-badge');
    const c = s.cluster;
    section.hidden = !c;
    badge.hidden = !c;
    section.parentElement.classList.toggle('single', !c);
    if (!c) return;
    metric('cluster-node', c.node, String(c.node));
    metric('cluster-role', c.role, c.role);
    metric('cluster-leader', c.leader, c.leader === null || c.leader === undefined ? 'none' : 'node ' + c.leader);
    metric('cluster-term', c.term, fmtCount(c.term));
    metric('cluster-leader-changes', c.leader_changes, fmtCount(c.leader_changes));
    metric('cluster-applied-index', c.applied_index, fmtCount(c.applied_index));
    metric('cluster-last-log-index', c.last_log_index, fmtCount(c.last_log_index));
    metric('cluster-raft-errors', c.raft_rpc_errors, fmtCount(c.raft_rpc_errors));
    const tbody = document.getElementById('member-rows');
    const routes = new Map((c.routes || []).map((r) => [r.node, r]));
    const seen = new Set();
    (c.members || []).forEach((m, index) => {
      seen.add(m.id);
      let row = memberRows.get(m.id);
      if (!row) {
        const tr = el('tr', { 'data-member': String(m.id) });
        row = {
          tr,
          id: el('td', { class: 'name' }),
          address: el('td', { class: 'name' }),
          role: el('td', { 'data-metric': 'member-role-' + m.id }),
          lag: el('td', { class: 'num', 'data-metric': 'member-lag-' + m.id }),
          route: el('td', { 'data-metric': 'member-route-' + m.id }),
        };
        for (const td of [row.id, row.address, row.role, row.lag, row.route]) tr.appendChild(td);
        memberRows.set(m.id, row);
      }
      if (tbody.children[index] !== row.tr) tbody.insertBefore(row.tr, tbody.children[index] || null);
      row.id.textContent = 'node ' + m.id;
      if (m.id === c.node) row.id.appendChild(el('span', { class: 'badge self' }, 'this node'));
      row.address.textContent = m.address;
      while (row.role.firstChild) row.role.removeChild(row.role.firstChild);
      const role = m.id === c.leader ? 'leader' : m.voter ? 'voter' : 'learner';
      row.role.setAttribute('data-value', role);
      row.role.appendChild(el('span', { class: 'badge' + (role === 'leader' ? ' leader' : '') }, role));
      const lag = m.lag === null || m.lag === undefined ? null : m.lag;
      numberCell(row.lag, lag, lag === null ? '–' : fmtCount(lag), true);
      const route = routes.get(m.id);
      const state = m.id === c.node ? 'self' : route ? route.state : 'none';
      put(row.route, state, m.id === c.node ? '—' : route ? route.state + ' · ' + fmtCount(route.messages_out) + ' out · ' + fmtCount(route.messages_in) + ' in' : '–');
      row.route.className = route && m.id !== c.node ? 'route-' + route.state : '';
    });
    for (const [id, row] of memberRows) {
      if (!seen.has(id)) {
        row.tr.remove();
        memberRows.delete(id);
      }
    }
  }

  // ----- the whole page -----

  function setStatus(state, text) {
    const status = document.getElementById('status');
    status.setAttribute('data-state', state);
    document.getElementById('status-text').textContent = text;
    document.body.classList.toggle('stale', state === 'disconnected');
  }

  function notice(text) {
    const p = document.getElementById('notice');
    p.hidden = !text;
    p.textContent = text || '';
  }

  function update(s, now) {
    record(s, now);
    const list = good();
    const latest = list[list.length - 1];
    const base = averageBase(list);
    const tile = (name, pick) => {
      const v = base ? rate(base, latest, pick) : null;
      metric(name, v, fmtRate(v));
    };
    tile('published-rate', (x) => x.published);
    tile('delivered-rate', (x) => x.delivered);
    tile('dropped-rate', (x) => x.dropped);
    metric('published-total', s.published, fmtCount(s.published));
    metric('delivered-total', s.delivered, fmtCount(s.delivered));
    metric('dropped-total', s.dropped, fmtCount(s.dropped));
    metric('stored-total', s.stored, fmtCount(s.stored));
    const web = s.web_connections || 0;
    metric('connections', s.connections + web, fmtCount(s.connections + web));
    metric('connections-courier', s.connections, fmtCount(s.connections));
    metric('connections-web', web, fmtCount(web));
    metric('subscriptions', s.subscriptions, fmtCount(s.subscriptions));
    metric('version', s.version, s.version || '?');
    metric('uptime', s.uptime_ms, fmtUptime(s.uptime_ms));
    metric('last-update', now, fmtClock(now));
    updateLatency(s, list);
    updateQueues(s, list);
    updateDurable(s);
    updateCluster(s);
    setStatus('live', 'live');
    if (restartedAt && now - restartedAt < WINDOW_MS) {
      notice('The broker restarted at ' + fmtClock(restartedAt) + ': its counters, and these charts, started again.');
    } else {
      notice('');
    }
    drawCharts();
  }

  async function fetchStats() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
    try {
      const response = await fetch('api/stats', { cache: 'no-store', signal: abort.signal });
      if (!response.ok) throw new Error('HTTP ' + response.status);
      const s = await response.json();
      if (!s || typeof s.uptime_ms !== 'number' || typeof s.published !== 'number') {
        throw new Error('not the stats');
      }
      return s;
    } finally {
      clearTimeout(timer);
    }
  }

  async function poll() {
    const started = Date.now();
    try {
      const s = await fetchStats();
      update(s, Date.now());
    } catch (err) {
      const now = Date.now();
      markGap(now);
      // Rates are unknown while nobody answers (the totals stay, dimmed).
      for (const name of ['published-rate', 'delivered-rate', 'dropped-rate']) metric(name, null, '–');
      setStatus('disconnected', lastSeen ? 'disconnected · last seen ' + fmtClock(lastSeen) + ' · retrying' : 'disconnected · retrying');
      drawCharts();
    }
    setTimeout(poll, Math.max(100, POLL_MS - (Date.now() - started)));
  }

  window.addEventListener('resize', drawCharts);
  drawCharts();
  poll();
})();
