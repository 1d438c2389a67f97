"""Training: PEFT method builders, one stage (prepare, fit, save), merging and saving, regularizers."""
