"""`python -m ftdist.data COMMAND [options] [key=value ...]`: look at training data before training on it.

The overrides are those of `ftdist.train` (`+experiment=NAME`, `data.path=...`, `model=...`,
`objective=dpo`), composed and checked as training composes them, so the tool sees the rows,
tokenizer, template and `data.max_seq_len` the run will. No GPU, no process group.

    prepare                       build the tokenized cache (data.cache=true) as training would
    stats [--json P] [--png P] [--full-lengths]
                                  rows, examples, tokens, lengths, truncation, labels, pair lengths
    preview N [--split train|val] [--start K]
                                  N examples as the model sees them, tokens with a loss marked
    validate                      every row parsed and encoded; each bad row listed (file:line)
    clean [--near-threshold T] [--min-response-chars N] [--json P] [--limit K]
                                  exact and near duplicates, personal data, short responses

Exit codes: 0; 2 for bad input (an unknown key, a missing file, a bad row under validate), with
one line on stderr naming what and where; 1 for a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path

from ftdist.config import ConfigError, FtdistConfig
from ftdist.console import OneLineParser
from ftdist.data.sources import BadRow, DataError

TOOL = "ftdist.data"
PROG = "python -m ftdist.data"
COMMANDS = ("prepare", "stats", "preview", "validate", "clean")
# Where the loss is: ANSI green on a terminal, guillemets elsewhere (a file, a pipe, NO_COLOR).
ANSI_ON, ANSI_OFF = "\033[1;32m", "\033[0m"
PLAIN_ON, PLAIN_OFF = "\u00ab", "\u00bb"
HISTOGRAM_WIDTH = 50


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    if not argv:
        _usage(f"a command is needed: one of {', '.join(COMMANDS)}")
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _usage(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    parser = OneLineParser(tool=TOOL, prog=f"{PROG} {command}", description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", help="key=value overrides, as for ftdist.train"
                        + ("; and N, the examples to show" if command == "preview" else ""))
    if command == "stats":
        parser.add_argument("--json", help="write the figures to this JSON file")
        parser.add_argument("--png", help="write a length histogram to this PNG file")
        parser.add_argument("--bins", type=int, default=20, help="histogram bins (default 20)")
        parser.add_argument("--full-lengths", action="store_true",
                            help="also encode every row untruncated: lengths before data.max_seq_len cuts them")
    elif command == "preview":
        parser.add_argument("--split", choices=("train", "val"), default="train")
        parser.add_argument("--start", type=int, default=0, help="index of the first example shown (default 0)")
        parser.add_argument("--markers", choices=("auto", "ansi", "plain"), default="auto",
                            help="how tokens with a loss are marked (auto: ANSI colour on a terminal)")
    elif command == "clean":
        from ftdist.data.clean import MIN_RESPONSE_CHARS, NEAR_THRESHOLD

        parser.add_argument("--near-threshold", type=float, default=NEAR_THRESHOLD,
                            help=f"estimated Jaccard similarity from which rows are near-duplicates ({NEAR_THRESHOLD})")
        parser.add_argument("--min-response-chars", type=int, default=MIN_RESPONSE_CHARS,
                            help=f"responses shorter than this are reported ({MIN_RESPONSE_CHARS}: empty ones)")
        parser.add_argument("--json", help="write every finding to this JSON file")
        parser.add_argument("--limit", type=int, default=10, help="locations listed per finding kind (default 10)")
    args = parser.parse_intermixed_args(rest)
    args.command = command
    overrides = [w for w in args.words if "=" in w or w.startswith("~")]  # ~key: Hydra's deletion
    args.overrides = overrides
    loose = [w for w in args.words if w not in overrides]
    if command == "preview":
        if len(loose) != 1 or not loose[0].isdigit() or int(loose[0]) < 1:
            parser.error(f"preview takes one count N >= 1 of examples to show, got {loose or 'none'}")
        args.n = int(loose[0])
    elif loose:
        parser.error(f"{loose[0]!r} is not a key=value override")
    if command == "clean" and not 0.0 < args.near_threshold <= 1.0:
        parser.error(f"--near-threshold must be in (0, 1], got {args.near_threshold}")
    if command == "stats" and args.bins < 1:
        parser.error(f"--bins must be >= 1, got {args.bins}")
    return args


def _usage(message: str) -> None:
    print(f"{TOOL}: usage: {message} ({PROG} --help)", file=sys.stderr)
    sys.exit(_exit_bad_input())


def _exit_bad_input() -> int:
    from ftdist.constants import EXIT_BAD_INPUT

    return EXIT_BAD_INPUT


def load_run_config(overrides: list[str]) -> FtdistConfig:
    """The training config of `overrides`, checked as ftdist.train checks it (no run directory)."""
    from ftdist.config import compose, load_config
    from ftdist.objectives import check_objective

    cfg = load_config(compose([*overrides, "output_dir=/nonexistent/ftdist-data"]))
    check_objective(cfg)
    return cfg


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    logging.getLogger("ftdist").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    tty = sys.stdout.isatty()
    try:
        # Library output while loading (a tiny model's first build) goes to stderr: stdout holds the answer.
        with contextlib.redirect_stdout(sys.stderr):
            setup_logging()
            cfg = load_run_config(args.overrides)
            from ftdist.data.sources import check_data_source

            check_data_source(cfg.data)
            text, failure = COMMAND_FUNCTIONS[args.command](cfg, args, tty)
    except (ConfigError, DataError) as e:
        _say(f"ftdist: {type(e).__name__}: {e}")
        return _exit_bad_input()
    if text:
        print(text, flush=True)
    if failure is not None:  # what was found is on stdout; why the exit code is 2, on stderr
        _say(f"ftdist: DataError: {failure}")
        return _exit_bad_input()
    return 0


def _say(line: str) -> None:
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (line + "\n").encode())


def cli() -> None:
    sys.exit(main())


# --- data as training prepares it -------------------------------------------------------------


def load_tokenizer(cfg: FtdistConfig):
    from ftdist.console import pin_deepspeed_accelerator
    from ftdist.data.chat import use_chat_template_file
    from ftdist.model.loading import load_tokenizer as load

    pin_deepspeed_accelerator()  # before a tiny model's first build imports DeepSpeed through transformers
    return use_chat_template_file(load(cfg.model), cfg.data.chat_template)


def prepare(cfg: FtdistConfig, tokenizer) -> tuple:
    """(train, val, report) exactly as ftdist.train gets them: the objective prepares its data
    (the same labels, margin field and tokenizer settings, so the same cache entry)."""
    from ftdist.objectives import build_objective

    return build_objective(cfg, tokenizer).prepare_data(tokenizer)


def cmd_prepare(cfg: FtdistConfig, args, tty: bool) -> tuple[str, str | None]:
    from ftdist.data.cache import cache_root

    root = cache_root(cfg.data)
    before = set(os.listdir(root)) if root.is_dir() else set()
    train, _val, report = prepare(cfg, load_tokenizer(cfg))
    entry = getattr(train, "directory", None)
    if entry is None:
        where = "data.cache=false: prepared in memory, nothing written"
    else:
        where = f"cache {'reused' if entry.name in before else 'built'}: {entry}"
    return "\n".join([where, *report_lines(report)]), None


def report_lines(report) -> list[str]:
    lines = []
    for split, prefix in (("train", ""), ("validation", "val_")):
        short = "train" if not prefix else "val"
        bad = getattr(report, f"{prefix}bad_rows")
        lines.append(
            f"{split}: {getattr(report, f'{short}_rows')} rows -> {getattr(report, f'{short}_examples')} examples, "
            f"{getattr(report, f'{short}_tokens')} tokens ({getattr(report, f'{short}_label_tokens')} with a loss); "
            f"truncated {getattr(report, f'{prefix}truncated')}, dropped with no label left "
            f"{getattr(report, f'{prefix}dropped_no_labels')}, duplicates {getattr(report, f'{prefix}duplicates')}, "
            f"bad rows {sum(bad.values())}" + (f" {dict(bad)}" if bad else "")
        )
    lines.append(f"source: {report.source}; validation: {report.validation_source}; template: {report.template}")
    return lines


# --- stats ------------------------------------------------------------------------------------


def sequences(example) -> list:
    """The token sequences of one prepared example: one, or a pair's chosen and rejected."""
    if hasattr(example, "chosen"):
        return [example.chosen, example.rejected]
    return [example]


