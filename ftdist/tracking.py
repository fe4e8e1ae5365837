"""Where metrics go: metrics.jsonl (always, rank 0), the log, and optionally Weights & Biases."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from ftdist.config import ConfigError, FtdistConfig, TrackingConfig

log = logging.getLogger("ftdist")


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value


class WandbTracker:
    """One W&B run per invocation, written under the run directory (rank 0 only)."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, config: dict, default_name: str):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(f"tracking=wandb needs the wandb package (import wandb: {e}): pip install wandb") from None
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.run_name or default_name,
                group=cfg.group,
                tags=list(cfg.tags) or None,
                mode=cfg.mode,  # None: WANDB_MODE or wandb's default decides
                dir=str(run_dir),
                config=config,
            )
        except (wandb.errors.Error, ValueError, OSError) as e:  # login, network, a bad value, the dir
            where = f"tracking.project={cfg.project!r}, tracking.entity={cfg.entity!r}, dir {run_dir}"
            mode = cfg.mode or "unset (WANDB_MODE)"
            message = " ".join(str(e).split())
            raise ConfigError(f"tracking=wandb: wandb.init failed ({where}, tracking.mode={mode}): {message}") from None

    def log(self, record: dict) -> None:
        # W&B steps must not decrease: eval lines share their train step, which W&B merges.
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.run.log(values, step=int(record["step"]))

    def finish(self, summary: dict) -> None:
        for key, value in summary.items():
            if isinstance(value, (int, float, str)):
                self.run.summary[key] = value
        self.run.finish()
        self.run = None

    def abort(self) -> None:
        """End the W&B run of an invocation that failed before finishing it (no-op after finish)."""
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None


def start_wandb(cfg: FtdistConfig, strategy, run_dir: Path) -> WandbTracker | None:
    """The run's W&B tracker (rank 0; None elsewhere or without tracking=wandb).

    Started before the data and the model, so a login, project or mode problem costs seconds.
    Only rank 0 starts it; every rank learns whether that failed, and all stop together.
    """
    if cfg.tracking.backend != "wandb":
        return None
    tracker, error = None, None
    if strategy.is_main:
        try:
            tracker = WandbTracker(cfg.tracking, run_dir, dataclasses.asdict(cfg), f"{cfg.experiment_name}-{run_dir.name}")
        except ConfigError as e:
            error = str(e)
    error = strategy.broadcast_object(error)
    if error is not None:
        raise ConfigError(error)
    return tracker


def readable_lines(path: Path) -> list[str]:
    """The lines of a JSONL file that parse, warning (file:line) about each that does not.

    A run killed mid-write leaves a half-written last line; its resume drops it, and keeps
    every complete record.
    """
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: not a complete JSON line (a run stopped while writing it?); dropped: %.80r",
                        path, number, line)
            continue
        kept.append(line)
    return kept


class MetricsWriter:
    """Appends one JSON object per line; flushed at once so a crash loses nothing logged."""

    def __init__(self, run_dir: Path, enabled: bool, tracker: WandbTracker | None = None):
        self.enabled = enabled
        self.tracker = tracker if enabled else None
        self.path = run_dir / "metrics.jsonl"
        if enabled and self.path.is_file():
            self._drop_unreadable_lines()
        self._file = open(self.path, "a") if enabled else None  # noqa: SIM115 (open for the run)

    def _drop_unreadable_lines(self) -> None:
        text = self.path.read_text()
        kept = readable_lines(self.path)
        if len(kept) != len(text.splitlines()) or (text and not text.endswith("\n")):
            self.path.write_text("".join(line + "\n" for line in kept))

    def truncate_after(self, step: int) -> None:
        """Drop lines past `step`: a resumed run rewrites the steps its predecessor logged after
        the checkpoint, so each step appears once."""
        if not self.enabled:
            return
        self._file.close()
        kept = [line for line in readable_lines(self.path) if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")  # noqa: SIM115

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self, summary: dict | None = None) -> None:
        if self.tracker is not None:
            self.tracker.finish(summary or {})
            self.tracker = None
        if self._file:
            self._file.close()
