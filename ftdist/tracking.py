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
        self._file = open(run_dir / "metrics.jsonl", "a") if enabled else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
