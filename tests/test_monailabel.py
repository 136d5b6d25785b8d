"""The MONAI Label app with a real server: ``monailabel start_server`` on 127.0.0.1 over phantom PNGs, serving the
segmentation and grounding bundles as they are.

MONAI Label 0.8.5 needs its own environment (torch 2.14.1 + torchvision 0.29.1, pydicom<3): ``monailabel_app/
setup_env.sh`` makes it in ``.venv-monailabel``; ``MONAI_ELVIS_MONAILABEL_PYTHON`` may point at another one.
Without it these tests skip, unless ``MONAI_ELVIS_REQUIRE_MONAILABEL=1`` (as in CI), where they fail.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai.bundle import run as bundle_run

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(os.environ.get("MONAI_ELVIS_MONAILABEL_PYTHON", ROOT / ".venv-monailabel" / "bin" / "python"))


def _monailabel_ready() -> str | None:
    if not PYTHON.is_file():
        return f"no MONAI Label environment at {PYTHON} (run monailabel_app/setup_env.sh)"
    res = subprocess.run([str(PYTHON), "-c", "import monailabel, monai_elvis; print(monailabel.__version__)"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    if res.returncode != 0:
        return f"the MONAI Label environment at {PYTHON} cannot import monailabel and monai_elvis: {res.stderr[-500:]}"
    return None


@pytest.fixture(scope="module")
def monailabel_python():
    problem = _monailabel_ready()
    if problem:
        if os.environ.get("MONAI_ELVIS_REQUIRE_MONAILABEL") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    return PYTHON



def stop_server(server: subprocess.Popen) -> None:
    """Stop a server started in its own process group, and everything it started: SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def _infer(base: str, model: str, image_id: str, params: dict | None = None) -> np.ndarray:
    url = f"{base}/infer/{model}?" + urllib.parse.urlencode({"image": image_id, "output": "image"})
    body = urllib.parse.urlencode({"params": json.dumps(params or {})}).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            data, name = r.read(), r.headers.get("content-disposition", "")
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{model}: HTTP {e.code}: {e.read()[-2000:]!r}") from e
    if ".nii" in name:
        import nibabel as nib

        return np.asanyarray(nib.Nifti1Image.from_bytes(data).dataobj)
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def served_bundles(tmp_path_factory, phantom, pretrained_bundle) -> Path:
    """The two bundles as they are in the repository, plus models trained here: a 2-iteration segmentation model
    and the pre-training bundle's model for grounding."""
    root = tmp_path_factory.mktemp("bundles")
    for name in ("elvis_cxr_segmentation", "elvis_grounding"):
        shutil.copytree(ROOT / "bundles" / name, root / name, ignore=shutil.ignore_patterns("models", "eval"))
    seg = root / "elvis_cxr_segmentation"
    configs = seg / "configs"
    bundle_run(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
               logging_file=str(configs / "logging.conf"), bundle_root=str(seg), dataset_dir=str(phantom),
               image_size=64, batch_size=4, num_workers=0, cache_rate=0.0, max_epochs=1, epoch_length=2,
               val_interval=1)  # fmt: skip
    (root / "elvis_grounding" / "models").mkdir()
    shutil.copy(pretrained_bundle / "models" / "model.pt", root / "elvis_grounding" / "models" / "model.pt")
    shutil.copytree(pretrained_bundle / "models" / "tokenizer", root / "elvis_grounding" / "models" / "tokenizer")
    return root


