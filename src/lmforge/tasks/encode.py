"""Turn rows and sentences into token ids, and examples into length-grouped padded batches.

Classification: texts (and pairs) longer than `max_length` are truncated (longest text first) and the
count is reported. NER: a sentence longer than `max_length` is split into windows at word boundaries,
predicted window by window and joined back, so no word loses its tag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lmforge.errors import LmforgeError


@dataclass
class Encoded:
    """Examples of one split: token ids and targets, plus what maps predictions back to the input."""
    input_ids: list[list[int]]
    token_type_ids: Optional[list[list[int]]]
    labels: list                     # int (single label), list[float] (multi-label) or list[int] per token (NER)
    truncated: int = 0               # examples cut at max_length (classification)
    windows: int = 0                 # sentences split into several windows (NER)
    # NER: for each example (window) its sentence and first word; for each token its word (or -1)
    sentence: list[int] = field(default_factory=list)
    first_word: list[int] = field(default_factory=list)
    word_of_token: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def _special_layout(tokenizer) -> tuple[list[int], list[int]]:
    """Special tokens placed before and after one text by this tokenizer (e.g. [CLS] ... [SEP])."""
    inner = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for at in range(len(full) - len(inner) + 1):
        if full[at:at + len(inner)] == inner:
            return full[:at], full[at + len(inner):]
    return [], []


def encode_texts(tokenizer, texts: list[str], pairs: Optional[list[str]], max_length: int) -> tuple[dict, int]:
    """Tokenize (pairs: BERT-style segments), truncating to `max_length`; returns (encoding, truncated count)."""
    full = tokenizer(texts, pairs, add_special_tokens=True, truncation=False, return_attention_mask=False,
                     return_token_type_ids=pairs is not None, verbose=False)
    truncated = sum(len(ids) > max_length for ids in full["input_ids"])
    if not truncated:
        return full, 0
    cut = tokenizer(texts, pairs, add_special_tokens=True, truncation="longest_first", max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=pairs is not None)
    return cut, truncated


def encode_classification(tokenizer, rows, labels, max_length: int, multi_label: bool, where: str) -> Encoded:
    texts = [r.text for r in rows]
    pairs = [r.pair for r in rows] if rows and rows[0].pair is not None else None
    enc, truncated = encode_texts(tokenizer, texts, pairs, max_length)
    targets = []
    for r in rows:
        if multi_label:
            vec = [0.0] * len(labels)
            for lab in r.labels:
                vec[labels.id(lab, f"{where}:{r.line}")] = 1.0
            targets.append(vec)
        else:
            targets.append(labels.id(r.labels[0], f"{where}:{r.line}") if r.labels else -1)
    return Encoded(enc["input_ids"], enc.get("token_type_ids") if pairs else None, targets, truncated=truncated)


def encode_ner(tokenizer, sentences, labels, max_length: int, where: str) -> Encoded:
    """First sub-word of each word carries the word's tag; other sub-words and specials get -100."""
    before, after = _special_layout(tokenizer)
    budget = max_length - len(before) - len(after)
    if budget < 1:
        raise LmforgeError(f"data.max_length: {max_length} leaves no room for tokens after the special tokens")
    words_ids = _word_pieces(tokenizer, [s.tokens for s in sentences])
    out = Encoded([], None, [])
    for si, (sent, pieces) in enumerate(zip(sentences, words_ids)):
        tag_ids = [labels.id(t, f"{where}:{sent.line}") for t in sent.tags] if sent.tags else [-100] * len(pieces)
        start, n_windows = 0, 0
        while start < len(pieces) or n_windows == 0:
            ids, targets, word_of, used, w = list(before), [-100] * len(before), [-1] * len(before), 0, start
            while w < len(pieces):
                piece = pieces[w][:budget] or [tokenizer.unk_token_id or 0]  # a word never tokenizes to nothing
                if used + len(piece) > budget and w > start:
                    break
                piece = piece[:budget - used] if used + len(piece) > budget else piece
                ids += piece
                targets += [tag_ids[w]] + [-100] * (len(piece) - 1)
                word_of += [w] + [-1] * (len(piece) - 1)
                used += len(piece)
                w += 1
            ids += after
            targets += [-100] * len(after)
            word_of += [-1] * len(after)
            out.input_ids.append(ids)
            out.labels.append(targets)
            out.sentence.append(si)
            out.first_word.append(start)
            out.word_of_token.append(word_of)
            n_windows += 1
            start = w
            if not pieces:
                break
        out.windows += n_windows > 1
    return out


