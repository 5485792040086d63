"""Fine-tuning: sequence classification and NER with full, frozen or peft training; predictions and reports."""

from lmforge.finetune.run import finetune
from lmforge.stage import callable_stage
from lmforge.tasks.config import FinetuneRecipe, finetune_recipe_from_dict, load_finetune_recipe
from lmforge.tasks.predict import predict_file
from lmforge.tasks.report import evaluate_task_run

__all__ = ["FinetuneRecipe", "finetune", "finetune_recipe_from_dict", "load_finetune_recipe", "evaluate_task_run",
           "predict_file"]

callable_stage(__name__)  # `from lmforge import finetune` can be called: finetune(...)
