"""The Slurm job log shows the environment with secrets masked (distrain/env_mask.py via slurm/common.sh):
by name and by value shape, on every line of a multi-line value."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from distrain.tools.env_mask import mask_line, mask_value, masked_environment
from distrain.tools.slurm import SlurmOptions, render_command_array, render_training

KEY_BODY = ["b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ", "QyNTUxOQAAACDx8mZ2hvc3RseXNlY3JldGxpbmVzMTIz"]
PEM = "\n".join(["-----BEGIN OPENSSH PRIVATE KEY-----", *KEY_BODY, "-----END OPENSSH PRIVATE KEY-----"])

# name -> (value, what the log may show); the secret parts must not appear anywhere
SECRETS = {
    "SSH_PRIVATE_KEY": (PEM, "***"),  # by name; one line for all four
    "DEPLOY_MATERIAL": (PEM, "***"),  # a PEM block under a harmless name
    "HF_HUB_TOKEN": ("hf_ZmFrZXRva2VuMTIzNDU2Nzg5MGFiY2RlZmdo", "***"),
    "DB_PASS": ("hunter2", "***"),
    "MY_CREDENTIALS": ('{\n  "user": "bob",\n  "value": "pl41n"\n}', "***"),
    "DATABASE_URL": (
        "postgres://alice:s3cr3t-pw@db.example.com:5432/app",
        "postgres://alice:***@db.example.com:5432/app",
    ),
    "CACHE": ("redis://:p@ss/w0rd@cache:6379/0", "redis://:***@cache:6379/0"),
    "GIT_REMOTE": ("https://ghp_FakeToken1234567890abcdefGHIJ@github.com/org/repo", "https://***@github.com/org/repo"),
    "UPLOAD": (
        "https://b.s3.amazonaws.com/f?X-Amz-Credential=AKIAFAKE123%2F&X-Amz-Signature=0f9e8d7c6b5a&n=1",
        "https://b.s3.amazonaws.com/f?X-Amz-Credential=***&X-Amz-Signature=***&n=1",
    ),
    "NOTES": (
        "first line is fine\npassword=topsecret99 and more\nthird",
        "first line is fine\npassword=*** and more\nthird",
    ),
    "CURL_OPTS": ('-H "Authorization: Bearer abcdefghijklmnop123"', '-H "Authorization: Bearer ***"'),
    "OPTS": ('--header "X: Bearer zyxwvutsrq987654"', '--header "X: Bearer ***"'),
    "MODEL_CACHE": ("cache=qZ8xP2vL9mK4nB7cT1wR6yH3jF5dS0gA", "cache=***"),
    "BLOB": ("a b3Blbn/NzaC1r+ZXktdjEAAAAABG5vbmUAAAAEbm9uZQ== b", "a *** b"),
    "HEX": ("id 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "id ***"),
    "SHORT_KNOWN": ("use hf_abcdefghijklmnopqr here; and AKIAIOSFODNN7EXAMPLE", "use *** here; and ***"),
    "JWT_HOLDER": ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "***"),
}
SECRET_PARTS = [
    "ghostlysecret",
    *KEY_BODY,
    "b3Blbn",
    "9f86d0",
    "hf_abc",
    "AKIAIOS",
    "eyJhbG",
    "hf_ZmFrZX",
    "hunter2",
    "pl41n",
    "s3cr3t",
    "p@ss",
    "w0rd",
    "ghp_Fake",
    "AKIAFAKE",
    "0f9e8d7c",
    "topsecret",
    "abcdefghijklmnop123",
    "zyxwvutsrq",
    "qZ8xP2vL",
]
PLAIN = {
    "PATH": "/usr/local/cuda-12.4/bin:/opt/conda/envs/train_env_python311/bin:/usr/bin",
    "CUDA_VISIBLE_DEVICES": "GPU-5f8c1e4d-1234-5678-9abc-def012345678,MIG-5f8c1e4d-1234-5678-9abc-def012345678/1/0",
    "TOKENIZERS_PARALLELISM": "false",
    "PWD": "/home/alice/project",
    "MY_SETTING": "hello world",
    "PIP_INDEX_URL": "https://pypi.org/simple",
    "CONTACT": "alice@example.com",
    "EXPERIMENT": "projects/my-training-experiment-2024-v3/checkpoints my_long_experiment_name_2024_v3_final",
    "SHORT_HEX": "0000000000000000000000000000000000000000",
    "BASH_FUNC_f%%": "() {  echo one;\n echo two\n}",
}


@pytest.mark.parametrize("name", SECRETS)
def test_secrets_are_masked_by_name_and_shape(name):
    value, shown = SECRETS[name]
    assert mask_value(name, value).split(" (")[0] == shown


@pytest.mark.parametrize("name", PLAIN)
def test_plain_values_are_shown(name):
    assert mask_value(name, PLAIN[name]) == PLAIN[name]


def test_every_line_is_masked_and_nothing_rewrites_the_log():
    lines = list(masked_environment({**{k: v for k, (v, _) in SECRETS.items()}, "CR": "a\rb"}))
    text = "\n".join(lines)
    for part in SECRET_PARTS:
        assert part not in text, part
    assert "SSH_PRIVATE_KEY=*** (4 lines)" in lines and "CR=a\\x0db" in lines
    names = [line.split("=", 1)[0] for line in lines]
    assert names == sorted([*SECRETS, "CR"]), "one entry per variable, sorted like printenv"


def test_mask_line_keeps_the_user_and_host():
    assert mask_line("mysql://root:pw@10.0.0.1/db x=1") == "mysql://root:***@10.0.0.1/db x=1"


def _stub(path: Path, text: str) -> None:
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_the_job_log_masks_the_environment(tmp_path, monkeypatch):
    """The rendered batch script, run with stand-ins for srun and scontrol: its environment section
    shows the plain values and none of the secrets, whatever the template."""
    monkeypatch.chdir(tmp_path)
    opts = SlurmOptions(log_dir=str(tmp_path / "logs"))
    scripts = {"cpu": render_training(["recipe=har"], opts),
               "gpu": render_training(["recipe=har"], SlurmOptions(gpus_per_node=2)),
               "multinode": render_training(["recipe=har"], SlurmOptions(nodes=2, gpus_per_node=2)),
               "array": render_command_array(["echo", "hi"], 2, opts)}  # fmt: skip
    helper = str(Path(sys.modules["distrain.tools.env_mask"].__file__).resolve())
    for name, script in scripts.items():
        assert f"-I {helper}" in script, name
        assert not re.search(r"^\s*printenv\b", script, re.M), name  # the old unmasked pipeline is gone
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", 'case "$1 $2" in "show hostnames") echo node-a;; *) echo JobState=RUNNING;; esac\n')
    _stub(bin_dir / "srun", "exit 0\n")
    env = {**os.environ, **{k: v for k, (v, _) in SECRETS.items()}, **PLAIN, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-a", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_CPUS_PER_TASK": "2"}  # fmt: skip
    env.pop("SLURM_ARRAY_JOB_ID", None)
    env.pop("BASH_FUNC_f%%")  # bash would refuse it as a malformed exported function
    run = subprocess.run(["bash", "-c", scripts["cpu"]], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    log = run.stdout + run.stderr
    section = log.split("--- printenv", 1)[1].split("--- pip freeze", 1)[0]
    for part in SECRET_PARTS:
        assert part not in log, part
    for name, (_, shown) in SECRETS.items():
        assert f"{name}={shown}" in section, name
    assert "MY_SETTING=hello world" in section and "TOKENIZERS_PARALLELISM=false" in section
    assert f"CUDA_VISIBLE_DEVICES={PLAIN['CUDA_VISIBLE_DEVICES']}" in section
