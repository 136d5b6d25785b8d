"""Data-parallel pre-training keeps its objective and resumes mid-epoch: 2 gloo processes (spawned, CPU).

- The DDP loss (mean over the ranks) and the gradient of every parameter equal those of one process on the
  concatenated batch, for the ELVIS, LoVT, GLoRIA and ConVIRT objectives as the bundle's configs build them.
- A learnable temperature ends bit-identical on both ranks after optimizer steps (and drifts apart without the
  synchronisation, so the check has teeth).
- A 2-process run killed (SIGKILL) in the middle of an epoch, after an iteration checkpoint, resumes from it: it
  replays none of the steps in the checkpoint, takes the batches an uninterrupted run takes, and ends with the
  same weights.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "bundles" / "elvis_pretrain" / "configs" / "train.json"
OBJECTIVES = ["elvis", "lovt", "gloria", "convirt"]
WORLD = 2
PER_RANK = 4
TEXT = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 32}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    """Run ``fn(rank, *args)`` in 2 spawned processes with a gloo process group."""
    mp.start_processes(_entry, args=(fn, _free_port(), *args), nprocs=WORLD, start_method="spawn", join=True)


def _entry(rank: int, fn, port: int, *args) -> None:
    """One rank: ``fn``, then a barrier, so that no rank tears its process group down while another still works,
    and a garbage collection, so that what ``fn`` built around the group (DDP's reducer, the trainer's handler
    cycles) is freed while the interpreter is whole, before the group goes. A rank that aborts (a C++ ``terminate``)
    prints where it was (``faulthandler``)."""
    import faulthandler
    import gc

    faulthandler.enable()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ objectives under DDP vs one process
def _bundle_parts(objective: str, **updates):
    """The network and the objective as the pre-training bundle builds them (objective overlay), tiny."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(TRAIN), str(ROOT / "configs" / "objective" / f"{objective}.json")])
    parser.update({"vocab_size": TEXT["vocab_size"], "text_config": TEXT, "embed_dim": 16, **updates})
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("objective")


def _batch(b: int = WORLD * PER_RANK, length: int = 12, size: int = 32):
    """Images and tokenised reports; later reports are longer (more words and sentences), so that the ranks'
    word tensors differ in size and GLoRIA's gather pads them."""
    g = torch.Generator().manual_seed(1)
    image = torch.randn(b, 1, size, size, generator=g)
    ids = torch.randint(5, 100, (b, length), generator=g)
    mask = torch.zeros(b, length, dtype=torch.long)
    sidx = torch.full((b, length), -1)
    widx = torch.full((b, length), -1)
    for k in range(b):
        n = 2 + k  # tokens after [CLS]
        mask[k, : n + 2] = 1  # [CLS], the tokens, [SEP]
        sidx[k, 1 : 1 + n] = torch.arange(n) // 3
        widx[k, 0] = 0
        widx[k, 1 : 1 + n] = torch.arange(n) // 2 + 1
    return image, {"input_ids": ids, "attention_mask": mask, "sentence_index": sidx, "word_index": widx}


def _no_gather(objective):
    objective = copy.deepcopy(objective)
    for m in objective.modules():
        if isinstance(getattr(m, "gather", None), bool):
            m.gather = False
    return objective


def _grads(net, objective) -> dict[str, torch.Tensor]:
    named = list(net.named_parameters()) + [(f"loss.{n}", p) for n, p in objective.named_parameters()]
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone() for n, p in named}


def _mean(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value)
    return float(value / WORLD)


