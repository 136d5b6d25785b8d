"""Forward and forward+backward time of the pre-training objectives on one CPU thread, against reference
implementations of the published math (:mod:`monai_elvis.benchmarks.references`)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import torch

from monai_elvis.benchmarks.references import (
    gloria_code_reference,
    gloria_paper_reference,
    lovt_reference,
    unit_pair_products,
    word_region_score_products,
)
from monai_elvis.keys import OutKeys
from monai_elvis.losses import ElvisLoss, GlobalContrastiveLoss, GloriaLocalLoss, LocalAlignmentLoss

__all__ = ["LOSS_NAMES", "LOSS_DESCRIPTIONS", "run_loss_benchmark"]

LOSS_DESCRIPTIONS: dict[str, str] = {
    "gloria_code": "GloriaLocalLoss(form='code'): GLoRIA's local loss as its released code computes it. "
    "reference: gloria_code_reference (a loop over reports, contexts materialised); "
    "floor: the word-region score products of all B^2 pairs, forward and backward, as three plain matmuls",
    "gloria_paper": "GloriaLocalLoss(form='paper'): GLoRIA's local loss as its paper writes it. "
    "reference: gloria_paper_reference; floor as gloria_code",
    "lovt": "ElvisLoss of configs/objective/lovt.json with attention-pooling unit weights: LoVT's full objective "
    "(l2att and att2l of regions and sentences, 0.375 each, from one shared product per modality; global InfoNCE "
    "0.75 / 0.25). reference: lovt_reference (LoVT's code math); floor: the within-sample score products of "
    "regions and of sentences, forward and backward, as three plain batched matmuls each",
    "one_hot_local": "LocalAlignmentLoss('one_hot'), local -> attended only; no reference",
    "spatial_local": "LocalAlignmentLoss('spatial'), local -> attended only; no reference",
    "elvis_local": "LocalAlignmentLoss('intra_modal'), local -> attended only; no reference",
    "elvis_total": "ElvisLoss(GlobalContrastiveLoss(), LocalAlignmentLoss('intra_modal')); no reference",
}
LOSS_NAMES = tuple(LOSS_DESCRIPTIONS)
_REFERENCES = ("gloria_code", "gloria_paper", "lovt")


def _inputs(batch: int, grid: int, dim: int, units: int, words: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = grid * grid

    def r(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    sentence_mask = torch.ones(batch, units, dtype=torch.bool)
    sentence_mask[::2, units // 2 :] = False  # half of the reports have half the sentences
    word_mask = torch.ones(batch, words, dtype=torch.bool)
    word_mask[::2, words // 2 :] = False
    return {
        OutKeys.IMAGE_LOCAL: r(batch, n, dim),
        OutKeys.IMAGE_LOCAL_ATTENDED: r(batch, n, dim),
        OutKeys.IMAGE_LOCAL_PRE: r(batch, n, dim),
        OutKeys.IMAGE_GLOBAL: r(batch, dim),
        OutKeys.TEXT_SENTENCE: r(batch, units, dim),
        OutKeys.TEXT_SENTENCE_ATTENDED: r(batch, units, dim),
        OutKeys.TEXT_SENTENCE_PRE: r(batch, units, dim),
        OutKeys.TEXT_GLOBAL: r(batch, dim),
        OutKeys.TEXT_TOKEN: r(batch, words, dim),
        OutKeys.IMAGE_LOCAL_WEIGHTS: torch.softmax(torch.randn(batch, n, generator=g), dim=1),
        OutKeys.TEXT_SENTENCE_WEIGHTS: torch.softmax(torch.randn(batch, units, generator=g), dim=1),
        OutKeys.SENTENCE_MASK: sentence_mask,
        OutKeys.TOKEN_MASK: word_mask,
        OutKeys.IMAGE_GRID: (grid, grid),
    }


def lovt_objective() -> ElvisLoss:
    """LoVT's full objective as ``configs/objective/lovt.json`` builds it, with attention-pooling unit weights."""
    return ElvisLoss(
        GlobalContrastiveLoss(0.1, image_to_text_weight=0.75, text_to_image_weight=0.25),
        LocalAlignmentLoss("spatial", temperature=0.3, spatial_threshold=0.5, spatial_smoothing=1.0,
                           region_weight=0.375, sentence_weight=0.375, directions="both",
                           unit_weights="attention_pooling"),
    )  # fmt: skip


