"""Experts that grow with the user's data: a corpus that arrives after branching becomes an expert the seed and
tokenizer never saw, the run's eval shows each expert alone and reuses what it already evaluated, and the dense
baseline counts every expert's tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.experts import branch, merge, train
from lmforge.recipe import recipe_from_dict

from conftest import tiny_recipe


def numbers_corpus(path: Path, step: int = 7) -> Path:
    """Another domain's text: lines of numbers, nothing like the prose and code of the `corpus` fixture."""
    path.write_text("".join(json.dumps({"text": " ".join(str((i * step + k) % 100) for k in range(40))}) + "\n"
                            for i in range(200)))
    return path


def branched(tmp_path: Path, sources: dict, **experts) -> Path:
    tree = tiny_recipe(sources, tmp_path / "run", "clm", max_steps=6, eval_every=0)
    tree["experts"] = {"seed_steps": 4, "steps": 6, **experts}
    return branch(recipe_from_dict(tree), show_progress=False)


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def files_of(run: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def test_a_corpus_that_arrives_later_becomes_an_expert_the_seed_never_saw(tmp_path, corpus):
    from lmforge.data.sources import load_documents, split_of
    from lmforge.experts.run import _seed_domains
    from lmforge.recipe import load_recipe
    # Branching trains the seed (and its tokenizer) on the branch domains only, unless the recipe says otherwise.
    run = branched(tmp_path, {**corpus, "numbers": numbers_corpus(tmp_path / "numbers.jsonl")},
                   domains=["code", "prose"])
    info = json.loads((run / "experts.json").read_text())
    assert info["seed_domains"] == info["tokenizer_domains"] == ["code", "prose"]
    recipe = load_recipe(run / "recipe.yaml")
    assert load_recipe(run / "seed-run" / "recipe.yaml").data.only_domains == ["code", "prose"]
    recipe.experts.seed_domains = "all"
    assert _seed_domains(recipe, ["code", "prose"]) == ["code", "numbers", "prose"]
    done = cli("experts", "branch", run / "recipe.yaml", "--set", "experts.seed_domains=[legal]",
               "--set", f"output.dir={tmp_path / 'other'}")
    assert done.exit_code == 2 and "experts.seed_domains: ['legal'] not among" in done.output
    assert not (tmp_path / "other").exists()

    # A new corpus joins the trained run: tokenized with the run's tokenizer, split by its rule.
    train(run, show_progress=False)
    later = numbers_corpus(tmp_path / "later.jsonl", step=3)
    before = files_of(run)
    for args, message in [((tmp_path / "nope", "--domain", "later", "--source", later), "not an experts run"),
                          ((run, "--domain", "code", "--source", later), "'code' already has an expert"),
                          ((run, "--domain", "numbers", "--source", later),
                           "'numbers' is already a domain of this run's data"),
                          ((run, "--domain", "later", "--source", tmp_path / "missing.jsonl"),
                           "--source: " + str(tmp_path / "missing.jsonl") + ": no such file or folder")]:
        done = cli("experts", "add", *args)
        assert done.exit_code == 2 and message in done.output, done.output
        assert done.output.count("\n") == 1 and done.output.startswith("error: ")
    assert files_of(run) == before and not (tmp_path / "nope").exists()  # nothing written

    done = cli("experts", "add", run, "--domain", "later", "--source", later, "--top-k", "2")
    assert done.exit_code == 0, done.output
    assert "'later' is new to the seed and the tokenizer (they saw: code, prose)" in " ".join(done.output.split())
    info = json.loads((run / "experts.json").read_text())
    added = info["added"]["later"]
    assert info["domains"] == ["code", "prose", "later"] and added["from"] == "average"
    assert added["sources"] == [str(later)] and set(added["weights"]) == {"code", "prose"}
    assert added["seen_by_seed"] is False and added["seen_by_tokenizer"] is False
    recipe = load_recipe(run / "recipe.yaml")
    assert [(s.path, s.domain) for s in recipe.data.sources][-1] == (str(later), "later")
    expert = load_recipe(run / "experts" / "later.yaml")
    assert expert.data.only_domains == ["later"] and expert.tokenizer.path == str(run / "experts" / "later-init")
    docs = load_documents(expert.data)
    splits = [split_of(t, recipe.data.split_seed, recipe.data.validation_fraction) for t in docs["text"]]
    assert docs["split"] == splits and 0 < splits.count("validation") < len(splits) // 4
    train(run, ["later"], show_progress=False)
    assert (run / "experts" / "later" / "final" / "config.json").is_file()


def test_the_dense_baseline_counts_every_experts_tokens_including_added_ones(tmp_path, corpus):
    run = branched(tmp_path, {**corpus, "numbers": numbers_corpus(tmp_path / "numbers.jsonl")},
                   domains=["code", "prose"])
    train(run, show_progress=False)
    assert cli("experts", "add", run, "--domain", "numbers").exit_code == 0
    train(run, ["numbers"], show_progress=False)
    done = cli("experts", "train", run, "--dense", "--launch", "inline", "--no-progress")
    assert done.exit_code == 0, done.output
    per_expert = 6 * 8 * 32  # steps x batch x block of each of the three experts
    assert (f"dense baseline: 18 steps x batch 8 on 3 domains = {3 * per_expert:,} tokens; the 3 experts together: "
            f"{3 * per_expert:,} (code {per_expert:,}, prose {per_expert:,}, numbers {per_expert:,})") in \
        " ".join(done.output.split())
    seen = {name: json.loads((run / name / "results.json").read_text())["tokens"]
            for name in ("dense", "experts/code", "experts/prose", "experts/numbers")}
    assert seen["dense"] == seen["experts/code"] + seen["experts/prose"] + seen["experts/numbers"] > 0
    dense_recipe = (run / "dense" / "recipe.yaml").read_text()
    assert "max_steps: 18" in dense_recipe and "- numbers" in dense_recipe  # every expert's domain
    merge(run, "ensemble")
    table = cli("eval", run, "--max-batches", "1").output
    row = next(line for line in table.splitlines() if line.startswith("| train tokens"))
    header = next(line for line in table.splitlines() if line.startswith("| domain"))
    cells = dict(zip([c.strip() for c in header.split("|")[2:-1]], [c.strip() for c in row.split("|")[2:-1]]))
    assert cells["dense"] == cells["ensemble"] == f"{seen['dense']:,}"
    assert cells["numbers"] == f"{seen['experts/numbers']:,}"


def test_eval_shows_each_expert_alone_and_reevaluates_only_what_changed(tmp_path, corpus):
    run = branched(tmp_path, corpus)
    train(run, show_progress=False)
    merge(run, "ensemble")
    merge(run, "average")
    done = cli("eval", run, "--json")
    assert done.exit_code == 0, done.output
    assert "evaluated 10 of 10 (model, domain) pairs; 0 read from" in done.output
    results = json.loads(done.output[done.output.index("{"):])
    assert list(results) == ["seed", "code", "prose", "ensemble", "average"]
    # An expert's column is that expert evaluated alone, as `lmforge eval` of its own run folder gives it.
    alone = cli("eval", run / "experts" / "code", "--json")
    alone = json.loads(alone.output[alone.output.index("{"):])
    assert results["code"]["ppl/code"] == pytest.approx(alone["ppl/code"], rel=1e-6)
    assert results["code"]["ppl/code"] < results["prose"]["ppl/code"]
    assert results["prose"]["ppl/prose"] < results["code"]["ppl/prose"]
    table = cli("eval", run).output
    assert "evaluated 0 of 10 (model, domain) pairs; 10 read from" in table
    assert re.search(r"\| domain \| seed \| code \| prose \| ensemble \| average \|", table)
    assert f"| code | {results['seed']['ppl/code']:.2f} | {results['code']['ppl/code']:.2f} |" in table

    # One model, one domain, without the rest; --no-cache evaluates it again, to the same figure.
    one = cli("eval", run, "--model", "prose", "--domain", "code", "--no-cache", "--json")
    assert "evaluated 1 of 1 (model, domain) pairs" in one.output
    one = json.loads(one.output[one.output.index("{"):])
    assert list(one) == ["prose"] and one["prose"]["ppl/code"] == pytest.approx(results["prose"]["ppl/code"])
    # Retraining one expert re-evaluates it and the ensemble that holds it; the seed and the average are unchanged.
    train(run, ["prose"], show_progress=False)
    again = cli("eval", run).output
    assert "evaluated 4 of 10 (model, domain) pairs; 6 read from" in again

    before = files_of(run)
    for args, message in [(("--model", "legal"), "--model: no 'legal' model in this experts run (it has: seed, "
                                                  "code, prose, ensemble, average)"),
                          (("--domain", "legal"), "--domain: ['legal'] not among the data's domains")]:
        done = cli("eval", run, *args)
        assert done.exit_code == 2 and message in done.output and done.output.count("\n") == 1, done.output
    assert files_of(run) == before
