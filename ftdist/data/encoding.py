"""From `data.*` config to tokenized train and validation examples, with a full account.

Every row read ends in exactly one place: examples of its split, a bad row of a named kind, or
`duplicates` (data.dedupe: the same text as an earlier row), or
`dropped_no_labels` (nothing left to learn after truncation: for a preference pair, either
response without a label, or both truncated to the same tokens). A chat row trained per turn gives
one example per assistant turn (`turn_examples` counts those beyond the first), each kept or
dropped on its own. `DataReport` holds those counts, so for each split
`rows + turn_examples == sum(bad_rows) + duplicates + dropped_no_labels + examples`.

The hold-out split is chosen over rows, by row index, from (number of rows, seed) alone: every
rank computes the same split, and changing the tokenizer or max_seq_len cannot move a row
between train and validation.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import asdict, dataclass, field

from ftdist.config import DataConfig
from ftdist.constants import IGNORE_INDEX
from ftdist.data.classification import label_set
from ftdist.data.example import Document
from ftdist.data.formats import Encoded, Example, RowEncoder
from ftdist.data.preference import Pair
from ftdist.data.sources import BadRow, DataError, Row, read_rows

log = logging.getLogger("ftdist.data.prepare")  # the name users and tests filter data warnings by


@dataclass
class DataReport:
    source: str
    validation_source: str  # the validation file, "holdout" or "none"
    template: str  # chat | plain | none (text format)
    rows_read: int = 0  # all rows read, both splits
    train_rows: int = 0
    val_rows: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)  # train split, kind -> count
    val_bad_rows: dict[str, int] = field(default_factory=dict)
    bad_row_examples: dict[str, str] = field(default_factory=dict)  # kind -> first "location: detail"
    duplicates: int = 0  # train rows data.dedupe dropped (the same text as an earlier row)
    val_duplicates: int = 0
    truncated: int = 0  # train examples cut to max_seq_len (kept when labels remain)
    val_truncated: int = 0
    dropped_no_labels: int = 0  # train examples with no label left after truncation
    val_dropped_no_labels: int = 0
    # Chat rows by how data.turns applied to them: whole | per_turn | last -> rows (train split).
    turns: dict[str, int] = field(default_factory=dict)
    val_turns: dict[str, int] = field(default_factory=dict)
    turn_examples: int = 0  # examples beyond one per row, made by per_turn
    val_turn_examples: int = 0
    # Trained assistant turns with reasoning, and those whose reasoning the template left out.
    reasoning_turns: int = 0
    reasoning_not_rendered: int = 0
    train_examples: int = 0
    val_examples: int = 0
    train_tokens: int = 0
    train_label_tokens: int = 0  # tokens that carry a loss (after the trainer's shift)
    val_tokens: int = 0
    val_label_tokens: int = 0
    # Classification: the classes in order (class i is labels[i]) and documents per class.
    labels: list[str] | None = None
    label_counts: dict[str, int] | None = None
    val_label_counts: dict[str, int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


_Dropped = object()  # an example that lost every label to truncation
_Duplicate = object()  # a row data.dedupe drops: the same text as an earlier row
# Per row: the BadRow it raised (skip mode), _Duplicate, or its encoding with each example
# truncated: (example, was_truncated) or _Dropped.
_Outcome = BadRow | object | tuple[Encoded, list]


@dataclass
class SplitCounts:
    """What one split's rows became; counts of consecutive chunks of rows add up."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    turn_examples: int = 0
    duplicates: int = 0
    reasoning_turns: int = 0
    reasoning_not_rendered: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    turns: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)

    def add(self, other: SplitCounts) -> None:
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                for key, n in theirs.items():
                    mine[key] = mine.get(key, 0) + n
            else:
                setattr(self, f.name, mine + theirs)


@dataclass
class DataPlan:
    """Everything decided before any row is encoded: the rows, the hold-out, the classes, the
    encoder and which rows repeat earlier ones. Any contiguous run of rows can then be encoded
    on its own (ftdist.data.cache gives runs to worker processes) with the result of encoding
    them all in one go."""

    cfg: DataConfig
    rows: list[Row]
    val_rows: list[Row] | None  # data.validation_path's rows; None: the hold-out comes from `rows`
    held: set[int]
    encoder: RowEncoder
    report: DataReport  # its identity fields; counts are filled by finish_report
    duplicates: set[int]  # indices into rows (then val_rows, numbered after them) that data.dedupe drops

    @property
    def sources(self) -> list[tuple[str, list[Row]]]:
        return [("rows", self.rows)] + ([("val_rows", self.val_rows)] if self.val_rows is not None else [])


@dataclass
class EncodedChunk:
    train: list
    val: list
    train_counts: SplitCounts
    val_counts: SplitCounts
    bad_row_examples: dict[str, str]  # kind -> first "location: detail" within the chunk


