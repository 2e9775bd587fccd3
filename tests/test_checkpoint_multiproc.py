"""Checkpoints across processes and backends: exact resume under DDP, FSDP2 and DeepSpeed, and
resharding 2 -> 1 and 1 -> 2 ranks and between backends, with the global batch held constant
through accumulation (2 ranks x 32 = 1 rank x 32 x 2 accumulation steps).

Real 2-process runs through the shipped launch configs; independent launches run two at a time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from distrain import checkpoint as ck
from distrain.checkpoint.export import export, load_weights_dir
from distrain.checkpoint.shard_file import ShardFile

from helpers import BIN, NO_DROPOUT, REPO, TINY_HAR, free_port, metrics_rows, run_distrain, weights

pytestmark = pytest.mark.multiproc

CFG = [*TINY_HAR, *NO_DROPOUT, "data.batch_size=32", "train.max_steps=30", "ckpt.every_steps=10"]
SINGLE = ["train.grad_accum=2"]  # one process, same global batch


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_rows(run_dir) if "loss" in r}


def ckpt(run_dir: Path, step: int) -> str:
    return f"resume={run_dir}/checkpoints/{ck.step_name(step)}"


def launch_all(*runs: tuple) -> None:
    """Run (args, launch_config[, env]) tuples, two at a time."""
    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(run_distrain, *run) for run in runs]:
            f.result()


def assert_exact(ref: Path, run: Path, first: int, last: int) -> None:
    want, got = losses(ref), losses(run)
    assert sorted(got) == list(range(first, last + 1))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(got)]


def assert_close(ref: Path, run: Path, first: int, last: int, tol: float = 1e-6) -> None:
    want, got = losses(ref), losses(run)
    assert sorted(got) == list(range(first, last + 1))
    diff = max(abs(got[s] - want[s]) for s in got)
    assert diff <= tol, diff


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_index_matches_shards(path: Path, world: int) -> None:
    """Rank 0 writes the piece map of every rank from shapes alone; check it against the files
    the ranks wrote: every piece is in its file with its shape, every saved tensor is indexed, and
    each tensor's pieces tile it exactly (element counts add up, no element twice)."""
    index = ck.read_json(path / ck.INDEX)
    files = {f: ShardFile(path / f) for f in (ck.shard_name(r) for r in range(world))}
    indexed = set()
    for key, entry in index["tensors"].items():
        covered = torch.zeros(entry["shape"], dtype=torch.int64)
        for piece in entry["pieces"]:
            assert list(files[piece["file"]].tensor(key).shape) == piece["shape"], (key, piece)
            covered[tuple(slice(o, o + n) for o, n in zip(piece["offset"], piece["shape"], strict=True))] += 1
            indexed.add((piece["file"], key))
        assert bool((covered == 1).all()), key
    saved = {(f, k) for f, shard in files.items() for k in shard.entries if not k.startswith("rng.")}
    assert saved == indexed


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """ddp: straight 30 steps (saves 10, 20, 30); fsdp: FSDP2 resumed from ddp step 10."""
    root = tmp_path_factory.mktemp("mp")
    out = {"root": root, "ddp": root / "ddp", "fsdp": root / "fsdp"}
    run_distrain([*CFG, f"output_dir={out['ddp']}"], "cpu_ddp")
    return out


def test_ddp_exact_resume_and_reshard_to_one_process_and_fsdp(runs):
    ddp, root = runs["ddp"], runs["root"]
    launch_all(
        ([*CFG, f"output_dir={root / 'ddp_resumed'}", ckpt(ddp, 10)], "cpu_ddp"),
        ([*CFG, *SINGLE, f"output_dir={root / 'ddp_to_1'}", ckpt(ddp, 10)], None),
    )
    assert_exact(ddp, root / "ddp_resumed", 11, 30)
    assert_same_weights(weights(root / "ddp_resumed"), weights(ddp))
    assert_close(ddp, root / "ddp_to_1", 11, 30)
    assert_same_weights(load_weights_dir(export(ddp, root / "ddp_export")), weights(ddp))
    assert_index_matches_shards(ddp / "checkpoints" / ck.step_name(30), world=2)
    run_distrain([*CFG, f"output_dir={runs['fsdp']}", ckpt(ddp, 10)], "cpu_fsdp")  # DDP -> FSDP2
    assert_close(ddp, runs["fsdp"], 11, 30)
    state = ck.read_json(runs["fsdp"] / "checkpoints" / ck.step_name(20) / ck.STATE)
    assert state["backend"].startswith("fsdp") and state["world_size"] == 2


