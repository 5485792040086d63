"""Pretraining runs end to end on CPU: losses fall, folders are readable, bad input fails clearly."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_recipe
from lmforge.cli import app
from lmforge.errors import LmforgeError
from lmforge.evaluate import evaluate_run
from lmforge.pretrain import pretrain
from lmforge.recipe import recipe_from_dict

runner = CliRunner()


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_tiny_run_learns_and_leaves_a_readable_folder(tmp_path, corpus, objective):
    tree = tiny_recipe(corpus, tmp_path / "run", objective, max_steps=40, eval_every=20, lr=5e-3)
    tree["output"]["plots"] = True
    run_dir = pretrain(recipe_from_dict(tree), show_progress=False)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "split" not in r]
    val = [r for r in records if r.get("split") == "validation"]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert {"loss/prose", "loss/code", "ppl/prose", "ppl/code"} <= set(val[-1])
    assert val[-1]["loss"] < val[0]["loss"]
    assert train[-1]["tokens_per_s"] > 0 and 0 < train[-1]["mfu"] < 1.5
    for name in ("recipe.yaml", "summary.md", "loss.png", "results.json", "final/model.safetensors",
                 "final/config.json", "final/tokenizer.json", "best/model.safetensors", "tokenizer/tokenizer.json"):
        assert (run_dir / name).exists(), name
    assert "| prose |" in (run_dir / "summary.md").read_text()
    # `lmforge eval` on the folder reproduces the final validation figures
    metrics = evaluate_run(run_dir, max_batches=2)
    assert metrics["loss"] == pytest.approx(val[-1]["loss"], rel=1e-5)


def test_document_masking_run(tmp_path, corpus):
    tree = tiny_recipe(corpus, tmp_path / "run", "clm", max_steps=5)
    tree["objective"]["document_mask"] = True
    tree["model"]["family"] = "llama"
    run_dir = pretrain(recipe_from_dict(tree), show_progress=False)
    assert (run_dir / "final" / "model.safetensors").exists()


def test_streaming_mode_trains(tmp_path, corpus):
    tree = tiny_recipe(corpus, tmp_path / "run", "clm", max_steps=6, eval_every=0)
    tree["data"]["streaming"] = True
    run_dir = pretrain(recipe_from_dict(tree), show_progress=False)
    losses = [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_continued_pretraining_from_minilm(tmp_path, corpus, minilm_dir):
    tree = tiny_recipe(corpus, tmp_path / "run", "mlm", max_steps=2, eval_every=0, batch_size=4)
    tree["model"] = {"path": str(minilm_dir)}
    tree.pop("tokenizer")
    run_dir = pretrain(recipe_from_dict(tree), show_progress=False)
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["hidden_size"] == 384
    assert (run_dir / "final" / "vocab.txt").exists() or (run_dir / "final" / "tokenizer.json").exists()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_bad_inputs_fail_with_one_clear_line(tmp_path, corpus, minilm_dir):
    import yaml

    def run(tree, name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return _cli("pretrain", path, "--no-progress")

    base = tiny_recipe(corpus, tmp_path / "out", "clm")
    # a block size above the model's position limit
    tree = json.loads(json.dumps(base))
    tree["model"]["max_positions"] = 16
    result = run(tree, "positions")
    assert result.exit_code == 2 and "objective.block_size: 32 needs 31 positions, above the model's position limit 16" in result.output
    # a tokenizer whose vocabulary does not match the model
    tree = tiny_recipe(corpus, tmp_path / "out2", "mlm")
    tree["model"] = {"path": str(minilm_dir)}
    tok_dir = tmp_path / "bigtok"
    big = _cli("tokenizer", "train", _write(tmp_path / "tok.yaml", {**tree, "tokenizer": {
        "kind": "bpe", "vocab_size": 31000}, "model": {"family": "bert"}}), "--out", tok_dir)
    assert big.exit_code == 0, big.output
    from transformers import AutoTokenizer
    assert len(AutoTokenizer.from_pretrained(tok_dir)) <= 31000
    # an output folder that cannot be written
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    tree = json.loads(json.dumps(base))
    tree["output"]["dir"] = str(blocker / "run")
    result = run(tree, "unwritable")
    assert result.exit_code == 2 and "cannot write the run folder" in result.output
    # a CSV without the named column
    csv = tmp_path / "data.csv"
    csv.write_text("body,label\nhello there,1\n")
    tree = json.loads(json.dumps(base))
    tree["data"]["sources"] = [{"path": str(csv), "text_column": "text"}]
    result = run(tree, "csv")
    assert result.exit_code == 2 and "no column 'text'" in result.output and "data.csv" in result.output
    # a wrong type
    tree = json.loads(json.dumps(base))
    tree["train"]["max_steps"] = "many"
    result = run(tree, "type")
    assert result.exit_code == 2 and "train.max_steps" in result.output and "'many'" in result.output
    # an existing run folder is never overwritten silently
    tree = json.loads(json.dumps(base))
    tree["output"]["dir"] = str(tmp_path / "existing")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("precious")
    result = run(tree, "existing")
    assert result.exit_code == 2 and "--resume" in result.output
    assert (tmp_path / "existing" / "keep.txt").read_text() == "precious"


def test_vocabulary_mismatch_is_an_error(tmp_path, corpus, minilm_dir):
    from lmforge.models import check_compatible, load_model
    from lmforge.recipe import TokenizerConfig
    from lmforge.tokenizer import train_tokenizer
    model = load_model(minilm_dir, "mlm")
    tok = train_tokenizer([f"w{i} x{i * 7}" for i in range(20000)],
                          TokenizerConfig(kind="wordpiece", vocab_size=40000, min_frequency=1))
    assert len(tok) > model.config.vocab_size
    with pytest.raises(LmforgeError, match="tokenizer has .* tokens but the model's vocabulary holds 30522"):
        check_compatible(model, tok, 32, str(minilm_dir))


def _write(path, tree):
    import yaml
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_run_that_fails_before_it_starts_leaves_nothing(tmp_path, corpus):
    """Set-up errors (here: a source that does not exist, a model too small for the block) remove what the run
    wrote; a folder that was there before stays, emptied of this run's files."""
    tree = tiny_recipe(corpus, tmp_path / "run", "clm")
    tree["data"]["sources"].append({"path": str(tmp_path / "missing.txt"), "domain": "x"})
    with pytest.raises(LmforgeError, match="missing.txt"):
        pretrain(recipe_from_dict(tree), show_progress=False)
    assert not (tmp_path / "run").exists()

    (tmp_path / "mine").mkdir()
    tree = tiny_recipe(corpus, tmp_path / "mine", "clm")
    tree["model"]["max_positions"] = 8  # below the block size: refused once the model is built
    with pytest.raises(LmforgeError, match="position limit"):
        pretrain(recipe_from_dict(tree), show_progress=False)
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())


