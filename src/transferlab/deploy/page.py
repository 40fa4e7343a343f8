"""GET / of transferlab-serve: drop or choose an image, see its top-k labels (a multi-label model's: the predicted set as
tags, each with its probability, then every label's probability). One self-contained page, no external assets."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#222}
#drop{border:2px dashed #889;border-radius:8px;padding:1rem 2rem 2rem;text-align:center}
#drop.over{background:#eef}
#preview{max-width:100%;max-height:18rem;margin-top:1rem;display:none}
table{border-collapse:collapse;margin-top:1rem;width:100%}td{padding:.25rem .5rem;border-bottom:1px solid #ddd}
.bar{background:#4a7;height:.8rem}#error{color:#b00}small{color:#666}
.tag{display:inline-block;background:#def;border:1px solid #89a;border-radius:1rem;padding:.2rem .7rem;margin:.2rem;font-weight:600}
"""

_SCRIPT = """
const drop = document.getElementById('drop'), input = document.getElementById('file');
const show = (id, text) => { document.getElementById(id).textContent = text; };
async function send(file) {
  show('error', ''); show('top1', '...'); document.getElementById('rows').innerHTML = ''; document.getElementById('tags').innerHTML = '';
  const img = document.getElementById('preview'); img.src = URL.createObjectURL(file); img.style.display = 'block';
  const body = new FormData(); body.append('file', file);
  const key = document.getElementById('key'), headers = {};
  if (key) { sessionStorage.setItem('transferlab-key', key.value); headers['Authorization'] = 'Bearer ' + key.value; }
  try {
    const answer = await fetch('predict', {method: 'POST', body, headers});
    const data = await answer.json();
    if (!answer.ok) { show('top1', ''); show('error', data.error || answer.statusText); return; }
    const result = data.results[0];
    let shown = result.predictions;
    if (result.labels) {  // multi-label: the predicted set as tags (label and probability), then every label
      show('top1', result.labels.length ? '' : 'no label over its threshold');
      for (const label of result.labels) {
        const tag = document.createElement('span'); tag.className = 'tag';
        tag.textContent = label + ' ' + (100 * result.probabilities[label]).toFixed(1) + ' %';
        document.getElementById('tags').appendChild(tag);
      }
      shown = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]).map(([label, prob]) => ({label, prob}));
    } else {
      show('top1', shown[0].label);
    }
    for (const p of shown) {
      const row = document.createElement('tr');
      row.innerHTML = '<td></td><td></td><td style="width:40%"><div class="bar"></div></td>';
      row.cells[0].textContent = p.label; row.cells[1].textContent = (100 * p.prob).toFixed(1) + ' %';
      row.querySelector('.bar').style.width = (100 * p.prob).toFixed(1) + '%';
      document.getElementById('rows').appendChild(row);
    }
  } catch (e) { show('top1', ''); show('error', String(e)); }
}
const keyInput = document.getElementById('key');
if (keyInput) keyInput.value = sessionStorage.getItem('transferlab-key') || '';
input.addEventListener('change', () => { if (input.files.length) send(input.files[0]); });
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over'); if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]); });
"""


def page_html(class_names: list[str], metrics: Mapping[str, Any], needs_key: bool, multilabel: bool = False) -> str:
    """The page; with `needs_key` it asks for the server's API key (kept in this tab's sessionStorage only). A
    multi-label model's page names its labels and its test mAP (it has no accuracy); the tags come from the answer."""
    key, what = ("test/map", "test mAP") if multilabel else ("test/acc", "test accuracy")
    acc, interval = metrics.get(key), metrics.get(f"{key}_ci95")
    measured = (
        f"{what} {acc:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}] (95 %)" if isinstance(interval, list) and len(interval) == 2 else "")
        if isinstance(acc, (int, float))
        else f"no measured {'mAP' if multilabel else 'accuracy'}"
    )
    key_field = '<p><label>API key <input type="password" id="key" autocomplete="off"></label></p>' if needs_key else ""
    classes = html.escape(", ".join(class_names[:12]) + (f", ... ({len(class_names)})" if len(class_names) > 12 else ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>transferlab-serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>
<body><h1>transferlab-serve</h1>
<p><small>{len(class_names)} {"labels (multi-label)" if multilabel else "classes"}: {classes}; {html.escape(measured)}. API: <code>POST /predict</code>, <a href="metadata">/metadata</a>,
<a href="docs">/docs</a>.</small></p>
{key_field}<div id="drop"><p>Drop an image here, or choose one:</p><input type="file" id="file" accept="image/*"></div>
<img id="preview" alt="the image sent">
<h2 id="top1"></h2><div id="tags"></div><p id="error"></p>
<table><tbody id="rows"></tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""
