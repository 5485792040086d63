"""Use a fine-tuned run: score a split again (`lmforge eval`) or label new inputs (`lmforge predict`)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

from lmforge.errors import LmforgeError
from lmforge.models.compressed import load_pretrained
from lmforge.models.onnx import is_onnx_folder, load_onnx_model
from lmforge.tasks import model as tm
from lmforge.tasks.config import BaseModelSpec, FinetuneRecipe, SplitFile, load_finetune_recipe
from lmforge.tasks.conll import Sentence, entity_spans
from lmforge.tasks.encode import encode_classification, encode_ner
from lmforge.tasks.infer import predict_encoded, word_predictions
from lmforge.tasks.seq2seq import generate_texts
from lmforge.tasks.tables import LabelSet, Row, _records, format_of

WORD = re.compile(r"\w+(?:[-'’.]\w+)*|[^\w\s]", re.UNICODE)


def is_task_run(run_dir: Path) -> bool:
    recipe = Path(run_dir) / "recipe.yaml"
    return recipe.is_file() and re.search(r"^task:", recipe.read_text(encoding="utf-8"), re.M) is not None


def is_seq2seq_run(run_dir: Path) -> bool:
    """A fine-tuning run of task seq2seq: its model generates text (`lmforge generate` and `serve` take it too)."""
    recipe = Path(run_dir) / "recipe.yaml"
    return recipe.is_file() and re.search(r"^task: seq2seq\s*$", recipe.read_text(encoding="utf-8"), re.M) is not None


def open_task_model(run_dir: Path, which: Optional[str] = None):
    """(recipe or None, model, tokenizer, task) of a fine-tuning run folder or a plain HF classifier folder."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise LmforgeError(f"{run_dir}: no such run folder")
    recipe = load_finetune_recipe(run_dir / "recipe.yaml") if is_task_run(run_dir) else None
    folder = run_dir / which if which else run_dir / "final"
    if which and Path(which).is_dir():
        folder = Path(which)
    if not (folder / "config.json").is_file():
        folder = run_dir if (run_dir / "config.json").is_file() else folder
    if not (folder / "config.json").is_file():
        raise LmforgeError(f"{run_dir}: no fine-tuned model (looked for final/config.json)")
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    if any("TokenClassification" in a for a in archs):
        task, auto = "ner", AutoModelForTokenClassification
    elif any("SequenceClassification" in a for a in archs):
        task, auto = "classification", AutoModelForSequenceClassification
    elif any("ConditionalGeneration" in a for a in archs) and recipe is not None and recipe.task == "seq2seq":
        task, auto = "seq2seq", AutoModelForSeq2SeqLM
    else:
        raise LmforgeError(f"{folder}: not a classification model (architectures: {archs}); "
                           "use a fine-tuning run folder")
    tokenizer = tm.load_task_tokenizer(BaseModelSpec(path=str(folder)), folder)
    model = load_task_runtime(folder, auto)
    return recipe, model.eval(), tokenizer, task


def load_task_runtime(folder: Path, auto):
    """The runtime is chosen by what the folder holds: model.onnx (written by `lmforge export`) runs on ONNX
    Runtime, a PyTorch checkpoint (plain or compressed) on transformers' `auto` class; both answer
    `model(**inputs).logits`."""
    if is_onnx_folder(folder):
        return load_onnx_model(folder)
    return load_pretrained(auto, folder)



def word_offsets(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def _read_inputs(path: Path, recipe: Optional[FinetuneRecipe]) -> list[dict]:
    if not path.is_file():
        raise LmforgeError(f"{path}: no such input file")
    if path.suffix.lower() in (".txt", ".text"):
        lines = path.read_text(encoding="utf-8").splitlines()
        return [{"text": t, "_line": i} for i, t in enumerate(lines, 1) if t.strip()]
    records = []
    header = recipe.data.header if recipe is not None else True
    for line, rec in _records(path, format_of(SplitFile(path=str(path))), header):
        rec["_line"] = line
        records.append(rec)
    if not records:
        raise LmforgeError(f"{path}: no inputs in this file")
    return records


def predict_file(run_dir: Path, input_path: Path, output_path: Path, batch_size: int = 64,
                 which: Optional[str] = None) -> int:
    """Write one JSON line per input: labels and scores, (NER) tags and entity spans with character offsets, or
    (seq2seq) the generated `prediction`, decoded as the run's recipe says."""
    recipe, model, tokenizer, task = open_task_model(run_dir, which)
    records = _read_inputs(Path(input_path), recipe)
    max_length = min(recipe.data.max_length if recipe else 512, tm.position_limit(model.config))
    label = {"classification": _classify, "ner": _tag, "seq2seq": _generate}[task]
    results = label(records, recipe, model, tokenizer, max_length, batch_size, input_path)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in results:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, output_path)
    return len(results)


def _column(rec: dict, names: tuple, where: str):
    for n in names:
        if n is not None and n != "" and n in rec and rec[n] is not None and str(rec[n]).strip():
            return rec[n]
    raise LmforgeError(f"{where}: input without text (looked for {', '.join(repr(n) for n in names if n)})")


