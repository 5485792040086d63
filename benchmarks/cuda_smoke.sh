#!/usr/bin/env bash
# CUDA smoke check on one GPU, every path a CLI user takes: bf16 autocast, torch.compile, torchrun (nccl), BERT
# masked LM, ELECTRA, generation, and a user-registered objective (docs/python-api.md). The corpus is the
# installed Python standard library's sources (1.1 MB), so it needs no data folder.
# Usage: bash benchmarks/cuda_smoke.sh OUT_DIR        (lmforge installed; about 2.5 minutes on one H200)
set -uo pipefail
OUT=${1:?out dir}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 - <<'PY'
import pathlib, sysconfig
src = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
text = "\n\n".join(p.read_text(errors="ignore") for p in src)[:1_100_000]
pathlib.Path("/tmp/corpus.txt").write_text(text)
print("corpus chars", len(text))
PY
LM="python3 -m lmforge.cli"
R=recipes/shakespeare-gpt2-clm.yaml
common=(--set data.sources.0.path=/tmp/corpus.txt --set train.device=cuda --no-progress --force --set train.eval_every=100)
summ() { python3 - "$1" "$2" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
tr = [r for r in recs if "split" not in r]; va = [r for r in recs if r.get("split") == "validation"]
tps = sorted(r["tokens_per_s"] for r in tr[1:]) or [0]
print(json.dumps({"run": sys.argv[2], "steps": tr[-1]["step"], "median_tokens_per_s": tps[len(tps) // 2],
                  "val_loss": va[-1]["loss"] if va else None}))
PY
}
t0=$SECONDS
$LM pretrain $R "${common[@]}" --set output.dir=/tmp/r-bf16 --set train.precision=bf16 --set train.max_steps=300 && summ /tmp/r-bf16 "clm bf16 eager" | tee -a "$OUT/cuda.jsonl"
$LM pretrain $R "${common[@]}" --set output.dir=/tmp/r-compile --set train.precision=bf16 --set train.compile=true --set train.max_steps=300 && summ /tmp/r-compile "clm bf16 compile" | tee -a "$OUT/cuda.jsonl"
torchrun --standalone --nproc_per_node=1 -m lmforge.cli pretrain $R "${common[@]}" --set output.dir=/tmp/r-nccl --set train.max_steps=100 && summ /tmp/r-nccl "clm torchrun nccl x1" | tee -a "$OUT/cuda.jsonl"
$LM pretrain $R "${common[@]}" --set output.dir=/tmp/r-mlm --set objective.name=mlm --set model.family=bert --set tokenizer.kind=wordpiece --set tokenizer.vocab_size=4000 --set objective.block_size=128 --set train.batch_size=32 --set train.max_steps=200 && summ /tmp/r-mlm "bert mlm bf16" | tee -a "$OUT/cuda.jsonl"
$LM pretrain $R "${common[@]}" --set output.dir=/tmp/r-electra --set objective.name=electra --set model.family=electra --set tokenizer.kind=wordpiece --set tokenizer.vocab_size=4000 --set objective.block_size=128 --set train.batch_size=32 --set train.max_steps=100 && summ /tmp/r-electra "electra bf16" | tee -a "$OUT/cuda.jsonl"
$LM generate /tmp/r-bf16 --prompt "def " --max-new-tokens 20 --seed 1
mkdir -p /tmp/api && python3 - <<'PY'
import re, pathlib, subprocess, sys
code = re.findall(r"```python\n(.*?)```", pathlib.Path("docs/python-api.md").read_text(), re.S)[0]
pathlib.Path("/tmp/api/script.py").write_text(code)
r = subprocess.run([sys.executable, "script.py"], cwd="/tmp/api", capture_output=True, text=True)
print("python-api script rc", r.returncode); print(r.stdout[-600:]); print(r.stderr[-1500:] if r.returncode else "")
PY
echo "total ${SECONDS}s"
