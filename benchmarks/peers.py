"""Peer measurements: what stock `transformers.Trainer` does on the workloads our benchmarks use.

Each function trains a small model with Trainer on CPU and returns a dict of figures; the
benchmark scripts put our own numbers next to these. Everything is local (no hub access).

    python benchmarks/peers.py --quick      # shakespeare 200 iters, MLM 100 steps per mode
    python benchmarks/peers.py              # shakespeare 2000 iters (nanoGPT's CPU recipe), MLM 500
"""
import argparse
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import (AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM,
                          DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast,
                          Trainer, TrainerCallback, TrainingArguments, set_seed)
from transformers.trainer_callback import PrinterCallback

SHAKESPEARE = "/work/shared/data/tinyshakespeare/input.txt"


# ----------------------------------------------------------------------------- machine figures

def matmul_roof(seconds=1.0, n=1024):
    """fp32 GFLOP/s of an n x n matmul on this CPU (median over repeats for `seconds`): the roof
    against which a training step's achieved FLOP rate is judged."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):  # warm up: thread pool start, allocator, BLAS kernel selection
        a @ b
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def reset_peak_rss():
    """Reset the kernel's high-water mark (VmHWM) so each benchmark reports its own peak, not the
    process's lifetime peak. Linux >= 4.0; silently a no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb():
    """Peak resident set size of this process in MiB (since the last reset_peak_rss())."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux, never reset


def _timed_train(trainer):
    """Wall seconds of trainer.train() and the share of the CPU threads this process kept busy
    meanwhile: well under 1 means something else was competing for the cores (or the run was
    stalled on memory faults), so the timing is suspect."""
    cpu0, t0 = sum(os.times()[:2]), time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return seconds, (sum(os.times()[:2]) - cpu0) / (seconds * torch.get_num_threads())


def _args(out_dir, **kw):
    """TrainingArguments shared by every peer run: CPU, fp32, no eval, no checkpoints, no
    reporting integrations, no progress bar and data loading in the main process. Columns are
    kept because shift_labels / special_tokens_mask are not forward() arguments and Trainer
    would strip them. Optimizer stays Trainer's default (torch's fused AdamW on torch >= 2.8),
    which decays every weight but biases and LayerNorms: the same split as nanoGPT's."""
    return TrainingArguments(output_dir=out_dir, use_cpu=True, eval_strategy="no", save_strategy="no",
                             report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                             remove_unused_columns=False, **kw)


class _LossTap(TrainerCallback):
    """Keeps every logged training loss and forwards every `every`-th one to `log`."""

    def __init__(self, log, every):
        self.log, self.every, self.losses = log, max(1, every), []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
            if state.global_step % self.every == 0:
                self.log(f"  step {state.global_step}: loss {logs['loss']:.4f}")


def _trainer(model, args, dataset, collator, tap):
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[tap])
    trainer.remove_callback(PrinterCallback)  # it would print the logs dict at every logging step
    return trainer


# ----------------------------------------------------------------------------- shakespeare-char

def char_vocab(text):
    """nanoGPT's data/shakespeare_char/prepare.py: ids are positions in the sorted set of chars."""
    chars = sorted(set(text))
    return {c: i for i, c in enumerate(chars)}


class _Windows(torch.utils.data.Dataset):
    """`n` random (block+1)-char windows of `data`, start offsets drawn once from a seeded
    generator, which is nanoGPT's get_batch() spread over a Dataset. x = w[:-1] goes in,
    y = w[1:] is the target at every position.

    Loss is over all 64 next-char predictions of a window, as in nanoGPT. Passing only
    labels=x would give 63: GPT2LMHeadModel shifts labels itself and the last position has no
    target. So we also hand it `shift_labels=y` (already shifted): transformers 5's causal-LM loss
    uses it as is, and Trainer counts it for num_items_in_batch. `labels` must still be present
    (the model only computes a loss when it is), its content is then unused."""

    def __init__(self, data, block, n, seed):
        self.data, self.block = data, block
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(len(data) - block, (n,), generator=g)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = int(self.starts[i])
        w = self.data[s:s + self.block + 1]
        return {"input_ids": w[:-1], "labels": w[1:], "shift_labels": w[1:]}


