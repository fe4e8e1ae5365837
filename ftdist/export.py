"""Export a training checkpoint or a run's final/ as a Hugging Face model or PEFT adapter, on CPU.

    python -m ftdist.export RUN_DIR | CHECKPOINT | RUN_DIR/final --out DIR [--merge] [--dtype bf16|fp32]

A run directory exports what the run finished with, its final/, or else (a run that has not
finished) its newest complete checkpoint; the run's config.yaml (next to checkpoints/ and
final/) says what was trained. Checkpoint weights are read on CPU from either
format (torch.distributed.checkpoint, or DeepSpeed's ZeRO files) and written through
save_pretrained from a model built on the meta device, so no device ever holds the whole model.
A full fine-tune's final/ is already a Hugging Face model: it is copied (converted with --dtype).

- full fine-tuning: model.safetensors + config + tokenizer, loadable with from_pretrained;
- PEFT: the adapter (PeftModel.from_pretrained(base, DIR)); with --merge, a full model with the
  adapter merged into the base. For QLoRA the base is the dequantized NF4 weights the adapter
  was trained against, not the original base. A merge is checked against base + adapter on a
  few token sequences and fails loudly where the logits differ.

The output is written to DIR.partial and renamed to DIR when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from ftdist.checkpoint import complete_checkpoints
from ftdist.compat import require_attr
from ftdist.config import ConfigError, FtdistConfig, check_known_keys, hydra_error_message
from ftdist.console import OneLineParser
from ftdist.constants import DTYPES, EXIT_BAD_INPUT, EXIT_MERGE_MISMATCH
from ftdist.data.chat import CHAT_TEMPLATE_FILE, use_chat_template_file
from ftdist.model.heads import ScoreHead, truncate_as_trained
from ftdist.model.loading import auto_model_class

log = logging.getLogger("ftdist")

# Max |logits(merged) - logits(base + adapter)|, relative to the largest logit (at least 1),
# by the coarser of the run's compute dtype and the saved dtype. Measured on the tiny model
# (logits up to 1.6): fp32 7e-7 (merge reassociation only); bf16 5e-3 (every weight rounded to
# 8 mantissa bits). Wrong merges are far larger: QLoRA merged into the original base instead of
# the NF4 one 0.21, the adapter left out 1.3.
MERGE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
PROBE_SEQUENCES, PROBE_LENGTH = 4, 32


class MergeMismatch(RuntimeError):
    """The merged model does not compute what base + adapter computes."""


# --- finding the checkpoint and the run's config ------------------------------------------


def resolve_source(path: Path) -> Path:
    """`path` itself where it is a checkpoint or a run's final/; else, for run dir `path`, its
    final/ (written once training ends, so newer than any checkpoint of that training: a
    preempted run's checkpoint stays behind after the resumed run finishes), or else its newest
    complete checkpoint."""
    if not path.exists():
        raise ConfigError(f"{path}: no such run directory, checkpoint or final/")
    if path.name.endswith(".partial"):
        raise ConfigError(f"{path}: an incomplete checkpoint (cut short while saving); export a complete step_N")
    if (path / "model_optimizer").is_dir():
        if not (path / "trainer.pt").is_file():
            raise ConfigError(f"{path}: not a complete ftdist checkpoint (no trainer.pt)")
        return path
    if is_final(path):
        return path
    found = complete_checkpoints(path)
    if (path / "final").is_dir():
        if found:
            log.info("%s: exporting final/, the finished model (export %s for that checkpoint)", path, found[-1])
        return path / "final"
    if found:
        return found[-1]
    raise ConfigError(
        f"{path}: neither a checkpoint (no model_optimizer/), a run's final/ (no adapter_config.json or config.json) "
        "nor a run directory with checkpoints/step_N or final/"
    )


def is_final(path: Path) -> bool:
    """A directory final/ as the trainer writes it: a PEFT adapter or a Hugging Face model."""
    return path.name == "final" or (path / "adapter_config.json").is_file() or (path / "config.json").is_file()


def check_final(final: Path, cfg: FtdistConfig) -> None:
    """final/ holds what the run's config says it trained, weights included."""
    peft = cfg.peft.method != "none"
    config = final / ("adapter_config.json" if peft else "config.json")
    what = f"peft.method={cfg.peft.method} in {final.parent / 'config.yaml'}"
    if not config.is_file():
        raise ConfigError(f"{final}: no {config.name} ({what}); was final/ written completely?")
    weights = ["adapter_model.safetensors"] if peft else ["model.safetensors", "model.safetensors.index.json"]
    if not any((final / name).is_file() for name in weights):
        raise ConfigError(f"{final}: no {weights[0]} beside {config.name}; was final/ written completely?")


def read_run_config(run_dir: Path) -> FtdistConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{path}: no config.yaml (the run directory's config.yaml names the base model and peft settings; "
            "export a checkpoint or final/ inside its run directory)"
        )
    # Not load_config: the saved config passed its checks when the run started, and its validate
    # also asks what a run needs (DeepSpeed installed for zero*, rules added since) that an export
    # of finished weights does not. The key check and the one-line message are config's own.
    try:
        saved = OmegaConf.load(path)
        check_known_keys(saved)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FtdistConfig), saved))
    except ConfigError as e:
        raise ConfigError(f"{path}: not an ftdist run config: {e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: not an ftdist run config: {hydra_error_message(e)}") from None


