"""Render and submit the sbatch job of a run from its Hydra config.

    python -m ftdist.slurm +experiment=NAME slurm.nodes=2 slurm.gpus_per_node=8 [slurm.dry_run=true]
    python -m ftdist.slurm -m +experiment=NAME train.lr=1e-5,2e-5     # an array job, one task per run

The overrides are composed and checked exactly as `ftdist.train` would, so a bad key fails here
and not in the queue. The templates live in slurm/ (train.sbatch, array.sbatch, run_step.sh);
the rendered script is self-contained, written to OUTPUT_DIR/job.sbatch and submitted with
sbatch. output_dir is fixed at render time, so a requeued job finds its own checkpoints.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from ftdist.config import (
    ConfigError,
    FtdistConfig,
    command_line_runs,
    compose,
    load_config,
    slurm_procs_per_node,
)

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "slurm"
# Set by ftdist.slurm itself in the job's command line, so not taken from the user's overrides.
OWN_KEYS = ("output_dir", "resume", "slurm.dry_run")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def job_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides as the job passes them to ftdist.train (its own keys removed)."""
    for o in overrides:
        if _key(o) == "resume" and o.split("=", 1)[1] not in ("auto",):
            raise ConfigError(
                f"{o}: a Slurm job resumes from its own checkpoints after a requeue (resume=auto); "
                "to start from another run, copy its checkpoint into this run's output_dir/checkpoints"
            )
    return [o for o in overrides if _key(o) not in OWN_KEYS]


def sbatch_header(cfg: FtdistConfig, output: str, array_size: int | None = None) -> str:
    sl = cfg.slurm
    opts = [
        f"--job-name={sl.job_name or cfg.experiment_name}",
        f"--nodes={sl.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the node's workers
    ]
    if sl.gpus_per_node:
        opts.append(f"--gpus-per-node={sl.gpus_per_node}")
    for flag, value in (("cpus-per-task", sl.cpus_per_task), ("mem", sl.mem), ("partition", sl.partition),
                        ("account", sl.account), ("qos", sl.qos)):
        if value is not None:
            opts.append(f"--{flag}={value}")
    opts.append(f"--time={sl.time}")
    if sl.signal_seconds:
        opts.append(f"--signal=B:USR1@{sl.signal_seconds}")
    if sl.requeue:
        opts.append("--requeue")
    opts += ["--open-mode=append", f"--output={output}"]
    if array_size is not None:
        limit = f"%{sl.array_parallelism}" if sl.array_parallelism else ""
        opts.append(f"--array=0-{array_size - 1}{limit}")
    opts += sl.sbatch_args
    return "\n".join(f"#SBATCH {o}" for o in opts)


def _setup_lines(cfg: FtdistConfig) -> str:
    lines = list(cfg.slurm.setup)
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in cfg.slurm.env.items()]
    return "\n".join(lines)


def render(cfg: FtdistConfig, run_dir: Path, sweep: list[list[str]]) -> str:
    """The job script; one run when sweep has one entry, else an array job over the entries."""
    sl = cfg.slurm
    array = len(sweep) > 1
    template = (TEMPLATE_DIR / ("array.sbatch" if array else "train.sbatch")).read_text()
    output = str(run_dir / ("slurm-%A_%a.out" if array else "slurm-%j.out"))
    quoted = [" ".join(shlex.quote(o) for o in job_overrides(combo)) for combo in sweep]
    values = {
        "SBATCH": sbatch_header(cfg, output, len(sweep) if array else None),
        "SETUP": _setup_lines(cfg),
        "PYTHON": shlex.quote(sl.python or sys.executable),
        "NPROC_PER_NODE": str(slurm_procs_per_node(sl)),
        "RDZV_PORT": str(sl.port or ""),
        "MAX_RESTARTS": str(sl.max_restarts),
        "REQUEUE": "1" if sl.requeue else "0",
        "RUN_DIR": shlex.quote(str(run_dir)),
        "OVERRIDES": quoted[0],
        "SWEEP": "\n".join(f"  {shlex.quote(q)}" for q in quoted),
        "RUN_STEP": (TEMPLATE_DIR / "run_step.sh").read_text().rstrip("\n"),
    }
    for name, value in values.items():
        template = template.replace("{{" + name + "}}", value)
    return template


