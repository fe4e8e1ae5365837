"""Where ftdist patches or reads a library's internals, it works with the installed version, and
when another version lacks them (simulated by deleting the real attribute, or by a library that
quantizes around ftdist's hook) it raises an error naming the library and its version, never a
silent no-op."""

from __future__ import annotations

import json
import re
from pathlib import Path

import bitsandbytes as bnb  # the dev extra installs it: missing fails here, never skips
import pytest
import torch

from ftdist.compat import LibraryInternalsError, library_version
from ftdist.config import PeftConfig
from ftdist.model.adapters import keep_4bit_weights_trainable, quantization_config, quantize_4bit_on

Params4bit, Linear4bit = bnb.nn.Params4bit, bnb.nn.Linear4bit
CPU = torch.device("cpu")
LINEARS_PER_LLAMA_BLOCK = 7  # q, k, v, o, gate, up, down


def names_version(library: str) -> str:
    return re.escape(f"ftdist: {library} {library_version(library)}: ")


def load_4bit(path: str) -> torch.nn.Module:
    """from_pretrained as ftdist's loader calls it for peft=qlora (into CPU memory)."""
    from transformers import AutoModelForCausalLM

    quant = quantization_config(PeftConfig(method="qlora"), torch.float32)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=quant, device_map={"": "cpu"}
    )


def quantized_weight_count(path: str) -> int:
    config = json.loads((Path(path) / "config.json").read_text())
    return config["num_hidden_layers"] * LINEARS_PER_LLAMA_BLOCK


@pytest.fixture(scope="module")
def model_4bit(tiny_model_dir):
    return load_4bit(tiny_model_dir)


# --- bitsandbytes: Params4bit._quantize, wrapped while a QLoRA base loads -------------------------


def test_quantize_on_device_quantizes_every_4bit_weight_through_its_wrapper(tiny_model_dir):
    from safetensors import safe_open

    original = Params4bit._quantize
    with quantize_4bit_on(CPU) as on_device:
        model = load_4bit(tiny_model_dir)
    on_device.check(model)
    assert on_device.calls == quantized_weight_count(tiny_model_dir)
    assert Params4bit._quantize is original  # restored after the load
    # The wrapper quantized for real: bitsandbytes' own NF4 of the checkpoint's weight, bit for bit.
    name = "model.layers.0.mlp.down_proj.weight"
    loaded = model.get_parameter(name)
    with safe_open(str(Path(tiny_model_dir) / "model.safetensors"), framework="pt") as f:
        weight = f.get_tensor(name)
    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=loaded.blocksize, compress_statistics=True, quant_type="nf4", quant_storage=loaded.quant_storage
    )
    assert torch.equal(packed.view(torch.uint8), loaded.data.view(torch.uint8))
    assert torch.equal(state.absmax, loaded.quant_state.absmax)


def test_quantize_on_device_refuses_a_bitsandbytes_without_quantize(monkeypatch):
    monkeypatch.delattr(Params4bit, "_quantize")
    missing = names_version("bitsandbytes") + r"Params4bit\._quantize not found"
    with pytest.raises(LibraryInternalsError, match=missing), quantize_4bit_on(CPU):
        pass


def test_quantize_on_device_refuses_a_load_that_went_around_its_wrapper(tiny_model_dir, monkeypatch):
    """A bitsandbytes whose Params4bit.to quantizes without calling _quantize (a renamed internal):
    the wrapper is installed but never runs, and the load must not pass for one on the GPU."""
    quantize, to = Params4bit._quantize, Params4bit.to

    def to_around_the_wrapper(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and device.type != "meta" and not self.bnb_quantized:
            return quantize(self, device)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(Params4bit, "to", to_around_the_wrapper)
    with quantize_4bit_on(CPU) as on_device:
        model = load_4bit(tiny_model_dir)
    n = quantized_weight_count(tiny_model_dir)
    assert on_device.calls == 0
    with pytest.raises(
        LibraryInternalsError,
        match=names_version("bitsandbytes") + rf"Params4bit\._quantize, wrapped by ftdist, ran 0 times while {n} of "
        rf"the model's {n} 4-bit weights were quantized another way",
    ):
        on_device.check(model)


def test_quantize_on_device_refuses_weights_quantized_outside_it(tiny_model_dir, model_4bit):
    with quantize_4bit_on(CPU) as on_device:
        load_4bit(tiny_model_dir)
    with pytest.raises(LibraryInternalsError, match="quantized another way"):
        on_device.check(model_4bit)  # loaded before: its weights never went through this wrapper


# --- bitsandbytes: Linear4bit.support_avx512bf16_for_cpu, turned off for training ----------------


def test_keep_4bit_weights_trainable_turns_off_repacking_on_every_4bit_layer(tiny_model_dir, model_4bit):
    layers = [m for m in model_4bit.modules() if isinstance(m, Linear4bit)]
    keep_4bit_weights_trainable(model_4bit)
    assert len(layers) == quantized_weight_count(tiny_model_dir)
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)


