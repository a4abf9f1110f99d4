"""What every unlearning method sees and returns: encoded forget/retain data in, an edited model (in place) out.

A method is a small class behind :data:`mip_core.editing.methods.METHODS`. It edits ``model`` in place and
returns an :class:`EditSummary`; the caller saves the model as a plain HF checkpoint. Methods never read the
benchmark themselves: they get :class:`UnlearnData` (examples encoded with their answers, labels on the answer
span only), so the same code serves the benchmark, forget requests and tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from mip_core.errors import InputError
from mip_core.modeling.inputs import collate

Log = Callable[[str], None]


@dataclass(frozen=True)
class UnlearnData:
    """Encoded examples (``mip_core.modeling.encode`` with the answer): ``labels`` cover the answer span only.

    ``forget_modality`` / ``retain_modality`` give each example's modality (``"multimodal"`` or ``"text"``), in
    the same order, for methods that treat modalities apart (MANU) and for per-modality logs.
    ``forget_requests`` gives each forget example's request id (per-request paths and targets); in the benchmark
    each forget person is one request.
    ``forget_options`` gives each forget example's multiple-choice options, encoded like the example (each with
    its option as the answer), and the index of the right one; ``((), -1)`` for a free-form item. RMisU's
    ``check="choice"`` measures forgetting by them against chance (``rmisu.still_known``).
    ``forget_earlier`` marks the forget examples of people an earlier edit already forgot (the service's earlier
    versions of a lineage). They are not forgotten again by default: RMisU's check watches them apart, and its
    forget term takes the items of those a check finds known again (``run_rmisu``). Methods without a check
    forget them along with the rest; a per-request edit (``EditConfig.per_request``) leaves them out.
    """

    forget: Sequence[dict[str, Tensor]]
    retain: Sequence[dict[str, Tensor]]
    pad_token_id: int
    forget_modality: Sequence[str] = ()
    retain_modality: Sequence[str] = ()
    forget_requests: Sequence[str] = ()
    forget_options: Sequence[tuple[Sequence[dict[str, Tensor]], int]] = ()
    forget_earlier: Sequence[bool] = ()

    def __post_init__(self) -> None:
        if not self.forget:
            raise InputError("nothing to forget: the forget set is empty; pick a forget split or request items")
        for name, examples in (("forget_modality", self.forget), ("retain_modality", self.retain),
                               ("forget_requests", self.forget), ("forget_options", self.forget),
                               ("forget_earlier", self.forget)):
            values = getattr(self, name)
            if values and len(values) != len(examples):
                raise InputError(f"UnlearnData.{name} has {len(values)} entries for {len(examples)} examples")

    def options(self) -> list[tuple[Sequence[dict[str, Tensor]], int]]:
        """``forget_options``, or every example free-form (``((), -1)``) where none were given."""
        return list(self.forget_options) or [((), -1)] * len(self.forget)

    def request_ids(self) -> list[str]:
        """The distinct request ids of the forget examples, in first-seen order."""
        if not self.forget_requests:
            raise InputError("per-request editing needs each forget example's request id "
                             "(UnlearnData.forget_requests); build the data with unlearn_data(..., requests=...)")
        return list(dict.fromkeys(self.forget_requests))

    def only_request(self, request_id: str) -> UnlearnData:
        """The same data with only ``request_id``'s forget examples (the retain set unchanged)."""
        return self.only_forget([i for i, r in enumerate(self.forget_requests) if r == request_id])

    def only_forget(self, keep: Sequence[int]) -> UnlearnData:
        """The same data with only the forget examples at positions ``keep`` (the retain set unchanged)."""

        def pick(seq: Sequence[Any]) -> Sequence[Any]:
            return [seq[i] for i in keep] if seq else ()

        return replace(self, forget=pick(self.forget), forget_modality=pick(self.forget_modality),
                       forget_requests=pick(self.forget_requests), forget_options=pick(self.forget_options),
                       forget_earlier=pick(self.forget_earlier))


@dataclass(frozen=True)
class EditSummary:
    """What a method did: how many parameters it changed, its loss curve, and anything else worth logging."""

    method: str
    trainable_parameters: int  # parameters the optimiser (or the pruning) touched
    steps: int = 0
    seconds: float = 0.0
    curve: tuple[dict[str, float], ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "trainable_parameters": self.trainable_parameters, "steps": self.steps,
                "seconds": self.seconds, "curve": list(self.curve), "details": self.details}


def batches(examples: Sequence[dict[str, Tensor]], batch_size: int, pad_token_id: int, rng: random.Random
            ) -> Iterator[dict[str, Tensor]]:
    """An endless stream of right-padded batches drawn with replacement (the research code's pairing rule)."""
    if not examples:
        raise InputError("cannot draw batches from an empty set of examples")
    while True:
        yield collate([examples[rng.randrange(len(examples))] for _ in range(batch_size)], pad_token_id)
