"""`lmforge distill`: train a student from a teacher. A distillation recipe is a fine-tuning or pretraining recipe
with a `distill:` section; the stage it names trains the student with the distillation loss
(`lmforge.distill.objective`) and evaluates it as any run, so the folder is an ordinary run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from lmforge.distill.objective import BlockOutputs, Distilled, TeacherCache, layer_pairs, projections
from lmforge.distill.student import load_hf_model, make_student
from lmforge.engine.logging import console
from lmforge.engine.loop import transformer_blocks
from lmforge.errors import LmforgeError
from lmforge.finetune import finetune
from lmforge.pretrain import pretrain
from lmforge.recipe import Recipe, coerce_recipe, load_recipe, read_yaml_mapping
from lmforge.runs import MANIFEST, model_folder, open_experts_model, open_run
from lmforge.stage import RunResult
from lmforge.tasks.config import FinetuneRecipe, load_finetune_recipe
from lmforge.tasks.report import write_text_atomic
from lmforge.tokenizer import load_tokenizer

OBJECTIVES = ("clm", "mlm")  # pretraining objectives whose every prediction has a teacher's to match


def open_teacher(path: Path, task: bool):
    """(teacher model, its tokenizer, its model folder — None for an experts ensemble) from `distill.teacher`."""
    if not path.exists():
        raise LmforgeError(f"distill.teacher: {path}: no such run or model folder")
    if (path / MANIFEST).is_file():
        if task:
            raise LmforgeError(f"distill.teacher: {path} is a domain-experts run (causal LMs); a fine-tuning student "
                               f"needs a fine-tuned teacher")
        model, tokenizer = open_experts_model(path, "ensemble")
        return model, tokenizer, None
    folder = model_folder(path)
    if task:
        return load_hf_model(folder), load_tokenizer(folder), folder
    _, model, tokenizer = open_run(path)
    return model, tokenizer, folder


def _check_pair(teacher, teacher_tok, student, student_tok, cfg) -> None:
    """Refuse a pair that cannot be distilled: another vocabulary, a larger student."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise LmforgeError("distill.teacher: the teacher's tokenizer differs from the student's; a student learns "
                           "the teacher's outputs token for token, so give it the teacher's tokenizer")
    sizes = tuple(sum(p.numel() for p in m.parameters()) for m in (student, teacher))
    if sizes[0] > sizes[1]:
        message = (f"the student has {sizes[0] / 1e6:.2f}M parameters, more than its teacher's {sizes[1] / 1e6:.2f}M")
        if not cfg.allow_larger:
            raise LmforgeError(f"distill: {message}; set distill.allow_larger: true if that is meant")
        console.print(f"[yellow]warning:[/] {message}")


def distill(recipe: Union[str, Path, dict, FinetuneRecipe, Recipe], *, overrides: Union[list[str], tuple] = (),
            resume: bool = False, force: bool = False, show_progress: bool = True) -> RunResult:
    """Distil as the recipe says (a fine-tuning recipe, or a pretraining one, with a `distill:` section); returns
    the student's run folder and its metrics, as `finetune` / `pretrain` do."""
    task = _is_task(recipe)
    recipe = coerce_recipe(recipe, overrides, FinetuneRecipe if task else Recipe,
                           load_finetune_recipe if task else load_recipe)
    cfg = recipe.distill
    if cfg is None:
        raise LmforgeError("distill: the recipe has no distill: section (teacher, temperature, alpha, ...)")
    if not task and recipe.objective.name not in OBJECTIVES:
        raise LmforgeError(f"objective.name: distillation matches per-position predictions of "
                           f"{' or '.join(OBJECTIVES)}; got '{recipe.objective.name}'")
    teacher, teacher_tok, teacher_folder = open_teacher(Path(cfg.teacher), task)
    if task:  # the student's outputs line up with the teacher's: its label set, in its order
        names = [teacher.config.id2label[i] for i in range(len(teacher.config.id2label))]
        if recipe.data.labels is not None and list(recipe.data.labels) != names:
            raise LmforgeError(f"data.labels: {list(recipe.data.labels)} differ from the teacher's labels {names}")
        recipe.data.labels = names
    if cfg.student_layers:
        if teacher_folder is None:
            raise LmforgeError("distill.student_layers: an experts ensemble has no single stack of layers to take; "
                               "give the student in model: (e.g. the experts' seed architecture)")
        total = teacher.config.num_hidden_layers
        if cfg.student_layers > total:
            raise LmforgeError(f"distill.student_layers: {cfg.student_layers} is more than the teacher's {total} layers")
        recipe.model.path = str(make_student(teacher_folder, cfg.init_layers, cfg.student_layers))
    if not task and not recipe.model.path and not recipe.tokenizer.path:
        recipe.tokenizer.path = str(teacher_folder or _tokenizer_folder(Path(cfg.teacher)))
    if cfg.cache_teacher and not task:
        raise LmforgeError("distill.cache_teacher: kept for fine-tuning students (a language model's outputs over the "
                           "vocabulary at every position are too large to keep); computed on the fly here")
    if cfg.cache_teacher and cfg.hidden_weight > 0:
        raise LmforgeError("distill.cache_teacher: hidden-state matching needs the teacher's forward pass at every "
                           "step; use one or the other")
    cache = cfg.cache_teacher
    wrapped = {}

    def train_objective(objective, model, tokenizer):
        _check_pair(teacher, teacher_tok, model, tokenizer, cfg)
        binary = task and recipe.data.multi_label
        hidden = hidden_matching(teacher, model) if cfg.hidden_weight > 0 else {}
        wrapped["objective"] = Distilled(objective, teacher, cfg.temperature, cfg.alpha, binary,
                                         hidden_weight=cfg.hidden_weight, cache=TeacherCache() if cache else None,
                                         **hidden)
        return wrapped["objective"]

    run = (finetune if task else pretrain)(recipe, resume=resume, force=force, show_progress=show_progress,
                                           train_objective=train_objective)
    _record(run.run_dir, cfg, wrapped.get("objective"))
    return run


