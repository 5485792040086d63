"""Seq2seq fine-tuning: ROUGE / BLEU on known strings, a tiny T5 (built from its config) trained a few steps on a toy
copy task from temp files, its report, predictions and `predict`, WikiText heading pairs, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

from lmforge.errors import LmforgeError
from lmforge.evaluate import evaluate
from lmforge.finetune import finetune, finetune_recipe_from_dict, predict_file
from lmforge.generate import generate_text, open_generator
from lmforge.objectives.span import end_with_eos
from lmforge.recipe import TokenizerConfig
from lmforge.serve.models import load_served_model
from lmforge.tasks.seq2seq import decode_generated, text_metrics
from lmforge.tasks.seq2seq_data import heading_pairs
from lmforge.tokenizer import save_tokenizer, train_tokenizer

WORDS = "red green blue black white pink gold grey".split()


def test_rouge_and_bleu_on_known_strings():
    # "the cat sat on the mat" vs "the cat is on the mat": 5 of 6 unigrams shared, 3 of 5 bigrams, LCS of 5 words.
    m = text_metrics(["the cat sat on the mat"], ["the cat is on the mat"])
    assert m["rouge1"] == pytest.approx(5 / 6) and m["rougeL"] == pytest.approx(5 / 6)
    assert m["rouge2"] == pytest.approx(3 / 5)
    # BLEU: precisions 5/6, 3/5, 1/4 and 0/3 (sacreBLEU's 'exp' smoothing: 1 / (2 * 3)), brevity penalty 1
    assert m["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25, rel=1e-6)
    # means over examples: "hello world" vs "hello there world": ROUGE-1 F = 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    m = text_metrics(["the cat sat", "hello world"], ["the cat sat", "hello there world"])
    assert m["rouge1"] == pytest.approx((1 + 0.8) / 2) and m["rouge2"] == pytest.approx((1 + 0) / 2)
    assert text_metrics(["a b c d"], ["a b c d"])["bleu"] == pytest.approx(100.0)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """A tiny T5 (2 + 2 layers, 32 dims) with a byte-level BPE tokenizer that closes texts with EOS, as ours do."""
    folder = tmp_path_factory.mktemp("tiny-t5")
    texts = [" ".join(random.Random(i).choices(WORDS, k=6)) for i in range(200)]
    tok = end_with_eos(train_tokenizer(texts, TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1)))
    save_tokenizer(tok, folder)
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, feed_forward_proj="relu", decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(folder)
    return folder


def copy_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            words = " ".join(rng.choices(WORDS, k=rng.randint(1, 3)))
            fh.write(json.dumps({"text": words, "summary": words}) + "\n")
    return path


def s2s_recipe(base, out, data, **train):
    return finetune_recipe_from_dict({
        "name": "copy", "task": "seq2seq", "model": {"path": str(base)},
        "data": {"source_column": "text", "target_column": "summary", "max_target_length": 8, **data},
        "seq2seq": {"num_beams": 1},
        "train": {"max_steps": 150, "batch_size": 16, "lr": 1e-2, "warmup_steps": 0.05, "log_every": 50,
                  "eval_every": 0, "threads": 1, "seed": 0, **train},
        "output": {"dir": str(out), "tensorboard": False, "plots": False}})


def test_tiny_t5_learns_to_copy_writes_predictions_and_predicts(tmp_path, t5_dir):
    train, dev = copy_pairs(tmp_path / "train.jsonl", 400, 0), copy_pairs(tmp_path / "dev.jsonl", 30, 1)
    run = finetune(s2s_recipe(t5_dir, tmp_path / "run", {"train": {"path": str(train)},
                                                         "validation": {"path": str(dev)}}), show_progress=False)
    scores = json.loads((run / "eval-validation.json").read_text())
    assert scores["examples"] == 30 and scores["rougeL"] > 0.8, scores  # an untrained T5 scores about 0
    lines = [json.loads(x) for x in (run / "predictions-validation.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and set(lines[0]) == {"source", "target", "prediction"}
    assert text_metrics([x["prediction"] for x in lines], [x["target"] for x in lines])["rougeL"] == \
        pytest.approx(scores["rougeL"])
    gen = json.loads((run / "final" / "generation_config.json").read_text())
    assert gen["decoder_start_token_id"] == gen["pad_token_id"] and gen["max_new_tokens"] == 8
    assert "rougeL" in (run / "README.md").read_text()

    out = tmp_path / "preds.jsonl"
    assert predict_file(run, dev, out) == 30
    predicted = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["prediction"] for p in predicted] == [x["prediction"] for x in lines]  # same decoding as the report
    again = evaluate(run, split="validation")
    assert again["rougeL"] == pytest.approx(scores["rougeL"])

    # `lmforge generate` and `serve` take the run too: greedy decoding from the saved generation config
    model, tokenizer = open_generator(run)
    first = lines[0]
    assert generate_text(model, tokenizer, first["source"], max_new_tokens=8, temperature=0).strip() == \
        first["prediction"]
    assert load_served_model(str(run)).kind == "generate"


def test_beam_search_is_used_when_the_recipe_asks(tmp_path, t5_dir, monkeypatch):
    from transformers import GenerationMixin
    beams, generate = [], GenerationMixin.generate

    def spying(self, *args, **kwargs):
        beams.append(kwargs.get("num_beams"))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spying)
    train = copy_pairs(tmp_path / "train.jsonl", 64, 0)
    r = s2s_recipe(t5_dir, tmp_path / "run", {"train": {"path": str(train)}, "validation": {"path": str(train)}},
                   max_steps=4)
    r.seq2seq.num_beams = 3
    run = finetune(r, show_progress=False)
    assert beams and set(beams) == {3}  # every evaluation decodes with the recipe's beams
    assert json.loads((run / "eval-validation.json").read_text())["num_beams"] == 3
    assert json.loads((run / "final" / "generation_config.json").read_text()).get("num_beams", 1) == 1
    assert "beam search (3 beams)" in (run / "README.md").read_text()


def test_decoding_stops_at_eos_and_keeps_the_unknown_token(t5_dir):
    from lmforge.tokenizer import load_tokenizer
    tok = load_tokenizer(t5_dir)
    red = tok("red", add_special_tokens=False)["input_ids"]
    row = red + [tok.unk_token_id, tok.pad_token_id, tok.eos_token_id] + red
    assert decode_generated(tok, [row], tok.eos_token_id) == ["red<unk>"]


def test_heading_pairs_take_the_nearest_heading(tmp_path):
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(" \n = Robert Boulter = \n \n Robert Boulter is an actor . \n \n = = Career = = \n \n"
                    " In 2000 Boulter had a role . \n He starred in a play . \n = = <unk> awards = = \n A dropped paragraph . \n")
    pairs = heading_pairs(wiki)
    assert [(p.source, p.target, p.line) for p in pairs] == [
        ("Robert Boulter is an actor .", "Robert Boulter", 4), ("In 2000 Boulter had a role .", "Career", 8),
        ("He starred in a play .", "Career", 9)]
    titles = heading_pairs(wiki, titles_only=True)  # `data.pairs: title`: the article's title for every paragraph
    assert [(p.target, p.line) for p in titles] == [("Robert Boulter", 4), ("Robert Boulter", 8),
                                                    ("Robert Boulter", 9), ("Robert Boulter", 11)]


def test_bad_input_is_one_line_naming_the_file(tmp_path, t5_dir, capsys):
    good = copy_pairs(tmp_path / "good.jsonl", 20, 0)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"text": "red"}) + "\n")
    with pytest.raises(LmforgeError, match=rf"{missing}:1: no target column 'summary' \(columns: text\); "
                                           "set data.target_column"):
        finetune(s2s_recipe(t5_dir, tmp_path / "r1", {"train": {"path": str(missing)}}), show_progress=False)
    empty = tmp_path / "empty.tsv"
    empty.write_text("text\tsummary\nred\tred\nblue\t \n")
    with pytest.raises(LmforgeError, match=rf"{empty}:3: empty target \(column 'summary'\)"):
        finetune(s2s_recipe(t5_dir, tmp_path / "r2", {"train": {"path": str(empty)}}), show_progress=False)
    empty.write_text("text\tsummary\n\tred\n")
    with pytest.raises(LmforgeError, match=rf"{empty}:2: empty source \(column 'text'\)"):
        finetune(s2s_recipe(t5_dir, tmp_path / "r3", {"train": {"path": str(empty)}}), show_progress=False)
    assert not any((tmp_path / f"r{i}").exists() for i in (1, 2, 3))

    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"text": "red", "summary": " ".join(["red green blue"] * k)}) + "\n"
                            for k in (1, 4, 5)))
    capsys.readouterr()
    finetune(s2s_recipe(t5_dir, tmp_path / "r4", {"train": {"path": str(long)}}, max_steps=1), show_progress=False)
    assert f"{long}: 2 of 3 targets longer than data.max_target_length=8 tokens, truncated" in \
        " ".join(capsys.readouterr().err.split())

    bert = tmp_path / "bert"
    tok = train_tokenizer(["red green blue"] * 10, TokenizerConfig(kind="wordpiece", vocab_size=100, min_frequency=1))
    save_tokenizer(tok, bert)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(bert)
    with pytest.raises(LmforgeError, match="holds a bert model, not an encoder-decoder; task seq2seq needs a T5"):
        finetune(s2s_recipe(bert, tmp_path / "r5", {"train": {"path": str(good)}}), show_progress=False)
    assert not (tmp_path / "r5").exists()


def test_recipe_refuses_settings_seq2seq_cannot_use(t5_dir, tmp_path):
    base = {"name": "x", "task": "seq2seq", "model": {"path": str(t5_dir)}, "data": {"train": {"path": "a.jsonl"}}}
    with pytest.raises(Exception, match="train.adversarial"):
        finetune_recipe_from_dict({**base, "train": {"adversarial": "fgm"}})
    for strategy, field in (({"method": "frozen", "freeze_layers": 1}, "strategy.method"),
                            ({"freeze_embeddings": True}, "strategy.freeze_embeddings"),
                            ({"layer_lr_decay": 0.8}, "strategy.layer_lr_decay"), ({"method": "peft"}, "strategy.method")):
        with pytest.raises(Exception, match=field):  # T5's blocks are not numbered as freezing and decay expect
            finetune_recipe_from_dict({**base, "strategy": strategy})
    with pytest.raises(Exception, match="data.pairs: 'heading' makes seq2seq pairs"):
        finetune_recipe_from_dict({**base, "task": "classification", "data": {"train": {"path": "a.csv"},
                                                                              "pairs": "heading"}})


def test_teacher_forcing_gives_the_models_logits_without_its_own_loss(t5_dir):
    """The decoder inputs are the labels shifted right, as `labels=` would make them, but the model is not handed
    the labels, so it computes no cross-entropy beside ours."""
    from lmforge.tasks.seq2seq import teacher_forced_logits
    model = T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    labels = torch.tensor([[6, 7, 1], [9, 1, -100]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}
    seen = []
    model.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    with torch.no_grad():
        ours = teacher_forced_logits(model, batch)
        theirs = model(**batch).logits
    assert "labels" not in seen[0] and "labels" in seen[1]
    torch.testing.assert_close(ours, theirs)
