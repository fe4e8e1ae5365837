"""Two torchrun "nodes" on one machine, launched with launch/multinode.sh, train like one node
with two processes; a rank that never checks in is named by the preflight within seconds."""

from __future__ import annotations

import subprocess

from helpers import FAST, REPO, free_port, read_metrics, run_env, run_train, train_cmd

COMMON = [*FAST, "train.max_steps=4", "train.micro_batch_size=1", "strategy=ddp"]


def test_two_nodes_give_the_losses_of_one_node_with_two_processes(tmp_path):
    run_train([*COMMON, f"output_dir={tmp_path / 'one_node'}"], nproc=2)
    import sys

    env = {
        **run_env(),
        "HEAD_ADDR": "127.0.0.1",
        "NNODES": "2",
        "GPUS_PER_NODE": "1",
        "PORT": str(free_port()),
        "RUN_ID": "two-nodes-test",
        "PYTHON": sys.executable,
    }
    cmd = ["bash", str(REPO / "launch" / "multinode.sh"), *COMMON, f"output_dir={tmp_path / 'two_nodes'}"]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-3000:] for _, err in outputs]
    one, _ = read_metrics(tmp_path / "one_node")
    two, _ = read_metrics(tmp_path / "two_nodes")
    assert [r["loss"] for r in two] == [r["loss"] for r in one]
    assert "world size 2" in (tmp_path / "two_nodes" / "train.log").read_text()


def test_preflight_names_the_rank_that_never_joins(tmp_path):
    env = {**run_env(), "FTDIST_INJECT_FAULT": "stall:0:1"}
    cmd = train_cmd(2, [*COMMON, "strategy.preflight_timeout_s=5", f"output_dir={tmp_path / 'pf'}"])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "PreflightError: preflight: rank(s) [1] of 2 did not check in within 5 s" in proc.stderr
