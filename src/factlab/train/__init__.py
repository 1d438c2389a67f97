"""Training stages: PEFT method builders and the stage runner (transformers Trainer underneath)."""
