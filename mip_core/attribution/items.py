"""Attribute benchmark items: route each to its branch, batch, and report failures per item.

Text-only items go to the language tower (IGI), multimodal items to the vision tower (IFI). Every item given
comes back exactly once, either as an :class:`ItemPath` or as an :class:`ItemFailure`; one bad item never
aborts the others of its batch. Running out of memory is the exception: it says nothing about the items, so it
raises :class:`~mip_core.errors.AttributionOOM` (after retrying a multi-item pass one item at a time) instead of
failing them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mip_core.adapters.base import ModelAdapter
from mip_core.attribution.config import AttributionConfig
from mip_core.attribution.path_search import check_example, path_search
from mip_core.benchmark import Benchmark, Item
from mip_core.errors import AttributionOOM
from mip_core.modeling.inputs import encode
from mip_core.types import ItemFailure, ItemPath, Tower
from mip_core.progress import Progress


class EncodedItem(NamedTuple):
    """One item ready for the path search: its id, the branch it goes to, its encoded example."""

    item_id: str
    tower: Tower
    example: Mapping[str, Tensor]


def tower_for(item: Item) -> Tower:
    """The branch an item is attributed on: multimodal -> vision (IFI), text-only -> language (IGI)."""
    return "vision" if item.modality == "multimodal" else "language"


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the pass did not fit in memory (rather than that an item is bad).

    CUDA raises ``torch.OutOfMemoryError``, Python ``MemoryError``; torch's CPU allocator raises a plain
    ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory"), recognised by its message.
    """
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _named(item_id: str, exc: BaseException) -> str:
    return _with_id(item_id, str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")


def _with_id(item_id: str, text: str) -> str:
    return text if item_id in text else f"item {item_id!r}: {text}"


def attribute_examples(model: nn.Module, adapter: ModelAdapter, items: Sequence[EncodedItem],
                       cfg: AttributionConfig, *, pad_token_id: int,
                       request_ids: Mapping[str, str] | None = None
                       ) -> tuple[list[ItemPath], list[ItemFailure]]:
    """Path search over already encoded items, ``cfg.batch_items`` per pass, grouped by tower.

    Items are validated before batching; a batch that still raises is retried one item at a time, so only the
    item that fails alone is reported. Paths and failures keep the input order.

    Raises:
        AttributionOOM: an item ran out of memory (``torch.OutOfMemoryError`` or ``MemoryError``) in a pass of
            its own; a multi-item pass that runs out is first re-split one item per pass.
    """
    request_ids = request_ids or {}
    order = {it.item_id: i for i, it in enumerate(items)}
    if len(order) != len(items):
        raise ValueError("attribute_examples: item ids must be distinct")
    paths: list[ItemPath] = []
    failures: list[ItemFailure] = []
    ready: dict[Tower, list[EncodedItem]] = {"language": [], "vision": []}
    for it in items:
        if it.tower not in cfg.towers:
            failures.append(ItemFailure(it.item_id, f"item {it.item_id!r} needs the {it.tower} branch, which "
                                                    f"AttributionConfig.towers={cfg.towers} leaves out"))
            continue
        try:
            check_example(adapter, it.example, it.tower, it.item_id)
        except ValueError as exc:
            failures.append(ItemFailure(it.item_id, _named(it.item_id, exc)))
            continue
        ready[it.tower].append(it)

    def run(group: list[EncodedItem], tower: Tower) -> None:
        examples = [it.example for it in group]
        found = path_search(model, adapter, examples, tower, cfg, pad_token_id=pad_token_id)
        for it, nodes in zip(group, found, strict=True):
            paths.append(ItemPath(it.item_id, request_ids.get(it.item_id), tower, tuple(nodes)))

    def alone(it: EncodedItem, tower: Tower) -> None:
        outcome = _try(lambda: run([it], tower))
        if outcome is not None and outcome[0] == "oom":
            raise AttributionOOM(_oom_message(it.item_id, tower, model, outcome[1], cfg.batch_items))
        if outcome is not None:
            failures.append(ItemFailure(it.item_id, _with_id(it.item_id, outcome[1])))

    with Progress(sum(len(ready[t]) for t in cfg.towers), "attribution", unit="item") as bar:
        for tower in cfg.towers:
            group_all = ready[tower]
            for start in range(0, len(group_all), cfg.batch_items):
                group = group_all[start:start + cfg.batch_items]
                # a bad item or a pass too big for memory: again, one item per pass
                if len(group) == 1 or _try(lambda g=group, t=tower: run(g, t)) is not None:
                    for it in group:
                        alone(it, tower)
                bar.update(len(group))
    paths.sort(key=lambda p: order[p.item_id])
    failures.sort(key=lambda f: order[f.item_id])
    return paths, failures


def _try(call: Callable[[], None]) -> tuple[str, str] | None:
    """Run one pass: None when it ran, else ``("oom" | "error", text)``.

    Only text leaves here, so the failed pass's traceback (whose frames hold its activations) is gone, and the
    cached CUDA blocks are released, before any retry.
    """
    try:
        call()
        return None
    except (Exception, MemoryError) as exc:  # noqa: BLE001 - a bad item is isolated by the caller
        if out_of_memory(exc):
            outcome = ("oom", f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
        else:
            outcome = ("error", str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
    _release_memory()
    return outcome


def _release_memory() -> None:
    """Hand cached CUDA blocks back after a failed pass, so the retry starts from the weights alone."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _oom_message(item_id: str, tower: Tower, model: nn.Module, error: str, batch_items: int) -> str:
    devices = sorted({str(p.device) for p in model.parameters()})
    return (f"attribution ran out of memory on item {item_id!r} ({tower} branch) alone in its pass, on "
            f"device(s) {', '.join(devices)}: {error}. It was not scored (not an item failure). "
            f"Fix: give each attribution actor more memory (raise gpus_per_actor so the model spreads over more "
            f"GPUs), or lower AttributionConfig.batch_items (now {batch_items}) / steps; then rerun the batch")


def attribute_items(model: nn.Module, adapter: ModelAdapter, processor: Any, bench: Benchmark,
                    items: Sequence[Item], cfg: AttributionConfig | None = None, *,
                    request_ids: Mapping[str, str] | None = None, tower: Tower | None = None
                    ) -> tuple[list[ItemPath], list[ItemFailure]]:
    """Influential neuron paths of benchmark items (docs/method.md sections 2, 3).

    Args:
        bench: where multimodal items' images are read (``bench.load_image``).
        items: forget (or retain) items; their ids must be distinct.
        request_ids: ``item_id -> request id`` recorded on each path for lineage.
        tower: force one branch for every item instead of routing by modality (a text-only item on the
            vision branch is then reported as a failure).

    Returns:
        ``(paths, failures)``: each item appears in exactly one of them, in input order.

    >>> paths, failures = attribute_items(model, get_adapter(model), processor, bench,
    ...                                   bench.split_items("forget"), AttributionConfig(top_k=5))
    """
    cfg = cfg or AttributionConfig()
    ids = [it.item_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("attribute_items: item ids must be distinct")
    encoded: list[EncodedItem] = []
    failures: list[ItemFailure] = []
    for it in items:
        branch = tower or tower_for(it)
        if branch == "vision" and it.image is None:
            failures.append(ItemFailure(it.item_id, f"item {it.item_id!r} has no image; the vision branch "
                                                    "needs a multimodal item"))
            continue
        try:
            image = bench.load_image(it) if it.image is not None else None
            example = encode(processor, it.question, image, it.answer, item_id=it.item_id)
        except Exception as exc:  # noqa: BLE001 - a bad item is reported, the others continue
            failures.append(ItemFailure(it.item_id, _named(it.item_id, exc)))
            continue
        encoded.append(EncodedItem(it.item_id, branch, example))
    pad_token_id = int(processor.tokenizer.pad_token_id)
    paths, more = attribute_examples(model, adapter, encoded, cfg, pad_token_id=pad_token_id,
                                     request_ids=request_ids)
    order = {item_id: i for i, item_id in enumerate(ids)}
    return paths, sorted(failures + more, key=lambda f: order[f.item_id])
