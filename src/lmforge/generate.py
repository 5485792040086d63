"""Text generation from a causal LM run (sampling settings passed to `transformers` generate)."""

from __future__ import annotations

from typing import Optional

import torch

from lmforge.errors import LmforgeError


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: Optional[int] = 50, top_p: Optional[float] = None, seed: int = 0) -> str:
    if not getattr(model, "can_generate", lambda: False)() or "MaskedLM" in type(model).__name__:
        raise LmforgeError("this model is a masked LM; it fills masks but cannot generate text")
    torch.manual_seed(seed)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.size(1) == 0:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        ids = torch.tensor([[eos]])
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 10**9)
    max_new_tokens = max(1, min(max_new_tokens, limit - ids.size(1)))
    sample = temperature > 0
    model.eval()
    with torch.no_grad():
        out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=temperature if sample else None, top_k=top_k if sample else None,
                             top_p=top_p if sample else None, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True)
