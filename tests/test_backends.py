"""One recipe, every backend: DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 give the same training.

Each backend run launches 2 real processes over gloo through the shipped
`launch_configs/cpu_*.yaml` and is compared with a 1-process run with accumulation 2 (the
same global batch of 16): per-step losses and gradient norms from metrics.jsonl, and the final
weights from model.safetensors. fp32 runs use 2 processes x 1 micro-batch of 8, bf16 runs
2 processes x 2 micro-batches of 4 (accumulation without gradient sync). Checkpointing is off:
these tests are about the backends.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator

from distrain.config import Config
from distrain.errors import ConfigError, LaunchError
from distrain.parallel.ddp import SingleBackend
from distrain.parallel.fsdp import FSDPBackend
from distrain.parallel.select import select_backend
from distrain.parallel.zero import DeepSpeedBackend, fill_deepspeed_config
from distrain.recipe import resolve_config

from helpers import NO_DROPOUT, REPO, TINY_HAR, metrics_rows, run_distrain, weights

STEPS = 10
# Evaluating every 3 steps makes step 9 the best (step 10 only ties it), so the best-weights
# snapshot is taken, restored and exported through each backend too.
BASE = [*TINY_HAR, *NO_DROPOUT, f"train.max_steps={STEPS}", "data.batch_size=8", "train.eval_every=3",
        "ckpt.save_best=false", "ckpt.save_final=false"]  # fmt: skip
LAUNCH = {
    "ddp": "cpu_ddp",
    "fsdp2": "cpu_fsdp",
    "deepspeed_zero1": "cpu_zero1",
    "deepspeed_zero2": "cpu_zero2",
    "deepspeed_zero3": "cpu_zero3",
}

# fp32: everything within 1e-5 (measured: losses 1.4e-7, grad norms 1.8e-7, weights 1.2e-7).
FP32_TOL = 1e-5
# bf16: FSDP2 and DeepSpeed run the forward on bf16 copies of the weights while the 1-process
# reference autocasts fp32 weights, so rounding differs. Measured: losses 1.3e-3 relative, grad
# norms 3.1e-3 relative, weights 3.0% of the distance trained. Allowed: 5e-3, 2e-2, 10%; a wrong
# gradient scale, LR schedule or sync shows as O(1) there. The bf16 runs also split the batch
# into micro-batches of 4 instead of 8, which alone moves bf16 losses by ~4e-4 (DDP too).
BF16_LOSS_TOL, BF16_NORM_TOL, BF16_WEIGHT_TOL = 5e-3, 2e-2, 0.10


def _series(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in metrics_rows(run_dir) if key in r and "loss" in r]


def _max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS, (len(a), len(b))
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _key_bias_free(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the key part of the attention qkv bias.

    Softmax is invariant to adding a constant to every key score, so the key bias has a zero
    true gradient: what backward computes there is float round-off, which Adam divides by its
    own square root into lr-sized steps of random sign. Those entries differ by ~1e-4 between
    runs that only sum in another order (all other weights: ~1e-7), so comparing them tests
    nothing. The query and value parts of the same tensor are compared.
    """
    out = dict(state)
    for name, t in state.items():
        if name.endswith("qkv.bias"):
            q, _, v = t.chunk(3)
            out[name] = torch.cat([q, v])
    return out


@cache
def _initial_weights() -> dict[str, torch.Tensor]:
    """The weights every run starts from: seeded as the trainer seeds, before the first step."""
    cfg, recipe = resolve_config(BASE)
    torch.manual_seed(cfg.train.seed)
    info = recipe.load_datasets(cfg).info
    return recipe.bind(cfg, info).build_model().state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """1 process, accumulation 2: the same global batch as 2 processes x accumulation 1."""
    runs = {}
    for precision in ("no", "bf16"):
        out = tmp_path_factory.mktemp(f"ref_{precision}")
        run_distrain([*BASE, "train.grad_accum=2", f"precision={precision}", f"output_dir={out}"])
        runs[precision] = out
    return runs


