"""Distillation on SST-2: a student with half the teacher's layers, distilled, against the same student fine-tuned
without the teacher (same initial weights, data and steps), and against the teacher, measured in the same run.

    python benchmarks/distill.py --teacher runs/sst2-minilm [--rows 4000] [--layers 3]

The teacher is any fine-tuned SST-2 run (e.g. `lmforge finetune recipes/sst2-minilm.yaml`). Both students start
as the teacher's layers 0, 2 and 5 and train one epoch on the first `--rows` training rows (64 tokens); the
distilled one with alpha 0.5 and T 2, its twin with alpha 0 (the hard labels only). Latency and accuracy come from
`lmforge compare` (1 thread, batch 1 and 32, medians of warm repeats) over the three folders.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def student(teacher: Path, out: Path, rows: int, layers: int, alpha: float) -> Path:
    tree = yaml.safe_load((ROOT / "recipes" / "distill-sst2.yaml").read_text())
    tree["data"]["train"]["path"] = str((ROOT / "recipes" / tree["data"]["train"]["path"]).resolve())
    tree["data"]["validation"]["path"] = str((ROOT / "recipes" / tree["data"]["validation"]["path"]).resolve())
    tree["data"].update({"max_examples": rows, "max_length": 64})
    tree["distill"].update({"teacher": str(teacher.resolve()), "student_layers": layers, "alpha": alpha})
    tree["output"] = {"dir": str(out), "tensorboard": False}
    path = out.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    subprocess.run([sys.executable, "-m", "lmforge.cli", "distill", str(path), "--force", "--no-progress"], check=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True, help="a fine-tuned SST-2 run folder")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-distill")
    args = ap.parse_args()
    distilled = student(args.teacher, args.out / "distilled", args.rows, args.layers, 0.5)
    twin = student(args.teacher, args.out / "twin", args.rows, args.layers, 0.0)
    subprocess.run([sys.executable, "-m", "lmforge.cli", "compare", str(args.teacher), str(distilled), str(twin),
                    "--out", str(args.out / "compare")], check=True)
    rows = {r["name"]: r for r in json.loads((args.out / "compare" / "compare.json").read_text())}
    teacher, ours, alone = (rows[n] for n in (args.teacher.name, "distilled", "twin"))
    print(json.dumps({
        "teacher_accuracy": teacher["metric"], "distilled_accuracy": ours["metric"], "twin_accuracy": alone["metric"],
        "distilled_minus_teacher_points": round(100 * (ours["metric"] - teacher["metric"]), 2),
        "distilled_minus_twin_points": round(100 * (ours["metric"] - alone["metric"]), 2),
        "batch32_latency_vs_teacher": round(ours["latency_ms"]["32"] / teacher["latency_ms"]["32"], 3),
        "rows": args.rows, "layers": args.layers}, indent=2))


if __name__ == "__main__":
    main()
