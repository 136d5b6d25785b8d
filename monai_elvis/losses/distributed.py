"""The features of every rank for the cross-sample losses, under ``torch.distributed``.

A contrastive loss over the batch (:class:`~monai_elvis.losses.GlobalContrastiveLoss`,
:class:`~monai_elvis.losses.GloriaLocalLoss`) sees, on each rank of a data-parallel run, only that rank's share of
the batch unless the features of the other ranks are gathered. :func:`gather_across_ranks` gathers them with
their gradient (``torch.distributed.nn.functional.all_gather``: its backward sums, over the ranks, the gradients
that every rank's loss sends to a rank's features).

How the losses use it: each rank scores *its own* rows (its images against every report, its reports against
every image) and returns ``world_size * (sum of its rows' losses) / global_batch``, so that the mean of the ranks'
losses is the one-process loss of the concatenated batch. DDP averages the gradients over the ranks; since the
gathered features carry the other ranks' gradients back, the averaged gradient of every parameter is then the
one-process gradient: no further scaling. With equal batches on every rank the returned loss is simply the mean
over the rank's rows.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["distributed_world", "gather_across_ranks"]


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pad_to(x: torch.Tensor, shape: list[int], value: float | bool) -> torch.Tensor:
    """``x`` padded at the end of every dimension to ``shape``."""
    pad = []
    for have, want in zip(reversed(x.shape), reversed(shape)):
        pad += [0, want - have]
    return F.pad(x, pad, value=value) if any(pad) else x


def gather_across_ranks(x: torch.Tensor, pad_value: float | bool = 0) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` of every rank along the batch dimension; returns ``(gathered, offset)`` with ``offset``
    the index of this rank's first row in ``gathered``.

    The ranks' tensors may differ in every dimension (batch size, words per report): each is padded to the
    largest size of every dimension but the first with ``pad_value`` (a padding mask gathered alongside with
    ``False``). A tensor that requires a gradient is gathered with it; others (masks) without. Without a process
    group (or with one rank) ``x`` is returned as it is, with offset 0.
    """
    rank, world = distributed_world()
    if world == 1:
        return x, 0
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes = [s.tolist() for s in shapes]
    largest = [max(s[d] for s in shapes) for d in range(x.ndim)]
    transport = x.to(torch.uint8) if x.dtype == torch.bool else x
    padded = _pad_to(transport, largest, pad_value).contiguous()
    if x.requires_grad:
        import torch.distributed.nn.functional as dist_fn

        with warnings.catch_warnings():  # torch 2.13 marks it deprecated for a private successor; it still works
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
            pieces = list(dist_fn.all_gather(padded))
    else:
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded)
    gathered = torch.cat([p[: s[0]] for p, s in zip(pieces, shapes)])
    if x.dtype == torch.bool:
        gathered = gathered.bool()
    return gathered, sum(s[0] for s in shapes[:rank])
