"""CPU inference of a fine-tuned classifier: ONNX Runtime fp32 and dynamic int8 (`lmforge export`) and
`torch.ao` dynamic int8, each against PyTorch fp32 eager, measured in the same run.

Every variant runs the same fixed-shape batches (1×64 and 32×128 tokens, real SST-2 dev sentences padded or cut
to the length) at the same thread count; the variants take turns within each repeat (interleaved), and each
figure is the median over repeats. Speed-up is PyTorch fp32's median over the variant's. Accuracy is on the whole
SST-2 dev set, size is the file a user ships (safetensors, model.onnx, or torch.save of the torch.ao model,
which `save_pretrained` cannot write).

    python benchmarks/export.py --run runs/sst2-minilm --threads 1
    python benchmarks/export.py --run runs/sst2-minilm --threads 1 --fusions --repeats 7

`--static N` adds static int8 (QDQ: activations quantized with scales calibrated once, on N SST-2 training rows,
instead of at run time) on the same graph the dynamic int8 export quantizes, beside the dynamic one.

    python benchmarks/export.py --run runs/sst2-minilm --threads 1 --static 256 --repeats 15

`--fusions`: the int8 graph under three fusion settings of ONNX Runtime's optimizer (all fusions; no attention
fusion; neither attention nor skip-layer-norm fusion, what `--quantize int8` writes), each against PyTorch fp32
on full rows (random token ids, every position real) and on padded rows (8–40 real tokens, the rest padding).
"""
import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lmforge.export import export
from lmforge.tasks.predict import classify_texts, open_task_model

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / ".." / "shared" / "data" / "sst2" / "dev.tsv"
SHAPES = ((1, 64), (32, 128))


