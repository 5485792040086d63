"""NSP/SOP sentence pairs, ELECTRA replaced-token detection and T5 span corruption: statistics on large
samples, end-to-end runs whose losses fall, exports that fine-tune, exact resume, clear errors."""

import json
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, ElectraConfig

from conftest import tiny_recipe
from lmforge.data.pairs import document_pairs, encode_pair, split_segments, truncate_pair
from lmforge.engine.logging import read_metrics
from lmforge.errors import LmforgeError
from lmforge.models.electra import ElectraPretrainer, generator_config
from lmforge.objectives.electra import ReplacedTokenDetection, replace_tokens
from lmforge.objectives.pairs import token_types
from lmforge.objectives.span import (SpanCorruption, corrupt, corrupted_lengths, noise_mask, sentinel_tokens,
                                     span_counts)
from lmforge.pretrain import pretrain
from lmforge.recipe import ObjectiveConfig, recipe_from_dict

CLS, SEP, PAD = 2, 3, 0


def _documents(n_docs=1000, seed=0):
    """Documents whose segments are unique, recognisable tokens: (doc, sentence) -> one id per token."""
    rng = random.Random(seed)
    docs, where = [], {}
    next_id = 10
    for d in range(n_docs):
        segments = []
        for s in range(rng.randint(3, 12)):
            length = rng.randint(3, 20)
            segment = list(range(next_id, next_id + length))
            for t in segment:
                where[t] = (d, s)
            next_id += length
            segments.append(segment)
        docs.append(segments)
    return docs, where


def _pairs(kind, probability=0.5, budget=29, seed=0):
    docs, where = _documents(seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for i, segments in enumerate(docs):
        others = [d for k, d in enumerate(docs) if k != i]
        out += [(i, a, b, label) for a, b, label in document_pairs(segments, others, budget=budget, kind=kind,
                                                                   probability=probability, rng=rng)]
    return out, where


@pytest.mark.parametrize("kind", ["nsp", "sop"])
def test_pair_labels_are_balanced_and_mean_what_they_say(kind):
    pairs, where = _pairs(kind)
    assert len(pairs) > 2500
    share = sum(label for *_, label in pairs) / len(pairs)
    assert abs(share - 0.5) < 0.03, share
    for doc, a, b, label in pairs:
        assert a and b and len(a) + len(b) <= 29
        a_doc, b_doc = where[a[-1]][0], where[b[0]][0]
        if kind == "nsp" and label == 1:
            assert b_doc != doc and a_doc == doc  # a random next segment comes from another document
        elif kind == "sop" and label == 1:
            assert a_doc == b_doc == doc and b[-1] + 1 == a[0]  # swapped: B then A is the original text
        else:
            assert a_doc == b_doc == doc and a[-1] + 1 == b[0]  # true order: B continues A exactly


def test_nsp_reuses_the_segments_a_random_next_displaced():
    """Text displaced by a random B starts the next pair: as much of the corpus is used as when no B is
    random (what is lost is only what truncation cuts)."""
    docs, _ = _documents()
    total = sum(len(s) for d in docs for s in d)

    def used(probability):
        pairs, _ = _pairs("nsp", probability=probability)
        return len({t for doc, a, b, label in pairs for t in (a + (b if label == 0 else []))}) / total
    assert used(0.5) > used(1e-9) - 0.02


def test_truncation_drops_the_longer_side_away_from_the_boundary():
    a, b = truncate_pair(list(range(0, 50)), list(range(50, 60)), 40)
    assert len(a) + len(b) == 40 and b == list(range(50, 60)) and a == list(range(20, 50))
    a, b = truncate_pair(list(range(0, 10)), list(range(10, 60)), 30)
    assert a == list(range(10)) and b == list(range(10, 30))
    a, b = truncate_pair(list(range(0, 30)), list(range(30, 60)), 20)
    assert (len(a), len(b)) == (10, 10) and a[-1] + 1 == b[0]


def test_pair_rows_token_types_and_separators():
    row = encode_pair([11, 12, 13], [21, 22], 1, cls=CLS, sep=SEP, pad=PAD, block_size=10)
    assert row == [CLS, 11, 12, 13, SEP, 21, 22, SEP, PAD, PAD, 1]
    types = token_types(torch.tensor([row[:-1]]), SEP, PAD)[0].tolist()
    assert types == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]


