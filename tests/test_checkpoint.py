"""Checkpoints load in transformers' Auto classes with identical outputs; resume after SIGKILL is exact."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from conftest import tiny_recipe
from lmforge.engine.checkpoint import latest_checkpoint, save_model
from lmforge.pretrain import pretrain
from lmforge.recipe import recipe_from_dict
from lmforge.runs import open_run

LMFORGE = [sys.executable, "-m", "lmforge.cli"]


@pytest.mark.parametrize("objective,family", [("clm", "gpt2"), ("clm", "llama"), ("mlm", "bert"),
                                              ("mlm", "roberta"), ("mlm", "electra")])
def test_checkpoint_loads_in_auto_classes_with_identical_outputs(tmp_path, corpus, objective, family):
    tree = tiny_recipe(corpus, tmp_path / "run", objective, max_steps=3, eval_every=0)
    tree["model"]["family"] = family
    run_dir = pretrain(recipe_from_dict(tree), show_progress=False)
    _, ours, tok = open_run(run_dir)
    auto = (AutoModelForCausalLM if objective == "clm" else AutoModelForMaskedLM).from_pretrained(run_dir / "final")
    hf_tok = AutoTokenizer.from_pretrained(run_dir / "final")
    assert hf_tok("def x") == tok("def x")
    ids = torch.tensor([tok("the river value result", add_special_tokens=False)["input_ids"]])
    ours.eval(), auto.eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, auto(input_ids=ids).logits)
    # and the weights are the trained ones, not a fresh initialisation
    step = latest_checkpoint(run_dir / "checkpoints")
    saved = load_file(str(step / "model.safetensors"))
    for name, tensor in saved.items():
        assert torch.equal(tensor, auto.state_dict()[name]), name


def test_save_model_is_atomic_and_replaces(tmp_path, corpus):
    tree = tiny_recipe(corpus, tmp_path / "run", "clm", max_steps=1, eval_every=0)
    run_dir = pretrain(recipe_from_dict(tree), show_progress=False)
    _, model, tok = open_run(run_dir)
    target = tmp_path / "copy"
    save_model(target, model, tok, {"note.json": {"a": 1}})
    save_model(target, model, tok, {"note.json": {"a": 2}})
    assert (target / "note.json").read_text().strip().endswith("}")
    assert '"a": 2' in (target / "note.json").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".copy")]


def _write_recipe(path: Path, corpus, out: Path) -> Path:
    tree = tiny_recipe(corpus, out, "clm", max_steps=400, save_every=20, eval_every=0, keep_last=3,
                       log_every=20, batch_size=16)
    tree["model"].update(d_model=64, dropout=0.1)  # dropout: resume must restore the RNG too
    tree["objective"]["block_size"] = 64
    tree["train"]["threads"] = 1
    path.write_text(yaml.safe_dump(tree))
    return path


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, corpus):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    reference = _write_recipe(tmp_path / "ref.yaml", corpus, tmp_path / "ref")
    subprocess.run(LMFORGE + ["pretrain", str(reference), "--no-progress"], check=True, env=env,
                   capture_output=True, timeout=300)

    crashed = _write_recipe(tmp_path / "crash.yaml", corpus, tmp_path / "crash")
    proc = subprocess.Popen(LMFORGE + ["pretrain", str(crashed), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        found = latest_checkpoint(tmp_path / "crash" / "checkpoints")
        if found is not None and int(found.name.split("-")[1]) >= 60:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "crash" / "final").exists()
    killed_at = int(latest_checkpoint(tmp_path / "crash" / "checkpoints").name.split("-")[1])
    assert killed_at < 400

    subprocess.run(LMFORGE + ["pretrain", str(crashed), "--resume", "--no-progress"], check=True, env=env,
                   capture_output=True, timeout=300)
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "crash" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the metrics log has each step once, as if never interrupted
    steps = [line for line in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    ref_steps = [line for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == len(ref_steps)