def plan_data(cfg: DataConfig, tokenizer, seed: int, labels: list | None = None,
              margin_field: str | None = None) -> DataPlan:
    if cfg.on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row={cfg.on_bad_row!r} is not one of error, skip")
    holdout = cfg.validation_path is None and cfg.val_fraction > 0
    rows = read_rows(cfg.path, cfg.split, cfg.num_synthetic_rows, seed, columns=cfg.columns)
    val_rows = None
    if cfg.validation_path is not None:
        val_rows = read_rows(cfg.validation_path, cfg.split, cfg.num_synthetic_rows, seed, columns=cfg.columns)
    held = set() if cfg.validation_path is not None else holdout_indices(
        len(rows), cfg.val_fraction if holdout else 0.0, cfg.max_val_examples, seed)
    classes = None
    if cfg.format == "classification":
        classes = label_set([r for i, r in enumerate(rows) if i not in held], labels, cfg.fields.label, cfg.path)
    encoder = RowEncoder(cfg, tokenizer, label_index=None if classes is None else {n: i for i, n in enumerate(classes)},
                         margin_field=margin_field)
    report = DataReport(
        source=cfg.path,
        validation_source=cfg.validation_path or ("holdout" if holdout else "none"),
        template=encoder.template_name,
        labels=classes,
    )
    duplicates: set[int] = set()
    if cfg.dedupe:
        from ftdist.data.clean import exact_duplicates

        duplicates = set(exact_duplicates([r.value for r in rows + (val_rows or [])], cfg))
    return DataPlan(cfg, rows, val_rows, held, encoder, report, duplicates)


def encode_chunk(plan: DataPlan, source: str, start: int, stop: int) -> EncodedChunk:
    """Rows [start, stop) of `source` ("rows" or "val_rows") encoded, truncated and counted."""
    rows = plan.rows if source == "rows" else plan.val_rows
    first = 0 if source == "rows" else len(plan.rows)  # val_rows are numbered after rows in plan.duplicates
    bad_examples: dict[str, str] = {}
    train_out, val_out = [], []
    for i in range(start, stop):
        if first + i in plan.duplicates:
            outcome = _Duplicate
        else:
            outcome = _encode_row(rows[i], plan.encoder, plan.cfg, bad_examples)
        (val_out if source == "val_rows" or i in plan.held else train_out).append(outcome)
    train, train_counts = _tally(train_out)
    val, val_counts = _tally(val_out)
    return EncodedChunk(train, val, train_counts, val_counts, bad_examples)


def finish_report(plan: DataPlan, chunks: list[EncodedChunk]) -> DataReport:
    """The report of the whole data from its chunks' counts, in row order; warns of what was lost
    and raises DataError when a split that should have examples has none."""
    report, train, val = plan.report, SplitCounts(), SplitCounts()
    for chunk in chunks:
        train.add(chunk.train_counts)
        val.add(chunk.val_counts)
        for kind, where in chunk.bad_row_examples.items():
            report.bad_row_examples.setdefault(kind, where)
    for prefix, counts in (("", train), ("val_", val)):
        split = "val" if prefix else "train"
        for name in ("rows", "examples", "tokens", "label_tokens"):
            setattr(report, f"{split}_{name}", getattr(counts, name))
        for name in ("truncated", "dropped_no_labels", "turn_examples", "duplicates", "bad_rows", "turns"):
            setattr(report, f"{prefix}{name}", getattr(counts, name))
        if report.labels is not None:  # every class listed, in class order, with its count (0 included)
            setattr(report, f"{prefix}label_counts", {n: counts.label_counts.get(n, 0) for n in report.labels})
    report.reasoning_turns, report.reasoning_not_rendered = train.reasoning_turns, train.reasoning_not_rendered
    report.rows_read = report.train_rows + report.val_rows
    if set(report.turns) - {"whole"}:  # said only where rows were split, not for every chat dataset
        log.info("chat rows by how data.turns=%s applied: %s (per_turn made %d examples more than rows)",
                 plan.cfg.turns, report.turns, report.turn_examples)
    if report.duplicates or report.val_duplicates:
        log.info("data.dedupe: dropped %d train and %d validation rows that repeat an earlier row",
                 report.duplicates, report.val_duplicates)
    _warn_losses(report, plan.cfg.max_seq_len)
    _check_not_empty(report, plan.cfg)
    return report


def holdout_indices(n: int, fraction: float, max_examples: int | None, seed: int) -> set[int]:
    """Row indices held out for validation: min(round(fraction * n), max_examples) of them.

    Rows capped away by max_examples stay in training rather than vanish unaccounted.
    """
    k = round(fraction * n)
    if max_examples is not None:
        k = min(k, max_examples)
    # A string seed hashes the same in every process (unlike hash()), so all ranks agree.
    return set(random.Random(f"ftdist-holdout:{seed}").sample(range(n), k))


def _encode_row(row: Row, encoder: RowEncoder, cfg: DataConfig, bad_examples: dict[str, str]) -> _Outcome:
    try:
        if row.problem is not None:
            raise row.problem
        encoded = encoder(row.value)
    except BadRow as bad:
        if cfg.on_bad_row == "error":
            raise DataError(f"{row.location}: {bad}; data.on_bad_row=skip drops and counts such rows") from None
        bad_examples.setdefault(bad.kind, f"{row.location}: {bad.detail}")
        return bad
    except DataError as e:
        raise DataError(f"{row.location}: {e}") from None
    return encoded, [_truncate(e, cfg.max_seq_len, cfg.responses == "optional") for e in encoded.examples]


