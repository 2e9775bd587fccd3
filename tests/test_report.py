"""`distrain report`: report.md + a self-contained report.html with valid, non-blank embedded PNGs."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, TINY_HAR, run_distrain


def _report(run_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distrain.cli", "report", str(run_dir)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip


def _assert_real_png(data: bytes) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(data)).verify()  # checksums and structure
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    # Not blank: a plot has axes, text and lines, so many pixels differ from the background.
    background = np.median(pixels)
    assert (np.abs(pixels - background) > 30).mean() > 0.01


@pytest.fixture(scope="module")
def har_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    run_distrain([*TINY_HAR, "train.max_steps=8", "log.every=2", "train.eval_every=4", f"output_dir={run_dir}"])
    # A plot written by a recipe (regression/forecasting write pred_vs_truth_<split>.png) must be embedded too.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.scatter([1, 2, 3], [1.1, 1.9, 3.2])
    fig.savefig(run_dir / "pred_vs_truth_test.png")
    plt.close(fig)
    proc = _report(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_html_is_self_contained_with_valid_images(har_run):
    page = (har_run / "report.html").read_text()
    sources = re.findall(r"""src\s*=\s*['"]([^'"]*)['"]""", page)
    assert len(sources) >= 5  # training, eval, confusion, throughput, the recipe's plot
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    # Nothing else is fetched: no links, stylesheets, scripts or CSS urls.
    assert not re.search(r"href\s*=|<link|<script|url\(|@import", page, re.I)
    for s in sources:
        _assert_real_png(base64.b64decode(s.split(",", 1)[1]))
    recipe_png = base64.b64encode((har_run / "pred_vs_truth_test.png").read_bytes()).decode()
    assert recipe_png in page


def test_markdown_images_exist_and_are_valid(har_run):
    md = (har_run / "report.md").read_text()
    paths = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(paths) >= 5
    for p in paths:
        _assert_real_png((har_run / p).read_bytes())
    for section in ("## Summary", "## Plan", "## Config", "## Training curves", "## Evaluation",
                    "## Classes (test)", "## Throughput", "## Checkpoints and weights"):  # fmt: skip
        assert section in md
    assert "| model.safetensors |" in md


def test_per_class_table_matches_confusion_matrix(har_run):
    data = json.loads((har_run / "confusion_test.json").read_text())
    cm = np.array(data["matrix"], dtype=float)
    recall = np.divide(np.diag(cm), cm.sum(1), out=np.zeros(len(cm)), where=cm.sum(1) > 0)
    precision = np.divide(np.diag(cm), cm.sum(0), out=np.zeros(len(cm)), where=cm.sum(0) > 0)
    md = (har_run / "report.md").read_text()
    for i, label in enumerate(data["labels"]):
        row = re.search(rf"^\| {re.escape(str(label))} \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", md, re.M)
        assert row, label
        assert int(row.group(1)) == int(cm[i].sum())
        assert float(row.group(2)) == pytest.approx(precision[i], abs=5e-4)
        assert float(row.group(3)) == pytest.approx(recall[i], abs=5e-4)


def test_report_of_a_missing_dir_is_one_line_exit_2(tmp_path):
    proc = _report(tmp_path / "nope")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    assert not (tmp_path / "nope").exists()
