"""Loading a compressed model folder: pruned to a shape stock transformers cannot describe (heads removed, FFN
widths differing per layer) or holding int8 weights.

Such a folder's config.json carries `lmforge_compression`:

    {"shape": {"heads": [count per layer], "ffn": [count per layer]},      # either part only when needed
     "quantization": {"scheme": "int8-dynamic", "modules": {"linear": [...], "embedding": [...]}}}

and every lmforge loader (eval, predict, generate, serve, fine-tuning from it) goes through `load_pretrained`:
the model is built from the config, cut to the saved shape, its modules swapped for int8 ones, and the
safetensors weights read strictly. A folder without the key loads with `from_pretrained`, as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file
from transformers import AutoConfig

from lmforge.errors import LmforgeError
from lmforge.models.quantized import SCHEMES, quantize_modules
from lmforge.models.slicing import apply_shape

COMPRESSION_KEY = "lmforge_compression"


def compression_of(folder: Path) -> Optional[dict]:
    """The folder's compression record, or None for a model stock transformers loads."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()).get(COMPRESSION_KEY) if path.is_file() else None


def is_quantized(folder: Path) -> bool:
    return bool((compression_of(folder) or {}).get("quantization"))


def load_pretrained(auto, folder: Path, config=None, with_info: bool = False, attention: str = "sdpa"):
    """`auto.from_pretrained(folder)` (local files, no remote code, SDPA attention unless `attention` says
    otherwise) for a plain folder; for a compressed one, the model rebuilt to its saved shape and int8 modules.
    `with_info` also returns the loading info (missing keys), as `output_loading_info` does."""
    folder = Path(folder)
    record = compression_of(folder)
    if not record:
        return auto.from_pretrained(str(folder), config=config, local_files_only=True, trust_remote_code=False,
                                    attn_implementation=attention, output_loading_info=with_info)
    config = config or AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    model = auto.from_config(config, attn_implementation=attention)
    apply_shape(model, record.get("shape") or {})
    quant = record.get("quantization")
    if quant:
        if quant.get("scheme") not in SCHEMES:
            raise LmforgeError(f"{folder / 'config.json'}: {COMPRESSION_KEY}.quantization.scheme "
                               f"{quant.get('scheme')!r} cannot be loaded here (schemes: {', '.join(SCHEMES)})")
        quantize_modules(model, quant["scheme"], quant["modules"])
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise LmforgeError(f"{folder}: no model.safetensors (a compressed folder holds its weights there)")
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise LmforgeError(f"{folder}: the weights do not fit the compressed shape (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    model.eval()
    return (model, {"missing_keys": []}) if with_info else model


def _tied_keys(model) -> set[str]:
    """Keys a tied output matrix shares with the input embeddings (saved once)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None or output.weight is not getattr(model.get_input_embeddings(), "weight", None):
        return set()
    return {name for name, p in model.named_parameters(remove_duplicate=False) if p is output.weight}
