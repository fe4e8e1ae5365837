"""Entry point: `python -m ftdist.train [+experiment=NAME] key=value ...` (also under torchrun).

compose + validate the config -> set up ranks -> prepare data -> load model -> Trainer.fit().
Data is prepared before the model loads, so bad rows fail in seconds, not after a 70B load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from ftdist.config import (
    CONF_DIR,
    ConfigError,
    check_packages_import,
    command_line_runs,
    compose,
    load_config,
    register_schemas,
)
from ftdist.constants import (
    EXIT_BAD_INPUT,
    EXIT_CHECKPOINT_WRITE,
    EXIT_FORGETTING,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    EXIT_PREFLIGHT,
)
from ftdist.parallel.process_group import PreflightError, launched_world_size
from ftdist.resilience import NonFiniteError, Preempted

LINGER_S = 3.0  # how long other ranks wait for rank 0's clean-up after bad input

log = logging.getLogger("ftdist")
register_schemas()


def setup_logging(run_dir: Path, is_main: bool) -> None:
    """Rank 0 logs INFO to the console and train.log; other ranks log WARNING and above, tagged
    with their rank. ftdist.console decides which library messages show (each once per job)."""
    from ftdist.console import install

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    rank = "" if is_main else f"[rank {os.environ.get('RANK', '?')}] "
    fmt = f"%(asctime)s %(levelname)s {rank}%(name)s: %(message)s"
    level = logging.INFO if is_main else logging.WARNING
    for handler in handlers:
        handler.setLevel(level)  # also for libraries that set their own loggers to INFO
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install(handlers, is_main)


def agree_run_dir(strategy, proposed: str) -> Path:
    # Each rank resolved ${now:...} on its own clock; rank 0's answer is the run's directory.
    run_dir = Path(strategy.broadcast_object(proposed))
    run_dir.mkdir(parents=True, exist_ok=True)
    if str(run_dir) != proposed and Path(proposed).is_dir() and not any(Path(proposed).iterdir()):
        Path(proposed).rmdir()  # the empty directory Hydra made from this rank's clock
    return run_dir


def run(dcfg: DictConfig, output_dir: str | None = None):
    """Train as configured; returns (trainer, summary). output_dir defaults to Hydra's run dir."""
    from ftdist.data.prepare import DataError, check_data_source
    from ftdist.model.loading import check_model
    from ftdist.objectives import check_objective, scores_sequences
    from ftdist.parallel import build_strategy
    from ftdist.run_dir import claim_run_dir
    from ftdist.tracking import start_wandb

    cfg = load_config(dcfg)
    check_objective(cfg)
    if cfg.dry_run:  # sizing only: no process group, no weights, no data, nothing written
        from ftdist.dry_run import dry_run

        summary = dry_run(cfg)
        hydra_dir = Path(HydraConfig.get().runtime.output_dir) if output_dir is None else None
        if hydra_dir is not None and hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
            hydra_dir.rmdir()  # the run directory Hydra made before run() was called
        return None, summary
    check_packages_import(cfg)
    strategy = build_strategy(cfg.strategy)
    tracker, claim, bad_input = None, None, False
    try:
        # The model's config.json (type, custom code, attention backend) is read before anything
        # is written: a wrong model fails in seconds and leaves no run directory behind.
        check_model(cfg.model, strategy.device, scoring=scores_sequences(cfg.objective.name))
        check_data_source(cfg.data)  # a missing local file, before a hub tokenizer is retried
        if cfg.eval.at_end:
            from ftdist.eval.perplexity import check_reference_source

            check_reference_source(cfg.eval, cfg.data)
        run_dir = agree_run_dir(strategy, output_dir or HydraConfig.get().runtime.output_dir)
        # Before anything is written into it: one run at a time, and what a rerun may do there.
        claim = claim_run_dir(cfg, strategy, run_dir)
        if claim.finished is not None:
            return None, report_finished(run_dir, claim.finished, strategy.is_main)
        # W&B starts before data and model: a set-up error costs seconds, not a 70B load.
        tracker = start_wandb(cfg, strategy, run_dir)
        setup_logging(run_dir, strategy.is_main)
        claim.log_notes()
        trainer, summary = train_in(cfg, dcfg, strategy, run_dir, claim.resume_from, tracker)
        if cfg.eval.at_end and summary.get("complete"):
            evaluate_at_end(cfg, strategy, run_dir, trainer)
        return trainer, summary
    except (ConfigError, DataError, PreflightError):
        bad_input = True  # the run directory goes if this invocation found it empty
        if not strategy.is_main:
            # torchrun stops every rank within 0.1 s of the first one's exit: give rank 0, failing
            # on the same input, time to remove the directory first.
            time.sleep(LINGER_S)
        raise
    finally:
        if tracker is not None:
            tracker.abort()  # finished already, unless the run failed
        if claim is not None:
            claim.close(remove=bad_input)  # after W&B: it writes into the directory until then
        strategy.shutdown()