def test_fsdp_exact_resume_and_reshard_to_one_process_and_ddp(runs):
    fsdp, root = runs["fsdp"], runs["root"]
    if not (fsdp / "checkpoints").is_dir():
        pytest.skip("needs the FSDP2 run of the previous test")
    launch_all(
        # through the hash-while-loading path (forced for this small state); DDP above takes the other
        ([*CFG, f"output_dir={root / 'fsdp_resumed'}", ckpt(fsdp, 20)], "cpu_fsdp", {ck.HASH_WHILE_LOADING_ENV: "0"}),
        ([*CFG, f"output_dir={root / 'fsdp_to_ddp'}", ckpt(fsdp, 20)], "cpu_ddp"),
    )
    assert_exact(fsdp, root / "fsdp_resumed", 21, 30)
    assert_index_matches_shards(fsdp / "checkpoints" / ck.step_name(20), world=2)
    assert_same_weights(weights(root / "fsdp_resumed"), weights(fsdp))
    assert_close(fsdp, root / "fsdp_to_ddp", 21, 30)
    # FSDP2 -> 1 process, which saves a single-process checkpoint at 25 that resumes on 2 (DDP and FSDP2)
    single = root / "fsdp_to_1"
    run_distrain([*CFG, *SINGLE, "ckpt.every_steps=5", f"output_dir={single}", ckpt(fsdp, 20)])
    assert_close(fsdp, single, 21, 30)
    assert ck.read_json(single / "checkpoints" / ck.step_name(25) / ck.STATE)["world_size"] == 1
    launch_all(
        ([*CFG, f"output_dir={root / 'one_to_ddp'}", ckpt(single, 25)], "cpu_ddp"),
        ([*CFG, f"output_dir={root / 'one_to_fsdp'}", ckpt(single, 25)], "cpu_fsdp"),
    )
    assert_close(fsdp, root / "one_to_ddp", 26, 30)
    assert_close(fsdp, root / "one_to_fsdp", 26, 30)
    # export from a sharded FSDP2 checkpoint equals the trained (consolidated) weights
    out = export(fsdp, root / "fsdp_export")
    assert_same_weights(load_weights_dir(out), weights(fsdp))


