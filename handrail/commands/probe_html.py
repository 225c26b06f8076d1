"""`handrail probe --html FILE`: one self-contained page (no network, no files beside it) that shows
the student's own attempts token by token, each token coloured by how far the aggregate moves the
student there, the divergence gate's cut marked, and on hover the student's, the teacher's and the
target's most likely next tokens."""

from __future__ import annotations

import html
import json
from pathlib import Path

from handrail.commands.probe import table

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 2em auto 12em; max-width: 60em; color: #222; }
pre.table { background: #f6f6f6; padding: 1em; white-space: pre-wrap; }
.attempt { border-top: 1px solid #ddd; padding: 0.8em 0; }
.problem { color: #555; margin-bottom: 0.4em; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; }
.tok { border-radius: 3px; padding: 1px 0; cursor: default; }
.tok.silenced { text-decoration: underline dotted #999; color: #777; }
.tok:hover { outline: 2px solid #1a5fb4; }
.cut { color: #c01c28; font-weight: bold; padding: 0 2px; }
#panel { position: fixed; bottom: 0; left: 0; right: 0; background: #fff; border-top: 2px solid #1a5fb4;
         padding: 0.5em 2em; font-family: ui-monospace, monospace; font-size: 13px; min-height: 5em; }
#panel table { border-collapse: collapse; } #panel td { padding: 0 1em 0 0; }
.key { display: inline-block; width: 1.2em; height: 0.9em; vertical-align: middle; }
"""

_SCRIPT = """
const data = JSON.parse(document.getElementById('tokens').textContent);
const panel = document.getElementById('panel');
function show(el) {
  const t = data[+el.dataset.a][+el.dataset.t];
  const row = (name) => '<tr><td>' + name + '</td>' + t[name].map(
      ([s, p]) => '<td>' + JSON.stringify(s).replace(/</g, '&lt;') + ' ' + (100 * p).toFixed(1) + '%</td>').join('') + '</tr>';
  panel.innerHTML = '<div>the student wrote ' + JSON.stringify(t.text).replace(/</g, '&lt;') +
      ' here; the aggregate moves its distribution ' + t.moved.toFixed(3) + ' nats' +
      (t.silenced ? ' (silenced by the gate: no loss in training)' : '') +
      '. Most likely tokens for this position:</div><table>' + row('student') + row('teacher') + row('target') +
      '</table>';
  panel.dataset.shown = el.dataset.a + ':' + el.dataset.t;
}
document.querySelectorAll('.tok').forEach(el => el.addEventListener('mouseover', () => show(el)));
"""


def _colour(moved: float, scale: float) -> str:
    """Red, as strong as the movement (in nats; `scale` nats or more is full)."""
    return f"rgba(224, 27, 36, {min(1.0, moved / scale) * 0.85:.3f})"


def render(report: dict) -> str:
    """The page for a probe report that holds `attempts` (probe(..., html_attempts=N))."""
    attempts = report.get("attempts", [])
    scale = max(0.05, max((t["moved"] for a in attempts for t in a["tokens"]), default=0.05))
    parts = []
    for a, attempt in enumerate(attempts):
        spans, cut = [], False
        for t, tok in enumerate(attempt["tokens"]):
            if tok["silenced"] and not cut:
                spans.append('<span class="cut" title="the divergence gate silences the teacher from here">✂</span>')
                cut = True
            cls = "tok silenced" if tok["silenced"] else "tok"
            spans.append(f'<span class="{cls}" data-a="{a}" data-t="{t}" style="background:{_colour(tok["moved"], scale)}">'
                         f'{html.escape(tok["text"])}</span>')
        parts.append(f'<div class="attempt"><div class="problem">{html.escape(attempt["problem"])} '
                     f'(reference answer: {html.escape(str(attempt["answer"]))})</div>'
                     f'<div class="text">{"".join(spans)}</div></div>')
    data = json.dumps([a["tokens"] for a in attempts]).replace("</", "<\\/")
    legend = (f'<p>Each token of the student\'s own sampled attempt is coloured by how far the aggregate '
              f'({html.escape(report["aggregate"]["rule"])}) moves the student there: '
              f'<span class="key" style="background:{_colour(scale, scale)}"></span> {scale:.2f} nats or more, '
              f'<span class="key" style="background:{_colour(scale / 4, scale)}"></span> {scale / 4:.2f}. '
              f'<span class="cut">✂</span> marks where the divergence gate ({html.escape(report["aggregate"]["gate"])}) '
              f'silences the teacher; dotted tokens after it carry no loss. Hover a token for what the student, the '
              f'teacher (shown the reference) and the target find most likely at that position.</p>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>handrail probe: "
            f"{html.escape(str(report['model']))}</title><style>{_STYLE}</style></head><body>"
            f"<h1>handrail probe</h1><p>model {html.escape(str(report['model']))}, "
            f"{html.escape(str(report.get('data') or report.get('task')))}</p>"
            f"<pre class='table'>{html.escape(table(report))}</pre>{legend}{''.join(parts)}"
            f"<div id='panel'>hover a token</div>"
            f"<script type='application/json' id='tokens'>{data}</script><script>{_SCRIPT}</script>"
            f"</body></html>")


def write(report: dict, path: str | Path) -> None:
    Path(path).write_text(render(report), encoding="utf-8")