def test_resume_names_what_the_recipe_changed(tmp_path, corpus):
    import subprocess
    import sys
    import time

    import yaml
    from lmforge.runs import recipe_changes
    assert recipe_changes({"train": {"lr": 0.1, "max_steps": 4}, "name": "a"},
                          {"train": {"lr": 0.1, "max_steps": 6}, "name": "a"}) == [
        "train.max_steps: 4 -> 6 (the schedule is recomputed: warmup and decay now end at the new last step)"]
    tree = tiny_recipe(corpus, tmp_path / "run", "clm", max_steps=4, eval_every=0)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    cli = [sys.executable, "-m", "lmforge.cli", "pretrain", str(path), "--no-progress"]
    subprocess.run(cli, check=True, capture_output=True, timeout=300)
    # The run's wall time adds up every process that trained it: say the first one took 1000 s.
    state_file = tmp_path / "run" / "checkpoints" / "step-000004" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert 0 < state["train_state"]["seconds"] < 300
    state["train_state"]["seconds"] = 1000.0
    torch.save(state, state_file)
    started = time.perf_counter()
    resumed = subprocess.run(cli + ["--resume", "--set", "train.max_steps=6", "--set", "train.lr=0.001"],
                             capture_output=True, text=True, timeout=300)
    own = time.perf_counter() - started
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 1000 < json.loads((tmp_path / "run" / "results.json").read_text())["seconds"] < 1000 + own
    assert "wall time: 10" in (tmp_path / "run" / "summary.md").read_text()
    assert "resuming with a changed recipe:" in resumed.stderr
    assert "train.max_steps: 4 -> 6" in resumed.stderr and "train.lr: 0.003 -> 0.001" in resumed.stderr
    unchanged = subprocess.run(cli + ["--resume", "--set", "train.max_steps=6", "--set", "train.lr=0.001"],
                               capture_output=True, text=True, timeout=300)
    assert "changed recipe" not in unchanged.stderr


