"""A run's report page, OUT/report.html: one self-contained file (inline CSS and SVG, no scripts, no
links out) that any browser, a phone's too, opens straight from disk.

It shows a header (the title, the run folder, when the page was written), the caller's notes and
tables (the toy run's before/after table, the answers that changed ...), then one small line chart
per numeric metric of OUT/metrics.jsonl against the step: a metric and its eval_ twin (loss and
eval_loss) share a chart; loss-like metrics come first (loss, other losses, reward, kl), then the
rest alphabetically, lr and timings last. A null or non-finite value is a gap in the line.

    path = report.write(cfg.out, "SFT, toy task", tables=[(caption, header, rows)], notes=["..."])
    python report.py OUT_DIR [--title TITLE]     # redraws the page of an existing run
"""
import argparse
import datetime
import html
import json
import math
import os

import flags

W, H, LEFT, RIGHT, TOP, BOTTOM = 320, 170, 46, 16, 8, 22  # one chart's viewBox and its margins
COLORS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea")
CSS = """body{font:14px/1.45 system-ui,sans-serif;color:#111;max-width:1200px;margin:0 auto;padding:12px}
h1{font-size:1.4em;margin:0 0 4px} header p{color:#555;margin:0} code{word-break:break-all}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:12px}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:6px}
figcaption{font-size:13px} figcaption small{color:#666}
svg{width:100%;height:auto;display:block} svg text{font-size:9px;fill:#555}
.ytick text{text-anchor:end;dominant-baseline:middle} .xtick text{text-anchor:middle}
.ytick line,.xtick line{stroke:#eee} .frame{fill:none;stroke:#bbb}
.series polyline{fill:none;stroke-width:1.5}
.scroll{overflow-x:auto} table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top;white-space:pre-wrap}
caption{text-align:left;font-weight:600;padding:4px 0} .warn{color:#a40}"""


def esc(x):
    return html.escape(str(x))


def num(v):
    """A value as a page shows it: floats to 4 significant digits, None as a dash, the rest as str()."""
    return f"{v:.4g}" if isinstance(v, float) else "—" if v is None else str(v)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plottable(v):
    """A number a chart can scale: not NaN, not infinite, not so large that a span overflows."""
    return is_number(v) and abs(v) < 1e300  # False for NaN; exact for ints of any size


