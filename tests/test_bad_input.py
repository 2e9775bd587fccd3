"""Bad input, end to end: exit code 2, exactly one stderr line naming the key, value or path, no
traceback, and nothing added, changed or removed on disk.

The matrix is grouped by area (config, recipe, dryrun, data, checkpoint, export, slurm, filesystem,
sweep). Most cases run `distrain.cli.main` in-process under capfd (which sees file-descriptor
writes too, so a stray log line counts); a few run `python distrain/run.py` as a real process to
prove the same there. Each case sets up its own inputs in tmp_path, which is also the working directory, so a default
`runs/` folder would show up in the snapshot.
"""

from __future__ import annotations

import hashlib
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from distrain.cli import main

from helpers import REPO, TINY_HAR, run_distrain

# ---------------------------------------------------------------- harness


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind, size and content hash (Python's bytecode caches left out)."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        if "__pycache__" in p.parts:  # Python's, written when the interpreter imports a recipe file
            continue
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@dataclass
class Case:
    id: str
    argv: list[str]  # after the command; "{tmp}" is replaced by the case's folder
    expect: list[str]  # substrings of the one stderr line ("{tmp}" replaced too)
    setup: Callable[[Path], None] | None = None
    code: int = 2
    command: str = "run"
    extra: list[str] = field(default_factory=list)


def _fill(items: list[str], tmp: Path) -> list[str]:
    return [s.replace("{tmp}", str(tmp)) for s in items]


def check(case: Case, tmp: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    if case.setup is not None:
        case.setup(tmp)
    monkeypatch.chdir(tmp)
    before = snapshot(tmp)
    capfd.readouterr()
    code = main([case.command, *_fill(case.argv, tmp)])
    err = capfd.readouterr().err
    assert_one_line(code, err, case, tmp)
    assert snapshot(tmp) == before, "the disk changed"


def assert_one_line(code: int, err: str, case: Case, tmp: Path) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, err
    assert len(lines) == 1, err
    for part in _fill(case.expect, tmp):
        assert part in lines[0], lines[0]


def writer(name: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)

    return setup


def folder(name: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).mkdir(parents=True)


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for s in setups:
            s(tmp)

    return setup


BINARY = bytes(range(256)) * 4
HAR = ["recipe=har", *TINY_HAR[1:]]
OUT = "output_dir={tmp}/run"

# ---------------------------------------------------------------- config


def _config_cases() -> list[Case]:
    rng = [
        ("data.eval_batch_size=-1", ["data.eval_batch_size=-1", "out of range"]),
        ("data.eval_batch_size=0", ["data.eval_batch_size=0", "out of range"]),
        ("train.seed=-1", ["train.seed=-1", "out of range"]),
        ("train.seed=18446744073709551616", ["train.seed=18446744073709551616", "out of range"]),  # 2**64
        ("train.seed=4294967296", ["train.seed=4294967296", "[0, 4294967295]"]),  # numpy's seed limit
        ("optim.lr=inf", ["optim.lr='inf'", "finite"]),
        ("optim.lr=.inf", ["optim.lr=inf", "finite"]),
        ("optim.lr=-inf", ["optim.lr=", "finite"]),
        ("optim.lr=nan", ["optim.lr='nan'", "finite"]),
        ("optim.weight_decay=inf", ["optim.weight_decay=", "finite"]),
        ("train.clip_norm=nan", ["train.clip_norm=", "finite"]),
        ("model.dropout=nan", ["model.dropout=", "finite"]),  # a recipe's own float
        ("sched.min_lr=1", ["sched.min_lr=1", "optim.lr=0.002"]),
        ("sched.min_lr=0.01 sched.name=linear", ["sched.min_lr=0.01", "optim.lr"]),
        ("optim.eps=-1", ["optim.eps=-1", "out of range"]),
        ("optim.momentum=-0.5", ["optim.momentum=-0.5", "out of range"]),
        ("train.min_delta=-1", ["train.min_delta=-1.0", "out of range"]),
        ("data.prefetch_factor=0", ["data.prefetch_factor=0", "out of range"]),
        # already right before this issue; kept so the matrix covers the area
        ("optim.lr=0", ["optim.lr=0", "> 0"]),
        ("train.max_epochs=0", ["train.max_epochs=0", "out of range"]),
        ("train.grad_accum=0", ["train.grad_accum=0", "out of range"]),
        ("data.batch_size=0", ["data.batch_size=0", "out of range"]),
        ("data.batch_size=big", ["data.batch_size='big'", "int | auto"]),
        ("log.every=0", ["log.every=0", "out of range"]),
        ("ckpt.keep_last=0", ["ckpt.keep_last=0", "out of range"]),
        ("sched.gamma=2", ["sched.gamma=2", "(0, 1]"]),
        ("sched.warmup_ratio=1", ["sched.warmup_ratio=1", "[0, 1)"]),
        ("optim.betas=[0.9,1.0]", ["optim.betas", "[0, 1)"]),
        ("optim.betas=[0.9]", ["optim.betas", "2 items"]),
        ("optim.name=lamb", ["optim.name='lamb'", "adamw, adam, sgd"]),
        ("sched.name=cosin", ["sched.name='cosin'", "did you mean 'cosine'"]),
        ("precision=fp8", ["precision='fp8'", "no, fp16, bf16"]),
        ("train.mode=up", ["train.mode='up'", "min, max"]),
        ("train.max_steps=1.5", ["train.max_steps=1.5", "integer"]),
        ("log.progress=maybe", ["log.progress='maybe'", "true or false"]),
        ("train.deterministic=2", ["train.deterministic=2", "true or false"]),
        ("optim.lrr=1", ["'optim.lrr'", "closest valid key: optim.lr"]),
        ("trian.seed=1", ["'trian.seed'", "train.seed"]),
        ("optim=1", ["optim is a section"]),
        ("model.width=wide", ["model.width='wide'", "integer"]),
        ("resume_allow=[trian.seed]", ["'trian.seed'", "closest: train.seed"]),
        ("nonsense", ["'nonsense'", "key=value"]),
        ("=3", ["'=3'", "empty key"]),
    ]
    cases = [Case(f"config-{arg.split()[0]}", [*HAR, *arg.split(), OUT], expect) for arg, expect in rng]
    cases += [
        Case("config-binary-file", [*HAR, "config={tmp}/c.yaml", OUT], ["config={tmp}/c.yaml", "not a text"],
             writer("c.yaml", BINARY)),
        Case("config-folder", [*HAR, "config={tmp}/cfgdir", OUT], ["config={tmp}/cfgdir is a folder"],
             folder("cfgdir")),
        Case("config-missing", [*HAR, "config={tmp}/none.yaml", OUT], ["config={tmp}/none.yaml does not exist"]),
        Case("config-bad-yaml", [*HAR, "config={tmp}/c.yaml", OUT], ["config={tmp}/c.yaml is not valid YAML"],
             writer("c.yaml", "train: [1,\n")),
        Case("config-a-list", [*HAR, "config={tmp}/c.yaml", OUT], ["config={tmp}/c.yaml must hold a mapping"],
             writer("c.yaml", "- 1\n- 2\n")),
        Case("config-unknown-key", [*HAR, "config={tmp}/c.yaml", OUT], ["'train.epochs'"],
             writer("c.yaml", "train:\n  epochs: 3\n")),
        Case("config-file-inf-lr", [*HAR, "config={tmp}/c.yaml", OUT], ["optim.lr=inf", "finite"],
             writer("c.yaml", "optim:\n  lr: .inf\n")),
        Case("config-file-negative-seed", [*HAR, "config={tmp}/c.yaml", OUT], ["train.seed=-3", "out of range"],
             writer("c.yaml", "train:\n  seed: -3\n")),
        Case("config-no-recipe", [OUT], ["recipe is required"]),
    ]  # fmt: skip
    return cases


# ---------------------------------------------------------------- recipe files

HAR_SRC = (REPO / "recipes" / "har.py").read_text()


def har_variant(name: str, code: str) -> Callable[[Path], None]:
    """recipes/har.py with some definitions replaced by `code` (the originals stay as _har_*)."""
    head = "\n\n_har_step, _har_metrics, _har_build = step, metrics, build_model\n\n"
    return writer(f"{name}.py", HAR_SRC + head + textwrap.dedent(code))


def _recipe_cases() -> list[Case]:
    def rec(id_: str, text: str | bytes, expect: list[str], name: str = "r.py") -> Case:
        return Case(f"recipe-{id_}", [f"recipe={{tmp}}/{name}", OUT], [f"recipe={{tmp}}/{name}", *expect],
                    writer(name, text))  # fmt: skip

    return [
        rec("syntax-error", '"""Broken."""\ndef f(:\n', ["r.py:2", "SyntaxError"]),
        rec("import-error", '"""Needs a module."""\nimport no_such_module_xyz\n', ["r.py:2", "no_such_module_xyz"]),
        rec("raises-at-import", '"""Raises."""\nraise ValueError("boom\\nsecond line")\n',
            ["r.py:2", "ValueError: boom"]),
        rec("sys-exit-at-import", '"""Exits."""\nimport sys\nsys.exit(3)\n', ["r.py:3", "SystemExit"]),
        rec("name-error", '"""Typo."""\nx = undefined_name + 1\n', ["NameError", "undefined_name"]),
        rec("null-bytes", b'"""x"""\n\x00\x01\x02', ["failed to import"]),
        rec("bad-indent", '"""x"""\n  x = 1\n', ["r.py:2", "IndentationError"]),
        rec("lacks-parts", '"""Nothing."""\n', ["lacks ModelConfig"]),
        rec("modelconfig-not-dataclass",
            HAR_SRC + "\n\nclass ModelConfig:\n    width = 3\n", ["ModelConfig must be a dataclass"], "m.py"),
        rec("step-not-callable", HAR_SRC + "\n\nstep = 3\n", ["step must be callable"], "s.py"),
        rec("dataconfig-plain", HAR_SRC + "\n\nclass DataConfig:\n    pass\n", ["must subclass distrain.DataConfig"],
            "d.py"),
        Case("recipe-etc-passwd", ["recipe=/etc/passwd", OUT], ["recipe=/etc/passwd", "not a .py file"]),
        Case("recipe-text-file", ["recipe={tmp}/notes.txt", OUT], ["recipe={tmp}/notes.txt", "not a .py file"],
             writer("notes.txt", "hello\n")),
        Case("recipe-folder", ["recipe={tmp}/pkg", OUT], ["recipe={tmp}/pkg is a folder"], folder("pkg")),
        Case("recipe-missing-file", ["recipe={tmp}/none.py", OUT], ["recipe={tmp}/none.py does not exist"]),
        Case("recipe-unknown-name", ["recipe=harr", OUT], ["unknown recipe='harr'", "did you mean har"]),
        Case("recipe-bad-yaml-defaults", ["recipe={tmp}/y.py", OUT], ["recipe defaults={tmp}/y.yaml", "not valid YAML"],
             both(writer("y.py", HAR_SRC), writer("y.yaml", "train: {\n"))),
        Case("recipe-validate-rejects", ["recipe=har", "data.source=uci_har", OUT],
             ["data.source=uci_har needs data.path"]),
        # the contract's arguments before Splits.info: refused when the recipe loads, naming the new ones
        rec("old-step-signature", HAR_SRC + "\n\ndef step(model, batch, cfg):\n    pass\n",
            ["step(model, batch, cfg)", "define step(cfg, info, model, batch)"], "o.py"),
        rec("old-build-model-signature", HAR_SRC + "\n\ndef build_model(cfg):\n    pass\n",
            ["build_model(cfg)", "define build_model(cfg, info)"], "o.py"),
        rec("old-metrics-signature", HAR_SRC + "\n\ndef metrics(preds, targets):\n    pass\n",
            ["metrics(preds, targets)", "define metrics(cfg, info, preds, targets)"], "o.py"),
        rec("old-report-signature", HAR_SRC + "\n\ndef report(run_dir, split, preds, targets, cfg):\n    pass\n",
            ["report(run_dir, split, preds, targets, cfg)", "define report(cfg, info, run_dir, split, preds, targets)"],
            "o.py"),
        rec("shard-blocks-a-string", HAR_SRC + "\n\nSHARD_BLOCKS = 'EncoderBlock'\n",
            ["SHARD_BLOCKS is 'EncoderBlock'", "class names"], "b.py"),
    ]  # fmt: skip


# ---------------------------------------------------------------- the dry run (a Trainer is built)

DRY = [*TINY_HAR[1:], "train.max_steps=1", OUT]  # max_steps: the old code, which trains, ends soon


def _dryrun_cases() -> list[Case]:
    def var(id_: str, code: str, expect: list[str], extra: list[str] = ()) -> Case:
        name = id_.replace("-", "_")
        return Case(f"dryrun-{id_}", [f"recipe={{tmp}}/{name}.py", *DRY, *extra],
                    [f"recipe={{tmp}}/{name}.py", *expect], har_variant(name, code))  # fmt: skip

    return [
        var("step-scalar-loss", """
            def step(cfg, info, model, batch):
                o = _har_step(cfg, info, model, batch)
                return StepOutput(loss=o.loss.mean(), preds=o.preds, targets=o.targets)
            """, ["scalar loss", "reduction='none'"]),
        var("step-loss-shape-1", """
            def step(cfg, info, model, batch):
                o = _har_step(cfg, info, model, batch)
                return StepOutput(loss=o.loss.mean(0, keepdim=True), preds=o.preds, targets=o.targets)
            """, ["loss of shape [1] for a batch of 4"]),
        var("step-tuple", """
            def step(cfg, info, model, batch):
                o = _har_step(cfg, info, model, batch)
                return o.loss, o.preds, o.targets
            """, ["step returned tuple", "StepOutput"]),
        var("step-dict", """
            def step(cfg, info, model, batch):
                return {"loss": _har_step(cfg, info, model, batch).loss}
            """, ["step returned dict"]),
        var("step-float-loss", """
            def step(cfg, info, model, batch):
                return StepOutput(loss=float(_har_step(cfg, info, model, batch).loss.mean()))
            """, ["StepOutput.loss of type float"]),
        var("step-preds-rows", """
            def step(cfg, info, model, batch):
                o = _har_step(cfg, info, model, batch)
                return StepOutput(loss=o.loss, preds=o.preds[:1], targets=o.targets)
            """, ["preds of shape [1]", "batch of 4"]),
        var("step-targets-list", """
            def step(cfg, info, model, batch):
                o = _har_step(cfg, info, model, batch)
                return StepOutput(loss=o.loss, preds=o.preds, targets=o.targets.tolist())
            """, ["StepOutput.targets of type list"]),
        var("step-raises", """
            def step(cfg, info, model, batch):
                return StepOutput(loss=batch["image"])
            """, ["step failed on 4 validation samples", "step_raises.py:", "KeyError"]),
        var("model-no-params", """
            def build_model(cfg, info):
                return nn.Identity()
            """, ["without parameters"]),
        var("model-frozen", """
            def build_model(cfg, info):
                m = _har_build(cfg, info)
                m.requires_grad_(False)
                return m
            """, ["frozen", "nothing to train"]),
        var("model-not-module", """
            def build_model(cfg, info):
                return lambda x: x
            """, ["build_model returned function", "torch.nn.Module"]),
        var("metrics-list", """
            def metrics(cfg, info, preds, targets):
                return [1.0]
            """, ["metrics returned list"], ["train.metric=loss"]),
        var("metrics-raise", """
            def metrics(cfg, info, preds, targets):
                return {"acc": 1 / 0}
            """, ["metrics failed", "metrics_raise.py:", "ZeroDivisionError"], ["train.metric=loss"]),
        var("metric-no-preds", """
            def step(cfg, info, model, batch):
                return StepOutput(loss=_har_step(cfg, info, model, batch).loss)
            """, ["train.metric='accuracy'", "available: loss"], ["train.metric=accuracy"]),
        var("datasets-not-splits", """
            _har_datasets = build_datasets
            def build_datasets(cfg):
                s = _har_datasets(cfg)
                return s.train, s.val
            """, ["build_datasets returned tuple", "distrain.Splits"]),
        var("info-not-json", """
            _har_datasets = build_datasets
            def build_datasets(cfg):
                s = _har_datasets(cfg)
                return Splits(s.train, s.val, info={"mean": np.zeros(3)})
            """, ["Splits.info that is not JSON", "ndarray", ".tolist()"]),
        var("shard-blocks-function-returns-a-class", """
            def SHARD_BLOCKS(cfg, info, model):
                return EncoderBlock
            """, ["SHARD_BLOCKS(cfg, info, model) returned <class", "class names"]),
        Case("dryrun-metric-unknown", [*HAR, "train.metric=acc", "train.max_steps=1", OUT],
             ["train.metric='acc'", "did you mean 'accuracy'", "macro_f1"]),
        Case("dryrun-metric-not-a-number", [*HAR, "train.metric=confusion_matrix", "train.max_steps=1", OUT],
             ["train.metric='confusion_matrix'", "not a number", "accuracy"]),
        Case("dryrun-min-lr-above-scaled-lr",  # 2e-3 x 64/256: the peak is 5e-4, below the floor
             [*HAR, "optim.scale_lr=linear", "sched.min_lr=1e-3", "train.max_steps=1", OUT],
             ["sched.min_lr=0.001", "peak lr 0.0005", "optim.scale_lr=linear"]),
    ]  # fmt: skip


# ---------------------------------------------------------------- data files


def uci(root: Path, words_in: str | None = None, y: str | None = None, ragged: bool = False,
        empty: str | None = None) -> None:  # fmt: skip
    """A small UCI HAR layout (8 train subjects, 2 test), optionally spoilt."""
    channels = [f"{kind}_{axis}" for kind in ("body_acc", "body_gyro", "total_acc") for axis in "xyz"]  # har's
    rng = np.random.default_rng(0)
    for split, subjects in (("train", range(1, 9)), ("test", (9, 10))):
        n = 2 * len(subjects)
        sig = root / split / "Inertial Signals"
        sig.mkdir(parents=True)
        for c, name in enumerate(channels):
            rows = n - 1 if ragged and c == 3 else n
            np.savetxt(sig / f"{name}_{split}.txt", rng.normal(size=(rows, 128)), fmt="%.5e")
        np.savetxt(root / split / f"y_{split}.txt", rng.integers(1, 7, size=n), fmt="%d")
        np.savetxt(root / split / f"subject_{split}.txt", np.repeat(list(subjects), 2), fmt="%d")
    if words_in:
        (root / words_in).write_text("walking walking upstairs\nsitting standing laying\n")
    if y is not None:
        (root / "train" / "y_train.txt").write_text(y)
    if empty:
        (root / empty).write_text("")


def h5(name: str, **datasets) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        import h5py

        with h5py.File(tmp / name, "w") as f:
            for k, v in datasets.items():
                if v is None:
                    f.create_group(k)
                else:
                    f.create_dataset(k, data=v)

    return setup


def _data_cases() -> list[Case]:
    U = "{tmp}/UCI HAR Dataset"
    har_uci = [*HAR, "data.source=uci_har", f"data.path={U}", OUT]
    sig = "train/Inertial Signals/body_acc_x_train.txt"

    def uci_case(id_: str, expect: list[str], **spoil) -> Case:
        return Case(f"data-uci-{id_}", har_uci, [f"data.path={U}", *expect],
                    lambda tmp: uci(tmp / "UCI HAR Dataset", **spoil))  # fmt: skip

    f32 = np.zeros((40, 3), np.float32)
    y32 = np.zeros((40, 1), np.float32)
    words = np.array([b"alpha", b"beta"] * 20)
    compound = np.zeros(40, dtype=[("a", "f4"), ("b", "i4")])
    reg = ["recipe=regression", "data.path={tmp}/d.h5", OUT]

    def reg_case(id_: str, expect: list[str], **datasets) -> Case:
        return Case(f"data-h5-{id_}", reg, expect, h5("d.h5", **datasets))

    trf = ["recipe=traffic", "data.source=hdf5", "data.path={tmp}/t.h5", OUT]
    csv = ["recipe=traffic", "data.source=csv", "data.path={tmp}/t.csv", OUT]
    return [
        uci_case("words-in-signals", [sig, "not rows of numbers"], words_in=sig),
        uci_case("words-in-labels", ["y_train.txt", "not rows of numbers"], y="walking\n" * 16),
        uci_case("float-labels", ["y_train.txt", "not rows of numbers"], y="1.5\n" * 16),
        uci_case("labels-out-of-range", ["y_train.txt labels must be 1..6"], y="7\n" * 16),
        uci_case("labels-too-few", ["y_train.txt has 3 rows but the signals have 16"], y="1\n2\n3\n"),
        uci_case("ragged-channels", ["body_gyro_x_train.txt has shape"], ragged=True),
        uci_case("empty-subjects", ["subject_test.txt holds no rows"], empty="test/subject_test.txt"),
        Case("data-uci-missing-files", har_uci, [f"data.path={U} is not a UCI HAR folder"], folder("UCI HAR Dataset")),
        Case("data-uci-no-such-path", [*HAR, "data.source=uci_har", "data.path={tmp}/nope", OUT],
             ["data.path={tmp}/nope does not exist"]),
        reg_case("zero-rows", ["data.x_key='X'", "holds no rows"], X=np.zeros((0, 3), np.float32), Y=np.zeros((0, 1))),
        reg_case("string-x", ["data.x_key='X'", "not numbers"], X=words, Y=y32),
        reg_case("string-y", ["data.y_key='Y'", "not numbers"], X=f32, Y=words),
        reg_case("compound-x", ["data.x_key='X'", "not numbers"], X=compound, Y=y32),
        reg_case("scalar-x", ["data.x_key='X'", "scalar"], X=np.float32(3), Y=y32),
        reg_case("too-few-rows", ["has 3 rows: too few", "data.val_fraction"], X=f32[:3], Y=y32[:3]),
        reg_case("no-datasets", ["data.x_key='X' is not a dataset", "datasets there: none"]),
        reg_case("group-not-dataset", ["data.x_key='X' is not a dataset", "datasets there: Y"], X=None, Y=y32),
        reg_case("rows-differ", ["X has 40 rows but Y has 39"], X=f32, Y=y32[:39]),
        reg_case("nan", ["NaN/inf"], X=np.full((40, 3), np.nan, np.float32), Y=y32),
        reg_case("missing-y-key", ["data.y_key='Y' is not a dataset"], X=f32),
        Case("data-h5-folder", ["recipe=regression", "data.path={tmp}/d.h5", OUT],
             ["data.path={tmp}/d.h5 is a folder, not an HDF5 file"], folder("d.h5")),
        Case("data-h5-text-file", reg, ["data.path={tmp}/d.h5 is not a readable HDF5 file"],
             writer("d.h5", "x,y\n1,2\n")),
        Case("data-h5-missing", reg, ["data.path={tmp}/d.h5 does not exist"]),
        Case("data-traffic-h5-zero-rows", trf, ["data.h5_key='df'", "holds no rows"],
             h5("t.h5", df=np.zeros((0, 3), np.float32))),
        Case("data-traffic-h5-strings", trf, ["data.h5_key='df'", "not numbers"], h5("t.h5", df=words)),
        Case("data-traffic-h5-frame-strings", trf, ["block0_values", "not numbers"],
             h5("t.h5", **{"df/block0_values": words.reshape(-1, 1), "df/axis0": np.array([b"s0"])})),
        Case("data-traffic-h5-folder", trf, ["data.path={tmp}/t.h5 is a folder"], folder("t.h5")),
        Case("data-traffic-h5-key", trf, ["data.h5_key='df' is not in", "top-level keys: none"], h5("t.h5")),
        Case("data-traffic-csv-words", [*csv, "data.columns=[a]"], ["data.columns: a", "non-numeric"],
             writer("t.csv", "a,b\n" + "x,1\n" * 50)),
        Case("data-traffic-csv-header-only", csv, ["data.path={tmp}/t.csv holds no rows"], writer("t.csv", "a,b\n")),
        Case("data-traffic-csv-empty", csv, ["data.path={tmp}/t.csv is not a readable CSV"], writer("t.csv", "")),
        Case("data-traffic-csv-binary", csv, ["data.path={tmp}/t.csv is not a readable CSV"], writer("t.csv", BINARY)),
        Case("data-traffic-csv-no-numbers", csv, ["no numeric columns"], writer("t.csv", "a\n" + "x\n" * 50)),
    ]  # fmt: skip


# ---------------------------------------------------------------- filesystem


def _filesystem_cases() -> list[Case]:
    return [
        Case("fs-output-dir-is-a-file", [*HAR, "output_dir={tmp}/f"], ["output_dir={tmp}/f is a file"],
             writer("f", "x")),
        Case("fs-output-dir-under-a-file", [*HAR, "output_dir={tmp}/f/run"],
             ["output_dir={tmp}/f/run cannot be created", "{tmp}/f is a file"], writer("f", "x")),
        Case("fs-output-dir-deep-under-a-file", [*HAR, "output_dir={tmp}/f/a/b/c"], ["{tmp}/f is a file"],
             writer("f", "x")),
        Case("fs-resume-missing", [*HAR, "resume={tmp}/nope", OUT], ["{tmp}/nope"]),
    ]  # fmt: skip


# ---------------------------------------------------------------- sweep


def _sweep_cases() -> list[Case]:
    base = ["recipe=pharma", "sweep_dir={tmp}/sw", "trials=1"]

    def sw(id_: str, args: list[str], expect: list[str]) -> Case:
        return Case(f"sweep-{id_}", [*base, *args], expect, command="sweep")

    return [
        sw("unclosed", ["optim.lr=loguniform(1e-4,1e-2"], ["optim.lr='loguniform(1e-4,1e-2'", "not a search space"]),
        sw("brackets", ["optim.lr=loguniform[1e-4,1e-2]"], ["optim.lr='loguniform[1e-4,1e-2]'", "not a search space"]),
        sw("spaces", ["optim.lr=uniform 0.1 0.2"], ["optim.lr='uniform 0.1 0.2'", "not a search space"]),
        sw("bare-name", ["model.hidden=choice"], ["model.hidden='choice'", "not a search space"]),
        sw("misspelt", ["optim.lr=log_uniform(1e-4,1e-2)"], ["optim.lr='log_uniform(1e-4,1e-2)'"]),
        sw("seed-negative", ["seed=-1", "optim.lr=loguniform(1e-4,1e-2)"], ["seed=-1", "out of range"]),
        sw("no-space", ["optim.lr=0.01"], ["no search space given"]),
        sw("bad-fixed-key", ["optim.lrr=0.01", "optim.lr=loguniform(1e-4,1e-2)"], ["'optim.lrr'"]),
        sw("inf-bound", ["optim.lr=uniform(0,inf)"], ["bounds must be finite"]),
    ]


# ---------------------------------------------------------------- checkpoints (resume)

# One tiny training per module (seconds), copied into each case's folder: checkpoints at steps 2
# and 4, best/ and the run's files. Trained lazily by the first case that needs it.
TRAINED = [*TINY_HAR, "train.max_steps=4", "ckpt.every_steps=2"]
_TRAINED_HOME: list[pytest.TempPathFactory] = []
_TRAINED_RUN: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _trained_home(tmp_path_factory: pytest.TempPathFactory):
    """Where the module's one training goes (it runs only if a case asks for it)."""
    _TRAINED_HOME.append(tmp_path_factory)
    yield
    _TRAINED_HOME.clear()
    _TRAINED_RUN.clear()


def trained_run() -> Path:
    """The module's trained run dir; the training's log handlers are removed again, so the cases'
    stderr shows only their own lines."""
    if not _TRAINED_RUN:
        import logging

        from distrain.recipe import resolve_config
        from distrain.train.trainer import Trainer

        run = _TRAINED_HOME[0].mktemp("trained") / "run"
        logger = logging.getLogger("distrain")
        saved = (list(logger.handlers), logger.level, logger.propagate)
        try:
            Trainer(*resolve_config([*TRAINED, f"output_dir={run}"])).train()
        finally:
            for h in logger.handlers:
                if h not in saved[0]:
                    h.close()
            logger.handlers[:] = saved[0]
            logger.setLevel(saved[1])
            logger.propagate = saved[2]
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        _TRAINED_RUN.append(run)
    return _TRAINED_RUN[0]


STEP2, STEP4 = "checkpoints/step_00000002", "checkpoints/step_00000004"


def with_run(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    """The trained run copied to {tmp}/run, then each edit applied to that copy."""

    def setup(tmp: Path) -> None:
        import shutil

        shutil.copytree(trained_run(), tmp / "run", symlinks=True)
        for edit in edits:
            edit(tmp / "run")

    return setup


def flip_byte(rel: str, at: int = -100) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        data = bytearray((run / rel).read_bytes())
        data[at] ^= 0xFF
        (run / rel).write_bytes(bytes(data))

    return edit


def truncate(rel: str, keep: int) -> Callable[[Path], None]:
    return lambda run: (run / rel).write_bytes((run / rel).read_bytes()[:keep])


def remove(rel: str) -> Callable[[Path], None]:
    return lambda run: (run / rel).unlink()


def remove_tree(rel: str) -> Callable[[Path], None]:
    import shutil

    return lambda run: shutil.rmtree(run / rel)


def edit_json(rel: str, **changes: object) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        import json

        data = json.loads((run / rel).read_text())
        data.update(changes)
        (run / rel).write_text(json.dumps(data))

    return edit


def _checkpoint_cases() -> list[Case]:
    res = [*TRAINED[1:], "train.max_steps=6"]  # the trained run's settings, two steps longer
    new = "output_dir={tmp}/new"  # a fresh run dir for the resumed run

    def ck(id_: str, args: list[str], expect: list[str], *edits: Callable[[Path], None]) -> Case:
        return Case(f"ckpt-{id_}", ["recipe=har", *res, *args], expect, with_run(*edits))

    at4 = "resume={tmp}/run/" + STEP4
    return [
        # wrong before (weak message): "holds no complete checkpoint" for a path that does not exist
        ck("missing-step", ["resume={tmp}/run/checkpoints/step_00000009", new],
           ["{tmp}/run/checkpoints/step_00000009 does not exist"]),
        # wrong before (weak message): "holds no complete checkpoint" for a file
        ck("a-file", ["resume={tmp}/run/config.yaml", new], ["{tmp}/run/config.yaml is a file"]),
        ck("not-a-checkpoint", ["resume={tmp}/data", new], ["{tmp}/data holds no complete checkpoint"],
           lambda run: writer("data/notes.txt", "hello\n")(run.parent)),
        ck("run-dir-without-checkpoints", ["resume={tmp}/run", new], ["{tmp}/run", "no complete checkpoint"],
           remove_tree("checkpoints")),
        ck("auto-without-output-dir", ["resume=auto"], ["resume=auto needs output_dir"]),
        ck("corrupt-shard", [at4, new], [f"{{tmp}}/run/{STEP4}/shard-00000.safetensors", "checksum"],
           flip_byte(f"{STEP4}/shard-00000.safetensors")),
        ck("truncated-shard", [at4, new], [f"{{tmp}}/run/{STEP4}/shard-00000.safetensors", "truncated"],
           truncate(f"{STEP4}/shard-00000.safetensors", 1000)),
        ck("truncated-trainer-state", [at4, new], [f"{{tmp}}/run/{STEP4}/trainer_state.json", "truncated"],
           truncate(f"{STEP4}/trainer_state.json", 40)),
        ck("edited-config", [at4, new], [f"{{tmp}}/run/{STEP4}/config.yaml", "edited"],
           lambda run: (run / STEP4 / "config.yaml").write_text(
               (run / STEP4 / "config.yaml").read_text().replace("seed: 0", "seed: 1"))),
        ck("no-complete-marker", [at4, new], [f"{{tmp}}/run/{STEP4}", "incomplete"], remove(f"{STEP4}/COMPLETE")),
        ck("complete-not-json", [at4, new], [f"{{tmp}}/run/{STEP4}/COMPLETE", "unreadable"],
           lambda run: (run / STEP4 / "COMPLETE").write_bytes(BINARY)),
        ck("newer-format-version", [at4, new], [f"{{tmp}}/run/{STEP4}", "format version 99"],
           edit_json(f"{STEP4}/COMPLETE", version=99)),
        # wrong before: one warning line per damaged checkpoint, then the error ("see the warnings")
        ck("auto-all-damaged", ["resume=auto", "output_dir={tmp}/run"],
           ["{tmp}/run/checkpoints verifies", "step_00000002", "checksum"],
           flip_byte(f"{STEP4}/shard-00000.safetensors"), flip_byte(f"{STEP2}/shard-00000.safetensors")),
        # wrong before: one line per damaged checkpoint passed over, then the error
        ck("run-dir-all-damaged", ["resume={tmp}/run", new],
           ["no checkpoint in {tmp}/run verifies", "step_00000002", "checksum"],
           flip_byte(f"{STEP4}/shard-00000.safetensors"), flip_byte(f"{STEP2}/shard-00000.safetensors")),
        # wrong before: the error named the tensor shapes, not the setting that changed them
        ck("model-width-changed", [at4, "model.width=32", new], [f"{{tmp}}/run/{STEP4}", "model.width"]),
        ck("seed-changed", [at4, "train.seed=1", new], ["train.seed 0 -> 1", "resume_allow=[train.seed]"]),
        ck("seed-changed-in-place", [at4, "train.seed=1", "output_dir={tmp}/run"], ["train.seed 0 -> 1"]),
        # the default run dir runs/har/<time> is created before the resume is refused: it must go again
        Case("ckpt-seed-changed-default-run-dir", ["recipe=har", *res, at4, "train.seed=1"], ["train.seed 0 -> 1"],
             with_run()),
        ck("batch-changed", [at4, "data.batch_size=32", new],
           ["global_batch 64 -> 32", "resume_allow=[data.batch_size]"]),
        # wrong before (weak message): "lacks optimizer state ...", not the setting
        ck("optimizer-changed", [at4, "optim.name=sgd", new], ["optim.name adamw -> sgd", "resume_allow=[optim.name]"]),
        ck("allow-unknown-key", [at4, "train.seed=1", "resume_allow=[train.sed]", new],
           ["'train.sed'", "train.seed"]),
        Case("ckpt-other-recipe", ["recipe=pharma", "resume={tmp}/run/" + STEP4, "train.max_steps=1", new],
             [f"{{tmp}}/run/{STEP4}", "recipe=har", "recipe=pharma"], with_run()),
    ]  # fmt: skip


# ---------------------------------------------------------------- export

FOREIGN = '''"""Someone else's recipe: importing it leaves a file."""
from pathlib import Path
Path(__file__).with_name("MARKER").write_text("imported")
'''


def foreign_checkpoint(tmp: Path) -> None:
    """{tmp}/received: a run whose config names recipe={tmp}/theirs/foreign.py."""
    import torch
    import yaml

    from distrain import checkpoint

    code = tmp / "theirs" / "foreign.py"
    code.parent.mkdir()
    code.write_text(FOREIGN)
    state = {"weight": torch.zeros(2, 3)}
    config = yaml.safe_dump({"recipe": str(code)})
    checkpoint.save_checkpoint(tmp / "received", "step_00000001", state, {"state": {}, "param_groups": []},
                               {"step": 1}, config)  # fmt: skip
    checkpoint.flush_pending()


def _export_cases() -> list[Case]:
    def ex(id_: str, args: list[str], expect: list[str], setup: Callable[[Path], None] | None = with_run()) -> Case:
        return Case(f"export-{id_}", args, expect, setup, command="export")

    out = ["--out", "{tmp}/out"]
    return [
        # wrong before (weak message): "holds no complete checkpoint" for a path that does not exist
        ex("missing-run-dir", ["{tmp}/nope", *out], ["{tmp}/nope does not exist"], None),
        ex("run-dir-without-checkpoints", ["{tmp}/run", *out], ["{tmp}/run", "no complete checkpoint"],
           with_run(remove_tree("checkpoints"))),
        # wrong before (weak message): as missing-run-dir
        ex("a-file", ["{tmp}/run/model.safetensors", *out], ["{tmp}/run/model.safetensors is a file"]),
        # wrong before: "holds no complete checkpoint", and in a real process a warning line per damaged one
        ex("run-dir-all-damaged", ["{tmp}/run", *out], ["no checkpoint in {tmp}/run verifies", "step_00000002",
                                                       "checksum"],
           with_run(flip_byte(f"{STEP4}/shard-00000.safetensors"), flip_byte(f"{STEP2}/shard-00000.safetensors"))),
        ex("corrupt-checkpoint", ["{tmp}/run/" + STEP4, *out], ["shard-00000.safetensors", "checksum"],
           with_run(flip_byte(f"{STEP4}/shard-00000.safetensors"))),
        ex("out-is-a-file", ["{tmp}/run", "--out", "{tmp}/f"], ["--out {tmp}/f", "file"],
           both(with_run(), writer("f", "x"))),
        # wrong before: NotADirectoryError traceback
        ex("out-under-a-file", ["{tmp}/run", "--out", "{tmp}/f/out"], ["{tmp}/f/out", "{tmp}/f is a file"],
           both(with_run(), writer("f", "x"))),
        ex("out-inside-run-dir", ["{tmp}/run", "--out", "{tmp}/run/export"], ["--out {tmp}/run/export", "inside"]),
        ex("out-is-the-checkpoint", ["{tmp}/run/" + STEP4, "--out", "{tmp}/run/" + STEP4], ["--out", "is the input"]),
        # wrong before: argparse's usage line plus its error (two lines), and SystemExit out of main
        ex("no-out", ["{tmp}/run"], ["--out"]),
        # wrong before: as no-out
        ex("unknown-option", ["{tmp}/run", *out, "--shard-size", "2GB"], ["--shard-size"]),
        ex("bad-shard-size", ["{tmp}/run", *out, "--max-shard-size", "2XB"], ["--max-shard-size='2XB'"]),
        ex("recipe-file-untrusted", ["{tmp}/received", *out], ["--trust-recipe", "foreign.py"], foreign_checkpoint),
    ]  # fmt: skip


# ---------------------------------------------------------------- slurm


def _slurm_cases() -> list[Case]:
    """`distrain slurm submit`: every case fails before sbatch is called (nothing is submitted)."""

    def sl(id_: str, args: list[str], expect: list[str]) -> Case:
        return Case(f"slurm-{id_}", ["submit", *args], expect, command="slurm")

    har = ["recipe=har"]
    return [
        sl("time-format", [*har, "--time", "4h"], ["--time='4h'", "not a Slurm time"]),
        sl("time-minutes-60", [*har, "--time", "1:60:00"], ["--time='1:60:00'"]),
        sl("nodes-zero", [*har, "--nodes", "0"], ["--nodes=0", "out of range"]),
        sl("nodes-not-a-number", [*har, "--nodes", "two"], ["--nodes", "'two'"]),
        sl("gpus-negative", [*har, "--gpus-per-node", "-1"], ["--gpus-per-node=-1", "out of range"]),
        sl("procs-zero", [*har, "--procs", "0"], ["--procs=0", "out of range"]),
        sl("grace-zero", [*har, "--grace", "0"], ["--grace=0", "out of range"]),
        sl("multinode-cpu", [*har, "--nodes", "2"], ["--nodes=2", "--gpus-per-node"]),
        sl("unknown-option", [*har, "--mem", "4G"], ["--mem"]),
        # wrong before: taken as an abbreviation of --gpus-per-node and submitted (Slurm's --gpus is a total)
        sl("abbreviated-option", [*har, "--gpus", "2"], ["--gpus"]),
        sl("partition-space", [*har, "--partition", "a b"], ["--partition='a b'"]),
        sl("sbatch-arg-bare", [*har, "--sbatch-arg=qos=high"], ["--sbatch-arg='qos=high'", "--key=value"]),
        sl("launch-config-missing", [*har, "--launch-config", "nope"], ["--launch-config=nope does not exist"]),
        sl("no-recipe", ["optim.lr=0.01"], ["recipe is required"]),
        sl("unknown-recipe", ["recipe=harr"], ["recipe='harr'", "did you mean har"]),
        sl("bad-key", [*har, "optim.lrr=1"], ["'optim.lrr'", "optim.lr"]),
        sl("bad-value", [*har, "optim.lr=inf"], ["optim.lr=", "finite"]),
        sl("not-key-value", [*har, "nonsense"], ["'nonsense'", "key=value"]),
        sl("array-bad-value", [*har, "--array", "optim.lr=abc"], ["optim.lr='abc'"]),
        sl("log-dir-space", [*har, "--log-dir", "my logs"], ["--log-dir", "my logs"]),
        Case("slurm-unknown-subcommand", ["sbumit", "recipe=har"], ["'sbumit'", "submit"], command="slurm"),
    ]


GROUPS = {
    "config": _config_cases(),
    "recipe": _recipe_cases(),
    "dryrun": _dryrun_cases(),
    "data": _data_cases(),
    "checkpoint": _checkpoint_cases(),
    "export": _export_cases(),
    "slurm": _slurm_cases(),
    "filesystem": _filesystem_cases(),
    "sweep": _sweep_cases(),
}
ALL = [c for cases in GROUPS.values() for c in cases]
assert len({c.id for c in ALL}) == len(ALL), "case ids must be unique"


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    check(case, tmp_path, monkeypatch, capfd)


# ---------------------------------------------------------------- real processes

BY_ID = {c.id: c for c in ALL}


@pytest.mark.parametrize("case_id", ["recipe-syntax-error", "dryrun-step-loss-shape-1", "dryrun-metric-unknown"])
def test_bad_input_real_process(case_id: str, tmp_path: Path) -> None:
    """`python distrain/run.py`: logging, warnings and sys.exit as a user sees them."""
    case = BY_ID[case_id]
    if case.setup is not None:
        case.setup(tmp_path)
    before = snapshot(tmp_path)
    proc = run_distrain(_fill(case.argv, tmp_path), check=False, cwd=tmp_path, timeout=300)
    assert_one_line(proc.returncode, proc.stderr, case, tmp_path)
    assert snapshot(tmp_path) == before, "the disk changed"


@pytest.mark.multiproc
def test_bad_step_under_fsdp2_is_found_by_every_rank_before_any_write(tmp_path: Path) -> None:
    """2 FSDP2 ranks run the dry run's forward in lockstep (all-gathers): both refuse, nothing is written.

    (The launcher's own exit code and its ChildFailedError report are the launcher's business.)"""
    case = BY_ID["dryrun-step-loss-shape-1"]
    case.setup(tmp_path)
    before = snapshot(tmp_path)
    proc = run_distrain(_fill(case.argv, tmp_path), launch_config="cpu_fsdp", check=False, cwd=tmp_path, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and errors, proc.stderr[-3000:]
    assert len(set(errors)) == 1 and "loss of shape [1] for a batch of 4" in errors[0], errors
    assert "Traceback" not in proc.stderr.split("torch/distributed/elastic")[0], proc.stderr[-3000:]
    assert snapshot(tmp_path) == before, "the disk changed"


def test_dry_run_leaves_model_and_random_streams_as_they_were(tmp_path: Path) -> None:
    """A step that draws from every global RNG: after the dry run the streams, the weights, the
    buffers and train mode are exactly as before, so the first training step is unchanged."""
    import random

    import torch

    from distrain.recipe import resolve_config
    from distrain.train.preflight import dry_run
    from distrain.train.trainer import Trainer

    har_variant("noisy", """
        import random as _random
        def step(cfg, info, model, batch):
            noise = torch.rand(()) + float(np.random.rand()) + _random.random()  # draws from all three
            o = _har_step(cfg, info, model, batch)
            return StepOutput(loss=o.loss + 0 * noise, preds=o.preds, targets=o.targets)
        """)(tmp_path)  # fmt: skip
    cfg, recipe = resolve_config([f"recipe={tmp_path / 'noisy.py'}", *TINY_HAR[1:], f"output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, recipe)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    dry_run(trainer)
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert (np.random.get_state()[1] == rng[1]).all() and random.getstate() == rng[2]
    assert trainer.model.training and all(m.training for m in trainer.model.modules())
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