def train_in(cfg, dcfg: DictConfig, strategy, run_dir: Path, resume_from: Path | None, tracker):
    """Data, model, Trainer.fit() and the run's files, in a run directory this invocation holds."""
    from ftdist.data.chat import CHAT_TEMPLATE_FILE, use_chat_template_file
    from ftdist.model.loading import load_model, load_reference_model, load_tokenizer
    from ftdist.objectives import build_objective
    from ftdist.trainer import Trainer, seed_everything, use_bf16

    run_files = {"config.yaml": OmegaConf.to_yaml(dcfg, resolve=True)}
    log.info(
        "run directory: %s (strategy %s, world size %d, device %s, backend %s)",
        run_dir, cfg.strategy.name, strategy.world_size, strategy.device, strategy.backend,
    )
    seed_everything(cfg.seed)
    if strategy.is_main and resume_from is not None:
        log.info("resuming from %s", resume_from)

    def write_run_files() -> None:
        if strategy.is_main:
            for name, text in run_files.items():
                (run_dir / name).write_text(text)

    if resume_from is None:
        write_run_files()  # now, so a run that fails later still says what it was

    tokenizer = use_chat_template_file(load_tokenizer(cfg.model), cfg.data.chat_template)
    if cfg.data.chat_template is not None:  # kept with the run, for export from a checkpoint
        run_files[CHAT_TEMPLATE_FILE] = tokenizer.chat_template
    objective = build_objective(cfg, tokenizer)
    train_examples, val_examples, report = objective.prepare_data(tokenizer)
    if cfg.eval.at_end and cfg.eval.reference_data is not None:  # read now: a bad file fails before training
        from ftdist.eval.perplexity import read_reference_text

        read_reference_text(cfg.eval, cfg.data, tokenizer, cfg.seed)
    run_files["data_report.json"] = json.dumps(report.to_dict(), indent=2) + "\n"
    if resume_from is None:
        write_run_files()
    log.info("data: %s", json.dumps(report.to_dict()))

    with strategy.loading_context(bf16=use_bf16(cfg, strategy.device)):
        # A scoring objective's head is known once its data is (the classes of the training split).
        loaded = load_model(cfg.model, strategy.device, cfg.peft, strategy, head=getattr(objective, "head", None))
        reference = load_reference_model(cfg, strategy) if objective.loads_reference_model else None
    # The tokenizer that made the examples (its data.chat_template included) is the one final/ saves.
    trainer = Trainer(cfg, strategy, loaded.model, tokenizer, train_examples, val_examples, run_dir, tracker, objective,
                      reference_model=reference)
    del reference  # the trainer holds it while needed (a precomputed reference is freed after its pass)
    # A resumed run's files replace the old ones only once its checkpoint is accepted.
    summary = trainer.fit(resume_from, on_resumed=write_run_files)
    if cfg.train.save_final and summary["complete"]:
        summary["final_dir"] = str(trainer.save_final())
    trainer.metrics.close(summary)
    if strategy.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        report_summary(summary)
    # Leave together: a rank tearing down gloo while another still talks to it aborts.
    strategy.barrier()
    return trainer, summary


