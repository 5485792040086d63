"""The lmforge command line: one subcommand per stage; each parses its arguments and calls the stage's public
entry (the function the Python API exports). Nothing imports this module.

Each command imports its stage when it runs: `lmforge --help` and `lmforge recipe show` then start in a fraction
of a second instead of loading torch and transformers first."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lmforge.errors import LmforgeError, RunInterrupted

app = typer.Typer(help="lmforge: prepare data, train tokenizers, pretrain, evaluate and generate.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipe_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train tokenizers.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(tokenizer_app, name="tokenizer")
experts_app = typer.Typer(help="Domain experts (Branch-Train-Merge): branch a seed per domain, train, merge.",
                          no_args_is_help=True)
app.add_typer(experts_app, name="experts")

SET_HELP = "Override a recipe field, e.g. --set train.lr=3e-4 (repeatable)."


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _load(recipe_file: Path, overrides: List[str]):
    """A pretraining recipe, a fine-tuning recipe (one with a `task:` key) or a compress recipe (`steps:`)."""
    from lmforge.recipe import load_recipe, read_yaml_mapping
    keys = read_yaml_mapping(recipe_file, "a recipe is a mapping of sections") if Path(recipe_file).is_file() else {}
    if "task" in keys:
        from lmforge.tasks.config import load_finetune_recipe
        return load_finetune_recipe(recipe_file, overrides)
    if "steps" in keys:
        from lmforge.compress.config import load_compress_recipe
        return load_compress_recipe(recipe_file, overrides)
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
         progress: bool = typer.Option(True, help="Show a progress bar."),
         engine: Optional[str] = typer.Option(None, help="local or ray (default: the recipe's prep.engine, local)."),
         address: Optional[str] = typer.Option(
             None, help="HOST:PORT of a running Ray cluster (ray engine; default: start one on this machine).")):
    """Normalise, filter, deduplicate, split and mix raw text into a dataset folder that pretraining reads."""
    from lmforge.prep import prep as run
    try:
        out = run(recipe, overrides=set_, force=force, show_progress=progress, engine=engine, address=address)
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
    from lmforge.finetune import finetune as run
    try:
        run_dir = run(recipe, overrides=set_, resume=resume, force=force, show_progress=progress)
        typer.echo(f"run folder: {run_dir}")
    except LmforgeError as err:
        _fail(err)


@app.command()
def distill(recipe: Path = typer.Argument(..., help="A fine-tuning or pretraining recipe YAML file with a distill: "
                                                    "section (teacher, temperature, alpha, student_layers)."),
            set_: List[str] = typer.Option([], "--set", help=SET_HELP),
            resume: bool = typer.Option(False, help="Continue from the run folder's latest checkpoint."),
            force: bool = typer.Option(False, help="Delete an existing run folder and start over."),
            progress: bool = typer.Option(True, help="Show a progress bar.")):
    """Train a smaller student on a teacher's soft targets (a fine-tuned classifier or tagger, a language model, or
    a domain-experts ensemble); the student's run folder is an ordinary run with a model card naming its teacher."""
    from lmforge.distill import distill as run
    try:
        result = run(recipe, overrides=set_, resume=resume, force=force, show_progress=progress)
        typer.echo(f"run folder: {result}")
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


@app.command()
def index(run_dir: Path = typer.Argument(..., help="Embedding run folder (task: embedding), or a "
                                                   "sentence-transformers folder."),
          input: Path = typer.Option(..., "--input", help="Documents: a .txt file (one per line, id = line number) "
                                                          "or JSONL/CSV/TSV/Parquet records."),
          out: Path = typer.Option(..., "--out", help="Index folder to write."),
          text_field: str = typer.Option("text", help="Field or column holding each document's text."),
          id_field: str = typer.Option("id", help="Field or column holding each document's id (default: its line)."),
          batch_size: int = typer.Option(64, min=1, help="Documents per batch."),
          force: bool = typer.Option(False, help="Replace --out if it exists.")):
    """Embed a corpus into an exact vector index on disk (memory-mapped float32 vectors, ids, texts and the
    fingerprint of the model that made them)."""
    from lmforge.index import index as run
    try:
        result = run(run_dir, input, out, text_field=text_field, id_field=id_field, batch_size=batch_size,
                     force=force)
        m = result.metrics
        typer.echo(f"indexed {m['documents']} documents ({m['dim']} dimensions, {m['documents_per_s']:.0f} "
                   f"documents/s) into {result}")
    except LmforgeError as err:
        _fail(err)


