"""Evaluation: probe sets, the one model interface, pure metrics and fact-score aggregation.

``interface`` is the model interface as a contract (``LanguageModel``: log-likelihoods of pairs
and of whole texts, generation, and ``complete``: all of a probe in one pass) with its request
and result types; ``lm.LM`` is its transformers backend, a facade over ``engine`` (the one
cached engine: each prompt runs once, continuations and answers come from its key/value
cache), ``reference`` (every pair whole and transformers' ``generate``: the engine's test
oracle and its fallback) and ``rolling`` (perplexity windows). ``hfmodel`` is what they all
need of a transformers model, ``tokens`` turns strings into tokens for them, ``kvcache`` holds
the transformers-cache code and ``decoding`` the token-by-token loop, the per-prompt seeded
sampler and the batch plan. ``facts`` scores probe sets through ``LM``, ``perplexity`` and
``generation`` are its function forms. ``probes``, ``metrics``, ``textmetrics`` and
``interface`` import without torch, so reports can aggregate saved scores cheaply. Import the
modules directly.
"""
