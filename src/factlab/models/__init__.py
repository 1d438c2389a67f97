"""Model loading, layer-group targets, saving and merging."""
