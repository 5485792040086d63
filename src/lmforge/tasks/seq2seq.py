"""Seq2seq generation and scoring: targets generated from sources (greedy or beam search), ROUGE-1/2/L (Google's
rouge-score, F-measure, Porter stemming) and sacreBLEU's corpus BLEU against the references, the teacher-forced
loss, and a split's report with its predictions (report-SPLIT.txt, eval-SPLIT.json, predictions-SPLIT.jsonl).

Generated ids are cut at the first end-of-sequence token; special tokens are dropped except the unknown token,
which is kept as text: WikiText writes rare words as `<unk>`, so a reference can hold it and a prediction may too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lmforge.engine.logging import console
from lmforge.tasks.infer import device_of
from lmforge.tasks.seq2seq_data import EncodedSeq2Seq, TextPair, collate_seq2seq, encode_sources
from lmforge.tasks.splits import write_text_atomic

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Mean ROUGE-1/2/L F-measures (0-1) over the examples and corpus BLEU (0-100, sacreBLEU's defaults)."""
    # the scorers load only where texts are scored (they pull in nltk)
    import sacrebleu
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    sums = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, references):
        for key, score in scorer.score(ref, pred).items():
            sums[key] += score.fmeasure
    n = max(len(references), 1)
    out = {key: sums[key] / n for key in ROUGE_KEYS}
    out["bleu"] = float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
    return out


def generation_ids(model, tokenizer) -> dict:
    """decoder start, EOS and pad ids for generate, from the model's config (what it was trained with), falling back
    to the tokenizer's; T5 starts decoding from its pad token."""
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    start = getattr(model.config, "decoder_start_token_id", None)  # absent from some T5 configs
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    return {"decoder_start_token_id": start if start is not None else pad, "eos_token_id": eos, "pad_token_id": pad}


def decode_generated(tokenizer, rows: list[list[int]], eos: int) -> list[str]:
    """Text of each generated row: up to its first EOS, special tokens dropped except the unknown token."""
    drop = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    texts = []
    for row in rows:
        row = row[:row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode([t for t in row if t not in drop], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False).strip())
    return texts


@torch.no_grad()
def generate_texts(model, tokenizer, sources: list[str], *, max_length: int, max_new_tokens: int, num_beams: int = 1,
                   length_penalty: float = 1.0, batch_size: int = 32, prefix: str = "",
                   input_ids: Optional[list[list[int]]] = None) -> list[str]:
    """The generated target of every source, in input order (batches sorted by length: little padding)."""
    if input_ids is None:
        input_ids, _ = encode_sources(tokenizer, sources, max_length, prefix)
    ids = generation_ids(model, tokenizer)
    device = device_of(model)
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    out: list[str] = [""] * len(input_ids)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(input_ids[i]) for i in idx)
            batch = torch.full((len(idx), width), ids["pad_token_id"], dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                batch[r, :len(input_ids[i])] = torch.tensor(input_ids[i])
                mask[r, :len(input_ids[i])] = 1
            beams = dict(num_beams=num_beams, length_penalty=length_penalty) if num_beams > 1 else {}
            generated = model.generate(input_ids=batch.to(device), attention_mask=mask.to(device), do_sample=False,
                                       max_new_tokens=max_new_tokens, **ids, **beams)
            # the first column is the decoder start token
            for i, text in zip(idx, decode_generated(tokenizer, generated[:, 1:].tolist(), ids["eos_token_id"])):
                out[i] = text
    finally:
        model.train(was_training)
    return out


def teacher_forced_logits(model, batch: dict) -> torch.Tensor:
    """The decoder's logits reading the reference shifted right (teacher forcing), in fp32. The decoder inputs are
    made here rather than by passing `labels`, with which the model would compute a cross-entropy of its own
    beside the caller's."""
    decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_ids,
                 use_cache=False).logits.float()


@torch.no_grad()
def teacher_forced_loss(model, data: EncodedSeq2Seq, pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy per target token, the decoder reading the reference (as in training)."""
    device = device_of(model)
    total, tokens = 0.0, 0
    for s in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in collate_seq2seq(data, list(range(s, min(s + batch_size, len(data)))),
                                                              pad_id).items()}
        logits = teacher_forced_logits(model, batch)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        tokens += int((batch["labels"] != -100).sum())
    return total / max(tokens, 1)


def score_seq2seq(model, tokenizer, pairs: list[TextPair], encoded: EncodedSeq2Seq, recipe) -> dict:
    """Generate every target of a split and score it: ROUGE / BLEU, the loss, and the predictions themselves."""
    s2s, d = recipe.seq2seq, recipe.data
    predictions = generate_texts(model, tokenizer, [p.source for p in pairs], max_length=d.max_length,
                                 max_new_tokens=s2s.max_new_tokens or d.max_target_length, num_beams=s2s.num_beams,
                                 length_penalty=s2s.length_penalty, batch_size=recipe.train.eval_batch_size,
                                 input_ids=encoded.input_ids)
    metrics = {"examples": len(pairs), **text_metrics(predictions, [p.target for p in pairs]),
               "loss": teacher_forced_loss(model, encoded, tokenizer.pad_token_id or 0, recipe.train.eval_batch_size),
               "num_beams": s2s.num_beams}
    return {"metrics": metrics, "predictions": predictions}


def format_seq2seq_report(metrics: dict, title: str, pairs: list[TextPair], predictions: list[str],
                          shown: int = 5) -> str:
    lines = [title, "=" * len(title)]
    for key in ("examples", "num_beams", "loss", *ROUGE_KEYS, "bleu"):
        if key in metrics:
            v = metrics[key]
            lines.append(f"{key:>10}: {v:.4f}" if isinstance(v, float) else f"{key:>10}: {v}")
    if pairs:
        lines += ["", f"first {min(shown, len(pairs))} examples (target → prediction):"]
        lines += [f"- {p.target!r} → {pred!r}" for p, pred in zip(pairs[:shown], predictions[:shown])]
    return "\n".join(lines) + "\n"


def write_seq2seq_report(run_dir: Path, split: str, title: str, pairs: list[TextPair], scored: dict) -> dict:
    """report-SPLIT.txt, eval-SPLIT.json and predictions-SPLIT.jsonl (source, target, prediction per line)."""
    metrics, predictions = scored["metrics"], scored["predictions"]
    run_dir = Path(run_dir)
    report = format_seq2seq_report(metrics, title, pairs, predictions)
    write_text_atomic(run_dir / f"report-{split}.txt", report)
    write_text_atomic(run_dir / f"eval-{split}.json", json.dumps(metrics, indent=2))
    write_text_atomic(run_dir / f"predictions-{split}.jsonl", "".join(
        json.dumps({"source": p.source, "target": p.target, "prediction": pred}, ensure_ascii=False) + "\n"
        for p, pred in zip(pairs, predictions)))
    console.print(report)
    return metrics
