"""`distrain report <run dir>`: report.md (+ PNGs in report/) and a self-contained report.html.

Everything comes from the files a run leaves: config.yaml, train.log (the plan), metrics.jsonl
(curves, throughput), summary.json, confusion_<split>.json (classifiers), PNGs that the recipe
wrote (prediction plots for regression and forecasting), and the weight/checkpoint files.
The HTML embeds every image as a data: URI, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from distrain.cli import command
from distrain.errors import ConfigError
from distrain.observe.classification import plot_confusion
from distrain.tools.plots import pyplot

OWN_PREFIX = "report_"  # PNGs this module writes into report/; every other PNG in the run dir is the recipe's


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({k: _number(v) for k, v in row.items()})
    return rows


def _number(v: Any) -> Any:
    """metrics.jsonl stores non-finite floats as strings ("nan", "inf")."""
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf"):
        return float(v)
    return v


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if _is_num(r.get(key)) and _is_num(r.get("step"))]
    return [p[0] for p in points], [p[1] for p in points]


def read_plan(run_dir: Path) -> str:
    """The plan block that the trainer logs at start, from train.log."""
    path = run_dir / "train.log"
    if not path.is_file():
        return ""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.endswith("] plan"):
            block = []
            for follow in lines[i + 1 :]:
                if not follow.startswith("  "):
                    break
                block.append(follow.strip())
            return "\n".join(block)
    return ""


# ---------------------------------------------------------------- figures


def _line_panels(path: Path, rows: list[dict[str, Any]], panels: list[tuple[str, list[str]]], title: str) -> bool:
    """One subplot per (ylabel, keys); False (nothing written) when no key has data."""
    data = [(label, [(k, *series(rows, k)) for k in keys]) for label, keys in panels]
    data = [(label, [s for s in lines if s[1]]) for label, lines in data]
    data = [(label, lines) for label, lines in data if lines]
    if not data:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data), 3.4), squeeze=False)
    for ax, (label, lines) in zip(axes[0], data, strict=True):
        for key, xs, ys in lines:
            ax.plot(xs, ys, label=key, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def per_class_table(labels: list[str], matrix: list[list[int]]) -> list[list[str]]:
    """Rows of class, support, precision, recall, F1 from a confusion matrix (rows true, columns predicted)."""
    n = len(labels)
    out = []
    for i in range(n):
        tp = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(matrix[r][i] for r in range(n))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append([labels[i], str(support), f"{precision:.3f}", f"{recall:.3f}", f"{f1:.3f}"])
    return out


# ---------------------------------------------------------------- document model

# A report is a list of blocks: ("h", text), ("p", text), ("code", text), ("table", (header, rows)),
# ("img", (path, caption)). Markdown and HTML are two renderings of the same list.
Block = tuple[str, Any]


def build(run_dir: Path) -> list[Block]:
    if not run_dir.is_dir():
        raise ConfigError(f"run dir {run_dir} does not exist; give a directory written by distrain run")
    if not any((run_dir / f).is_file() for f in ("metrics.jsonl", "config.yaml", "summary.json")):
        raise ConfigError(f"{run_dir} is not a distrain run dir (no metrics.jsonl, config.yaml or summary.json)")
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    rows = read_rows(run_dir)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("val/") for k in r)]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    blocks: list[Block] = [("h1", f"distrain report: {run_dir.name}"), ("p", f"run dir `{run_dir}`")]

    if summary:
        keep = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
        blocks += [("h", "Summary"), ("table", (["key", "value"], [[k, _fmt(v)] for k, v in keep.items()]))]
        test = {k: v for k, v in summary.get("test", {}).items() if _is_num(v)}
        if test:
            blocks.append(("table", (["test metric", "value"], [[k, _fmt(v)] for k, v in test.items()])))
    plan = read_plan(run_dir)
    if plan:
        blocks += [("h", "Plan"), ("code", plan)]
    if (run_dir / "config.yaml").is_file():
        blocks += [("h", "Config"), ("code", (run_dir / "config.yaml").read_text().rstrip())]

    blocks.append(("h", "Training curves"))
    img = out_dir / f"{OWN_PREFIX}training.png"
    panels = [("loss", ["loss"]), ("learning rate", ["lr"]), ("gradient norm", ["grad_norm"])]
    if _line_panels(img, train, panels, "training"):
        blocks.append(("img", (img, "training loss, learning rate and gradient norm per logged step")))
    else:
        blocks.append(("p", "no training rows in metrics.jsonl"))

    metric_keys = sorted({k for r in evals for k, v in r.items() if k.startswith("val/") and _is_num(v)})
    if metric_keys:
        blocks.append(("h", "Evaluation"))
        img = out_dir / f"{OWN_PREFIX}eval.png"
        if _line_panels(img, evals, [(k, [k]) for k in metric_keys], "validation metrics"):
            blocks.append(("img", (img, "validation metrics at each evaluation")))
        last = evals[-1]
        blocks.append(("table", (["metric", "last value"], [[k, _fmt(last.get(k))] for k in metric_keys])))

    blocks += _confusion_blocks(run_dir, out_dir)
    blocks += _throughput_blocks(train, out_dir)

    recipe_pngs = sorted(p for p in run_dir.glob("*.png") if not p.name.startswith("confusion_"))
    if recipe_pngs:
        blocks.append(("h", "Recipe plots"))
        blocks += [("img", (p, p.stem.replace("_", " "))) for p in recipe_pngs]

    blocks += _checkpoint_blocks(run_dir)
    return blocks


def _confusion_blocks(run_dir: Path, out_dir: Path) -> list[Block]:
    blocks: list[Block] = []
    for path in sorted(run_dir.glob("confusion_*.json")):
        split = path.stem.removeprefix("confusion_")
        data = json.loads(path.read_text())
        labels, matrix = [str(x) for x in data["labels"]], data["matrix"]
        img = out_dir / f"{OWN_PREFIX}confusion_{split}.png"
        plot_confusion(img, labels, matrix, split)
        blocks += [
            ("h", f"Classes ({split})"),
            ("img", (img, f"confusion matrix on {split}: rows true, columns predicted")),
            ("table", (["class", "support", "precision", "recall", "F1"], per_class_table(labels, matrix))),
        ]
    return blocks


def _throughput_blocks(train: list[dict[str, Any]], out_dir: Path) -> list[Block]:
    if not train:
        return []
    blocks: list[Block] = [("h", "Throughput")]
    img = out_dir / f"{OWN_PREFIX}throughput.png"
    panels = [
        ("samples/s", ["samples_per_s"]),
        ("seconds per step", ["step_time", "data_time", "compute_time", "optim_time"]),
        ("peak memory (MiB)", ["peak_mem_mb"]),
        ("tokens/s", ["tokens_per_s"]),
        ("MFU", ["mfu"]),
    ]
    if _line_panels(img, train, panels, "throughput"):
        blocks.append(("img", (img, "throughput, step-time split (data / forward+backward / optimizer), memory")))
    keys = ["samples_per_s", "tokens_per_s", "step_time", "data_time", "compute_time", "optim_time",
            "peak_mem_mb", "tflops", "mfu"]  # fmt: skip
    table = []
    for key in keys:
        values = [r[key] for r in train[1:] or train if _is_num(r.get(key))]  # the first window has warm-up
        if values:
            median = sorted(values)[len(values) // 2]
            table.append([key, _fmt(median), _fmt(max(values) if key == "peak_mem_mb" else values[-1])])
    if table:
        blocks.append(("table", (["quantity", "median over logged windows", "last / peak"], table)))
    return blocks


def _checkpoint_blocks(run_dir: Path) -> list[Block]:
    """Weight files at the top of the run dir and every checkpoint folder below it, with sizes."""
    rows = [[p.name, _mib(p.stat().st_size), "weights"] for p in sorted(run_dir.glob("*.safetensors"))]
    marked = (".safetensors", ".distcp")
    folders = sorted({p.parent for p in run_dir.rglob("*") if p.is_file() and p.parent != run_dir
                      and (p.name == "COMPLETE" or p.suffix in marked)})  # fmt: skip
    for d in folders:
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        state = "complete" if (d / "COMPLETE").exists() else "no COMPLETE marker"
        rows.append([d.relative_to(run_dir).as_posix() + "/", _mib(size), f"checkpoint, {state}"])
    if not rows:
        return [("h", "Checkpoints and weights"), ("p", "no weight files in the run dir")]
    return [("h", "Checkpoints and weights"), ("table", (["path", "size", "kind"], rows))]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


# ---------------------------------------------------------------- rendering


def to_markdown(blocks: list[Block], run_dir: Path) -> str:
    out = []
    for kind, value in blocks:
        if kind == "h1":
            out.append(f"# {value}\n")
        elif kind == "h":
            out.append(f"## {value}\n")
        elif kind == "p":
            out.append(f"{value}\n")
        elif kind == "code":
            out.append(f"```\n{value}\n```\n")
        elif kind == "table":
            header, rows = value
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "img":
            path, caption = value
            out.append(f"![{caption}]({path.relative_to(run_dir).as_posix()})\n")
    return "\n".join(out)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _inline_code(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:90%}
img{max-width:100%;display:block;margin:.5em 0}figure{margin:0 0 1em}figcaption{color:#555;font-size:90%}"""


def to_html(blocks: list[Block]) -> str:
    title = next((v for k, v in blocks if k == "h1"), "distrain report")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{STYLE}</style></head><body>"]  # fmt: skip
    for kind, value in blocks:
        if kind == "h1":
            out.append(f"<h1>{html.escape(value)}</h1>")
        elif kind == "h":
            out.append(f"<h2>{html.escape(value)}</h2>")
        elif kind == "p":
            out.append(f"<p>{_inline_code(value)}</p>")
        elif kind == "code":
            out.append(f"<pre>{html.escape(value)}</pre>")
        elif kind == "table":
            header, rows = value
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "img":
            path, caption = value
            out.append(f"<figure><img src='{_data_uri(path)}' alt='{html.escape(caption, quote=True)}'>"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html into the run dir; returns their paths."""
    run_dir = Path(run_dir)
    blocks = build(run_dir)
    md, page = run_dir / "report.md", run_dir / "report.html"
    for path, text in ((md, to_markdown(blocks, run_dir)), (page, to_html(blocks))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return md, page


@command
def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: distrain report <run dir>   writes report.md and a self-contained report.html there")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    md, page = write_report(argv[0])
    print(f"wrote {md} and {page}")
    return 0