def trained_tokens(labels: list[int]) -> int:
    """Tokens that carry a loss: labels[0] never does (the trainer predicts position t+1 from t)."""
    from ftdist.constants import IGNORE_INDEX

    return len(labels) - 1 - list(labels[1:]).count(IGNORE_INDEX) if len(labels) else 0


def percentiles(values: list[int]) -> dict:
    """Nearest-rank percentiles (p90: the smallest length at least 90% of sequences do not exceed)."""
    import numpy as np

    if not values:
        return {"count": 0}
    a = np.asarray(values)
    out = {"count": len(values), "min": int(a.min()), "mean": round(float(a.mean()), 2)}
    for p in (50, 90, 99):
        out[f"p{p}"] = int(np.percentile(a, p, method="inverted_cdf"))
    out["max"] = int(a.max())
    return out


def histogram(values: list[int], bins: int) -> dict:
    """Counts of `values` in at most `bins` bins of equal integer width from 0 to the largest
    value: bin i holds edges[i] <= v < edges[i + 1]."""
    top = max(values, default=0)
    width = max(1, math.ceil((top + 1) / bins))
    n = math.ceil((top + 1) / width)
    counts = [0] * n
    for v in values:
        counts[v // width] += 1
    return {"edges": [i * width for i in range(n + 1)], "counts": counts}


def split_stats(examples, report, prefix: str, cfg: FtdistConfig, bins: int) -> tuple[dict, list[int]]:
    """One split's figures, and the length of each of its token sequences."""
    short = "val" if prefix else "train"
    lengths, labelled = [], 0
    for example in examples:
        if hasattr(example, "target"):  # a document to classify: no label tokens
            lengths.append(len(example.input_ids))
            continue
        for seq in sequences(example):
            lengths.append(len(seq.input_ids))
            labelled += trained_tokens(seq.labels)
    at_limit = sum(n >= cfg.data.max_seq_len for n in lengths)
    return {
        "rows": getattr(report, f"{short}_rows"),
        "examples": len(examples),
        "sequences": len(lengths),
        "tokens": sum(lengths),
        "label_tokens": labelled,
        "truncated": getattr(report, f"{prefix}truncated"),
        "dropped_no_labels": getattr(report, f"{prefix}dropped_no_labels"),
        "duplicates": getattr(report, f"{prefix}duplicates"),
        "bad_rows": dict(getattr(report, f"{prefix}bad_rows")),
        "at_max_seq_len": at_limit,
        "lengths": percentiles(lengths),
        "histogram": histogram(lengths, bins),
    }, lengths


def pair_stats(examples) -> dict | None:
    """Response tokens (those with a loss) of chosen against rejected, per pair: DPO learns a
    length preference where chosen answers are systematically longer."""
    import numpy as np

    chosen, rejected = [], []
    for pair in examples:
        if not hasattr(pair, "chosen"):
            return None
        chosen.append(trained_tokens(pair.chosen.labels))
        rejected.append(trained_tokens(pair.rejected.labels))
    if not chosen:
        return None
    ratio = np.asarray(chosen) / np.maximum(np.asarray(rejected), 1)
    return {"pairs": len(chosen), "chosen_response_tokens": percentiles(chosen),
            "rejected_response_tokens": percentiles(rejected),
            "length_ratio_median": round(float(np.median(ratio)), 4), "length_ratio_mean": round(float(ratio.mean()), 4),
            "chosen_longer": round(float(np.mean(np.asarray(chosen) > np.asarray(rejected))), 4)}


def compute_stats(cfg: FtdistConfig, train, val, report, bins: int) -> tuple[dict, dict[str, list[int]]]:
    """The figures `stats` prints and writes, and each split's sequence lengths (for the plot)."""
    splits = {"train": split_stats(train, report, "", cfg, bins), "val": split_stats(val, report, "val_", cfg, bins)}
    stats = {"source": report.source, "validation_source": report.validation_source, "format": cfg.data.format,
             "template": report.template, "max_seq_len": cfg.data.max_seq_len,
             "splits": {name: figures for name, (figures, _) in splits.items()}}
    if report.labels is not None:
        stats["labels"] = {"classes": list(report.labels), "train": dict(report.label_counts or {}),
                           "val": dict(report.val_label_counts or {})}
    pairs = pair_stats(train)
    if pairs is not None:
        stats["pairs"] = pairs
    return stats, {name: lengths for name, (_, lengths) in splits.items()}


def full_lengths(cfg: FtdistConfig, tokenizer) -> dict[str, list[int]]:
    """Each split's sequence lengths before truncation to data.max_seq_len (a document to classify
    is cut as it is encoded: its length is the prepared one)."""
    out: dict[str, list[int]] = {"train": [], "val": []}
    for split, _, encoded in encode_rows(cfg, tokenizer, dedupe=cfg.data.dedupe):
        if not isinstance(encoded, BadRow):
            out[split] += [len(seq.input_ids) for example in encoded.examples for seq in sequences(example)]
    return out


def add_full_lengths(stats: dict, full: dict[str, list[int]], bins: int) -> None:
    for name, lengths in full.items():
        s = stats["splits"][name]
        s["full_lengths"] = percentiles(lengths)
        s["full_histogram"] = histogram(lengths, bins)
        s["over_max_seq_len"] = sum(n > stats["max_seq_len"] for n in lengths)


def cmd_stats(cfg: FtdistConfig, args, tty: bool) -> tuple[str, str | None]:
    tokenizer = load_tokenizer(cfg)
    train, val, report = prepare(cfg, tokenizer)
    stats, lengths = compute_stats(cfg, train, val, report, args.bins)
    if args.full_lengths:
        lengths = full_lengths(cfg, tokenizer)
        add_full_lengths(stats, lengths, args.bins)
    if args.png:
        write_length_png(Path(args.png), lengths, cfg.data.max_seq_len, args.bins)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(stats, indent=2) + "\n")
    return "\n".join(stats_lines(stats)), None