def dev_set() -> tuple[list[str], list[str]]:
    with open(DEV, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [str(r["label"]) for r in rows]


def fixed_batch(tokenizer, texts: list[str], rows: int, length: int) -> dict:
    enc = tokenizer(texts[:rows], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def torch_ao_int8(run: Path):
    """PyTorch's own dynamic int8 (Linear layers), the peer that stays in PyTorch."""
    _, model, _, _ = open_task_model(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice: this row is the peer, deprecated or not
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def file_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def accuracy(model, tokenizer, texts: list[str], gold: list[str]) -> float:
    with torch.no_grad():
        predicted = classify_texts(model, tokenizer, texts, max_length=128, batch_size=64)
    return float(np.mean([p["label"] == g for p, g in zip(predicted, gold)]))


def latencies(models: dict, batches: dict, repeats: int) -> dict:
    """{(variant, shape): median seconds}, the variants taking turns within each repeat."""
    times = {(name, shape): [] for name in models for shape in batches}
    with torch.no_grad():
        for name, model in models.items():  # warm every variant and shape once
            for batch in batches.values():
                model(**batch)
        for _ in range(repeats):
            for shape, batch in batches.items():
                for name, model in models.items():
                    t0 = time.perf_counter()
                    model(**batch)
                    times[(name, shape)].append(time.perf_counter() - t0)
    return {key: statistics.median(values) for key, values in times.items()}


TRAIN = ROOT / ".." / "shared" / "data" / "sst2" / "train.tsv"


def static_int8(run: Path, int8_dir: Path, out: Path, rows: int) -> Path:
    """A copy of the dynamic int8 folder whose model.onnx is static QDQ int8 of the same fp32 graph (fused for
    int8, mask fill softened), calibrated by MinMax on the first `rows` training sentences padded to 128 tokens."""
    import shutil
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from lmforge.export.onnx import export_rule, fuse, load_for_export, sample_inputs, soften_mask, trace_to_onnx
    from lmforge.runs import model_folder
    folder = model_folder(run)
    rule, _ = export_rule(folder)
    model = load_for_export(folder, rule)
    with open(TRAIN, newline="", encoding="utf-8") as fh:
        texts = [r["sentence"] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)][:rows]
    tokenizer = open_task_model(run)[2]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{k: v.numpy() for k, v in fixed_batch(tokenizer, texts[i:i + 32], 32, 128).items()
                                  if k in rule.inputs} for i in range(0, len(texts), 32)])

        def get_next(self):
            return next(self.batches, None)

    shutil.copytree(int8_dir, out)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw, fused = Path(tmp) / "raw.onnx", Path(tmp) / "fused.onnx"
        trace_to_onnx(model, rule, sample_inputs(model.config, rule), raw)
        fuse(raw, fused, rule, model.config, for_int8=True)
        soften_mask(fused)
        quantize_static(str(fused), str(out / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # as the dynamic export
    return out


def fusion_settings(run: Path, repeats: int) -> None:
    """Speed-up over PyTorch fp32 of the int8 graph under each fusion setting, full and padded rows."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    from lmforge.export.onnx import export_rule, load_for_export, quantize_int8, sample_inputs, trace_to_onnx
    from lmforge.models.onnx import open_session
    from lmforge.runs import model_folder
    folder = model_folder(run)
    rule, config = export_rule(folder)
    model = load_for_export(folder, rule)
    settings = {"all fusions": {}, "no attention fusion": {"enable_attention": False},
                "neither attention nor skip-layer-norm fusion": {"enable_attention": False,
                                                                 "enable_skip_layer_norm": False}}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        trace_to_onnx(model, rule, sample_inputs(model.config, rule), raw)
        for k, (name, off) in enumerate(settings.items()):
            options = FusionOptions("bert")
            for key, value in off.items():
                setattr(options, key, value)
            optimize_model(str(raw), model_type="bert", num_heads=config["num_attention_heads"],
                           hidden_size=config["hidden_size"], optimization_options=options
                           ).save_model_to_file(str(Path(tmp) / f"{k}.onnx"))
            quantize_int8(Path(tmp) / f"{k}.onnx", Path(tmp) / f"{k}-int8.onnx")
            sessions[name] = open_session(Path(tmp) / f"{k}-int8.onnx")
        g = torch.Generator().manual_seed(0)
        print(f"{run}: int8 graphs, {torch.get_num_threads()} thread(s), medians of {repeats}\n")
        print("| int8 graph | " + " | ".join(f"{b}×{n}" for b, n in SHAPES) + " | "
              + " | ".join(f"{b}×{n} padded" for b, n in SHAPES) + " |")
        print("|---|" + "---:|" * (2 * len(SHAPES)))
        cells = {name: [] for name in sessions}
        for padded in (False, True):
            for b, n in SHAPES:
                ids = torch.randint(1000, config["vocab_size"], (b, n), generator=g)
                real = torch.randint(8, 40, (b, 1), generator=g) if padded else torch.full((b, 1), n)
                mask = (torch.arange(n)[None] < real).long()
                feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
                times = {name: [] for name in ["torch", *sessions]}
                for _ in range(repeats):
                    with torch.inference_mode():
                        t = time.perf_counter()
                        model(**feed)
                        times["torch"].append(time.perf_counter() - t)
                    for name, session in sessions.items():
                        t = time.perf_counter()
                        session.run(None, {k: v.numpy() for k, v in feed.items()})
                        times[name].append(time.perf_counter() - t)
                base = statistics.median(times["torch"])
                for name in sessions:
                    cells[name].append(f"{base / statistics.median(times[name]):.2f}×")
        for name, row in cells.items():
            print(f"| {name} | " + " | ".join(row) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="A fine-tuned classifier run (or HF folder).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--fusions", action="store_true", help="Compare the int8 graph's fusion settings instead.")
    ap.add_argument("--static", type=int, default=0, metavar="N",
                    help="Also static QDQ int8 calibrated on N training rows.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.fusions:
        return fusion_settings(args.run, args.repeats)
    texts, gold = dev_set()
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir, int8_dir = export(args.run, Path(tmp) / "fp32"), export(args.run, Path(tmp) / "int8", quantize="int8")
        _, reference, tokenizer, _ = open_task_model(args.run)
        ao = torch_ao_int8(args.run)
        torch.save(ao.state_dict(), Path(tmp) / "ao.pt")
        models = {"PyTorch fp32 eager": reference, "ONNX Runtime fp32 (fused)": open_task_model(fp32_dir)[1],
                  "ONNX Runtime int8 (dynamic)": open_task_model(int8_dir)[1],
                  "torch.ao quantize_dynamic int8": ao}
        source = next(p for p in (args.run / "final" / "model.safetensors", args.run / "model.safetensors")
                      if p.is_file())
        sizes = {"PyTorch fp32 eager": file_mb(source), "ONNX Runtime fp32 (fused)": file_mb(fp32_dir / "model.onnx"),
                 "ONNX Runtime int8 (dynamic)": file_mb(int8_dir / "model.onnx"),
                 "torch.ao quantize_dynamic int8": file_mb(Path(tmp) / "ao.pt")}
        if args.static:
            name = f"ONNX Runtime int8 (static QDQ, {args.static} calibration rows)"
            static_dir = static_int8(args.run, int8_dir, Path(tmp) / "static", args.static)
            models[name], sizes[name] = open_task_model(static_dir)[1], file_mb(static_dir / "model.onnx")
        batches = {shape: fixed_batch(tokenizer, texts, *shape) for shape in SHAPES}
        medians = latencies(models, batches, args.repeats)
        scores = {name: accuracy(model, tokenizer, texts, gold) for name, model in models.items()}
    base = "PyTorch fp32 eager"
    print(f"{args.run}: SST-2 dev ({len(texts)} rows), {args.threads} thread(s), median of {args.repeats} "
          f"interleaved repeats; torch {torch.__version__}, cpu count {os.cpu_count()}\n")
    print("| variant | " + " | ".join(f"batch {b}×{n} ms" for b, n in SHAPES) + " | speed-up "
          + " / ".join(f"{b}×{n}" for b, n in SHAPES) + " | size MB (ratio) | accuracy (Δ pt) |")
    print("|---|" + "---:|" * (len(SHAPES) + 3))
    for name in models:
        ms = " | ".join(f"{medians[(name, s)] * 1e3:.1f}" for s in SHAPES)
        speed = " / ".join(f"{medians[(base, s)] / medians[(name, s)]:.2f}×" for s in SHAPES)
        size = f"{sizes[name]:.1f} ({sizes[name] / sizes[base]:.2f}×)"
        acc = f"{scores[name]:.4f} ({(scores[name] - scores[base]) * 100:+.1f})"
        print(f"| {name} | {ms} | {speed} | {size} | {acc} |")


if __name__ == "__main__":
    sys.exit(main())