@app.command()
def retrieve(index_dir: Path = typer.Argument(..., help="Index folder written by `lmforge index`."),
             query: List[str] = typer.Option(..., "--query", help="Query text (repeatable)."),
             k: int = typer.Option(5, "-k", help="Documents per query."),
             model: Optional[Path] = typer.Option(None, help="Embed the queries with this model folder (refused "
                                                             "unless it built the index; default: the one that did)."),
             as_json: bool = typer.Option(False, "--json", help="One JSON line per query instead of a table.")):
    """Semantic search: the k documents nearest to each query, best first, with their cosine scores."""
    from lmforge.index import retrieve as run
    try:
        hits = run(index_dir, query, k=k, model=model)
    except LmforgeError as err:
        _fail(err)
    for q, found in zip(query, hits):
        if as_json:
            typer.echo(json.dumps({"query": q, "hits": [vars(h) for h in found]}, ensure_ascii=False))
            continue
        typer.echo(f"query: {q}")
        for rank, h in enumerate(found, 1):
            typer.echo(f"  {rank:>2}. {h.score:.4f}  [{h.id}]  {h.text[:100]}")


@app.command("eval")
def eval_(run_dir: Path = typer.Argument(..., help="Run folder (or a checkpoint folder inside one)."),
          split: str = typer.Option("validation", help="'validation' or 'train' ('test' for fine-tuning runs)."),
          file: Optional[Path] = typer.Option(None, help="Fine-tuning runs: score this file as the split."),
          model: Optional[str] = typer.Option(None, help="'final', 'best', 'latest' or a folder; for an experts "
                                              "run one of its models (seed, dense, an expert's domain, ensemble, "
                                              "average, moe, demix)."),
          max_batches: Optional[int] = typer.Option(None, help="Evaluate at most this many batches (experts runs: "
                                                    "per domain)."),
          per_domain: bool = typer.Option(True, help="Show the per-domain table."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
          domain: List[str] = typer.Option([], "--domain", help="Experts runs: evaluate only this domain "
                                           "(repeatable)."),
          cache: bool = typer.Option(True, "--cache/--no-cache", help="Experts runs: reuse the results kept in "
                                     "RUN/eval-cache.json for unchanged models and data (--no-cache: evaluate "
                                     "again).")):
    """Perplexity (causal LM) or masked-token loss/perplexity (masked LM), overall and per domain; for a
    fine-tuning run, the task report (accuracy/F1/MCC or entity-level scores) of a split. For an experts run:
    a domain x model table (seed, dense, each expert alone, ensemble, ...); --model names one model."""
    from lmforge.evaluate import evaluate, format_table
    from lmforge.tasks.predict import is_task_run
    if (Path(run_dir) / "experts.json").is_file():
        _eval_experts(run_dir, model, domain, max_batches, cache, as_json)
        return
    if domain:
        _fail(LmforgeError(f"--domain: only for an experts run ({run_dir} is not one)"))
    if is_task_run(run_dir):
        if split not in ("validation", "test", "train"):
            _fail(LmforgeError(f"--split: expected 'validation', 'test' or 'train', got {split!r}"))
        try:
            metrics = evaluate(run_dir, split=split, file=file, which=model)
        except LmforgeError as err:
            _fail(err)
        if as_json:
            typer.echo(json.dumps(metrics, indent=2))
        return
    if split not in ("validation", "train"):
        _fail(LmforgeError(f"--split: expected 'validation' or 'train', got {split!r}"))
    try:
        metrics = evaluate(run_dir, split=split, which=model, max_batches=max_batches)
    except LmforgeError as err:
        _fail(err)
    if not metrics or "loss" not in metrics:
        _fail(LmforgeError(f"{run_dir}: the {split} split holds no full block to evaluate"))
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
    else:
        kind = {"clm": "perplexity", "span": "target-token loss / perplexity"}.get(
            metrics["objective"], "masked-token loss / perplexity")
        shown = metrics if per_domain else {k: v for k, v in metrics.items() if "/" not in k}
        typer.echo(format_table(shown, f"{run_dir} — {split} {kind}"))
        extra = {k: v for k, v in metrics.items() if isinstance(v, float) and "/" not in k and k not in ("loss", "ppl")}
        if extra:  # the objective's own figures (pair accuracy, RTD accuracy, ...)
            typer.echo("\n" + "  ".join(f"{k} {v:.4f}" for k, v in extra.items()))
    (Path(run_dir) / f"eval-{split}.json").write_text(json.dumps(metrics, indent=2))


def _eval_experts(run_dir: Path, model: Optional[str], domains: List[str], max_batches: Optional[int], cache: bool,
                  as_json: bool) -> None:
    """`lmforge eval` of an experts run; the whole table (no --model, no --domain) is also kept in
    RUN/eval-validation.json."""
    from lmforge.experts import evaluate as evaluate_experts
    from lmforge.experts import format_comparison
    try:
        results = evaluate_experts(run_dir, max_batches=max_batches, domains=domains or None,
                                   models=[model] if model else None, cache=cache)
    except LmforgeError as err:
        _fail(err)
    typer.echo(json.dumps(results, indent=2) if as_json else format_comparison(results) +
               "\n\n(validation perplexity per domain; columns: models; train tokens: beyond the seed)")
    if not model and not domains:
        (Path(run_dir) / "eval-validation.json").write_text(json.dumps(results, indent=2))


@app.command()
def generate(run_dir: Path = typer.Argument(..., help="Causal LM run folder, an HF causal LM or seq2seq folder, or "
                                                       "a causal LM's `lmforge export` folder (ONNX Runtime)."),
             prompt: str = typer.Option("", help="Text to continue."),
             max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate (lowered to fit the model)."),
             temperature: float = typer.Option(0.8, min=0.0, help="0 means greedy."),
             top_k: Optional[int] = typer.Option(50, min=1, help="Sample from the k most likely tokens."),
             top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Nucleus sampling mass."),
             num_beams: int = typer.Option(1, min=1, help="Beam search with this many beams (deterministic; "
                                                          "temperature, top-k and top-p are not used)."),
             length_penalty: float = typer.Option(1.0, help="Beam search: exponent on length (> 1 favours longer)."),
             early_stopping: bool = typer.Option(False, help="Beam search: stop once num_beams candidates ended."),
             repetition_penalty: float = typer.Option(1.0, min=0.01, help="> 1 discourages repeating tokens."),
             stop: List[str] = typer.Option([], "--stop", help="Stop before this text (repeatable; \\n is a newline, "
                                                              "\\t a tab)."),
             seed: int = typer.Option(0, help="Sampling seed (same seed, same text)."),
             stream: bool = typer.Option(False, help="Print text as it is generated."),
             model: Optional[str] = typer.Option(None, help="'final', 'best', 'latest' or a folder; for an experts "
                                                 "run: ensemble, moe, demix, average, dense or seed (default: the "
                                                 "first of these that exists)."),
             draft: Optional[Path] = typer.Option(None, help="A smaller causal LM with the same tokenizer: "
                                                             "speculative decoding (prints the acceptance rate)."),
             json_schema: Optional[Path] = typer.Option(None, help="A JSON Schema file: the text is JSON that "
                                                                   "follows it (enforced token by token).")):
    """Continue a prompt with a causal LM (or an encoder-decoder model): greedy, sampling or beam search."""
    from lmforge.generate import Decoding, context_limit, encode_prompt, open_generator
    from lmforge.generate import generate as run
    from lmforge.generate import stream as run_stream
    try:
        if json_schema is not None:
            return _generate_structured(run_dir, model, json_schema, prompt, Decoding(
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                repetition_penalty=repetition_penalty, stop=_stops(stop)), stream)
        if draft is not None:
            return _generate_with_draft(run_dir, model, draft, prompt, max_new_tokens, temperature, top_k, top_p,
                                        stop, seed, stream)
        lm, tokenizer = open_generator(run_dir, model)
        limit = context_limit(lm)
        used = len(encode_prompt(tokenizer, lm, prompt))
        if limit is not None and used < limit and used + max_new_tokens > limit:
            typer.echo(f"note: --max-new-tokens lowered to {limit - used} (the model takes {limit} positions, "
                       f"the prompt uses {used})", err=True)
        settings = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                            repetition_penalty=repetition_penalty, seed=seed,
                            stop=_stops(stop))
        if stream:
            typer.echo(prompt, nl=False)
            for piece in run_stream(lm, tokenizer, prompt, settings, clamp=True):
                typer.echo(piece, nl=False)
                sys.stdout.flush()
            typer.echo("")
        else:
            typer.echo(prompt + run(lm, tokenizer, [prompt], settings, clamp=True)[0].text)
    except LmforgeError as err:
        _fail(err)