@pytest.mark.multiproc
@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("backend", list(LAUNCH))
def test_backend_matches_single_process(backend: str, precision: str, reference: dict[str, Path], tmp_path: Path):
    extra = []
    if precision == "bf16":  # 2 processes x 2 micro-batches of 4: the no-sync path of each backend
        extra = ["data.batch_size=4", "train.grad_accum=2"]
    if backend == "fsdp2" and precision == "bf16":  # one launch less: activation checkpointing rides along
        extra.append("train.activation_checkpointing=true")
    run_distrain([*BASE, *extra, f"precision={precision}", f"output_dir={tmp_path}"], launch_config=LAUNCH[backend])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["backend"], summary["world_size"]) == (backend, 2)
    if "train.activation_checkpointing=true" in extra:
        assert "activation ckpt  on" in (tmp_path / "train.log").read_text()

    ref = reference[precision]
    loss_err = _max_rel(_series(tmp_path, "loss"), _series(ref, "loss"))
    norm_err = _max_rel(_series(tmp_path, "grad_norm"), _series(ref, "grad_norm"))
    got, want = _key_bias_free(weights(tmp_path)), _key_bias_free(weights(ref))
    assert got.keys() == want.keys()
    if precision == "no":
        assert loss_err < FP32_TOL, f"per-step losses differ by {loss_err:.2e} relative"
        assert norm_err < FP32_TOL, f"per-step gradient norms differ by {norm_err:.2e} relative"
        for k in want:
            err = float((got[k] - want[k]).abs().max())
            assert err < FP32_TOL, f"final weight {k} differs by {err:.2e}"
        # the best weights, restored from the in-memory snapshot for test and export
        ref_summary = json.loads((ref / "summary.json").read_text())
        assert ref_summary["best_step"] < STEPS, "the reference should have an earlier best step"
        assert summary["best_step"] == ref_summary["best_step"]
        got = _key_bias_free(weights(tmp_path, "best_model.safetensors"))
        want = _key_bias_free(weights(ref, "best_model.safetensors"))
        assert max(float((got[k] - want[k]).abs().max()) for k in want) < FP32_TOL
        test_err = abs(summary["test"]["loss"] / ref_summary["test"]["loss"] - 1)
        assert test_err < FP32_TOL, f"test loss on the restored best weights differs by {test_err:.2e}"
        return
    assert loss_err < BF16_LOSS_TOL, f"bf16 per-step losses differ by {loss_err:.2e} relative"
    assert norm_err < BF16_NORM_TOL, f"bf16 per-step gradient norms differ by {norm_err:.2e} relative"
    start = _key_bias_free(_initial_weights())
    flat = {name: torch.cat([s[k].flatten().float() for k in sorted(want)]) for name, s in
            (("got", got), ("want", want), ("start", start))}  # fmt: skip
    trained = float((flat["want"] - flat["start"]).norm())
    assert 0 < trained < 0.2 * float(flat["start"].norm()), "the reconstructed initial weights are not the run's"
    dev = float((flat["got"] - flat["want"]).norm()) / trained
    assert dev < BF16_WEIGHT_TOL, f"bf16 final weights deviate by {dev:.1%} of the distance trained"


@pytest.mark.multiproc
def test_user_deepspeed_json_contradicting_distrain_stops_before_writing(tmp_path: Path):
    (tmp_path / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2},
    }))  # fmt: skip
    shipped = yaml.safe_load((REPO / "launch_configs" / "cpu_zero2.yaml").read_text())
    shipped.pop("mixed_precision")  # accelerate refuses launch-config fields that a DeepSpeed JSON also sets
    shipped["deepspeed_config"] = {"deepspeed_config_file": str(tmp_path / "ds.json")}
    (tmp_path / "user.yaml").write_text(yaml.safe_dump(shipped))
    out = tmp_path / "run"
    # run_distrain joins the name onto launch_configs/; an absolute path replaces that folder.
    proc = run_distrain([*BASE, f"output_dir={out}"], launch_config=str(tmp_path / "user"), check=False)
    assert proc.returncode != 0
    assert "sets gradient_accumulation_steps=4 but distrain has train.grad_accum=1" in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------- refusing silent fallbacks


