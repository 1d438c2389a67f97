"""The unit of influence: a sample with a prompt and a scored part.

A document is a sample with an empty prompt (its whole text is scored); a Q&A pair or a probe
scores its target given its prompt. `group` tags samples that belong together (the same fact's
phrasings, the same relation, a causal chain) so the distance desideratum can compare inside and
across groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