def test_server_lists_and_runs_both_models(monailabel_python, served_bundles, phantom, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    datalist = json.loads((phantom / "datalist.json").read_text())
    studies_info = {s["id"]: s for s in json.loads((phantom / "phantom.json").read_text())["studies"]}
    # the grounding check uses the training study whose finding has the largest box: a tiny model trained for
    # two iterations localises coarsely, and a small nodule would test luck rather than the serving path
    target = max(datalist["training"], key=lambda e: max((b[2] * b[3] for f in studies_info[e["id"]]["findings"]
                                                           for b in f["boxes"]), default=0))  # fmt: skip
    entries = [target] + [e for e in datalist["training"][:3] if e is not target][:2]
    for e in entries:
        shutil.copy(phantom / e["image"], studies / Path(e["image"]).name)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    # MONAI Label writes its log into <app>/logs/: a copy of the app keeps it out of the checkout
    app = tmp_path / "monailabel_app"
    shutil.copytree(ROOT / "monailabel_app", app, ignore=shutil.ignore_patterns("logs", "__pycache__"))
    cmd = [str(monailabel_python.parent / "monailabel"), "start_server", "--app", str(app),
           "--studies", str(studies), "--conf", "bundles", str(served_bundles), "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    # the monailabel launcher runs "python -m monailabel.main": the environment's python must come first on PATH
    env = {**os.environ, "PATH": f"{monailabel_python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True, env=env)
    try:
        info = None
        deadline = time.time() + 300
        while time.time() < deadline:
            if server.poll() is not None:
                break
            try:
                info = _get(f"{base}/info/")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(2)
        assert info is not None, (tmp_path / "server.log").read_text()[-4000:]
        models = info["models"]
        assert {"elvis_cxr_segmentation", "elvis_grounding"} <= set(models)
        seg_labels = models["elvis_cxr_segmentation"]["labels"]
        assert seg_labels == {"nodule": 1, "opacity": 2, "effusion": 3, "pneumothorax": 4, "cardiomegaly": 5,
                              "atelectasis": 6}  # fmt: skip
        assert models["elvis_grounding"]["labels"] == {"phrase": 1}

        image_id = Path(entries[1]["image"]).stem
        h, w = np.asarray(Image.open(studies / f"{image_id}.png")).shape
        seg = _infer(base, "elvis_cxr_segmentation", image_id)
        assert seg.squeeze().shape == (h, w) and seg.max() < 7
        seg_out = tmp_path / "seg_out"
        bundle_run(config_file=str(served_bundles / "elvis_cxr_segmentation" / "configs" / "inference.json"),
                   bundle_root=str(served_bundles / "elvis_cxr_segmentation"), input_dir=str(studies),
                   output_dir=str(seg_out))  # fmt: skip
        own_seg = np.asarray(Image.open(seg_out / f"{image_id}_mask.png"))
        assert (own_seg == seg.squeeze()).mean() > 0.995  # the same labels, in the same orientation

        # grounding: a phrase naming a finding of the study; the mask must overlap that finding's box
        finding = max(studies_info[target["id"]]["findings"], key=lambda f: max(b[2] * b[3] for b in f["boxes"]))
        mask = _infer(base, "elvis_grounding", target["id"], {"phrase": finding["phrase"]}).squeeze()
        assert mask.shape == (h, w) and set(np.unique(mask).tolist()) <= {0, 1} and mask.any()
        box_mask = np.zeros_like(mask, dtype=bool)
        for x, y, bw, bh in finding["boxes"]:
            box_mask[int(y) : int(y + bh), int(x) : int(x + bw)] = True
        assert (mask.astype(bool) & box_mask).any(), finding
        # MONAI Label served the bundle as it is: the same mask as the bundle's own inference for that phrase
        out = tmp_path / "bundle_out"
        bundle_run(config_file=str(served_bundles / "elvis_grounding" / "configs" / "inference.json"),
                   bundle_root=str(served_bundles / "elvis_grounding"), output_dir=str(out),
                   image=str(studies / f"{target['id']}.png"), phrase=finding["phrase"])  # fmt: skip
        (record,) = json.loads((out / "groundings.json").read_text())
        own = np.asarray(Image.open(record["mask"])) > 0
        # (torch 2.14.1 there, 2.13.0 here: a pixel at the threshold may differ)
        assert (own == mask.astype(bool)).mean() > 0.995, (own == mask.astype(bool)).mean()
        # a request without a phrase is refused with a message that says so
        with pytest.raises(AssertionError, match="HTTP 400: .*needs a .*phrase.* parameter"):
            _infer(base, "elvis_grounding", target["id"])
    finally:  # stop the server and everything it started, whatever happened
        stop_server(server)
        log.close()
