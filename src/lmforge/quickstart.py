"""The built-in demo: a two-domain corpus made from the installed Python standard library.

Domain `code` is the library's .py sources; domain `docs` is their docstrings. Nothing is downloaded
and no data file ships with lmforge. The demo trains a BPE tokenizer, a small GPT-2 causal LM and a
small BERT masked LM, evaluates both per domain, prints samples and writes a summary.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
import warnings
from pathlib import Path

from lmforge.engine.logging import console
from lmforge.errors import LmforgeError
from lmforge.evaluate import format_table
from lmforge.generate import generate_text
from lmforge.pretrain import pretrain
from lmforge.recipe import recipe_from_dict
from lmforge.runs import open_run

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo", "ensurepip"}


def stdlib_documents(max_bytes_per_domain: int):
    """Yield (domain, text) from the stdlib: whole source files and their docstrings, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & SKIP_DIRS))
    sizes = {"code": 0, "docs": 0}
    for path in files:
        if min(sizes.values()) >= max_bytes_per_domain:
            break
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        if sizes["code"] < max_bytes_per_domain and 200 < len(source) < 60_000:
            sizes["code"] += len(source)
            yield "code", source
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                         ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80 and sizes["docs"] < max_bytes_per_domain:
                sizes["docs"] += len(doc)
                yield "docs", doc


def build_corpus(folder: Path, max_bytes_per_domain: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {d: folder / f"{d}.jsonl" for d in ("code", "docs")}
    handles = {d: open(p.with_suffix(".jsonl.tmp"), "w", encoding="utf-8") for d, p in paths.items()}
    try:
        for domain, text in stdlib_documents(max_bytes_per_domain):
            handles[domain].write(json.dumps({"text": text}) + "\n")
    finally:
        for h in handles.values():
            h.close()
    for d, p in paths.items():
        os.replace(p.with_suffix(".jsonl.tmp"), p)
    return paths


def quickstart_recipes(out: Path, corpus: dict[str, Path], tiny: bool) -> tuple[dict, dict]:
    data = {"sources": [{"path": str(corpus["code"]), "domain": "code"},
                        {"path": str(corpus["docs"]), "domain": "docs"}],
            "validation_fraction": 0.05, "cache_dir": str(out / "cache")}
    dims = {"n_layers": 2, "d_model": 64, "n_heads": 2} if tiny else {"n_layers": 4, "d_model": 128, "n_heads": 4}
    train = {"batch_size": 16, "lr": 2e-3, "warmup_steps": 0.05, "eval_every": 0 if tiny else 100,
             "eval_batches": 4 if tiny else 25, "log_every": 5 if tiny else 20, "keep_last": 1}
    clm = {"name": "quickstart-clm", "data": data,
           "tokenizer": {"kind": "bpe", "vocab_size": 1000 if tiny else 4000},
           "model": {"family": "gpt2", "dropout": 0.0, **dims},
           "objective": {"name": "clm", "block_size": 64 if tiny else 128},
           "train": {**train, "max_steps": 20 if tiny else 600}, "output": {"dir": str(out / "clm")}}
    mlm = {"name": "quickstart-mlm", "data": data, "tokenizer": {"path": str(out / "clm" / "tokenizer")},
           "model": {"family": "bert", "dropout": 0.0, **dims},
           "objective": {"name": "mlm", "block_size": 64 if tiny else 128},
           "train": {**train, "max_steps": 20 if tiny else 400, "lr": 1e-3}, "output": {"dir": str(out / "mlm")}}
    return clm, mlm


def quickstart(out: Path = Path("runs/quickstart"), *, tiny: bool = False, force: bool = True,
               show_progress: bool = True) -> Path:

    out = Path(out)
    budget = 200_000 if tiny else 2_000_000
    console.rule("[bold]lmforge quickstart")
    corpus = build_corpus(out / "corpus", budget)
    sizes = {d: p.stat().st_size for d, p in corpus.items()}
    if min(sizes.values()) == 0:
        raise LmforgeError("quickstart: could not read the Python standard library's sources")
    console.print("corpus: " + ", ".join(f"{d} {s / 1e6:.1f} MB" for d, s in sizes.items())
                  + f" (from {sysconfig.get_paths()['stdlib']})")
    clm_dict, mlm_dict = quickstart_recipes(out, corpus, tiny)
    results = {}
    for tree in (clm_dict, mlm_dict):
        recipe = recipe_from_dict(tree, "quickstart")
        console.rule(f"{recipe.name}: {recipe.objective.name}")
        run_dir = pretrain(recipe, force=force, show_progress=show_progress).run_dir
        results[recipe.objective.name] = (run_dir, json.loads((run_dir / "results.json").read_text()))
    _, model, tokenizer = open_run(results["clm"][0])
    samples = [(p, generate_text(model, tokenizer, p, max_new_tokens=48, temperature=0.8, top_k=40, seed=i))
               for i, p in enumerate(["def ", "import os\n", "Return the "])]
    lines = ["# lmforge quickstart", "",
             "Corpus from the Python standard library: "
             + ", ".join(f"`{d}` {s / 1e6:.2f} MB" for d, s in sizes.items()),
             ""]
    for name, (run_dir, res) in results.items():
        if res["validation"]:
            title = f"## {name.upper()} validation ({run_dir.name}/, {res['steps']} steps, {res['seconds']:.0f} s)"
            lines += [format_table(res["validation"], title), ""]
            console.print(format_table(res["validation"], f"[bold]{name.upper()}[/] per-domain validation"))
    lines += ["## Samples from the causal LM", ""]
    for prompt, text in samples:
        lines += ["```", prompt + text, "```", ""]
        console.print(f"[bold]{prompt!r}[/] → {text!r}")
    (out / "summary.md").write_text("\n".join(lines))
    console.print(f"run folders: {out}/clm, {out}/mlm; summary: {out / 'summary.md'}")
    return out