def hidden_matching(teacher, student) -> dict:
    """The taps on both models' blocks and the layer pairs for `distill.hidden_weight`, or a refusal."""
    blocks = transformer_blocks(teacher), transformer_blocks(student)
    if blocks[0] is None or blocks[1] is None:
        raise LmforgeError("distill.hidden_weight: hidden states are matched block to block, and the "
                           + ("teacher (an experts ensemble?)" if blocks[0] is None else "student")
                           + " has no stack of transformer blocks lmforge knows")
    widths = [getattr(m.config, "hidden_size", None) or getattr(m.config, "n_embd", None) for m in (teacher, student)]
    pairs = layer_pairs(len(blocks[1]), len(blocks[0]))
    return {"taps": (BlockOutputs(blocks[1]), BlockOutputs(blocks[0])), "pairs": pairs,
            "project": projections(widths[1], widths[0], len(pairs))}


def _is_task(recipe) -> bool:
    if isinstance(recipe, (FinetuneRecipe, Recipe)):
        return isinstance(recipe, FinetuneRecipe)
    tree = recipe if isinstance(recipe, dict) else read_yaml_mapping(recipe, "a recipe is a mapping of sections")
    return "task" in tree


def _tokenizer_folder(experts_run: Path) -> Path:
    spec = json.loads((experts_run / "ensemble" / "ensemble.json").read_text())
    return (experts_run / "ensemble" / spec["experts"][0]).resolve()


def _record(run_dir: Path, cfg, objective) -> None:
    """distill.json, and the model card's section naming the teacher."""
    cache = objective.cache if objective else None
    info = {**cfg.model_dump(mode="json"),
            "teacher_seconds": round(objective.teacher_seconds, 4) if objective else None,
            **({"teacher_cache": {"examples": len(cache.rows), "computed": cache.misses, "reused": cache.hits}}
               if cache else {})}
    write_text_atomic(run_dir / "distill.json", json.dumps(info, indent=2))
    card = next((run_dir / n for n in ("README.md", "summary.md") if (run_dir / n).is_file()), None)
    if card is None:
        return
    layers = (f"; the student is the teacher with {cfg.student_layers} layers, started from teacher layers "
              f"{cfg.init_layers or 'evenly spaced'}") if cfg.student_layers else ""
    how = (f"computed once for each of {len(cache.rows):,} examples and reused {cache.hits:,} times" if cache else
           "computed in the same step as the student's, not cached")
    cost = (f" The teacher's forward passes took {objective.teacher_seconds:.0f} s of the training time ({how}).")\
        if objective else ""
    section = (f"\n## Distillation\n\nDistilled from `{cfg.teacher}` at temperature {cfg.temperature}, alpha "
               f"{cfg.alpha} on the soft targets{layers}.{cost}\n")
    write_text_atomic(card, card.read_text() + section)
