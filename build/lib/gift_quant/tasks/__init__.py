"""lm-eval task templates (YAML), installed as the package data of gift_quant.tasks."""
