"""lmforge compress / compare: slicing against the masked forward, exact sparsity, int8 against fp32, reloading
through lmforge's loaders (and stock transformers where the shape allows), the report, and every refused input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification,
                          GPT2Config, GPT2LMHeadModel)
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.compress import compare, compress
from lmforge.compress.magnitude import prune_magnitude, sparsity_by_layer
from lmforge.compress.structured import gates
from lmforge.finetune import finetune, predict_file
from lmforge.models.compressed import COMPRESSION_KEY, load_pretrained
from lmforge.models.quantized import quantize_modules
from lmforge.models.slicing import keep_units, layer_shape, pad_to_stock, stock_loadable
from lmforge.recipe import TokenizerConfig
from lmforge.serve.models import load_served_model
from lmforge.tokenizer import save_tokenizer, train_tokenizer

GOOD = "great wonderful lovely superb brilliant charming".split()
BAD = "awful boring dreadful dull terrible clumsy".split()
FILLER = "the film story actors plot music was and very a with its scenes".split()
QUANT_TOLERANCE = 0.05  # max |logit difference| of int8 vs fp32 on the tiny classifier (logits of size ~1)


def _rows(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
        words.insert(rng.randint(0, len(words)), rng.choice(GOOD if k % 2 else BAD))
        out.append((" ".join(words), k % 2))
    return out


def _tsv(path: Path, rows) -> str:
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return str(path)


@pytest.fixture(scope="module")
def task_run(tmp_path_factory) -> Path:
    """A tiny BERT (2 layers, 4 heads, 128 FFN neurons) fine-tuned on a toy sentiment task: a run folder."""
    root = tmp_path_factory.mktemp("compress")
    base = root / "base"
    tok = train_tokenizer([t for t, _ in _rows(300, 9)], TokenizerConfig(kind="wordpiece", vocab_size=200,
                                                                            min_frequency=1))
    save_tokenizer(tok, base)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(base)
    recipe = {"name": "toy", "task": "classification",
              "data": {"train": {"path": _tsv(root / "train.tsv", _rows(320, 0))},
                       "validation": {"path": _tsv(root / "dev.tsv", _rows(64, 1))},
                       "text_column": "sentence", "max_length": 32},
              "model": {"path": str(base)},
              "train": {"epochs": 3, "batch_size": 16, "lr": 2e-3, "seed": 0, "threads": 2},
              "output": {"dir": str(root / "run"), "tensorboard": False, "plots": False}}
    (root / "toy.yaml").write_text(yaml.safe_dump(recipe))
    finetune(recipe, show_progress=False)
    return root / "run"


def _inputs(vocab: int, batch: int = 3, length: int = 12) -> dict:
    ids = torch.randint(5, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=32)).eval()


def _tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()


@pytest.mark.parametrize("make", [_tiny_bert, _tiny_gpt2])
def test_sliced_model_gives_the_masked_models_outputs(make):
    model = make()
    width = layer_shape(model)["ffn"][0]
    heads, neurons = [[0, 2], [1, 2, 3]], [[i for i in range(width) if i % 3]] * 2
    head_gate, ffn_gate = torch.zeros(2, 4), torch.zeros(2, width)
    for layer in range(2):
        head_gate[layer, heads[layer]] = 1.0
        ffn_gate[layer, neurons[layer]] = 1.0
    inputs = _inputs(100)
    with torch.no_grad(), gates(model, head_gate, ffn_gate):
        masked = model(**inputs).logits
    keep_units(model, heads, neurons)
    with torch.no_grad():
        sliced = model(**inputs).logits
    assert layer_shape(model) == {"heads": [2, 3], "ffn": [len(neurons[0])] * 2}
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-5)


def test_uniform_ffn_reloads_with_stock_transformers_and_heads_need_lmforge(tmp_path):
    model = _tiny_bert()
    inputs = _inputs(100)
    keep_units(model, None, [list(range(0, 64, 2))] * 2)
    assert stock_loadable(model) == {} and model.config.intermediate_size == 32
    model.save_pretrained(tmp_path / "ffn")
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ffn").eval()
    with torch.no_grad():
        assert torch.equal(stock(**inputs).logits, model(**inputs).logits)

    keep_units(model, [[0, 1], [3]], None)
    model.config.lmforge_compression = {"shape": stock_loadable(model)}
    assert model.config.lmforge_compression == {"shape": {"heads": [2, 1]}}
    model.save_pretrained(tmp_path / "heads")
    with pytest.raises(Exception):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "heads")
    again = load_pretrained(AutoModelForSequenceClassification, tmp_path / "heads")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("make", [_tiny_bert, _tiny_gpt2])
def test_padding_to_the_nearest_stock_shape_keeps_the_pruned_logits(make, tmp_path):
    """Heads removed unevenly and FFN widths differing per layer grow back as zero units: stock from_pretrained
    loads the folder and gives the pruned model's logits."""
    model = make()
    width = layer_shape(model)["ffn"][0]
    keep_units(model, [[0, 2], [1, 2, 3]], [list(range(0, width, 2)), list(range(1, width, 4))])
    inputs = _inputs(100)
    with torch.no_grad():
        pruned = model(**inputs).logits
    assert pad_to_stock(model) == {"heads": [2, 3], "ffn": [width // 2, width // 4]}
    assert layer_shape(model) == {"heads": [4, 4], "ffn": [width // 2] * 2}
    model.save_pretrained(tmp_path)
    stock = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(**inputs).logits, pruned, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in stock.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_reaches_the_sparsity_exactly(scope):
    model = _tiny_bert()
    matrices = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n]
    total = sum(w.numel() for w in matrices)
    prune_magnitude(model, 0.6, scope)
    zeros = [int((w == 0).sum()) for w in matrices]
    if scope == "global":
        assert sum(zeros) == round(0.6 * total)
    else:
        assert zeros == [round(0.6 * w.numel()) for w in matrices]
    report = sparsity_by_layer(model)
    assert set(report) == {"layer 0", "layer 1", "all"} and report["all"] == sum(zeros) / total


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-weight"])
def test_int8_outputs_close_to_fp32_and_reload_identically(tmp_path, scheme):
    model = _tiny_bert()
    inputs = _inputs(100)
    with torch.no_grad():
        reference = model(**inputs).logits
        modules = quantize_modules(model, scheme)
        quantized = model(**inputs).logits
    assert len(modules["linear"]) == 13 and modules["embedding"] == ["bert.embeddings.word_embeddings"]
    assert (quantized - reference).abs().max() <= QUANT_TOLERANCE
    model.config.lmforge_compression = {"quantization": {"scheme": scheme, "modules": modules}}
    model.save_pretrained(tmp_path)
    again = load_pretrained(AutoModelForSequenceClassification, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, quantized)


def _compress_recipe(task_run: Path, out: Path, steps: list) -> dict:
    return {"name": "toy-compressed", "model": str(task_run), "steps": steps,
            "bench": {"repeats": 2, "seq_len": 16, "batch_sizes": [1, 4]}, "output": {"dir": str(out)}}


def test_compress_prune_recover_quantize_writes_folders_that_reload_and_serve(task_run, tmp_path):
    toy = yaml.safe_load((task_run.parent / "toy.yaml").read_text())
    toy["output"]["dir"] = str(tmp_path / "unused")
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(toy))
    steps = [{"prune": {"heads": 0.5, "ffn": 0.25, "batches": 2}},
             {"finetune": {"recipe": str(tmp_path / "toy.yaml"), "set": {"train.max_steps": 10}}},
             {"quantize": {"scheme": "int8-dynamic"}}]
    result = compress(_compress_recipe(task_run, tmp_path / "out", steps), show_progress=False)
    out = Path(result)
    assert json.loads((out / "1-prune" / "compression.json").read_text())["shape"] == {"heads": [2, 2],
                                                                                       "ffn": [96, 96]}
    record = json.loads((out / "3-quantize" / "final" / "config.json").read_text())[COMPRESSION_KEY]
    assert record["shape"] == {"heads": [2, 2]} and record["quantization"]["scheme"] == "int8-dynamic"
    assert "cannot represent this shape" in (out / "1-prune" / "README.md").read_text()
    table = (out / "compress.md").read_text()
    names = [line.split("|")[1].strip(" `") for line in table.splitlines() if line.startswith("| `")]
    assert names == ["base", "1-prune", "2-finetune", "3-quantize"]
    rows = json.loads((out / "compress.json").read_text())
    assert rows[1]["params"] < rows[0]["params"] and rows[3]["size_mb"] < 0.5 * rows[0]["size_mb"]
    assert all(r["metric_name"] == "accuracy" and set(r["latency_ms"]) == {"1", "4"} for r in rows)
    assert rows[0]["metric"] == json.loads((task_run / "eval-validation.json").read_text())["accuracy"]
    assert rows[2]["metric"] >= 0.9 and (out / "compress.png").stat().st_size > 0  # recovery learns the toy task
    for step in ("1-prune", "3-quantize"):
        (tmp_path / "in.txt").write_text("a great film\nan awful plot\n")
        assert predict_file(out / step, tmp_path / "in.txt", tmp_path / f"{step}.jsonl") == 2
        assert load_served_model(f"m={out / step}").kind == "classification"


def test_pruned_then_int8_on_onnx_runtime_is_a_step_that_predicts(task_run, tmp_path):
    steps = [{"prune": {"heads": 0.5, "ffn": 0.25, "batches": 2}}, {"quantize": {"runtime": "onnx"}}]
    out = Path(compress(_compress_recipe(task_run, tmp_path / "out", steps), show_progress=False))
    assert (out / "2-quantize" / "final" / "model.onnx").is_file()
    assert "ONNX Runtime folder" in (out / "2-quantize" / "README.md").read_text()
    rows = json.loads((out / "compress.json").read_text())
    # smaller (at this tiny size the graph's nodes weigh as much as its int8 weights; MiniLM's file is 0.25×)
    assert [r["name"] for r in rows][-1] == "2-quantize" and rows[-1]["size_mb"] < rows[1]["size_mb"]
    assert abs(rows[-1]["params"] - rows[1]["params"]) < 0.01 * rows[1]["params"]  # the graph's weights counted
    assert abs(rows[-1]["metric"] - rows[1]["metric"]) <= 0.1  # int8 of the pruned model scores as it does
    (tmp_path / "in.txt").write_text("a great film\nan awful plot\n")
    assert predict_file(out / "2-quantize", tmp_path / "in.txt", tmp_path / "p.jsonl") == 2
    assert not list(out.glob(".*"))  # no staging folder left


def test_compare_lists_any_folders(task_run, tmp_path):
    rows, path = compare([task_run, task_run / "final"], tmp_path / "cmp", threads=1, repeats=1, seq_len=8,
                         batch_sizes=(1, 2))
    assert [r.name for r in rows] == ["run", "final"] and rows[0].metric is not None and rows[1].metric is None
    assert rows[0].params == rows[1].params > 0 and path.is_file() and (tmp_path / "cmp" / "compare.png").is_file()


BAD_STEPS = [
    ([{"prune": {"sparsity": 1.0}}], "sparsity: 1.0 is outside [0, 1)"),
    ([{"prune": {"heads": 1.0}}], "heads: 1.0 is outside [0, 1)"),
    ([{"prune": {"heads": [0.9, 0.5]}}], "prune.heads: 0.9 leaves layer 0 with no attention heads"),
    ([{"prune": {"ffn": 0.999}}], "prune.ffn: 0.999 leaves layer 0 with no FFN neurons"),
    ([{"quantize": {}}, {"finetune": {"recipe": "toy.yaml"}}], "a finetune step after quantize"),
    ([{"quantize": {"scheme": "int4-weight"}}], "int4-weight has no CPU kernel"),
    ([{"quantize": {"runtime": "onnx", "scheme": "int8-weight"}}], "int8-weight on runtime onnx"),
]


@pytest.mark.parametrize("steps,message", BAD_STEPS)
def test_bad_input_is_one_line_exit_2_and_nothing_written(task_run, tmp_path, steps, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_compress_recipe(task_run, tmp_path / "out", steps)))
    result = CliRunner().invoke(app, ["compress", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_family_without_a_pruning_rule_is_refused(tmp_path):
    torch.manual_seed(0)
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2,
                                                         hidden_dim=64)).save_pretrained(tmp_path / "m")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path / "m"), "steps": [{"prune": {"heads": 0.5}}],
                                    "output": {"dir": str(tmp_path / "out")}}))
    result = CliRunner().invoke(app, ["compress", str(path)])
    assert result.exit_code == 2 and "model family 'distilbert' has no pruning rule" in result.output
    assert not (tmp_path / "out").exists()


