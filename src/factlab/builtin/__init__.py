"""Data files shipped with factlab (read with importlib.resources)."""
