"""Evaluation: probe sets, the one model interface, pure metrics and fact-score aggregation.

``lm.LM`` is the model interface (log-likelihoods of pairs and of whole texts, generation,
and ``complete``: all of a probe in one pass); ``tokens`` turns strings into tokens for it,
``kvcache`` holds the transformers-cache code of its cached paths and ``decoding`` the
token-by-token loop, the per-prompt seeded sampler and the batch plan. ``facts`` scores
probe sets through it, ``perplexity`` and ``generation`` are its function forms. ``probes``,
``metrics`` and ``textmetrics`` import without torch, so reports can aggregate saved scores
cheaply. Import the modules directly.
"""