def _classify(records, recipe, model, tokenizer, max_length, batch_size, path) -> list[dict]:
    text_col = recipe.data.text_column if recipe else "text"
    pair_col = recipe.data.text_pair_column if recipe else None
    texts = [str(_column(r, (text_col, "text"), f"{path}:{r['_line']}")) for r in records]
    pairs = [str(_column(r, (pair_col,), f"{path}:{r['_line']}")) for r in records] if pair_col else None
    results = classify_texts(model, tokenizer, texts, pairs, max_length=max_length, batch_size=batch_size,
                             where=str(path))
    return [{**{k: v for k, v in rec.items() if k != "_line"}, **res} for rec, res in zip(records, results)]


def classify_texts(model, tokenizer, texts: list[str], pairs: Optional[list[str]] = None, *,
                   max_length: Optional[int] = None, batch_size: int = 64, where: str = "input") -> list[dict]:
    """Per text: `label`, `score` and `scores` ({label: probability}); multi-label models: `labels` and `scores`.
    Texts longer than `max_length` (default: the model's limit) are truncated."""
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    labels = LabelSet(names)
    max_length = min(max_length or 10**9, tm.position_limit(model.config))
    multi = model.config.problem_type == "multi_label_classification"
    rows = [Row(t, pairs[i] if pairs else None, [], i + 1) for i, t in enumerate(texts)]
    enc = encode_classification(tokenizer, rows, labels, max_length, multi, where)
    with torch.no_grad():
        scores = predict_encoded(model, enc, task="classification", multi_label=multi, pad_id=_pad_id(model),
                                 batch_size=batch_size)["scores"]
    out = []
    for s in scores:
        item = {}
        if multi:
            item["labels"] = [names[i] for i in np.flatnonzero(s >= 0.5)]
        else:
            item["label"] = names[int(s.argmax())]
            item["score"] = round(float(s.max()), 6)
        item["scores"] = {n: round(float(p), 6) for n, p in zip(names, s)}
        out.append(item)
    return out


def _generate(records, recipe, model, tokenizer, max_length, batch_size, path) -> list[dict]:
    s2s = recipe.seq2seq
    sources = [str(_column(r, (recipe.data.source_column, "source", "text"), f"{path}:{r['_line']}"))
               for r in records]
    predictions = generate_texts(model, tokenizer, sources, max_length=max_length,
                                 max_new_tokens=s2s.max_new_tokens or recipe.data.max_target_length,
                                 num_beams=s2s.num_beams, length_penalty=s2s.length_penalty, batch_size=batch_size,
                                 prefix=s2s.source_prefix)
    return [{**{k: v for k, v in rec.items() if k != "_line"}, "prediction": p} for rec, p in zip(records, predictions)]


def _tag(records, recipe, model, tokenizer, max_length, batch_size, path) -> list[dict]:
    tokens_key = recipe.data.tokens_key if recipe else "tokens"
    inputs = [[str(w) for w in r[tokens_key]] if isinstance(r.get(tokens_key), list)
              else str(_column(r, ("text",), f"{path}:{r['_line']}")) for r in records]
    results = tag_texts(model, tokenizer, inputs, max_length=max_length, batch_size=batch_size, where=str(path),
                        lines=[r["_line"] for r in records])
    return [{**{k: v for k, v in rec.items() if k != "_line"}, **res} for rec, res in zip(records, results)]


def tag_texts(model, tokenizer, inputs: list, *, max_length: Optional[int] = None, batch_size: int = 64,
              where: str = "input", lines: Optional[list[int]] = None) -> list[dict]:
    """Per input (raw text, split into words and punctuation, or a list of words joined by spaces): `tokens`,
    `tags` and `entities` with `type`, `text`, `start`/`end` character offsets, `words` and a mean `score`.
    Sentences longer than `max_length` are tagged window by window."""
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    labels = LabelSet(names)
    max_length = min(max_length or 10**9, tm.position_limit(model.config))
    sentences, offsets, texts = [], [], []
    for i, item in enumerate(inputs):
        if isinstance(item, list):
            words = item
            text, spans, pos = " ".join(words), [], 0
            for w in words:
                spans.append((pos, pos + len(w)))
                pos += len(w) + 1
        else:
            text = item
            found = word_offsets(text)
            words, spans = [w for w, _, _ in found], [(a, b) for _, a, b in found]
        sentences.append(Sentence(words, [], where, lines[i] if lines else i + 1))
        offsets.append(spans)
        texts.append(text)
    enc = encode_ner(tokenizer, sentences, labels, max_length, where)
    with torch.no_grad():
        scores = predict_encoded(model, enc, task="ner", multi_label=False, pad_id=_pad_id(model),
                                 batch_size=batch_size)["scores"]
    ids, conf = word_predictions(enc, scores, len(sentences), [len(s.tokens) for s in sentences])
    out = []
    for sent, spans, text, row, c in zip(sentences, offsets, texts, ids, conf):
        tags = [names[i] for i in row]
        entities = []
        for etype, a, b in entity_spans(tags):
            start, end = spans[a][0], spans[b - 1][1]
            entities.append({"type": etype, "text": text[start:end], "start": start, "end": end,
                             "words": [a, b], "score": round(float(np.mean(c[a:b])), 6)})
        out.append({"tokens": sent.tokens, "tags": tags, "entities": entities})
    return out


def _pad_id(model) -> int:
    return model.config.pad_token_id if model.config.pad_token_id is not None else 0
