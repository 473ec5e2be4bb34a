"""The labelling page: one HTML document with its script (no external files, nothing fetched
but the app's own /api and /media).

Keys: left arrow or 1 = left is better, right arrow or 2 = right is better, down arrow or t = tie,
s = skip (come back to it after the others), u or Backspace = undo this tab's last answer.
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mmalign label</title>
<link rel="icon" href="data:,">
<style>
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; }
#prompt { font-size: 1.3em; margin: .6em 0; min-height: 1.4em; }
#pair { display: flex; gap: 2em; }
.side { flex: 1; text-align: center; border: 3px solid transparent; padding: .4em; }
.side.chosen { border-color: #2a2; } .side.tie { border-color: #a82; }
.side img, .side video { height: min(55vh, 512px); max-width: 100%; object-fit: contain;
                         image-rendering: pixelated; }
.keys button { margin: .3em; font-size: 1em; }
#status { color: #a22; min-height: 1.2em; } progress { width: 320px; }
#done { display: none; font-size: 1.2em; color: #2a2; }
</style></head>
<body>
<div>Round <code>{{DIR}}</code> &middot; <span id="progress">0 / 0 labelled</span>
<progress id="bar" value="0" max="1"></progress> &middot; pair <span id="position"></span></div>
<div id="prompt"></div>
<div id="pair"><div class="side" id="left"></div><div class="side" id="right"></div></div>
<div class="keys">
<button id="b-left" title="left arrow or 1">&larr; left is better</button>
<button id="b-tie" title="down arrow or t">&darr; tie</button>
<button id="b-right" title="right arrow or 2">right is better &rarr;</button>
<button id="b-skip" title="s">skip (s)</button>
<button id="b-undo" title="u or Backspace">undo (u)</button>
</div>
<div id="done">Every pair is labelled. Train D3PO on them with method.buffer and method.labels set to this round.</div>
<div id="status"></div>
<script>
var state = {pairs: [], current: -1, history: [], skipped: {}, busy: false};

function answered(p) { return p.tie || p.choice === 0 || p.choice === 1; }

function nextIndex(from) {
  var n = state.pairs.length, i, k, p;
  for (k = 0; k < 2; k++) {            // first pass: not skipped; second pass: skipped ones too
    for (i = 1; i <= n; i++) {
      p = state.pairs[(from + i) % n];
      if (!answered(p) && (k === 1 || !state.skipped[p.index])) { return p.index; }
    }
  }
  return -1;
}

function mediaElement(m) {
  var el;
  if (m.kind === 'video') {
    el = document.createElement('video'); el.controls = true; el.loop = true; el.muted = true; el.autoplay = true;
  } else if (m.kind === 'audio') {
    el = document.createElement('audio'); el.controls = true;
  } else {
    el = document.createElement('img'); el.alt = 'sample';
  }
  el.src = encodeURI(m.url);
  return el;
}

function render() {
  var done = state.pairs.filter(answered).length, total = state.pairs.length;
  document.getElementById('progress').textContent = done + ' / ' + total + ' labelled';
  document.getElementById('bar').value = done; document.getElementById('bar').max = Math.max(total, 1);
  document.getElementById('done').style.display = state.current < 0 ? 'block' : 'none';
  document.getElementById('position').textContent = state.current < 0 ? '-' : (state.current + 1) + ' of ' + total;
  ['left', 'right'].forEach(function (side, k) {
    var box = document.getElementById(side);
    box.innerHTML = ''; box.className = 'side';
    if (state.current < 0) { return; }
    var p = state.pairs[state.current];
    box.appendChild(mediaElement(p.media[k]));
    if (p.choice === k) { box.className = 'side chosen'; } else if (p.tie) { box.className = 'side tie'; }
  });
  document.getElementById('prompt').textContent = state.current < 0 ? '' : state.pairs[state.current].prompt;
}

function load(summary) { state.pairs = summary.pairs; }

function send(index, answer) {
  // resolves to 'ok', 'stale' (another tab answered this pair meanwhile: the file's pairs are loaded) or 'error'
  state.busy = true;
  var body = {index: index, answer: answer, expected: state.pairs[index].state};
  return fetch('api/label', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)})
    .then(function (r) { return r.json().then(function (b) { return {status: r.status, body: b}; }); })
    .then(function (res) {
      state.busy = false;
      document.getElementById('status').textContent = res.status === 200 ? '' : res.body.error;
      if (res.body.pairs) { load(res.body); }
      return res.status === 200 ? 'ok' : (res.status === 409 ? 'stale' : 'error');
    })
    .catch(function (e) {
      state.busy = false;
      document.getElementById('status').textContent = 'not saved: the server did not answer (' + e + ')';
      return 'error';
    });
}

function give(answer) {
  if (state.busy || state.current < 0) { return; }
  var index = state.current;
  send(index, answer).then(function (result) {
    if (result === 'error') { return; }
    if (result === 'ok') { state.history.push(index); delete state.skipped[index]; }
    state.current = answered(state.pairs[index]) ? nextIndex(index) : index;
    render();
  });
}

function skip() {
  if (state.busy || state.current < 0) { return; }
  state.skipped[state.current] = true;
  var next = nextIndex(state.current);
  state.current = next < 0 ? state.current : next;
  render();
}

function undo() {
  if (state.busy || state.history.length === 0) { return; }
  var index = state.history.pop();
  send(index, 'clear').then(function (result) {
    if (result === 'error') { state.history.push(index); return; }
    state.current = index;
    render();
  });
}

var KEYS = {ArrowLeft: 'left', '1': 'left', ArrowRight: 'right', '2': 'right', ArrowDown: 'tie', t: 'tie'};
document.addEventListener('keydown', function (e) {
  if (e.ctrlKey || e.metaKey || e.altKey) { return; }
  if (KEYS[e.key]) { e.preventDefault(); give(KEYS[e.key]); }
  else if (e.key === 's') { e.preventDefault(); skip(); }
  else if (e.key === 'u' || e.key === 'Backspace') { e.preventDefault(); undo(); }
});
document.getElementById('b-left').onclick = function () { give('left'); };
document.getElementById('b-right').onclick = function () { give('right'); };
document.getElementById('b-tie').onclick = function () { give('tie'); };
document.getElementById('b-skip').onclick = skip;
document.getElementById('b-undo').onclick = undo;

fetch('api/pairs').then(function (r) { return r.json(); }).then(function (summary) {
  load(summary);
  state.current = state.pairs.length ? nextIndex(state.pairs.length - 1) : -1;
  render();
});
</script>
</body></html>
"""
