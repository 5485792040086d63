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


def _wait_for_training(proc, metrics: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"loss"') >= 2:
            return
        time.sleep(0.01)
    raise AssertionError("the run did not start training in time")


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(tmp_path, corpus):
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    def recipe(name: str) -> Path:
        path = _write_recipe(tmp_path / f"{name}.yaml", corpus, tmp_path / name)
        tree = yaml.safe_load(path.read_text())
        tree["train"].update(max_steps=200, save_every=1000, log_every=10)  # no periodic checkpoint to fall back on
        path.write_text(yaml.safe_dump(tree))
        return path

    subprocess.run(LMFORGE + ["pretrain", str(recipe("ref")), "--no-progress"], check=True, env=env,
                   capture_output=True, timeout=300)
    stopped = recipe("stop")
    proc = subprocess.Popen(LMFORGE + ["pretrain", str(stopped), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_training(proc, tmp_path / "stop" / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    step = int(latest_checkpoint(tmp_path / "stop" / "checkpoints").name.split("-")[1])
    assert 0 < step < 200 and f"stopped by SIGTERM at step {step} of 200" in err and "--resume" in err
    assert not (tmp_path / "stop" / "final").exists()
    assert not [p for p in (tmp_path / "stop" / "checkpoints").iterdir() if p.name.startswith(".")]

    subprocess.run(LMFORGE + ["pretrain", str(stopped), "--resume", "--no-progress"], check=True, env=env,
                   capture_output=True, timeout=300)
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "stop" / "final" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_second_stop_signal_ends_the_process_at_once(tmp_path):
    script = tmp_path / "twice.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from lmforge.engine.signals import StopSignals\n"
        "with StopSignals(announce=False) as stops:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "    assert stops.received == signal.SIGTERM\n"
        "    print('first signal noted', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(10)\n"
        "print('survived')\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.stdout == "first signal noted\n" and result.returncode == -signal.SIGTERM, result.stderr


def test_disk_full_is_one_error_and_leaves_the_last_checkpoint(tmp_path, corpus, monkeypatch):
    """ENOSPC while saving: one error naming the folder and the sizes, no temporary folder, the previous
    checkpoint intact, exit status 2 from the CLI."""
    import errno
    from typer.testing import CliRunner
    from transformers import GPT2LMHeadModel
    from lmforge.cli import app

    tree = tiny_recipe(corpus, tmp_path / "run", "clm", max_steps=6, save_every=3, eval_every=0)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(tree))
    real_save = GPT2LMHeadModel.save_pretrained

    def full_disk(self, folder, **kwargs):
        if "step-000006" not in str(folder):
            return real_save(self, folder, **kwargs)
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)  # half-written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", full_disk)
    result = CliRunner().invoke(app, ["pretrain", str(recipe_file), "--no-progress"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left on the device" in lines[0] and "MB needed" in lines[0]
    assert str(tmp_path / "run" / "checkpoints" / "step-000006") in lines[0]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000003"]  # no .tmp left, the last one intact
    assert load_file(str(checkpoints / "step-000003" / "model.safetensors"))


def test_metrics_log_on_a_full_disk_is_one_error(tmp_path, monkeypatch):
    import builtins
    import errno
    from lmforge.engine.logging import MetricsLog
    from lmforge.errors import LmforgeError

    log = MetricsLog(tmp_path, tensorboard=False)
    real_open = builtins.open

    def full(path, *args, **kwargs):
        if str(path).endswith("metrics.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(LmforgeError, match=f"{tmp_path}: no space left on the device"):
        log.write({"step": 1, "loss": 1.0})
