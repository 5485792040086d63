"""`lmforge export` to ONNX Runtime: fp32 logits equal PyTorch's, int8 close to them, predict / eval / serve on
the exported folder, and each bad input refused with one line and nothing left behind."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForMaskedLM, BertForSequenceClassification,
                          BertForTokenClassification)
from typer.testing import CliRunner

from conftest import tiny_recipe
from lmforge import LmforgeError, pretrain
from lmforge.cli import app as cli
from lmforge.export import export
from lmforge.models.onnx import OnnxForSequenceClassification, load_onnx_model
from lmforge.recipe import TokenizerConfig
from lmforge.serve import create_app, load_served_model
from lmforge.tasks.config import finetune_recipe_from_dict
from lmforge.tasks.predict import classify_texts, open_task_model, tag_texts
from lmforge.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

WORDS = "the a film plot was great awful dull lovely john mary paris london met flew to in and very".split()
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
FP32_TOLERANCE = 1e-4  # the bar for fp32 parity
INT8_TOLERANCE = 0.05  # int8 weights on these tiny random models move logits by a few hundredths at most


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A fine-tuning run folder (recipe.yaml + final/) holding a tiny BERT classifier, a tiny BERT tagger and a
    masked LM as HF folders, and their ONNX exports (fp32 and int8)."""
    root = tmp_path_factory.mktemp("export")
    tok = train_tokenizer(iter(texts(200)), TokenizerConfig(kind="wordpiece", vocab_size=120, min_frequency=1))
    config = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    made = {"run/final": BertForSequenceClassification(BertConfig(**config, id2label={0: "neg", 1: "pos"},
                                                                  label2id={"neg": 0, "pos": 1})),
            "tagger": BertForTokenClassification(BertConfig(**config, id2label=dict(enumerate(NER_LABELS)),
                                                            label2id={n: i for i, n in enumerate(NER_LABELS)})),
            "mlm": BertForMaskedLM(BertConfig(**config))}
    for name, model in made.items():
        save_tokenizer(tok, root / name)
        model.save_pretrained(root / name)
    dev = root / "dev.tsv"
    rows = [f"{t}\t{('neg', 'pos')[i % 2]}\n" for i, t in enumerate(texts(40, seed=1))]
    dev.write_text("sentence\tlabel\n" + "".join(rows))
    recipe = finetune_recipe_from_dict({"name": "tiny", "task": "classification", "model": {"path": str(root / "mlm")},
                                        "data": {"train": {"path": str(dev)}, "validation": {"path": str(dev)},
                                                 "text_column": "sentence", "max_length": 48},
                                        "output": {"dir": str(root / "run")}})
    (root / "run" / "recipe.yaml").write_text(recipe.to_yaml())
    export(root / "run", root / "run-onnx")
    export(root / "run", root / "run-int8", quantize="int8")
    export(root / "tagger", root / "tagger-onnx")
    return root


def batch(tokenizer, n: int = 5, seed: int = 3) -> dict:
    """Lengths other than the traced ones, padded: the graph's axes are dynamic and the mask is real."""
    return dict(tokenizer(texts(n, seed), padding=True, return_tensors="pt"))


def logits_gap(torch_dir: Path, onnx_dir: Path, masked: bool = False) -> float:
    _, reference, tokenizer, _ = open_task_model(torch_dir)
    _, onnx_model, _, _ = open_task_model(onnx_dir)
    inputs = batch(tokenizer)
    with torch.no_grad():  # the second may be a PyTorch folder too (`--format hf`)
        want = reference(**inputs).logits.numpy()
        got = onnx_model(**inputs).logits.numpy()
    gap = np.abs(got - want)
    return float(gap[inputs["attention_mask"].numpy().astype(bool)].max() if masked else gap.max())


def test_fp32_logits_equal_pytorch_and_open_in_plain_onnxruntime(models):
    assert logits_gap(models / "run", models / "run-onnx") <= FP32_TOLERANCE
    assert logits_gap(models / "tagger", models / "tagger-onnx", masked=True) <= FP32_TOLERANCE
    card = json.loads((models / "run-onnx" / "export.json").read_text())
    assert card["opset"] == 17 and card["quantization"] is None and card["fp32_max_abs_logit_diff"] <= FP32_TOLERANCE
    assert card["fused_operators"]["Attention"] == 2 and card["fused_operators"]["SkipLayerNormalization"] == 4
    readme = (models / "run-onnx" / "README.md").read_text()
    assert "onnxruntime" in readme and "| opset | 17 |" in readme and "Attention" in readme
    session = ort.InferenceSession(str(models / "run-onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    ids = np.array([[2, 10, 11, 12, 3]], dtype=np.int64)
    out = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                   "token_type_ids": np.zeros_like(ids)})[0]
    assert out.shape == (1, 2)


