"""Per-step time breakdown of ELVIS pre-training (data, forward, loss, backward+update) on this machine."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.data import DataLoader, Dataset, load_decathlon_datalist

from monai_elvis.benchmarks.transforms import pretraining_transforms
from monai_elvis.data import collate_reports
from monai_elvis.engines import ensure_tokenizer, prepare_vlp_batch
from monai_elvis.losses import ElvisLoss, LocalAlignmentLoss
from monai_elvis.networks import CXRImageEncoder, ElvisNet, ReportTextEncoder

__all__ = ["SCALES", "run_train_step_benchmark"]

# name -> (image arch, widen factor, image size, BERT config, batch)
SCALES = {
    "tiny": ("resnet18", 0.125, 128, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=128), 32),
    "paper": ("resnet50", 1.0, 224, dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                          intermediate_size=3072), 16),
}  # fmt: skip


def run_train_step_benchmark(scales=("tiny", "paper"), steps: int = 3, batch: int | None = None,
                             progress: Callable[[str], None] | None = None) -> list[dict]:  # fmt: skip
    """Time ``steps`` optimisation steps per scale (after one warm-up step) on phantom data; one record per scale:
    ``{"scale", "batch", "image_size", "data_ms", "forward_ms", "loss_ms", "backward_ms", "step_ms", "loss_share"}``
    (the paper scale uses a BERT-base-size encoder built from its config, randomly initialised)."""
    from monai_elvis.data.phantom import prepare_phantom

    say = progress or (lambda _m: None)
    torch.set_flush_denormal(True)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "phantom"
        say("preparing a small phantom")
        prepare_phantom(data_dir, num=96, size=256, workers=1)
        tok = ensure_tokenizer(Path(tmp) / "tok", data_dir / "datalist.json", vocab_size=4096)
        files = load_decathlon_datalist(data_dir / "datalist.json", True, "training", base_dir=data_dir)
        for name in scales:
            arch, widen, size, bert, default_batch = SCALES[name]
            b = batch or default_batch
            net = ElvisNet(CXRImageEncoder(arch, 1, widen), ReportTextEncoder(config={**bert, "vocab_size": 4096}))
            objective = ElvisLoss(local_loss=LocalAlignmentLoss("intra_modal"))
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
            loader = DataLoader(Dataset(files, pretraining_transforms(tok, size, 96)), batch_size=b, shuffle=True,
                                num_workers=0, collate_fn=collate_reports, drop_last=True)  # fmt: skip
            it = iter(loader)
            totals = {"data": 0.0, "forward": 0.0, "loss": 0.0, "backward": 0.0}
            for i in range(steps + 1):
                t0 = time.perf_counter()
                try:
                    batch_data = next(it)
                except StopIteration:
                    it = iter(loader)
                    batch_data = next(it)
                image, _, _, text = prepare_vlp_batch(batch_data)
                t1 = time.perf_counter()
                out = net(image, **text)
                t2 = time.perf_counter()
                loss = objective(out)["loss"]
                t3 = time.perf_counter()
                opt.zero_grad()
                loss.backward()
                opt.step()
                t4 = time.perf_counter()
                if i:  # the first step warms up
                    for k, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                        totals[k] += dt * 1000 / steps
            step = sum(totals.values())
            rec = {"scale": name, "batch": b, "image_size": size, **{f"{k}_ms": round(v, 1) for k, v in totals.items()},
                   "step_ms": round(step, 1), "loss_share": round(totals["loss"] / step, 4)}  # fmt: skip
            records.append(rec)
            say(f"{name}: {rec}")
    return records
