"""The docs stay true: the generated recipe reference is current and the Python API page's script runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current():
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "recipe", "fields", "--markdown"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    checked_in = (ROOT / "docs" / "recipes.md").read_text()
    assert result.stdout.strip() == checked_in.strip(), (
        "docs/recipes.md is stale: run `lmforge recipe fields --markdown > docs/recipes.md`")
    for field in ("`train.lr`", "`objective.name`", "`data.sources[].path`", "`strategy.method`", "`dedup.threshold`"):
        assert field in checked_in


def test_python_api_script_runs(tmp_path):
    """docs/python-api.md's script: a user-registered objective trains through lmforge.pretrain."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    scripts = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(scripts) == 1
    (tmp_path / "script.py").write_text(scripts[0])
    result = subprocess.run([sys.executable, "script.py"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    loss = float(re.search(r"validation loss (\d+\.\d+)", result.stdout).group(1))
    assert 0 < loss < 4.0  # a character model on Python source: well below uniform over ~90 symbols (4.5)
    assert re.search(r"perplexity \d+\.\d+, code \d+\.\d+", result.stdout)
    assert "\ndef " in result.stdout
    recipe = (tmp_path / "runs" / "smooth" / "recipe.yaml").read_text()
    assert "name: clm-smooth" in recipe and "warmup_steps: 5" in recipe
    assert (tmp_path / "runs" / "smooth" / "final" / "model.safetensors").is_file()


def test_recipe_fields_lists_every_recipe_kind():
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "recipe", "fields"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    headings = [line for line in out.splitlines() if line.startswith("# ")]
    assert [h.split(" (")[0] for h in headings] == ["# Pretraining and experts recipes", "# Fine-tuning recipes",
                                                    "# Data preparation recipes", "# Compress recipes"]
    for line in ("  train.lr = 0.0005", "  strategy.method = 'full'", "  dedup.threshold = ", "  experts.routing = "):
        assert line in out, line
