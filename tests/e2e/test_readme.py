"""The README's commands, in a tiny form: quickstart, recipe show, eval, generate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LMFORGE = [sys.executable, "-m", "lmforge.cli"]


def _run(*args, ok=True):
    result = subprocess.run(LMFORGE + [str(a) for a in args], capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_quickstart_eval_generate(tmp_path):
    out = tmp_path / "qs"
    _run("quickstart", "--tiny", "--out", out, "--no-progress")
    summary = (out / "summary.md").read_text()
    assert "| code |" in summary and "| docs |" in summary and "Samples from the causal LM" in summary
    for run in ("clm", "mlm"):
        assert (out / run / "final" / "model.safetensors").exists()
        assert (out / run / "loss.png").exists() and (out / run / "metrics.jsonl").exists()
    result = _run("eval", out / "clm", "--json", "--max-batches", "2")
    metrics = json.loads(result.stdout)
    assert metrics["objective"] == "clm" and {"ppl/code", "ppl/docs"} <= set(metrics)
    text = _run("generate", out / "clm", "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1").stdout
    assert text.startswith("def ") and len(text) > 4
    again = _run("generate", out / "clm", "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1").stdout
    assert again == text  # seeded sampling is reproducible
    refused = _run("generate", out / "mlm", "--prompt", "x", ok=False)
    assert refused.returncode == 2 and "masked LM" in refused.stderr


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_example_recipes_validate(recipe):
    result = _run("recipe", "show", ROOT / "recipes" / recipe, "--set", "train.max_steps=7")
    assert "max_steps: 7" in result.stdout


def test_every_command_has_help():
    for command in ([], ["quickstart"], ["pretrain"], ["eval"], ["generate"], ["serve"], ["recipe", "show"],
                    ["recipe", "fields"], ["tokenizer", "train"]):
        result = _run(*command, "--help")
        assert "Usage" in result.stdout
