"""The run directory's ownership and its state: one run at a time, and what a rerun may do.

Ownership: rank 0 creates `output_dir/ftdist.lock` exclusively (a private file hard-linked into
place, like O_CREAT|O_EXCL but never seen half-written), recording its holder: host, pid, process
identity, Slurm job id, start time. Exclusive creation rather than flock/fcntl: it is atomic on
NFS and Lustre, while flock is local-only on Lustre without `-o flock` and depends on lockd on
NFS, so two nodes could both "hold" it without knowing; and a lock file can name its holder. The
price is that a hard-killed run leaves the file behind; it is judged from its contents:
  - same host: the holder is alive when its pid exists with the same boot and start time (pid
    reuse after a restart is not the holder); a dead holder's lock is taken over with a warning;
  - another host: it cannot be checked from here, so the run stops, unless SLURM_JOB_ID equals
    the holder's: a Slurm job requeued onto another node after a hard kill of its first start is
    the same run, and takes the lock over with a warning (on the same node the pid decides).
    Otherwise the message names the file to delete once that run is known to be gone.
The lock is released (the file removed) when run() ends, also on failure and on preemption, so
a requeue finds the directory free.

State, decided under the lock before data and model load: a fresh directory starts; a checkpoint
resumes (resume=auto or PATH); a finished run (complete summary.json, final/ when saved) is left
alone by resume=auto; a previous run's record that cannot be resumed is refused unless
resume=none overwrite=true, which moves the old record aside (never deletes it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftdist.checkpoint import resolve_resume
from ftdist.config import ConfigError, FtdistConfig

log = logging.getLogger("ftdist")

LOCK_NAME = "ftdist.lock"
# What a run leaves that a new one must not silently append to or overwrite. config.yaml,
# data_report.json and train.log alone mean the last invocation stopped before its first step:
# starting again loses nothing (and a Slurm job's directory must stay resubmittable then).
RECORD = ("metrics.jsonl", "summary.json", "final", "checkpoints", "eval")


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory: what the lock file records."""

    host: str
    pid: int
    started: str
    identity: str | None = None  # boot id and process start time: tells a reused pid apart
    slurm_job_id: str | None = None

    @classmethod
    def me(cls) -> Holder:
        pid = os.getpid()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return cls(socket.gethostname(), pid, stamp, process_identity(pid), os.environ.get("SLURM_JOB_ID"))

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder recorded in `path`; None when it is unreadable (cut short while written)."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on {self.host}{job}, since {self.started}"

    def is_alive(self) -> bool:
        """Only answerable on the holder's own host."""
        if not pid_exists(self.pid):
            return False
        return self.identity is None or process_identity(self.pid) in (None, self.identity)


def process_identity(pid: int) -> str | None:
    """boot id + start time of `pid` (Linux): a pid reused after its holder died differs."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'
    return f"{boot}:{fields[19]}"  # field 22 of stat: start time in clock ticks after boot


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:  # a zombie (killed, not yet reaped by its parent) holds nothing any more
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, IndexError):
        return True


# --- the lock --------------------------------------------------------------------------------


def acquire_lock(run_dir: Path, me: Holder) -> str | None:
    """Take `run_dir`'s lock for `me`; returns a warning when a stale one was taken over.

    Raises ConfigError naming the holder when another run holds it."""
    path = run_dir / LOCK_NAME
    note = None
    for _ in range(3):  # after removing a stale lock, create again (a racing run may win)
        try:
            create_exclusive(path, json.dumps(asdict(me)) + "\n")
            return note
        except FileExistsError:
            pass
        holder = Holder.read(path)
        why = stale_reason(holder, me)
        if why is None:
            raise ConfigError(
                f"output_dir {run_dir} is in use by another run ({holder.describe()}; {path}): wait for it to end, "
                f"use another output_dir, or delete {path} if that run is gone"
            )
        if take_over(path, holder):
            note = f"took over the lock {path} of {holder.describe() if holder else 'an unknown run'}: {why}"
    raise ConfigError(f"output_dir {run_dir}: could not take {path} (other runs keep creating it)")


def stale_reason(holder: Holder | None, me: Holder) -> str | None:
    """Why `holder`'s lock may be taken over by `me`; None when it must be respected."""
    if holder is None:  # locks appear whole (create_exclusive): this one was damaged
        return "its lock file is unreadable"
    if holder.host == me.host:  # the truth is known here: is that process still running?
        return None if holder.is_alive() else "that process is no longer running"
    if holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id:
        return f"the same Slurm job {me.slurm_job_id}, started again on another node (requeued)"
    return None  # another host's pid cannot be checked from here