def stats_lines(stats: dict) -> list[str]:
    lines = [(f"{stats['source']} (format {stats['format']}, template {stats['template']}, "
             f"data.max_seq_len {stats['max_seq_len']}); validation: {stats['validation_source']}")]
    for name, s in stats["splits"].items():
        if not s["rows"]:
            lines.append(f"{name}: no rows")
            continue
        bad = sum(s["bad_rows"].values())
        loss = "" if stats["format"] == "classification" else f", {s['label_tokens']} with a loss"
        lines.append(f"{name}: {s['rows']} rows -> {s['examples']} examples ({s['sequences']} sequences), "
                     f"{s['tokens']} tokens{loss}")
        lines.append(f"  data.max_seq_len={stats['max_seq_len']}: truncated {s['truncated']}, dropped with no label "
                     f"left {s['dropped_no_labels']}; duplicates dropped {s['duplicates']}; bad rows {bad}"
                     + (f" {s['bad_rows']}" if bad else ""))
        p = s["lengths"]
        if p["count"]:
            lines.append(f"  sequence length: p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, max {p['max']} "
                         f"(min {p['min']}, mean {p['mean']})")
        full = s.get("full_lengths")
        if full and full["count"]:
            lines.append(f"  before truncation: p50 {full['p50']}, p90 {full['p90']}, p99 {full['p99']}, max "
                         f"{full['max']}; {s['over_max_seq_len']} of {full['count']} sequences longer than "
                         f"data.max_seq_len")
            lines += ["  " + line for line in text_histogram(s["full_histogram"])]
        elif p["count"]:
            if s["truncated"] or s["dropped_no_labels"]:
                lines.append("  (lengths after truncation; --full-lengths shows them before it)")
            lines += ["  " + line for line in text_histogram(s["histogram"])]
    if "labels" in stats:
        lab = stats["labels"]
        total = sum(lab["train"].values()) or 1
        lines.append("labels (train): " + ", ".join(f"{c} {lab['train'].get(c, 0)} ({100 * lab['train'].get(c, 0) / total:.1f}%)"
                                                   for c in lab["classes"]))
        if sum(lab["val"].values()):
            lines.append("labels (val): " + ", ".join(f"{c} {lab['val'].get(c, 0)}" for c in lab["classes"]))
    if "pairs" in stats:
        pr = stats["pairs"]
        lines.append(f"pairs: response tokens chosen p50 {pr['chosen_response_tokens']['p50']} vs rejected p50 "
                     f"{pr['rejected_response_tokens']['p50']}; chosen/rejected length ratio median "
                     f"{pr['length_ratio_median']:.2f} (mean {pr['length_ratio_mean']:.2f}); chosen longer in "
                     f"{100 * pr['chosen_longer']:.1f}% of pairs")
    return lines