# --- reading the trained weights ------------------------------------------------------------


def read_model_state(model_optimizer: Path, wanted: set[str]) -> dict[str, torch.Tensor]:
    """The tensors named in `wanted` (module FQNs) from a checkpoint's model_optimizer/, on CPU."""
    if (model_optimizer / ".metadata").is_file():
        state = _read_dcp(model_optimizer, wanted)
    elif (model_optimizer / "latest").is_file() or any(model_optimizer.glob("*/*model_states.pt")):
        state = _read_deepspeed(model_optimizer, wanted)
    else:
        raise ConfigError(f"{model_optimizer}: neither a torch.distributed.checkpoint nor a DeepSpeed checkpoint")
    missing = sorted(wanted - state.keys())
    if missing:
        raise ConfigError(
            f"{model_optimizer}: lacks {len(missing)} tensor(s) the run's model has, e.g. {missing[0]} "
            "(does config.yaml belong to this checkpoint?)"
        )
    return state


def _read_dcp(path: Path, wanted: set[str]) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {}
    for key, meta in entries.items():
        name = key.removeprefix("model.")
        if key.startswith("model.") and name in wanted and isinstance(meta, TensorStorageMetadata):
            state[name] = torch.empty(meta.size, dtype=meta.properties.dtype)
    # Loads into full-size CPU tensors whatever the saved sharding (DCP reshards on read);
    # the optimizer state is never read.
    dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)
    return state


def _read_deepspeed(path: Path, wanted: set[str]) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # Without a `latest` file the tag is the one directory holding the model states.
    tags = sorted({p.parent.name for p in path.glob("*/*model_states.pt")})
    tag = None if (path / "latest").is_file() or len(tags) != 1 else tags[0]
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    return {k: v for k, v in state.items() if k in wanted}


# --- building models ---------------------------------------------------------------------------


