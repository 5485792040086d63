"""Skip work whose result no loss reads: a sequence classifier reads only the first position of the last layer.

In the last transformer layer of a BERT-style encoder, keys and values still come from every position, but
queries, the attention output projection and the feed-forward block run for the first ([CLS]) position
only. The model's outputs are the same (to float rounding); the last layer costs about a sequence-length
fraction of what it did, which removes roughly 1/n_layers of the forward and backward work.
"""

from __future__ import annotations

import types

from lmforge.engine.dropout import attention


def _first_position_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    attn = self.attention.self
    batch, length, _ = hidden_states.shape
    size = attn.attention_head_size  # the head count comes from the width: a pruned layer has fewer heads
    first = hidden_states[:, :1]
    q = attn.query(first).view(batch, 1, -1, size).transpose(1, 2)
    k = attn.key(hidden_states).view(batch, length, -1, size).transpose(1, 2)
    v = attn.value(hidden_states).view(batch, length, -1, size).transpose(1, 2)
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-2] > 1:
        mask = mask[:, :, :1, :]
    context, _ = attention(attn, q, k, v, mask, dropout=attn.dropout.p if self.training else 0.0,
                           scaling=attn.scaling, is_causal=False)
    context = context.reshape(batch, 1, -1)
    attention_output = self.attention.output(context, first)
    return self.output(self.intermediate(attention_output), attention_output)


def encoder_layers(model):
    """The encoder's layer list of an HF encoder model, also inside a peft wrapper."""
    m = model
    for _ in range(4):
        if hasattr(m, "encoder") and hasattr(m.encoder, "layer"):
            return m.encoder.layer
        nxt = getattr(m, "base_model", None)
        m = nxt if nxt is not None and nxt is not m else getattr(m, "model", None)
        if m is None:
            return None
    return None


def first_position_only(model) -> bool:
    """Patch the last encoder layer of a BERT/RoBERTa/ELECTRA sequence classifier (if it is one) in place;
    returns whether it was patched. The state dict and saved checkpoints are unchanged."""
    layers = encoder_layers(model) if "SequenceClassification" in type(model).__name__ else None
    if layers is None or not len(layers):
        return False
    last = layers[-1]
    needed = ("attention", "intermediate", "output")
    if not all(hasattr(last, n) for n in needed) or not hasattr(last.attention, "self") or \
            getattr(last, "add_cross_attention", False) or not hasattr(last.attention.self, "scaling"):
        return False
    last.forward = types.MethodType(_first_position_forward, last)
    return True


def restore(model) -> None:
    layers = encoder_layers(model)
    if layers is not None and len(layers) and "forward" in vars(layers[-1]):
        del layers[-1].forward
