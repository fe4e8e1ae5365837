"""The evaluation report: report.json (every figure), report.md, a self-contained report.html
and PNG plots under RUN_DIR/eval/, the console summary, and the same figures logged to W&B.

md and html are rendered from one list of blocks, so the two always show the same figures.
Sections the report dict lacks are rendered as "not measured", never silently left out.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path

# Explicit plot colours: a browser test finds the plots in a screenshot by these pixels.
TRAIN_LOSS_COLOUR = "#d62728"
EVAL_LOSS_COLOUR = "#1f3fbf"
BASE_COLOUR = "#8c8c8c"
TUNED_COLOUR = "#2ca02c"
NOT_MEASURED = "not measured"
# The data report's figures a reader wants first; its other non-empty fields follow.
DATA_KEYS = ("source", "validation_source", "rows_read", "train_rows", "val_rows", "bad_rows", "val_bad_rows",
             "truncated", "val_truncated", "dropped_no_labels", "val_dropped_no_labels",
             "train_examples", "val_examples", "train_tokens", "val_tokens")  # fmt: skip


# How many units a figure was computed over (generation_n, eval_label_tokens, eval_documents, ...).
COUNT_SUFFIXES = ("_n", "_tokens", "_documents", "_pairs", "sample_len")
# Figures in their own units: losses, perplexities, rewards, margins, log-probabilities.
UNBOUNDED = ("loss", "perplexity", "margin", "reward_", "rewards/chosen", "rewards/rejected", "logps/chosen",
             "logps/rejected", "seconds")


def _is_count(name: str) -> bool:
    return name.endswith(COUNT_SUFFIXES)


def _is_fraction(name: str) -> bool:
    """Generation, accuracy and harness metrics are fractions in [0, 1]; counts, losses,
    perplexities, rewards and log-probabilities are not (chosen_preferred is a fraction)."""
    if _is_count(name):
        return False
    return name.endswith("chosen_preferred") or not any(marker in name for marker in UNBOUNDED)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_value(name: str, value) -> str:
    if value is None:
        return "—"
    if not _is_number(value) or not math.isfinite(value):
        return str(value)
    if _is_count(name):
        return str(int(value))
    return f"{value:.1%}" if _is_fraction(name) else f"{value:.4f}"


def format_change(name: str, base, tuned) -> str:
    if not (_is_number(base) and _is_number(tuned)) or _is_count(name):
        return ""
    delta = tuned - base
    return f"{100 * delta:+.1f} pp" if _is_fraction(name) else f"{delta:+.4f}"


def _model_metrics(report: dict, model: str) -> dict:
    return ((report.get("models") or {}).get(model) or {}).get("metrics") or {}


def _metric_names(report: dict) -> list[str]:
    return list(dict.fromkeys([*_model_metrics(report, "base"), *_model_metrics(report, "tuned")]))


def headline(report: dict) -> str | None:
    metric = report.get("task_metric")
    base, tuned = _model_metrics(report, "base"), _model_metrics(report, "tuned")
    if metric is None or metric not in tuned:
        return None
    if metric not in base:
        return f"{metric}: tuned {format_value(metric, tuned[metric])} (base not evaluated)"
    return f"{metric}: base {format_value(metric, base[metric])} -> tuned {format_value(metric, tuned[metric])}"


def forgetting_line(forgetting: dict) -> str:
    f = forgetting
    change = f.get("relative_change")
    line = (f"perplexity on {f.get('reference_data')}: base {format_value('perplexity', f.get('base_perplexity'))}"
            f" -> tuned {format_value('perplexity', f.get('tuned_perplexity'))}")  # fmt: skip
    if _is_number(change):
        line += f" ({change:+.1%})"
    if f.get("max_forgetting") is None:
        return line + "; no threshold set (eval.max_forgetting)"
    # Without a base perplexity (eval.compare_base=false) there is no change to hold to the gate.
    verdict = {True: "EXCEEDED", False: "passed"}.get(f.get("exceeded"), "not checked (no base perplexity)")
    return line + f"; threshold +{f['max_forgetting']:.1%}: {verdict}"


def describe_report(report: dict) -> list[str]:
    """The console lines of `python -m ftdist.eval`: headline, each metric, forgetting."""
    lines = [line] if (line := headline(report)) else []
    base, tuned = _model_metrics(report, "base"), _model_metrics(report, "tuned")
    for name in _metric_names(report):
        b, t = format_value(name, base.get(name)), format_value(name, tuned.get(name))
        change = format_change(name, base.get(name), tuned.get(name))
        lines.append(f"  {name}: base {b} -> tuned {t}" + (f" ({change})" if change else ""))
    if report.get("forgetting"):
        lines.append("forgetting: " + forgetting_line(report["forgetting"]))
    return lines


# --- plots (matplotlib's Figure API: no pyplot state, no backend switch in the caller) ---


def _new_figure(ncols: int = 1, width: float = 8.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4.5), dpi=100, layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_loss_curves(training: dict, path: Path) -> Path | None:
    train = [r for r in training.get("train", []) if _is_number(r.get("loss"))]
    evals = [r for r in training.get("eval", []) if _is_number(r.get("eval_loss"))]
    if not train and not evals:
        return None
    fig, (ax,) = _new_figure()
    if train:
        ax.plot(
            [r["step"] for r in train], [r["loss"] for r in train], color=TRAIN_LOSS_COLOUR, lw=2.5, label="train loss"
        )
    if evals:
        steps, losses = [r["step"] for r in evals], [r["eval_loss"] for r in evals]
        ax.plot(steps, losses, color=EVAL_LOSS_COLOUR, lw=2.5, marker="o", label="eval loss")
    ax.set(xlabel="step", ylabel="loss", title="Training and eval loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return path


def _bars(ax, names: list[str], base: dict, tuned: dict, scale: float = 1.0) -> None:
    xs = range(len(names))
    width = 0.4 if base else 0.6
    if base:
        ax.bar(
            [x - 0.2 for x in xs], [scale * (base.get(n) or 0) for n in names], width, color=BASE_COLOUR, label="base"
        )
    offset = 0.2 if base else 0.0
    ax.bar(
        [x + offset for x in xs], [scale * (tuned.get(n) or 0) for n in names], width, color=TUNED_COLOUR, label="tuned"
    )
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.legend()


def plot_metrics(models: dict, path: Path) -> Path | None:
    base, tuned = (models.get(m, {}).get("metrics") or {} for m in ("base", "tuned"))
    both = {**base, **tuned}
    names = [n for n, v in both.items() if _is_number(v) and not _is_count(n)]
    fractions, others = [n for n in names if _is_fraction(n)], [n for n in names if not _is_fraction(n)]
    if not names:
        return None
    # A loss and a percentage share no axis: each kind gets its own panel.
    fig, axes = _new_figure(ncols=int(bool(fractions)) + int(bool(others)), width=10.0)
    if fractions:
        _bars(axes[0], fractions, base, tuned, scale=100.0)
        axes[0].set(ylabel="%", ylim=(0, 105), title="Task metrics")
    if others:
        _bars(axes[-1], others, base, tuned)
        axes[-1].set(title="Loss (lower is better)")
    fig.suptitle("Base vs tuned" if base else "Tuned (base not evaluated)")
    fig.savefig(path)
    return path


def plot_forgetting(forgetting: dict, path: Path) -> Path | None:
    base, tuned = forgetting.get("base_perplexity"), forgetting.get("tuned_perplexity")
    if not (_is_number(base) and _is_number(tuned)):
        return None
    fig, (ax,) = _new_figure(width=6.0)
    ax.bar(["base", "tuned"], [base, tuned], color=[BASE_COLOUR, TUNED_COLOUR], width=0.5)
    limit, change = forgetting.get("max_forgetting"), forgetting.get("relative_change")
    title = "Forgetting: perplexity " + (f"{change:+.1%}" if _is_number(change) else "change n/a")
    top = max(base, tuned)
    if _is_number(limit):
        ceiling = base * (1 + limit)  # the tuned perplexity the gate allows
        ax.axhline(ceiling, color="black", ls="--", lw=1.5, label=f"threshold: base +{limit:.1%}")
        ax.legend(loc="upper left")
        title += f" (limit +{limit:.1%}: {'EXCEEDED' if forgetting.get('exceeded') else 'passed'})"
        top = max(top, ceiling)
    ax.set(ylabel="perplexity on reference data", title=title, ylim=(0, 1.2 * top))
    fig.savefig(path)
    return path


def write_plots(eval_dir: Path, report: dict) -> dict[str, Path]:
    made = {
        "loss_curves": plot_loss_curves(report.get("training") or {}, eval_dir / "loss_curves.png"),
        "metrics_base_vs_tuned": plot_metrics(report.get("models") or {}, eval_dir / "metrics_base_vs_tuned.png"),
        "forgetting": plot_forgetting(report.get("forgetting") or {}, eval_dir / "forgetting.png"),
    }
    return {name: path for name, path in made.items() if path is not None}


# --- md and html, from one list of blocks: ("h2"|"p"|"pre", text), ("table", header, rows),
# ("img", name, path) ---


def _metrics_section(report: dict) -> list[tuple]:
    base, tuned = _model_metrics(report, "base"), _model_metrics(report, "tuned")
    blocks = [("h2", "Metrics")]
    if not base:
        blocks.append(("p", f"Base model: {NOT_MEASURED} (eval.compare_base=false)."))
    rows = [[n, format_value(n, base.get(n)), format_value(n, tuned.get(n)), format_change(n, base.get(n), tuned.get(n))]
            for n in _metric_names(report)]  # fmt: skip
    models = report.get("models") or {}
    paths = [f"{m}: {models[m].get('path')}" for m in ("base", "tuned") if m in models]
    return [*blocks, ("table", ["metric", "base", "tuned", "change"], rows), ("p", "; ".join(paths))]


def _forgetting_section(report: dict) -> list[tuple]:
    f = report.get("forgetting")
    if not f:
        return [("h2", "Forgetting"), ("p", f"Forgetting: {NOT_MEASURED} (no eval.reference_data).")]
    counts = f"{f.get('documents')} documents, {f.get('tokens')} tokens"
    return [("h2", "Forgetting"), ("p", forgetting_line(f) + f" [{counts}]")]


def _lm_eval_section(report: dict) -> list[tuple]:
    lm = report.get("lm_eval")
    if not lm:
        return [("h2", "lm-evaluation-harness"), ("p", f"lm-evaluation-harness: {NOT_MEASURED}.")]
    base, tuned = lm.get("base") or {}, lm.get("tuned") or {}
    rows = []
    for task in dict.fromkeys([*base, *tuned]):
        b, t = base.get(task) or {}, tuned.get(task) or {}
        for name in dict.fromkeys([*b, *t]):
            rows.append([task, name, format_value(name, b.get(name)), format_value(name, t.get(name)),
                         format_change(name, b.get(name), t.get(name))])  # fmt: skip
    return [("h2", "lm-evaluation-harness"), ("table", ["task", "metric", "base", "tuned", "change"], rows)]


def _data_value(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    return "—" if value is None else str(value)


def _data_section(report: dict) -> list[tuple]:
    data = report.get("data")
    if not data:
        return [("h2", "Data"), ("p", f"Data report: {NOT_MEASURED} (no data_report.json in the run).")]
    extra = [k for k, v in data.items() if k not in DATA_KEYS and v not in (None, 0, {}, [], "")]
    rows = [[k, _data_value(data[k])] for k in [*DATA_KEYS, *extra] if k in data]
    return [("h2", "Data"), ("table", ["field", "value"], rows)]


def _generations_section(report: dict) -> list[tuple]:
    gens = report.get("generations")
    if not gens:
        return [("h2", "Generations"), ("p", f"Generations: {NOT_MEASURED}.")]
    blocks = [("h2", f"Generations ({len(gens)})")]
    for g in gens:
        blocks += [
            ("h3", f"Example {g.get('index')}"),
            ("pre", "prompt", g.get("prompt")),
            ("pre", "reference", g.get("reference")),
        ]
        for model in ("base", "tuned"):
            if model in g:
                scores = (g.get("scores") or {}).get(model) or {}
                shown = ", ".join(f"{k} {format_value(k, v)}" for k, v in scores.items())
                blocks.append(("pre", f"{model}" + (f" ({shown})" if shown else ""), g[model]))
    return blocks


def report_blocks(report: dict, images: dict[str, Path]) -> list[tuple]:
    title = f"Evaluation of {report.get('run_dir', 'a run')}"
    meta = f"objective {report.get('objective')}, created {report.get('created')}"
    blocks = [("h1", title), ("p", meta), ("p", headline(report) or f"Headline task metric: {NOT_MEASURED}.")]
    blocks += _metrics_section(report)
    blocks += [("img", name, path) for name, path in images.items() if name == "metrics_base_vs_tuned"]
    blocks += [("h2", "Training"), *[("img", n, p) for n, p in images.items() if n == "loss_curves"]]
    if "loss_curves" not in images:
        blocks.append(("p", f"Training curves: {NOT_MEASURED}."))
    blocks += _forgetting_section(report) + [("img", n, p) for n, p in images.items() if n == "forgetting"]
    return blocks + _lm_eval_section(report) + _data_section(report) + _generations_section(report)


def _md_cell(text: str) -> str:
    # "<" and "&" would start raw HTML in a Markdown viewer; "|" would split a table cell.
    text = str(text).replace("&", "&amp;").replace("<", "&lt;")
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(block: tuple) -> str:
    kind = block[0]
    if kind in ("h1", "h2", "h3"):
        return "#" * int(kind[1]) + " " + _md_cell(block[1])
    if kind == "p":
        return _md_cell(block[1])
    if kind == "img":
        return f"![{block[1]}]({block[2].name})"
    if kind == "table":
        header, rows = block[1], block[2]
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows])
    text = "" if block[2] is None else str(block[2])
    # A fence longer than any backtick run in the text, which therefore cannot close it.
    fence = "`" * max(3, 1 + max(map(len, re.findall("`+", text)), default=0))
    return f"**{_md_cell(block[1])}**\n\n{fence}text\n{text}\n{fence}"


def render_markdown(blocks: list[tuple]) -> str:
    return "\n\n".join(_md_block(b) for b in blocks) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}
th{background:#f2f2f2}img{max-width:100%;display:block;margin:1em 0}
pre{background:#f7f7f7;border:1px solid #e2e2e2;padding:8px;white-space:pre-wrap;word-break:break-word}
.label{font-weight:600;margin-top:.6em}"""


