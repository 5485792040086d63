"""ELECTRA: a small masked-LM generator proposes replacements, a discriminator detects them.

The generator (`ElectraForMaskedLM`, `generator_fraction` of the discriminator's width, same depth)
shares the discriminator's embeddings (tokens, positions, token types) and its output layer is tied
to the token embeddings. It is trained with MLM on the masked positions; its samples (drawn from its
output distribution, no gradient) fill those positions, and the discriminator (`ElectraForPreTraining`)
classifies every token as original or replaced. A sample that happens to equal the original token
counts as original, so the labels mark exactly the changed tokens.

    loss = MLM(generator) + rtd_weight * RTD(discriminator)          (rtd_weight = 50, as in the paper)

Both are means: the engine divides the sum by the step's masked tokens, and each row's RTD mean is
weighted by its masked-token count. Evaluation reports the generator's masked-token loss as `loss`,
and `rtd_loss`, `rtd_accuracy`, `gen_accuracy` and `replaced` (share of tokens changed).

Saved layout: the folder is the discriminator in Hugging Face format (what fine-tuning loads with
`AutoModelForSequenceClassification` / `AutoModelForTokenClassification`); `generator/` beside it holds
the generator, so a checkpoint holds both and training resumes exactly.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

from lmforge.errors import LmforgeError
from lmforge.objectives.base import token_cross_entropy
from lmforge.objectives.mlm import MaskedLM

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
        from lmforge.engine.loop import load_weights
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


def build_electra(cfg, objective, tokenizer) -> ElectraPretrainer:
    """A generator + discriminator from scratch (`model.family: electra`) or from a checkpoint folder."""
    if cfg.path:
        from lmforge.models import local_path
        return ElectraPretrainer.from_folder(local_path(cfg.path), objective.generator_fraction)
    if cfg.family != "electra":
        raise LmforgeError(f"model.family: objective 'electra' trains an ELECTRA model; set model.family: electra "
                           f"(got '{cfg.family}')")
    from lmforge.models import make_config
    disc_config = make_config(cfg, objective, tokenizer)
    disc = ElectraForPreTraining._from_config(disc_config, attn_implementation="sdpa")
    gen = ElectraForMaskedLM._from_config(generator_config(disc_config, objective.generator_fraction),
                                          attn_implementation="sdpa")
    return ElectraPretrainer(disc, gen)


def replace_tokens(original: torch.Tensor, selected: torch.Tensor,
                   sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(discriminator inputs, replaced labels): the samples put at the selected positions; a label is
    True exactly where the input now differs from the original."""
    inputs = original.clone()
    inputs[selected] = sampled
    return inputs, inputs != original


class ReplacedTokenDetection(MaskedLM):
    name = "electra"
    tally_names = ("gen_accuracy", "rtd_loss", "rtd_accuracy", "replaced")

    def make_batch(self, input_ids, example_ids, domains) -> dict:
        batch = super().make_batch(input_ids, example_ids, domains)
        batch["original"] = input_ids
        return batch

    def loss(self, model, batch):
        gen, disc = model.generator, model.discriminator
        ids, labels, original = batch["input_ids"], batch["labels"], batch["original"]
        selected = labels != -100
        hidden = gen.electra(input_ids=ids).last_hidden_state
        logits = gen.generator_lm_head(gen.generator_predictions(hidden[selected]))
        targets = labels[selected]
        mlm = token_cross_entropy(logits, targets)
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits.detach().float(), -1), 1).squeeze(-1)
        disc_inputs, replaced = replace_tokens(original, selected, sampled)
        disc_logits = disc(input_ids=disc_inputs).logits.float()
        rtd = torch.nn.functional.binary_cross_entropy_with_logits(disc_logits, replaced.float(), reduction="none")
        masked = selected.sum(1)
        rows = selected.nonzero()[:, 0]
        per_row = torch.zeros(ids.size(0), device=ids.device, dtype=mlm.dtype).index_add_(0, rows, mlm)
        total = mlm.sum() + self.config.rtd_weight * (rtd.mean(1) * masked).sum()
        self.tally(model, "gen_accuracy", (logits.argmax(-1) == targets).sum(), targets.numel())
        self.tally(model, "rtd_loss", rtd.sum(), rtd.numel())
        self.tally(model, "rtd_accuracy", ((disc_logits > 0) == replaced).sum(), rtd.numel())
        self.tally(model, "replaced", replaced.sum(), replaced.numel())
        return total, selected.sum(), per_row
