"""Peak memory of a pretraining run whose source is one long line (no line break at all), against the same text
as ordinary paragraphs, measured in the same run: memory must follow the shape of the input, not its size.

    python benchmarks/memory_long_document.py --mb 13 53

Each case runs in a fresh process (character tokenizer trained on the text, packed blocks of 64, one training
step of the tiny GPT-2); the figure is the process's peak resident memory (VmHWM), with the import baseline beside it.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

# VmHWM, not ru_maxrss: a forked child inherits its parent's ru_maxrss across exec.
CHILD = """
import json, re, sys
def peak_mb():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
from lmforge.pretrain import pretrain
imports = peak_mb()
source, work = sys.argv[1], sys.argv[2]
tree = {"name": "mem", "data": {"sources": [{"path": source, "domain": "x"}], "validation_fraction": 0.1,
        "cache_dir": work + "/cache"}, "tokenizer": {"kind": "char"}, "model": {"family": "gpt2", "size": "tiny"},
        "objective": {"name": "clm", "block_size": 64}, "train": {"max_steps": 1, "batch_size": 2, "eval_every": 0},
        "output": {"dir": work + "/run", "plots": False, "tensorboard": False}}
pretrain(tree, force=True, show_progress=False)
print(json.dumps({"imports_mb": imports, "peak_mb": peak_mb()}))
"""


def text_of(mb: float, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "the river flows under a bridge while code compiles and tests run quickly over data".split()
    return " ".join(rng.choice(words) for _ in range(int(mb * 2**20 / 5.5)))


def measure(source: Path) -> dict:
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run([sys.executable, "-c", CHILD, str(source), work], capture_output=True, text=True,
                             check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, nargs="+", default=[13.0], help="sizes of the text, in MB")
    args = p.parse_args()
    print("| text | shape | imports (MB) | peak RSS (MB) | above imports, per MB of text |")
    print("|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.mb:
            text = text_of(mb)
            words = text.split(" ")
            shapes = {"one line": text, "paragraphs of 100 words": "\n\n".join(
                " ".join(words[i:i + 100]) for i in range(0, len(words), 100))}
            del words
            for shape, body in shapes.items():
                source = Path(tmp) / "text.txt"
                source.write_text(body)
                r = measure(source)
                size = len(body) / 2**20
                print(f"| {size:.0f} MB | {shape} | {r['imports_mb']:.0f} | {r['peak_mb']:.0f} | "
                      f"{(r['peak_mb'] - r['imports_mb']) / size:.1f} |", flush=True)


if __name__ == "__main__":
    main()