def create_exclusive(path: Path, text: str) -> None:
    """Create `path` holding `text`, or raise FileExistsError. Written to a private file first and
    hard-linked into place: the lock appears whole (never empty to a reader) and link() is
    atomic on NFS too."""
    private = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}")
    fd = os.open(private, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        os.link(private, path)
    finally:
        private.unlink()


def take_over(path: Path, stale: Holder | None) -> bool:
    """Remove the stale lock at `path` if it is still the one judged stale; False if another run
    replaced it meanwhile (a rename is atomic: of two runs taking over, one gets the file)."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if Holder.read(aside) != stale:  # a fresh lock of a run that took over first: put it back
        os.rename(aside, path)
        return False
    aside.unlink()
    return True


def release_lock(run_dir: Path, me: Holder) -> None:
    """Remove the lock if it is still `me`'s (a run that took it over keeps it)."""
    path = run_dir / LOCK_NAME
    if Holder.read(path) == me:
        path.unlink(missing_ok=True)


# --- the state -------------------------------------------------------------------------------


@dataclass
class Decision:
    """What rank 0 decided for this invocation; broadcast to every rank."""

    resume_from: str | None = None
    finished: dict | None = None  # the finished run's summary: nothing to do
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # warnings, logged once logging is set up
    fresh: bool = False  # nothing but the lock in the directory when it was claimed


def previous_record(run_dir: Path) -> list[str]:
    return [name for name in RECORD if (run_dir / name).exists() and not is_empty_file(run_dir / name)]


def is_empty_file(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == 0


def finished_summary(run_dir: Path, cfg: FtdistConfig) -> dict | None:
    """The summary of a run that completed in `run_dir` (None when it did not)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("complete") is False:
        return None
    if cfg.train.save_final and not (run_dir / "final").is_dir():
        return None
    return summary


def decide(cfg: FtdistConfig, run_dir: Path) -> Decision:
    """The rerun rules in one process (rank 0 of a one-process run, tools, tests). Raises
    ConfigError when the run must not start."""
    early = decide_before_resume(cfg, run_dir)
    if early is not None:
        return early
    return decide_after_resume(cfg, run_dir, resolve_resume(cfg.resume, run_dir))


def decide_before_resume(cfg: FtdistConfig, run_dir: Path) -> Decision | None:
    """What needs no checkpoint checked (rank 0, under the lock): a contradictory request, or a
    finished run; None to go on to choosing the checkpoint."""
    if cfg.overwrite and cfg.resume != "none":
        raise ConfigError(
            f"overwrite=true starts the run over, so it needs resume=none (got resume={cfg.resume}); "
            "drop overwrite to continue from a checkpoint"
        )
    if cfg.resume == "auto" and (summary := finished_summary(run_dir, cfg)) is not None:
        return Decision(finished=summary)
    return None


def decide_after_resume(cfg: FtdistConfig, run_dir: Path, resume_from: Path | None) -> Decision:
    """Given the checkpoint chosen (and verified), what this invocation does (rank 0, under the
    lock): resume, start in a fresh directory, move an old run aside, or refuse."""
    fresh = not any(p.name != LOCK_NAME for p in run_dir.iterdir())
    record = previous_record(run_dir)
    if resume_from is not None or not record:
        return Decision(resume_from=None if resume_from is None else str(resume_from), fresh=fresh)
    if cfg.overwrite:
        aside = move_aside(run_dir)
        note = f"overwrite=true: moved the previous run in {run_dir} to {aside} (delete it when no longer needed)"
        return Decision(notes=[note])
    held = ", ".join(record)
    if cfg.resume == "none":
        raise ConfigError(
            f"output_dir {run_dir} holds a previous run ({held}); resume=none would mix two runs there: "
            "use a new output_dir, or add overwrite=true to move the old one aside"
        )
    raise ConfigError(
        f"output_dir {run_dir} holds a previous run ({held}) and no checkpoint to resume from: use a new "
        "output_dir, or resume=none overwrite=true to start over (the old run is moved aside)"
    )


def move_aside(run_dir: Path) -> Path:
    """Move everything but the lock into a sibling `<name>.replaced-<time>`: a rename, instant on
    one filesystem, and an overwrite=true on the wrong output_dir destroys nothing."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            aside.mkdir()
            break
        except FileExistsError:
            continue
    for entry in run_dir.iterdir():
        if entry.name != LOCK_NAME:
            os.rename(entry, aside / entry.name)
    return aside


class RunDirClaim:
    """This invocation's hold on its run directory: the lock (rank 0) and the rerun decision
    (every rank). Build with `claim_run_dir`; `close` at the end of the run, whatever happened."""

    def __init__(self, run_dir: Path, is_main: bool, decision: Decision, holder: Holder | None):
        self.run_dir = run_dir
        self.is_main = is_main
        self.decision = decision
        self.holder = holder

    @property
    def resume_from(self) -> Path | None:
        return None if self.decision.resume_from is None else Path(self.decision.resume_from)

    @property
    def finished(self) -> dict | None:
        return self.decision.finished

    def log_notes(self) -> None:
        for note in self.decision.notes:
            log.warning("%s", note)

    def close(self, remove: bool = False) -> None:
        """Release the lock; with `remove`, first delete the directory if this invocation found it
        empty and trained nothing in it (a run that failed on bad input leaves nothing behind)."""
        if not self.is_main or self.holder is None:
            return
        if remove and self.decision.fresh and not previous_record(self.run_dir):
            close_file_logs(self.run_dir)
            shutil.rmtree(self.run_dir, ignore_errors=True)  # the lock with it: nothing left to take
        release_lock(self.run_dir, self.holder)
        self.holder = None


def claim_run_dir(cfg: FtdistConfig, strategy, run_dir: Path) -> RunDirClaim:
    """Rank 0 takes the lock and decides; every rank learns the decision, and all stop together
    (ConfigError) when the run must not start.

    Three phases, each ending in a broadcast: rank 0 locks and rules out what needs no
    checkpoint; every rank verifies its share of the checkpoint's files (at 70B, rank 0 alone
    would read a terabyte: about 0.7 s per GiB here); rank 0 decides with the result."""
    holder, early, notes = None, None, []
    if strategy.is_main:
        holder, early, notes = lock_and_check(cfg, run_dir)
    early = strategy.broadcast_object(early)
    if early is not None:
        if early.error is not None:
            raise ConfigError(early.error)
        return RunDirClaim(run_dir, strategy.is_main, early, None)
    decision = None
    try:
        # Raises the same ConfigError on every rank (the outcome of each check is shared).
        resume_from = resolve_resume(cfg.resume, run_dir, strategy)
        if strategy.is_main:
            decision = as_decision(lambda: decide_after_resume(cfg, run_dir, resume_from))
        decision = strategy.broadcast_object(decision)
        if decision.error is not None:
            raise ConfigError(decision.error)
    except BaseException:
        if holder is not None:
            release_lock(run_dir, holder)
        raise
    decision.notes[:0] = notes
    return RunDirClaim(run_dir, strategy.is_main, decision, holder)


def as_decision(decide_fn) -> Decision | None:
    """decide_fn()'s decision, or its ConfigError as a decision every rank can be told of."""
    try:
        return decide_fn()
    except ConfigError as e:
        return Decision(error=str(e))


def lock_and_check(cfg: FtdistConfig, run_dir: Path) -> tuple[Holder | None, Decision | None, list[str]]:
    """Rank 0: take the lock and rule out what needs no checkpoint. Returns (holder, None,
    notes) to go on; (None, a decision, notes) when the run stops here (the lock free again)."""
    me = Holder.me()
    try:
        took_over = acquire_lock(run_dir, me)
    except ConfigError as e:
        return None, Decision(error=str(e)), []
    notes = [took_over] if took_over else []
    try:
        early = as_decision(lambda: decide_before_resume(cfg, run_dir))
    except BaseException:
        release_lock(run_dir, me)
        raise
    if early is not None:  # refused, or a finished run: nothing will run, free the directory
        release_lock(run_dir, me)
        early.notes[:0] = notes
        return None, early, notes
    return me, None, notes


def close_file_logs(run_dir: Path) -> None:
    """Close log files inside `run_dir` before deleting it (an open file on NFS leaves a .nfs*
    entry behind, and a closed FileHandler would reopen it on the next record)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        name = getattr(handler, "baseFilename", None)
        if name is not None and Path(name).is_relative_to(run_dir.resolve()):
            root.removeHandler(handler)
            handler.close()


def remove_if_empty(run_dir: Path, fresh: bool) -> None:
    """The directory Hydra made for a run that failed before claiming it (or whose claim removed
    it already): removed when still empty. rmdir fails, and so keeps it, if another run has put
    anything in it meanwhile; each rank removes its own (ranks may have proposed other names)."""
    logging.shutdown()  # flushes train.log where the claim kept the directory
    if fresh:
        try:
            run_dir.rmdir()
        except OSError:
            pass
