"""Text generation with `transformers` generate: greedy, sampling (temperature, top-k, top-p), beam search,
repetition penalty, stop strings, seeds, streaming. The KV cache is generate's own.

What `generate` lacks and this module adds:
- per-row sampling settings and seeds: each row draws from its own `torch.Generator`, so a seeded prompt
  gives the same text alone or inside a batch of other prompts (the server's micro-batches rely on it);
  alone, it is the text `generate(do_sample=True)` gives after `torch.manual_seed(seed)`;
- stop strings per row, checked on the decoded text, that end the row and cut its text before the stop;
- per-row token limits and cancellation (the server drops rows whose client went away);
- streaming as text pieces that never end in half a character or in the start of a stop string.

Prompts are never truncated: a prompt longer than the model's position limit is an error; with
`clamp=True` (the CLI) `max_new_tokens` shrinks to what fits, otherwise that is an error too.
"""

from lmforge.generate.decode import (Completion, Decoding, check_generative, context_limit, encode_prompt, generate,
                                     generate_text, open_generator, prepare, refuse_option_on_onnx, run_batch)
from lmforge.generate.rows import cut_at_stop
from lmforge.generate.stream import stream, stream_generate
from lmforge.stage import callable_stage

__all__ = ["Decoding", "Completion", "generate", "stream", "stream_generate", "generate_text", "open_generator",
           "check_generative", "context_limit", "encode_prompt", "prepare", "run_batch", "cut_at_stop",
           "refuse_option_on_onnx"]

callable_stage(__name__)  # `from lmforge import generate` can be called: generate(...)
