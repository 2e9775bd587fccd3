"""Checkpoint save/load time and size: distrain's sharded format vs plain safetensors.

    python benchmarks/checkpoint.py [--models har,synthetic100m] [--repeats N]
    python benchmarks/checkpoint.py --blocked [--procs 1,2] [--repeats N]

--blocked: how long a save holds up the training loop, ckpt.async_save=true vs a synchronous
save, for the 100M model (weights + AdamW moments, 1.2 GB) on the CPU, one process and two
(gloo, each rank holding the full replicated state and writing half of it, as under DDP). The
synchronous save blocks until the checkpoint is committed; the asynchronous one only while this
rank's part is copied to host memory (CheckpointWriter.save with background=True), the rest is written on its
thread; "committed + retention" is the time until it is, `latest` pointed and the previous
checkpoint deleted (flush). Best of N repeats (default 3); the ratio is
async blocked / sync blocked (target <= 0.25).

For each model, 2 CPU processes (gloo) save and load a full training state (weights + AdamW
moments) with distrain.checkpoint under DDP and under FSDP2. The reference is
`safetensors.torch.save_file` (+ fsync) / `load_file` (+ copying into the live model and
optimizer tensors, since load_file maps the file lazily) of the same full state dict from one
process, measured in the same run (before and after the workers; the best counts). Ratios are
distrain time / reference time (target <= 1.5). Save
includes fsync and checksums; load includes checksum verification and setting the state. Times
are the best of N repeats (default: 20 for har, 3 for the 100M model; at least 10 for the
reference).

DDP keeps a full replica of the state on every rank, so both ranks must copy all of it: the
"ref load, both ranks" column times the reference's own load (load_file + copy) done by the two
DDP ranks at once, the floor for any DDP load on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distrain import checkpoint as ck
from distrain.checkpoint import load as checkpoint_load
from distrain.checkpoint.layout import flatten_optim, live_states, set_live_states


def build(name: str) -> tuple[torch.nn.Module, tuple[type, ...]]:
    """The model and the block classes FSDP2 shards one by one."""
    torch.manual_seed(0)
    if name == "har":
        from distrain.recipe import resolve_config
        from recipes.har import EncoderBlock, HARModel, ModelConfig  # noqa: F401

        cfg, recipe = resolve_config(["recipe=har"])
        return recipe.bind(cfg, recipe.load_datasets(cfg).info).build_model(), (EncoderBlock,)
    width, depth = 2048, 24  # 24 x (2048 x 2048 + 2048) = 100.7M parameters
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)]), (torch.nn.Linear,)


def with_optimizer_state(model: torch.nn.Module) -> torch.optim.Optimizer:
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _init_optim_state(opt)  # creates exp_avg/exp_avg_sq/step as a first step would
    return opt


def reference(name: str, tmp: Path, repeats: int) -> dict[str, float]:
    """One process: the full state dict (weights + optimizer moments) through save_file/load_file."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, _ = build(name)
    opt = with_optimizer_state(model)
    msd, osd = get_state_dict(model, opt)
    flat = {f"model.{k}": v for k, v in msd.items()}
    tensors, _ = flatten_optim(osd)
    flat.update({f"optim.{k}": v.clone() if v.ndim == 0 else v for k, v in tensors.items()})
    path = tmp / "reference.safetensors"
    save_t, load_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        save_file(flat, str(path))
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        save_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loaded = load_file(str(path))  # lazy (mmap): the copy into the live state is part of loading
        with torch.no_grad():
            for k, v in loaded.items():
                flat[k].copy_(v)
        load_t.append(time.perf_counter() - t0)
        del loaded
    size = path.stat().st_size  # kept for the workers' replicated reference load
    params = sum(p.numel() for p in model.parameters())
    return {"save": min(save_t), "load": min(load_t), "bytes": size, "params": params}


