"""Tasks a fine-tuned model does — text classification and token classification (NER): their recipes, data
(tables, CoNLL), encoding with label alignment, the task model, metrics, inference and reports. The training
stage that produces such a model is `lmforge.finetune`; serving reads the inference side."""
