"""Decoding settings, preparing a batch of prompts, and one batched decoding call with per-row control (a lean
loop for one-token-per-step decoding of transformers' decoder-only models, `generate` for the rest)."""

from __future__ import annotations

import functools
import inspect
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import (AutoModelForSeq2SeqLM, LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                          StoppingCriteriaList)
from transformers.generation.streamers import BaseStreamer

from lmforge.errors import LmforgeError
from lmforge.generate.rows import RowSelector, RowStop, cut_at_stop
from lmforge.models.onnx import OnnxForCausalLM, is_onnx_folder, load_onnx_model
from lmforge.runs import model_folder, open_experts_model, open_run
from lmforge.tasks.predict import is_seq2seq_run, is_task_run
from lmforge.tokenizer import load_tokenizer


@dataclass(frozen=True)
class Decoding:
    """How to continue one prompt. temperature 0 is greedy; num_beams > 1 is (deterministic) beam search."""
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: Optional[int] = 50
    top_p: Optional[float] = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None      # None: a fresh random seed per call
    logprobs: Optional[int] = None  # record each token's log-probability and this many alternatives
    grammar: Optional[str] = None   # an llguidance grammar the text must follow (`lmforge.generate.structured`)

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        checks = [(self.max_new_tokens >= 1, "max_new_tokens", "at least 1"),
                  (self.temperature >= 0, "temperature", "0 or more"),
                  (self.top_k is None or self.top_k >= 1, "top_k", "at least 1"),
                  (self.top_p is None or 0 < self.top_p <= 1, "top_p", "in (0, 1]"),
                  (self.num_beams >= 1, "num_beams", "at least 1"),
                  (self.repetition_penalty > 0, "repetition_penalty", "above 0"),
                  (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "between 0 and 20")]
        for ok, name, expected in checks:
            if not ok:
                raise LmforgeError(f"{name}: expected {expected}, got {getattr(self, name)!r}")
        if self.num_beams > 1 and self.logprobs is not None:
            raise LmforgeError("logprobs: not available with beam search (num_beams > 1)")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0 and self.num_beams == 1

    def batch_key(self) -> tuple:
        """Rows whose keys are equal can share one `generate` call (the rest is handled per row)."""
        return (self.num_beams, self.length_penalty, self.early_stopping, self.repetition_penalty,
                self.logprobs is not None)


@dataclass
class Completion:
    text: str
    finish_reason: str              # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    # with Decoding.logprobs: one entry per token of `text`: (token text, offset in text, logprob, {alt: logprob})
    logprobs: Optional[list[tuple[str, int, float, dict]]] = None
    # expert mixtures (a BTM ensemble, a DEMix model): the domain posterior that chose the last token and the one
    # at the end of the prompt, {domain: weight}
    domains: Optional[dict] = None
    prompt_domains: Optional[dict] = None


# ----------------------------------------------------------------------------- models

def check_generative(model) -> None:
    name = type(model).__name__
    if "MaskedLM" in name or not getattr(model, "can_generate", lambda: False)():
        kind = "a masked LM; it fills masks but" if "MaskedLM" in name else f"a {name}, which"
        raise LmforgeError(f"this model is {kind} cannot generate text; use a causal LM "
                           "(a `clm` run) or an encoder-decoder model")


def context_limit(model) -> Optional[int]:
    """Positions the decoder takes (prompt + new tokens); None for relative-position models such as T5."""
    if model.config.is_encoder_decoder:
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def open_generator(run_dir: Path, which: Optional[str] = None):
    """(model, tokenizer) of a pretraining run folder, a seq2seq fine-tuning run, a plain HF folder (causal LM or
    encoder-decoder) or an experts run (`which`: ensemble, moe, demix, average, dense or seed) or its ensemble/ folder."""
    run_dir = Path(run_dir)
    if is_task_run(run_dir) and not is_seq2seq_run(run_dir):
        raise LmforgeError(f"{run_dir}: a fine-tuned classifier cannot generate text; use `lmforge predict`")
    if run_dir.is_dir() and ((run_dir / "experts.json").is_file() or (run_dir / "ensemble.json").is_file()):
        return open_experts_model(run_dir, which)
    if run_dir.is_dir():
        folder = model_folder(run_dir, which)
        if is_onnx_folder(folder):  # `lmforge export` of a causal LM: decoding runs on ONNX Runtime
            model = load_onnx_model(folder)
            check_generative(model)
            return model, load_tokenizer(folder)
        config = json.loads((folder / "config.json").read_text())
        if config.get("is_encoder_decoder"):
            model = AutoModelForSeq2SeqLM.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
            return model.eval(), load_tokenizer(folder)
    _, model, tokenizer = open_run(run_dir, which)
    check_generative(model)
    return model.eval(), tokenizer


