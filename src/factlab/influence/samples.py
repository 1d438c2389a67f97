"""The unit of influence: a sample with a prompt and a scored part.

A document is a sample with an empty prompt (its whole text is scored); a Q&A pair or a probe
scores its target given its prompt. `group` tags samples that belong together (the same fact's
phrasings, the same relation, a causal chain) so the distance desideratum can compare inside and
across groups.

A chat sample (``meta["chat"]``: a Q&A pair, a ``qa`` probe) keeps its question as ``prompt``;
:func:`scored_pair` wraps it in the tokenizer's chat template, so samples can be built and
checked before any model or tokenizer is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# What goes between a sample placed in the prompt and the sample scored after it (in-context
# influence): the separator the in-context baseline of `factlab run` uses.
from factlab.evaluate.facts import CONTEXT_SEPARATOR

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase



@dataclass(frozen=True)
class Sample:
    """One row/column of an influence matrix.

    id: unique within a matrix; prompt: the unscored context ("" for a document);
    target: the scored continuation (its leading space included, as probes carry it);
    group: an optional tag (fact id, relation, chain id); meta: anything else a study needs
    (e.g. {"relation": "causes", "noise": 0.1, "clean_id": "s3"}).
    """

    id: str
    prompt: str
    target: str
    group: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def text(self) -> str:
        """The whole sample as one training text (prompt then target)."""
        return self.prompt + self.target

    @property
    def chat(self) -> bool:
        """A chat sample: the prompt is a user question, the target the assistant's answer."""
        return bool(self.meta.get("chat"))


def scored_pair(sample: Sample, tokenizer: PreTrainedTokenizerBase,
                context: str | None = None) -> tuple[str, str]:
    """The (context, continuation) strings the Scorer and the training loss see for ``sample``.

    Plain samples: (prompt, target), with ``context + CONTEXT_SEPARATOR`` before the prompt
    when a context is given. Chat samples: the question (after the context and separator,
    inside the user turn) in the tokenizer's chat template, then the answer. A document (empty
    prompt) scored without context has an empty context string: the Scorer then scores its
    first token after the tokenizer's BOS token (EOS when there is no BOS), and the training
    loss of that document uses the same token sequence (see ``influence.exact.sample_tokens``).
    """
    from factlab.evaluate.scoring import chat_prompt

    if sample.chat:
        question = f"{context}{CONTEXT_SEPARATOR}{sample.prompt}" if context is not None else sample.prompt
        return chat_prompt(tokenizer, question), sample.target
    if context is not None:
        return f"{context}{CONTEXT_SEPARATOR}{sample.prompt}", sample.target
    return sample.prompt, sample.target


def sample_text(sample: Sample) -> str:
    """The sample as plain text, what in-context influence places in the prompt: prompt then
    target; for a chat sample the question, a newline and the answer (no chat template: it
    goes inside the scored sample's own prompt or user turn)."""
    return f"{sample.prompt}\n{sample.target}" if sample.chat else sample.prompt + sample.target