def evaluate_at_end(cfg, strategy, run_dir: Path, trainer) -> None:
    """eval.at_end: the whole `ftdist.eval RUN_DIR` (base versus final/, forgetting gate, report),
    with the trained model's memory released first."""
    from ftdist.eval.runner import run_evaluation

    trainer.release_model()
    run_evaluation(cfg, strategy, run_dir, run_dir / "eval")


def report_finished(run_dir: Path, summary: dict, is_main: bool) -> dict:
    """A rerun of a finished run (resume=auto): one line, and its files stay as they are."""
    if is_main:
        print(
            f"ftdist: {run_dir} holds a finished run (summary.json, {summary.get('steps', '?')} steps): nothing to do; "
            "to train again use a new output_dir, or resume=none overwrite=true",
            file=sys.stderr,
        )
    return summary


def report_summary(summary: dict) -> None:
    if "exact_match_before" in summary:
        log.info(
            "held-out exact match: base model %.1f%% -> fine-tuned %.1f%%",
            100 * summary["exact_match_before"],
            100 * summary["exact_match_after"],
        )
    if "eval_rewards/accuracies_before" in summary:
        log.info(
            "held-out reward accuracy: %.1f%% at step 0 -> %.1f%% after training",
            100 * summary["eval_rewards/accuracies_before"],
            100 * summary["eval_rewards/accuracies_after"],
        )
    if "classification" in summary:
        from ftdist.objectives.class_metrics import describe_report

        for line in describe_report(summary["classification"]):
            log.info("%s", line)
    if "eval_accuracy_before" in summary:
        log.info("held-out %s: %.1f%% at step 0 -> %.1f%% after training",
                 "accuracy" if "classification" in summary else "pairs ranked right",
                 100 * summary["eval_accuracy_before"], 100 * summary["eval_accuracy_after"])
    if "eval_logps/chosen_preferred_before" in summary:
        log.info(
            "held-out pairs whose chosen response the model finds likelier: %.1f%% -> %.1f%%",
            100 * summary["eval_logps/chosen_preferred_before"],
            100 * summary["eval_logps/chosen_preferred_after"],
        )
    log.info("summary: %s", json.dumps(summary))


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from ftdist.checkpoint import CheckpointWriteError
    from ftdist.data.prepare import DataError
    from ftdist.eval.runner import ForgettingExceeded
    from ftdist.run_dir import remove_if_empty
    from ftdist.slurm import in_submitit_job, run_torchrun_in_job

    if in_submitit_job():  # hydra/launcher=slurm: this process only starts the node's torchrun
        run_torchrun_in_job(dcfg)
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    fresh = not run_dir.is_dir() or not any(run_dir.iterdir())  # Hydra made it for this run
    try:
        run(dcfg)
        leave(0)
    except Preempted as e:
        say(f"ftdist: {e}")
        leave(EXIT_PREEMPTED)
    except PreflightError as e:
        say(f"ftdist: PreflightError: {e}")
        remove_if_empty(run_dir, fresh)
        leave(EXIT_PREFLIGHT)
    except ForgettingExceeded as e:  # the run and its report are complete; the gate failed
        say(f"ftdist: forgetting: {e}")
        leave(EXIT_FORGETTING)
    except NonFiniteError as e:
        say(f"ftdist: NonFiniteError: {e}")
        leave(EXIT_NONFINITE)
    except CheckpointWriteError as e:  # disk full or quota: names the space needed and free
        say(f"ftdist: CheckpointWriteError: {e}")
        leave(EXIT_CHECKPOINT_WRITE)
    except (ConfigError, DataError) as e:
        # Bad input is the user's to fix: a one-line message, not a library traceback.
        say(f"ftdist: {type(e).__name__}: {e}")
        remove_if_empty(run_dir, fresh)
        leave(EXIT_BAD_INPUT)


