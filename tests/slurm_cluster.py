"""A real one-node Slurm cluster on localhost for the `slurm` tests (Debian's Slurm 22.05).

Installs slurmctld, slurmd, slurm-client and munge with apt-get when they are missing (CI runs
as root on a fresh Debian machine), then starts munged, slurmctld and slurmd from a private
folder with free ports, so it touches neither /etc/slurm nor a cluster that is already running.
Two partitions: `debug` (default, PriorityTier=1, 15 s grace) and `high` (PriorityTier=10);
preempt/partition_prio with PreemptMode=REQUEUE lets a `high` job preempt a `debug` job; without
preempt_send_user_signal the preempted job gets only SIGTERM, as on many clusters.
`stop()` cancels the jobs and stops the daemons it started, by PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "munged"]


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (not root, no apt-get)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install() -> None:
    if all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(f"Slurm is not installed and cannot be installed here: run as root with apt-get, "
                               f"or `apt-get install {' '.join(PACKAGES)}`")  # fmt: skip
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                   check=True, env=env, capture_output=True)  # fmt: skip


class LocalSlurm:
    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="distrain-slurm-"))
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.base / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: dict[str, int] = {}

    # -------------------------------------------------------------- start / stop

    def start(self) -> LocalSlurm:
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            (self.base / sub).mkdir(parents=True)
        munge = self.base / "munge"
        munge.chmod(0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.socket = munge / "munge.socket.2"
        self._daemon("munged", ["munged", "--force", f"--key-file={key}", f"--socket={self.socket}",
                                f"--pid-file={munge / 'munged.pid'}", f"--log-file={self.base / 'log/munged.log'}",
                                f"--seed-file={munge / 'munged.seed'}"], munge / "munged.pid")  # fmt: skip
        self.conf.write_text(self._slurm_conf())
        run = self.base / "run"
        self._daemon("slurmctld", ["slurmctld", "-f", str(self.conf), "-i"], run / "slurmctld.pid")
        self._daemon("slurmd", ["slurmd", "-f", str(self.conf), "-N", self.node], run / "slurmd.pid")
        self._wait_idle()
        return self

    def _daemon(self, name: str, cmd: list[str], pid_file: Path) -> None:
        """Start a daemon that forks into the background; read its PID from the file it writes."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{name} failed to start: {proc.stderr.strip() or proc.stdout.strip()}")
        for _ in range(100):
            if pid_file.exists() and pid_file.read_text().strip():
                self.pids[name] = int(pid_file.read_text().split()[0])
                return
            time.sleep(0.1)
        raise SlurmUnavailable(f"{name} wrote no PID file {pid_file}; see {self.base / 'log'}")

    def _slurm_conf(self) -> str:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 - 512
        b = self.base
        return f"""\
ClusterName=distrain-ci
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire=10
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
JobRequeue=1
MailProg=/bin/true
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} CPUs={self.cpus} Sockets=1 \
CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=15
PartitionName=high Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=10
"""

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.cmd(["sinfo", "-h", "-n", self.node, "-o", "%T"], check=False).strip()
            if state.startswith(("idle", "mixed", "allocated")):
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"the node did not come up (state {state!r}); logs in {self.base / 'log'}")

    def stop(self) -> None:
        """Cancel every job, stop the daemons by PID (TERM, then KILL), remove the folder."""
        if "slurmctld" in self.pids:
            jobs = self.cmd(["squeue", "-h", "-o", "%A"], check=False).split()
            if jobs:
                self.cmd(["scancel", "--full", *jobs], check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.cmd(["squeue", "-h", "-t", "R,CG,S"], check=False).strip():
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is not None:
                _terminate(pid)
        shutil.rmtree(self.base, ignore_errors=True)

    # -------------------------------------------------------------- queries

    def cmd(self, args: list[str], check: bool = True) -> str:
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (no sacct without slurmdbd). Empty when unknown."""
        out = self.cmd(["scontrol", "show", "job", "--oneliner", job_id], check=False)
        line = out.splitlines()[0] if out.strip() else ""
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not reach {states} in {timeout:.0f} s; last: {info.get('JobState')}")


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(40):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.25)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
