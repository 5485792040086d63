"""Train WordPiece, byte-level BPE, Unigram or character tokenizers, saved in Hugging Face format."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Union

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge.errors import LmforgeError
from lmforge.recipe import TokenizerConfig

BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]", "bos_token": "[CLS]", "eos_token": "[SEP]"}
ROBERTA_SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "cls_token": "<s>", "sep_token": "</s>",
                    "mask_token": "<mask>", "bos_token": "<s>", "eos_token": "</s>"}


def _specials(kind: str) -> dict:
    return BERT_SPECIALS if kind == "wordpiece" else ROBERTA_SPECIALS


def _unique(values) -> list[str]:
    return list(dict.fromkeys(values))


def build_untrained(kind: str, config: TokenizerConfig):
    """The `tokenizers` pipeline and trainer for one algorithm."""
    specials = _unique(_specials(kind).values())
    unk = _specials(kind)["unk_token"]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=config.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        # BERT convention, so the saved tokenizer gives downstream users [CLS] … [SEP] like pretraining did.
        tok.post_processor = processors.BertProcessing(("[SEP]", specials.index("[SEP]")),
                                                        ("[CLS]", specials.index("[CLS]")))
        trainer = trainers.WordPieceTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                            special_tokens=specials, show_progress=False)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                      special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=config.vocab_size, special_tokens=specials, unk_token=unk,
                                          show_progress=False)
    elif kind == "char":
        tok = Tokenizer(models.WordLevel(unk_token=unk))
        # Every character (newlines included) is one token; decoding concatenates them back.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=1_000_000, min_frequency=1, special_tokens=specials,
                                            show_progress=False)
    else:
        raise LmforgeError(f"tokenizer.kind: unknown kind {kind!r}")
    return tok, trainer


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig) -> PreTrainedTokenizerFast:
    n_specials = len(set(_specials(config.kind).values()))
    if config.kind == "bpe" and config.vocab_size < 256 + n_specials:
        # Byte-level BPE always keeps all 256 bytes, so a smaller target would be silently exceeded.
        raise LmforgeError(f"tokenizer.vocab_size: byte-level BPE needs at least {256 + n_specials} tokens "
                           f"(256 bytes + {n_specials} special tokens), got {config.vocab_size}")
    tok, trainer = build_untrained(config.kind, config)
    seen = [0]

    def counted(texts=texts):  # count real text: BPE's byte alphabet fills the vocabulary even without any
        for text in texts:
            seen[0] += bool(text and text.strip())
            yield text
    tok.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0 or tok.get_vocab_size() <= n_specials:
        raise LmforgeError("tokenizer: training text is empty; no vocabulary was learnt")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1_000_000_000,
                                   clean_up_tokenization_spaces=False, **_specials(config.kind))
    fast.init_kwargs["lmforge_kind"] = config.kind
    return fast


def save_tokenizer(tokenizer, folder: Union[str, Path]) -> None:
    """Save in HF format atomically: a temporary folder renamed over the target."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def load_tokenizer(path: Union[str, Path]) -> PreTrainedTokenizerFast:
    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"{path}: tokenizer folder not found")
    if not any((path / f).exists() for f in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")):
        raise LmforgeError(f"{path}: no tokenizer files (tokenizer.json / vocab.txt) in this folder")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise LmforgeError(f"{path}: could not load the tokenizer: {str(err).splitlines()[0]}") from None


def special_ids(tokenizer) -> dict:
    """Ids the objectives need, falling back sensibly for tokenizers that lack some specials."""
    def tid(name):
        return getattr(tokenizer, f"{name}_token_id", None)
    eos = tid("eos") if tid("eos") is not None else tid("sep")
    return {"pad": tid("pad") if tid("pad") is not None else (eos if eos is not None else 0),
            "eos": eos, "bos": tid("bos"), "cls": tid("cls") if tid("cls") is not None else tid("bos"),
            "sep": tid("sep") if tid("sep") is not None else eos, "mask": tid("mask")}


def word_start_table(tokenizer) -> list[bool]:
    """For whole-word masking: does token id i begin a word? (WordPiece '##', byte-BPE 'Ġ', Metaspace '▁')."""
    vocab = tokenizer.get_vocab()
    table = [True] * max(len(tokenizer), max(vocab.values()) + 1)
    has_g = any(t.startswith("Ġ") for t in vocab)
    has_meta = any(t.startswith("▁") for t in vocab)
    specials = set(tokenizer.all_special_tokens)
    for token, i in vocab.items():
        if token in specials:
            table[i] = True
        elif token.startswith("##"):
            table[i] = False
        elif has_g:
            table[i] = token.startswith("Ġ") or not token[:1].isalnum()
        elif has_meta:
            table[i] = token.startswith("▁") or not token[:1].isalnum()
    return table
