"""Score texts with a trained classifier or reward model, batched, on CPU or one GPU.

    python -m ftdist.score MODEL --file rows.jsonl [--out predictions.jsonl] [--batch-size 32]

MODEL is a run directory (its final/), a run's final/, or an export (`ftdist.export`, merged or
not). Each input row gives one JSON line out, in order:
- a classifier: rows with `text` (--text-field) -> {"label": NAME, "probabilities": {NAME: p, ...}};
- a reward model: rows with `prompt` and `response` (--prompt-field, --response-field), rendered as
  training rendered a pair's sequence (chat template or plain template) -> {"score": r}.
A row's input fields are copied into its output line unless --no-echo.

A PEFT run is scored as it trained: base + adapter (a QLoRA base in 4-bit NF4), from the run's
config.yaml when MODEL is in a run directory; a standalone adapter directory needs its head.json.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from ftdist.config import ConfigError
from ftdist.console import OneLineParser
from ftdist.constants import EXIT_BAD_INPUT
from ftdist.model.heads import HeadOutput

log = logging.getLogger("ftdist")


class Scorer:
    """A loaded classifier or reward model with the tokenization its training used."""

    def __init__(self, model, tokenizer, encode_row, reward: bool, device: torch.device):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.encode_row = encode_row  # row -> token ids (raises BadRow / DataError)
        self.reward = reward
        self.device = device
        config = model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]

    @torch.no_grad()
    def score_ids(self, batch: list[list[int]]) -> list[dict]:
        """One result per sequence; right-padded, each read at its own last token."""
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(batch):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        head = HeadOutput(self.model)
        try:
            self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            full = head.take()
        finally:
            head.remove()
        last = mask.sum(dim=1) - 1
        scores = full[torch.arange(len(batch)), last.to(self.device)].float().cpu()
        if self.reward:
            return [{"score": float(s[0])} for s in scores]
        probs = torch.softmax(scores, dim=-1)
        return [{"label": self.labels[int(p.argmax())], "probabilities": dict(zip(self.labels, p.tolist(), strict=True))}
                for p in probs]


def load_scorer(model_dir: Path, args) -> Scorer:
    from ftdist.export import is_final, read_run_config

    source = model_dir / "final" if (model_dir / "final").is_dir() and (model_dir / "config.yaml").is_file() else model_dir
    if not source.is_dir():
        raise ConfigError(f"{model_dir}: not a directory (a run directory, its final/, or an export)")
    run_cfg = read_run_config(source.parent) if is_final(source) and (source.parent / "config.yaml").is_file() else None
    device = torch.device(args.device)
    if (source / "adapter_config.json").is_file():
        model, tokenizer = _load_adapter(source, run_cfg)
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (source / "config.json").is_file():
            raise ConfigError(f"{source}: no config.json or adapter_config.json: not a model directory")
        check_classifier(source)
        model = AutoModelForSequenceClassification.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    kind = getattr(model.config, "ftdist_objective", None) or ("reward" if model.config.num_labels == 1 else "classification")
    encode = _row_encoder(kind, tokenizer, run_cfg, args)
    return Scorer(model, tokenizer, encode, kind == "reward", device)


def load_reward_model(path: Path, device: torch.device):
    """ftdist.score's Scorer for a reward model (not a classifier), on `device`, in eval mode."""
    # The fields load_scorer reads: rows are {"prompt": ..., "response": ...}, as `python -m ftdist.score` takes.
    args = SimpleNamespace(device=device, text_field="text", prompt_field="prompt", response_field="response")
    scorer = load_scorer(path, args)
    if not scorer.reward:
        raise ConfigError(f"{path}: a classifier (labels {', '.join(scorer.labels)}), not a reward model (train one "
                          "with objective=reward)")
    return scorer