def _loss_fn(name: str, x: dict) -> Callable[[], torch.Tensor]:
    if name in ("one_hot_local", "spatial_local", "elvis_local"):
        target = {"one_hot_local": "one_hot", "spatial_local": "spatial", "elvis_local": "intra_modal"}[name]
        loss = LocalAlignmentLoss(target=target)
        return lambda: loss(
            x[OutKeys.IMAGE_LOCAL],
            x[OutKeys.IMAGE_LOCAL_ATTENDED],
            x[OutKeys.TEXT_SENTENCE],
            x[OutKeys.TEXT_SENTENCE_ATTENDED],
            x[OutKeys.SENTENCE_MASK],
            x[OutKeys.IMAGE_LOCAL_PRE],
            x[OutKeys.TEXT_SENTENCE_PRE],
            grid_size=x[OutKeys.IMAGE_GRID],
        )
    if name in ("gloria_code", "gloria_paper"):
        gloria = GloriaLocalLoss(form=name.split("_")[1])
        return lambda: gloria(x[OutKeys.TEXT_TOKEN], x[OutKeys.IMAGE_LOCAL], x[OutKeys.TOKEN_MASK])
    if name == "lovt":
        lovt = lovt_objective()
        return lambda: lovt(x)["loss"]
    if name == "elvis_total":
        total = ElvisLoss(GlobalContrastiveLoss(), LocalAlignmentLoss(target="intra_modal"))
        return lambda: total(x)["loss"]
    raise ValueError(f"unknown loss {name!r}; choose from {LOSS_NAMES}.")


def _reference_fn(name: str, x: dict) -> Callable[[], torch.Tensor]:
    if name in ("gloria_code", "gloria_paper"):
        ref = gloria_code_reference if name == "gloria_code" else gloria_paper_reference
        return lambda: ref(x[OutKeys.TEXT_TOKEN], x[OutKeys.IMAGE_LOCAL], x[OutKeys.TOKEN_MASK])
    return lambda: lovt_reference(
        x[OutKeys.IMAGE_LOCAL], x[OutKeys.IMAGE_LOCAL_ATTENDED], x[OutKeys.TEXT_SENTENCE],
        x[OutKeys.TEXT_SENTENCE_ATTENDED], x[OutKeys.SENTENCE_MASK], x[OutKeys.IMAGE_GLOBAL], x[OutKeys.TEXT_GLOBAL],
        x[OutKeys.IMAGE_GRID], x[OutKeys.IMAGE_LOCAL_WEIGHTS], x[OutKeys.TEXT_SENTENCE_WEIGHTS],
    )  # fmt: skip


def _floor_fn(x: dict) -> Callable[[], None]:
    words = x[OutKeys.TEXT_TOKEN].detach()[x[OutKeys.TOKEN_MASK]]
    regions = x[OutKeys.IMAGE_LOCAL].detach().reshape(-1, words.shape[1])
    grad = torch.randn(words.shape[0], regions.shape[0])
    return lambda: word_region_score_products(words, regions, grad)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def _lovt_floor_fn(x: dict) -> Callable[[], None]:
    keys = ((OutKeys.IMAGE_LOCAL, OutKeys.IMAGE_LOCAL_ATTENDED), (OutKeys.TEXT_SENTENCE, OutKeys.TEXT_SENTENCE_ATTENDED))
    pairs = [(x[a].detach(), x[b].detach(), torch.randn(x[a].shape[0], x[a].shape[1], x[a].shape[1])) for a, b in keys]

    def products() -> None:
        for p in pairs:
            unit_pair_products(*p)

    return products


