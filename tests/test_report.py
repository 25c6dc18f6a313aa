"""report.py: the charts' pixels against the axis they label, gaps, escaping, atomic writes, bad metrics files."""
import html.parser
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT, write_jsonl
import report


def figures(page):
    """{chart title: (caption text, svg element)} of a written page, in page order."""
    out = {}
    for fig in re.findall(r"<figure>(.*?)</figure>", page, re.S):
        caption = re.search(r"<figcaption>(.*?)</figcaption>", fig, re.S).group(1)
        title = re.search(r"<b>(.*?)</b>", caption).group(1)
        out[title] = (re.sub(r"<[^>]+>", " ", caption), ET.fromstring(re.search(r"<svg.*</svg>", fig, re.S).group()))
    return out


def axis(svg, cls, coord):
    """value -> pixel of an axis, fitted through its first and last labelled tick; every tick must lie on it."""
    ticks = [(float(g.find("text").text), float(g.find("line").get(coord))) for g in svg.iter("g")
             if g.get("class") == cls]
    assert len(ticks) >= 2
    (v0, p0), (v1, p1) = ticks[0], ticks[-1]
    a = (p1 - p0) / (v1 - v0)
    for v, p in ticks:
        assert abs(p0 + a * (v - v0) - p) < 0.02, (cls, v, p)
    return lambda v: p0 + a * (v - v0), ticks


def polylines(svg, name):
    """[[(x, y) pixel]] of one series' line pieces."""
    g = next(g for g in svg.iter("g") if g.get("data-name") == name)
    return [[tuple(map(float, pt.split(","))) for pt in pl.get("points").split()] for pl in g.iter("polyline")]


def write_page(tmp_path, rows, **kw):
    write_jsonl(tmp_path / "metrics.jsonl", rows)
    with open(report.write(str(tmp_path), "run", **kw), encoding="utf-8") as f:
        return f.read()


def test_points_follow_the_labelled_axes(tmp_path):
    rows = [{"step": s, "loss": 1 / s, "lr": 1e-4, "skipped": 0} for s in range(1, 21)]
    rows += [{"step": s, "eval_loss": 1.5 / s} for s in (10, 20)]
    caption, svg = figures(write_page(tmp_path, rows))["loss"]
    to_y, yticks = axis(svg, "ytick", "y1")
    to_x, _ = axis(svg, "xtick", "x1")
    # the labelled y range holds every value, and spans the plot frame exactly
    assert yticks[0][0] <= 0.05 and yticks[-1][0] >= 1
    frame = next(svg.iter("rect"))
    top, height = float(frame.get("y")), float(frame.get("height"))
    assert {round(p, 2) for _, p in (yticks[0], yticks[-1])} == {round(top, 2), round(top + height, 2)}
    [line] = polylines(svg, "loss")
    assert len(line) == 20
    for s, (x, y) in zip(range(1, 21), line):
        assert abs(x - to_x(s)) < 0.02 and abs(y - to_y(1 / s)) < 0.02, s
    ys = [y for _, y in line]
    assert all(a < b for a, b in zip(ys, ys[1:]))  # the loss falls, so the line goes down the page
    [evl] = polylines(svg, "eval_loss")
    assert [(round(x, 1), round(y, 1)) for x, y in evl] == [(round(to_x(s), 1), round(to_y(1.5 / s), 1)) for s in (10, 20)]
    assert "last 0.05 " in caption and "last 0.075 " in caption and "(step 20)" in caption


def test_eval_twin_shares_a_chart_and_order(tmp_path):
    keys = ["tokens_per_s", "lr", "beta", "kl", "entropy", "approx_kl", "reward_mean", "value_loss", "loss",
            "eval_loss", "clip_frac", "t_generate", "eval_pair_acc"]
    rows = [dict({k: 0.5 * s + i for i, k in enumerate(keys)}, step=s, note="text", flag=True) for s in range(1, 4)]
    figs = figures(write_page(tmp_path, rows))
    assert list(figs) == ["loss", "value_loss", "reward_mean", "approx_kl", "kl", "beta", "clip_frac",
                          "entropy", "eval_pair_acc", "lr", "t_generate", "tokens_per_s"]
    names = {t: [g.get("data-name") for g in svg.iter("g") if g.get("class") == "series"] for t, (_, svg) in figs.items()}
    assert names["loss"] == ["loss", "eval_loss"] and all(len(n) == 1 for t, n in names.items() if t != "loss")
    assert "eval_loss" in figs["loss"][0]  # the legend names both lines