def test_segments_are_sentences_or_lines():
    text = 'He left. "Why?" she asked! Then\nNew line here.\n\n  \nLast one'
    assert split_segments(text, "sentence") == ["He left.", '"Why?"', "she asked!", "Then", "New line here.",
                                                "Last one"]
    assert split_segments(text, "line") == ["He left. \"Why?\" she asked! Then", "New line here.", "Last one"]


def _electra(vocab=300, d=32):
    config = ElectraConfig(vocab_size=vocab, embedding_size=d, hidden_size=d, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=4 * d, max_position_embeddings=64)
    from transformers import ElectraForMaskedLM, ElectraForPreTraining
    torch.manual_seed(0)
    return ElectraPretrainer(ElectraForPreTraining(config), ElectraForMaskedLM(generator_config(config, 0.25)))


class _Tok:
    """The few tokenizer attributes the masked objectives read."""
    mask_token_id, pad_token_id, cls_token_id, sep_token_id = 4, 0, 2, 3
    eos_token_id = bos_token_id = None
    all_special_ids = [0, 1, 2, 3, 4]

    def __len__(self):
        return 300


def test_electra_labels_mark_exactly_the_changed_tokens_and_the_replacement_rate():
    original = torch.randint(5, 300, (200, 64), generator=torch.Generator().manual_seed(0))
    objective = ReplacedTokenDetection(ObjectiveConfig(name="electra", block_size=64), _Tok(), seed=0)
    batch = objective.make_batch(original, torch.arange(200), torch.zeros(200, dtype=torch.long))
    selected = batch["labels"] != -100
    assert abs(selected.float().mean().item() - 0.15) < 0.01
    # a generator that proposes the original token half the time
    sampled = torch.where(torch.rand(int(selected.sum()), generator=torch.Generator().manual_seed(1)) < 0.5,
                          original[selected], torch.randint(5, 300, (int(selected.sum()),)))
    inputs, replaced = replace_tokens(original, selected, sampled)
    assert torch.equal(replaced, inputs != original)
    assert not replaced[~selected].any() and torch.equal(inputs[~selected], original[~selected])
    # the share changed: 15 % selected x ~half of them (a random proposal can hit the original too)
    assert abs(replaced.float().mean().item() - 0.075) < 0.006
    # the full loss: generator samples from its own distribution; labels still match the changes
    model = _electra()
    model.train()
    objective.loss(model, batch)
    tallies = objective.take_tallies(True)
    value, count = tallies["replaced"]
    assert count == original.numel() and 0.13 < value / count <= 0.15  # an untrained generator rarely guesses right


def test_electra_shares_embeddings_and_counts_both_networks():
    model = _electra()
    assert model.generator.electra.embeddings is model.discriminator.electra.embeddings
    assert model.generator.generator_lm_head.weight is model.discriminator.electra.embeddings.word_embeddings.weight
    assert model.generator.config.hidden_size == 8 and model.generator.config.num_hidden_layers == 2
    from lmforge.models import flops_per_token
    disc_only = flops_per_token(model.discriminator, 64, 0.0)
    assert flops_per_token(model, 64, 0.15) > disc_only