@pytest.mark.parametrize("while_loading", [False, True], ids=["verify-first", "hash-while-loading"])
def test_a_shard_only_rank_1_hashes_is_caught_and_both_ranks_fall_back(while_loading, runs, tmp_path):
    """The ranks share the checksum work: before loading, rank r hashes every world-th block, or
    (hashing while loading, forced here for this small state) each rank hashes its own shard as
    it copies from it. Rank 0 never hashes the damaged bytes of shard-00001, yet resume=auto must
    skip the checkpoint on both ranks, name the file, and continue exactly from the one before
    (after a partial load in the second case)."""
    run = tmp_path / "damaged"
    shutil.copytree(runs["ddp"] / "checkpoints", run / "checkpoints")
    shard = run / "checkpoints" / ck.step_name(30) / ck.shard_name(1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    env = {ck.HASH_WHILE_LOADING_ENV: "0"} if while_loading else {}
    proc = run_distrain([*CFG, f"output_dir={run}", "resume=auto"], "cpu_ddp", env=env)
    assert re.search(r"skipping checkpoint: checkpoint file \S*step_00000030/shard-00001\.safetensors fails its "
                     r"checksum", proc.stderr), proc.stderr[-3000:]  # fmt: skip
    assert_exact(runs["ddp"], run, 21, 30)
    ck.verify(run / "checkpoints" / ck.step_name(30))  # re-saved over the damaged one


def _choose_worker(rank: int, port: int, run_dirs: list[str], out: dict) -> None:
    import torch.distributed as dist

    from distrain.checkpoint.find import choose

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        chosen = choose("auto", Path(run_dirs[rank]), rank, 2)
        out[rank] = chosen[0].name if chosen else None
    except ck.CheckpointError as e:
        out[rank] = f"error: {e}"
    finally:
        dist.destroy_process_group()


def test_ranks_that_see_different_checkpoints_stop_instead_of_waiting(tmp_path):
    """resume=auto with a run dir that is not shared: one rank sees a checkpoint, the other none.
    Both must stop with the same error (not load different states, not hang in a collective)."""
    import multiprocessing

    model = torch.nn.Linear(3, 2)
    from distrain.checkpoint.layout import live_states

    ck.save_checkpoint(tmp_path / "a", ck.step_name(5), *live_states(model, torch.optim.SGD(model.parameters())),
                       {"step": 5}, "x: 1\n")  # fmt: skip
    ck.flush_pending()
    ctx = multiprocessing.get_context("spawn")
    for dirs, want in (([tmp_path / "a", tmp_path / "a"], [ck.step_name(5)] * 2),
                       ([tmp_path / "a", tmp_path / "b"], ["error: ranks see different checkpoints"] * 2)):  # fmt: skip
        out = ctx.Manager().dict()
        port = free_port()
        procs = [ctx.Process(target=_choose_worker, args=(r, port, [str(d) for d in dirs], out)) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert not any(p.is_alive() for p in procs), "a rank hung"
        for p in procs:
            p.kill()
        assert [str(out.get(r))[: len(w)] for r, w in enumerate(want)] == want, dict(out)


@pytest.mark.slow
def test_deepspeed_checkpoints_resume_across_zero_stages_and_backends(runs):
    root = runs["root"]
    z1, z2, z3 = root / "z1", root / "z2", root / "z3"
    run_distrain([*CFG, f"output_dir={z2}"], "cpu_zero2")
    launch_all(
        ([*CFG, f"output_dir={root / 'z2_resumed'}", ckpt(z2, 10)], "cpu_zero2"),
        ([*CFG, f"output_dir={z3}", ckpt(z2, 10)], "cpu_zero3"),
        ([*CFG, f"output_dir={z1}", ckpt(z2, 10)], "cpu_zero1"),
    )
    assert_exact(z2, root / "z2_resumed", 11, 30)
    assert_same_weights(weights(root / "z2_resumed"), weights(z2))
    assert_close(z2, z3, 11, 30)
    assert_close(z2, z1, 11, 30)
    launch_all(
        ([*CFG, f"output_dir={root / 'z3_resumed'}", ckpt(z3, 20)], "cpu_zero3"),
        ([*CFG, f"output_dir={root / 'z3_to_ddp'}", ckpt(z3, 20)], "cpu_ddp"),
        ([*CFG, f"output_dir={root / 'z1_resumed'}", ckpt(z1, 20)], "cpu_zero1"),
    )
    assert_exact(z3, root / "z3_resumed", 21, 30)
    assert_close(z3, root / "z3_to_ddp", 21, 30)
    assert_exact(z1, root / "z1_resumed", 21, 30)
    out = export(z3, root / "z3_export")  # ZeRO-3 partitions consolidated
    assert_same_weights(load_weights_dir(out), weights(z3))


def test_fsdp_save_then_load_in_the_same_processes(tmp_path):
    """accelerate issue 3896: loading right after saving, in the same FSDP2 processes."""
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "launch_configs" / "cpu_fsdp.yaml"),
           "--main_process_port", str(free_port()), str(REPO / "tests" / "ckpt_roundtrip_script.py"),
           *TINY_HAR, f"output_dir={tmp_path / 'rt'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(re.findall(r"ROUNDTRIP rank \d (?:ok|MISMATCH)", proc.stdout))  # ranks' lines may interleave
    assert results == ["ROUNDTRIP rank 0 ok", "ROUNDTRIP rank 1 ok"], proc.stdout[-2000:]
