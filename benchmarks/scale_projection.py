"""What GPT-2-base and a 1.1B Llama would do on 8 and 2x8 H100s: tokens/s and memory per GPU, DDP vs FSDP.

A projection, not a measurement: FLOPs per token come from lmforge's own count on the real model (built on
the meta device, no weights), the MFU from our measured single-H100 run (docs/benchmarks.md, GPU-one-H100:
GPT-2-base, bf16 + compile, 35.8 %), the peaks and link speeds from NVIDIA's published figures. Every
assumption is a constant below and is printed with the table.

    python benchmarks/scale_projection.py
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lmforge.models.build import count_parameters, flops_per_token

H100_BF16_PEAK = 989e12        # dense bf16 FLOP/s, H100 SXM (NVIDIA datasheet)
MFU = 0.358                     # measured: GPT-2-base on one H100, bf16 + compile (docs/benchmarks.md)
NVLINK_BUS_BW = 360e9           # bytes/s, NCCL all-reduce bus bandwidth within an 8-GPU NVLink node (typical)
IB_BUS_BW = 40e9                # bytes/s per GPU across nodes: one 400 Gb/s NDR link per GPU, ~80 % achieved
GPU_MEMORY = 80e9               # bytes, H100 SXM
# Bytes per parameter: fp32 master weights 4 + fp32 gradients 4 + Adam's two moments 8, plus the bf16 copy
# of the weights that mixed precision computes with (FSDP: only the layer being computed is gathered).
STATE_BYTES, BF16 = 16, 2

# (config, sequence length, micro-batch per GPU, tokens per optimizer step): GPT-2's 512 x 1024 batch, and
# TinyLlama's 2M-token one halved.
MODELS = {
    "GPT-2-base (12x768)": (GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
                            1024, 8, 2 ** 19),
    "Llama 1.1B (22x2048, GQA)": (LlamaConfig(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632,
                                              num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                              max_position_embeddings=2048), 2048, 4, 2 ** 20),
}
SETUPS = {"8 GPUs (1 node)": (8, NVLINK_BUS_BW), "16 GPUs (2x8 nodes)": (16, IB_BUS_BW)}


def meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def activation_bytes(config, seq: int, micro: int, checkpointing: bool) -> float:
    """Activations kept for the backward pass (Korthikanti et al. 2022, bf16, no sequence parallelism):
    s·b·h·(34 + 5·a·s/h) bytes per layer; with full checkpointing 2·s·b·h per layer (the block inputs) plus
    one layer's whole set while it is recomputed."""
    layers = config.num_hidden_layers
    h, a = config.hidden_size, config.num_attention_heads
    full = seq * micro * h * (34 + 5 * a * seq / h)
    return layers * seq * micro * h * 2 + full if checkpointing else layers * full


def project(name: str, config, seq: int, micro: int, global_tokens: int) -> list[dict]:
    model = meta_model(config)
    n = count_parameters(model)["total"]
    fpt = flops_per_token(model, seq)
    layers = config.num_hidden_layers
    rows = []
    for setup, (gpus, bus_bw) in SETUPS.items():
        accum = max(1, global_tokens // (gpus * micro * seq))    # micro-batches per optimizer step
        step_tokens = accum * gpus * micro * seq
        ring = 2 * (gpus - 1) / gpus                              # all-reduce moves 2(n-1)/n of the data
        comm = {"DDP": ring * n * 4 / bus_bw,                     # fp32 gradient all-reduce, once per step
                # FSDP: bf16 all-gathers for forward and for backward in every micro-batch, one fp32
                # reduce-scatter of gradients per step; each moves (n-1)/n, half an all-reduce.
                "FSDP": ring / 2 * n * (accum * 2 * BF16 + 4) / bus_bw}
        for strategy, comm_s in comm.items():
            states = n * STATE_BYTES / (gpus if strategy == "FSDP" else 1)
            working = n * BF16 if strategy == "DDP" else 2 * n / layers * BF16  # bf16 weights in use
            for ckpt in (False, True):
                # Tokens/s if communication hid fully; checkpointing recomputes the forward: 4/3 of the work.
                compute_tps = gpus * MFU * H100_BF16_PEAK / (fpt * (4 / 3 if ckpt else 1))
                compute_s = step_tokens / compute_tps
                step_s = max(compute_s, comm_s)                   # overlapped: the longer of the two sets the pace
                mem = states + working + activation_bytes(config, seq, micro, ckpt)
                rows.append({"model": name, "params": n, "setup": setup, "strategy": strategy,
                             "checkpointing": ckpt, "tokens_per_s": step_tokens / step_s,
                             "comm_share": comm_s / step_s, "memory_gb": mem / 1e9,
                             "fits": mem < 0.9 * GPU_MEMORY, "flops_per_token": fpt, "seq": seq, "micro": micro,
                             "accum": accum})
    return rows


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"assumptions: bf16 peak {H100_BF16_PEAK / 1e12:.0f} TFLOP/s per H100, MFU {MFU:.1%} (measured, "
          f"GPT-2-base, one H100), NVLink all-reduce bus bandwidth {NVLINK_BUS_BW / 1e9:.0f} GB/s, "
          f"InfiniBand {IB_BUS_BW / 1e9:.0f} GB/s per GPU, {STATE_BYTES} B/param of fp32 weights+grads+Adam, "
          f"communication overlapped with compute, activation checkpointing costs one more forward (4/3)\n")
    print("| model | params | sequence × micro-batch × accumulation | GPUs | strategy | activation ckpt | tokens/s | "
          "comm / step | memory per GPU | fits 80 GB |")
    print("|---|---:|---|---|---|---|---:|---:|---:|---|")
    for name, (config, seq, micro, global_tokens) in MODELS.items():
        for r in project(name, config, seq, micro, global_tokens):
            print(f"| {r['model']} | {r['params'] / 1e6:,.0f}M | {r['seq']} × {r['micro']} × {r['accum']} | {r['setup']} | "
                  f"{r['strategy']} | {'yes' if r['checkpointing'] else 'no'} | {r['tokens_per_s']:,.0f} | "
                  f"{r['comm_share']:.0%} | {r['memory_gb']:.1f} GB | {'yes' if r['fits'] else 'no'} |")


if __name__ == "__main__":
    main()
