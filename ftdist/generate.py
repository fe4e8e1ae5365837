"""Generate responses from a trained model, batched, for quick checks after training.

    python -m ftdist.generate MODEL_OR_RUN (--prompt TEXT ... | --file prompts.jsonl) [--merge] [--out FILE]

MODEL_OR_RUN is a run directory (its final/, else its newest complete checkpoint, as
`ftdist.export` resolves it), a run's final/ or checkpoint, an export, or any Hugging Face model
directory. A PEFT run generates as it trained: base (4-bit NF4 for QLoRA) + adapter, or with
--merge the adapter merged into the base (checked against base + adapter, as ftdist.export does).

Prompts are encoded as the run's data format encodes them (its chat template with the generation
prompt, or its plain template), so the response to a validation row is the one the run's own
generation eval produced; a model without a run renders a prompt with its tokenizer's chat
template where it has one, else uses the raw text. --file rows are {"prompt": TEXT} or rows in
the run's data format (instruction/input, messages, preference prompt); a row's own response (a
last assistant message) is left out of its prompt. One JSON line per prompt, in order:
{"index", "prompt" (the rendered prompt, decoded), "response"}. Greedy unless --sample; for a
run, --max-new-tokens and --batch-size default to its eval.generation settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import torch

from ftdist.config import ConfigError, DataConfig, GenerationEvalConfig
from ftdist.console import OneLineParser
from ftdist.constants import EXIT_BAD_INPUT, EXIT_MERGE_MISMATCH
from ftdist.data.messages import type_name
from ftdist.data.sources import BadRow, DataError

log = logging.getLogger("ftdist")

# The response slot of a row encoded for its prompt alone. Every format's prompt ids stop before
# the response (plain template: tokenized apart; chat: the conversation before the assistant
# turn, with the generation prompt), so this text never reaches the model.
PLACEHOLDER = "x"


# --- loading -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """What generates and how its prompts are encoded; the model itself loads last, once the
    prompts have been read and encoded (a bad row fails before a large model loads)."""

    tokenizer: object
    data: DataConfig | None  # the run's data settings; None for a model without a run
    gen: GenerationEvalConfig  # the run's eval.generation (the defaults without a run)
    load_model: Callable[[], torch.nn.Module]


def find_target(path: Path, merge_adapter: bool) -> Target:
    """The model at `path`: a run, its final/ or a checkpoint, an export, a Hugging Face model."""
    from ftdist.export import is_final, read_run_config, resolve_source

    source = resolve_source(path)
    checkpoint = (source / "model_optimizer").is_dir()
    run_dir = source.parent.parent if checkpoint else source.parent
    if checkpoint or (is_final(source) and (run_dir / "config.yaml").is_file()):
        return _run_target(read_run_config(run_dir), run_dir, source, checkpoint, merge_adapter)
    return _plain_target(source, merge_adapter)


def _run_target(cfg, run_dir: Path, source: Path, checkpoint: bool, merge_adapter: bool) -> Target:
    from ftdist.data.chat import CHAT_TEMPLATE_FILE
    from ftdist.export import base_and_tokenizer, check_final
    from ftdist.objectives import scores_sequences

    if scores_sequences(cfg.objective.name):
        raise ConfigError(f"{source}: a {cfg.objective.name} run's model scores texts, it does not generate "
                          "(use python -m ftdist.score)")
    if (run_dir / CHAT_TEMPLATE_FILE).is_file():  # the run's copy, as ftdist.export reads it
        cfg.data.chat_template = str(run_dir / CHAT_TEMPLATE_FILE)
    if not checkpoint:
        check_final(source, cfg)
    model_path, tokenizer = base_and_tokenizer(cfg)
    if cfg.peft.method == "none":
        load_model = lambda: _full_model(cfg, model_path, source, checkpoint)  # noqa: E731
    else:
        load_model = lambda: _peft_model(cfg, model_path, source, checkpoint, merge_adapter)  # noqa: E731
    return Target(tokenizer, cfg.data, cfg.eval.generation, load_model)


def _full_model(cfg, model_path: str, source: Path, checkpoint: bool):
    from transformers import AutoModelForCausalLM

    from ftdist.constants import DTYPES
    from ftdist.export import full_model_names, load_base, read_model_state

    if not checkpoint:
        return AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[cfg.model.dtype])
    # The base's weights, every one then replaced by the checkpoint's (tied copies re-tie).
    model = load_base(cfg, model_path)
    state = read_model_state(source / "model_optimizer", full_model_names(model))
    model.load_state_dict(state, strict=False)
    return model


def _peft_model(cfg, model_path: str, source: Path, checkpoint: bool, merge_adapter: bool):
    from ftdist.export import (
        adapter_names,
        adapter_skeleton,
        attach_adapter,
        load_base,
        merge,
        read_final_adapter,
        read_model_state,
    )

    skeleton = adapter_skeleton(cfg, model_path, None)
    if checkpoint:
        adapter = read_model_state(source / "model_optimizer", adapter_names(skeleton))
    else:
        adapter = read_final_adapter(source, skeleton)
    if not merge_adapter:
        return attach_adapter(load_base(cfg, model_path), cfg, adapter)
    # merge() prints its check on stdout, which carries the JSON lines here.
    with contextlib.redirect_stdout(sys.stderr):
        return merge(cfg, model_path, adapter, torch.float32)


def _plain_target(source: Path, merge_adapter: bool) -> Target:
    """A model without its run: an export, a standalone adapter, any Hugging Face model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (source / "head.json").is_file():
        raise ConfigError(f"{source}: a classifier or reward model's adapter (head.json): use python -m ftdist.score")
    adapter = (source / "adapter_config.json").is_file()
    if not adapter and not (source / "config.json").is_file():
        raise ConfigError(f"{source}: no config.json or adapter_config.json: not a model directory")
    if not adapter and _is_classifier(source):
        raise ConfigError(f"{source}: a classifier or reward model scores texts, it does not generate "
                          "(use python -m ftdist.score)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:  # padding is masked out: any id does (as load_tokenizer)
        tokenizer.pad_token = tokenizer.eos_token

    def load_model():
        if not adapter:
            return AutoModelForCausalLM.from_pretrained(source)
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(source)
        return model.merge_and_unload() if merge_adapter else model

    data = DataConfig(path="-", max_seq_len=1, format="chat") if tokenizer.chat_template else None
    return Target(tokenizer, data, GenerationEvalConfig(), load_model)


def _is_classifier(source: Path) -> bool:
    try:
        architectures = json.loads((source / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{source}/config.json: cannot read it: {e}") from None
    return any(name.endswith("ForSequenceClassification") for name in architectures)


# --- prompts -----------------------------------------------------------------------------------


def prompt_encoder(data: DataConfig | None, tokenizer):
    """row -> prompt token ids, as the run's data format builds an Example's prompt_ids (raises
    BadRow or DataError)."""
    from ftdist.data.formats import RowEncoder

    if data is None or data.format == "text":  # continue the raw text
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        field = "prompt" if data is None else data.fields.text
        return lambda row: bos + tokenizer(_string(row, field), add_special_tokens=False)["input_ids"]
    if data.format == "preference":
        return _preference_prompt(RowEncoder(data, tokenizer))
    # Rows are encoded with every token labelled: that skips locating the response's tokens,
    # which a prompt alone does not need; prompt_ids are the same rendering either way.
    encoder = RowEncoder(dataclasses.replace(data, train_on_prompt=True), tokenizer)
    fields = data.fields
    if data.format == "chat":
        def chat(row: dict) -> list[int]:
            messages = _messages(row, fields.messages) + [{"role": "assistant", "content": PLACEHOLDER}]
            one = {fields.messages: messages}
            if fields.tools:
                one[fields.tools] = row.get(fields.tools)
            return encoder(one).examples[-1].prompt_ids
        return chat

    def instruction(row: dict) -> list[int]:
        one = {fields.prompt: _string(row, fields.prompt), fields.response: PLACEHOLDER}
        if fields.input:
            one[fields.input] = row.get(fields.input)
        return encoder(one).examples[-1].prompt_ids
    return instruction


def _preference_prompt(encoder):
    from ftdist.data.preference import encode_responses

    fields = encoder.fields

    def preference(row: dict) -> list[int]:
        prompt = row.get(fields.prompt, row.get("prompt"))
        one = {**row, fields.prompt: prompt, "_response": PLACEHOLDER}
        return encode_responses(encoder, one, ["_response"])[0]
    return preference


def _string(row: dict, field: str) -> str:
    """The prompt text: the run's field, else "prompt"."""
    for name in dict.fromkeys([field, "prompt"]):
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
        if value is not None:
            raise BadRow("wrong_type", f"field '{name}' must be a non-empty string")
    raise BadRow("missing_field", f"row has no field '{field}'" + (" or 'prompt'" if field != "prompt" else "")
                 + f" (fields: {', '.join(map(str, row)) or 'none'})")


def _messages(row: dict, field: str) -> list:
    """The conversation before the response: a row's messages less a last assistant message (its
    response), or its prompt as one user message."""
    messages = row.get(field)
    if messages is None:
        prompt = row.get("prompt")
        return prompt if isinstance(prompt, list) else [{"role": "user", "content": _string(row, "prompt")}]
    if not isinstance(messages, list):
        raise BadRow("wrong_type", f"field '{field}' must be a list of messages, got {type_name(messages)}")
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        return messages[:-1]
    return messages


def read_prompt_rows(args) -> list[tuple[str, dict]]:
    """(location, row) of every prompt: --prompt texts, or the rows of --file (file:line)."""
    from ftdist.data.sources import read_rows

    if args.prompt is not None:
        return [(f"--prompt {i + 1}", {"prompt": text}) for i, text in enumerate(args.prompt)]
    if not args.file.is_file():
        raise DataError(f"--file {args.file}: no such file")
    out = []
    for row in read_rows(str(args.file)):
        if row.problem is not None:
            raise DataError(f"{row.location}: {row.problem}")
        if not isinstance(row.value, dict):
            raise DataError(f"{row.location}: row is not a JSON object")
        out.append((row.location, row.value))
    if not out:
        raise DataError(f"--file {args.file}: no rows")
    return out


def encode_prompts(encode, rows: list[tuple[str, dict]]) -> list[list[int]]:
    ids = []
    for location, row in rows:
        try:
            ids.append(encode(row))
        except (BadRow, DataError) as e:
            raise DataError(f"{location}: {e}") from None
    return ids


# --- the command -------------------------------------------------------------------------------


def generation_settings(args, run_gen: GenerationEvalConfig) -> GenerationEvalConfig:
    """The run's eval.generation, with what the command line sets."""
    chosen = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "temperature": args.temperature,
              "top_p": args.top_p, "seed": args.seed}
    return dataclasses.replace(run_gen, do_sample=args.sample,
                               **{k: v for k, v in chosen.items() if v is not None})


def generate(args, out) -> int:
    """Write one JSON line per prompt into `out`; returns how many."""
    from ftdist.eval.generation import generate_responses

    target = find_target(args.model, args.merge)
    ids = encode_prompts(prompt_encoder(target.data, target.tokenizer), read_prompt_rows(args))
    device = torch.device(args.device)
    model = target.load_model().eval()
    if device.type != "cpu":
        model = model.to(device)
    texts = generate_responses(model, target.tokenizer, ids, generation_settings(args, target.gen), device)
    for i, (prompt, text) in enumerate(zip(ids, texts, strict=True)):
        out.write(json.dumps({"index": i, "prompt": target.tokenizer.decode(prompt), "response": text}) + "\n")
    return len(texts)


def parse_args(argv):
    parser = OneLineParser(tool="ftdist.generate", prog="python -m ftdist.generate",
                           description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path,
                        help="a run directory, a run's final/ or checkpoint, an export, or a Hugging Face model directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    source.add_argument("--file", type=Path, help="rows with a prompt: {\"prompt\": TEXT} or the run's data format")
    parser.add_argument("--out", type=Path, help="where to write the JSON lines (default: stdout)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the run's eval.generation.max_new_tokens, else 64")
    parser.add_argument("--batch-size", type=int, help="default: the run's eval.generation.batch_size, else 32")
    parser.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--merge", action="store_true", help="PEFT: merge the adapter into the base first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if not args.sample and any(v is not None for v in (args.temperature, args.top_p, args.seed)):
        parser.error("--temperature, --top-p and --seed apply to --sample only")
    return args


def main(argv: list[str] | None = None) -> int:
    from ftdist.console import quiet_library_hints
    from ftdist.export import MergeMismatch

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_library_hints()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr holds this command's messages; a load takes seconds
    try:
        if args.out is None:
            count = generate(args, sys.stdout)
        else:
            partial = args.out.with_name(args.out.name + ".partial")
            with open(partial, "w") as out:
                count = generate(args, out)
            partial.rename(args.out)
    except (ConfigError, DataError) as e:
        print(f"ftdist.generate: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MergeMismatch as e:
        print(f"ftdist.generate: MergeMismatch: {e}", file=sys.stderr)
        return EXIT_MERGE_MISMATCH
    print(f"ftdist.generate: {count} responses" + (f" in {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