def _word_pieces(tokenizer, sentences: list[list[str]]) -> list[list[list[int]]]:
    """Sub-word ids of every word of every sentence (one fast batched call)."""
    flat = [w for words in sentences for w in words]
    if not flat:
        return [[] for _ in sentences]
    # Byte-level BPE marks a word start with a space: encode each word as it appears mid-sentence.
    prefix = " " if _is_byte_level(tokenizer) else ""
    ids = tokenizer([prefix + w for w in flat], add_special_tokens=False, return_attention_mask=False)["input_ids"]
    out, k = [], 0
    for words in sentences:
        out.append(ids[k:k + len(words)])
        k += len(words)
    return out


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in type(backend.pre_tokenizer).__name__ + str(backend.pre_tokenizer)


# ----------------------------------------------------------------------------- batches

def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group: int = 64) -> list[list[int]]:
    """One epoch of batches: shuffle, sort within groups of `group` batches by length, cut into batches,
    shuffle the batch order. Batches hold examples of similar length (little padding) yet vary from epoch
    to epoch; the batch order is random so long and short batches interleave."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    span = batch_size * group
    batches = []
    for s in range(0, len(order), span):
        chunk = sorted(order[s:s + span], key=lambda i: lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[k:k + batch_size] for k in range(0, n, batch_size)]


def collate(data: Encoded, idx: list[int], pad_id: int, multi_label: bool = False) -> dict:
    """Right-padded tensors for the examples `idx` (padding only up to the longest of them)."""
    width = max(len(data.input_ids[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    types = torch.zeros((len(idx), width), dtype=torch.long) if data.token_type_ids is not None else None
    token_labels = bool(data.labels) and isinstance(data.labels[0], list) and not multi_label
    labels = torch.full((len(idx), width), -100, dtype=torch.long) if token_labels else None
    for r, i in enumerate(idx):
        n = len(data.input_ids[i])
        ids[r, :n] = torch.tensor(data.input_ids[i])
        mask[r, :n] = 1
        if types is not None:
            types[r, :n] = torch.tensor(data.token_type_ids[i])
        if token_labels:
            labels[r, :n] = torch.tensor(data.labels[i])
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    if token_labels:
        batch["labels"] = labels
    elif multi_label:
        batch["labels"] = torch.tensor([data.labels[i] for i in idx], dtype=torch.float)
    else:
        batch["labels"] = torch.tensor([data.labels[i] for i in idx], dtype=torch.long)
    return batch


class TaskLoader:
    """Micro-batches for the engine: step s, micro-batch m, rank r reads batch s*G*W + m*W + r of an endless
    sequence of epochs, each a fresh seeded grouping — so resume and DDP need no loader state."""

    def __init__(self, data: Encoded, batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 multi_label: bool = False, group_by_length: bool = True, world: int = 1, rank: int = 0):
        self.data, self.batch_size, self.grad_accum, self.seed = data, batch_size, grad_accum, seed
        self.pad_id, self.multi_label, self.group_by_length = pad_id, multi_label, group_by_length
        self.world, self.rank = world, rank
        self.lengths = [len(x) for x in data.input_ids]
        self.batches_per_epoch = -(-len(data) // batch_size)
        self._epoch, self._batches = -1, []

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return max(1, round(self.batches_per_epoch / (self.grad_accum * self.world)))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            seed = self.seed * 1_000_003 + epoch
            self._batches = (length_grouped_batches(self.lengths, self.batch_size, seed) if self.group_by_length
                             else random_batches(len(self.lengths), self.batch_size, seed))
            self._epoch = epoch
        return self._batches

    def batch_indices(self, step: int, micro: int) -> list[int]:
        index = (step * self.grad_accum + micro) * self.world + self.rank
        epoch, k = divmod(index, self.batches_per_epoch)
        return self.epoch_batches(epoch)[k]

    def micro_batch(self, step: int, micro: int):
        return collate(self.data, self.batch_indices(step, micro), self.pad_id, self.multi_label), None, None