def strategy_for_processes(cfg: FtdistConfig, processes: int) -> list[str]:
    """The override a job of `processes` ranks adds: strategy=single cannot use more than one
    process, and DDP is what it becomes with more ranks."""
    if cfg.strategy.name != "single" or processes <= 1:
        return []
    print(f"ftdist.slurm: strategy=single with {processes} processes: the job runs strategy=ddp "
          "(set strategy= to choose another)", file=sys.stderr)
    return ["strategy=ddp"]


def plan(overrides: list[str], multirun: bool) -> tuple[FtdistConfig, Path, list[list[str]]]:
    """Check every run of the job; returns the first run's config, the run directory and the runs."""
    from ftdist.objectives import check_objective

    sweep = command_line_runs(overrides, multirun)
    configs = []
    for combo in sweep:
        cfg = load_config(compose(combo))
        check_objective(cfg)  # before the job waits in the queue
        extra = strategy_for_processes(cfg, cfg.slurm.nodes * slurm_procs_per_node(cfg.slurm))
        if extra:
            combo += extra
            cfg = load_config(compose(combo))
        configs.append(cfg)
    run_dir = Path(configs[0].output_dir).resolve()
    return configs[0], run_dir, sweep


def submit(script_path: Path) -> str:
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch is not on PATH: run on a Slurm login node, or use slurm.dry_run=true")
    out = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ConfigError(f"sbatch {script_path} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def main(argv: list[str]) -> int:
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    try:
        cfg, run_dir, sweep = plan(overrides, multirun)
        script = render(cfg, run_dir, sweep)
        if cfg.slurm.dry_run:
            print(script, end="")
            return 0
        run_dir.mkdir(parents=True, exist_ok=True)
        script_path = run_dir / "job.sbatch"
        script_path.write_text(script)
        job_id = submit(script_path)
    except ConfigError as e:
        print(f"ftdist.slurm: ConfigError: {e}", file=sys.stderr)
        return 2
    runs = f"{len(sweep)} array tasks, runs in {run_dir}/0..{len(sweep) - 1}" if len(sweep) > 1 else f"run dir {run_dir}"
    print(f"submitted job {job_id}: {script_path} ({runs})")
    return 0


# --- hydra/launcher=slurm: inside each job that hydra-submitit-launcher submits ---------------


def in_submitit_job() -> bool:
    """True in the process hydra-submitit-launcher runs inside a Slurm job (not yet a torchrun worker)."""
    import os

    from hydra.core.hydra_config import HydraConfig

    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    return "submitit" in launcher and "SLURM_JOB_ID" in os.environ and "LOCAL_RANK" not in os.environ


def run_torchrun_in_job(dcfg) -> None:
    """Start this node's torchrun for the sweep run Hydra gave this job, and wait for it.

    Same launch as the sbatch templates: c10d rendezvous on the job's first node, one torchrun
    per node, workers per node from slurm.procs_per_node (or the GPUs).
    """
    import os

    from hydra.core.hydra_config import HydraConfig

    cfg = load_config(dcfg)
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    procs = slurm_procs_per_node(cfg.slurm)
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    overrides += strategy_for_processes(cfg, procs * nodes)
    job_id = int(os.environ["SLURM_JOB_ID"])
    nodelist = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                              capture_output=True, text=True, check=True).stdout.split()
    port = cfg.slurm.port or 20000 + job_id % 20000
    run_dir = hc.runtime.output_dir
    cmd = [
        cfg.slurm.python or sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(nodes), "--nproc_per_node", str(procs),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{nodelist[0]}:{port}", "--rdzv_id", str(job_id),
        "--max_restarts", str(cfg.slurm.max_restarts),
        "-m", "ftdist.train", *[o for o in overrides if _key(o) != "output_dir"], f"output_dir={run_dir}",
    ]
    print(f"ftdist: job {job_id}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        raise RuntimeError(f"torchrun exited with {rc} in job {job_id}; see {run_dir}/train.log")


def cli() -> None:
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