def test_int8_gpt2_keeps_its_tied_head_in_float_and_leaves_the_lean_path(tmp_path):
    from lmforge.models.lean import lean_applies
    model = _tiny_gpt2()
    inputs = _inputs(100)
    with torch.no_grad():
        reference = model(**inputs).logits
        modules = quantize_modules(model, "int8-dynamic")
        quantized = model(**inputs).logits
    assert len(modules["linear"]) == 8 and modules["embedding"] == [] and not lean_applies(model)
    assert (quantized - reference).abs().max() <= QUANT_TOLERANCE
    model.config.lmforge_compression = {"quantization": {"scheme": "int8-dynamic", "modules": modules}}
    model.save_pretrained(tmp_path)
    again = load_pretrained(AutoModelForCausalLM, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, quantized)


def test_cubic_schedule_rises_fast_then_slowly_and_holds():
    from lmforge.compress.gradual import cubic_sparsity
    at = [cubic_sparsity(t, 0.6, 0.0, 100, 10) for t in (0, 9, 10, 50, 55, 90, 100, 250)]
    assert at[0] == at[1] == 0.0 and at[3] == at[4] == pytest.approx(0.6 * (1 - 0.5 ** 3))
    assert at[2] == pytest.approx(0.6 * (1 - 0.9 ** 3)) and at[6] == at[7] == pytest.approx(0.6)
    assert cubic_sparsity(40, 0.8, 0.5, 80, 10) == pytest.approx(0.8 - 0.3 * 0.5 ** 3)  # from an earlier pruning


