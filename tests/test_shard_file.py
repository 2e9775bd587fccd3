"""distrain.checkpoint.shard_file against the safetensors library: files either writes, the other reads."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distrain.checkpoint.shard_file import ShardFile, ShardFileError, write_shard


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 7, generator=g),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "f16": torch.randn(9, generator=g).to(torch.float16),
        "i64": torch.randint(-(2**40), 2**40, (4,), generator=g),
        "i8": torch.randint(-128, 127, (2, 3), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (6,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "step": torch.tensor(17.0),
        "empty": torch.empty(0, 4),
        "rows": torch.randn(8, 4, generator=g)[2:5],  # a contiguous view at a storage offset
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def test_write_shard_is_read_by_safetensors(tmp_path):
    tensors = sample()
    write_shard(tmp_path / "a.safetensors", tensors, {"format": "test", "note": "x"})
    assert_same(load_file(tmp_path / "a.safetensors"), tensors)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "test", "note": "x"}


def test_shard_file_reads_what_safetensors_writes(tmp_path):
    tensors = sample()
    save_file(tensors, tmp_path / "b.safetensors", metadata={"k": "v"})
    shard = ShardFile(tmp_path / "b.safetensors")
    assert shard.metadata == {"k": "v"}
    assert_same({k: shard.tensor(k).clone() for k in shard.entries}, tensors)


def test_tied_tensors_are_written_in_full(tmp_path):
    weight = torch.randn(4, 3)
    tensors = {"embed": weight, "head": weight, "half": weight[:2]}  # safetensors' save_file refuses these
    with pytest.raises(RuntimeError):
        save_file(tensors, tmp_path / "ref.safetensors")
    write_shard(tmp_path / "t.safetensors", tensors, {})
    shard = ShardFile(tmp_path / "t.safetensors")
    assert_same({k: shard.tensor(k).clone() for k in shard.entries}, tensors)


def test_damaged_files_raise_naming_the_file(tmp_path):
    path = tmp_path / "c.safetensors"
    write_shard(path, {"w": torch.randn(100)}, {})
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    with pytest.raises(ShardFileError, match=r"short\.safetensors.*too short"):
        ShardFile(tmp_path / "short.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(ShardFileError, match=r"cut\.safetensors.*'w' lies outside the file"):
        ShardFile(tmp_path / "cut.safetensors").tensor("w")
    (tmp_path / "header.safetensors").write_bytes(struct.pack("<Q", 10**9) + data[8:])
    with pytest.raises(ShardFileError, match=r"header\.safetensors.*truncated"):
        ShardFile(tmp_path / "header.safetensors")
    garbled = bytearray(data)
    garbled[9] = ord("#")
    (tmp_path / "json.safetensors").write_bytes(bytes(garbled))
    with pytest.raises(ShardFileError, match=r"json\.safetensors: unreadable header"):
        ShardFile(tmp_path / "json.safetensors")
    garbled[9] = 0xFF  # not UTF-8
    (tmp_path / "utf8.safetensors").write_bytes(bytes(garbled))
    with pytest.raises(ShardFileError, match=r"utf8\.safetensors: unreadable header"):
        ShardFile(tmp_path / "utf8.safetensors")
    with pytest.raises(ShardFileError, match="no readable tensor 'nope'"):
        ShardFile(path).tensor("nope")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


def _big_shard(path) -> dict[str, torch.Tensor]:
    tensors = {f"w{i}": torch.randn(1024, 2048) for i in range(8)}  # 64 MiB
    write_shard(path, tensors, {"format": "test"})
    return tensors


def test_a_shard_is_read_under_a_data_limit_smaller_than_the_file(tmp_path):
    """A shard is mapped read-only and shared: RLIMIT_DATA (private writable memory) does not count
    the file, so a capped process reads a shard beside a live state that nearly fills its cap."""
    import resource

    saved = _big_shard(tmp_path / "s.safetensors")
    dst = {k: torch.empty_like(v) for k, v in saved.items()}
    old = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (_status("VmData") + 16 * 2**20, old[1]))
    try:
        f = ShardFile(tmp_path / "s.safetensors")
        assert all(f.copy_into(k, d) for k, d in dst.items())
        view = f.tensor("w3")
        del f
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, old)
    assert all(torch.equal(dst[k], saved[k]) for k in saved) and torch.equal(view, saved["w3"])


def test_reading_and_hashing_a_shard_leave_its_pages_out_of_the_resident_set(tmp_path):
    """copy_into and block_checksums release the mapped pages they touched: reading a checkpoint
    back does not hold the file in the resident set beside the state it fills."""
    from distrain.checkpoint.format import block_checksums

    saved = _big_shard(tmp_path / "s.safetensors")
    dst = {k: torch.empty_like(v) for k, v in saved.items()}
    f = ShardFile(tmp_path / "s.safetensors")
    before = _status("RssFile")
    assert all(f.copy_into(k, d) for k, d in dst.items())
    assert _status("RssFile") - before < 8 * 2**20
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM starts again from the current resident set
    start = _status("VmRSS")
    block_checksums(tmp_path / "s.safetensors")
    assert _status("VmHWM") - start < 40 * 2**20  # a 64 MiB file: hashed a window at a time
    assert all(torch.equal(dst[k], saved[k]) for k in saved)
