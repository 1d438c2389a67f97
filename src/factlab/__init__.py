"""factlab: teach a local LLM new facts by fine-tuning, and measure whether they stuck."""

__version__ = "0.1.0"