def test_held_sparsity_prunes_on_schedule_and_zeroes_what_the_optimizer_moves():
    from lmforge.compress.gradual import HeldSparsity
    model = _tiny_bert()
    model.train()
    hold = HeldSparsity(0.5, steps=4, every=2, grad_accum=1)
    hold.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    inputs = _inputs(model.config.vocab_size)
    seen = []
    for _ in range(6):
        model(**inputs).logits.sum().backward()
        seen.append(round(sparsity_by_layer(model)["all"], 4))  # what this forward ran with
        optimizer.step()
        optimizer.zero_grad()
    assert seen[0] == 0.0 and seen[2] == pytest.approx(0.5 * (1 - 0.5 ** 3), abs=1e-3)
    assert seen[4] == seen[5] == pytest.approx(0.5, abs=1e-4) and hold.history == [(2, 0.4375), (4, 0.5)]
    assert sparsity_by_layer(model)["all"] < 0.5  # AdamW's momentum moved pruned weights after the last forward...
    model.eval()
    model(**inputs)
    assert sparsity_by_layer(model)["all"] == pytest.approx(0.5, abs=1e-4)  # ...and the next forward zeroes them


def test_gradual_pruning_in_a_finetune_step_reaches_the_sparsity_exactly(task_run, tmp_path):
    toy = yaml.safe_load((task_run.parent / "toy.yaml").read_text())
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(toy))
    steps = [{"finetune": {"recipe": str(tmp_path / "toy.yaml"), "set": {"train.max_steps": 8},
                           "sparsity": 0.4, "prune_steps": 6, "prune_every": 2}}]
    out = Path(compress(_compress_recipe(task_run, tmp_path / "out", steps), show_progress=False))
    rows = json.loads((out / "compress.json").read_text())
    assert rows[1]["sparsity"] == pytest.approx(0.4, abs=1e-3)
    model = AutoModelForSequenceClassification.from_pretrained(out / "1-finetune" / "final")
    assert sparsity_by_layer(model)["all"] == pytest.approx(0.4, abs=1e-4)
    assert "gradual magnitude pruning to 40.0% (3 pruning events, the last at step 6)" in rows[1]["note"]


