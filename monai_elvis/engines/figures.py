"""A figure of phrase-grounding maps: the same images, one column per phrase, from a grounding bundle's model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["grounding_maps", "draw_grounding_figure"]


def grounding_maps(config_files: Sequence[str | os.PathLike], images: Sequence[str], phrases: Sequence[str],
                   **overrides) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Heatmaps of every phrase on every image with the grounding bundle's network, preprocessing and inferer.

    ``config_files``: the grounding bundle's ``inference.json`` (and overlays); ``overrides`` are config
    settings (``ckpt_dir``, ...). Returns ``(images [I, S, S], maps [I, P, S, S])`` in ``[0, 1]`` at the
    network's input size, in MONAI's ``(x, y)`` order as the network sees them (:func:`draw_grounding_figure`
    shows them as viewed)."""
    from monai.bundle import ConfigParser

    from monai_elvis.engines.vlp import prepare_vlp_batch
    from monai_elvis.data import collate_reports

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update(overrides)
    ckpt = Path(parser.get_parsed_content("ckpt_dir")) / "model.pt"
    if not ckpt.is_file() or not Path(parser.get_parsed_content("tokenizer_dir")).is_dir():
        raise FileNotFoundError(f"no pre-trained model at {ckpt.parent} (model.pt and tokenizer/): run the "
                                "pre-training bundle first, then point --ckpt-dir at its models folder.")  # fmt: skip
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    network.eval()
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    device = parser.get_parsed_content("device")
    shown, maps = [], []
    with torch.no_grad():
        for image in images:
            row = []
            for phrase in phrases:
                item = preprocessing({"image": str(image), "phrase": phrase})
                batch = collate_reports([item])
                x, _, _, text = prepare_vlp_batch(batch, device)
                row.append(inferer(x, network, **text)[0, 0].float().cpu().numpy())
            img = torch.as_tensor(item["image"])[0].float().numpy()
            shown.append((img - img.min()) / max(float(img.max() - img.min()), 1e-8))
            maps.append(np.stack(row))
    return np.stack(shown), np.stack(maps)


def draw_grounding_figure(images: np.ndarray, maps: np.ndarray, phrases: Sequence[str], out: str | os.PathLike,
                          titles: Sequence[str] | None = None) -> Path:  # fmt: skip
    """Save a grid: a row per image (the radiograph, then its map for each phrase as an overlay with a colour
    bar), and the mean correlation between the maps of different phrases of that row in its title.

    ``images [I, W, H]`` and ``maps [I, P, W, H]`` are in MONAI's ``(x, y)`` order; they are transposed for
    display, so the radiographs appear as viewed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_img, n_ph = maps.shape[:2]
    fig, axes = plt.subplots(n_img, n_ph + 1, figsize=(2.6 * (n_ph + 1), 2.7 * n_img), squeeze=False)
    for i in range(n_img):
        flat = maps[i].reshape(n_ph, -1)
        corr = np.corrcoef(flat)[np.triu_indices(n_ph, 1)].mean() if n_ph > 1 else float("nan")
        ax = axes[i, 0]
        ax.imshow(images[i].T, cmap="gray")
        ax.set_title((titles[i] if titles else f"image {i}") + f"\nmap correlation {corr:.2f}", fontsize=8)
        for j in range(n_ph):
            ax = axes[i, j + 1]
            ax.imshow(images[i].T, cmap="gray")
            im = ax.imshow(maps[i, j].T, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            peak_x, peak_y = np.unravel_index(np.argmax(maps[i, j]), maps[i, j].shape)
            ax.plot(peak_x, peak_y, "w+", markersize=10, markeredgewidth=2)
            ax.set_title(f'"{phrases[j]}"', fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.015, pad=0.01, label="phrase-region similarity (scaled)")
    fig.text(0.01, 0.005, "Radiographs as viewed: the patient's left on the image's right. + marks each map's peak.",
             fontsize=7)  # fmt: skip
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