def special_token(tokenizer, model, name: str) -> Optional[int]:
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None and name == "eos":
        value = tokenizer.sep_token_id
    if value is None:
        value = getattr(model.generation_config, f"{name}_token_id", None)
        value = value[0] if isinstance(value, list) else value
    return value


# ----------------------------------------------------------------------------- preparing a batch

@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_tokens: list[int]
    limits: list[int]                 # new tokens allowed per row
    settings: list[Decoding]
    width: int                        # columns of the output before the first new token


def encode_prompt(tokenizer, model, prompt: str) -> list[int]:
    add = bool(model.config.is_encoder_decoder or getattr(tokenizer, "add_bos_token", False))
    ids = tokenizer(prompt, add_special_tokens=add)["input_ids"]
    if not ids:  # an empty prompt starts a new document
        start = special_token(tokenizer, model, "bos")
        ids = [start if start is not None else special_token(tokenizer, model, "eos")]
    return ids


def prepare(model, tokenizer, prompts: Sequence[str], settings: Sequence[Decoding], clamp: bool = False) -> Batch:
    """Token ids of every prompt, left-padded (right-padded for an encoder), checked against the position limit."""
    check_generative(model)
    if any(s.grammar for s in settings):
        raise LmforgeError("a grammar (structured output) needs the continuous-batching decoder "
                           "(`lmforge.generate.running`)")
    if len({s.batch_key() for s in settings}) > 1:
        raise ValueError("rows of one generate call must share num_beams, length_penalty, early_stopping, "
                         "repetition_penalty and logprobs")
    limit = context_limit(model)
    encoded, limits = [], []
    for prompt, s in zip(prompts, settings):
        ids = encode_prompt(tokenizer, model, prompt)
        new = s.max_new_tokens
        if limit is not None and len(ids) + new > limit:
            if len(ids) >= limit or not clamp:
                raise LmforgeError(f"prompt: {len(ids)} tokens + max_new_tokens {new} exceed the model's limit "
                                   f"of {limit} positions" + ("" if len(ids) < limit else "; shorten the prompt"))
            new = limit - len(ids)
        encoded.append(ids)
        limits.append(new)
    pad = special_token(tokenizer, model, "pad")
    pad = pad if pad is not None else special_token(tokenizer, model, "eos")
    width = max(len(ids) for ids in encoded)
    left = not model.config.is_encoder_decoder
    rows, masks = [], []
    for ids in encoded:
        fill = [pad] * (width - len(ids))
        rows.append(fill + ids if left else ids + fill)
        masks.append(([0] * len(fill) + [1] * len(ids)) if left else ([1] * len(ids) + [0] * len(fill)))
    device = model.device
    return Batch(torch.tensor(rows, device=device), torch.tensor(masks, device=device), [len(ids) for ids in encoded],
                 limits, list(settings), 1 if model.config.is_encoder_decoder else width)


# ----------------------------------------------------------------------------- running

def run_batch(model, tokenizer, batch: Batch, cancels: Optional[Sequence[Sequence[threading.Event]]] = None,
              streamer: Optional[BaseStreamer] = None) -> list[Completion]:
    """One decoding call (`lean_decode` or `generate`) for all rows of `batch`; rows end independently."""
    s0 = batch.settings[0]
    cancels = cancels or [()] * len(batch.settings)
    eos, pad = special_token(tokenizer, model, "eos"), special_token(tokenizer, model, "pad")
    pad = pad if pad is not None else eos
    processors = LogitsProcessorList()
    if isinstance(model, OnnxForCausalLM) and s0.repetition_penalty != 1.0:
        # what generate does with it, first in its list: on ONNX Runtime the lean loop runs it through the logits
        processors.append(RepetitionPenaltyLogitsProcessor(s0.repetition_penalty))
    selector = None
    if s0.num_beams == 1 and (s0.logprobs is not None or any(s.sampling for s in batch.settings)):
        selector = RowSelector(batch.settings, model.device)
        processors.append(selector)
    criteria = StoppingCriteriaList()
    if any(s.stop for s in batch.settings) or any(cancels) or len(set(batch.limits)) > 1:
        # (otherwise generate's own max_new_tokens and EOS checks are all a row needs: no per-step work here)
        criteria.append(RowStop(tokenizer, batch.width, batch.limits, [s.stop for s in batch.settings], cancels))
    refuse_on_onnx(model, s0)
    with torch.inference_mode():
        if lean_decodable(model, s0):
            out = lean_decode(model, batch.input_ids, batch.attention_mask, max(batch.limits), eos, pad,
                              processors, criteria, streamer)
        else:
            out = model.generate(batch.input_ids, attention_mask=batch.attention_mask,
                                 **_generate_kwargs(model, s0, max(batch.limits), eos, pad, processors, criteria,
                                                    streamer))
    sequences = out.tolist() if isinstance(out, torch.Tensor) else out.sequences.tolist()
    return [_completion(tokenizer, seq[batch.width:], batch, r, eos, {eos, pad} - {None},
                        selector.record[r] if selector and s0.logprobs is not None else None)
            for r, seq in enumerate(sequences)]