def test_span_noise_density_span_lengths_and_reconstruction():
    length, density, mean = 128, 0.15, 3.0
    noise, spans = span_counts(length, density, mean)
    assert (noise, spans) == (19, 6)
    sentinels = list(range(1000, 1100))
    gen = torch.Generator().manual_seed(0)
    lengths, starts_at_zero = [], 0
    in_len, tgt_len = corrupted_lengths(length, density, mean)
    for k in range(500):
        ids = torch.randint(5, 900, (length,), generator=gen)
        mask = noise_mask(length, density, mean, gen)
        assert mask.sum() == noise
        runs = torch.diff(torch.cat([torch.tensor([0]), mask.int(), torch.tensor([0])]))
        begin, end = (runs == 1).nonzero()[:, 0], (runs == -1).nonzero()[:, 0]
        assert len(begin) == spans
        lengths += (end - begin).tolist()
        starts_at_zero += bool(mask[0])
        inputs, targets = corrupt(ids, mask, sentinels, eos=1)
        assert (len(inputs), len(targets)) == (in_len, tgt_len)
        # sentinels appear in order, once each, in both
        assert [t for t in inputs if t >= 1000] == sentinels[:spans] == [t for t in targets if t >= 1000]
        assert inputs[-1] == targets[-1] == 1
        # inputs + targets rebuild the original block
        fill, current = {}, None
        for t in targets[:-1]:
            if t >= 1000:
                current = t
                fill[t] = []
            else:
                fill[current].append(t)
        rebuilt = [x for t in inputs[:-1] for x in (fill[t] if t >= 1000 else [t])]
        assert rebuilt == ids.tolist()
    assert abs(np.mean(lengths) - noise / spans) < 1e-9  # mean span length 19/6 ≈ 3.17 by construction
    assert min(lengths) >= 1 and max(lengths) > 6  # lengths vary (uniform cut points)
    assert starts_at_zero == 0  # kept text comes first, as in T5


def test_span_objective_batches_are_deterministic_per_example():
    tok = type("T", (), {"eos_token_id": 1, "pad_token_id": 0, "bos_token_id": None, "sep_token_id": None,
                         "cls_token_id": None, "mask_token_id": None,
                         "get_vocab": lambda self: {t: 500 + i for i, t in enumerate(sentinel_tokens(100))}})()
    objective = SpanCorruption(ObjectiveConfig(name="span", block_size=64), tok, seed=3)
    ids = torch.randint(5, 400, (6, 64), generator=torch.Generator().manual_seed(0))
    one = objective.make_batch(ids, torch.arange(6), torch.zeros(6, dtype=torch.long))
    two = objective.make_batch(ids[3:], torch.arange(3, 6), torch.zeros(3, dtype=torch.long))
    assert torch.equal(one["input_ids"][3:], two["input_ids"]) and torch.equal(one["labels"][3:], two["labels"])
    assert (one["decoder_input_ids"][:, 0] == 0).all()
    assert torch.equal(one["decoder_input_ids"][:, 1:], one["labels"][:, :-1])


def _tree(corpus, out, objective, **train):
    family = {"mlm+nsp": "bert", "mlm+sop": "bert", "electra": "electra", "span": "t5"}[objective]
    tree = tiny_recipe(corpus, out, "mlm", **{"max_steps": 40, "eval_every": 20, "lr": 5e-3, **train})
    tree["name"] = f"tiny-{objective}"
    tree["tokenizer"]["kind"] = "bpe" if objective == "span" else "wordpiece"
    tree["model"]["family"] = family
    tree["objective"] = {"name": objective, "block_size": 64}
    return tree


@pytest.mark.parametrize("objective", ["mlm+nsp", "mlm+sop", "electra", "span"])
def test_each_objective_trains_and_its_loss_falls(tmp_path, corpus, objective):
    run_dir = pretrain(recipe_from_dict(_tree(corpus, tmp_path / "run", objective)), show_progress=False)
    records = read_metrics(run_dir)
    train = [r for r in records if "split" not in r and "loss" in r]
    val = [r for r in records if r.get("split") == "validation"]
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]]) - 0.5
    assert val[-1]["loss"] < val[0]["loss"] + 1e-6 or objective == "electra"
    assert train[-1]["tokens_per_s"] > 0
    extra = {"mlm+nsp": "nsp_accuracy", "mlm+sop": "sop_accuracy", "electra": "rtd_accuracy", "span": "loss"}
    assert extra[objective] in val[-1] and extra[objective] in train[-1]
    if objective == "electra":
        assert val[-1]["rtd_accuracy"] > 0.8  # at least "nothing was replaced" (85 %) is learnt quickly
        assert (run_dir / "final" / "generator" / "model.safetensors").exists()
    if objective == "span":
        from lmforge.generate.decode import Decoding, generate, open_generator
        model, tokenizer = open_generator(run_dir)
        assert model.config.is_encoder_decoder
        # every target starts with the first sentinel: even a briefly trained model fills from it
        out = generate(model, tokenizer, ["The river <extra_id_0> under the <extra_id_1>."],
                       Decoding(max_new_tokens=6, temperature=0))[0]
        assert out.text.startswith("<extra_id_0>")