def _html_block(block: tuple) -> str:
    kind, esc = block[0], html.escape
    if kind in ("h1", "h2", "h3", "p"):
        return f"<{kind}>{esc(str(block[1]))}</{kind}>"
    if kind == "img":
        data = base64.b64encode(block[2].read_bytes()).decode("ascii")
        return f'<img alt="{esc(block[1])}" src="data:image/png;base64,{data}">'
    if kind == "table":
        head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
        body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    text = "" if block[2] is None else str(block[2])
    return f'<div class="label">{esc(block[1])}</div><pre>{esc(text)}</pre>'


def render_html(blocks: list[tuple], title: str) -> str:
    body = "\n".join(_html_block(b) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")  # fmt: skip


def write_report(eval_dir: Path, report: dict) -> dict[str, Path]:
    """report.json, report.md, report.html and the PNG plots into eval_dir; their paths by name
    ("json", "md", "html", and each plot's name: loss_curves, metrics_base_vs_tuned, forgetting)."""
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": eval_dir / "report.json", "md": eval_dir / "report.md", "html": eval_dir / "report.html"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    images = write_plots(eval_dir, report)
    blocks = report_blocks(report, images)
    paths["md"].write_text(render_markdown(blocks))
    paths["html"].write_text(render_html(blocks, title=str(blocks[0][1])), encoding="utf-8")
    return {**paths, **images}


def _flat_metrics(report: dict) -> dict[str, float]:
    out = {}
    for model in ("base", "tuned"):
        out.update({f"eval/{model}/{k}": v for k, v in _model_metrics(report, model).items() if _is_number(v)})
    for k, v in (report.get("forgetting") or {}).items():
        if _is_number(v) or isinstance(v, bool):
            out[f"eval/forgetting/{k}"] = int(v) if isinstance(v, bool) else v
    for model, tasks in (report.get("lm_eval") or {}).items():
        for task, figures in (tasks or {}).items():
            out.update({f"eval/lm_eval/{model}/{task}/{k}": v for k, v in figures.items() if _is_number(v)})
    return out


def log_report_to_wandb(run, report: dict, images: dict[str, Path]) -> None:
    """Each PNG as a wandb.Image (eval/plots/NAME), the metrics as eval/base/... and
    eval/tuned/... (history and summary), and the generations as a wandb.Table."""
    import wandb

    metrics = _flat_metrics(report)
    logged = {
        f"eval/plots/{name}": wandb.Image(str(path)) for name, path in images.items() if Path(path).suffix == ".png"
    }
    columns = ["index", "prompt", "reference", "base", "tuned"]
    gens = report.get("generations") or []
    if gens:
        logged["eval/generations"] = wandb.Table(columns=columns, data=[[g.get(c) for c in columns] for g in gens])
    run.log({**metrics, **logged})
    run.summary.update(metrics)