def _generate_kwargs(model, s0: Decoding, max_new_tokens: int, eos: Optional[int], pad: Optional[int],
                     processors: LogitsProcessorList, criteria: StoppingCriteriaList,
                     streamer: Optional[BaseStreamer]) -> dict:
    """generate's arguments for a batch whose rows share `s0.batch_key()`."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    # only what differs from generate's defaults: a plain greedy row is a plain generate call
    kwargs.update({k: v for k, v in (("logits_processor", processors), ("stopping_criteria", criteria),
                                     ("streamer", streamer)) if v})
    if not getattr(model, "kv_cache", True):  # an expert ensemble reruns its experts instead
        kwargs["use_cache"] = False
    if s0.num_beams > 1:
        kwargs.update(num_beams=s0.num_beams, length_penalty=s0.length_penalty, early_stopping=s0.early_stopping)
    if s0.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = s0.repetition_penalty
    if model.config.is_encoder_decoder:
        start = getattr(model.generation_config, "decoder_start_token_id", None)
        kwargs["decoder_start_token_id"] = start if start is not None else pad
    return kwargs


def lean_decodable(model, settings: Decoding) -> bool:
    """Whether `lean_decode` can stand in for `generate`: one token per step (no beams, no repetition penalty)
    from a transformers decoder-only model with a KV cache (expert ensembles and DEMix models use generate), or
    from a causal LM on ONNX Runtime, which only this loop runs (with a repetition penalty too)."""
    if isinstance(model, OnnxForCausalLM):  # (its repetition penalty is a processor: see run_batch)
        return settings.num_beams == 1
    return settings.num_beams == 1 and settings.repetition_penalty == 1.0 and steps_by_hand(model)


def refuse_on_onnx(model, settings: Decoding) -> None:
    """A causal LM on ONNX Runtime decodes greedily or by sampling, one token per step (`lean_decode`, with a
    repetition penalty as generate applies it); what needs transformers' `generate` is one line naming the
    option."""
    if not isinstance(model, OnnxForCausalLM):
        return
    if settings.num_beams > 1:
        refuse_option_on_onnx(model, f"num_beams {settings.num_beams} (beam search)")
    extra = sorted(set(model.generation_config.to_diff_dict()) - _INERT_GENERATION_KEYS)
    if extra:
        refuse_option_on_onnx(model, f"generation_config.json ({', '.join(extra)})")


def refuse_option_on_onnx(model, option: str) -> None:
    """One line when `option` (beam search, a draft, a schema, ...) is asked of a causal LM on ONNX Runtime."""
    if isinstance(model, OnnxForCausalLM):
        raise LmforgeError(f"{option}: not available on an ONNX Runtime export, which decodes greedily or by "
                           "sampling; use the PyTorch run it was exported from")


def steps_by_hand(model) -> bool:
    """Whether a loop of our own may run this model's forwards step by step with its KV cache: a transformers
    decoder-only model whose forward takes positions and a cache, and whose generation_config asks for nothing
    that would make generate add processors."""
    return (not model.config.is_encoder_decoder and type(model).__module__.startswith("transformers.models.")
            and getattr(model, "kv_cache", True) and model.config.use_cache is not False
            and _forward_takes(type(model)) and set(model.generation_config.to_diff_dict()) <= _INERT_GENERATION_KEYS)


# generation_config entries that change nothing in greedy decoding with explicit eos/pad and max_new_tokens; any
# other (a checkpoint's own repetition penalty, suppressed or forced tokens, ...) makes generate add processors
_INERT_GENERATION_KEYS = {"use_cache", "output_attentions", "output_hidden_states", "bos_token_id", "eos_token_id",
                          "pad_token_id", "decoder_start_token_id", "_from_model_config", "transformers_version",
                          "do_sample", "temperature", "top_k", "top_p", "max_length", "max_new_tokens",
                          "return_dict_in_generate", "output_scores", "output_logits"}


@functools.lru_cache(maxsize=None)
def _forward_takes(cls) -> bool:
    return {"position_ids", "past_key_values", "logits_to_keep"} <= set(inspect.signature(cls.forward).parameters)


def lean_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                eos: Optional[int], pad: Optional[int], processors: LogitsProcessorList, criteria: StoppingCriteriaList,
                streamer: Optional[BaseStreamer] = None) -> torch.Tensor:
    """What `model.generate` does for greedy decoding with these processors and criteria (same forwards, same
    tokens), without its per-call set-up and per-step bookkeeping (a few per cent of a small model's step on CPU).
    Left-padded rows get positions counted from their first real token, as generate gives them; with an `eos`,
    a row that has ended (EOS or a criterion) gets `pad` until every row has."""
    ids, mask = input_ids, attention_mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    full = bool(mask.all())  # no padding: the causal mask alone is right, and the model need not build one per step
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    step, cache = ids, None
    if streamer is not None:
        streamer.put(ids.cpu())
    for _ in range(max_new_tokens):
        out = model(input_ids=step, attention_mask=None if full else mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        scores = out.logits[:, -1, :].to(dtype=torch.float32)
        if processors:
            scores = processors(ids, scores)
        chosen = scores.argmax(-1)
        if eos is not None:  # as generate: with an end token, ended rows get padding
            chosen = torch.where(unfinished, chosen, pad)
        ids = torch.cat([ids, chosen[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(chosen.cpu())
        if eos is not None:
            unfinished &= chosen != eos
        if criteria:
            unfinished &= ~criteria(ids, scores)
        if not unfinished.any():
            break
        step, cache = chosen[:, None], out.past_key_values
        if not full:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        positions = positions[:, -1:] + 1
    if streamer is not None:
        streamer.end()
    return ids


def _completion(tokenizer, new: list[int], batch: Batch, r: int, eos: Optional[int], ends: set, record) -> Completion:
    n = next((k for k, t in enumerate(new) if t in ends), len(new))
    n = min(n, batch.limits[r])
    # ended by EOS (not by its limit, a stop string or cancellation, after which generate pads the row)
    by_eos = n < min(len(new), batch.limits[r]) and new[n] == eos
    return row_completion(tokenizer, new[:n], batch.prompt_tokens[r], batch.settings[r], by_eos, record)


def row_completion(tokenizer, ids: list[int], prompt_tokens: int, settings: Decoding, by_eos: bool,
                   record: Optional[list]) -> Completion:
    """A finished row: `ids` are its new tokens without the EOS that ended it (`by_eos`); its text is cut at the
    first stop string; `record` holds (logprob, top ids, top logprobs) per token when logprobs were asked for."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = cut_at_stop(text, settings.stop)
    hit_eos = by_eos and cut == len(text)
    completion = Completion(text[:cut], "stop" if hit_eos or cut < len(text) else "length",
                            prompt_tokens, len(ids) + int(hit_eos), ids)
    if record is not None:
        completion.logprobs = _token_logprobs(tokenizer, ids, record, settings.logprobs, cut)
    return completion


def _token_logprobs(tokenizer, ids: list[int], record, top: int, text_len: int) -> list:
    out = []
    for k, tok in enumerate(ids):
        offset = len(tokenizer.decode(ids[:k], skip_special_tokens=True))
        if offset >= text_len and k:
            break
        logp, alt_ids, alt_values = record[k]
        alts = {tokenizer.decode([a]): round(v, 6) for a, v in zip(alt_ids[:top], alt_values[:top])}
        out.append((tokenizer.decode([tok]), offset, round(logp, 6), alts))
    return out


def generate(model, tokenizer, prompts: Sequence[str], settings: Decoding | Sequence[Decoding] = Decoding(),
             *, clamp: bool = False, cancels: Optional[Sequence[Sequence[threading.Event]]] = None
             ) -> list[Completion]:
    """Continue every prompt (one row each, batched in one call). `settings` is one Decoding for all rows,
    or one per row (sharing `Decoding.batch_key()`)."""
    if isinstance(settings, Decoding):
        settings = [settings] * len(prompts)
    model.eval()
    return run_batch(model, tokenizer, prepare(model, tokenizer, prompts, settings, clamp), cancels)


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: Optional[int] = 50, top_p: Optional[float] = None, seed: int = 0, **options) -> str:
    """The continuation of one prompt (max_new_tokens shrinks to fit the model's position limit)."""
    settings = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, **options)
    return generate(model, tokenizer, [prompt], settings, clamp=True)[0].text