def _objectives_worker(rank: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from monai_elvis.engines import LossParametersSyncHandler
    from monai_elvis.losses import gather_across_ranks

    results = {}
    # the gather itself: tensors of other sizes on each rank, padded, in rank order, with the gradient
    x = torch.full((2 + rank, 3 + 2 * rank), float(rank + 1), requires_grad=True)
    gathered, offset = gather_across_ranks(x, pad_value=-1.0)
    (gathered * (torch.arange(gathered.shape[0]) + 1.0)[:, None]).sum().backward()
    results["gather"] = {"gathered": gathered.detach(), "offset": offset, "grad": x.grad}

    image, text = _batch()
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    cases = {name: {} for name in OBJECTIVES}
    cases["convirt_learnable_temperature"] = {"objective#global_loss#learnable_temperature": True}
    for case, updates in cases.items():
        torch.manual_seed(0)
        net, objective = _bundle_parts(case.split("_")[0], **updates)
        net.eval()  # no dropout; batch norm from its running statistics (DDP does not sync batch statistics)
        reference_net, reference = copy.deepcopy(net), _no_gather(objective)
        words = {} if case == "gloria" else {"word_index": None}
        ddp = DDP(net, find_unused_parameters=True)
        out = ddp(image[part], **{**{k: v[part] for k, v in text.items()}, **words})
        loss = objective(out)["loss"]
        loss.backward()
        LossParametersSyncHandler()(SimpleNamespace(loss_function=objective))  # as the bundle's trainer does
        with torch.no_grad():
            own_batch_only = _no_gather(objective)(out)["loss"]
        reference_out = reference_net(image, **{**text, **words})
        reference_loss = reference(reference_out)["loss"]
        reference_loss.backward()
        results[case] = {"loss": _mean(loss), "loss_own_batch_only": _mean(own_batch_only),
                         "reference_loss": float(reference_loss), "grads": _grads(net, objective),
                         "reference_grads": _grads(reference_net, reference)}  # fmt: skip

    # a learnable temperature after optimizer steps on different data per rank, with and without the sync
    for sync in (True, False):
        torch.manual_seed(0)
        net, objective = _bundle_parts("convirt", **{"objective#global_loss#learnable_temperature": True})
        net.eval()
        ddp = DDP(net, find_unused_parameters=True)
        handler = LossParametersSyncHandler()
        engine = SimpleNamespace(loss_function=objective)
        optimizer = torch.optim.AdamW(list(net.parameters()) + list(objective.parameters()), lr=0.05)
        for step in range(3):
            rows = slice((rank + step) % WORLD * PER_RANK, ((rank + step) % WORLD + 1) * PER_RANK)
            if sync:
                handler.broadcast(engine)
            optimizer.zero_grad()
            objective(ddp(image[rows], **{k: v[rows] for k, v in text.items() if k != "word_index"}))["loss"].backward()
            if sync:
                handler(engine)
            optimizer.step()
            objective.global_loss.clamp_parameters_()
        scales = [torch.empty(1) for _ in range(WORLD)]
        dist.all_gather(scales, objective.global_loss.log_logit_scale.detach().reshape(1))
        weight = next(net.text_global_head.parameters()).detach().contiguous()
        weights = [torch.empty_like(weight) for _ in range(WORLD)]
        dist.all_gather(weights, weight)
        results[f"temperature_sync={sync}"] = {"scales": scales, "weights": weights}
    torch.save(results, Path(out_dir) / f"objectives_rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _spawn(_objectives_worker, str(out))
    return [torch.load(out / f"objectives_rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_gather_pads_orders_and_carries_gradients(ddp_results):
    for rank, results in enumerate(ddp_results):
        g = results["gather"]
        assert g["offset"] == (0 if rank == 0 else 2)
        expected = torch.full((5, 5), -1.0)
        expected[:2, :3] = 1.0
        expected[2:] = 2.0
        assert torch.equal(g["gathered"], expected)
        # d/dx of sum_rows (row index + 1) * gathered, summed over both ranks' losses: 2 * (row index + 1)
        rows = torch.arange(g["offset"], g["offset"] + 2 + rank) + 1.0
        assert torch.equal(g["grad"], (2 * rows)[:, None].expand_as(g["grad"]))


@pytest.mark.parametrize("case", OBJECTIVES + ["convirt_learnable_temperature"])
def test_ddp_loss_and_every_gradient_equal_one_process_on_the_whole_batch(ddp_results, case):
    for results in ddp_results:
        r = results[case]
        assert r["loss"] == pytest.approx(r["reference_loss"], abs=1e-5)
        assert r["grads"].keys() == r["reference_grads"].keys()
        for name, grad in r["grads"].items():
            torch.testing.assert_close(grad, r["reference_grads"][name], atol=1e-5, rtol=1e-4, msg=name)
    # the cross-sample terms (every objective's global one) see the other rank's negatives: each rank's own batch
    # alone gives another loss
    assert abs(ddp_results[0][case]["loss_own_batch_only"] - ddp_results[0][case]["reference_loss"]) > 1e-3
    if case.endswith("learnable_temperature"):
        assert ddp_results[0][case]["grads"]["loss.global_loss.log_logit_scale"].abs() > 0


def test_learnable_temperature_stays_bit_identical_across_ranks(ddp_results):
    synced = ddp_results[0]["temperature_sync=True"]
    assert torch.equal(synced["scales"][0], synced["scales"][1])
    assert torch.equal(synced["weights"][0], synced["weights"][1])  # DDP's own parameters, for comparison
    drifted = ddp_results[0]["temperature_sync=False"]
    assert not torch.equal(drifted["scales"][0], drifted["scales"][1])  # what the sync prevents


# ------------------------------------------------------------------ kill a 2-process run and resume it
STEPS_PER_EPOCH, EPOCHS, CHECKPOINT_EVERY, KILL_AT = 6, 2, 4, 10


class _DualEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Linear(6, 4)
        self.text = torch.nn.Linear(5, 4)

    def forward(self, image, text):
        from monai_elvis.keys import OutKeys

        return {OutKeys.IMAGE_GLOBAL: self.image(image), OutKeys.TEXT_GLOBAL: self.text(text)}


def _prepare(batch, device=None, non_blocking=False, **kwargs):
    return batch["image"], None, (batch["text"],), {}


def _training_worker(rank: int, folder: str, log_name: str, kill_at: int) -> None:
    """``STEPS_PER_EPOCH * EPOCHS`` iterations of 2 pairs per rank, a learnable temperature, warm-up cosine
    schedule, resumable with iteration checkpoints; logs each finished iteration's samples; with ``kill_at``,
    SIGKILLs itself inside that iteration (after its forward pass, before the optimizer step)."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from monai.engines.utils import IterationEvents
    from monai.handlers import LrScheduleHandler
    from monai.optimizers import WarmupCosineSchedule
    from monai.utils import set_determinism
    from torch.nn.parallel import DistributedDataParallel as DDP

    from monai_elvis.engines import (ClampParametersHandler, LossParametersSyncHandler, ObjectiveLoss,
                                     ResumableSampler, attach_resume)  # fmt: skip
    from monai_elvis.losses import ElvisLoss, GlobalContrastiveLoss

    set_determinism(seed=0)
    folder = Path(folder)
    g = torch.Generator().manual_seed(0)
    n = STEPS_PER_EPOCH * WORLD * 2
    data = [{"image": torch.randn(6, generator=g), "text": torch.randn(5, generator=g), "index": i} for i in range(n)]
    sampler = ResumableSampler(data, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler, drop_last=True)
    net = _DualEncoder()
    loss = ObjectiveLoss(ElvisLoss(GlobalContrastiveLoss(learnable_temperature=True), local_loss=None))
    optimizer = torch.optim.AdamW(list(net.parameters()) + list(loss.parameters()), lr=0.05)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=2, t_total=STEPS_PER_EPOCH * EPOCHS)
    ddp = DDP(net)
    handlers = [LrScheduleHandler(schedule, epoch_level=False, print_lr=False), LossParametersSyncHandler(),
                ClampParametersHandler()]  # fmt: skip
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=EPOCHS, train_data_loader=loader, network=ddp,
                                optimizer=optimizer, loss_function=loss, prepare_batch=_prepare,
                                train_handlers=handlers, decollate=False)  # fmt: skip
    log = folder / f"{log_name}_rank{rank}.jsonl"

    @trainer.on(Events.ITERATION_COMPLETED)
    def _log(engine) -> None:
        with log.open("a") as f:
            f.write(json.dumps([engine.state.iteration, engine.state.batch["index"].tolist()]) + "\n")

    if kill_at:

        @trainer.on(IterationEvents.FORWARD_COMPLETED)
        def _kill(engine) -> None:
            if engine.state.iteration == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    attach_resume(trainer, folder / "models", {"model": net, "optimizer": optimizer, "lr_scheduler": schedule,
                                               "loss": loss}, save=rank == 0, every_iterations=CHECKPOINT_EVERY)  # fmt: skip
    trainer.run()
    torch.save({"model": net.state_dict(), "loss": loss.state_dict()}, folder / f"{log_name}_final_rank{rank}.pt")


def _log(folder: Path, name: str, rank: int) -> list:
    return [json.loads(line) for line in (folder / f"{name}_rank{rank}.jsonl").read_text().splitlines()]


def test_a_killed_run_resumes_mid_epoch_without_replaying_a_saved_step(tmp_path):
    from monai_elvis.engines import latest_checkpoint

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    _spawn(_training_worker, str(whole), "run", 0)
    with pytest.raises(mp.ProcessExitedException) as info:
        _spawn(_training_worker, str(parts), "killed", KILL_AT)
    assert info.value.exit_code == -signal.SIGKILL or info.value.signal_name == "SIGKILL"
    saved = latest_checkpoint(parts / "models")
    assert saved is not None and saved.endswith("checkpoint_iteration=8.pt")  # mid-epoch 2: 6 + 2 iterations
    position = torch.load(saved, weights_only=True)["data_position"]
    assert position == {"pass_epoch": 2, "batches": 2}
    _spawn(_training_worker, str(parts), "resumed", 0)

    for rank in range(WORLD):
        uninterrupted, killed, resumed = (_log(whole, "run", rank), _log(parts, "killed", rank),
                                          _log(parts, "resumed", rank))  # fmt: skip
        assert [i for i, _ in uninterrupted] == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
        assert killed == uninterrupted[: KILL_AT - 1]  # iteration KILL_AT never finished
        # the resumed run starts after the checkpoint's last step: none of the saved steps again, the lost one
        # (iteration 9, finished after the checkpoint) once more, and then the batches of the uninterrupted run
        assert resumed[0][0] == 9 and KILL_AT - 1 - 8 <= CHECKPOINT_EVERY
        assert resumed == uninterrupted[8:]
        a = torch.load(whole / f"run_final_rank{rank}.pt", weights_only=True)
        b = torch.load(parts / f"resumed_final_rank{rank}.pt", weights_only=True)
        for part in ("model", "loss"):
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), (part, key)
    temperatures = [torch.load(parts / f"resumed_final_rank{r}.pt", weights_only=True)["loss"] for r in range(WORLD)]
    key = "objective.global_loss.log_logit_scale"
    assert torch.equal(temperatures[0][key], temperatures[1][key])
    assert len(list((parts / "models").glob("checkpoint*.pt"))) == 1