def test_a_distill_step_makes_a_smaller_student_the_next_steps_take(task_run, tmp_path):
    toy = yaml.safe_load((task_run.parent / "toy.yaml").read_text())
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(toy))
    steps = [{"distill": {"recipe": str(tmp_path / "toy.yaml"), "student_layers": 1,
                          "set": {"train.max_steps": 20}}},
             {"quantize": {"scheme": "int8-dynamic"}}]
    out = Path(compress(_compress_recipe(task_run, tmp_path / "out", steps), show_progress=False))
    rows = json.loads((out / "compress.json").read_text())
    assert [r["name"] for r in rows] == ["base", "1-distill", "2-quantize"]
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["metric"] >= 0.9
    assert json.loads((out / "1-distill" / "distill.json").read_text())["teacher"] == str(task_run)
    assert "distilled into 1 layers" in rows[1]["note"]
    bad = _compress_recipe(task_run, tmp_path / "bad", [{"quantize": {"scheme": "int8-dynamic"}}, steps[0]])
    with pytest.raises(Exception, match="a distill step after quantize"):
        compress(bad, show_progress=False)


def test_a_causal_lm_is_pruned_recovered_by_pretraining_and_quantized_with_perplexity(corpus, tmp_path):
    """A GPT-2 pretraining run: heads and neurons ranked by the next-token loss on its own corpus, recovery by
    continued pretraining, int8; every variant is scored by validation perplexity and generates."""
    from conftest import tiny_recipe
    from lmforge import pretrain
    from lmforge.generate import generate_text
    from lmforge.runs import open_run
    base = tmp_path / "lm"
    pretrain(tiny_recipe(corpus, base, max_steps=30, eval_every=0), show_progress=False)
    recover = tmp_path / "recover.yaml"
    recover.write_text(yaml.safe_dump(tiny_recipe(corpus, tmp_path / "unused", max_steps=10, eval_every=0)))
    out = tmp_path / "lm-compressed"
    done = compress({"name": "lm", "model": str(base), "bench": {"repeats": 1, "seq_len": 16},
                     "steps": [{"prune": {"heads": 0.5, "ffn": 0.5, "batches": 2}},
                               {"finetune": {"recipe": str(recover)}},
                               {"quantize": {"scheme": "int8-dynamic"}}],
                     "output": {"dir": str(out)}}, force=True, show_progress=False)
    rows = {r["name"]: r for r in json.loads((out / "compress.json").read_text())}
    assert list(rows) == ["base", "1-prune", "2-finetune", "3-quantize"]
    assert all(r["metric_name"] == "ppl" and r["metric"] > 1 for r in rows.values())
    assert rows["2-finetune"]["metric"] < rows["1-prune"]["metric"]  # recovery lowers the pruned perplexity
    assert rows["1-prune"]["params"] < rows["base"]["params"]
    assert done.metrics["3-quantize"]["ppl"] == pytest.approx(rows["3-quantize"]["metric"])
    for step in ("1-prune", "2-finetune", "3-quantize"):
        _, model, tokenizer = open_run(out / step)
        if step != "3-quantize":  # int8 modules store their weights another way
            assert layer_shape(model) == {"heads": [1, 1], "ffn": [64, 64]}
        assert "lmforge generate" in (out / step / "README.md").read_text()
        assert json.loads((out / step / "eval-validation.json").read_text())["ppl"] == pytest.approx(
            rows[step]["metric"])
    assert generate_text(model, tokenizer, "the", max_new_tokens=4, temperature=0)

    # What a causal LM cannot do in a compress recipe is refused before anything is written.
    from lmforge.errors import LmforgeError
    mlm = tmp_path / "mlm.yaml"
    mlm.write_text(yaml.safe_dump(tiny_recipe(corpus, tmp_path / "unused", objective="mlm")))
    for steps, message in (([{"distill": {"recipe": str(recover), "student_layers": 1}}], "distil a causal LM"),
                           ([{"quantize": {"scheme": "int8-dynamic", "runtime": "onnx"}}], "export a causal LM"),
                           ([{"finetune": {"recipe": str(mlm)}}], "recovers with a pretraining recipe whose "
                                                                  "objective is clm")):
        with pytest.raises(LmforgeError, match=message):
            compress({"name": "bad", "model": str(base), "steps": steps, "output": {"dir": str(tmp_path / "bad")}},
                     show_progress=False)
        assert not (tmp_path / "bad").exists()
    import shutil
    noval = tmp_path / "lm-noval"
    shutil.copytree(base, noval)
    tree = yaml.safe_load((noval / "recipe.yaml").read_text())
    tree["data"]["validation_fraction"] = 0.0
    (noval / "recipe.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(LmforgeError, match="no validation documents to score perplexity on"):
        compress({"name": "bad", "model": str(noval), "steps": [{"quantize": {"scheme": "int8-dynamic"}}],
                  "output": {"dir": str(tmp_path / "bad")}}, show_progress=False)
    assert not (tmp_path / "bad").exists()
