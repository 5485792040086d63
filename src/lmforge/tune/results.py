"""A study's results in its folder: the trials table (Markdown and CSV), the best recipe ready to run, and plots.

    STUDY/
      study.json            recipe, stage, storage, objectives and space of the study
      trials.md trials.csv  every trial: number, state, objective values, parameters, time, why it stopped, folder
      best.yaml             the recipe with the best trial's values applied (multi-objective: best-<n>.yaml per
                            trial of the Pareto front)
      history.png importance.png parallel.png pareto.png     Optuna's matplotlib plots (those the trials allow)
      trials/trial-NNNN/    each trial's ordinary run folder (its recipe.yaml, metrics, final/ ...)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from lmforge.recipe import validate_tree
from lmforge.tasks.report import write_text_atomic

PLOTS = ("history", "importance", "parallel", "pareto")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_rows(study: optuna.Study, metrics: list[str]) -> tuple[list[str], list[list]]:
    names = sorted({k for t in study.trials for k in t.params})
    header = ["trial", "state", *metrics, *names, "seconds", "note", "run folder"]
    rows = []
    for t in study.trials:
        values = t.values if t.values is not None else [None] * len(metrics)
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        note = t.user_attrs.get("stopped") or t.user_attrs.get("error") or (
            f"retry of trial {t.user_attrs['retry_of']}" if "retry_of" in t.user_attrs else "")
        rows.append([t.number, t.state.name.lower(), *values, *(t.params.get(n) for n in names),
                     round(seconds, 1) if seconds is not None else None, note, t.user_attrs.get("run_dir", "")])
    return header, rows


def best_trials(study: optuna.Study) -> list:
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        return []
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]


def best_recipe(info: dict, trial) -> str:
    """The study's recipe with `trial`'s values applied, as YAML (validated; output.dir is the recipe's own)."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in trial.params.items()] + info.get("fixed_overrides", [])
    from_stage = info["root"]
    recipe = validate_tree(from_stage, info["recipe_tree"], info["recipe"], overrides)
    head = (f"# The best trial ({trial.number}) of study '{info['study']}': "
            + ", ".join(f"{m} {v:.6g}" for m, v in zip(info["metrics"], trial.values)) + "\n")
    return head + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def write_results(study: optuna.Study, info: dict, folder: Path) -> dict:
    """Write the table, the best recipe(s) and the plots; returns a summary (best trial(s), counts, files)."""
    metrics = info["metrics"]
    header, rows = trial_rows(study, metrics)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    write_text_atomic(folder / "trials.csv", buf.getvalue())
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    best = best_trials(study)
    title = f"# Study `{info['study']}`: {', '.join(f'{m} ({d})' for m, d in zip(metrics, info['directions']))}"
    counts = {s.name.lower(): sum(t.state == s for t in study.trials) for s in TrialState}
    lines = [title, "", ", ".join(f"{n} {k}" for k, n in counts.items() if n), ""]
    if best:
        label = "Best trial" if len(best) == 1 else f"Pareto front ({len(best)} trials)"
        lines += [f"{label}: " + "; ".join(
            f"trial {t.number}: " + ", ".join(f"{m} {v:.4g}" for m, v in zip(metrics, t.values))
            + f" (`{t.user_attrs.get('run_dir', '')}`)" for t in best), ""]
    write_text_atomic(folder / "trials.md", "\n".join(lines + md) + "\n")
    files = ["trials.md", "trials.csv"]
    for old in folder.glob("best*.yaml"):
        old.unlink()
    for i, t in enumerate(best):
        name = "best.yaml" if len(best) == 1 else f"best-{t.number}.yaml"
        write_text_atomic(folder / name, best_recipe(info, t))
        files.append(name)
    files += write_plots(study, folder, metrics)
    return {"best": [{"trial": t.number, "values": dict(zip(metrics, t.values)), "params": t.params,
                      "run_dir": t.user_attrs.get("run_dir")} for t in best], "counts": counts, "files": files}


def write_plots(study: optuna.Study, folder: Path, metrics: list[str]) -> list[str]:
    """Optuna's matplotlib plots, each where the finished trials allow it (importance needs two or more)."""
    # matplotlib loads only when a study writes its plots
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    multi = len(metrics) > 1
    plots = {"history": lambda: vis.plot_optimization_history(study, target=(lambda t: t.values[0]) if multi else None,
                                                               target_name=metrics[0])}
    if len(done) >= 2 and any(study.trials[0].params.values()):
        plots["importance"] = lambda: vis.plot_param_importances(
            study, target=(lambda t: t.values[0]) if multi else None, target_name=metrics[0])
        plots["parallel"] = lambda: vis.plot_parallel_coordinate(
            study, target=(lambda t: t.values[0]) if multi else None, target_name=metrics[0])
    if multi and done:
        plots["pareto"] = lambda: vis.plot_pareto_front(study, target_names=metrics[:3])
    written = []
    for name, draw in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            logging.getLogger("optuna").setLevel(logging.ERROR)
            try:
                ax = draw()
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. importance when every trial has the same values
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        tmp = folder / f".{name}.png.tmp"
        fig.savefig(tmp, format="png", dpi=100)
        tmp.replace(folder / f"{name}.png")
        plt.close(fig)
        written.append(f"{name}.png")
    return written
