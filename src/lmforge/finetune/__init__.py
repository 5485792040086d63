"""Fine-tuning: sequence classification and NER with full, frozen or peft training; predictions and reports."""

from lmforge.finetune.config import FinetuneRecipe, finetune_recipe_from_dict, load_finetune_recipe
from lmforge.finetune.predict import evaluate_task_run, predict_file
from lmforge.finetune.run import finetune

__all__ = ["FinetuneRecipe", "finetune", "finetune_recipe_from_dict", "load_finetune_recipe", "evaluate_task_run",
           "predict_file"]
