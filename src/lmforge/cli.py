"""The lmforge command line: one subcommand per stage; each parses, loads the recipe, calls the stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lmforge.errors import LmforgeError

app = typer.Typer(help="lmforge: prepare data, train tokenizers, pretrain, evaluate and generate.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipe_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train tokenizers.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(tokenizer_app, name="tokenizer")

SET_HELP = "Override a recipe field, e.g. --set train.lr=3e-4 (repeatable)."


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _load(recipe_file: Path, overrides: List[str]):
    """A pretraining recipe, or a fine-tuning recipe (one with a `task:` key)."""
    from lmforge.recipe import load_recipe, read_yaml_mapping
    if Path(recipe_file).is_file() and "task" in read_yaml_mapping(recipe_file, "a recipe is a mapping of sections"):
        from lmforge.finetune import load_finetune_recipe
        return load_finetune_recipe(recipe_file, overrides)
    return load_recipe(recipe_file, overrides)


@app.command()
def quickstart(out: Path = typer.Option(Path("runs/quickstart"), help="Folder for the corpus and both runs."),
               tiny: bool = typer.Option(False, help="A seconds-long version (for smoke tests)."),
               progress: bool = typer.Option(True, help="Show progress bars.")):
    """Build a two-domain corpus from the Python standard library, pretrain a causal LM and a masked LM
    on it, report per-domain perplexity and print samples."""
    from lmforge.quickstart import quickstart as run
    try:
        run(out, tiny=tiny, show_progress=progress)
    except LmforgeError as err:
        _fail(err)


@app.command()
def prep(recipe: Path = typer.Argument(..., help="Prep recipe YAML file."),
         set_: List[str] = typer.Option([], "--set", help="Override a recipe field, e.g. --set dedup.threshold=0.6."),
         force: bool = typer.Option(False, help="Replace an existing output folder."),
         progress: bool = typer.Option(True, help="Show a progress bar.")):
    """Normalise, filter, deduplicate, split and mix raw text into a dataset folder that pretraining reads."""
    from lmforge.prep import load_prep_recipe, prep as run
    try:
        out = run(load_prep_recipe(recipe, set_), force=force, show_progress=progress)
        typer.echo(f"prepared data: {out} (report: {out / 'report.md'})")
    except LmforgeError as err:
        _fail(err)


@app.command()
def pretrain(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
             set_: List[str] = typer.Option([], "--set", help=SET_HELP),
             resume: bool = typer.Option(False, help="Continue from the run folder's latest checkpoint."),
             force: bool = typer.Option(False, help="Delete an existing run folder and start over."),
             progress: bool = typer.Option(True, help="Show a progress bar.")):
    """Pretrain (causal LM or masked LM) as the recipe says. Runs unchanged under torchrun."""
    from lmforge.pretrain import pretrain as run
    try:
        run_dir = run(_load(recipe, set_), resume=resume, force=force, show_progress=progress)
        typer.echo(f"run folder: {run_dir}")
    except LmforgeError as err:
        _fail(err)


@app.command()
def finetune(recipe: Path = typer.Argument(..., help="Fine-tuning recipe YAML file (task: classification or ner)."),
             set_: List[str] = typer.Option([], "--set", help=SET_HELP),
             resume: bool = typer.Option(False, help="Continue from the run folder's latest checkpoint."),
             force: bool = typer.Option(False, help="Delete an existing run folder and start over."),
             progress: bool = typer.Option(True, help="Show a progress bar.")):
    """Fine-tune a checkpoint for text classification or NER (full, frozen layers or LoRA/peft); writes the model,
    reports for the validation and test files, and a model card."""
    from lmforge.finetune import finetune as run, load_finetune_recipe
    try:
        run_dir = run(load_finetune_recipe(recipe, set_), resume=resume, force=force, show_progress=progress)
        typer.echo(f"run folder: {run_dir}")
    except LmforgeError as err:
        _fail(err)


@app.command()
def predict(run_dir: Path = typer.Argument(..., help="Fine-tuning run folder (or an HF classifier folder)."),
            input: Path = typer.Option(..., "--input", help="JSONL/CSV/TSV/Parquet rows, or a .txt file (one text per line)."),
            output: Path = typer.Option(..., "--output", help="JSONL file to write, one line per input."),
            batch_size: int = typer.Option(64, min=1, help="Inputs per batch."),
            model: Optional[str] = typer.Option(None, help="'final' (default), 'best' or a folder.")):
    """Label new texts: a label and scores per row, or NER tags and entity spans with character offsets."""
    from lmforge.finetune import predict_file
    try:
        n = predict_file(run_dir, input, output, batch_size=batch_size, which=model)
        typer.echo(f"{n} predictions written to {output}")
    except LmforgeError as err:
        _fail(err)
    except OSError as err:
        _fail(LmforgeError(f"{output}: cannot write ({err.strerror})"))


@app.command("eval")
def eval_(run_dir: Path = typer.Argument(..., help="Run folder (or a checkpoint folder inside one)."),
          split: str = typer.Option("validation", help="'validation' or 'train' ('test' for fine-tuning runs)."),
          file: Optional[Path] = typer.Option(None, help="Fine-tuning runs: score this file as the split."),
          model: Optional[str] = typer.Option(None, help="'final', 'best', 'latest' or a folder."),
          max_batches: Optional[int] = typer.Option(None, help="Evaluate at most this many batches."),
          per_domain: bool = typer.Option(True, help="Show the per-domain table."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Perplexity (causal LM) or masked-token loss/perplexity (masked LM), overall and per domain; for a
    fine-tuning run, the task report (accuracy/F1/MCC or entity-level scores) of a split."""
    from lmforge.evaluate import evaluate_run, format_table
    from lmforge.finetune.predict import evaluate_task_run, is_task_run
    if is_task_run(run_dir):
        if split not in ("validation", "test", "train"):
            _fail(LmforgeError(f"--split: expected 'validation', 'test' or 'train', got {split!r}"))
        try:
            metrics = evaluate_task_run(run_dir, split, file, which=model)
        except LmforgeError as err:
            _fail(err)
        if as_json:
            typer.echo(json.dumps(metrics, indent=2))
        return
    if split not in ("validation", "train"):
        _fail(LmforgeError(f"--split: expected 'validation' or 'train', got {split!r}"))
    try:
        metrics = evaluate_run(run_dir, split=split, which=model, max_batches=max_batches)
    except LmforgeError as err:
        _fail(err)
    if not metrics or "loss" not in metrics:
        _fail(LmforgeError(f"{run_dir}: the {split} split holds no full block to evaluate"))
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
    else:
        kind = "perplexity" if metrics["objective"] == "clm" else "masked-token loss / perplexity"
        shown = metrics if per_domain else {k: v for k, v in metrics.items() if "/" not in k}
        typer.echo(format_table(shown, f"{run_dir} — {split} {kind}"))
    (Path(run_dir) / f"eval-{split}.json").write_text(json.dumps(metrics, indent=2))


