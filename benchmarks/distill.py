"""Distillation benchmarks: each compares a distilled student with the same model trained without the teacher
(same initial weights, data and steps), measured in the same run.

    python benchmarks/distill.py --teacher runs/sst2-minilm [--rows 4000] [--layers 3]     # --kind sst2
    python benchmarks/distill.py --kind clm [--teacher-steps 1500] [--steps 200]
    python benchmarks/distill.py --kind experts [--seed-steps 300] [--steps 400] [--set model.d_model=64 ...]

sst2: the teacher is any fine-tuned SST-2 run (e.g. `lmforge finetune recipes/sst2-minilm.yaml`). Both students
start as the teacher's layers 0, 2 and 5 and train one epoch on the first `--rows` training rows (64 tokens); the
distilled one with alpha 0.5 and T 2, its twin with alpha 0 (the hard labels only). Latency and accuracy come from
`lmforge compare` (1 thread, batch 1 and 32, medians of warm repeats) over the three folders.

clm: on the prepared shared corpora (`lmforge prep recipes/prep/shared-corpora.yaml`, run first if needed), the
teacher is recipes/experts-domains.yaml's GPT-2 4x128 trained `--teacher-steps` on all seven domains (kept in
OUT/teacher and reused). Two students of half its layers start from the same teacher layers (distill's default:
evenly spaced, first and last kept) and train `--steps` on the same batches, one distilled (alpha, T), its twin
with alpha 0 (the plain next-token loss), at the same time on half of `--threads` each. Validation perplexity
per domain.

experts: recipes/experts-domains.yaml's Branch-Train-Merge run on the four expert domains (seed, experts, BTM
ensemble; kept in OUT/experts and reused), `--set` overrides applied. The student is the seed trained on the
dense baseline's budget (the same steps, batch and batches as `lmforge experts train --dense`) with the ensemble
as its teacher; the dense baseline is the same model trained without it. The two train at the same time, on
half of `--threads` each. In-domain validation perplexity per domain of dense, ensemble and student, and the
share of the ensemble's gain over dense the student keeps: (dense - student) / (dense - ensemble).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from lmforge.experts import branch, evaluate, merge
from lmforge.experts.run import dense_recipe
from lmforge.recipe import DistillConfig, load_recipe

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "data" / "shared-corpora"
IN_DOMAIN = ["biomedical", "code", "legal", "scientific"]


def cli(*args: str, threads: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmforge.cli", *map(str, args), "--no-progress"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL)


def wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.wait():
            raise SystemExit(f"failed: {' '.join(map(str, p.args))}")


def half(args) -> int:
    """Threads for each of two runs side by side."""
    return max(1, args.threads // 2)


def prepare_corpora(threads: int) -> None:
    if not (CORPORA / "lmforge-prep.json").is_file():
        wait(cli("prep", ROOT / "recipes" / "prep" / "shared-corpora.yaml", threads=threads))


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


def sst2(args) -> None:
    if args.teacher is None:
        raise SystemExit("--kind sst2 needs --teacher (a fine-tuned SST-2 run folder)")
    distilled = student(args.teacher, args.out / "distilled", args.rows, args.layers, args.alpha)
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


def write_recipe(tree: dict, out: Path) -> Path:
    path = out.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def validation(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["validation"]


def clm(args) -> None:
    """A causal LM: a student of half the teacher's layers, distilled and not, on the seven shared corpora."""
    prepare_corpora(args.threads)
    base = yaml.safe_load((ROOT / "recipes" / "experts-domains.yaml").read_text())
    base.pop("experts")
    base["data"] = {"sources": [{"path": str(CORPORA)}]}
    base["train"].update({"eval_every": 0})
    sets = [a for s in args.overrides for a in ("--set", s)]
    teacher = args.out / "teacher"
    if not (teacher / "final" / "config.json").is_file():
        tree = {**base, "name": "bench-distill-clm-teacher", "output": {"dir": str(teacher), "tensorboard": False}}
        tree["train"] = {**base["train"], "max_steps": args.teacher_steps}
        wait(cli("pretrain", write_recipe(tree, teacher), "--force", *sets, threads=args.threads))
    layers = json.loads((teacher / "final" / "config.json").read_text())["n_layer"]
    procs = []
    for name, alpha in (("distilled", args.alpha), ("twin", 0.0)):
        tree = {**base, "name": f"bench-distill-clm-{name}",
                "output": {"dir": str(args.out / name), "tensorboard": False},
                "train": {**base["train"], "max_steps": args.steps},
                "distill": {"teacher": str(teacher), "temperature": args.temperature, "alpha": alpha,
                            "student_layers": layers // 2}}
        procs.append(cli("distill", write_recipe(tree, args.out / name), "--force", *sets, threads=half(args)))
    wait(*procs)
    results = {name: validation(args.out / name) for name in ("teacher", "distilled", "twin")}
    domains = sorted(k.split("/", 1)[1] for k in results["twin"] if k.startswith("ppl/"))
    table = {}
    for d in domains + ["all"]:
        key = "ppl" if d == "all" else f"ppl/{d}"
        row = {name: round(r[key], 2) for name, r in results.items()}
        row["distilled_vs_twin"] = round(row["distilled"] / row["twin"] - 1, 4)
        table[d] = row
    print(json.dumps({
        "kind": "clm", "teacher_layers": layers, "student_layers": layers // 2,
        "teacher_steps": json.loads((teacher / "results.json").read_text())["steps"],
        "student_steps": args.steps, "alpha": args.alpha, "temperature": args.temperature, "overrides": args.overrides,
        "validation_ppl": table,
        "distilled_below_twin_on": [d for d in domains if table[d]["distilled"] < table[d]["twin"]],
        "bar_met": table["all"]["distilled"] < table["all"]["twin"]}, indent=2))


def experts(args) -> None:
    """The BTM ensemble as teacher of one dense model, against the dense baseline of the same size and tokens."""
    prepare_corpora(args.threads)
    overrides = list(args.overrides) + [f"experts.steps={args.steps}", f"experts.seed_steps={args.seed_steps}"]
    recipe = load_recipe(ROOT / "recipes" / "experts-domains.yaml", overrides)
    recipe.data.sources[0].path = str(CORPORA)
    recipe.data.only_domains = IN_DOMAIN
    recipe.experts.domains = IN_DOMAIN
    recipe.output.dir = str(args.out / "experts")
    run = Path(recipe.output.dir)
    side_by_side = ["--launch", "inline"]  # in the process started here, on its threads (the launcher sets its own)
    if not (run / "ensemble" / "ensemble.json").is_file():
        run = branch(recipe, force=True, show_progress=False)
        for pair in (IN_DOMAIN[:2], IN_DOMAIN[2:]):
            wait(*(cli("experts", "train", run, "--domain", d, *side_by_side, threads=half(args)) for d in pair))
        merge(run, "ensemble")
    info = json.loads((run / "experts.json").read_text())
    recipe = load_recipe(run / "recipe.yaml")
    distilled = dense_recipe(recipe, info["domains"], run / info["seed"], args.out / "student")
    distilled.name = "bench-distill-experts-student"
    distilled.distill = DistillConfig(teacher=str(run), temperature=args.temperature, alpha=args.alpha)
    path = args.out / "student.yaml"
    path.write_text(distilled.to_yaml())
    procs = [cli("distill", path, "--force", threads=half(args))]
    if not (run / "dense" / "final" / "config.json").is_file():
        procs.append(cli("experts", "train", run, "--dense", *side_by_side, threads=half(args)))
    wait(*procs)
    results = evaluate(run, extra={"student": args.out / "student" / "final"}, domains=IN_DOMAIN,
                       models=["dense", "ensemble", "student"])
    table = {}
    for d in IN_DOMAIN:
        row = {name: round(results[name][f"ppl/{d}"], 2) for name in ("dense", "ensemble", "student")}
        gain = row["dense"] - row["ensemble"]
        row["student_vs_dense"] = round(row["student"] / row["dense"] - 1, 4)
        row["gain_kept"] = round((row["dense"] - row["student"]) / gain, 3) if gain else None
        table[d] = row
    print(json.dumps({
        "kind": "experts", "seed_steps": recipe.experts.seed_steps, "expert_steps": info["steps_per_expert"],
        "expert_batch_size": info.get("expert_batch_size"),
        "student_steps": distilled.train.max_steps, "batch_size": distilled.train.batch_size,
        "train_tokens": {**{n: results[n].get("train_tokens") for n in ("dense", "ensemble")},
                         "student": json.loads((args.out / "student" / "results.json").read_text())["tokens"]},
        "alpha": args.alpha, "temperature": args.temperature, "overrides": args.overrides,
        "in_domain_ppl": table,
        "bar_met": all(row["student"] < row["dense"] for row in table.values())}, indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["sst2", "clm", "experts"], default="sst2")
    ap.add_argument("--teacher", type=Path, help="sst2: a fine-tuned SST-2 run folder")
    ap.add_argument("--rows", type=int, default=4000, help="sst2: training rows")
    ap.add_argument("--layers", type=int, default=3, help="sst2: student layers")
    ap.add_argument("--teacher-steps", type=int, default=1500, help="clm: the teacher's training steps")
    ap.add_argument("--steps", type=int, default=None,
                    help="clm: each student's steps (default 200); experts: steps per expert (default 400)")
    ap.add_argument("--seed-steps", type=int, default=300, help="experts: the BTM seed's steps")
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the soft-target loss")
    ap.add_argument("--temperature", type=float, default=None, help="T of the soft targets (sst2: 2, else 1)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="clm, experts: recipe override, e.g. --set model.d_model=64 (repeatable)")
    ap.add_argument("--threads", type=int, default=2, help="clm, experts: CPU threads (halved for side-by-side runs)")
    ap.add_argument("--out", type=Path, default=None, help="default runs/bench-distill[-clm|-experts]")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out = (args.out or ROOT / "runs" / ("bench-distill" + ("" if args.kind == "sst2" else f"-{args.kind}")))
    args.out = args.out.resolve()
    args.steps = args.steps or {"clm": 200, "experts": 400}.get(args.kind)
    args.temperature = args.temperature or (2.0 if args.kind == "sst2" else 1.0)
    {"sst2": sst2, "clm": clm, "experts": experts}[args.kind](args)


if __name__ == "__main__":
    main()
