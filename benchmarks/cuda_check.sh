#!/usr/bin/env bash
# CUDA paths on one GPU: bf16 autocast, torch.compile, nccl under torchrun, MLM, and a GPT-2-base MFU figure.
# Usage: bash benchmarks/cuda_check.sh TEXT_FILE OUT_DIR   (TEXT_FILE: tiny-shakespeare input.txt)
set -euo pipefail
TEXT=${1:?text file}; OUT=${2:?out dir}
mkdir -p "$OUT"
LM="python3 -m lmforge.cli"
R=recipes/shakespeare-gpt2-clm.yaml
common=(--set "data.sources.0.path=$TEXT" --set train.device=cuda --no-progress --force)
summary() {  # last training record and last validation record of a run
  python3 - "$1" "$2" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
train = [r for r in recs if "split" not in r]; val = [r for r in recs if r.get("split") == "validation"]
tps = sorted(r["tokens_per_s"] for r in train[1:])
print(json.dumps({"run": sys.argv[2], "steps": train[-1]["step"], "median_tokens_per_s": tps[len(tps)//2],
                  "median_mfu": sorted(r["mfu"] for r in train[1:])[len(tps)//2],
                  "val_loss": val[-1]["loss"] if val else None, "wall_s": train[-1]["elapsed_s"]}))
PY
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$LM pretrain $R "${common[@]}" --set output.dir=/tmp/r-bf16 --set train.precision=bf16
summary /tmp/r-bf16 "shakespeare-char bf16 eager" | tee -a "$OUT/cuda.jsonl"
$LM pretrain $R "${common[@]}" --set output.dir=/tmp/r-fp32 --set train.precision=fp32
summary /tmp/r-fp32 "shakespeare-char fp32 eager" | tee -a "$OUT/cuda.jsonl"
$LM pretrain $R "${common[@]}" --set output.dir=/tmp/r-compile --set train.precision=bf16 --set train.compile=true
summary /tmp/r-compile "shakespeare-char bf16 compile" | tee -a "$OUT/cuda.jsonl"
torchrun --standalone --nproc_per_node=1 -m lmforge.cli pretrain $R "${common[@]}" --set output.dir=/tmp/r-nccl \
  --set train.max_steps=300
summary /tmp/r-nccl "shakespeare-char torchrun nccl x1" | tee -a "$OUT/cuda.jsonl"
$LM pretrain $R "${common[@]}" --set output.dir=/tmp/r-mlm --set objective.name=mlm --set model.family=bert \
  --set tokenizer.kind=wordpiece --set tokenizer.vocab_size=4000 --set objective.block_size=128 \
  --set train.batch_size=32 --set train.max_steps=500 --set train.eval_every=250
summary /tmp/r-mlm "bert-mlm bf16 (wordpiece 4k, block 128)" | tee -a "$OUT/cuda.jsonl"
$LM pretrain $R "${common[@]}" --set output.dir=/tmp/r-base --set model.size=base --set model.n_layers=12 \
  --set model.n_heads=12 --set model.d_model=768 --set objective.block_size=512 --set train.batch_size=32 \
  --set train.max_steps=150 --set train.eval_every=0 --set train.log_every=10 --set train.compile=true \
  --set train.lr=3e-4
summary /tmp/r-base "gpt2-base-size bf16 compile (block 512, batch 32)" | tee -a "$OUT/cuda.jsonl"