def _decoding_path(served, batching: str) -> str:
    """How a text-generation model's requests are decoded, for the start-up line."""
    from lmforge.generate.mixtures import batch_invariant, decode_loop_runs, domain_names
    if served.kind != "generate" or served.draft is not None:
        return ""
    domains = domain_names(served.model)
    mixture = f", domains {', '.join(domains)}" if domains else ""
    if batching == "micro":
        return f" (micro-batching{mixture})"
    if not decode_loop_runs(served.model):
        return f" (micro-batching: the decode loop cannot run this model{mixture})"
    if not batch_invariant(served.model):
        return " (continuous batching, one row at a time: int8-dynamic scales activations per batch)"
    return f" (continuous batching{mixture})"


def _stops(stop: List[str]) -> tuple[str, ...]:
    """--stop values, with \\n and \\t meaning newline and tab."""
    return tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in stop)


def _generate_structured(run_dir: Path, which: Optional[str], schema_file: Path, prompt: str, settings,
                         stream: bool) -> None:
    import dataclasses

    from lmforge.generate import context_limit, encode_prompt, open_generator, refuse_option_on_onnx
    from lmforge.generate.mixtures import decode_loop_runs, running_batch
    from lmforge.generate.running import Row, run_rows
    from lmforge.generate.structured import check_grammar, json_grammar
    try:
        schema = json.loads(schema_file.read_text())
    except (OSError, ValueError) as err:
        raise LmforgeError(f"--json-schema {schema_file}: {err}") from None
    lm, tokenizer = open_generator(run_dir, which)
    refuse_option_on_onnx(lm, "--json-schema (structured output)")
    if not decode_loop_runs(lm):
        raise LmforgeError(f"--json-schema: {type(lm).__name__} is not a decoder the structured decoder can run")
    grammar = json_grammar(schema)
    try:
        check_grammar(grammar, tokenizer, lm.get_output_embeddings().weight.shape[0])
    except LmforgeError as err:
        raise LmforgeError(f"--json-schema {schema_file}: {err}") from None
    ids = encode_prompt(tokenizer, lm, prompt)
    limit = context_limit(lm)
    room = settings.max_new_tokens if limit is None else min(settings.max_new_tokens, limit - len(ids))
    if room < 1:
        raise LmforgeError(f"prompt: {len(ids)} tokens fill the model's {limit} positions")
    typer.echo(prompt, nl=False)
    row = Row(ids, dataclasses.replace(settings, grammar=grammar), room,
              emit=(lambda piece: (typer.echo(piece, nl=False), sys.stdout.flush())) if stream else None)
    completion = run_rows(running_batch(lm.eval(), tokenizer), [row])[0]
    typer.echo("" if stream else completion.text)
    if completion.finish_reason == "length":
        typer.echo(f"note: the text was cut at {room} tokens before the JSON was complete", err=True)


