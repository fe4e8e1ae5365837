"""Perplexity on reference text: how much general language a fine-tune forgot.

`eval.reference_data` is text the user trusts (any data source, one document per row in
`eval.reference_field`). Each document is tokenized as data.format=text tokenizes (BOS, text,
EOS) and cut into consecutive windows of data.max_seq_len tokens, so every token of a long
document counts once; a window's first token has no context and is not predicted. Perplexity is
token-weighted over the whole set: exp(sum of next-token NLL / number of predicted tokens),
summed over every rank's share, so it does not depend on batching or world size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ftdist.config import DataConfig, EvalConfig
from ftdist.data.formats import RowEncoder
from ftdist.data.loader import collate, eval_shard
from ftdist.data.prepare import Example
from ftdist.data.sources import BadRow, DataError, check_data_source, read_rows


@dataclass
class ReferenceText:
    windows: list[Example]  # every token labelled
    documents: int
    bad_rows: dict[str, int]  # kind -> count, rows skipped under data.on_bad_row=skip
    source: str

    @property
    def tokens(self) -> int:
        """Tokens predicted: every window's tokens but its first."""
        return sum(len(w.input_ids) - 1 for w in self.windows)


def reference_data_config(e: EvalConfig, data: DataConfig) -> DataConfig:
    """The run's data settings, reading eval.reference_data as plain text."""
    return dataclasses.replace(
        data, path=e.reference_data, validation_path=None, format="text", columns=None, template="plain",
        system_prompt=None,
        fields=dataclasses.replace(data.fields, text=e.reference_field),
    )


def check_reference_source(e: EvalConfig, data: DataConfig) -> None:
    """What can be told of eval.reference_data before anything loads (a missing file)."""
    if e.reference_data is None:
        return
    try:
        check_data_source(reference_data_config(e, data))
    except DataError as err:
        raise DataError(str(err).replace("data.path", "eval.reference_data", 1)) from None


def read_reference_text(e: EvalConfig, data: DataConfig, tokenizer, seed: int) -> ReferenceText:
    """The reference documents as windows; bad rows stop it (data.on_bad_row=error) or are
    counted (skip); DataError where nothing usable is left."""
    cfg = reference_data_config(e, data)
    check_reference_source(e, data)
    rows = read_rows(cfg.path, "train", 0, seed)[: e.reference_max_docs]
    encoder = RowEncoder(cfg, tokenizer)
    windows, bad, documents = [], {}, 0
    for row in rows:
        try:
            if row.problem is not None:
                raise row.problem
            ids = encoder.text(row.value).input_ids
        except BadRow as b:
            if data.on_bad_row == "error":
                raise DataError(f"eval.reference_data {row.location}: {b}; data.on_bad_row=skip counts and skips such rows") from None
            bad[b.kind] = bad.get(b.kind, 0) + 1
            continue
        documents += 1
        step = data.max_seq_len
        windows += [Example(ids[i : i + step], ids[i : i + step]) for i in range(0, len(ids), step) if len(ids[i : i + step]) > 1]
    if not windows:
        raise DataError(f"eval.reference_data={e.reference_data}: no document with text in field "
                        f"{e.reference_field!r} ({len(rows)} rows read, bad rows: {bad or 'none'})")
    return ReferenceText(windows, documents, bad, e.reference_data)


def perplexity(forward, text: ReferenceText, strategy, batch_size: int, pad_token_id: int) -> tuple[float, float, int]:
    """(perplexity, NLL sum, predicted tokens) of the model behind `forward` (micro-batch ->
    logits) over `text`, summed over ranks; a collective on every rank."""

    lengths = [len(w.input_ids) for w in text.windows]
    mine, padding = eval_shard(lengths, strategy.rank, strategy.world_size, batch_size, strategy.shards_parameters)
    nll, count = 0.0, 0
    for idx in mine:
        batch = collate([text.windows[i] for i in idx], pad_token_id).to(strategy.device)
        nll += -forward.token_logps(batch).sum().item()
        count += batch.num_label_tokens
    for _ in range(padding):  # sharded parameters: every rank runs as many forwards
        forward(collate([text.windows[0]], pad_token_id).to(strategy.device))
    nll, count = strategy.all_reduce_sum([nll, count])
    return math.exp(nll / count), nll, int(count)


def forgetting_figures(text: ReferenceText, base: float | None, tuned: float, max_forgetting: float | None) -> dict:
    """The report's forgetting block: both perplexities, the relative change, and the gate."""
    out = {"reference_data": text.source, "documents": text.documents, "windows": len(text.windows),
           "tokens": text.tokens, "bad_rows": text.bad_rows, "tuned_perplexity": tuned, "max_forgetting": max_forgetting}
    if base is not None:
        change = tuned / base - 1.0
        out.update(base_perplexity=base, relative_change=change,
                   exceeded=max_forgetting is not None and change > max_forgetting)
    return out
