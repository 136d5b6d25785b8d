"""What a data-parallel (DDP) run needs beyond DDP itself: the loss's own parameters kept equal on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from monai_elvis.losses.distributed import distributed_world

__all__ = ["LossParametersSyncHandler", "average_gradients", "broadcast_parameters"]


def _trainable(module: nn.Module | None) -> list[nn.Parameter]:
    if not isinstance(module, nn.Module):
        return []
    return [p for p in module.parameters() if p.requires_grad]


def average_gradients(parameters: list[torch.Tensor]) -> None:
    """Replace the gradient of each parameter by its mean over the ranks (one all-reduce for all of them; a
    missing gradient counts as zero). No effect without a process group."""
    _, world = distributed_world()
    if world == 1 or not parameters:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    flat.div_(world)
    start = 0
    for p in parameters:
        n = p.numel()
        value = flat[start : start + n].view_as(p)
        if p.grad is None:
            p.grad = value.clone()
        else:
            p.grad.copy_(value)
        start += n


@torch.no_grad()
def broadcast_parameters(parameters: list[torch.Tensor], src: int = 0) -> None:
    """Copy the values of ``parameters`` of rank ``src`` to every rank. No effect without a process group."""
    _, world = distributed_world()
    if world == 1 or not parameters:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in parameters])
    dist.broadcast(flat, src)
    start = 0
    for p in parameters:
        p.copy_(flat[start : start + p.numel()].view_as(p))
        start += p.numel()


class LossParametersSyncHandler:
    """Keep the parameters of ``engine.loss_function`` (a learnable temperature) equal on every rank of a DDP run.

    DDP averages the gradients of the network it wraps; a loss's own parameters, given to the optimizer beside the
    network's, would otherwise step with each rank's own gradient and drift apart. This handler copies their
    values from rank 0 before the first iteration of a run (also a resumed one) and replaces their gradients by the
    mean over the ranks once per optimizer step, just before it (on ``IterationEvents.BACKWARD_COMPLETED``, with
    gradient accumulation only after the last backward pass of the window, as
    :class:`~monai_elvis.engines.GradientClipHandler`; attach it before that handler). The averaged gradient is the
    same bits on every rank, so the optimizer keeps the values bit-identical. Nothing happens in one process.
    """

    def __init__(self) -> None:
        self._synced = False

    def attach(self, engine) -> None:
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(Events.ITERATION_STARTED, self.broadcast)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def broadcast(self, engine) -> None:
        if not self._synced:
            broadcast_parameters(_trainable(getattr(engine, "loss_function", None)))
            self._synced = True

    def __call__(self, engine) -> None:
        from monai_elvis.engines.vlp import GradientClipHandler

        if GradientClipHandler.steps_now(engine):
            average_gradients(_trainable(getattr(engine, "loss_function", None)))