def _generate_with_draft(run_dir: Path, which: Optional[str], draft: Path, prompt: str, max_new_tokens: int,
                         temperature: float, top_k: Optional[int], top_p: Optional[float], stop: List[str], seed: int,
                         stream: bool) -> None:
    from lmforge.generate import Decoding, open_generator
    from lmforge.generate.speculative import check_draft, speculative_generate
    lm, tokenizer = open_generator(run_dir, which)
    if not draft.exists():
        raise LmforgeError(f"--draft {draft}: no such run folder")
    small, small_tokenizer = open_generator(draft)
    check_draft(lm, tokenizer, small, small_tokenizer)
    settings = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        stop=_stops(stop))
    typer.echo(prompt, nl=False)
    completion, rate = speculative_generate(lm, tokenizer, small, prompt, settings, clamp=True, emit=(
        lambda piece: (typer.echo(piece, nl=False), sys.stdout.flush())) if stream else None)
    typer.echo("" if stream else completion.text)
    typer.echo(f"note: the draft's tokens were accepted at a rate of {rate:.1%}", err=True)


@app.command()
def serve(models: List[str] = typer.Argument(..., help="Run folders or HF folders to serve; NAME=PATH names one "
                                                       "(default name: the folder's name)."),
          host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback unless you change it)."),
          port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
          api_key: Optional[str] = typer.Option(None, envvar="LMFORGE_API_KEY",
                                                help="Require 'Authorization: Bearer KEY' (all routes but /health)."),
          batching: str = typer.Option("continuous", help="'continuous': one decode loop per model that rows join "
                                       "and leave at every step; 'micro': requests that arrive together run as one "
                                       "generate call."),
          max_batch: int = typer.Option(64, min=1, help="Most completion rows decoding together."),
          max_wait_ms: float = typer.Option(10.0, min=0.0, help="--batching micro: how long a batch waits for more "
                                                                "requests."),
          max_cache_tokens: int = typer.Option(65536, min=1, help="Most KV-cache tokens a decode loop reserves "
                                                                  "(prompt + max_tokens per row); rows beyond wait."),
          max_concurrent: int = typer.Option(64, min=1, help="Requests worked on at once."),
          max_queue: int = typer.Option(256, min=0, help="Requests waiting beyond those; more get 429."),
          timeout: float = typer.Option(120.0, min=0.001, help="Seconds before a request gets 408 and is stopped."),
          max_tokens_cap: int = typer.Option(512, min=1, help="Largest max_tokens a request may ask for."),
          draft: Optional[Path] = typer.Option(None, help="A smaller causal LM with the same tokenizer (e.g. a "
                                                          "distilled student): speculative decoding, one row at a "
                                                          "time."),
          device: str = typer.Option("auto", help="'auto' (CUDA when available), 'cpu' or 'cuda[:N]'.")):
    """Serve models over HTTP: OpenAI-compatible /v1/completions and /v1/chat/completions, /v1/classify and
    /v1/ner for fine-tuned runs, /v1/models, /health, /metrics."""
    # Before torch loads OpenMP: its threads sleep instead of spinning between operations, which on a CPU shared
    # with other work (or with the server's own threads) made each request many times slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from lmforge.models.onnx import OnnxModel
    from lmforge.serve import create_app, load_served_models, run_server
    from lmforge.serve.models import attach_draft
    try:
        served = load_served_models(models)
        target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if draft is not None:
            typer.echo(f"speculative decoding for {attach_draft(served, draft).name!r} with the draft {draft}")
        for m in served.values():
            m.model.to(target)
            if m.draft is not None:
                m.draft.to(target)
            where = "ONNX Runtime (cpu)" if isinstance(m.model, OnnxModel) else target
            typer.echo(f"serving {m.name!r} ({m.kind}) from {m.source} on {where}{_decoding_path(m, batching)}")
        app_ = create_app(served, api_key=api_key, batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms,
                          max_cache_tokens=max_cache_tokens, max_concurrent=max_concurrent, max_queue=max_queue,
                          timeout_s=timeout, max_tokens_cap=max_tokens_cap)
    except LmforgeError as err:
        _fail(err)
    except RuntimeError as err:  # e.g. an unknown --device
        _fail(LmforgeError(f"--device {device}: {str(err).splitlines()[0]}"))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.echo(f"warning: listening on {host} without an API key; anyone who can reach it can use it", err=True)
    typer.echo(f"listening on http://{host}:{port} (OpenAI base_url: http://{host}:{port}/v1)")
    run_server(app_, host=host, port=port)