def read_metrics(path):
    """(rows, problems) of a metrics.jsonl: no rows if it is missing; a line that is not a JSON row
    with a numeric step is skipped and named in problems (the last one is a line still being
    written, or one a killed run left unfinished)."""
    if not os.path.isfile(path):
        return [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    rows, problems = [], []
    for i, line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and plottable(row.get("step")):
            rows.append(row)
        elif i == lines[-1][0] and not line.endswith("\n"):
            problems.append(f"line {i} of {path} is unfinished (still being written, or cut by a kill): skipped")
        else:
            problems.append(f"line {i} of {path} is not a JSON object with a finite numeric step: skipped")
    return rows, problems


def series(rows):
    """{metric: [(step, value, or None for a gap)]} of every key that holds a number in some row."""
    data, numeric = {}, set()
    for row in rows:
        for k, v in row.items():
            if k != "step":
                numeric |= {k} if is_number(v) else set()
                data.setdefault(k, []).append((row["step"], float(v) if plottable(v) else None))
    return {k: sorted(data[k], key=lambda p: p[0]) for k in numeric}


def rank(name):
    """Where a chart goes: loss, other losses, reward, kl, the rest alphabetically, then lr and timings."""
    base = name[5:] if name.startswith("eval_") else name
    parts = base.split("_")
    hits = [base == "loss", "loss" in parts, parts[0] == "reward", "kl" in parts, False, base == "lr",
            parts[0] == "t" or base.endswith("_per_s")]
    return hits.index(True) if True in hits else 4, base, name


def charts(data):
    """[[metric, its eval_ twin if logged]] in page order."""
    groups = [[k] + [f"eval_{k}"] * (f"eval_{k}" in data) for k in data
              if not (k.startswith("eval_") and k[5:] in data)]
    return sorted(groups, key=lambda g: rank(g[0]))


def nice_ticks(lo, hi, n=4):
    """(axis lo, axis hi, ticks): [lo, hi] widened to round numbers, about n steps of 1, 2 or 5 x 10^k."""
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    a, b = math.floor(lo / step), math.ceil(hi / step)
    return a * step, b * step, [i * step for i in range(a, b + 1)]


def x_axis(data):
    """(lo, hi, ticks) of the step axis, shared by every chart so that they line up."""
    steps = [s for pts in data.values() for s, _ in pts]
    lo, hi = min(steps), max(steps)
    if lo == hi:
        return nice_ticks(lo, hi)
    margin = (hi - lo) / 10  # round steps inside, clear of the first and last step's labels
    return lo, hi, [lo] + [t for t in nice_ticks(lo, hi)[2] if lo + margin < t < hi - margin] + [hi]


def chart(names, data, xaxis):
    """One metric's figure: its name and last values, an SVG line chart against the step."""
    finite = [v for k in names for _, v in data[k] if v is not None]
    y_lo, y_hi, yticks = nice_ticks(min(finite), max(finite)) if finite else nice_ticks(0.0, 1.0)
    x_lo, x_hi, xticks = xaxis
    px = lambda x: LEFT + (x - x_lo) / (x_hi - x_lo) * (W - LEFT - RIGHT)
    py = lambda y: TOP + (y_hi - y) / (y_hi - y_lo) * (H - TOP - BOTTOM)  # SVG's y grows downwards
    svg = [f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{esc(" and ".join(names))} by step">',
           f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}"/>']
    for t in yticks:
        svg.append(f'<g class="ytick"><line x1="{LEFT}" x2="{W - RIGHT}" y1="{py(t):.2f}" y2="{py(t):.2f}"/>'
                   f'<text x="{LEFT - 4}" y="{py(t):.2f}">{t:.6g}</text></g>')
    for t in xticks:
        svg.append(f'<g class="xtick"><line x1="{px(t):.2f}" x2="{px(t):.2f}" y1="{TOP}" y2="{H - BOTTOM}"/>'
                   f'<text x="{px(t):.2f}" y="{H - 8}">{t:.6g}</text></g>')
    caption = [f"<b>{esc(names[0])}</b>"]
    for i, k in enumerate(names):
        color, segments = COLORS[i % len(COLORS)], [[]]
        for x, y in data[k]:
            if y is None:  # a gap: the line stops and starts again at the next value
                segments.append([])
            else:
                segments[-1].append(f"{px(x):.2f},{py(y):.2f}")
        dash = ' stroke-dasharray="5 3"' * (i > 0)
        svg.append(f'<g class="series" data-name="{esc(k)}" stroke="{color}" fill="{color}"{dash}>')
        for seg in segments:
            if len(seg) > 1:
                svg.append(f'<polyline points="{" ".join(seg)}"/>')
            elif seg:  # a lone point between gaps still shows
                x, y = seg[0].split(",")
                svg.append(f'<circle cx="{x}" cy="{y}" r="2"/>')
        svg.append("</g>")
        last = [(s, v) for s, v in data[k] if v is not None][-1:]
        key = f'<span style="color:{color}">{"╍" if i else "━"}</span> {esc(k)} ' if len(names) > 1 else ""
        caption.append(f"{key}last {num(last[0][1])} <small>(step {num(last[0][0])})</small>" if last
                       else f"{key}no finite value")
    if finite:
        caption.append(f"<small>min {num(min(finite))} · max {num(max(finite))}</small>")
    return f'<figure><figcaption>{"<br>".join(caption)}</figcaption>{"".join(svg)}</svg></figure>'


def table(caption, header, rows):
    """An HTML table; every cell escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(num(c))}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<div class="scroll"><table><caption>{esc(caption)}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def page(out_dir, title, tables, notes):
    """The whole HTML page, as a string."""
    path = os.path.join(out_dir, "metrics.jsonl")
    rows, problems = read_metrics(path)
    data = series(rows)
    when = datetime.datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
             f"<header><h1>{esc(title)}</h1><p>run folder <code>{esc(os.path.abspath(out_dir))}</code>"
             f" · written {esc(when)}</p></header>"]
    parts += [f'<p class="note">{esc(n)}</p>' for n in notes]
    parts += [table(*t) for t in tables]
    parts.append("<h2>Metrics</h2>")
    if data:
        xaxis = x_axis(data)
        parts.append(f"<p>{len(rows)} rows of <code>{esc(path)}</code>, steps {num(xaxis[0])} to {num(xaxis[1])}</p>")
        parts.append('<div class="grid">' + "".join(chart(g, data, xaxis) for g in charts(data)) + "</div>")
    else:
        parts.append(f"<p>No metrics yet: <code>{esc(path)}</code> is missing or holds no numeric values.</p>")
    parts += [f'<p class="warn">{esc(p)}</p>' for p in problems]
    return "\n".join(parts + ["</body></html>\n"])


def default_title(out_dir):
    """"train_sft.py: toy_sft": the script from OUT/args.json, and the folder's name."""
    title = os.path.basename(os.path.abspath(out_dir))
    try:
        with open(os.path.join(out_dir, "args.json"), encoding="utf-8") as f:
            return f"{json.load(f)['script']}.py: {title}"
    except (OSError, ValueError, KeyError, TypeError):
        return title  # a run record we cannot read only costs the title its script name


def write(out_dir, title=None, tables=(), notes=()):
    """Writes OUT/report.html whole or not at all (a temporary file renamed into place); returns its path.
    tables: (caption, header, rows) each; notes: paragraphs of plain text."""
    text = page(out_dir, title or default_title(out_dir), tables, notes)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "report.html")
    tmp = os.path.join(out_dir, f".tmp-report.html.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:  # open() creates it 0666 less the umask, as it should
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def main(argv=None):
    p = flags.Parser(prog="report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the --out folder of a train_*.py run")
    p.add_argument("--title", help="the page's title (default: the run's script and folder)")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.out_dir, "metrics.jsonl")):
        raise FileNotFoundError(f"{os.path.join(args.out_dir, 'metrics.jsonl')}: no such file, so no run to "
                                "report. HINT: pass the --out folder of a train_*.py run")
    print(write(args.out_dir, args.title))


if __name__ == "__main__":
    flags.run(main)
