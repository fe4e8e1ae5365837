"""train.compile=true: decoder blocks compiled before sharding train to the eager losses (fp32 on
CPU: to 1e-5 relative) under single, ddp and fsdp, on packed rows of changing lengths, and stop
compiling new graphs (one recompile, for a symbolic length, then none);
with gradient checkpointing too (checkpointed inside the compiled blocks, padded rows)."""

from __future__ import annotations

import pytest
from helpers import FAST, concurrently, read_metrics, run_train

BASE = [*FAST, "train.max_steps=5", "data.packing=true", "train.micro_batch_size=2", "train.save_final=false",
        "train.eval_at_start=false"]


def lines(run_dir) -> list[dict]:
    return read_metrics(run_dir)[0]


def assert_same_losses(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4, 5]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])


def assert_one_recompile_at_most(compiled: list[dict]) -> None:
    """The first length's graphs, then (once a second length arrives) the symbolic ones: no more."""
    graphs = [r["compiled_graphs"] for r in compiled]
    assert graphs[0] > 0 and graphs == sorted(graphs) and len(set(graphs)) <= 2, graphs


def test_compiled_blocks_train_like_eager_single_ddp_and_fsdp(tmp_path):
    checkpointed = ["model.gradient_checkpointing=true", "data.packing=false"]
    concurrently(
        lambda: run_train([*BASE, f"output_dir={tmp_path}/single_eager"]),
        lambda: run_train([*BASE, "train.compile=true", f"output_dir={tmp_path}/single_compiled"]),
    )
    concurrently(
        lambda: run_train([*BASE, *checkpointed, f"output_dir={tmp_path}/checkpointed_eager"]),
        lambda: run_train([*BASE, *checkpointed, "train.compile=true", f"output_dir={tmp_path}/checkpointed_compiled"]),
    )
    for name in ("single", "checkpointed"):
        eager = lines(tmp_path / f"{name}_eager")
        compiled = lines(tmp_path / f"{name}_compiled")
        assert "compiled_graphs" not in eager[0]
        assert_same_losses(compiled, eager)
    assert_one_recompile_at_most(lines(tmp_path / "single_compiled"))
    # Padded rows: transformers passes no mask for a batch without padding, a mask otherwise,
    # so a block has one graph more: (mask, no mask) x (the first length, a symbolic one).
    graphs = [r["compiled_graphs"] for r in lines(tmp_path / "checkpointed_compiled")]
    assert 0 < graphs[0] and graphs == sorted(graphs) and len(set(graphs)) <= 4, graphs

    run_train([*BASE, "strategy=fsdp", f"output_dir={tmp_path}/fsdp_eager"], nproc=2)
    run_train([*BASE, "strategy=fsdp", "train.compile=true", f"output_dir={tmp_path}/fsdp_compiled"], nproc=2)
    run_train([*BASE, "strategy=ddp", "train.compile=true", f"output_dir={tmp_path}/ddp_compiled"], nproc=2)
    two_rank_eager = lines(tmp_path / "fsdp_eager")
    for name in ("fsdp_compiled", "ddp_compiled"):
        assert_same_losses(lines(tmp_path / name), two_rank_eager)
        assert_one_recompile_at_most(lines(tmp_path / name))


def test_checkpointed_packed_rows_on_per_document_sdpa_are_refused(tmp_path):
    proc = run_train([*BASE, "train.compile=true", "model.gradient_checkpointing=true", f"output_dir={tmp_path}"],
                     check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.attn_implementation=flex_attention" in proc.stderr