@app.command()
def export(model_dir: Path = typer.Argument(..., help="Fine-tuning run folder, GPT-2 pretraining run, or an HF "
                                                      "classifier or GPT-2 folder."),
           out: Path = typer.Option(..., "--out", help="Folder to write: model.onnx, config, tokenizer, model card."),
           format: str = typer.Option("onnx", "--format", help="onnx (ONNX Runtime), or hf: a pruned model in the "
                                                               "nearest shape stock transformers loads."),
           quantize: Optional[str] = typer.Option(None, help="int8: dynamic int8 weights (about 4× smaller, "
                                                             "faster on CPU)."),
           model: Optional[str] = typer.Option(None, help="'final' (default), 'best', 'latest' or a folder."),
           force: bool = typer.Option(False, help="Replace --out if it exists.")):
    """Export a model to ONNX Runtime (fused graph, optional int8; a causal LM with its KV cache), or a pruned model
    to a stock transformers folder (--format hf); predict, eval, generate and serve take the folder."""
    from lmforge.export import export as run
    try:
        run(model_dir, out, fmt=format, quantize=quantize, which=model, force=force)
    except LmforgeError as err:
        _fail(err)


@app.command()
def tune(target: str = typer.Argument(..., help="Recipe YAML file to search; or `show` followed by a study name."),
         study_name: Optional[str] = typer.Argument(None, help="With `show`: the study whose results to print."),
         space: Optional[Path] = typer.Option(None, help="Search space YAML: params (recipe field: range) and "
                                                         "objectives."),
         trials: int = typer.Option(20, help="Trials the study should hold (finished or pruned); a restarted "
                                             "study runs only the rest."),
         study: Optional[str] = typer.Option(None, help="Study name (default: the recipe's name)."),
         storage: Optional[str] = typer.Option(None, help="sqlite:///FILE, journal:FILE or a database URL "
                                                          "(default: SQLite in the study folder; a journal file "
                                                          "with --workers > 1)."),
         workers: int = typer.Option(1, help="Trials run at once on this machine (each in its own process)."),
         sampler: str = typer.Option("tpe", help="tpe, random, grid, cmaes or nsga2."),
         pruner: Optional[str] = typer.Option(None, help="median, asha, hyperband or none (default: median; none "
                                                         "for several objectives)."),
         seed: int = typer.Option(0, help="Seed of the sampler."),
         eval_every: Optional[int] = typer.Option(None, help="Evaluate every N steps in each trial (the pruner "
                                                             "decides at each evaluation)."),
         threads: Optional[int] = typer.Option(None, help="CPU threads per trial (default with --workers > 1: "
                                                          "cores / workers)."),
         out: Optional[Path] = typer.Option(None, help="Study folder (default: runs/tune/STUDY)."),
         launcher: Optional[str] = typer.Option(None, help="Command that starts each trial's Python, e.g. "
                                                           "'torchrun --nproc_per_node 2'."),
         set_: List[str] = typer.Option([], "--set", help=SET_HELP)):
    """Search recipe fields with Optuna: each trial is a run folder; pruning, resumable storage, several workers,
    several objectives (Pareto front); writes trials.md/.csv, best.yaml and plots. `lmforge tune show STUDY`
    prints a study's results again."""
    from lmforge.tune import show_study, tune as run
    try:
        if target == "show":
            if not study_name:
                raise LmforgeError("tune show: name the study, e.g. lmforge tune show sst2 --storage URL")
            show_study(study_name, storage=storage, out=out)
            return
        if study_name:
            raise LmforgeError(f"tune: unexpected argument {study_name!r} after the recipe")
        if space is None:
            raise LmforgeError("tune: give the search space with --space FILE.yaml")
        result = run(target, space, trials=trials, study=study, storage=storage, workers=workers, sampler=sampler,
                     pruner=pruner, seed=seed, eval_every=eval_every, threads=threads, out=out, launcher=launcher,
                     overrides=set_)
        typer.echo(f"study folder: {result}")
    except LmforgeError as err:
        _fail(err)