def say(line: str) -> None:
    """One line to stderr in one write: ranks share torchrun's stderr, and print's separate
    writes of text and newline let two ranks' lines run into one."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (line + "\n").encode())


def leave(code: int) -> None:
    """End the process with `code`: through exit_now under torchrun (every code, 75 included: a
    preempted rank aborted in teardown in CI, and torchrun then reported exit 1, not 75)."""
    if launched_world_size() > 1:
        exit_now(code)
    if code != 0:
        sys.exit(code)


def exit_now(code: int) -> None:
    """Leave a finished multi-process run without interpreter teardown.

    Everything is written and the process group destroyed by then, but torch's C++ objects
    still referenced from Python (device meshes, gloo pairs) are destroyed in arbitrary order
    at interpreter exit, and under load one rank sometimes aborted there ("terminate called
    without an active exception", exit -6) after a complete run; torchrun then reports failure.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_command_line(argv: list[str]) -> tuple[list[str], object] | None:
    """Compose and validate every run of this command line (each one of a -m sweep) before Hydra
    starts: Hydra would make the run directory first, and report its own composition errors as a
    block on stderr with exit code 1.

    Returns, for a single run (no -m), its overrides and its config's hydra.mode: what hydra.main's
    get_mode composes the whole config once more to read (see known_hydra_mode); None otherwise."""
    from ftdist.compat import require_private

    get_args_parser = require_private(
        "hydra._internal.utils", "get_args_parser", "hydra-core", "ftdist parses the command line as hydra.main will"
    )
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # not Hydra's syntax: hydra.main prints its usage
        return None
    runs = command_line_runs(args.overrides, args.multirun)  # keys checked even where Hydra answers below
    asks_hydra = (args.help, args.hydra_help, args.cfg, args.info, args.shell_completion, args.config_path,
                  args.config_name, args.config_dir, args.experimental_rerun)
    if any(asks_hydra):  # another primary config, or Hydra answering a question: Hydra's to check
        return None
    from ftdist.objectives import check_objective

    known = None
    for overrides in runs:
        dcfg = compose(overrides, hydra_node=True)
        try:
            known = (list(overrides), dcfg.hydra.mode)
        except Exception:  # noqa: BLE001 - an odd hydra.mode override: get_mode composes and reads it itself
            known = None
        with open_dict(dcfg):
            del dcfg["hydra"]  # as Hydra's compose does without return_hydra_config
        check_objective(load_config(dcfg))
    return None if args.multirun else known


@contextlib.contextmanager
def known_hydra_mode(known: tuple[list[str], object] | None):
    """hydra.main's get_mode composes the config of the command line (0.3 s) only to read its
    hydra.mode (RUN, MULTIRUN or None), before run() composes it again for the job. Where
    check_command_line composed these very overrides already, get_mode answers with the value it
    read; for anything else (another config name, other overrides) it composes as before."""
    if known is None:
        yield
        return
    from ftdist.compat import require_attr, require_private

    needed_for = "ftdist tells Hydra the hydra.mode it already composed"
    hydra_class = require_private("hydra._internal.hydra", "Hydra", "hydra-core", needed_for)
    composing = require_attr(hydra_class, "get_mode", "hydra-core", needed_for)
    composed_overrides, mode = known

    def get_mode(self, config_name, overrides):
        if config_name == "config" and list(overrides) == composed_overrides:
            return mode
        return composing(self, config_name=config_name, overrides=overrides)

    hydra_class.get_mode = get_mode
    try:
        yield
    finally:
        hydra_class.get_mode = composing


def cli() -> None:
    try:
        known = check_command_line(sys.argv[1:])
    except ConfigError as e:
        say(f"ftdist: ConfigError: {e}")
        sys.exit(EXIT_BAD_INPUT)
    with known_hydra_mode(known):
        main()


if __name__ == "__main__":
    cli()