def check_classifier(source: Path) -> None:
    """A sequence classifier's directory, not a language model's: transformers would give a
    language model a new, untrained head and score with it, silently."""
    try:
        config = json.loads((source / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{source}/config.json: cannot read it: {e}") from None
    architectures = config.get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ConfigError(f"{source}: a {', '.join(architectures) or 'model'} without a scoring head, not a classifier "
                          "or reward model (train one with objective=classification or objective=reward)")


def _load_adapter(source: Path, run_cfg):
    if run_cfg is not None:  # as trained: the run's base, quantized as it was, and its adapter
        from ftdist.export import base_and_tokenizer, run_head, trained_peft_model

        model_path, tokenizer = base_and_tokenizer(run_cfg)
        head = run_head(source.parent, run_cfg, tokenizer.pad_token_id)
        if head is None:
            raise ConfigError(f"{source}: a {run_cfg.objective.name} run's adapter, not a classifier or reward model")
        return trained_peft_model(run_cfg, source, model_path, head), tokenizer
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from ftdist.model.heads import ScoreHead

    head = ScoreHead.read(source)
    if head is None:
        raise ConfigError(f"{source}: a PEFT adapter without head.json: not a classifier or reward model ftdist "
                          "trained (export it with --merge, or score its run directory)")
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        source, num_labels=head.num_labels, id2label=dict(enumerate(head.labels)),
        label2id={n: i for i, n in enumerate(head.labels)})
    model.config.ftdist_objective = head.objective
    return model, AutoTokenizer.from_pretrained(source)


def _row_encoder(kind: str, tokenizer, run_cfg, args):
    """row -> token ids, as the model's training tokenized its inputs."""
    from dataclasses import replace

    from ftdist.config import DataConfig, DataFields
    from ftdist.data.formats import RowEncoder
    from ftdist.data.messages import row_field
    from ftdist.data.sources import BadRow

    if kind != "reward":
        def encode_text(row: dict) -> list[int]:
            text = row_field(row, args.text_field)
            if not isinstance(text, str) or not text.strip():
                raise BadRow("empty_text", f"field '{args.text_field}' must be a non-empty string")
            # model_max_length is the run's data.max_seq_len in a final/ ftdist saved: cut as training did.
            return tokenizer(text, truncation=True)["input_ids"]

        return encode_text
    from ftdist.data.preference import encode_scored

    # The run's rendering (template, system prompt, chat template file) where the run is at hand,
    # else the default: the tokenizer's chat template where it has one.
    data = DataConfig(path="-", max_seq_len=1, format="preference") if run_cfg is None else run_cfg.data
    fields = DataFields(prompt=args.prompt_field, chosen=args.response_field, rejected=args.response_field,
                        input=data.fields.input, tools=data.fields.tools)
    encoder = RowEncoder(replace(data, format="preference", fields=fields), tokenizer)
    return lambda row: encode_scored(encoder, row, args.response_field)[:tokenizer.model_max_length]


def score_file(scorer: Scorer, rows_path: Path, out, batch_size: int, echo: bool) -> int:
    """Score every row of a JSON-lines file into `out`; returns the number scored. A bad row stops
    with its file:line."""
    from ftdist.data.sources import BadRow, DataError, read_rows

    rows = read_rows(str(rows_path))
    count = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = []
        for row in chunk:
            try:
                if row.problem is not None:
                    raise row.problem
                if not isinstance(row.value, dict):
                    raise BadRow("not_an_object", "row is not a JSON object")
                ids.append(scorer.encode_row(row.value))
            except (BadRow, DataError) as e:
                raise DataError(f"{row.location}: {e}") from None
        for row, result in zip(chunk, scorer.score_ids(ids), strict=True):
            out.write(json.dumps({**(row.value if echo else {}), **result}) + "\n")
            count += 1
    return count


def parse_args(argv):
    parser = OneLineParser(tool="ftdist.score", prog="python -m ftdist.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a run directory, a run's final/, or an export")
    parser.add_argument("--file", type=Path, required=True, help="JSON lines to score (.jsonl, .json, .csv, .tsv, .parquet)")
    parser.add_argument("--out", type=Path, help="where to write the JSON lines (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--text-field", default="text", help="classifiers: the field holding the text")
    parser.add_argument("--prompt-field", default="prompt", help="reward models: the field holding the prompt")
    parser.add_argument("--response-field", default="response", help="reward models: the field holding the response")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-echo", dest="echo", action="store_false", help="write only the predictions")
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        parser.error(f"--batch-size must be positive (got {args.batch_size})")
    return args


def main(argv: list[str] | None = None) -> int:
    from ftdist.console import quiet_library_hints
    from ftdist.data.sources import DataError

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_library_hints()
    try:
        if not args.file.is_file():
            raise DataError(f"--file {args.file}: no such file")
        scorer = load_scorer(args.model, args)
        if args.out is None:
            count = score_file(scorer, args.file, sys.stdout, args.batch_size, args.echo)
        else:
            partial = args.out.with_name(args.out.name + ".partial")
            with open(partial, "w") as out:
                count = score_file(scorer, args.file, out, args.batch_size, args.echo)
            partial.rename(args.out)
    except (ConfigError, DataError) as e:
        print(f"ftdist.score: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"ftdist.score: scored {count} rows" + (f" into {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