def text_histogram(hist: dict) -> list[str]:
    counts, edges = hist["counts"], hist["edges"]
    top = max(counts) or 1
    digits = len(str(edges[-1]))
    return [f"{edges[i]:>{digits}}-{edges[i + 1] - 1:<{digits}} | {'#' * math.ceil(HISTOGRAM_WIDTH * n / top):<{HISTOGRAM_WIDTH}} {n}"
            for i, n in enumerate(counts)]


def write_length_png(path: Path, lengths: dict[str, list[int]], max_seq_len: int, bins: int) -> None:
    from matplotlib.figure import Figure  # no pyplot: no backend state, no display needed

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    top = max((v for values in lengths.values() for v in values), default=1)
    for name, values in lengths.items():
        if values:
            ax.hist(values, bins=bins, range=(0, top), alpha=0.6, label=f"{name} ({len(values)})")
    ax.axvline(max_seq_len, color="black", linestyle="--", label=f"data.max_seq_len={max_seq_len}")
    ax.set_xlabel("tokens per sequence")
    ax.set_ylabel("sequences")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


# --- preview ----------------------------------------------------------------------------------


def marked_text(tokenizer, input_ids: list[int], labels: list[int], on: str, off: str) -> str:
    """The decoded sequence with each run of tokens that carry a loss between `on` and `off`."""
    from ftdist.constants import IGNORE_INDEX

    trained = [t > 0 and label != IGNORE_INDEX for t, label in enumerate(labels)]
    out, start = [], 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or trained[end] != trained[start]:
            text = tokenizer.decode(list(input_ids[start:end]), skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            out.append(f"{on}{text}{off}" if trained[start] else text)
            start = end
    return "".join(out)


def preview_lines(tokenizer, example, name: str, markers: tuple[str, str]) -> list[str]:
    if hasattr(example, "target"):
        text = tokenizer.decode(list(example.input_ids), skip_special_tokens=False)
        cut = ", truncated" if example.truncated else ""
        return [f"=== {name}: {len(example.input_ids)} tokens{cut}; label {example.label!r} (class {example.target}) ===",
                text]
    lines = []
    pair = hasattr(example, "chosen")
    if pair:
        lines.append(f"=== {name}: a pair ===")
    for side, seq in (("chosen", example.chosen), ("rejected", example.rejected)) if pair else ((None, example),):
        head = f"--- {side}: " if side else f"=== {name}: "
        lines.append(f"{head}{len(seq.input_ids)} tokens, {trained_tokens(seq.labels)} with a loss "
                     f"{'---' if side else '==='}")
        lines.append(marked_text(tokenizer, seq.input_ids, seq.labels, *markers))
    return lines


def cmd_preview(cfg: FtdistConfig, args, tty: bool) -> tuple[str, str | None]:
    tokenizer = load_tokenizer(cfg)
    train, val, _ = prepare(cfg, tokenizer)
    examples = train if args.split == "train" else val
    if not 0 <= args.start < len(examples):
        raise DataError(f"--start {args.start}: the {args.split} split has {len(examples)} examples "
                        f"(indices 0 to {len(examples) - 1})")
    ansi = args.markers == "ansi" or (args.markers == "auto" and tty and not os.environ.get("NO_COLOR"))
    markers = (ANSI_ON, ANSI_OFF) if ansi else (PLAIN_ON, PLAIN_OFF)
    shown = "in colour" if ansi else f"between {PLAIN_ON} and {PLAIN_OFF}"
    what = ("documents, each scored from its last token" if cfg.data.format == "classification"
            else f"examples; tokens with a loss are shown {shown}")
    lines = [f"{args.split}: {len(examples)} {what}"]
    for i in range(args.start, min(args.start + args.n, len(examples))):
        lines += preview_lines(tokenizer, examples[i], f"{args.split}[{i}]", markers)
    return "\n".join(lines), None


# --- validate ---------------------------------------------------------------------------------


def encode_rows(cfg: FtdistConfig, tokenizer, dedupe: bool = False):
    """(split, location, Encoded or the BadRow) of every row, encoded as prepare encodes it (the
    same rows, hold-out, classes and encoder) but not truncated, past any bad row; rows that
    data.dedupe drops are left out where `dedupe`."""
    from ftdist.data.encoding import plan_data

    data = dataclasses.replace(cfg.data, on_bad_row="skip", dedupe=dedupe, cache=False)
    plan = plan_data(data, tokenizer, cfg.seed, cfg.objective.labels, cfg.objective.margin)
    first = 0  # plan.duplicates numbers validation rows after the training rows
    for source, rows in plan.sources:
        for i, row in enumerate(rows):
            if first + i in plan.duplicates:
                continue
            split = "val" if source == "val_rows" or i in plan.held else "train"
            try:
                if row.problem is not None:
                    raise row.problem
                yield split, row.location, plan.encoder(row.value)
            except BadRow as bad:
                yield split, row.location, bad
            except DataError as e:
                raise DataError(f"{row.location}: {e}") from None
        first += len(rows)


def bad_rows(cfg: FtdistConfig, tokenizer) -> tuple[int, list[tuple[str, BadRow]]]:
    """(rows read, each bad row's location and problem): every row parsed and encoded, past the
    first bad one."""
    outcomes = list(encode_rows(cfg, tokenizer))
    return len(outcomes), [(where, out) for _, where, out in outcomes if isinstance(out, BadRow)]


def cmd_validate(cfg: FtdistConfig, args, tty: bool) -> tuple[str, str | None]:
    total, found = bad_rows(cfg, load_tokenizer(cfg))
    if not found:
        return f"validate: all {total} rows parse and encode (data.format={cfg.data.format})", None
    kinds: dict[str, int] = {}
    for _, bad in found:
        kinds[bad.kind] = kinds.get(bad.kind, 0) + 1
    where, bad = found[0]
    return "\n".join(f"{where}: {bad.kind}: {bad.detail}" for where, bad in found), (
        f"{len(found)} of {total} rows are bad ({', '.join(f'{k} {n}' for k, n in kinds.items())}); "
        f"first: {where}: {bad.kind}: {bad.detail}")


# --- clean ------------------------------------------------------------------------------------


def source_rows(cfg: FtdistConfig) -> tuple[list, int]:
    """The training rows then the validation file's rows (as prepare reads them), and how many
    of them are training rows."""
    from ftdist.data.sources import read_rows

    d = cfg.data
    rows = read_rows(d.path, d.split, d.num_synthetic_rows, cfg.seed, columns=d.columns)
    n = len(rows)
    if d.validation_path is not None:
        rows += read_rows(d.validation_path, d.split, d.num_synthetic_rows, cfg.seed, columns=d.columns)
    return rows, n


def cmd_clean(cfg: FtdistConfig, args, tty: bool) -> tuple[str, str | None]:
    from ftdist.data.clean import scan_rows

    rows, n_train = source_rows(cfg)
    report = scan_rows(rows, cfg.data, args.near_threshold, args.min_response_chars)
    if args.json:
        out = {"source": cfg.data.path, "validation_source": cfg.data.validation_path, "format": cfg.data.format,
               "train_rows": n_train, **report.to_dict()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return "\n".join(clean_lines(cfg, report, n_train, args.limit, args.json)), None


def clean_lines(cfg: FtdistConfig, report, n_train: int, limit: int, json_path: str | None) -> list[str]:
    c = report.counts()
    validation = f" + {report.rows - n_train} of {cfg.data.validation_path}" if cfg.data.validation_path else ""
    lines = [f"clean: {n_train} rows of {cfg.data.path}{validation} (data.format={cfg.data.format})"]

    def section(title: str, findings: list, rows: int, note: str = "") -> None:
        lines.append(f"{title}: {rows} row{'s' if rows != 1 else ''}{note}")
        for f in findings[:limit]:
            field = f" [{f.field}]" if f.field else ""
            kind = f"{f.kind} " if f.kind in ("email", "phone", "card", "ipv4") else ""
            lines.append(f"  {f.location}{field}: {kind}{f.detail}")
        if len(findings) > limit:
            more = "--json PATH lists them all" if json_path is None else f"{json_path} lists them all"
            lines.append(f"  ... and {len(findings) - limit} more ({more})")

    section("exact duplicates (same text, case and whitespace aside)", report.exact_duplicates, c["exact_duplicates"])
    section(f"near-duplicates (estimated Jaccard >= {report.near_threshold:g} of word 3-grams)", report.near_duplicates,
            c["near_duplicates"])
    kinds = ", ".join(f"{kind} {n}" for kind, n in c["pii_rows_by_kind"].items())
    section("personal data", report.pii, c["pii_rows"], f" ({kinds})")
    n = report.min_response_chars
    section("empty responses" if n <= 1 else f"short responses (under {n} characters)", report.short_responses,
            c["short_responses"])
    if report.unreadable:
        lines.append(f"rows not read as objects: {report.unreadable} (python -m ftdist.data validate lists them)")
    return lines


COMMAND_FUNCTIONS = {"prepare": cmd_prepare, "stats": cmd_stats, "preview": cmd_preview, "validate": cmd_validate,
                     "clean": cmd_clean}
