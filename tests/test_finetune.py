"""Fine-tuning: classification (single, pairs, multi-label) and NER on tiny models, strategies, outputs, bad input."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, BertConfig, BertForMaskedLM

from lmforge.errors import LmforgeError
from lmforge.finetune import evaluate_task_run, finetune, finetune_recipe_from_dict, predict_file
from lmforge.recipe import TokenizerConfig
from lmforge.tokenizer import save_tokenizer, train_tokenizer

from conftest import SHARED

GOOD = "great wonderful lovely superb brilliant charming".split()
BAD = "awful boring dreadful dull terrible clumsy".split()
FILLER = "the film story actors plot music was and very a with its scenes".split()
NAMES = "john mary peter anna paul lucy".split()
CITIES = "london paris berlin madrid rome vienna".split()
SURNAMES = "smith jones brown".split()


def sentence(rng, polar):
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
    words.insert(rng.randint(0, len(words)), rng.choice(polar))
    return " ".join(words)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny BERT (2 layers, 64 dims) with its WordPiece tokenizer, saved as a local HF folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    words = GOOD + BAD + FILLER + NAMES + CITIES + [w.capitalize() for w in NAMES + CITIES + SURNAMES] + ["flew", "to", "met", "in"]
    texts = [" ".join(random.Random(i).sample(words, 8)) for i in range(400)]
    tok = train_tokenizer(texts, TokenizerConfig(kind="wordpiece", vocab_size=500, min_frequency=1))
    save_tokenizer(tok, folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writerow(header)
        w.writerows(rows)
    return path


def sentiment(tmp_path: Path, n_train=600, n_dev=200):
    rng = random.Random(0)
    def rows(n):
        return [(sentence(rng, GOOD if k % 2 else BAD), k % 2) for k in range(n)]
    return write_tsv(tmp_path / "train.tsv", rows(n_train)), write_tsv(tmp_path / "dev.tsv", rows(n_dev))


def recipe(base_dir, out, task="classification", data=None, strategy=None, **train):
    tree = {"name": "t", "task": task, "data": data or {}, "model": {"path": str(base_dir)},
            "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "log_every": 5, "seed": 0, **train},
            "output": {"dir": str(out), "tensorboard": False, "plots": False}}
    if strategy:
        tree["strategy"] = strategy
    return finetune_recipe_from_dict(tree)


def test_classification_learns_and_exports(tmp_path, base_dir):
    train, dev = sentiment(tmp_path)
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(train)}, "validation": {"path": str(dev)},
                                                 "test": {"path": str(dev)}, "text_column": "sentence"})
    run = finetune(r, show_progress=False)
    result = json.loads((run / "results.json").read_text())
    assert result["validation"]["accuracy"] > 0.9  # chance is 0.5
    for name in ("report-validation.txt", "report-test.txt", "eval-test.json", "README.md", "best", "final"):
        assert (run / name).exists(), name
    assert "accuracy" in (run / "README.md").read_text()
    # The export is a plain HF classifier with the label names in its config.
    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.id2label == {0: "0", 1: "1"}
    report = json.loads((run / "eval-validation.json").read_text())
    assert sum(map(sum, report["confusion"])) == 200 and set(report["per_class"]) == {"0", "1"}
    # predict: one line per input with a label and scores; eval re-scores the recipe's split.
    inputs = tmp_path / "new.jsonl"
    inputs.write_text(json.dumps({"sentence": "the plot was great and lovely"}) + "\n" +
                      json.dumps({"sentence": "the plot was awful and dull"}) + "\n")
    assert predict_file(run, inputs, tmp_path / "preds.jsonl") == 2
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [p["label"] for p in preds] == ["1", "0"]
    assert abs(sum(preds[0]["scores"].values()) - 1) < 1e-5
    again = evaluate_task_run(run, "validation")
    assert again["accuracy"] == pytest.approx(result["validation"]["accuracy"])


def test_pairs_multiclass_and_unknown_labels(tmp_path, base_dir):
    rng = random.Random(1)
    classes = {"pos": GOOD, "neg": BAD, "name": NAMES}
    def rows(n):
        out = []
        for k in range(n):
            label = list(classes)[k % 3]
            out.append({"a": " ".join(rng.sample(FILLER, 3)), "b": sentence(rng, classes[label]), "y": label})
        return out
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows(600)))
    dev_rows = rows(150)
    dev_rows[5]["y"] = "other"
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in dev_rows))
    data = {"train": {"path": str(train)}, "validation": {"path": str(dev)}, "text_column": "a",
            "text_pair_column": "b", "label_column": "y"}
    with pytest.raises(LmforgeError, match=r"dev.jsonl:6: label 'other' is not in the label set"):
        finetune(recipe(base_dir, tmp_path / "bad", data=data), show_progress=False)
    run = finetune(recipe(base_dir, tmp_path / "run", data={**data, "unknown_label": "neg"}, lr=2e-3, epochs=4), show_progress=False)
    metrics = json.loads((run / "eval-validation.json").read_text())
    assert list(metrics["per_class"]) == ["name", "neg", "pos"]
    assert metrics["accuracy"] > 0.6 and metrics["mcc"] > 0.5  # chance: 1/3 and 0


def test_multi_label(tmp_path, base_dir):
    rng = random.Random(2)
    def rows(n):
        out = []
        for _ in range(n):
            labels = [lab for lab in ("good", "person") if rng.random() < 0.5]
            words = [rng.choice(FILLER) for _ in range(5)] + [rng.choice(GOOD if "good" in labels else BAD)]
            words += [rng.choice(NAMES)] if "person" in labels else []
            rng.shuffle(words)
            out.append((" ".join(words), ",".join(labels)))
        return out
    train, dev = write_tsv(tmp_path / "train.tsv", rows(600)), write_tsv(tmp_path / "dev.tsv", rows(200))
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(train)}, "validation": {"path": str(dev)},
                                                 "text_column": "sentence", "multi_label": True}, epochs=3)
    run = finetune(r, show_progress=False)
    metrics = json.loads((run / "eval-validation.json").read_text())
    assert list(metrics["per_class"]) == ["good", "person"]
    assert metrics["per_class"]["good"]["f1"] > 0.95 and metrics["micro_f1"] > 0.7
    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.problem_type == "multi_label_classification"


def conll_file(path: Path, n: int, seed: int, long_every: int = 0) -> Path:
    """Sentences where names are PER and cities LOC (BIO; a name with a surname is B-PER I-PER)."""
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- -X- O", ""]
    for k in range(n):
        words = []
        for _ in range(rng.randint(2, 4) * (6 if long_every and k % long_every == 0 else 1)):
            kind = rng.random()
            if kind < 0.25:
                words += [(rng.choice(NAMES).capitalize(), "B-PER")]
                if rng.random() < 0.4:
                    words += [(rng.choice(SURNAMES).capitalize(), "I-PER")]
            elif kind < 0.45:
                words += [(rng.choice(CITIES).capitalize(), "B-LOC")]
            words += [(rng.choice(FILLER + ["flew", "to", "met", "in"]), "O")]
        lines += [f"{w} X X {t}" for w, t in words] + [""]
    path.write_text("\n".join(lines[:-1]))  # no final newline, as in CoNLL-2003
    return path


def test_ner_learns_and_matches_seqeval(tmp_path, base_dir):
    from seqeval.metrics import f1_score
    train = conll_file(tmp_path / "train.txt", 500, 0)
    dev = conll_file(tmp_path / "dev.txt", 120, 1, long_every=10)  # some sentences need several windows
    r = recipe(base_dir, tmp_path / "run", task="ner", data={"train": {"path": str(train)},
               "validation": {"path": str(dev)}, "max_length": 24})
    run = finetune(r, show_progress=False)
    metrics = json.loads((run / "eval-validation.json").read_text())
    assert metrics["f1"] > 0.8 and set(metrics["per_type"]) == {"LOC", "PER"}
    model = AutoModelForTokenClassification.from_pretrained(run / "final")
    assert model.config.id2label == {0: "O", 1: "B-LOC", 2: "I-LOC", 3: "B-PER", 4: "I-PER"}
    # Our report agrees exactly with seqeval on the same word-level predictions (from `predict`).
    from lmforge.tasks.conll import read_conll
    gold = read_conll(dev)
    inputs = tmp_path / "dev.jsonl"
    inputs.write_text("".join(json.dumps({"tokens": s.tokens}) + "\n" for s in gold))
    predict_file(run, inputs, tmp_path / "preds.jsonl")
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert all(len(p["tags"]) == len(s.tokens) for p, s in zip(preds, gold))  # windows joined back
    assert f1_score([s.tags for s in gold], [p["tags"] for p in preds]) == pytest.approx(metrics["f1"], abs=1e-12)
    # Spans carry character offsets into the input text.
    text = tmp_path / "raw.jsonl"
    text.write_text(json.dumps({"text": "Mary flew to Paris."}) + "\n")
    predict_file(run, text, tmp_path / "raw-preds.jsonl")
    entities = json.loads((tmp_path / "raw-preds.jsonl").read_text())["entities"]
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in entities] == [("PER", "Mary", 0, 4),
                                                                                 ("LOC", "Paris", 13, 18)]


def test_lora_adapter_alone_equals_merged_export(tmp_path, base_dir):
    from peft import PeftModel
    train, dev = sentiment(tmp_path)
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(train)}, "validation": {"path": str(dev)},
                                                 "text_column": "sentence"},
               strategy={"method": "peft", "peft": {"r": 4, "target_modules": ["query", "value"]}}, lr=1e-2)
    run = finetune(r, show_progress=False)
    assert json.loads((run / "results.json").read_text())["validation"]["accuracy"] > 0.8
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    ids = torch.randint(5, 100, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_freezing_and_layer_decay(tmp_path, base_dir):
    from lmforge.tasks.config import StrategyConfig
    from lmforge.tasks.model import apply_freezing, build_task_model, param_groups
    from lmforge.tokenizer import load_tokenizer
    tok = load_tokenizer(base_dir)
    model = build_task_model(base_dir, "classification", ["a", "b"], False, tok)
    strategy = StrategyConfig(method="frozen", freeze_embeddings=True, freeze_layers=1, layer_lr_decay=0.5)
    apply_freezing(model, strategy)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any("embeddings" in n for n in frozen) and any(".layer.0." in n for n in frozen)
    assert not any(".layer.1." in n or "classifier" in n for n in frozen)
    groups = param_groups(model, 0.01, strategy, lr=1e-3)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["bert.encoder.layer.1.attention.self.query.weight"])] == 0.5
    assert scale[id(named["classifier.weight"])] == 1.0
    assert id(named["bert.encoder.layer.0.attention.self.query.weight"]) not in scale  # frozen: not optimised
    # Training leaves frozen weights untouched.
    train, dev = sentiment(tmp_path, 64, 32)
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(train)}, "validation": {"path": str(dev)},
                                                 "text_column": "sentence"},
               strategy={"method": "frozen", "freeze_embeddings": True, "freeze_layers": 1}, epochs=1)
    run = finetune(r, show_progress=False)
    after = AutoModelForSequenceClassification.from_pretrained(run / "final").state_dict()
    before = BertForMaskedLM.from_pretrained(base_dir).state_dict()
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.weight"):
        assert torch.equal(after[name], before[name])
    assert not torch.equal(after["bert.encoder.layer.1.output.dense.weight"],
                           before["bert.encoder.layer.1.output.dense.weight"])


def test_truncation_is_reported(tmp_path, base_dir, capfd):
    rows = [(" ".join(["great"] * 80 if k % 2 else ["awful"] * 5), k % 2) for k in range(40)]
    train = write_tsv(tmp_path / "train.tsv", rows)
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(train)}, "text_column": "sentence",
                                                 "max_length": 32}, epochs=1)
    finetune(r, show_progress=False)
    out, err = capfd.readouterr()
    assert "20 of 40 examples truncated to 32 tokens" in " ".join((out + err).split())


@pytest.mark.parametrize("content, message", [
    ("sentence\tlabel\n", r"train.tsv: no examples in this file"),
    ("sentence\tlabel\ngood film\t1\n \t0\n", r"train.tsv:3: row without text"),
    ("text\tlabel\ngood film\t1\n", r"train.tsv:2: no column 'sentence'"),
    ("sentence\tlabel\ngood film\t1\tx\n", r"train.tsv:2: 3 fields, the header has 2"),
])
def test_bad_classification_files(tmp_path, base_dir, content, message):
    (tmp_path / "train.tsv").write_text(content)
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(tmp_path / "train.tsv")},
                                                 "text_column": "sentence"})
    with pytest.raises(LmforgeError, match=message):
        finetune(r, show_progress=False)
    assert not (tmp_path / "run").exists()  # nothing written before the data is known good


def test_bad_conll_and_checkpoint_without_tokenizer(tmp_path, base_dir):
    bad = tmp_path / "train.txt"
    bad.write_text("John X X B-PER\nflew X X\n")
    r = recipe(base_dir, tmp_path / "run", task="ner", data={"train": {"path": str(bad)}})
    with pytest.raises(LmforgeError, match=r"train.txt:2: expected 4 columns, found 3"):
        finetune(r, show_progress=False)
    bare = tmp_path / "bare"
    BertForMaskedLM.from_pretrained(base_dir).save_pretrained(bare)
    r = recipe(bare, tmp_path / "run2", task="ner", data={"train": {"path": str(conll_file(tmp_path / "ok.txt", 5, 0))}})
    with pytest.raises(LmforgeError, match=r"bare: the checkpoint folder has no tokenizer"):
        finetune(r, show_progress=False)


def test_recipe_errors_name_the_field(base_dir):
    with pytest.raises(LmforgeError, match=r"unknown key 'strategy.metod'; did you mean 'method'"):
        finetune_recipe_from_dict({"task": "ner", "data": {"train": {"path": "x"}}, "model": {"path": "m"},
                                   "strategy": {"metod": "full"}})
    with pytest.raises(LmforgeError, match=r"data.train: a fine-tuning recipe needs a training file"):
        finetune_recipe_from_dict({"task": "ner", "model": {"path": "m"}})


@pytest.mark.slow
def test_minilm_on_sst2_beats_chance(tmp_path, minilm_dir):
    sst2 = SHARED / "sst2"
    if not (sst2 / "train.tsv").exists():
        pytest.skip("SST-2 not found in ../shared/data")
    lines = (sst2 / "train.tsv").read_text().splitlines()
    (tmp_path / "train.tsv").write_text("\n".join(lines[:401]) + "\n")
    dev = (sst2 / "dev.tsv").read_text().splitlines()
    (tmp_path / "dev.tsv").write_text("\n".join(dev[:201]) + "\n")
    r = finetune_recipe_from_dict({
        "task": "classification", "model": {"path": str(minilm_dir)},
        "data": {"train": {"path": str(tmp_path / "train.tsv")}, "validation": {"path": str(tmp_path / "dev.tsv")},
                 "text_column": "sentence"},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-4, "save_every": 1000},
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False, "plots": False}})
    run = finetune(r, show_progress=False)
    assert json.loads((run / "results.json").read_text())["validation"]["accuracy"] > 0.6


def test_cli_finetune_eval_predict(tmp_path, base_dir):
    import yaml
    from typer.testing import CliRunner
    from lmforge.cli import app
    train, dev = sentiment(tmp_path, 96, 48)
    tree = {"name": "cli", "task": "classification",
            "data": {"train": {"path": str(train)}, "validation": {"path": str(dev)}, "test": {"path": str(dev)},
                     "text_column": "sentence"},
            "model": {"path": str(base_dir)}, "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3},
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False, "plots": False}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(tree))
    runner = CliRunner()
    done = runner.invoke(app, ["finetune", str(path), "--no-progress", "--set", "train.seed=1"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    shown = runner.invoke(app, ["eval", str(tmp_path / "run"), "--split", "test", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout[shown.stdout.index("{"):])["examples"] == 48
    (tmp_path / "in.txt").write_text("the plot was great\n\nthe plot was awful\n")
    pred = runner.invoke(app, ["predict", str(tmp_path / "run"), "--input", str(tmp_path / "in.txt"),
                               "--output", str(tmp_path / "out.jsonl")])
    assert pred.exit_code == 0 and len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    again = runner.invoke(app, ["finetune", str(path), "--no-progress"])
    assert again.exit_code == 2 and "holds a trained run" in again.output
    bad = runner.invoke(app, ["finetune", str(path), "--set", "train.epoch=2"])
    assert bad.exit_code == 2 and "unknown key 'train.epoch'; did you mean 'epochs'?" in bad.output


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_first_position_only_matches_the_full_model(family):
    from transformers import AutoConfig
    from lmforge.finetune.fast import first_position_only, restore
    config = AutoConfig.for_model(family, vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=80, num_labels=3, pad_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(5, 120, (4, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding on some rows
    mask[3, 4:] = 0
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        assert first_position_only(model)
        fast = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(AutoModelForSequenceClassification.from_config(config).state_dict())
    restore(model)
    model.train()  # gradients flow to every layer with the patched last layer
    first_position_only(model)
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "pooler" not in n or family == "bert")


def test_resume_continues_exactly(tmp_path, base_dir):
    import shutil
    from safetensors.torch import load_file
    train, dev = sentiment(tmp_path, 160, 32)
    data = {"train": {"path": str(train)}, "validation": {"path": str(dev)}, "text_column": "sentence"}
    whole = finetune(recipe(base_dir, tmp_path / "whole", data=data, epochs=2, save_every=5, keep_last=5,
                            eval_every=5), show_progress=False)
    # The same run stopped after step 10: keep only what existed then, and resume it.
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    for name in ("final", "best", "results.json"):
        shutil.rmtree(part / name) if (part / name).is_dir() else (part / name).unlink()
    for step in (15, 20):
        shutil.rmtree(part / "checkpoints" / f"step-{step:06d}")
    r = recipe(base_dir, part, data=data, epochs=2, save_every=5, keep_last=5, eval_every=5)
    finetune(r, resume=True, show_progress=False)
    a = load_file(str(whole / "checkpoints" / "step-000020" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step-000020" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_log_counts_real_tokens_and_the_flops_of_the_shapes_run(tmp_path, base_dir, monkeypatch):
    """`tokens` counts the non-padding input tokens read (not rows); MFU divides the FLOPs of the padded shapes
    actually run, with the last layer computing [CLS] alone, by the roof. Pinned by hand for the tiny BERT
    (2 layers, width 64, FFN 128, 2 labels)."""
    from lmforge.engine import loop
    from lmforge.engine.logging import read_metrics
    from lmforge.finetune.objective import TaskObjective
    monkeypatch.setattr(loop, "matmul_roof", lambda *a, **k: 1e6)  # a fixed roof: MFU / (tokens/s) = FLOPs / token / 1e6
    shapes = []
    make_batch = TaskObjective.make_batch
    monkeypatch.setattr(TaskObjective, "make_batch", lambda self, batch, *a: shapes.append(
        (*batch["input_ids"].shape, int(batch["attention_mask"].sum()))) or make_batch(self, batch, *a))
    train, dev = sentiment(tmp_path, n_train=160, n_dev=32)
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(train)}, "validation": {"path": str(dev)},
                                                 "text_column": "sentence"}, epochs=1, log_every=2, batch_size=16)
    finetune(r, show_progress=False)
    layer = 4 * (64 * 64 + 64) + 2 * 2 * 64 + (64 * 128 + 128) + (128 * 64 + 64)  # Q K V O, 2 norms, FFN
    skipped = layer - 2 * (64 * 64 + 64)  # the last layer still computes keys and values for every position
    per_row = (64 * 64 + 64) + (64 * 2 + 2)  # pooler and classifier

    def flops(rows, length):
        attention = 3 * 4 * 64 * length
        return (6 * (rows * length * 2 * layer + rows * per_row - rows * (length - 1) * skipped)
                + rows * length * 2 * attention - rows * (length - 1) * attention)

    logged = [rec for rec in read_metrics(tmp_path / "run") if "split" not in rec]
    assert len(shapes) == 10 and len(logged) == 5  # 160 rows / 16, logged every 2 steps
    assert logged[-1]["tokens"] == sum(real for _, _, real in shapes) < sum(b * n for b, n, _ in shapes)
    for i, rec in enumerate(logged):
        window = shapes[2 * i:2 * i + 2]
        per_token = sum(flops(b, n) for b, n, _ in window) / sum(real for _, _, real in window)
        assert rec["mfu"] / rec["tokens_per_s"] == pytest.approx(per_token / 1e6, rel=2e-3)


def test_flops_of_frozen_weights_leave_out_their_weight_gradients(base_dir):
    """A frozen body weight costs forward (2) + input gradient (2) FLOPs per token, not the 6 of a trained one."""
    from lmforge.models import count_parameters, flops_per_token, frozen_body_parameters
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    full = flops_per_token(model, 16, head_fraction=0.0, frozen=frozen_body_parameters(model))
    assert frozen_body_parameters(model) == 0 and full == flops_per_token(model, 16, head_fraction=0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    body = count_parameters(model)["body"]
    assert frozen_body_parameters(model) == body
    assert full - flops_per_token(model, 16, head_fraction=0.0, frozen=body) == 2 * body


def test_headerless_csv_by_column_index_with_label_names(tmp_path, base_dir):
    """A CSV without a header, read by 0-based column indexes (quoting and embedded newlines as Python's csv
    reads them), with label codes named in the recipe: reports, predictions and id2label carry the names."""
    from lmforge.tasks.config import TaskData
    from lmforge.tasks.tables import read_rows
    rng = random.Random(1)

    def write(path, n):
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            for k in range(n):
                text = sentence(rng, GOOD if k % 2 else BAD)
                w.writerow([k % 2, f'{text}, "quoted"\nsecond line' if k == 0 else text, f"id{k}"])
        return path

    train, dev = write(tmp_path / "train.csv", 400), write(tmp_path / "dev.csv", 100)
    data = {"train": {"path": str(train)}, "validation": {"path": str(dev)}, "header": False, "text_column": 1,
            "label_column": 0, "label_names": {0: "negative", 1: "positive"}}
    rows = read_rows(finetune_recipe_from_dict({"task": "classification", "data": data,
                                                "model": {"path": str(base_dir)}}).data.train, TaskData(**data))
    assert len(rows) == 400 and rows[0].text.endswith('"quoted"\nsecond line') and rows[0].labels == ["negative"]
    assert rows[0].line == 2 and rows[1].line == 3  # the first row spans lines 1-2 (csv counts its last)
    run = finetune(recipe(base_dir, tmp_path / "run", data=data, epochs=3), show_progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    report = json.loads((run / "eval-validation.json").read_text())
    assert set(report["per_class"]) == {"negative", "positive"} and report["accuracy"] > 0.85
    # a code without a name, a column the rows do not have
    bad = tmp_path / "bad.csv"
    bad.write_text("2,a text\n")
    with pytest.raises(LmforgeError, match=r"bad\.csv:1: label '2' has no name in data\.label_names \(codes: 0, 1\)"):
        read_rows(finetune_recipe_from_dict({"task": "classification", "data": {**data, "train": {"path": str(bad)}},
                                             "model": {"path": str(base_dir)}}).data.train, TaskData(**data))
    with pytest.raises(LmforgeError, match=r"bad\.csv:1: no column 5 \(the row has 2 fields\); set data\.text_column"):
        read_rows(finetune_recipe_from_dict({"task": "classification", "data": data,
                                             "model": {"path": str(base_dir)}}).data.train.model_copy(
            update={"path": str(bad)}), TaskData(**{**data, "text_column": 5}))


def test_one_training_file_split_by_seed_and_stratified(tmp_path, base_dir, capfd):
    """data.split makes the validation and test splits from data.train: seeded, in each label's proportion, rows in
    file order; the run reports on both and its model card says where they came from."""
    from lmforge.tasks.config import SplitShares
    from lmforge.tasks.report import split_rows
    from lmforge.tasks.tables import Row
    rows = [Row(f"t{i}", None, ["pos" if i % 4 == 0 else "neg"], i) for i in range(400)]  # 100 pos, 300 neg
    parts = split_rows(rows, SplitShares(validation=0.2, test=0.1, seed=3), by_label=True)
    assert {k: len(v) for k, v in parts.items()} == {"train": 280, "validation": 80, "test": 40}
    assert sum(r.labels == ["pos"] for r in parts["validation"]) == 20  # 20 % of each label
    assert sum(r.labels == ["pos"] for r in parts["test"]) == 10
    assert [r.line for r in parts["test"]] == sorted(r.line for r in parts["test"])
    assert parts == split_rows(rows, SplitShares(validation=0.2, test=0.1, seed=3), by_label=True)
    assert parts["validation"] != split_rows(rows, SplitShares(validation=0.2, test=0.1, seed=4), True)["validation"]
    assert not {r.line for r in parts["train"]} & {r.line for r in parts["validation"] + parts["test"]}

    train, _ = sentiment(tmp_path, n_train=500, n_dev=10)
    data = {"train": {"path": str(train)}, "text_column": "sentence", "split": {"validation": 0.2, "test": 0.1}}
    capfd.readouterr()
    run = finetune(recipe(base_dir, tmp_path / "run", data=data, epochs=3), show_progress=False)
    printed = " ".join("".join(capfd.readouterr()).split())  # the console wraps long lines
    assert "split by data.split (seed 0, stratified by label): 350 train, 100 validation, 50 test" in printed
    results = json.loads((run / "results.json").read_text())
    assert results["validation"]["accuracy"] > 0.85 and "test" in results
    assert "test share of data.split" in (run / "README.md").read_text()
    assert evaluate_task_run(run, "test")["accuracy"] == results["test"]["accuracy"]  # the same rows again
    with pytest.raises(LmforgeError, match="data.split.validation: data.validation is a file already"):
        recipe(base_dir, tmp_path / "x", data={**data, "validation": {"path": str(train)}})