@app.command()
def generate(run_dir: Path = typer.Argument(..., help="Causal LM run folder or HF model folder."),
             prompt: str = typer.Option("", help="Text to continue."),
             max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate."),
             temperature: float = typer.Option(0.8, min=0.0, help="0 means greedy."),
             top_k: Optional[int] = typer.Option(50, min=1, help="Sample from the k most likely tokens."),
             top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Nucleus sampling mass."),
             seed: int = typer.Option(0, help="Sampling seed.")):
    """Continue a prompt with a causal LM."""
    from lmforge.generate import generate_text
    from lmforge.runs import open_run
    try:
        _, model, tokenizer = open_run(run_dir)
        typer.echo(prompt + generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
    except LmforgeError as err:
        _fail(err)


@recipe_app.command("show")
def recipe_show(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
                set_: List[str] = typer.Option([], "--set", help=SET_HELP)):
    """Validate a recipe and print it resolved, with every default filled in."""
    try:
        typer.echo(_load(recipe, set_).to_yaml(), nl=False)
    except LmforgeError as err:
        _fail(err)


@recipe_app.command("fields")
def recipe_fields():
    """List every recipe field with its default and meaning."""
    from lmforge.recipe import Recipe
    for section, field in Recipe.model_fields.items():
        cls = field.annotation
        if not hasattr(cls, "model_fields"):
            typer.echo(f"{section}: {field.description or ''}")
            continue
        typer.echo(f"[{section}]")
        for name, f in cls.model_fields.items():
            default = f.default if f.default_factory is None else f.default_factory()
            typer.echo(f"  {section}.{name} = {default!r}  — {f.description or ''}")


@tokenizer_app.command("train")
def tokenizer_train(recipe: Path = typer.Argument(..., help="Recipe YAML (its data and tokenizer sections)."),
                    out: Path = typer.Option(..., help="Folder to save the tokenizer in (HF format)."),
                    set_: List[str] = typer.Option([], "--set", help=SET_HELP)):
    """Train a WordPiece, byte-level BPE, Unigram or character tokenizer on the recipe's training split."""
    from lmforge.tokenizer import save_tokenizer, train_tokenizer_for
    try:
        r = _load(recipe, set_)
        tok = train_tokenizer_for(r.data, r.tokenizer)
        save_tokenizer(tok, out)
        typer.echo(f"{r.tokenizer.kind} tokenizer with {len(tok)} tokens saved to {out}")
    except LmforgeError as err:
        _fail(err)
    except OSError as err:
        _fail(LmforgeError(f"{out}: cannot write ({err.strerror})"))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
