"""Classification rows -> documents: a text and its class (data.format=classification).

A row has `data.fields.text` (a non-empty string) and `data.fields.label` (a string or an
integer; an integer label and its decimal string are the same class, as CSV and TSV files hold
every cell as text). The text is tokenized as the tokenizer does by default (its own special
tokens, bos for Llama) and truncated to data.max_seq_len as the tokenizer truncates, exactly as a
Hugging Face text-classification pipeline (truncation=True) tokenizes it, so the saved model
scores the same ids it was trained on.

The label set is fixed before any row is encoded: `objective.labels` in that order, or else the
sorted labels of the training split (numerically when every label is an integer). A row whose
label is outside the set (a validation row of a class training never saw) is a bad row of kind
`unknown_label`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ftdist.data.example import Document, Encoded
from ftdist.data.messages import row_field, type_name
from ftdist.data.sources import BadRow, DataError, Row


def label_name(value: Any, field: str) -> str:
    """A row's label as the name of its class; BadRow when it cannot be one."""
    if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
        raise BadRow("missing_label", f"field '{field}' has no label (got {value!r})")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return value.strip()
    raise BadRow("wrong_type", f"field '{field}' must be a string or an integer label, got {type_name(value)}")


def sort_labels(names: Iterable[str]) -> list[str]:
    """Label names in class order: numerically when all are integers ("2" before "10"), else as text."""
    names = sorted(set(names))
    if all(_is_integer(n) for n in names):
        return sorted(names, key=int)
    return names


def _is_integer(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


def label_set(train_rows: list[Row], fixed: list | None, field: str, where: str) -> list[str]:
    """The run's classes in order: `fixed` (objective.labels), else those of the training rows.
    Rows whose label cannot be read are left to the encoder, which reports them as bad rows."""
    if fixed is not None:
        return [label_name(v, "objective.labels") for v in fixed]
    names = set()
    for row in train_rows:
        if row.problem is None and isinstance(row.value, dict) and field in row.value:
            try:
                names.add(label_name(row.value[field], field))
            except BadRow:
                pass
    labels = sort_labels(names)
    if len(labels) < 2:
        raise DataError(f"{where}: the training split has {len(labels)} distinct label(s) in field '{field}' "
                        f"({labels}); a classifier needs at least two (or set objective.labels)")
    return labels


def encode_document(encoder, row: dict, label_index: dict[str, int]) -> Encoded:
    """`row` as one Document; `encoder` is the data.RowEncoder (its tokenizer and field names)."""
    fields = encoder.fields
    text = row_field(row, fields.text)
    if not isinstance(text, str):
        raise BadRow("wrong_type", f"field '{fields.text}' must be a string, got {type_name(text)}")
    if not text.strip():
        raise BadRow("empty_text", f"field '{fields.text}' is empty")
    name = label_name(row_field(row, fields.label), fields.label)
    if name not in label_index:
        shown = ", ".join(list(label_index)[:10]) + (", ..." if len(label_index) > 10 else "")
        raise BadRow("unknown_label", f"label {name!r} is not one of the run's {len(label_index)} classes ({shown})")
    ids = encoder.tok(text)["input_ids"]
    max_len = encoder.cfg.max_seq_len
    if len(ids) > max_len:
        # Cut as the tokenizer itself truncates (truncation=True): a tokenizer that ends every text
        # with a special token keeps it, so the saved model, whose tokenizer has model_max_length
        # = data.max_seq_len, is given exactly these ids by a pipeline.
        ids = encoder.tok(text, truncation=True, max_length=max_len)["input_ids"]
        return Encoded([Document(ids, name, label_index[name], truncated=True)])
    return Encoded([Document(ids, name, label_index[name])])
