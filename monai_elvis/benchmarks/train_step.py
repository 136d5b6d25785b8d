"""Per-step time breakdown of ELVIS pre-training (data, forward, loss, backward+update) on this machine, in one
process or in a data-parallel run of several CPU processes (gloo), where it also times the all-gathers of the
cross-sample losses."""

from __future__ import annotations

import gc
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.data import DataLoader, Dataset, load_decathlon_datalist

from monai_elvis.benchmarks.transforms import pretraining_transforms
from monai_elvis.data import collate_reports
from monai_elvis.engines import ResumableSampler, ensure_tokenizer, prepare_vlp_batch
from monai_elvis.losses import ElvisLoss, LocalAlignmentLoss
from monai_elvis.networks import CXRImageEncoder, ElvisNet, ReportTextEncoder

__all__ = ["SCALES", "run_train_step_benchmark", "GatherClock"]

# name -> (image arch, widen factor, image size, BERT config, batch)
SCALES = {
    "tiny": ("resnet18", 0.125, 128, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=128), 32),
    "paper": ("resnet50", 1.0, 224, dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                          intermediate_size=3072), 16),
}  # fmt: skip


class _Stamp(torch.autograd.Function):
    """The identity; its backward notes the time, around the backward of an autograd all-gather."""

    @staticmethod
    def forward(ctx, x, clock, before):
        ctx.clock, ctx.before = clock, before
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        now = time.perf_counter()
        if ctx.before:  # the gather's input: its backward has run
            ctx.clock.backward += now - ctx.clock._outputs_done
        else:  # a gathered piece: the gather's backward starts after the last of them
            ctx.clock._outputs_done = now
        return grad, None, None


class GatherClock:
    """Wall time spent in the all-gathers of :func:`~monai_elvis.losses.gather_across_ranks` while installed:
    ``forward`` (every ``torch.distributed.all_gather`` call: sizes, masks and features, including the wait for
    the slowest rank) and ``backward`` (the backward of the autograd all-gathers, from the last gathered piece's
    gradient to the input's)."""

    def __init__(self) -> None:
        self.forward = 0.0
        self.backward = 0.0
        self._outputs_done = 0.0
        self._saved = None

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.nn.functional as dist_fn

        plain, with_grad = dist.all_gather, dist_fn.all_gather
        self._saved = (plain, with_grad)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return plain(*args, **kwargs)
            finally:
                self.forward += time.perf_counter() - t0

        def stamped(tensor, *args, **kwargs):
            pieces = with_grad(_Stamp.apply(tensor, self, True), *args, **kwargs)
            return tuple(_Stamp.apply(p, self, False) for p in pieces)

        dist.all_gather, dist_fn.all_gather = timed, stamped

    def uninstall(self) -> None:
        import torch.distributed as dist
        import torch.distributed.nn.functional as dist_fn

        if self._saved is not None:
            dist.all_gather, dist_fn.all_gather = self._saved
            self._saved = None

    def reset(self) -> None:
        self.forward = self.backward = 0.0


