"""A transformers causal LM as the scoring code calls it: what every request needs.

One context-length lookup (``max_positions``), one padding helper (``pad``), one eval-mode
guard (``eval_mode``), one list of stop tokens (``eos_ids``), one gather of scored positions
(``token_scores``) and one forward (``HFModel.forward``, with logits for the last positions
only). The cached engine (``engine``), the reference path (``reference``) and the rolling
windows (``rolling``) all go through it. Works with any Hugging Face causal LM, PEFT-wrapped
or not.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from factlab.evaluate.interface import Generation
from factlab.evaluate.tokens import prefix_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Config attributes that hold a model's context length, as transformers and remote-code
# models name it (GPT-2's n_positions is also reachable as max_position_embeddings).
_LENGTH_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest input ``model`` takes, in tokens, from its config; None if the config
    names no limit (models with relative positions only, such as BLOOM's ALiBi).

    Reads the text decoder's config (``get_text_config``), so a multimodal model such as
    Gemma 3, whose top-level config has no length, gives its language model's. A PEFT
    wrapper's ``config`` is its base model's.
    """
    config = model.config
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config(decoder=True)
    for name in _LENGTH_ATTRS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str,
        device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to one (B, T) tensor and its (B, T) attention mask, on ``side``
    ("left" or "right").

    Done here rather than with ``tokenizer.pad`` so that the shared tokenizer's padding side
    is never mutated and tokenizers without a pad token (GPT-2) work too.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[b, span] = torch.tensor(list(s), dtype=torch.long)
        mask[b, span] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; restore the model's train/eval state after
    (evaluation runs between training stages, which must not find dropout silently off)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids of both the tokenizer and the model's generation config (chat models often stop
    on a turn-end token that only one of them names)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def token_scores(logits: torch.Tensor, spans: Sequence[tuple[int, int, Sequence[int]]],
                 n_rows: int) -> tuple[list[float], list[int]]:
    """Per row of ``logits`` (B, T, V): the sum of the log-probs of its scored tokens and the
    number of them that are not the argmax at their position. ``spans`` lists (row, column,
    tokens): ``tokens[j]`` is scored at ``logits[row, column + j]`` (position p predicts
    token p + 1, so the column is where the first token is predicted)."""
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for row, col, tokens in spans:
        rows += [row] * len(tokens)
        cols += range(col, col + len(tokens))
        targets += tokens
    device = logits.device
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)  # (N,)
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)  # (N,)
    targets_t = torch.tensor(targets, dtype=torch.long, device=device)  # (N,)
    # log_softmax in fp32 over the N scored positions only, not all B*T.
    logprobs = logits[rows_t, cols_t].float().log_softmax(-1)  # (N, V)
    token_lp = logprobs.gather(-1, targets_t[:, None]).squeeze(-1)  # (N,)
    missed = (logprobs.argmax(-1) != targets_t).long()  # (N,)
    sums = torch.zeros(n_rows, dtype=torch.float64, device=device)
    sums.index_add_(0, rows_t, token_lp.double())  # (B,)
    misses = torch.zeros(n_rows, dtype=torch.long, device=device)
    misses.index_add_(0, rows_t, missed)  # (B,)
    return sums.tolist(), misses.tolist()


class HFModel:
    """A causal LM and its tokenizer, with what every request needs of them: where the model
    is, its context length, the padding, prefix and stop ids, the forward, and whether its
    key/value cache can be reused by the cached engine."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        """Where the model's parameters (and so its inputs) are."""
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int | None:
        """The model's context length (``max_positions``); None if unlimited."""
        return max_positions(self.model)

    @property
    def pad_id(self) -> int:
        """Id written at padded positions: masked and never read, so any valid id will do."""
        tok = self.tokenizer
        for tid in (tok.pad_token_id, tok.eos_token_id):
            if tid is not None:
                return tid
        return 0

    @property
    def prefix_id(self) -> int:
        """Token that stands in for an empty context or prompt, so the first token has a
        prediction (BOS, else EOS, as lm-eval does; see tokens.prefix_id)."""
        return prefix_id(self.tokenizer)

    @property
    def stops(self) -> list[int]:
        """The tokens that end a generation (``eos_ids``)."""
        return eos_ids(self.model, self.tokenizer)

    @property
    def base_model(self) -> PreTrainedModel:
        """The transformers model, under a PEFT wrapper if there is one."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @cached_property
    def _forward_params(self) -> Mapping[str, inspect.Parameter]:
        # The class's forward, not the instance's: hooks and wrappers may take **kwargs.
        return inspect.signature(type(self.base_model).forward).parameters

    def forward(self, return_output: bool = False, **inputs):
        """The model's forward, with logits for the last ``logits_to_keep`` positions only
        (all of them for a model without that argument, then sliced). Returns the logits,
        or the whole output."""
        keep = inputs.pop("logits_to_keep", None)
        has_keep = "logits_to_keep" in self._forward_params
        if keep is not None and has_keep:
            # As positions, not as the int: an int slices the hidden states to a strided
            # view, and the lm_head matmul over a strided input rounds differently with the
            # memory layout (two copies of one model disagreed by 1e-5); indexing copies.
            width = inputs["input_ids"].shape[1]
            inputs["logits_to_keep"] = torch.arange(width - keep, width, device=self.device)
        out = self.model(**inputs)
        if keep is not None and not has_keep:
            out.logits = out.logits[:, -keep:]
        return out if return_output else out.logits

    def caches_rows(self) -> bool:
        """Whether the model can continue a left-padded batch from its key/value cache (the
        cached engine; the cache it returns is checked there, ``kvcache.can_extend_rows``).

        Not for PEFT prompt-learning methods (prompt / prefix / P-tuning): they prepend
        virtual tokens or their own cache, so positions and cache would not line up. Not for
        encoder-decoders, nor for a forward without ``past_key_values`` and ``position_ids``
        (explicit positions are what make left padding exact).
        """
        peft_config = getattr(self.model, "active_peft_config", None)
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            return False
        if getattr(self.base_model.config, "is_encoder_decoder", False):
            return False
        params = self._forward_params
        return "past_key_values" in params and "position_ids" in params

    def generation(self, tokens: Sequence[int], ended: bool) -> Generation:
        """A Generation from its new tokens (a last stop token when ``ended``)."""
        text_ids = list(tokens[:-1]) if ended else list(tokens)
        return Generation(text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
                          n_tokens=len(tokens), ended_with_eos=ended)