def worker(rank: int, world: int, port: int, name: str, backend: str, tmp: str, repeats: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, blocks = build(name)
    if backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for m in model.modules():
            if isinstance(m, blocks):
                fully_shard(m)
        fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = with_optimizer_state(model)
    module = model.module if backend == "ddp" else model  # what Backend.unwrap gives
    run_dir = Path(tmp) / f"{name}-{backend}"
    save_t, load_t = [], []
    for r in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        msd, osd = live_states(module, opt)
        path = ck.save_checkpoint(run_dir, ck.step_name(r + 1), msd, osd, {"step": r + 1}, "{}\n", rank, world)
        save_t.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        chosen, index = ck.choose(str(path), run_dir, rank, world)  # each rank hashes its shard while loading
        lm, lo = checkpoint_load.load_verified(chosen, *live_states(module, opt), index, rank, world)  # in place
        set_live_states(module, opt, lm, lo)
        dist.barrier()
        load_t.append(time.perf_counter() - t0)
        if rank == 0:
            size = sum(f.stat().st_size for f in path.iterdir())
            if r + 1 < repeats:
                shutil.rmtree(path)
    ref_both = replicated_reference_load(module, opt, Path(tmp) / "reference.safetensors", repeats) \
        if backend == "ddp" else None  # FSDP2 ranks hold shards, not full tensors  # fmt: skip
    if rank == 0:
        out[backend] = {"save": min(save_t), "load": min(load_t), "bytes": size, "ref_both": ref_both}
    dist.destroy_process_group()


def replicated_reference_load(module: torch.nn.Module, opt: torch.optim.Optimizer, ref: Path, repeats: int) -> float:
    """Every rank runs the reference load (load_file of the full state + copy into its own state)
    at the same time, as a DDP load must; the time until both are done."""
    msd, osd = live_states(module, opt)
    flat = {f"model.{k}": v for k, v in msd.items()} | {f"optim.{k}": v for k, v in flatten_optim(osd)[0].items()}
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            for k, v in load_file(str(ref)).items():
                flat[k].copy_(v)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return min(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blocked_worker(rank: int, world: int, port: int, tmp: str, repeats: int, out: dict) -> None:
    """Time this rank's sync and async saves of the 100M model's training state (rank 0 reports)."""
    from distrain.checkpoint.manager import async_group
    from distrain.checkpoint.save import CheckpointWriter

    group = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = async_group()  # what CheckpointManager creates for ckpt.async_save
    torch.set_num_threads(1)
    model, _ = build("synthetic100m")
    opt = with_optimizer_state(model)
    writer = CheckpointWriter()
    times: dict[str, list[float]] = {"sync": [], "async": [], "async committed": []}
    step = 0
    for _ in range(repeats):
        for mode in ("sync", "async"):
            step += 1
            run_dir = Path(tmp) / f"blocked-{world}"
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            msd, osd = live_states(model, opt)
            args = (run_dir, ck.step_name(step), msd, osd, {"step": step}, "{}\n", rank, world)
            if mode == "sync":
                writer.save(*args, keep_last=1)
            else:
                writer.save(*args, keep_last=1, background=True, group=group)
            times[mode].append(time.perf_counter() - t0)
            writer.flush()  # the async save's write and commit; retention of the previous ones
            if mode == "async":
                times["async committed"].append(time.perf_counter() - t0)
    writer.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        out[world] = {k: min(v) for k, v in times.items()}


def blocked_main(procs: list[int], repeats: int) -> None:
    rows = {}
    with tempfile.TemporaryDirectory(prefix="distrain-ckpt-blocked-") as tmp:
        for world in procs:
            results = mp.Manager().dict()
            if world == 1:
                blocked_worker(0, 1, 0, tmp, repeats, results)
            else:
                mp.spawn(blocked_worker, args=(world, free_port(), tmp, repeats, results), nprocs=world)
            rows[world] = dict(results[world])
    print("| model | processes | sync save: loop blocked ms | async save: loop blocked ms "
          "| async: committed + retention ms | blocked async / sync |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for world, r in rows.items():
        print(f"| synthetic100m (100.7M) | {world} | {r['sync'] * 1e3:.0f} | {r['async'] * 1e3:.0f} | "
              f"{r['async committed'] * 1e3:.0f} | {r['async'] / r['sync']:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="har,synthetic100m")
    parser.add_argument("--repeats", type=int, default=None, help="best of N (default: 20 for har, 3 for 100M)")
    parser.add_argument("--blocked", action="store_true", help="time the loop is blocked: async vs sync saves")
    parser.add_argument("--procs", default="1,2", help="--blocked: process counts")
    args = parser.parse_args()
    if args.blocked:
        blocked_main([int(p) for p in args.procs.split(",")], args.repeats or 3)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="distrain-ckpt-bench-") as tmp:
        for name in args.models.split(","):
            repeats = args.repeats or (20 if name == "har" else 3)
            # The reference is cheap and its time moves by up to 70% from run to run on a shared VM:
            # at least 10 repeats of it, so its best (which sets every ratio) is a steady one.
            ref_repeats = max(repeats, 10)
            before = reference(name, Path(tmp), ref_repeats)
            results = mp.Manager().dict()
            for backend in ("ddp", "fsdp2"):
                mp.spawn(worker, args=(2, free_port(), name, backend, tmp, repeats, results), nprocs=2)
                shutil.rmtree(Path(tmp) / f"{name}-{backend}", ignore_errors=True)
            # The reference again after the workers, keeping its best: a slow spell of the machine
            # during the reference would otherwise flatter distrain's ratios.
            after = reference(name, Path(tmp), ref_repeats)
            ref = {**before, "save": min(before["save"], after["save"]), "load": min(before["load"], after["load"])}
            for backend in ("ddp", "fsdp2"):
                r = results[backend]
                rows.append((name, ref["params"], backend, r["bytes"], ref["bytes"], r["save"], ref["save"],
                             r["load"], ref["load"], r["ref_both"]))  # fmt: skip
            (Path(tmp) / "reference.safetensors").unlink()
    print("| model | params | backend | ckpt MB | ref MB | save ms | ref save ms | save ratio | load ms | ref load ms "
          "| load ratio | ref load, both ranks ms (ratio) |")  # fmt: skip
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, params, backend, b, rb, s, rs, lo, rl, both in rows:
        floor = "-" if both is None else f"{both * 1e3:.1f} ({both / rl:.2f})"
        ms = [f"{x * 1e3:.1f}" for x in (s, rs, lo, rl)]
        print(f"| {name} | {params / 1e6:.1f}M | {backend} | {b / 1e6:.1f} | {rb / 1e6:.1f} | {ms[0]} | {ms[1]} | "
              f"{s / rs:.2f} | {ms[2]} | {ms[3]} | {lo / rl:.2f} | {floor} |")  # fmt: skip

if __name__ == "__main__":
    main()