def _time_scale(name: str, files: list, tok: str, steps: int, batch: int | None, rank: int = 0,
                world_size: int = 1) -> dict:  # fmt: skip
    """Time ``steps`` steps after one warm-up step; with ``world_size > 1`` inside a process group (DDP)."""
    arch, widen, size, bert, default_batch = SCALES[name]
    b = batch or default_batch
    torch.manual_seed(0)
    net = ElvisNet(CXRImageEncoder(arch, 1, widen), ReportTextEncoder(config={**bert, "vocab_size": 4096}))
    objective = ElvisLoss(local_loss=LocalAlignmentLoss("intra_modal"))  # gathers under DDP (the default)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    model = net
    clock = None
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)
        clock = GatherClock()
    dataset = Dataset(files, pretraining_transforms(tok, size, 96))
    sampler = ResumableSampler(dataset, shuffle=True, seed=0)  # one process, or this rank's share
    loader = DataLoader(dataset, batch_size=b, sampler=sampler, num_workers=0, collate_fn=collate_reports,
                        drop_last=True)  # fmt: skip
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} training pairs over {world_size} process(es) give no batch of {b}.")
    it = iter(loader)
    totals = {"data": 0.0, "forward": 0.0, "loss": 0.0, "backward": 0.0, "gather": 0.0}
    if clock is not None:
        clock.install()
    try:
        for i in range(steps + 1):
            t0 = time.perf_counter()
            try:
                batch_data = next(it)
            except StopIteration:
                it = iter(loader)
                batch_data = next(it)
            image, _, _, text = prepare_vlp_batch(batch_data)
            t1 = time.perf_counter()
            if clock is not None:
                clock.reset()
            out = model(image, **text)
            t2 = time.perf_counter()
            loss = objective(out)["loss"]
            t3 = time.perf_counter()
            opt.zero_grad()
            loss.backward()
            opt.step()
            t4 = time.perf_counter()
            gather = 0.0 if clock is None else clock.forward + clock.backward
            if i:  # the first step warms up
                for k, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, gather)):
                    totals[k] += dt * 1000 / steps
    finally:
        if clock is not None:
            clock.uninstall()
    step = sum(v for k, v in totals.items() if k != "gather")  # the gathers are inside the loss and backward
    return {"scale": name, "world_size": world_size, "batch": b, "image_size": size,
            **{f"{k}_ms": round(v, 1) for k, v in totals.items() if k != "gather"}, "step_ms": round(step, 1),
            "loss_share": round(totals["loss"] / step, 4), "gather_ms": round(totals["gather"], 2),
            "gather_share": round(totals["gather"] / step, 4)}  # fmt: skip


def _rank_worker(rank: int, port: int, world_size: int, scales, steps: int, batch: int | None, files: list, tok: str,
                 out: str) -> None:  # fmt: skip
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        records = [_time_scale(name, files, tok, steps, batch, rank, world_size) for name in scales]
        gc.collect()  # the DDP reducers built around the group go while the interpreter is whole
        dist.barrier()  # and no rank tears the group down while another still works
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(records))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train_step_benchmark(scales=("tiny", "paper"), steps: int = 3, batch: int | None = None,
                             progress: Callable[[str], None] | None = None, world_size: int = 1) -> list[dict]:  # fmt: skip
    """Time ``steps`` optimisation steps per scale (after one warm-up step) on phantom data; one record per scale:
    ``{"scale", "world_size", "batch", "image_size", "data_ms", "forward_ms", "loss_ms", "backward_ms", "step_ms",
    "loss_share", "gather_ms", "gather_share"}`` (the paper scale uses a BERT-base-size encoder built from its
    config, randomly initialised).

    With ``world_size > 1`` the steps run in that many CPU processes (gloo, one thread each) under DDP, with the
    default objective gathering the global features of every rank; ``batch`` is per process, the record is rank 0's,
    and ``gather_ms`` is the time inside those all-gathers (:class:`GatherClock`), forward and backward, which the
    loss and backward times include. In one process ``gather_ms`` is 0."""
    from monai_elvis.data.phantom import prepare_phantom

    say = progress or (lambda _m: None)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "phantom"
        say("preparing a small phantom")
        prepare_phantom(data_dir, num=96, size=256, workers=1)
        tok = ensure_tokenizer(Path(tmp) / "tok", data_dir / "datalist.json", vocab_size=4096)
        files = load_decathlon_datalist(data_dir / "datalist.json", True, "training", base_dir=data_dir)
        if world_size <= 1:
            records = []
            for name in scales:
                records.append(_time_scale(name, files, tok, steps, batch))
                say(f"{name}: {records[-1]}")
            return records
        import torch.multiprocessing as mp

        say(f"{world_size} gloo processes")
        mp.start_processes(_rank_worker, args=(_free_port(), world_size, tuple(scales), steps, batch, files, str(tok),
                                               tmp), nprocs=world_size, start_method="spawn", join=True)  # fmt: skip
        records = json.loads(Path(tmp, "rank0.json").read_text())
        for rec in records:
            say(f"{rec['scale']}: {rec}")
        return records