def run_head(run_dir: Path, cfg: FtdistConfig, pad_token_id: int | None) -> ScoreHead | None:
    """The scoring head a classification or reward run trained (a classifier's classes are in the
    run's data_report.json); None for a language-model run."""
    from ftdist.objectives import score_head, scores_sequences

    if not scores_sequences(cfg.objective.name):
        return None
    labels = None
    if cfg.objective.name == "classification":
        report = run_dir / "data_report.json"
        try:
            labels = json.loads(report.read_text())["labels"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{report}: cannot read the run's classes (labels): {e}") from None
    return dataclasses.replace(score_head(cfg, labels), pad_token_id=pad_token_id)


def model_config(cfg: FtdistConfig, model_path: str, head: ScoreHead | None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    if head is not None:
        head.configure(config)
    return config


def meta_model(cfg: FtdistConfig, model_path: str, dtype: torch.dtype, head: ScoreHead | None = None):
    """The run's architecture with no weights (its config from the base model's directory;
    with a scoring head, the architecture's sequence-classification class)."""
    config = model_config(cfg, model_path, head)
    with torch.device("meta"):
        return auto_model_class(head is not None).from_config(config, dtype=dtype,
                                                              trust_remote_code=cfg.model.trust_remote_code)


def tied_copies(model: torch.nn.Module) -> set[str]:
    """State dict keys that alias another tensor (an lm_head tied to the embedding)."""
    # transformers 5 sets this mapping (target -> source) on every model it builds; without it,
    # tied copies would be saved (or required) twice, silently.
    tied = require_attr(model, "all_tied_weights_keys", "transformers", "ftdist finds tied weights through it")
    return set(tied or {})


def full_model_names(model: torch.nn.Module) -> set[str]:
    """State dict keys a checkpoint must supply: tied copies are one tensor, saved once."""
    return set(model.state_dict()) - tied_copies(model)


def adapter_names(peft_model: torch.nn.Module) -> set[str]:
    return {n for n, p in peft_model.named_parameters() if p.requires_grad}


def read_final_adapter(final: Path, skeleton: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of final/adapter_model.safetensors under the module FQNs of
    `skeleton` (the run's peft model, on meta), checked name by name and shape by shape."""
    from safetensors.torch import load_file

    file = final / "adapter_model.safetensors"
    saved = load_file(file)
    wanted = {n: p for n, p in skeleton.named_parameters() if p.requires_grad}
    # peft saves each adapter tensor under its FQN without the adapter's name (".default"), and a
    # module trained in full (a scoring head, modules_to_save) under the module's own FQN.
    fqn = {n.replace(".modules_to_save.default", "").replace(".default", ""): n for n in wanted}
    missing, unexpected = sorted(fqn.keys() - saved.keys()), sorted(saved.keys() - fqn.keys())
    config = final.parent / "config.yaml"
    if missing or unexpected:
        raise ConfigError(
            f"{file}: does not fit the peft settings of {config}: missing {len(missing)} tensor(s) "
            f"{missing[:2]}, unexpected {len(unexpected)} {unexpected[:2]}"
        )
    for key, name in fqn.items():
        if saved[key].shape != wanted[name].shape:
            raise ConfigError(
                f"{file}: {key} has shape {tuple(saved[key].shape)} where the peft settings of {config} "
                f"(r={skeleton.peft_config['default'].r}) give {tuple(wanted[name].shape)}"
            )
    return {fqn[key]: value for key, value in saved.items()}


def read_final_model(final: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a final/ Hugging Face model (one safetensors file or several shards)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(final.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def attach_adapter(base: torch.nn.Module, cfg: FtdistConfig, adapter: dict[str, torch.Tensor], scoring: bool = False):
    """base wrapped by the run's adapter config, holding the trained adapter weights (and, for
    a scoring head, the trained head)."""
    from ftdist.model.adapters import apply_adapters

    model = apply_adapters(base, cfg.peft, scoring=scoring)
    result = model.load_state_dict(adapter, strict=False)
    unloaded = adapter_names(model) - adapter.keys()
    if result.unexpected_keys or unloaded:
        raise ConfigError(
            f"the checkpoint's adapter does not fit the run's base model: unexpected {result.unexpected_keys[:3]}, "
            f"missing {sorted(unloaded)[:3]}"
        )
    return model.eval()


# --- writing (trainer.save_final writes final/ through these too) ---------------------------


def write_full_model(model, state: dict[str, torch.Tensor], out: Path, tokenizer=None) -> None:
    """save_pretrained of `state` with `model`'s config (model may live on the meta device).

    A gathered state dict names tied weights twice; save_pretrained given one does not drop
    the copy, so it is dropped here (from_pretrained re-ties it)."""
    tied = tied_copies(model)
    state = {k: v for k, v in state.items() if k not in tied}
    model.config.use_cache = True  # training turned it off; users generate with it
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def write_adapter(peft_model, state: dict[str, torch.Tensor], out: Path, tokenizer=None,
                  head: ScoreHead | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors from the adapter tensors alone (and the
    scoring head's definition, head.json, for a classifier or reward model)."""
    peft_model.save_pretrained(out, state_dict=state)
    if head is not None:
        head.write(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


# --- merging -----------------------------------------------------------------------------------


def probe_ids(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (PROBE_SEQUENCES, PROBE_LENGTH), generator=g)


@torch.no_grad()
def probe_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def load_base(cfg: FtdistConfig, model_path: str, head: ScoreHead | None = None):
    """The base exactly as the run trained on it: 4-bit NF4 for QLoRA, on CPU (with a scoring
    head: the sequence-classification class, its untrained head replaced by the adapter's copy)."""
    from ftdist.model.adapters import keep_4bit_weights_trainable, quantization_config

    dtype = DTYPES[cfg.model.dtype]
    quant = quantization_config(cfg.peft, dtype, scoring=head is not None)
    extra = {"quantization_config": quant, "device_map": {"": "cpu"}} if quant is not None else {}
    base = auto_model_class(head is not None).from_pretrained(
        model_path, config=model_config(cfg, model_path, head), dtype=dtype,
        trust_remote_code=cfg.model.trust_remote_code, **extra
    )
    # Evaluation-mode bitsandbytes would repack the weights for another CPU kernel: the
    # reference logits must come from the layers that trained.
    keep_4bit_weights_trainable(base)
    return base


def merge(cfg: FtdistConfig, model_path: str, adapter: dict[str, torch.Tensor], dtype: torch.dtype,
          head: ScoreHead | None = None):
    """The base with the adapter merged in, in `dtype`; raises MergeMismatch where its logits
    differ from base + adapter's (computed as the run did) by more than MERGE_TOLERANCE."""
    scoring = head is not None
    model = attach_adapter(load_base(cfg, model_path, head), cfg, adapter, scoring)
    ids = probe_ids(model.config.vocab_size)
    reference = probe_logits(model, ids)
    coarsest = torch.bfloat16 if torch.bfloat16 in (dtype, DTYPES[cfg.model.dtype]) else torch.float32
    tolerance = MERGE_TOLERANCE[coarsest] * max(1.0, reference.abs().max().item())
    if cfg.peft.method == "qlora":
        # peft would merge into the 4-bit layers and quantize the sum again, losing the delta;
        # instead the NF4 weights become dense fp32 (exactly what the 4-bit kernel computed
        # with), then the adapter merges into them.
        base = model.unload()
        base.dequantize(dtype=torch.float32)
        model = attach_adapter(base, cfg, adapter, scoring)
    merged = model.merge_and_unload().float()
    for p in merged.parameters():  # round to the saved dtype, check in fp32 (CPU bf16 is slow)
        p.data = p.data.to(dtype).float()
    diff = (probe_logits(merged, ids) - reference).abs().max().item()
    print(
        f"merge check: max |logits(merged, {str(dtype).removeprefix('torch.')}) - logits(base + adapter)| = "
        f"{diff:.3g} (tolerance {tolerance:.3g}) on {PROBE_SEQUENCES} sequences of {PROBE_LENGTH} tokens"
    )
    if not diff <= tolerance:  # NaN fails too
        raise MergeMismatch(f"merged model differs from base + adapter by {diff:.3g} > {tolerance:.3g}; not written")
    return merged.to(dtype)


# --- the command -------------------------------------------------------------------------------


def export(source: Path, out: Path, merge_adapter: bool = False, dtype_name: str | None = None) -> Path:
    source = resolve_source(source)
    from_final = not (source / "model_optimizer").is_dir()
    run_dir = source.parent if from_final else source.parent.parent
    cfg = read_run_config(run_dir)
    if (run_dir / CHAT_TEMPLATE_FILE).is_file():  # the run's copy: data.chat_template may be relative or gone
        cfg.data.chat_template = str(run_dir / CHAT_TEMPLATE_FILE)
    if from_final:
        check_final(source, cfg)
    model_path, tokenizer = base_and_tokenizer(cfg)
    head = run_head(run_dir, cfg, tokenizer.pad_token_id)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    log.info("exporting %s (peft.method=%s) to %s", source, cfg.peft.method, out)
    try:
        if cfg.peft.method == "none":
            if merge_adapter:
                log.info("--merge: a full fine-tune has no adapter; exporting the full model")
            _export_full(cfg, head, model_path, tokenizer, source, from_final, staging, dtype_name)
        else:
            _export_peft(cfg, head, model_path, tokenizer, source, from_final, staging, merge_adapter, dtype_name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)  # an empty directory at most (checked above)
    staging.rename(out)
    return out


def base_and_tokenizer(cfg: FtdistConfig) -> tuple[str, object]:
    """The base model's path and the tokenizer the run trained with (its data.chat_template included)."""
    from ftdist.model.loading import load_tokenizer, resolve_model_path
    from ftdist.objectives import scores_sequences

    model_path = resolve_model_path(cfg.model)
    tokenizer = use_chat_template_file(load_tokenizer(cfg.model, model_path), cfg.data.chat_template)
    if scores_sequences(cfg.objective.name):  # as the run's final/ has it
        truncate_as_trained(tokenizer, cfg.data.max_seq_len)
    return model_path, tokenizer


def _export_full(cfg, head, model_path, tokenizer, source, from_final, out, dtype_name) -> None:
    if from_final and dtype_name is None:
        # final/ is already what this export would write (save_pretrained + tokenizer).
        log.info("%s: a full fine-tune's final/ is already a Hugging Face model; copying it", source)
        shutil.copytree(source, out)
        return
    if from_final:
        model_path, state = str(source), read_final_model(source)
    else:
        names = full_model_names(meta_model(cfg, model_path, torch.float32, head))
        state = read_model_state(source / "model_optimizer", names)
    dtype = DTYPES[dtype_name] if dtype_name else next(iter(state.values())).dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    write_full_model(meta_model(cfg, model_path, dtype, head), state, out, tokenizer)


def adapter_skeleton(cfg: FtdistConfig, model_path: str, head: ScoreHead | None):
    """The run's peft model on the meta device: the names and shapes its adapter must have."""
    from ftdist.model.adapters import apply_adapters

    return apply_adapters(meta_model(cfg, model_path, torch.float32, head), cfg.peft, scoring=head is not None)


def trained_peft_model(cfg: FtdistConfig, final: Path, model_path: str, head: ScoreHead | None):
    """A PEFT run's final/ as it trained: the base (4-bit NF4 for QLoRA) with its adapter, on CPU."""
    adapter = read_final_adapter(final, adapter_skeleton(cfg, model_path, head))
    return attach_adapter(load_base(cfg, model_path, head), cfg, adapter, scoring=head is not None)


def _export_peft(cfg, head, model_path, tokenizer, source, from_final, out, merge_adapter, dtype_name) -> None:
    skeleton = adapter_skeleton(cfg, model_path, head)
    if from_final:
        adapter = read_final_adapter(source, skeleton)
    else:
        adapter = read_model_state(source / "model_optimizer", adapter_names(skeleton))
    if not merge_adapter:
        write_adapter(skeleton, adapter, out, tokenizer, head)
        return
    # A QLoRA base is 4-bit NF4 codes times block scales: bf16's rounding is far finer than
    # that quantization, at half fp32's size.
    default = "bf16" if cfg.peft.method == "qlora" else cfg.model.dtype
    dtype = DTYPES[dtype_name or default]
    merged = merge(cfg, model_path, adapter, dtype, head)
    write_full_model(merged, merged.state_dict(), out, tokenizer)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(tool="ftdist.export", prog="python -m ftdist.export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source", type=Path,
        help="a run directory (its final/ once finished, else its newest checkpoint), a checkpoint step_N, "
        "or a run's final/",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--merge", action="store_true", help="PEFT runs: merge the adapter into the base model")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="weights dtype (default: as trained; bf16 for a QLoRA merge)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from ftdist.console import pin_deepspeed_accelerator, quiet_library_hints

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # As in a run: no "Setting accelerator to CPU" from DeepSpeed (transformers imports it when
    # saving) and no bitsandbytes inference-kernel hint (peft imports it).
    pin_deepspeed_accelerator()
    quiet_library_hints()
    try:
        out = export(args.source, args.out, args.merge, args.dtype)
    except ConfigError as e:
        print(f"ftdist.export: ConfigError: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MergeMismatch as e:
        print(f"ftdist.export: MergeMismatch: {e}", file=sys.stderr)
        return EXIT_MERGE_MISMATCH
    print(f"exported to {out}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