def test_keep_4bit_weights_trainable_refuses_a_bitsandbytes_without_the_switch(model_4bit, monkeypatch):
    layer = next(m for m in model_4bit.modules() if isinstance(m, Linear4bit))
    monkeypatch.delattr(layer, "support_avx512bf16_for_cpu")
    with pytest.raises(
        LibraryInternalsError, match=names_version("bitsandbytes") + r"Linear4bit\.support_avx512bf16_for_cpu not found"
    ):
        keep_4bit_weights_trainable(model_4bit)


# --- DeepSpeed ------------------------------------------------------------------------------------


def test_deepspeed_on_cpu_never_builds_its_shared_memory_all_reduce():
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    from ftdist.parallel.deepspeed import SHM_COMM_OP, _import_deepspeed

    assert get_accelerator().device_name() == "cpu"
    assert get_accelerator().create_op_builder("ShareMemCommBuilder").NAME == SHM_COMM_OP
    deepspeed = _import_deepspeed()
    assert deepspeed.ops.__compatible_ops__[SHM_COMM_OP] is False
    assert build_shm_op() is None  # DeepSpeed's own gate: no JIT build


def test_deepspeed_without_the_shm_comm_entry_is_refused(monkeypatch):
    import deepspeed

    from ftdist.parallel.deepspeed import SHM_COMM_OP, _import_deepspeed

    monkeypatch.delitem(deepspeed.ops.__compatible_ops__, SHM_COMM_OP)
    with pytest.raises(LibraryInternalsError, match=names_version("deepspeed") + r".*has no 'deepspeed_shm_comm'"):
        _import_deepspeed()


def test_deepspeed_engine_has_the_zero3_consolidation_ftdist_saves_through():
    import deepspeed
    assert callable(deepspeed.DeepSpeedEngine._zero3_consolidated_16bit_state_dict)


# --- transformers, torch, Hydra -----------------------------------------------------------------


def meta_model(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def test_export_finds_the_tied_head_through_transformers(tiny_model_dir, monkeypatch):
    from ftdist.export import tied_copies

    model = meta_model(tiny_model_dir)
    assert model.config.tie_word_embeddings
    assert tied_copies(model) == {"lm_head.weight"}
    monkeypatch.delattr(model, "all_tied_weights_keys")
    with pytest.raises(
        LibraryInternalsError, match=names_version("transformers") + r"LlamaForCausalLM\.all_tied_weights_keys not found"
    ):
        tied_copies(model)


def test_fsdp_buffer_broadcast_refuses_a_module_without_its_non_persistent_set(monkeypatch):
    from ftdist.parallel.fsdp import broadcast_buffers

    module = torch.nn.Module()
    module.register_buffer("inv_freq", torch.empty(4, device="meta"), persistent=False)
    assert module._non_persistent_buffers_set == {"inv_freq"}
    monkeypatch.delattr(module, "_non_persistent_buffers_set")
    with pytest.raises(LibraryInternalsError, match=names_version("torch") + r"Module\._non_persistent_buffers_set"):
        broadcast_buffers(module, CPU)  # raises before any collective


def test_sweep_expansion_through_hydra_and_its_absence(monkeypatch):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from ftdist.config import expand_sweep

    assert expand_sweep(["seed=1,2", "train.lr=0.1"]) == [["seed=1", "train.lr=0.1"], ["seed=2", "train.lr=0.1"]]
    monkeypatch.delattr(BasicSweeper, "split_arguments")
    with pytest.raises(LibraryInternalsError, match=names_version("hydra-core") + r"BasicSweeper\.split_arguments"):
        expand_sweep(["seed=1,2"])
