"""The multi-node command of docs/distributed.md, in its CPU/gloo form: two "nodes" of one process each on
127.0.0.1, meeting through torchrun's c10d rendezvous, train one run together."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _docs_command() -> list[str]:
    """The two-node pretraining line of docs/distributed.md, as written."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    line = next(l for l in text.splitlines() if l.startswith("torchrun --nnodes 2 ") and " pretrain " in l)
    return shlex.split(line.split("#")[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_two_nodes_on_one_machine_train_one_run(tmp_path, corpus):
    tree = tiny_recipe(corpus, tmp_path / "run", "clm", batch_size=4, max_steps=6, eval_every=0, threads=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    cmd = _docs_command()
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--rdzv_backend") + 1] == "c10d"
    # The CPU form: one process per node, the head on 127.0.0.1, this test's recipe.
    cmd[cmd.index("--nproc_per_node") + 1] = "1"
    cmd[cmd.index("--rdzv_endpoint") + 1] = f"127.0.0.1:{_free_port()}"
    cmd[0] = str(TORCHRUN)
    cmd[cmd.index("pretrain") + 1] = str(recipe)
    cmd += ["--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["tokens"] == 2 * 4 * 32  # a step reads the batch of both nodes: 2 processes x 4 blocks x 32
    assert re.search(r"global batch 8\b", outputs[0] + outputs[1])