def test_roberta_classifier_exports_with_equal_logits(models, tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(1)
    config = RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=66, pad_token_id=0, num_labels=3)
    save_tokenizer(load_tokenizer(models / "tagger"), tmp_path / "roberta")
    RobertaForSequenceClassification(config).save_pretrained(tmp_path / "roberta")
    export(tmp_path / "roberta", tmp_path / "roberta-onnx")
    assert logits_gap(tmp_path / "roberta", tmp_path / "roberta-onnx") <= FP32_TOLERANCE


def test_int8_is_close_and_smaller(models):
    assert logits_gap(models / "run", models / "run-int8") <= INT8_TOLERANCE
    card = json.loads((models / "run-int8" / "export.json").read_text())
    assert card["quantization"].startswith("dynamic int8") and card["int8_max_abs_logit_diff"] <= INT8_TOLERANCE
    assert card["mask_fill"] == -30.0  # the unfused attention's mask fill, no longer float32's lowest value
    # the weights' bytes (at this tiny size the graph's nodes weigh as much as its weights; MiniLM's file is 0.25×)
    graphs = {name: __import__("onnx").load(str(models / name / "model.onnx")) for name in ("run-onnx", "run-int8")}
    fp32, int8 = (sum(len(t.raw_data) for t in graphs[name].graph.initializer) for name in ("run-onnx", "run-int8"))
    assert int8 < 0.5 * fp32
    ops = {node.op_type for node in graphs["run-int8"].graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops


def test_predict_and_eval_on_the_exported_folder(models, tmp_path):
    runner = CliRunner()
    (tmp_path / "in.txt").write_text("\n".join(texts(6, seed=5)) + "\n")
    for folder in ("run", "run-onnx"):
        done = runner.invoke(cli, ["predict", str(models / folder), "--input", str(tmp_path / "in.txt"),
                                   "--output", str(tmp_path / f"{folder}.jsonl")])
        assert done.exit_code == 0, done.output
    torch_rows, onnx_rows = ([json.loads(line) for line in (tmp_path / f"{f}.jsonl").read_text().splitlines()]
                             for f in ("run", "run-onnx"))
    assert len(onnx_rows) == 6
    for want, got in zip(torch_rows, onnx_rows):
        assert got["label"] == want["label"] and got["scores"] == pytest.approx(want["scores"], abs=1e-5)
    shown = runner.invoke(cli, ["eval", str(models / "run-onnx"), "--json"])
    assert shown.exit_code == 0, shown.output
    onnx_report = json.loads((models / "run-onnx" / "eval-validation.json").read_text())
    runner.invoke(cli, ["eval", str(models / "run"), "--json"])
    torch_report = json.loads((models / "run" / "eval-validation.json").read_text())
    assert onnx_report["examples"] == 40 and onnx_report["accuracy"] == torch_report["accuracy"]


def test_serve_classify_and_ner_on_the_exported_folder(models):
    served = {"sentiment": load_served_model(f"sentiment={models / 'run-onnx'}"),
              "tagger": load_served_model(f"tagger={models / 'tagger-onnx'}")}
    assert isinstance(served["sentiment"].model, OnnxForSequenceClassification)
    assert served["sentiment"].kind == "classification" and served["tagger"].kind == "ner"
    sentences = texts(3, seed=7)
    _, reference, tokenizer, _ = open_task_model(models / "run")
    _, tagger, tag_tokenizer, _ = open_task_model(models / "tagger")
    with TestClient(create_app(served)) as http:
        r = http.post("/v1/classify", json={"model": "sentiment", "texts": sentences})
        assert r.status_code == 200, r.text
        for got, want in zip(r.json()["data"], classify_texts(reference, tokenizer, sentences)):
            assert got["label"] == want["label"] and got["scores"] == pytest.approx(want["scores"], abs=1e-5)
        r = http.post("/v1/ner", json={"model": "tagger", "texts": ["john met mary in paris"]})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["tags"] == tag_texts(tagger, tag_tokenizer, ["john met mary in paris"])[0]["tags"]


def fails(args: list[str], message: str) -> None:
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 2, done.output
    assert done.output.startswith("error:") and message in done.output and done.output.count("\n") == 1, done.output


def test_bad_inputs_are_one_line_and_leave_nothing(models, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fails(["export", str(models / "mlm"), "--out", str(out)], "no ONNX export rule for BertForMaskedLM")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (models / "tagger" / name).is_file():
            (no_weights / name).write_bytes((models / "tagger" / name).read_bytes())
    fails(["export", str(no_weights), "--out", str(out)], "no weights to export")
    fails(["export", str(models / "run-onnx"), "--out", str(out)], "already an ONNX export")
    fails(["export", str(models / "tagger"), "--out", str(out), "--quantize", "int4"], "--quantize: expected int8")
    fails(["export", str(models / "tagger"), "--out", str(models / "run-onnx")], "already exists and is not empty")
    assert not out.exists()

    # A failure half-way through leaves neither the folder nor its temporary twin.
    monkeypatch.setattr("lmforge.export.onnx.quantize_dynamic", lambda *a, **k: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    fails(["export", str(models / "tagger"), "--out", str(out), "--quantize", "int8"], "no space left on the device")
    assert sorted(tmp_path.iterdir()) == sorted([no_weights, *corpus.values()])

    # An export is inference-only: fine-tuning, pretraining and experts refuse it.
    recipe = tmp_path / "ft.yaml"
    tree = yaml.safe_load((models / "run" / "recipe.yaml").read_text())
    tree["model"]["path"], tree["output"]["dir"] = str(models / "run-onnx"), str(tmp_path / "ft-run")
    recipe.write_text(yaml.safe_dump(tree))
    fails(["finetune", str(recipe), "--no-progress"], "is an ONNX export (model.onnx), which is inference-only")
    assert not (tmp_path / "ft-run").exists()
    tree = tiny_recipe(corpus, tmp_path / "pt-run", objective="mlm")
    tree["model"] = {"path": str(models / "run-onnx")}
    with pytest.raises(LmforgeError, match="model.path: .* inference-only; use the run it was exported from"):
        pretrain(tree, show_progress=False)
    assert not (tmp_path / "pt-run").exists()

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for entry in (models / "run-onnx").iterdir():
        (corrupt / entry.name).write_bytes(entry.read_bytes())
    (corrupt / "model.onnx").write_bytes(b"not a protobuf" * 10)
    (tmp_path / "in.txt").write_text("a film\n")
    fails(["predict", str(corrupt), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o.jsonl")],
          "not a valid ONNX model")
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(Exception, match="not a valid ONNX model"):
        load_onnx_model(corrupt)


def test_a_pruned_classifier_exports_with_equal_logits(models, tmp_path):
    """Heads and FFN neurons removed unevenly (layer 0 keeps 2 of 4 heads, layer 1 keeps 3; FFN widths 32 and 24),
    saved as `lmforge compress` saves it: fp32 ONNX equals the pruned PyTorch model, int8 stays close."""
    from lmforge.models.compressed import COMPRESSION_KEY, load_pretrained
    from lmforge.models.slicing import keep_units, stock_loadable
    model = load_pretrained(AutoModelForSequenceClassification, models / "run" / "final")
    keep_units(model, heads=[[0, 2], [1, 2, 3]], neurons=[list(range(0, 64, 2))[:40], list(range(24))])
    setattr(model.config, COMPRESSION_KEY, {"shape": stock_loadable(model)})
    save_tokenizer(load_tokenizer(models / "run" / "final"), tmp_path / "pruned")
    model.save_pretrained(tmp_path / "pruned")
    export(tmp_path / "pruned", tmp_path / "pruned-onnx")
    export(tmp_path / "pruned", tmp_path / "pruned-int8", quantize="int8")
    assert logits_gap(tmp_path / "pruned", tmp_path / "pruned-onnx") <= FP32_TOLERANCE
    assert logits_gap(tmp_path / "pruned", tmp_path / "pruned-int8") <= INT8_TOLERANCE
    full, pruned = ((d / "model.onnx").stat().st_size for d in (models / "run-onnx", tmp_path / "pruned-onnx"))
    assert pruned < full

    # The nearest stock shape: zero heads and neurons back in, stock from_pretrained, the pruned logits.
    export(tmp_path / "pruned", tmp_path / "pruned-hf", fmt="hf")
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned-hf").eval()
    assert stock.config.num_attention_heads == 4 and stock.config.intermediate_size == 32
    assert "lmforge_compression" not in json.loads((tmp_path / "pruned-hf" / "config.json").read_text())
    assert logits_gap(tmp_path / "pruned", tmp_path / "pruned-hf") <= FP32_TOLERANCE
    card = (tmp_path / "pruned-hf" / "README.md").read_text()
    assert "| 0 | 2 → 4 | 32 → 32 |" in card and "| 1 | 3 → 4 | 24 → 32 |" in card
    export(models / "mlm", tmp_path / "mlm-hf", fmt="hf")  # any head of a family with a pruning rule, not only ONNX's
    assert "already describes" in (tmp_path / "mlm-hf" / "README.md").read_text()
    fails(["export", str(tmp_path / "pruned"), "--out", str(tmp_path / "x"), "--format", "hf", "--quantize", "int8"],
          "int8 weights have no stock transformers form")
    fails(["export", str(tmp_path / "pruned"), "--out", str(tmp_path / "x"), "--format", "gguf"],
          "--format: lmforge exports to onnx, hf")
    assert not (tmp_path / "x").exists()
