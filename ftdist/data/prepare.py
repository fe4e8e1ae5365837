"""From `data.*` config to tokenized train and validation examples, with a full account
(ftdist.data.encoding): from the memory-mapped cache (ftdist.data.cache) or in this process."""

from __future__ import annotations

from ftdist.config import DataConfig
from ftdist.data.cache import cached_data
from ftdist.data.encoding import DataReport, encode_chunk, finish_report, plan_data
from ftdist.data.formats import Example
from ftdist.data.sources import DataError, check_data_source

__all__ = ["DataError", "DataReport", "Example", "check_data_source", "prepare_data", "prepare_in_process"]


def prepare_data(cfg: DataConfig, tokenizer, seed: int, labels: list | None = None,
                 margin_field: str | None = None) -> tuple:
    """Train and validation examples and their DataReport, from the memory-mapped cache
    (data.cache=true: built on a miss, see ftdist.data.cache) or prepared in this process."""
    if cfg.cache:
        return cached_data(cfg, tokenizer, seed, labels, margin_field)
    return prepare_in_process(cfg, tokenizer, seed, labels, margin_field)


def prepare_in_process(cfg: DataConfig, tokenizer, seed: int, labels: list | None = None,
                       margin_field: str | None = None) -> tuple[list, list, DataReport]:
    """Read, format, truncate and split the data into Examples (Pairs for data.format=preference,
    Documents for classification); raises DataError on the first bad row (on_bad_row=error) or
    when a split that should have examples ends up with none.

    labels: classification's fixed label set (objective.labels), else the training split's;
    margin_field: the row field of a reward model's per-pair margin (objective.margin)."""
    plan = plan_data(cfg, tokenizer, seed, labels, margin_field)
    chunks = [encode_chunk(plan, source, 0, len(rows)) for source, rows in plan.sources]
    report = finish_report(plan, chunks)
    return [e for c in chunks for e in c.train], [e for c in chunks for e in c.val], report
