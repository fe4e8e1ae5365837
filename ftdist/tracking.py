"""Where metrics go: metrics.jsonl (always, rank 0), the log, and optionally Weights & Biases."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ftdist.config import ConfigError, TrackingConfig

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
            raise ConfigError("tracking=wandb needs the wandb package: pip install wandb") from e
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

    def log(self, record: dict) -> None:
        # W&B steps must not decrease: eval lines share their train step, which W&B merges.
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.run.log(values, step=int(record["step"]))

    def finish(self, summary: dict) -> None:
        for key, value in summary.items():
            if isinstance(value, (int, float, str)):
                self.run.summary[key] = value
        self.run.finish()


class MetricsWriter:
    """Appends one JSON object per line; flushed at once so a crash loses nothing logged."""

    def __init__(self, run_dir: Path, enabled: bool, tracker: WandbTracker | None = None):
        self.enabled = enabled
        self.tracker = tracker if enabled else None
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a") if enabled else None  # noqa: SIM115 (open for the run)

    def truncate_after(self, step: int) -> None:
        """Drop lines past `step`: a resumed run rewrites the steps its predecessor logged after
        the checkpoint, so each step appears once."""
        if not self.enabled:
            return
        self._file.close()
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
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