@pytest.fixture
def accelerator():
    """A 1-process CPU Accelerator, with accelerate's process-wide state reset around the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def _backend(cls: type, **attrs) -> object:
    """A backend object with the attributes verify() reads, without starting DeepSpeed/FSDP."""
    b = cls.__new__(cls)
    b.__dict__.update(attrs)
    return b


def test_fsdp_verify_refuses_an_unwrapped_model(accelerator):
    backend = FSDPBackend(accelerator, Config(), ("Linear",))
    with pytest.raises(LaunchError, match="not FSDP-wrapped"):
        backend.verify(nn.Sequential(nn.Linear(4, 4)))


def test_deepspeed_verify_refuses_a_plain_model():
    backend = _backend(DeepSpeedBackend, stage=3, world_size=2)
    with pytest.raises(LaunchError, match="not an engine"):
        backend.verify(nn.Linear(4, 4))


def test_deepspeed_launch_that_accelerate_did_not_set_up_is_refused(accelerator, monkeypatch):
    # accelerate drops a DeepSpeed request when it runs with cpu=True; distrain must not go on.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(LaunchError, match="asks for DeepSpeed"):
        select_backend(accelerator, Config(), ())


def _launched_env(monkeypatch, processes: int) -> None:
    """What torchrun sets in rank 0 of `processes`."""
    for key, value in {"WORLD_SIZE": processes, "RANK": 0, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(key, str(value))


@pytest.mark.parametrize(("processes", "backend"), [(1, "auto"), (1, "ddp"), (2, "auto"), (2, "ddp")])
def test_one_process_under_a_multi_process_launcher_runs_single(monkeypatch, processes, backend):
    # A one-task Slurm job launches through the DDP config: accelerate says MULTI_CPU with one process.
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    _launched_env(monkeypatch, processes)
    launched = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=processes, device="cpu")
    cfg = Config()
    cfg.parallel.backend = backend
    chosen = select_backend(launched, cfg, ())
    assert chosen.name == ("ddp" if processes > 1 else "single")


def test_two_processes_asked_but_one_set_up_is_refused(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    _launched_env(monkeypatch, 2)
    launched = SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1, device="cpu")
    with pytest.raises(LaunchError, match="asks for ddp but accelerate set up NO with 1 process"):
        select_backend(launched, Config(), ())


def test_activation_checkpointing_needs_named_blocks(accelerator):
    cfg = Config()
    cfg.train.activation_checkpointing = True
    with pytest.raises(ConfigError, match="SHARD_BLOCKS"):
        SingleBackend(accelerator, cfg, ()).shard(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="no such module"):
        SingleBackend(accelerator, cfg, ("EncoderBlock",)).shard(nn.Linear(4, 4))


# ---------------------------------------------------------------- DeepSpeed config: one source of truth


def _cfg(*overrides: str) -> Config:
    cfg, _ = resolve_config([*BASE, *overrides])
    return cfg


def test_deepspeed_auto_fields_are_filled_from_distrain():
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}  # fmt: skip
    fill_deepspeed_config(ds, _cfg("train.grad_accum=3", "train.clip_norm=0.5", "precision=bf16"), world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


def test_deepspeed_json_that_contradicts_distrain_is_an_error_naming_both():
    ds = {"gradient_accumulation_steps": 8, "zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=8 .*train\.grad_accum=2"):
        fill_deepspeed_config(ds, _cfg("train.grad_accum=2"), world_size=2, source="ds.json")
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True .*precision='no'"):
        fill_deepspeed_config({"bf16": {"enabled": True}}, _cfg(), world_size=2)
    with pytest.raises(ConfigError, match="'optimizer' block"):
        fill_deepspeed_config({"optimizer": {"type": "AdamW"}}, _cfg(), world_size=2)


def test_matching_concrete_values_are_accepted():
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": "2", "gradient_clipping": 1.0}
    fill_deepspeed_config(ds, _cfg("train.grad_accum=2"), world_size=2)
    assert ds["train_batch_size"] == 32


# ---------------------------------------------------------------- the shipped launch configs

EXPECTED = {
    "single_gpu": ("NO", {}), "multi_gpu": ("MULTI_GPU", {}), "cpu_ddp": ("MULTI_GPU", {"use_cpu": True}),
    "fsdp": ("FSDP", {}), "fsdp_hybrid": ("FSDP", {"num_machines": 2}), "cpu_fsdp": ("FSDP", {"use_cpu": True}),
    "deepspeed_zero1": ("DEEPSPEED", {}), "deepspeed_zero2": ("DEEPSPEED", {}), "deepspeed_zero3": ("DEEPSPEED", {}),
    "deepspeed_zero3_offload": ("DEEPSPEED", {}), "cpu_zero1": ("DEEPSPEED", {"num_processes": 2}),
    "cpu_zero2": ("DEEPSPEED", {"num_processes": 2}), "cpu_zero3": ("DEEPSPEED", {"num_processes": 2}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_is_what_its_name_says(name: str):
    path = REPO / "launch_configs" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith(f"# {name}:"), "each launch config starts with a comment saying what it is"
    assert "Shards:" in text and "Memory per" in text and "Pick it" in text
    conf = yaml.safe_load(text)
    kind, fields = EXPECTED[name]
    assert conf["distributed_type"] == kind
    assert {k: conf.get(k) for k in fields} == fields
    assert conf.get("mixed_precision", "no") == "no", "distrain's precision= decides"
    if kind == "FSDP":
        assert conf["fsdp_config"]["fsdp_version"] == 2
    if kind == "DEEPSPEED":
        ds = conf["deepspeed_config"]
        stage = 3 if "zero3" in name else int(name[-1])
        assert ds["zero_stage"] == stage
        assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds, "distrain fills them"
        assert not conf.get("use_cpu"), "use_cpu makes accelerate drop DeepSpeed"


def test_deepspeed_buckets_are_sized_from_the_model_unless_the_config_sets_them():
    # DeepSpeed's default reduce bucket is 5e8 elements, a 2 GB fp32 buffer even for a tiny model.
    from distrain.parallel.zero import size_buckets

    model = nn.Sequential(nn.Linear(2048, 1024), nn.Linear(1024, 8))
    zero = {"stage": 3, "allgather_bucket_size": 12345, "stage3_param_persistence_threshold": "auto"}
    size_buckets(zero, model)
    assert zero == {"stage": 3, "allgather_bucket_size": 12345, "reduce_bucket_size": 2048 * 1024,
                    "stage3_prefetch_bucket_size": int(0.9 * 2048 * 1024),
                    "stage3_param_persistence_threshold": 10 * 1448,
                    # DeepSpeed's 1e9 defaults: one optimizer group of the whole partition, every gathered
                    # parameter kept from the forward to the backward
                    "sub_group_size": 2048 * 1024, "stage3_max_live_parameters": 3 * 2048 * 1024,
                    "stage3_max_reuse_distance": 2048 * 1024}  # fmt: skip
    small = {}
    size_buckets(small, nn.Linear(4, 4))
    assert small["reduce_bucket_size"] == 1 << 20  # a floor: tiny buckets would mean many collectives


def test_zero3_checkpoints_name_each_optimizer_groups_parameters_across_its_sub_groups():
    # sub_group_size splits an optimizer group into several DeepSpeed groups (the 103M model: 18);
    # the checkpoint's param_groups are the optimizer's, one list of names each.
    from types import SimpleNamespace

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    a, b, c, d = model.parameters()
    zero = SimpleNamespace(fp16_groups=[[a, b], [c], [d]], sub_group_to_group_id={0: 0, 1: 0, 2: 1},
                           optimizer=SimpleNamespace(param_groups=[{}, {}]))  # fmt: skip
    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)
    backend.stage, backend.engine = 3, SimpleNamespace(optimizer=zero)
    assert backend._named_groups(model) == [["0.weight", "0.bias", "1.weight"], ["1.bias"]]


def test_zero3_steps_fp32_working_partitions_in_place_instead_of_a_clone():
    # DeepSpeed clones them as master weights because it compares torch.device("cpu") with "cpu"
    # (4 B per parameter / processes); a clone already keyed in the optimizer state stays.
    from types import SimpleNamespace

    working = [torch.arange(6.0), torch.arange(4.0), torch.zeros(3, dtype=torch.bfloat16)]
    master = [w.clone().float() for w in working]
    for m, ds_id in zip(master, ("0_1", "2_2", "3_3"), strict=True):
        m.ds_id, m.requires_grad = ds_id, True
    zero = SimpleNamespace(fp16_partitioned_groups_flat=working, fp32_partitioned_groups_flat=list(master),
                           optimizer=SimpleNamespace(state={}))  # fmt: skip
    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)
    backend.stage, backend.offload_optimizer, backend.engine = 3, "none", SimpleNamespace(optimizer=zero)
    backend._share_master_partitions()
    shared, kept = zero.fp32_partitioned_groups_flat[:2], zero.fp32_partitioned_groups_flat[2]
    assert all(m is w for m, w in zip(shared, working, strict=False))
    assert [m.ds_id for m in shared] == ["0_1", "2_2"] and all(m.requires_grad for m in shared)
    assert kept is master[2]  # bf16 working weights: the fp32 master is a real copy
    zero.fp32_partitioned_groups_flat, zero.optimizer.state = list(master), {master[0]: {}}
    backend._share_master_partitions()
    assert all(a is b for a, b in zip(zero.fp32_partitioned_groups_flat, master, strict=True)), "state keyed by them"
