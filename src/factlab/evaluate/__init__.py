"""Evaluation: probe sets, the one model interface, pure metrics and fact-score aggregation.

``lm.LM`` is the model interface (log-likelihoods of pairs and of whole texts, generation);
``tokens`` turns strings into tokens for it and ``kvcache`` holds the transformers-cache
code of its shared-prompt path. ``facts`` scores probe sets through it, ``perplexity`` and
``generation`` are its function forms. ``probes``, ``metrics`` and ``textmetrics`` import
without torch, so reports can aggregate saved scores cheaply. Import the modules directly.
"""
