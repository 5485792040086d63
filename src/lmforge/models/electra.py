"""The ELECTRA pretraining model: a small masked-LM generator and a discriminator that share their embeddings.

The generator (`ElectraForMaskedLM`, `generator_fraction` of the discriminator's width, same depth)
shares the discriminator's embeddings (tokens, positions, token types) and its output layer is tied
to the token embeddings. The discriminator is an `ElectraForPreTraining`. The
objective that trains the pair (replaced-token detection) is `lmforge.objectives.electra`.

Saved layout: the folder is the discriminator in Hugging Face format (what fine-tuning loads with
`AutoModelForSequenceClassification` / `AutoModelForTokenClassification`); `generator/` beside it holds
the generator, so a checkpoint holds both and training resumes exactly.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

from lmforge.engine.checkpoint import load_weights
from lmforge.errors import LmforgeError

GENERATOR_DIR = "generator"


def generator_config(disc: ElectraConfig, fraction: float) -> ElectraConfig:
    """The generator: the discriminator's depth and embedding size, `fraction` of its width and heads."""
    width = max(1, round(disc.hidden_size * fraction))
    heads = max(1, round(disc.num_attention_heads * fraction))
    while width % heads:
        heads -= 1
    config = copy.deepcopy(disc)
    config.hidden_size, config.num_attention_heads = width, heads
    config.intermediate_size = max(1, round(disc.intermediate_size * width / disc.hidden_size))
    config.architectures = ["ElectraForMaskedLM"]
    return config


class ElectraPretrainer(torch.nn.Module):
    """Generator + discriminator with shared embeddings; saves and loads as described above."""

    def __init__(self, discriminator: ElectraForPreTraining, generator: ElectraForMaskedLM):
        super().__init__()
        if generator.config.embedding_size != discriminator.config.embedding_size:
            raise LmforgeError("ELECTRA: generator and discriminator need the same embedding size")
        self.discriminator, self.generator = discriminator, generator
        self.tie()

    def tie(self) -> None:
        self.generator.electra.embeddings = self.discriminator.electra.embeddings
        self.generator.generator_lm_head.weight = self.discriminator.electra.embeddings.word_embeddings.weight

    @property
    def config(self):
        return self.discriminator.config

    def get_input_embeddings(self):
        return self.discriminator.get_input_embeddings()

    def save_pretrained(self, folder: str, **kwargs) -> None:
        self.discriminator.save_pretrained(folder, **kwargs)
        self.generator.save_pretrained(str(Path(folder) / GENERATOR_DIR), **kwargs)

    def load_folder(self, folder: Path, device="cpu") -> None:
        """Load saved weights into this model (resume, best checkpoint)."""
        load_weights(self.discriminator, Path(folder), device)
        load_weights(self.generator, Path(folder) / GENERATOR_DIR, device)
        self.tie()

    @classmethod
    def from_folder(cls, folder: Path, generator_fraction: float = 0.25) -> "ElectraPretrainer":
        """A saved ELECTRA folder; without `generator/` (e.g. a published discriminator) a fresh generator."""
        folder = Path(folder)
        kwargs = dict(local_files_only=True, attn_implementation="sdpa", trust_remote_code=False)
        try:
            disc = ElectraForPreTraining.from_pretrained(str(folder), **kwargs)
        except (ValueError, OSError) as err:
            raise LmforgeError(f"{folder}: cannot load as an ELECTRA discriminator: {str(err).splitlines()[0]}") \
                from None
        if disc.config.model_type != "electra":
            raise LmforgeError(f"{folder}: objective 'electra' needs an ELECTRA checkpoint, this one is "
                               f"'{disc.config.model_type}'")
        if (folder / GENERATOR_DIR / "config.json").is_file():
            gen = ElectraForMaskedLM.from_pretrained(str(folder / GENERATOR_DIR), **kwargs)
        else:
            gen = ElectraForMaskedLM._from_config(generator_config(disc.config, generator_fraction),
                                                  attn_implementation="sdpa")
        return cls(disc, gen)

    def flops_per_token(self, block_size: int, mask_fraction: float) -> float:
        """Training FLOPs per input token: 6 x (non-embedding parameters) for both networks, attention
        scores for both, and the generator's output layer at the masked positions only."""
        shared = {id(p) for p in self.discriminator.electra.embeddings.parameters()}
        disc_body = sum(p.numel() for p in self.discriminator.parameters() if id(p) not in shared)
        gen_body = sum(p.numel() for p in self.generator.parameters() if id(p) not in shared)
        d, g = self.discriminator.config, self.generator.config
        head = 2 * d.embedding_size * d.vocab_size * mask_fraction
        attention = 2 * 2 * block_size * (d.num_hidden_layers * d.hidden_size + g.num_hidden_layers * g.hidden_size)
        return 3 * (2 * (disc_body + gen_body) + head + attention)
