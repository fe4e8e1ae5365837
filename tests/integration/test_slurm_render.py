"""Every `slurm.*` setting of the README reaches the rendered job (slurm.dry_run=true only).

The rendered scripts are not only searched for strings: they are run by bash with stub `srun`,
`scontrol` and `module` commands on PATH (no Slurm needed), so the test sees what the job step
would really get: srun's argv (the torchrun command), the environment it inherits, and the
order in which the setup lines and the step ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO, run_env

HOSTS = ["node-a", "node-b", "node-c"]

# A value no default or other setting has, for every setting (requeue=false: the default is true).
SETTINGS = [
    "slurm.port=29123",
    "slurm.nodes=3",
    "slurm.gpus_per_node=4",
    "slurm.procs_per_node=2",
    "slurm.cpus_per_task=7",
    "slurm.mem=123G",
    "slurm.partition=part_q",
    "slurm.account=acct_q",
    "slurm.qos=qos_q",
    "slurm.time=1-02:03:04",
    "slurm.job_name=job_q",
    "slurm.signal_seconds=321",
    "slurm.requeue=false",
    "slurm.max_restarts=5",
    "slurm.python=/opt/py_q/bin/python3",
    'slurm.setup=["module load foo_q/1.2","export SETUP_Q=from_setup"]',
    # slurm.env is an empty dict in the schema: Hydra's struct mode adds keys to it only with +.
    '+slurm.env={ENV_Q:"bar baz",NCCL_Q:mlx5_0}',
    'slurm.sbatch_args=["--exclusive","--constraint=h100q"]',
]

STUBS = {
    # srun: record its argv and environment (NUL-separated), note the order, exit $STUB_RC.
    "srun": 'echo srun >> "$STUB_DIR/order.log"\nprintf "%s\\0" "$@" > "$STUB_DIR/srun.args"\n'
            'env -0 > "$STUB_DIR/srun.env"\nexit "${STUB_RC:-0}"\n',
    "scontrol": 'if [[ "$1 $2" == "show hostnames" ]]; then printf "%s\\n" ' + " ".join(HOSTS) + "; exit 0; fi\n"
                'echo "scontrol $*" >> "$STUB_DIR/order.log"\n',
    "module": 'echo "module $*" >> "$STUB_DIR/order.log"\n',
}


def render(args: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "ftdist.slurm", *args, "slurm.dry_run=true"], cwd=REPO, env=run_env(),
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert subprocess.run(["bash", "-n"], input=proc.stdout, text=True, check=False).returncode == 0
    return proc.stdout


def run_job(script: str, tmp: Path, slurm_env: dict, stub_rc: int = 0) -> tuple[int, list[str], dict, list[str]]:
    """Run the rendered job under bash with stub Slurm commands: (exit code, srun argv, srun's
    environment, order log)."""
    stubs = tmp / "stubs"
    stubs.mkdir(parents=True)
    for name, body in STUBS.items():
        (stubs / name).write_text("#!/bin/bash\n" + body)
        (stubs / name).chmod(0o755)
    (tmp / "job.sbatch").write_text(script)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp), "STUB_DIR": str(stubs), "STUB_RC": str(stub_rc),
           "SLURM_JOB_NODELIST": "node-[a-c]", "SLURM_JOB_NUM_NODES": "3", **slurm_env}
    proc = subprocess.run(["bash", str(tmp / "job.sbatch")], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    argv = (stubs / "srun.args").read_text().split("\0")[:-1]
    srun_env = dict(item.split("=", 1) for item in (stubs / "srun.env").read_text().split("\0")[:-1])
    return proc.returncode, argv, srun_env, (stubs / "order.log").read_text().splitlines()


def torchrun_argv(argv: list[str]) -> list[str]:
    """What srun starts on every node, after its own options and the USR1-ignoring wrapper."""
    assert argv[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"], argv
    return argv[argv.index("ftdist-node") + 1 :]


def test_every_slurm_setting_reaches_the_rendered_job(tmp_path):
    run_dir = tmp_path / "run"
    user = ["+experiment=tiny_cpu", "strategy=ddp", *SETTINGS]
    script = render([*user, f"output_dir={run_dir}"])
    assert not run_dir.exists()  # a dry run writes nothing
    lines = script.splitlines()

    # The header: every option sbatch must see, before the first command (sbatch stops reading
    # #SBATCH lines there).
    sbatch = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    for option in ("--job-name=job_q", "--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=4", "--cpus-per-task=7",
                   "--mem=123G", "--partition=part_q", "--account=acct_q", "--qos=qos_q", "--time=1-02:03:04",
                   "--signal=B:USR1@321", "--exclusive", "--constraint=h100q"):
        assert option in sbatch, (option, sbatch)
    assert "--requeue" not in sbatch and not any(o.startswith("--array") for o in sbatch)
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command
    setup = lines.index("module load foo_q/1.2")
    assert lines[setup + 1] == "export SETUP_Q=from_setup"
    assert setup < next(i for i, line in enumerate(lines) if line.startswith("srun "))

    rc, argv, env, order = run_job(script, tmp_path, {"SLURM_JOB_ID": "4242"}, stub_rc=75)
    # The setup lines ran first, then the step; preempted (75) with requeue=false: no requeue.
    assert order == ["module load foo_q/1.2", "srun"]
    assert rc == 75
    command = torchrun_argv(argv)
    own = {"output_dir", "resume", "slurm.dry_run"}
    expected_overrides = [o for o in user if o.split("=", 1)[0].lstrip("+") not in own]
    assert command == [
        "/opt/py_q/bin/python3", "-m", "torch.distributed.run",
        "--nnodes", "3", "--nproc_per_node", "2",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "node-a:29123", "--rdzv_id", "4242",
        "--max_restarts", "5",
        "-m", "ftdist.train", *expected_overrides, f"output_dir={run_dir}", "resume=auto",
    ]
    assert env["ENV_Q"] == "bar baz" and env["NCCL_Q"] == "mlx5_0" and env["SETUP_Q"] == "from_setup"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == f"{run_dir}/flight_recorder/rank_"
    assert (run_dir / "flight_recorder").is_dir()


def test_without_slurm_port_the_rendezvous_port_comes_from_the_job_id(tmp_path):
    script = render(["+experiment=tiny_cpu", "slurm.nodes=3", f"output_dir={tmp_path / 'run'}"])
    assert "\nRDZV_PORT=\n" in script  # empty: the job derives it
    ports = []
    for job_id in (4242, 123457):
        rc, argv, _, _ = run_job(script, tmp_path / str(job_id), {"SLURM_JOB_ID": str(job_id)})
        assert rc == 0
        command = torchrun_argv(argv)
        host, port = command[command.index("--rdzv_endpoint") + 1].split(":")
        assert host == HOSTS[0] and command[command.index("--rdzv_id") + 1] == str(job_id)
        ports.append(int(port))
    # run_step.sh: 20000 + job id mod 20000, so two jobs sharing a node do not share a port.
    assert ports == [20000 + 4242 % 20000, 20000 + 123457 % 20000] == [24242, 23457]


def test_sweep_array_parallelism_and_each_task_runs_its_own_combination(tmp_path):
    sweep_dir = tmp_path / "sweep"
    script = render(["-m", "+experiment=tiny_cpu", "train.lr=1e-3,2e-3", "slurm.array_parallelism=3",
                     "slurm.python=/opt/py_q/bin/python3", f"output_dir={sweep_dir}"])
    assert "#SBATCH --array=0-1%3" in script.splitlines()
    assert "#SBATCH --requeue" in script.splitlines()  # the default, unlike the test above
    # Task 1, preempted: it trains the second learning rate into SWEEP_DIR/1 and requeues itself.
    rc, argv, env, order = run_job(
        script, tmp_path, {"SLURM_JOB_ID": "901", "SLURM_ARRAY_JOB_ID": "900", "SLURM_ARRAY_TASK_ID": "1"}, stub_rc=75,
    )
    command = torchrun_argv(argv)
    assert command[0] == "/opt/py_q/bin/python3"
    assert "train.lr=0.002" in command and "train.lr=0.001" not in command
    assert command[-2:] == [f"output_dir={sweep_dir / '1'}", "resume=auto"]
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == f"{sweep_dir / '1'}/flight_recorder/rank_"
    assert order == ["srun", "scontrol requeue 900_1"] and rc == 0
    assert os.listdir(sweep_dir) == ["1"]
