"""Training: PEFT method builders, one stage (prepare, fit, save), its step plan, progress and
memory, merging and saving, regularizers."""
