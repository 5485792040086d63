"""Objectives: masking statistics, label layout, document masking, per-example determinism."""

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lmforge.objectives.clm import CausalLM, document_position_ids
from lmforge.objectives.mlm import MaskedLM, mask_tokens
from lmforge.recipe import ObjectiveConfig, TokenizerConfig
from lmforge.tokenizer import train_tokenizer

VOCAB, MASK = 1000, 4
SPECIAL = torch.zeros(VOCAB, dtype=torch.bool)
SPECIAL[:5] = True


def _sample(n=400, t=128, seed=0):
    ids = torch.randint(5, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    return ids


def test_mlm_masking_statistics_on_a_large_sample():
    ids = _sample()
    inputs, labels = mask_tokens(ids, torch.arange(len(ids)), seed=0, mask_id=MASK, vocab_size=VOCAB,
                                 special=SPECIAL)
    selected = labels != -100
    eligible = ~SPECIAL[ids]
    rate = selected.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.005, rate
    n = selected.sum().item()
    masked = (inputs == MASK) & selected
    kept = (inputs == ids) & selected
    randomised = selected & ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.80) < 0.01
    # "random" draws can hit the original token (1/VOCAB), which then counts as kept.
    assert abs(kept.sum().item() / n - 0.10) < 0.01
    assert abs(randomised.sum().item() / n - 0.10) < 0.01
    # labels hold the original token at selected positions and -100 everywhere else
    assert torch.equal(labels[selected], ids[selected])
    assert (labels[~selected] == -100).all()
    # specials are never selected, and unselected positions are never changed
    assert not selected[:, 0].any() and not selected[:, -1].any()
    assert torch.equal(inputs[~selected], ids[~selected])


def test_mlm_masking_depends_only_on_seed_and_example_id():
    ids = _sample(8)
    positions = torch.arange(100, 108)
    a_in, a_lab = mask_tokens(ids, positions, seed=3, mask_id=MASK, vocab_size=VOCAB, special=SPECIAL)
    # the same examples split in two batches, in another order: identical masks per example
    order = torch.tensor([5, 1, 7, 0, 2, 4, 6, 3])
    b_in, b_lab = mask_tokens(ids[order], positions[order], seed=3, mask_id=MASK, vocab_size=VOCAB, special=SPECIAL)
    assert torch.equal(a_in[order], b_in) and torch.equal(a_lab[order], b_lab)
    c_in, _ = mask_tokens(ids, positions, seed=4, mask_id=MASK, vocab_size=VOCAB, special=SPECIAL)
    assert not torch.equal(a_in, c_in)


def test_whole_word_masking_masks_every_piece_of_a_word():
    tok = train_tokenizer(["unbelievable understanding interchangeable words " * 20] * 20,
                          TokenizerConfig(kind="wordpiece", vocab_size=60, min_frequency=1))
    objective = MaskedLM(ObjectiveConfig(name="mlm", whole_word=True, mlm_probability=0.3), tok)
    text = " ".join(["unbelievable understanding interchangeable words"] * 30)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:120]] * 50)
    batch = objective.make_batch(ids, torch.arange(50), torch.zeros(50, dtype=torch.long))
    starts = objective.word_starts[ids]
    word = torch.cumsum(starts.long(), 1)
    selected = batch["labels"] != -100
    assert selected.any() and (starts == False).any()  # noqa: E712  (the vocab really splits words)
    for row in range(50):
        for w in word[row].unique():
            in_word = selected[row][word[row] == w]
            assert in_word.all() or not in_word.any()


def test_document_position_ids_restart_after_eos():
    ids = torch.tensor([[5, 6, 3, 7, 8, 9, 3, 5]])
    assert document_position_ids(ids, 3).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]


def test_document_mask_isolates_packed_documents():
    """With document masking, a packed document's logits equal those of the document alone."""
    for config in (GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=50),
                   LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                               intermediate_size=64, vocab_size=50, max_position_embeddings=64)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
        a, b = torch.randint(5, 50, (2, 10)), torch.randint(5, 50, (2, 8))
        packed = torch.cat([a, torch.full((2, 1), 3), b], 1)
        with torch.no_grad():
            joint = model(input_ids=packed, position_ids=document_position_ids(packed, 3), use_cache=False).logits
            alone = model(input_ids=b, use_cache=False).logits
            unmasked = model(input_ids=packed, use_cache=False).logits
        assert torch.allclose(joint[:, 11:], alone, atol=1e-5)
        assert not torch.allclose(unmasked[:, 11:], alone, atol=1e-3)


def test_clm_loss_is_a_sum_over_next_token_predictions():
    tok = train_tokenizer(["abc def ghi"] * 10, TokenizerConfig(kind="char"))
    objective = CausalLM(ObjectiveConfig(name="clm"), tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                                        vocab_size=len(tok))).eval()
    ids = torch.randint(5, len(tok), (3, 12))
    batch = objective.make_batch(ids, torch.arange(3), torch.zeros(3, dtype=torch.long))
    loss_sum, n, per_example = objective.loss(model, batch)
    assert n.item() == 3 * 11 and objective.count_tokens(batch) == 33
    reference = model(input_ids=ids, labels=ids).loss  # HF's mean over the same shifted targets
    assert torch.allclose(loss_sum / n, reference, atol=1e-5)
    assert torch.allclose(per_example.sum(), loss_sum)
