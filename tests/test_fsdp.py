"""FSDP2 under torchrun (gloo): the same losses as one process, sharded checkpoints that reshard on resume, LoRA
adapters alone trained and saved, incomplete checkpoints refused by name."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, BertModel,
                          GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration)

from conftest import tiny_recipe
from lmforge.engine.sharded_checkpoint import check_complete, load_sharded, save_sharded
from lmforge.engine.sharding import ignored_settings, parameterless_copy, repeated_blocks, unsharded
from lmforge.errors import LmforgeError
from lmforge.pretrain import pretrain
from lmforge.recipe import DistConfig, recipe_from_dict
from test_ddp import TORCHRUN, TOLERANCE, _losses
from test_finetune import base_dir, sentiment  # noqa: F401  (base_dir: the tiny BERT fixture)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def test_blocks_are_found_by_structure_in_every_family():
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=32))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                             num_decoder_layers=1, num_heads=2))
    assert [type(b).__name__ for b in repeated_blocks(tiny_gpt2())] == ["GPT2Block"] * 2
    assert [type(b).__name__ for b in repeated_blocks(bert)] == ["BertLayer"] * 3
    assert [type(b).__name__ for b in repeated_blocks(t5)] == ["T5Block"] * 3  # encoder's 2, decoder's 1


def test_gathered_copy_has_the_weights_and_the_ties():
    model = tiny_gpt2()
    skeleton = parameterless_copy(model)
    assert all(p.is_meta for p in skeleton.parameters())
    copy = unsharded(skeleton, {k: v.clone() for k, v in model.state_dict().items()})
    assert copy.lm_head.weight is copy.transformer.wte.weight
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(copy.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_settings_that_cannot_apply_are_said():
    cfg = recipe_from_dict({}, overrides=["dist.strategy=fsdp", "dist.mixed_precision=true"]).dist
    notes = ignored_settings(cfg, "cpu", 1)
    assert any("trains unsharded" in n for n in notes) and any("dist.mixed_precision" in n for n in notes)
    assert ignored_settings(DistConfig(), "cpu", 2) == []  # defaults say nothing
    with pytest.raises(LmforgeError, match=r"--set dist.strategy=zero3: dist.strategy"):
        recipe_from_dict({}, overrides=["dist.strategy=zero3"])


def test_incomplete_sharded_checkpoint_is_refused_by_name(tmp_path):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.randint(0, 50, (2, 8)), labels=torch.randint(0, 50, (2, 8))).loss.backward()
    optimizer.step()
    folder = save_sharded(tmp_path, 3, model, optimizer, {"train_state": {"step": 3}})
    assert folder.name == "step-000003" and not list(tmp_path.glob(".*.tmp"))
    fresh = tiny_gpt2()
    load_sharded(folder, fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    torch.testing.assert_close(fresh.state_dict(), model.state_dict())
    shard = folder / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # cut short
    with pytest.raises(LmforgeError, match=r"shard file __0_0\.distcp missing or cut short"):
        check_complete(folder)
    shard.unlink()
    with pytest.raises(LmforgeError, match=r"shard file __0_0\.distcp missing"):
        check_complete(folder)
    (folder / ".metadata").unlink()
    with pytest.raises(LmforgeError, match=r"'\.metadata' is missing"):
        check_complete(folder)


def _two_nodes(args: list[str], caches: tuple = (), timeout: float = 150.0) -> list[subprocess.CompletedProcess]:
    """The multi-node command of docs/distributed.md as two "nodes" of one process each on 127.0.0.1: two
    torchrun agents meeting at a c10d rendezvous; `caches`: each node's own LMFORGE_CACHE (node-local disks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Node 0 hosts the rendezvous store, so which one does is not a race; a node is declared dead after 2 min
    # without a heartbeat rather than 15 s, which an agent starved of CPU on a loaded 2-core machine can miss.
    def cmd(host: bool) -> list[str]:
        return [str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "test",
                "--rdzv_conf", f"is_host={int(host)},keep_alive_interval=5,keep_alive_max_attempt=24",
                "-m", "lmforge.cli", *args]
    envs = [{**ENV, "LMFORGE_CACHE": str(c)} for c in caches] or [ENV, ENV]
    nodes = [subprocess.Popen(cmd(rank == 0), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, env in enumerate(envs)]
    try:
        outputs = [n.communicate(timeout=timeout) for n in nodes]
        return [subprocess.CompletedProcess(n.args, n.returncode, *out) for n, out in zip(nodes, outputs)]
    finally:
        for n in nodes:
            n.kill()


def _assert_both_succeeded(nodes: list[subprocess.CompletedProcess]) -> None:
    """Every failing node's stderr, the store's host first: when the host fails, the other node only reports the lost
    connection to the rendezvous store, which hides the cause."""
    failed = [f"node {rank} (exit {n.returncode}):\n{n.stderr[-2500:]}" for rank, n in enumerate(nodes) if n.returncode]
    assert not failed, "\n\n".join(failed)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_two_fsdp_nodes_match_one_process_and_resume_on_one(tmp_path, corpus, capfd):
    """2 processes x batch 4 under FSDP (two "nodes", each with its own token cache), 1 process x batch 8: the
    same global batch, the same data, the same losses (to TOLERANCE: sums reduced in another order); the
    2-process run's step-6 checkpoint, resumed in one process, continues the same curve to step 12."""
    recipes = {}
    for name, batch in (("one", 8), ("two", 4)):
        tree = tiny_recipe(corpus, tmp_path / name, "clm", batch_size=batch, grad_accum=2, max_steps=12,
                           eval_every=6, save_every=6, keep_last=2, threads=1, schedule="constant")
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(tree))
    caches = (tmp_path / "node0-cache", tmp_path / "node1-cache")
    _assert_both_succeeded(_two_nodes(["pretrain", str(recipes["two"]), "--no-progress", "--set", "dist.strategy=fsdp"],
                                      caches))
    assert all(len(list(c.glob("blocks/*/meta.json"))) == 1 for c in caches)  # each node built its own copy
    step6 = tmp_path / "two" / "checkpoints" / "step-000006"
    assert sorted(p.name for p in step6.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                      "trainer_state.pt"]
    pretrain(recipes["one"], overrides=[f"tokenizer.path={tmp_path / 'two' / 'tokenizer'}"], show_progress=False)
    losses_one, losses_two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(losses_one) == len(losses_two) == 12 and losses_one[-1] < losses_one[0]
    assert max(abs(a - b) for a, b in zip(losses_one, losses_two)) < TOLERANCE, (losses_one, losses_two)
    # the consolidated export loads in transformers and holds the 1-process weights
    exported, reference = (AutoModelForCausalLM.from_pretrained(tmp_path / r / "final") for r in ("two", "one"))
    assert exported.lm_head.weight is exported.transformer.get_input_embeddings().weight
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, atol=1e-5, rtol=1e-4)
    # resharding: 2 processes' step-6 checkpoint, resumed by one process at the same global batch
    (tmp_path / "two" / "checkpoints" / "step-000012").rename(tmp_path / "step-12-aside")
    pretrain(recipes["two"], overrides=["dist.strategy=fsdp", "train.batch_size=8"], resume=True, show_progress=False)
    said = " ".join("".join(capfd.readouterr()).split())
    assert "resumed from" in said and "at step 6" in said, said
    losses_resumed = _losses(tmp_path / "two")
    assert max(abs(a - b) for a, b in zip(losses_resumed, losses_two)) < TOLERANCE, (losses_two, losses_resumed)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_lora_under_fsdp_on_two_nodes_trains_and_saves_only_the_adapters(tmp_path, base_dir):  # noqa: F811
    base = base_dir
    train, dev = sentiment(tmp_path, 160, 32)
    run = tmp_path / "run"
    tree = {"name": "lora", "task": "classification", "model": {"path": str(base)},
            "data": {"train": {"path": str(train)}, "validation": {"path": str(dev)}, "text_column": "sentence"},
            "strategy": {"method": "peft", "peft": {"r": 4, "target_modules": ["query", "value"]}},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "log_every": 1, "eval_every": 3, "save_every": 3,
                      "threads": 1},
            "dist": {"strategy": "fsdp"},
            "output": {"dir": str(run), "tensorboard": False, "plots": False}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(tree))
    _assert_both_succeeded(_two_nodes(["finetune", str(tmp_path / "ft.yaml"), "--no-progress"]))
    saved = FileSystemReader(str(run / "checkpoints" / "step-000006")).read_metadata().state_dict_metadata
    weights = {k for k in saved if k.startswith("model.")}
    assert weights and all(".lora_" in k or ".modules_to_save." in k for k in weights), sorted(weights)
    assert any(".lora_B." in k for k in weights) and any(k.startswith("optimizer.state.") for k in saved)
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k or "classifier" in k or "pooler" in k for k in adapter)
    merged = AutoModelForSequenceClassification.from_pretrained(run / "final")
    original = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.weight"):
        torch.testing.assert_close(merged.state_dict()[name], original.state_dict()[name])  # frozen: untouched
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(merged.state_dict()[query], original.state_dict()[query])  # the adapter merged in
    assert json.loads((run / "results.json").read_text())["steps"] == 6
