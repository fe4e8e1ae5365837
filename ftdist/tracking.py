"""Where metrics go: metrics.jsonl (always, rank 0) and the log."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("ftdist")


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value


class MetricsWriter:
    """Appends one JSON object per line; flushed at once so a crash loses nothing logged."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
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

    def close(self) -> None:
        if self._file:
            self._file.close()