@torch.no_grad()
def _char_val_loss(model, data, block, batch, iters, seed):
    """nanoGPT's estimate_loss(): mean over `iters` random batches of the mean CE per batch."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(iters):
        ix = torch.randint(len(data) - block, (batch,), generator=g)
        x = torch.stack([data[i:i + block] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + block] for i in ix])
        logits = model(input_ids=x).logits
        losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())
    model.train()
    return sum(losses) / len(losses)


def trainer_shakespeare_char(text_path=SHAKESPEARE, iters=2000, log=print, activation="gelu"):
    """nanoGPT's CPU shakespeare-char recipe (README: 4 layers, 4 heads, 128 wide, block 64,
    batch 12, no dropout, 2000 iters) as a GPT2LMHeadModel trained by Trainer.

    `activation` defaults to the exact GELU that lmforge's GPT-2 and nanoGPT use; GPT2Config's own default,
    the tanh approximation `gelu_new`, is eight element-wise ops and costs the peer several percent."""
    reset_peak_rss()
    block, batch, seed = 64, 12, 1337
    text = open(text_path, encoding="utf-8").read()
    stoi = char_vocab(text)
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))  # 90/10 split of the character stream, as prepare.py does
    train, val = data[:n], data[n:]

    set_seed(seed)  # before building the model, so the init is seeded too
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(stoi), n_positions=block, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa", activation_function=activation,
        bos_token_id=None, eos_token_id=None))  # GPT-2's 50256 is outside a 65-char vocab
    tap = _LossTap(log, iters // 10)
    with tempfile.TemporaryDirectory() as out:
        args = _args(out, per_device_train_batch_size=batch, max_steps=iters, seed=seed,
                     learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.1,
                     max_grad_norm=1.0,  # nanoGPT's grad_clip
                     warmup_steps=100, lr_scheduler_type="cosine_with_min_lr",
                     lr_scheduler_kwargs={"min_lr": 1e-4}, logging_steps=tap.every)
        # Exactly iters*batch windows, so one epoch is the whole run.
        trainer = _trainer(model, args, _Windows(train, block, iters * batch, seed), None, tap)
        seconds, cpu_util = _timed_train(trainer)
    val_loss = _char_val_loss(model, val, block, batch, iters=200, seed=seed)
    return dict(ms_per_iter=1000 * seconds / iters, tokens_per_s=iters * batch * block / seconds,
                val_loss=val_loss, seconds=seconds, peak_rss_mb=peak_rss_mb(), cpu_util=cpu_util)


# ----------------------------------------------------------------------------- BERT MLM

def train_wordpiece(text_path, out_dir, vocab_size=8000):
    """A BERT-style WordPiece tokenizer trained on `text_path`, saved in HF format to `out_dir`
    (for standalone runs: the real benchmarks pass their own tokenizer_dir). The `tokenizers`
    trainer breaks frequency ties differently from run to run, so MLM figures are only
    reproducible with a fixed tokenizer_dir."""
    from tokenizers import BertWordPieceTokenizer
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train([text_path], vocab_size=vocab_size, min_frequency=2,
              special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                            model_max_length=512).save_pretrained(out_dir)
    return out_dir


def _lines_to_examples(tok, lines, truncate):
    enc = tok(lines, return_special_tokens_mask=True, truncation=truncate, max_length=128)
    return [{k: enc[k][i] for k in enc} for i in range(len(lines))]


def group_texts(examples, block=128):
    """run_mlm.py's group_texts: concatenate every field of all examples and cut into blocks,
    dropping the remainder. (run_mlm does this per map() batch of 1000 lines, so it drops a
    remainder every 1000 lines; we do it once over the whole stream.)"""
    cat = {k: [t for e in examples for t in e[k]] for k in examples[0]}
    total = len(cat["input_ids"]) // block * block
    return [{k: v[i:i + block] for k, v in cat.items()} for i in range(0, total, block)]


@torch.no_grad()
def _masked_eval_loss(model, tok, examples, batch=32, seed=0):
    """Mean CE over masked tokens of `examples`; a freshly seeded collator masks the same
    positions every call, so runs (and our toolkit) are compared on identical targets."""
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, seed=seed)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch):
        b = collate([dict(e) for e in examples[i:i + batch]])  # collator pops special_tokens_mask
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), b["labels"].view(-1),
                                 ignore_index=-100, reduction="sum").item()
        count += int((b["labels"] != -100).sum())
    model.train()
    return total / count


def _mlm_split(text_path):
    lines = [l for l in open(text_path, encoding="utf-8").read().splitlines() if l.strip()]
    cut = int(0.9 * len(lines))
    return lines[:cut], lines[cut:]


def mlm_held_out(text_path, tok):
    """The held-out 10 % as 128-token blocks and line by line, tokenized as the Trainer runs see them."""
    held_lines = _mlm_split(text_path)[1]
    return (group_texts(_lines_to_examples(tok, held_lines, truncate=False)),
            _lines_to_examples(tok, held_lines, truncate=True))


def masked_eval_loss(model_dir, text_path, seed=0):
    """`_masked_eval_loss` on the held-out blocks for a saved masked-LM folder: the Trainer runs' targets."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir, attn_implementation="sdpa")
    return _masked_eval_loss(model, tok, mlm_held_out(text_path, tok)[0], seed=seed)