@app.command()
def compress(recipe: Path = typer.Argument(..., help="Compress recipe YAML file (model, steps, eval, output)."),
             set_: List[str] = typer.Option([], "--set", help=SET_HELP),
             force: bool = typer.Option(False, help="Replace an existing output folder."),
             progress: bool = typer.Option(True, help="Show progress bars.")):
    """Prune (attention heads, FFN neurons, or weights by magnitude), recover by fine-tuning and quantize to int8,
    as the recipe's steps say; each step writes a run folder that eval / predict / serve load, and compress.md /
    compress.png tabulate size, latency and quality of every variant."""
    from lmforge.compress import compress as run
    try:
        result = run(recipe, overrides=set_, force=force, show_progress=progress)
        typer.echo(f"compress folder: {result} (report: {result / 'compress.md'})")
    except LmforgeError as err:
        _fail(err)


@app.command()
def compare(runs: List[Path] = typer.Argument(..., help="Run or model folders to measure side by side."),
            out: Optional[Path] = typer.Option(None, help="Write compare.md / compare.png / compare.json here."),
            split: str = typer.Option("validation", help="Split whose eval-SPLIT.json gives the metric."),
            threads: int = typer.Option(1, min=1, help="CPU threads for the latency measurement."),
            repeats: int = typer.Option(7, min=1, help="Timed repeats per batch size (median reported)."),
            seq_len: int = typer.Option(64, min=2, help="Tokens per input row."),
            batch: List[int] = typer.Option([1, 32], "--batch", min=1, help="Batch sizes timed (repeatable).")):
    """Parameters, size on disk, sparsity, CPU latency (median of warm repeats), throughput, peak memory and the
    task metric of any run or model folders, as one table (and a quality-vs-latency plot with --out)."""
    from lmforge.compress import compare as run
    from lmforge.compress.report import markdown_table
    try:
        rows, path = run(runs, out, split=split, threads=threads, repeats=repeats, seq_len=seq_len,
                         batch_sizes=tuple(batch))
        typer.echo(markdown_table(rows, "lmforge compare", threads, seq_len))
        if path:
            typer.echo(f"written: {path} and {path.with_suffix('.png')}")
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
def recipe_fields(markdown: bool = typer.Option(False, "--markdown", help="Print the Markdown field reference "
                                                "(docs/recipes.md is this output).")):
    """List every field of every recipe kind (pretraining and experts, fine-tuning, prep, compress) with its default
    and meaning."""
    from lmforge.prep.config import PrepRecipe
    from lmforge.recipe import Recipe, fields_markdown, fields_text
    from lmforge.compress.config import CompressRecipe
    from lmforge.tasks.config import FinetuneRecipe
    kinds = [(Recipe, "Pretraining and experts recipes (`lmforge pretrain`, `lmforge experts`)"),
             (FinetuneRecipe, "Fine-tuning recipes (`lmforge finetune`)"),
             (PrepRecipe, "Data preparation recipes (`lmforge prep`)"),
             (CompressRecipe, "Compress recipes (`lmforge compress`)")]
    if markdown:
        typer.echo("\n".join([
            "# Recipe fields", "",
            "Generated from the recipe classes by `lmforge recipe fields --markdown`; a test fails when this file is",
            "stale. A nested field is written with dots (`train.lr`), a list entry with `[]`",
            "(`data.sources[].path`); `--set` takes the same dotted names with a list index (`data.sources.0.path`).",
            "", *(fields_markdown(root, title) for root, title in kinds)]).rstrip())
        return
    typer.echo("\n\n".join(fields_text(root, title.replace("`", "")) for root, title in kinds))


@tokenizer_app.command("train")
def tokenizer_train(recipe: Path = typer.Argument(..., help="Recipe YAML (its data and tokenizer sections)."),
                    out: Path = typer.Option(..., help="Folder to save the tokenizer in (HF format)."),
                    set_: List[str] = typer.Option([], "--set", help=SET_HELP)):
    """Train a WordPiece, byte-level BPE, Unigram or character tokenizer on the recipe's training split."""
    from lmforge.pretrain import train_tokenizer_for
    from lmforge.tokenizer import save_tokenizer
    try:
        r = _load(recipe, set_)
        tok = train_tokenizer_for(r.data, r.tokenizer)
        save_tokenizer(tok, out)
        typer.echo(f"{r.tokenizer.kind} tokenizer with {len(tok)} tokens saved to {out}")
    except LmforgeError as err:
        _fail(err)
    except OSError as err:
        _fail(LmforgeError(f"{out}: cannot write ({err.strerror})"))


def _experts_run(target: Path, set_: List[str]) -> Path:
    """A run folder as is; a recipe file → its output folder."""
    if Path(target).is_file():
        return Path(_load(target, set_).output.dir)
    return Path(target)


