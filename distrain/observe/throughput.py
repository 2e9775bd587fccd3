"""FLOPs per sample (counted once with torch.utils.flop_counter) and MFU against a per-GPU peak table.

The count runs on one real forward+backward of the first training micro-batch, so it sees the
model exactly as the recipe calls it. MFU = achieved model FLOP/s per device / the device's dense
peak for the precision in use; it is reported only for GPUs in the table below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets: (bf16/fp16 tensor core, tf32 tensor core,
# plain fp32). Matched by substring of torch.cuda.get_device_name, first match wins, so the
# specific names come before the generic ones.
PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (989.4, 494.7, 66.9),
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100 NVL": (835.0, 418.0, 60.0),
    "H100": (989.4, 494.7, 66.9),  # SXM
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.1, 183.0, 91.6),
    "L4": (121.0, 60.0, 30.3),
    "A10G": (70.0, 35.0, 31.2),
    "A10": (125.0, 62.5, 31.2),
    "V100": (125.0, 15.7, 15.7),  # fp16 only: no bf16 or tf32 tensor cores
    "T4": (65.0, 8.1, 8.1),
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for a precision (`no` means fp32, tf32 when torch allows it), or None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in PEAK_TFLOPS.items():
        if key in name:
            if precision in ("bf16", "fp16"):
                return half * 1e12
            return (tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32) * 1e12
    return None


@contextlib.contextmanager
def count_flops() -> Iterator[Callable[[], int]]:
    """`with count_flops() as total: ...; total()` gives the FLOPs of every aten op run inside.

    Compiled regions run eager while counting (inductor kernels bypass the counter); this
    costs one slower step and nothing after.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    stance = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else None
    with stance or contextlib.nullcontext(), counter:
        yield counter.get_total_flops


def mfu(flops_per_sample: float, samples_per_s: float, world_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one device: its share of the achieved FLOP/s over its peak."""
    if not peak or flops_per_sample <= 0:
        return None
    return flops_per_sample * samples_per_s / max(world_size, 1) / peak
