"""A real one-node Slurm cluster for tests: Debian's slurmctld, slurmd and munge, configured in
a temporary directory and stopped afterwards.

Installs the packages with apt-get when they are missing (CI starts from a clean machine).
Plugins that need cgroups or a system-wide config are avoided: proctrack/linuxproc,
task/none, select/cons_tres; clients find the config through SLURM_CONF.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from helpers import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged", "munge")


class SlurmUnavailable(RuntimeError):
    pass


def ensure_installed() -> None:
    """Idempotent: a no-op when the binaries are there, else apt-get install (needs root)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(f"Slurm is not installed and apt-get as root is not available: install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise SlurmUnavailable(f"after apt-get install, still missing: {missing}")


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class LocalSlurm:
    """slurmctld + slurmd for this host; `env` is what clients (sbatch, squeue) need."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.started_munged = False
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _munge_ok(self) -> bool:
        enc = subprocess.run(["munge", "-n"], capture_output=True, check=False)
        return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, check=False).returncode == 0

    def start(self) -> LocalSlurm:
        ensure_installed()
        if not self._munge_ok():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", shutil.which("munged")], check=True)
            self.started_munged = True
            _wait(self._munge_ok, 20, "munged")
        node = socket.gethostname().split(".")[0]
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=ftdisttest",
                    f"SlurmctldHost={node}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool",
                    f"SlurmctldPidFile={r}/slurmctld.pid",
                    f"SlurmdPidFile={r}/slurmd.pid",
                    f"SlurmctldLogFile={r}/slurmctld.log",
                    f"SlurmdLogFile={r}/slurmd.log",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "JobAcctGatherType=jobacct_gather/none",
                    "JobRequeue=1",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    # A killed step's processes get this long between SIGTERM and SIGKILL.
                    "KillWait=30",
                    f"NodeName={node} CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
        _wait(self._node_idle, 60, f"node {node} to be idle (logs in {r})")
        return self

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env, check=False)
        return out.returncode == 0 and out.stdout.strip().startswith("idle")

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> dict:
        """scontrol's fields of a job (JobState, Restarts, Reason, ExitCode...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_job(self, job_id: str, timeout: float = 600, release_requeued: bool = True) -> dict:
        """Wait for a job to end; a requeued job is let start at once (Slurm holds it ~2 minutes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            if release_requeued and state == "PENDING" and info.get("Reason") == "BeginTime":
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            time.sleep(1)
        raise TimeoutError(f"job {job_id} did not end in {timeout:.0f} s: {self.job(job_id)}")

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False)
        for name in ("slurmd", "slurmctld"):
            pid_file = self.root / f"{name}.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text().strip())
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    continue
                _wait(lambda p=pid: not Path(f"/proc/{p}").exists(), 30, f"{name} to stop")
        if self.started_munged:
            subprocess.run(["pkill", "-x", "munged"], check=False)