def trainer_mlm(text_path, tokenizer_dir, mode, steps, log=print):
    """A 4-layer, 128-wide BERT trained by Trainer with masked-LM on `text_path`.

    mode "packed": run_mlm.py's default pipeline, every line tokenized with [CLS]/[SEP],
                   concatenated and cut into 128-token blocks (no padding at all).
    mode "padded": run_mlm.py --line_by_line, each line one example truncated at 128 and
                   padded to the longest in its batch by the collator.
    The last 10 % of the non-empty lines are held out; eval_loss is on them as 128-token blocks
    (same targets for both modes), eval_loss_lines on them line by line."""
    assert mode in ("packed", "padded")
    reset_peak_rss()
    seed, batch = 0, 32
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Blank lines are dropped in both modes (run_mlm keeps them in packed mode, as bare
    # [CLS][SEP] pairs): both modes then train on the same text.
    train_lines, held_lines = _mlm_split(text_path)
    if mode == "packed":
        train_set = group_texts(_lines_to_examples(tok, train_lines, truncate=False))
    else:
        train_set = _lines_to_examples(tok, train_lines, truncate=True)
    held_blocks, held_examples = mlm_held_out(text_path, tok)

    set_seed(seed)  # BertConfig's default dropout 0.1 is kept, as in run_mlm.py
    model = BertForMaskedLM(BertConfig(
        vocab_size=len(tok), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa"))
    # Seeded through set_seed: the collator draws masks from the global torch RNG.
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    # Log every step so the last-20-steps loss is exact; logging on CPU costs one .item().
    tap = _LossTap(log, steps // 10)
    with tempfile.TemporaryDirectory() as out:
        args = _args(out, per_device_train_batch_size=batch, max_steps=steps, seed=seed,
                     learning_rate=5e-4, warmup_steps=0.1,  # a float < 1 is a ratio in transformers 5
                     lr_scheduler_type="linear", logging_steps=1,
                     # Trainer sums attention_mask of every batch it trains on (state.num_input_tokens_seen)
                     include_num_input_tokens_seen="non_padding")
        trainer = _trainer(model, args, train_set, collator, tap)
        seconds, cpu_util = _timed_train(trainer)
        tokens = trainer.state.num_input_tokens_seen
    last = tap.losses[-20:]
    return dict(mode=mode, steps=steps, seconds=seconds, ms_per_step=1000 * seconds / steps,
                tokens_per_s=tokens / seconds, tokens_seen=tokens, train_examples=len(train_set),
                train_loss_last20=sum(last) / len(last),
                eval_loss=_masked_eval_loss(model, tok, held_blocks, seed=seed),
                eval_loss_lines=_masked_eval_loss(model, tok, held_examples, seed=seed),
                peak_rss_mb=peak_rss_mb(), cpu_util=cpu_util)


# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shakespeare 200 iters, MLM 100 steps")
    p.add_argument("--text", default=SHAKESPEARE)
    p.add_argument("--tokenizer-dir", help="HF WordPiece tokenizer; trained on --text if omitted")
    p.add_argument("--only", choices=["roof", "char", "mlm"])
    a = p.parse_args()
    iters, steps = (200, 100) if a.quick else (2000, 500)
    if a.only in (None, "roof"):
        print("matmul_roof_gflops", round(matmul_roof(), 1))
    if a.only in (None, "char"):
        print("trainer_shakespeare_char", trainer_shakespeare_char(a.text, iters))
    if a.only in (None, "mlm"):
        with tempfile.TemporaryDirectory() as tmp:
            tok_dir = a.tokenizer_dir or train_wordpiece(a.text, os.path.join(tmp, "wordpiece"))
            for mode in ("packed", "padded"):
                print(f"trainer_mlm[{mode}]", trainer_mlm(a.text, tok_dir, mode, steps))