def test_electra_discriminator_fine_tunes_and_resume_is_exact(tmp_path, corpus):
    import shutil
    from safetensors.torch import load_file
    tree = _tree(corpus, tmp_path / "run", "electra", max_steps=16, eval_every=8, save_every=8)
    full = pretrain(recipe_from_dict(tree), show_progress=False)
    first = {part: load_file(str(full / "final" / part)) for part in ("model.safetensors", "generator/model.safetensors")}
    # a crash after step 8: only the step-8 checkpoint is left; resuming must give the same weights
    shutil.rmtree(full / "final")
    shutil.rmtree(full / "checkpoints" / "step-000016")
    pretrain(recipe_from_dict(tree), resume=True, show_progress=False)
    for part, a in first.items():
        b = load_file(str(full / "final" / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    # the exported discriminator is an HF ELECTRA that the task heads load
    seq = AutoModelForSequenceClassification.from_pretrained(str(full / "final"), num_labels=3)
    tok = AutoModelForTokenClassification.from_pretrained(str(full / "final"), num_labels=5)
    assert seq.config.model_type == tok.config.model_type == "electra"
    disc = load_file(str(full / "final" / "model.safetensors"))
    key = "electra.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(seq.state_dict()[key], disc[key])


@pytest.mark.parametrize("objective, model_type", [("mlm+nsp", "bert"), ("span", "t5")])
def test_run_output_fine_tunes(tmp_path, corpus, objective, model_type):
    run_dir = pretrain(recipe_from_dict(_tree(corpus, tmp_path / "pre", objective, max_steps=10)),
                       show_progress=False)
    rows = [{"text": t, "label": "prose" if i % 2 else "code"}
            for i, t in enumerate(open(corpus["prose"]).read().splitlines()[:40])]
    table = tmp_path / "train.jsonl"
    table.write_text("".join(json.dumps({"text": json.loads(r["text"])["text"], "label": r["label"]}) + "\n"
                             for r in rows))
    from lmforge.finetune import finetune, finetune_recipe_from_dict
    recipe = finetune_recipe_from_dict({
        "task": "classification", "data": {"train": {"path": str(table)}, "validation": {"path": str(table)}},
        "model": {"path": str(run_dir)}, "train": {"epochs": 1, "batch_size": 8, "eval_every": 0},
        "output": {"dir": str(tmp_path / "ft"), "tensorboard": False, "plots": False}})
    out = finetune(recipe, show_progress=False)
    assert 0.0 <= json.loads((out / "results.json").read_text())["validation"]["accuracy"] <= 1.0
    tuned = AutoModelForSequenceClassification.from_pretrained(str(out / "final"))
    assert tuned.config.model_type == model_type
    # the encoder starts from the pretrained run, not from fresh weights: five small steps keep it close
    pre = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "final")).get_input_embeddings().weight
    tuned_emb = tuned.get_input_embeddings().weight
    assert tuned_emb.shape == pre.shape and torch.allclose(tuned_emb, pre, atol=1e-2)


@pytest.mark.parametrize("change, message", [
    ({"model": {"family": "bert"}, "objective": {"name": "span"}}, "objective 'span' needs 't5'"),
    ({"model": {"family": "roberta"}, "objective": {"name": "mlm+sop"}}, "objective 'mlm+sop' needs 'bert'"),
    ({"model": {"family": "bert"}, "objective": {"name": "electra"}}, "set model.family: electra"),
    ({"data": {"streaming": True}, "objective": {"name": "mlm+nsp"}}, "data.streaming"),
    ({"objective": {"name": "mlm+nsp", "segment_by": "word"}}, "objective.segment_by"),
])
def test_objective_errors_name_the_field(tmp_path, corpus, change, message):
    tree = _tree(corpus, tmp_path / "run", "mlm+nsp", max_steps=2)
    for section, values in change.items():
        tree[section].update(values)
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace("+", r"\+")):
        pretrain(recipe_from_dict(tree), show_progress=False)
