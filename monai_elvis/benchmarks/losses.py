"""Forward and forward+backward time of the pre-training objectives on one CPU thread."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from monai_elvis.keys import OutKeys
from monai_elvis.losses import ElvisLoss, GlobalContrastiveLoss, GloriaLocalLoss, LocalAlignmentLoss

__all__ = ["LOSS_NAMES", "gloria_local_loop", "run_loss_benchmark"]

LOSS_NAMES = ("one_hot_local", "spatial_local", "elvis_local", "gloria_local", "gloria_local_loop", "elvis_total")


def gloria_local_loop(
    words: torch.Tensor, regions: torch.Tensor, word_mask: torch.Tensor, loss: GloriaLocalLoss
) -> torch.Tensor:
    """The per-sample formulation (one report at a time against every image, as in GLoRIA's published code),
    with the word contexts materialised: the baseline that :class:`GloriaLocalLoss` vectorises."""
    b = words.shape[0]
    sims = []
    for j in range(b):
        w = words[j][word_mask[j]]  # [T_j, d]
        scores = torch.einsum("td,ind->itn", w, regions)  # [B, T_j, N]
        attn = torch.softmax(scores * loss.attention_scale, dim=-1)
        context = torch.bmm(attn, regions)  # [B, T_j, d]
        z = F.cosine_similarity(context, w.unsqueeze(0).expand_as(context), dim=-1)  # [B, T_j]
        sims.append(torch.logsumexp(z * loss.word_scale, dim=1) / loss.word_scale)  # [B]
    logits = torch.stack(sims, dim=1) * loss.similarity_scale  # [B_image, B_text]
    target = torch.arange(b)
    return loss.image_to_text_weight * F.cross_entropy(logits, target) + loss.text_to_image_weight * F.cross_entropy(
        logits.T, target
    )


def _inputs(batch: int, grid: int, dim: int, units: int, words: int, seed: int = 0) -> dict[str, torch.Tensor]:
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
        OutKeys.SENTENCE_MASK: sentence_mask,
        OutKeys.TOKEN_MASK: word_mask,
        OutKeys.IMAGE_GRID: (grid, grid),
    }


def _loss_fn(name: str, x: dict) -> Callable[[], torch.Tensor]:
    if name.endswith("_local") and not name.startswith("gloria"):
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
    if name == "gloria_local":
        gloria = GloriaLocalLoss()
        return lambda: gloria(x[OutKeys.TEXT_TOKEN], x[OutKeys.IMAGE_LOCAL], x[OutKeys.TOKEN_MASK])
    if name == "gloria_local_loop":
        gloria = GloriaLocalLoss()
        return lambda: gloria_local_loop(x[OutKeys.TEXT_TOKEN], x[OutKeys.IMAGE_LOCAL], x[OutKeys.TOKEN_MASK], gloria)
    if name == "elvis_total":
        total = ElvisLoss(GlobalContrastiveLoss(), LocalAlignmentLoss(target="intra_modal"))
        return lambda: total(x)["loss"]
    raise ValueError(f"unknown loss {name!r}; choose from {LOSS_NAMES}.")


def _elapsed_ms(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def run_loss_benchmark(
    losses: tuple[str, ...] = LOSS_NAMES,
    batches: tuple[int, ...] = (16, 32),
    grids: tuple[int, ...] = (7, 14),
    dims: tuple[int, ...] = (128, 768),
    sentences: int = 12,
    words: int = 97,
    repeats: int = 5,
    threads: int = 1,
    progress: Callable[[dict], None] | None = None,
    flush_denormal: bool = True,
) -> list[dict]:
    """Time every loss at every shape; one record per (loss, batch, grid, dim).

    Records: ``{"loss", "batch", "regions", "dim", "units", "fwd_ms", "fwd_bwd_ms"}`` with ``regions`` as
    ``"7x7"`` and ``units`` the sentences (words for the GLoRIA rows). Times are the best of ``repeats`` runs, the losses of a shape interleaved, after a warm-up round.

    ``flush_denormal`` flushes denormal floats to zero while it runs (as a CPU training run should: the peaky
    word-region softmax of GLoRIA otherwise produces denormals that slow matrix products down about tenfold).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)
    try:
        return _run(losses, batches, grids, dims, sentences, words, repeats, progress)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)


def _run(losses, batches, grids, dims, sentences, words, repeats, progress) -> list[dict]:
    """Losses of one shape are timed in turn within each repeat (interleaved), so that a slow spell of a
    shared machine hits them alike; the best time of each is kept."""
    records = []
    for batch, grid, dim in itertools.product(batches, grids, dims):
        x = _inputs(batch, grid, dim, sentences, words)
        leaves = [t for t in x.values() if isinstance(t, torch.Tensor) and t.requires_grad]
        fns = {name: _loss_fn(name, x) for name in losses}

        def fwd_bwd(fn):
            for t in leaves:
                t.grad = None
            fn().backward()

        best = {name: [float("inf"), float("inf")] for name in losses}
        for rep in range(repeats + 1):  # the first round is a warm-up
            for name, fn in fns.items():
                f, fb = _elapsed_ms(fn), _elapsed_ms(lambda: fwd_bwd(fn))
                if rep:
                    best[name] = [min(best[name][0], f), min(best[name][1], fb)]
        for name in losses:
            rec = {
                "loss": name,
                "batch": batch,
                "regions": f"{grid}x{grid}",
                "dim": dim,
                "units": words if name.startswith("gloria") else sentences,
                "fwd_ms": round(best[name][0], 3),
                "fwd_bwd_ms": round(best[name][1], 3),
            }
            records.append(rec)
            if progress is not None:
                progress(rec)
    return records