def test_a_recipe_that_cannot_fit_is_refused_before_work_starts(tmp_path, corpus):
    from lmforge.models.memory import check_fits, step_memory
    tree = tiny_recipe(corpus, tmp_path / "run", "clm")
    tree["objective"]["block_size"] = 100_000
    tree["train"]["batch_size"] = 12
    recipe = recipe_from_dict(tree)
    need = step_memory(recipe)
    # 2 layers x 32 wide x 1.2M tokens of activations, 300 x 1.2M of logits: tens of GB
    assert need["activations"] == 68 * 32 * 2 * 1_200_000 and need["total"] > 5 * 2**30
    with pytest.raises(LmforgeError, match=r"block_size 100000 x train\.batch_size 12: one training step needs "
                                           r"about [\d.]+ GB .* more than the 1\.0 GB"):
        check_fits(recipe, "cpu", available=2**30)
    tree["train"]["batch_size"] = 200  # about 160 GB a step: more than any machine this runs on
    with pytest.raises(LmforgeError, match="lower objective.block_size or train.batch_size"):
        pretrain(recipe_from_dict(tree), show_progress=False)
    assert not (tmp_path / "run").exists()
    tree["objective"]["block_size"], tree["train"]["batch_size"] = 32, 8
    assert check_fits(recipe_from_dict(tree), "cpu", available=2**30)["total"] < 3 * 2**20  # a tiny run: 2.5 MB


def test_a_second_run_reuses_the_trained_tokenizer_and_the_measured_roof(tmp_path, corpus, monkeypatch):
    from lmforge.engine import hardware
    from lmforge import pretrain as stage

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    hardware.matmul_roof.cache_clear()
    trained, measured, real_train = [], [], stage.train_tokenizer_for
    monkeypatch.setattr(stage, "train_tokenizer_for", lambda *a: trained.append(1) or real_train(*a))
    monkeypatch.setattr(hardware, "measure_matmul_roof", lambda *a: measured.append(1) or 7.5e9)
    tree = tiny_recipe(corpus, tmp_path / "a", "clm", max_steps=2, eval_every=0)
    tree["data"]["cache_dir"] = str(tmp_path / "cache")
    first = pretrain(recipe_from_dict(tree), show_progress=False)
    hardware.matmul_roof.cache_clear()  # a new process
    second = pretrain(recipe_from_dict({**tree, "output": {**tree["output"], "dir": str(tmp_path / "b")}}),
                      show_progress=False)
    assert trained == [1] and measured == [1]
    assert (first / "tokenizer" / "tokenizer.json").read_text() == (second / "tokenizer" / "tokenizer.json").read_text()
    roofs = json.loads((tmp_path / "cache" / "roof.json").read_text())
    assert list(roofs.values()) == [7.5e9]
    monkeypatch.setenv("LMFORGE_REFRESH_ROOF", "1")  # measured again when asked
    hardware.matmul_roof.cache_clear()
    hardware.matmul_roof("cpu", "fp32")
    assert measured == [1, 1]
    hardware.matmul_roof.cache_clear()


def test_a_run_on_cached_blocks_does_not_import_datasets(corpus, tmp_path):
    """The token blocks are memory-mapped `.npy` files: once cached, a run needs neither `datasets` nor a copy of
    the data (start-up time and memory); the second run trains on the same blocks."""
    tree = tiny_recipe(corpus, tmp_path / "first", max_steps=2, eval_every=0)
    tree["data"]["cache_dir"] = str(tmp_path / "cache")
    first = pretrain(tree, show_progress=False)
    blocks = next((tmp_path / "cache" / "blocks").iterdir())
    assert sorted(f.name for f in (blocks / "train").iterdir()) == ["domain.npy", "input_ids.npy"]
    assert np.load(blocks / "train" / "input_ids.npy", mmap_mode="r").dtype == np.int32
    tree["output"]["dir"] = str(tmp_path / "second")
    script = f"""
import json, sys
from lmforge.pretrain import pretrain
run = pretrain(json.loads({json.dumps(json.dumps(tree))}), show_progress=False)
print("datasets imported:", "datasets" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "datasets imported: False" in result.stdout
    losses = lambda run: [json.loads(l)["loss"] for l in open(run / "metrics.jsonl") if '"split"' not in l]  # noqa
    assert losses(tmp_path / "second") == losses(first.run_dir)