def test_null_and_nan_are_gaps(tmp_path):
    rows = [{"step": s, "loss": None if s == 4 else float("nan") if s == 7 else float(s), "entropy": float("inf")}
            for s in range(1, 11)]
    rows.append({"step": 11, "loss": float("-inf"), "entropy": 10 ** 400})  # too large to scale: a gap too
    rows.append({"step": float("nan"), "loss": 1e308})  # a row without a usable step is skipped, and said
    rows.append({"step": 12, "loss": 5.0})  # a lone value between a gap and the end: a dot
    page = write_page(tmp_path, rows)
    figs = figures(page)
    svg = figs["loss"][1]
    to_y, _ = axis(svg, "ytick", "y1")
    lines = polylines(svg, "loss")
    assert [len(p) for p in lines] == [3, 2, 3]
    assert [round(y, 2) for _, y in lines[1]] == [round(to_y(5.0), 2), round(to_y(6.0), 2)]
    assert len(list(svg.iter("circle"))) == 1
    assert not polylines(figs["entropy"][1], "entropy") and "no finite value" in figs["entropy"][0]
    assert "line 12 of" in page and "not a JSON object with a finite numeric step" in page


class Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.cells, self.where = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.where = tag

    def handle_data(self, data):
        if self.where in ("td", "caption", "p", "th"):
            self.cells.append(data)


def test_tables_and_notes_are_escaped(tmp_path):
    evil = "<script>alert('x')</script> & <img src=x onerror=alert(1)>"
    page = write_page(tmp_path, [{"step": 1, "loss": 1.0}], notes=[f"note {evil}"],
                      tables=[(f"answers that changed {evil}", ["question", "before", "after", "right?"],
                               [["1+1=?", evil, "2", "right"], ["2+2=?", "4", None, 0.123456]])])
    p = Tags()
    p.feed(page)
    assert "script" not in p.tags and "img" not in p.tags
    assert evil in p.cells and f"note {evil}" in p.cells and f"answers that changed {evil}" in p.cells
    assert "0.1235" in p.cells and "—" in p.cells
    assert "http:" not in page and "https:" not in page  # self-contained: nothing to fetch


def test_written_atomically_with_the_umask(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    (tmp_path / "report.html").write_text("old")
    renames, real_replace = [], os.replace

    def spy(src, dst):
        with open(src, encoding="utf-8") as f:
            renames.append((src, dst, f.read()))  # what the rename puts in place must be whole already
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    old = os.umask(0o022)
    try:
        path = report.write(str(tmp_path), "run")
        assert os.stat(path).st_mode & 0o777 == 0o644
        os.umask(0o077)
        report.write(str(tmp_path), "run")
        assert os.stat(path).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert path == str(tmp_path / "report.html")
    assert [(os.path.dirname(s), d) for s, d, _ in renames] == [(str(tmp_path), path)] * 2
    assert all(s != d and text.endswith("</html>\n") for s, d, text in renames)
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "report.html"]  # no temporary file left


def test_a_failed_write_keeps_the_old_page(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    (tmp_path / "report.html").write_text("old")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        report.write(str(tmp_path), "run")
    assert (tmp_path / "report.html").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "report.html"]


def test_unfinished_last_line_and_bad_lines(tmp_path):
    rows = [{"step": s, "loss": 1 / s} for s in range(1, 6)]
    rows.insert(2, "not json")
    write_jsonl(tmp_path / "metrics.jsonl", rows)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 6, "loss": 0.')  # a run killed mid-write
    with open(report.write(str(tmp_path), "run"), encoding="utf-8") as f:
        page = f.read()
    caption, svg = figures(page)["loss"]
    assert [len(p) for p in polylines(svg, "loss")] == [5] and "last 0.2 " in caption
    assert "line 7 of" in page and "unfinished" in page  # skipped, yet said
    assert "line 3 of" in page and "not a JSON object" in page


@pytest.mark.parametrize("content", [None, "", "\n", '{"step": 1, "note": "x"}\n', '{"st'])
def test_no_metrics_yet(tmp_path, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with open(report.write(str(tmp_path / "."), "an <empty> run"), encoding="utf-8") as f:
        page = f.read()
    assert "No metrics yet" in page and "<svg" not in page and "an &lt;empty&gt; run" in page


def test_nice_ticks_cover_the_range():
    for lo, hi in [(0.05, 1.0), (-3.2, 7.9), (1234.5, 1290.0), (1e-6, 3e-6), (2.0, 2.0), (0.0, 0.0)]:
        a, b, ticks = report.nice_ticks(lo, hi)
        assert a <= lo and b >= hi and a < b and ticks[0] == a and ticks[-1] == b
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert 2 <= len(ticks) <= 7 and min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-9


def test_cli(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
    (tmp_path / "args.json").write_text(json.dumps({"script": "train_sft", "config": {}}))
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), *a],
                                    capture_output=True, text=True, cwd=tmp_path)
    r = run(str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "report.html"), r.stderr
    assert "<title>train_sft.py: " in (tmp_path / "report.html").read_text()
    r = run(str(tmp_path / "nowhere"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "metrics.jsonl" in r.stderr and "HINT" in r.stderr
