"""Distillation: the loss against a hand computation, the student's layers, and tiny runs end to end (a causal-LM
student that beats its no-teacher twin; a classifier whose folder names its teacher); bad recipes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

from conftest import tiny_recipe
from lmforge.cli import app
from lmforge.distill import distill
from lmforge.distill.objective import kd_loss
from lmforge.distill import student as student_module
from lmforge.distill.student import evenly_spaced, make_student
from lmforge.errors import LmforgeError
from lmforge.experts import branch, merge, train
from lmforge.finetune import finetune
from lmforge.pretrain import pretrain
from lmforge.recipe import recipe_from_dict

from test_finetune import base_dir, recipe as task_recipe, sentiment  # noqa: F401  (fixtures and helpers)

runner = CliRunner()


def test_kd_loss_is_t_squared_kl_and_zero_when_the_student_is_the_teacher():
    s, t, T = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.5, 0.5, 2.0]]), 2.0
    p = [math.exp(x / T) for x in t[0].tolist()]
    q = [math.exp(x / T) for x in s[0].tolist()]
    p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
    by_hand = T * T * sum(a * math.log(a / b) for a, b in zip(p, q))
    assert kd_loss(s, t, T).item() == pytest.approx(by_hand, rel=1e-6)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)
    mask = torch.tensor([True, False])
    two = torch.cat([s, torch.zeros(1, 3)]), torch.cat([t, torch.ones(1, 3) * 9])
    assert kd_loss(*two, T, mask).item() == pytest.approx(by_hand, rel=1e-6)  # masked rows count for nothing
    logits = torch.tensor([[2.0, -1.0]])
    assert kd_loss(logits, logits, T, binary=True).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(torch.zeros(1, 2), logits, T, binary=True).item() > 0


def test_hidden_matching_pairs_the_last_blocks_and_is_zero_for_the_teacher_itself():
    from transformers import BertConfig, BertForSequenceClassification
    from lmforge.distill.objective import BlockOutputs, Distilled, layer_pairs
    from lmforge.finetune.objective import TaskObjective
    assert layer_pairs(3, 6) == [(0, 1), (1, 3), (2, 5)] and layer_pairs(2, 2) == [(0, 0), (1, 1)]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    teacher = BertForSequenceClassification(config).eval()
    student = BertForSequenceClassification(config)
    student.load_state_dict(teacher.state_dict())
    batch = {"input_ids": torch.randint(5, 40, (3, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0])}
    batch["attention_mask"][0, 5:] = 0

    def hidden_term(student):
        student.eval()  # no dropout: the same forward as the teacher's
        student.training = True  # ...but the objective's training path
        base = TaskObjective("classification", False)
        taps = (BlockOutputs(student.bert.encoder.layer), BlockOutputs(teacher.bert.encoder.layer))
        objective = Distilled(base, teacher, 2.0, 0.5, hidden_weight=1.0, taps=taps, pairs=layer_pairs(2, 2))
        objective.loss(student, batch)
        return base.take_tallies(True)["hidden_loss"]
    value, count = hidden_term(student)
    assert value < 1e-10 and count == 3
    with torch.no_grad():
        student.bert.encoder.layer[1].output.dense.bias.add_(torch.randn(16))
    value, count = hidden_term(student)
    assert value / count > 0.01  # the second pair differs; padding positions are not counted


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_cached_teacher_outputs_give_the_on_the_fly_loss(task):
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification
    from lmforge.distill.objective import Distilled, TeacherCache
    from lmforge.finetune.objective import TaskObjective
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    make = BertForSequenceClassification if task == "classification" else BertForTokenClassification
    teacher, student = make(config).eval(), make(config).train()
    ids = torch.randint(5, 40, (4, 8))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[1, 6:] = 0
    labels = torch.tensor([0, 2, 1, 1]) if task == "classification" else torch.randint(0, 3, (4, 8))
    if task == "ner":
        labels[mask == 0] = -100
    full = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    # The same examples in two epochs, grouped differently: a cache hit must not depend on the batch.
    epoch1 = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    epoch2 = [{k: v[[1, 3]] for k, v in full.items()}, {k: v[[0, 2]] for k, v in full.items()}]
    cache = TeacherCache()
    cached = Distilled(TaskObjective(task, False), teacher, 2.0, 0.7, cache=cache)
    fresh = Distilled(TaskObjective(task, False), teacher, 2.0, 0.7)
    torch.manual_seed(1)
    for batch in epoch1:
        cached.loss(student, batch)
    student.eval()
    student.training = True  # the training path, without dropout: both objectives see the same student
    for batch in epoch2:
        a, b = cached.loss(student, batch)[0], fresh.loss(student, batch)[0]
        assert torch.allclose(a, b, atol=1e-5), (a, b)
    assert (cache.misses, cache.hits, len(cache.rows)) == (4, 4, 4)


def test_the_student_starts_as_the_chosen_teacher_layers(tmp_path, corpus):
    assert evenly_spaced(6, 3) == [0, 2, 5] and evenly_spaced(4, 2) == [0, 3]
    tree = tiny_recipe(corpus, tmp_path / "t", "clm", max_steps=2)
    tree["model"]["n_layers"] = 3
    teacher = pretrain(recipe_from_dict(tree), show_progress=False)
    folder = make_student(teacher / "final", [0, 2], 2)
    big = AutoModelForCausalLM.from_pretrained(teacher / "final")
    small = AutoModelForCausalLM.from_pretrained(folder)
    assert small.config.num_hidden_layers == 2 and (folder / "tokenizer.json").is_file()
    for mine, theirs in ((0, 0), (1, 2)):
        for (name, a), (_, b) in zip(small.transformer.h[mine].state_dict().items(),
                                     big.transformer.h[theirs].state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.equal(small.transformer.wte.weight, big.transformer.wte.weight)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert small(ids).logits.shape == big(ids).logits.shape  # and it runs, cache indices and all
    assert make_student(teacher / "final", [0, 2], 2) == folder  # built once, then reused


def test_two_runs_building_the_same_student_at_once_both_get_it(tmp_path, corpus, monkeypatch):
    tree = tiny_recipe(corpus, tmp_path / "t", "clm", max_steps=2)
    tree["model"]["n_layers"] = 2
    teacher = pretrain(recipe_from_dict(tree), show_progress=False) / "final"
    copy, other = student_module.shutil.copy2, []

    def copy_while_another_run_builds(src, dst):  # the second run starts and finishes inside the first's build
        if not other:
            other.append(None)
            other[0] = make_student(teacher, None, 1)
        return copy(src, dst)

    monkeypatch.setattr(student_module.shutil, "copy2", copy_while_another_run_builds)
    folder = make_student(teacher, None, 1)
    assert other == [folder] and (folder / "tokenizer.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 1
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no build folder left


def test_a_distilled_lm_student_beats_its_twin_trained_without_the_teacher(tmp_path, corpus):
    teacher = pretrain(recipe_from_dict(tiny_recipe(corpus, tmp_path / "teacher", "clm", max_steps=60, eval_every=0)),
                       show_progress=False)

    def student(out, alpha):  # one layer, from scratch, reading text with the teacher's tokenizer
        tree = tiny_recipe(corpus, tmp_path / out, "clm", max_steps=20, eval_every=20)
        tree["model"]["n_layers"] = 1
        tree["distill"] = {"teacher": str(teacher), "alpha": alpha, "temperature": 1.0}
        return distill(tree, show_progress=False)
    taught, alone = student("taught", 0.9), student("alone", 0.0)  # alpha 0: the same student, hard labels only
    assert taught.metrics["loss"] < alone.metrics["loss"] - 0.05
    records = [json.loads(line) for line in (taught / "metrics.jsonl").read_text().splitlines()]
    assert any("kd_loss" in r for r in records)
    info = json.loads((taught / "distill.json").read_text())
    assert info["teacher"] == str(teacher) and info["teacher_seconds"] > 0
    assert "## Distillation" in (taught / "summary.md").read_text()


def test_a_distilled_classifier_is_an_ordinary_run_naming_its_teacher(tmp_path, base_dir):  # noqa: F811
    train, dev = sentiment(tmp_path, n_train=96, n_dev=32)
    data = {"train": {"path": str(train)}, "validation": {"path": str(dev)}, "text_column": "sentence"}
    teacher = task_recipe(base_dir, tmp_path / "teacher", data=data, epochs=1)
    finetune(teacher, show_progress=False)
    tree = task_recipe(base_dir, tmp_path / "student", data=data, epochs=1).model_dump(mode="json")
    tree["distill"] = {"teacher": str(tmp_path / "teacher"), "student_layers": 1, "hidden_weight": 0.5}
    run = distill(tree, show_progress=False)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["hidden_loss"] > 0 for r in logged if "kd_loss" in r)  # block 0 against the teacher's last
    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.num_hidden_layers == 1 and model.config.id2label == {0: "0", 1: "1"}
    assert "Distilled from" in (run / "README.md").read_text()
    assert json.loads((run / "results.json").read_text())["validation"]["accuracy"] >= 0.5
    other = tmp_path / "three.tsv"
    other.write_text("sentence\tlabel\n" + "".join(f"the film {i}\t{i % 3}\n" for i in range(12)))
    tree["data"] = {**data, "train": {"path": str(other)}, "validation": {"path": str(other)}}
    tree["output"]["dir"] = str(tmp_path / "three")
    with pytest.raises(LmforgeError, match="label '2' is not in the label set"):  # the teacher knows 0 and 1
        distill(tree, show_progress=False)
    assert not (tmp_path / "three").exists()


@pytest.mark.parametrize("change, message", [
    ({"temperature": 0}, "distill.temperature"),
    ({"alpha": 1.5}, "distill.alpha"),
    ({"student_layers": 5}, "more than the teacher's 2 layers"),
    ({"init_layers": [0, 0], "student_layers": 2}, "distinct layer indices"),
    ({"teacher": "no/such/run"}, "no such run or model folder"),
    ({"cache_teacher": True}, "distill.cache_teacher: kept for fine-tuning students"),
])
def test_bad_distillation_recipes_exit_2_with_one_line(tmp_path, corpus, change, message):
    teacher = tmp_path / "teacher"
    if "teacher" not in change:
        pretrain(recipe_from_dict(tiny_recipe(corpus, teacher, "clm", max_steps=1, eval_every=0)),
                 show_progress=False)
    tree = tiny_recipe(corpus, tmp_path / "student", "clm", max_steps=2)
    tree["distill"] = {"teacher": str(teacher), **change}
    (tmp_path / "r.yaml").write_text(json.dumps(tree))
    result = runner.invoke(app, ["distill", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "student").exists()


def test_a_narrower_student_matches_hidden_states_through_a_learned_projection(tmp_path, corpus):
    """Widths 32 → 16: a linear map per layer pair takes the student's states to the teacher's width; it trains
    with the student, is kept in the checkpoints (resume continues the same run) and stays out of the model."""
    teacher = tmp_path / "teacher"
    pretrain(recipe_from_dict(tiny_recipe(corpus, teacher, "clm", max_steps=2, eval_every=0)), show_progress=False)
    tree = tiny_recipe(corpus, tmp_path / "student", "clm", max_steps=4, eval_every=0, save_every=2)
    tree["model"]["d_model"], tree["tokenizer"] = 16, {"path": str(teacher / "final")}
    tree["distill"] = {"teacher": str(teacher), "hidden_weight": 1.0}
    run = distill(tree, show_progress=False)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    hidden = [r["hidden_loss"] for r in logged if "hidden_loss" in r]
    assert len(hidden) == 4 and all(h > 0 for h in hidden)
    states = [torch.load(c / "trainer_state.pt", weights_only=True)["objective"]
              for c in sorted((run / "checkpoints").iterdir())]
    assert set(states[0]) == {f"{k}.{w}" for k in range(2) for w in ("weight", "bias")}
    assert states[0]["0.weight"].shape == (32, 16)
    assert not torch.equal(states[0]["0.weight"], states[1]["0.weight"])  # it learns
    assert AutoModelForCausalLM.from_pretrained(run / "final").config.n_embd == 16
    assert all("project" not in k for k in load_file(str(run / "final" / "model.safetensors")))
    tree["train"]["max_steps"] = 6
    resumed = distill(tree, resume=True, show_progress=False)
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["hidden_loss"] for r in again if "hidden_loss" in r][:4] == hidden


def test_a_recipe_with_a_distill_section_is_refused_by_pretrain(tmp_path, corpus):
    tree = tiny_recipe(corpus, tmp_path / "s", "clm", max_steps=2)
    tree["distill"] = {"teacher": str(tmp_path)}
    with pytest.raises(LmforgeError, match="run it with `lmforge distill`"):
        pretrain(recipe_from_dict(tree), show_progress=False)


def test_a_domain_experts_ensemble_teaches_one_dense_student(tmp_path, corpus):
    tree = tiny_recipe(corpus, tmp_path / "btm", "clm", max_steps=6, eval_every=0)
    tree["experts"] = {"seed_steps": 4, "steps": 6}
    run = branch(recipe_from_dict(tree), show_progress=False)
    train(run, show_progress=False)
    merge(run, "ensemble")
    student = tiny_recipe(corpus, tmp_path / "dense", "clm", max_steps=4, eval_every=4)
    student.pop("tokenizer")  # the student reads text with the experts' tokenizer
    student["distill"] = {"teacher": str(run)}
    result = distill(student, show_progress=False)
    expert_vocab = json.loads((run / "seed" / "tokenizer.json").read_text())["model"]["vocab"]
    assert json.loads((result / "final" / "tokenizer.json").read_text())["model"]["vocab"] == expert_vocab
    assert json.loads((result / "distill.json").read_text())["teacher_seconds"] > 0
    assert math.isfinite(result.metrics["loss"])
    bad = {**student, "distill": {"teacher": str(run), "student_layers": 1}}
    with pytest.raises(LmforgeError, match="an experts ensemble has no single stack of layers"):
        distill(bad, show_progress=False)


def test_a_masked_lm_distils_at_the_masked_positions(tmp_path, corpus):
    teacher = pretrain(recipe_from_dict(tiny_recipe(corpus, tmp_path / "teacher", "mlm", max_steps=4, eval_every=0)),
                       show_progress=False)
    tree = tiny_recipe(corpus, tmp_path / "student", "mlm", max_steps=4, eval_every=4)
    tree["distill"] = {"teacher": str(teacher), "student_layers": 1}
    result = distill(tree, show_progress=False)
    records = [json.loads(line) for line in (result / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd_loss"] >= 0 for r in records if "kd_loss" in r) and math.isfinite(result.metrics["loss"])
    bad = {**tree, "objective": {"name": "electra", "block_size": 32}}
    with pytest.raises(LmforgeError, match="objective.name: distillation matches"):
        distill(bad, show_progress=False)