def _elapsed_ms(fn: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return (clock() - start) * 1000.0


def run_loss_benchmark(
    losses: tuple[str, ...] = LOSS_NAMES,
    batches: tuple[int, ...] = (16, 32),
    grids: tuple[int, ...] = (7, 19),
    dims: tuple[int, ...] = (768,),
    sentences: int = 12,
    words: int = 97,
    repeats: int = 5,
    threads: int = 1,
    progress: Callable[[dict], None] | None = None,
    flush_denormal: bool = True,
    clock: str = "wall",
) -> list[dict]:
    """Time every loss at every shape; one record per (loss, batch, grid, dim).

    Records: ``{"loss", "batch", "regions", "dim", "units", "fwd_ms", "fwd_bwd_ms", "reference_fwd_bwd_ms",
    "speedup", "floor_fwd_bwd_ms"}`` with ``regions`` as ``"7x7"``, ``units`` the sentences (words for the GLoRIA
    rows), ``reference_fwd_bwd_ms`` the time of the row's reference implementation (:data:`LOSS_DESCRIPTIONS`),
    ``speedup`` = reference / ours (forward+backward), and ``floor_fwd_bwd_ms`` the time of the score products
    alone (GLoRIA rows: word-region of all pairs; LoVT rows: within-sample region and sentence pairs); ``None``
    where a row has no reference or floor. Times are the best of
    ``repeats`` runs, everything of a shape interleaved, after a warm-up round.

    ``flush_denormal`` flushes denormal floats to zero while it runs (as a CPU training run should: a peaky
    attention softmax otherwise produces denormals that slow matrix products down about tenfold).

    ``clock``: ``"wall"`` (elapsed time) or ``"cpu"`` (CPU time of the calling thread, which runs all the work with
    one thread: on a machine shared with other jobs it leaves out the time the benchmark waits for a core).
    """
    unknown = set(losses) - set(LOSS_NAMES)
    if unknown:
        raise ValueError(f"unknown losses {sorted(unknown)}; choose from {LOSS_NAMES}.")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {clock!r}.")
    if clock == "cpu" and threads != 1:
        raise ValueError("clock='cpu' measures the calling thread only: use threads=1.")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)
    try:
        return _run(losses, batches, grids, dims, sentences, words, repeats, progress, CLOCKS[clock])
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)


def _run(losses, batches, grids, dims, sentences, words, repeats, progress, clock) -> list[dict]:
    """Everything timed for a shape runs in turn within each repeat (interleaved), so that a slow spell of a
    shared machine hits them alike; the best time of each is kept."""
    records = []
    for batch, grid, dim in itertools.product(batches, grids, dims):
        x = _inputs(batch, grid, dim, sentences, words)
        leaves = [t for t in x.values() if isinstance(t, torch.Tensor) and t.requires_grad]

        def fwd_bwd(fn):
            for t in leaves:
                t.grad = None
            fn().backward()

        timed: dict[str, Callable[[], None]] = {}
        for name in losses:
            fn = _loss_fn(name, x)
            timed[f"{name}:fwd"] = fn
            timed[f"{name}:fwd_bwd"] = lambda fn=fn: fwd_bwd(fn)
            if name in _REFERENCES:
                timed[f"{name}:reference"] = lambda ref=_reference_fn(name, x): fwd_bwd(ref)
        if any(name.startswith("gloria") for name in losses):
            timed["floor"] = _floor_fn(x)
        if "lovt" in losses:
            timed["lovt_floor"] = _lovt_floor_fn(x)
        best = dict.fromkeys(timed, float("inf"))
        for rep in range(repeats + 1):  # the first round is a warm-up
            for key, fn in timed.items():
                ms = _elapsed_ms(fn, clock)
                if rep:
                    best[key] = min(best[key], ms)
        for name in losses:
            ours = best[f"{name}:fwd_bwd"]
            ref = best.get(f"{name}:reference")
            floor = best["floor"] if name.startswith("gloria") else best["lovt_floor"] if name == "lovt" else None
            rec = {
                "loss": name,
                "batch": batch,
                "regions": f"{grid}x{grid}",
                "dim": dim,
                "units": words if name.startswith("gloria") else sentences,
                "fwd_ms": round(best[f"{name}:fwd"], 3),
                "fwd_bwd_ms": round(ours, 3),
                "reference_fwd_bwd_ms": None if ref is None else round(ref, 3),
                "speedup": None if ref is None else round(ref / ours, 2),
                "floor_fwd_bwd_ms": None if floor is None else round(floor, 3),
            }
            records.append(rec)
            if progress is not None:
                progress(rec)
    return records