def _truncate(example: Example | Pair, max_len: int, prompts_alone: bool = False):
    """Keep the head; an example left with nothing to learn is dropped (and counted). A pair's
    two sequences are cut apart, each to max_len."""
    if isinstance(example, Pair):
        chosen, rejected = _truncate(example.chosen, max_len), _truncate(example.rejected, max_len)
        if chosen is _Dropped or rejected is _Dropped or chosen[0].input_ids == rejected[0].input_ids:
            return _Dropped
        return dataclasses.replace(example, chosen=chosen[0], rejected=rejected[0]), chosen[1] or rejected[1]
    if isinstance(example, Document):  # cut by the tokenizer as it encoded (classification.py); never dropped
        return example, example.truncated
    truncated = len(example.input_ids) > max_len
    if truncated:
        example = Example(example.input_ids[:max_len], example.labels[:max_len], example.prompt_ids, example.reference)
    # labels[0] is never a target (the trainer predicts position t+1 from t), so it does not count.
    # A prompt alone (data.responses=optional: prompt ids, no reference) has none by design.
    prompt_alone = prompts_alone and example.prompt_ids is not None and example.reference is None
    if not prompt_alone and all(label == IGNORE_INDEX for label in example.labels[1:]):
        return _Dropped
    return (example, truncated)


def _tally(outcomes: list[_Outcome]) -> tuple[list, SplitCounts]:
    examples: list = []
    counts = SplitCounts(rows=len(outcomes))
    for outcome in outcomes:
        if outcome is _Duplicate:
            counts.duplicates += 1
            continue
        if isinstance(outcome, BadRow):
            counts.bad_rows[outcome.kind] = counts.bad_rows.get(outcome.kind, 0) + 1
            continue
        encoded, kept = outcome
        counts.turn_examples += len(kept) - 1
        if encoded.turns is not None:
            counts.turns[encoded.turns] = counts.turns.get(encoded.turns, 0) + 1
        counts.reasoning_turns += encoded.reasoning_turns
        counts.reasoning_not_rendered += encoded.reasoning_not_rendered
        for result in kept:
            if result is _Dropped:
                counts.dropped_no_labels += 1
                continue
            example, truncated = result
            examples.append(example)
            counts.truncated += truncated
            if isinstance(example, Document):
                counts.tokens += len(example.input_ids)
                counts.label_counts[example.label] = counts.label_counts.get(example.label, 0) + 1
                continue
            for sequence in (example.chosen, example.rejected) if isinstance(example, Pair) else (example,):
                counts.tokens += len(sequence.input_ids)
                # labels[0] is never a target: the trainer predicts position t+1 from t
                counts.label_tokens += len(sequence.labels) - 1 - sequence.labels[1:].count(IGNORE_INDEX)
    counts.examples = len(examples)
    return examples, counts


def _warn_losses(report: DataReport, max_seq_len: int) -> None:
    """Warn of what the data lost: reasoning a template does not render, bad rows, truncated examples."""
    unseen = [name for name, n in (report.label_counts or {}).items() if n == 0]
    if unseen:
        log.warning("classes with no training document: %s (objective.labels lists them; the model never sees "
                    "an example of them)", ", ".join(unseen))
    if report.reasoning_not_rendered:
        log.warning(
            "the chat template left out the reasoning of %d of %d trained assistant turns that have some "
            "(it does not render reasoning_content or <think> blocks): those turns train on their answers only",
            report.reasoning_not_rendered, report.reasoning_turns,
        )
    for name, counts in (("train", report.bad_rows), ("validation", report.val_bad_rows)):
        if counts:
            log.warning(
                "skipped %d bad %s rows (data.on_bad_row=skip): %s; first of each kind: %s",
                sum(counts.values()), name, counts, report.bad_row_examples,
            )
    for name, dropped, rows in (
        ("train", report.dropped_no_labels, report.train_rows),
        ("validation", report.val_dropped_no_labels, report.val_rows),
    ):
        if dropped:
            log.warning(
                "dropped %d of %d %s examples (%.0f%%) with no label left after truncation to "
                "data.max_seq_len=%d; raise data.max_seq_len to keep them",
                dropped, rows, name, 100 * dropped / max(rows, 1), max_seq_len,
            )


def _check_not_empty(report: DataReport, cfg: DataConfig) -> None:
    def why(prefix: str) -> str:
        bad = report.val_bad_rows if prefix else report.bad_rows
        return (f"bad rows: {bad or 'none'}, dropped_no_labels: {getattr(report, prefix + 'dropped_no_labels')} "
                f"(data.max_seq_len={cfg.max_seq_len})")

    if report.train_examples == 0:
        raise DataError(f"{cfg.path}: no training examples remain out of {report.train_rows} rows; {why('')}")
    if cfg.validation_path is not None and report.val_examples == 0:
        raise DataError(
            f"{cfg.validation_path}: no validation examples remain out of {report.val_rows} rows; {why('val_')}"
        )