@experts_app.command("branch")
def experts_branch(recipe: Path = typer.Argument(..., help="Pretraining recipe with an `experts:` section."),
                   set_: List[str] = typer.Option([], "--set", help=SET_HELP),
                   force: bool = typer.Option(False, help="Delete an existing experts run and start over."),
                   progress: bool = typer.Option(True, help="Show progress bars.")):
    """Make (or copy) the seed model and one expert recipe per domain."""
    from lmforge.experts import branch
    try:
        run = branch(_load(recipe, set_), force=force, show_progress=progress)
        typer.echo(f"experts run: {run}")
    except LmforgeError as err:
        _fail(err)


@experts_app.command("train")
def experts_train(target: Path = typer.Argument(..., help="The experts recipe or its run folder."),
                  domain: List[str] = typer.Option([], "--domain", help="Train only this expert (repeatable)."),
                  dense: bool = typer.Option(False, help="Also train the dense baseline (the seed on the mixture "
                                             "on as many tokens as the experts together)."),
                  demix: bool = typer.Option(False, help="Also train the DEMix model (RUN/demix/): the seed with one "
                                             "FFN expert per domain in every layer, as many tokens as the "
                                             "experts together, each row through its domain's expert."),
                  launch: str = typer.Option("local", help="How the jobs run: 'local' (one process per expert, "
                                             "--jobs at a time, logs in RUN/experts/<name>.log), 'inline' (one after "
                                             "another in this process), 'print' (one torchrun command per expert, "
                                             "for any scheduler) or 'slurm' (write RUN/experts/train.sbatch, a job "
                                             "array)."),
                  jobs: Optional[int] = typer.Option(None, min=1, help="local: experts trained at once (default: "
                                                     "one per two cores)."),
                  nproc: int = typer.Option(1, min=1, help="print/slurm: processes (GPUs) per expert's torchrun."),
                  missing: bool = typer.Option(False, help="Only the experts whose final model is not there yet."),
                  set_: List[str] = typer.Option([], "--set", help=SET_HELP),
                  progress: bool = typer.Option(True, help="Show progress bars.")):
    """Train experts, each on its own domain only, as independent jobs (no expert waits for another)."""
    from lmforge.experts import train
    from lmforge.experts.launch import DEMIX, DENSE, LAUNCHERS, jobs_for, run_local, torchrun_commands, write_slurm
    if launch not in LAUNCHERS:
        _fail(LmforgeError(f"--launch: expected one of {', '.join(LAUNCHERS)}, got {launch!r}"))
    try:
        run = _experts_run(target, set_)
        # --dense / --demix alone train only those; no --domain, --dense or --demix trains every expert.
        wanted = domain or ([] if dense or demix else None)
        todo = jobs_for(run, wanted, dense, demix, missing_only=missing)
        names = [job.name for job in todo]
        if launch == "inline":
            train(run, [n for n in names if n not in (DENSE, DEMIX)], DENSE in names, demix=DEMIX in names,
                  show_progress=progress)
        elif not todo:
            typer.echo("every expert asked for is trained already")
        elif launch == "print":
            typer.echo("\n".join(torchrun_commands(run, todo, set_, nproc)))
        elif launch == "slurm":
            script = write_slurm(run, todo, set_, nproc)
            typer.echo(f"wrote {script} ({len(todo)} array tasks); submit it with: sbatch {script}")
        else:
            run_local(run, todo, set_, jobs)
    except LmforgeError as err:
        _fail(err)


@experts_app.command("status")
def experts_status(target: Path = typer.Argument(..., help="The experts run folder (or its recipe)."),
                   set_: List[str] = typer.Option([], "--set", help=SET_HELP)):
    """Which experts are trained, which stopped part-way (and at what step), which are missing."""
    from lmforge.experts.launch import status
    try:
        rows = status(_experts_run(target, set_))
    except LmforgeError as err:
        _fail(err)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['state']:<8} {r['detail']}")


