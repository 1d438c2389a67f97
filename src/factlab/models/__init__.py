"""Models: loading (aliases, the embedded GGUF, .gguf files, local folders, hub ids), layer-group
targets per architecture, and GGUF export. Saving and merging trained stages: train.merge."""