@experts_app.command("merge")
def experts_merge(target: Path = typer.Argument(..., help="The experts run folder (or its recipe)."),
                  method: str = typer.Option("ensemble", help="'ensemble' (posterior-weighted), 'average' or "
                                             "'moe' (Branch-Train-MiX: one mixture-of-experts model)."),
                  weights: str = typer.Option("uniform", help="average: 'uniform', 'prior' (estimated on "
                                              "held-out data) or 'fisher' (each weight from the experts whose "
                                              "domain relies on it); moe: how the shared (non-FFN) parameters "
                                              "are averaged, 'uniform' or 'fisher'."),
                  top_k: Optional[int] = typer.Option(None, min=1, help="ensemble: mix only the k likeliest experts; "
                                                      "moe: experts per token (default 2)."),
                  steps: Optional[int] = typer.Option(None, min=0, help="moe: training steps on the mixture after "
                                                      "merging (default: experts.seed_steps; 0: merge only)."),
                  train: str = typer.Option("router", help="moe: train only the routers ('router') or 'all' "
                                            "parameters."),
                  aux_weight: float = typer.Option(0.01, min=0.0, help="moe: weight of the load-balancing loss."),
                  fisher_blocks: int = typer.Option(256, min=1, help="--weights fisher: training blocks of its own "
                                                    "domain on which each expert's Fisher is estimated (more: a "
                                                    "better estimate, one backward pass each)."),
                  router_init: str = typer.Option("random", help="moe: 'random' routers (as in the paper) or "
                                                  "'centroids': each expert's router row points at its domain's mean "
                                                  "hidden state, so text starts at its own domain's FFNs."),
                  set_: List[str] = typer.Option([], "--set", help=SET_HELP),
                  progress: bool = typer.Option(True, help="Show progress bars.")):
    """Combine trained experts into an ensemble (ensemble/), one averaged model (average/) or one
    mixture-of-experts model whose routers are trained on the mixture (moe/, moe-run/)."""
    from lmforge.experts import merge
    if method not in ("ensemble", "average", "moe") or weights not in ("uniform", "prior", "fisher") or \
            (method == "moe" and weights == "prior"):
        _fail(LmforgeError(f"--method/--weights: expected ensemble|average|moe and uniform|prior|fisher "
                           f"(moe: uniform|fisher), got {method}/{weights}"))
    if train not in ("router", "all"):
        _fail(LmforgeError(f"--train: expected 'router' or 'all', got {train!r}"))
    try:
        folder = merge(_experts_run(target, set_), method, weights=weights, top_k=top_k, steps=steps, train=train,
                       aux_weight=aux_weight, fisher_blocks=fisher_blocks, router_init=router_init,
                       show_progress=progress)
        typer.echo(f"merged: {folder}")
    except LmforgeError as err:
        _fail(err)


@experts_app.command("add")
def experts_add(target: Path = typer.Argument(..., help="The experts run folder (or its recipe)."),
                domain: str = typer.Option(..., "--domain", help="The new domain: a name new to the run's data with "
                                           "--source, else a domain of the run's data."),
                source: List[Path] = typer.Option([], "--source", help="A file, folder or glob of the new domain's "
                                                  "text (repeatable); it joins the run's data, tokenized with the "
                                                  "run's tokenizer and split by its rule."),
                init: str = typer.Option("average", help="'average': start from the parameter average of the trained "
                                         "experts most relevant to the new domain (weighted by their posterior on "
                                         "its text); 'seed': from the seed."),
                top_k: Optional[int] = typer.Option(2, min=1, help="average: the k most relevant experts."),
                set_: List[str] = typer.Option([], "--set", help=SET_HELP)):
    """Add an expert for a new domain to a branched run; train it with `lmforge experts train RUN --domain D`."""
    from lmforge.experts import add_expert
    try:
        recipe = add_expert(_experts_run(target, set_), domain, sources=source, init=init, top_k=top_k)
        typer.echo(f"expert recipe: {recipe}")
    except LmforgeError as err:
        _fail(err)


@experts_app.command("demix-add")
def experts_demix_add(target: Path = typer.Argument(..., help="The experts run folder (or its recipe)."),
                      domain: str = typer.Option(..., "--domain", help="The new domain (its text must be in the "
                                                 "run's data)."),
                      steps: Optional[int] = typer.Option(None, min=1, help="Training steps of the new expert "
                                                          "(default: the run's steps per expert)."),
                      init: str = typer.Option("nearest", help="Start the new expert from 'nearest' (the expert "
                                               "the new text is likeliest under) or from a named domain's expert."),
                      set_: List[str] = typer.Option([], "--set", help=SET_HELP),
                      progress: bool = typer.Option(True, help="Show progress bars.")):
    """Add a domain expert to the DEMix model and train only it; the other experts stay exactly as they were."""
    from lmforge.experts import add_domain
    try:
        folder = add_domain(_experts_run(target, set_), domain, steps=steps, init=init, show_progress=progress)
        typer.echo(f"DEMix model: {folder}")
    except LmforgeError as err:
        _fail(err)


@experts_app.command("demix-remove")
def experts_demix_remove(target: Path = typer.Argument(..., help="The experts run folder (or its recipe)."),
                         domain: str = typer.Option(..., "--domain", help="The domain whose expert is removed."),
                         set_: List[str] = typer.Option([], "--set", help=SET_HELP)):
    """Remove a domain expert from the DEMix model (for example to drop a domain's data); nothing is retrained."""
    from lmforge.experts import remove_domain
    try:
        typer.echo(f"DEMix model: {remove_domain(_experts_run(target, set_), domain)}")
    except LmforgeError as err:
        _fail(err)


def main() -> None:
    """The `lmforge` command: the app, with a training run stopped by a signal exiting 128 + the signal."""
    try:
        app()
    except RunInterrupted as stopped:
        typer.echo(str(stopped), err=True)
        sys.exit(stopped.exit_code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
