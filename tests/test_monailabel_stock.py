"""The bundles in MONAI Label 0.8.5's **stock** ``monaibundle`` sample app (the copy its wheel ships), with a real
server on 127.0.0.1 over non-square PNG studies: nothing of this repository's own app is used.

The bundles' own inference runs in the same MONAI Label environment, so the masks must be equal, pixel for pixel.
Skips without the environment, unless ``MONAI_ELVIS_REQUIRE_MONAILABEL=1`` (as in CI); see ``test_monailabel.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_monailabel import ROOT, _free_port, _get, _infer, monailabel_python, served_bundles, stop_server  # noqa: F401

BUNDLES = ("elvis_cxr_segmentation", "elvis_grounding")
PHRASES = ("moderate left pleural effusion", "right upper lobe nodule", "enlarged cardiac silhouette",
           "small right pneumothorax", "left lower lobe atelectasis", "patchy opacity in the right middle lobe",
           "large right pleural effusion", "left apical pneumothorax")  # fmt: skip


def _stock_app(python: Path) -> Path:
    res = subprocess.run([str(python), "-c", "import monailabel, os; print(os.path.dirname(monailabel.__file__))"],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    env_root = Path(res.stdout.strip()).parents[3]  # <venv>/lib/pythonX.Y/site-packages/monailabel -> <venv>
    found = sorted(env_root.glob("**/sample-apps/monaibundle/main.py"))
    assert found, f"no sample-apps/monaibundle in {env_root}"
    return found[0].parent


def _bundle_run(python: Path, bundle: Path, cwd: Path, **args: str) -> None:
    """``python -m monai.bundle run`` of the bundle's inference.json in the MONAI Label environment."""
    cmd = [str(python), "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle)] + [x for k, v in args.items() for x in (f"--{k}", str(v))]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


def _post_status(base: str, model: str, image_id: str, params: dict) -> tuple[int, str]:
    """``(HTTP status, the error's detail)`` of an infer request expected to fail."""
    url = f"{base}/infer/{model}?" + urllib.parse.urlencode({"image": image_id, "output": "image"})
    body = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, ""
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()).get("detail", "")


def test_stock_monaibundle_app_serves_both_bundles(monailabel_python, served_bundles, phantom, tmp_path):
    # non-square studies (64 wide x 40 high, 44 wide x 64 high): a transposed mask would not even have their shape
    studies = tmp_path / "studies"
    studies.mkdir()
    source = np.asarray(Image.open(phantom / json.loads((phantom / "datalist.json").read_text())["training"][0]["image"]))
    Image.fromarray(source[12:52, :]).save(studies / "wide.png")
    Image.fromarray(source[:, 10:54]).save(studies / "tall.png")
    shapes = {"wide": (40, 64), "tall": (64, 44)}  # (rows, columns) as viewed

    app = tmp_path / "monaibundle"
    shutil.copytree(_stock_app(monailabel_python), app, ignore=shutil.ignore_patterns("logs", "__pycache__", "model"))
    for name in BUNDLES:  # the stock app takes local bundles from <app>/model/<name>
        shutil.copytree(served_bundles / name, app / "model" / name, ignore=shutil.ignore_patterns("eval", "resume"))
    server_cwd = tmp_path / "cwd"
    server_cwd.mkdir()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [str(monailabel_python.parent / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies),
           "--conf", "models", ",".join(BUNDLES), "--conf", "zoo_source", "local", "--conf", "sam2", "false",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "PATH": f"{monailabel_python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_path = tmp_path / "server.log"
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=server_cwd, start_new_session=True,
                              env=env)  # fmt: skip
    try:
        info = None
        deadline = time.time() + 420
        while time.time() < deadline and server.poll() is None:
            try:
                info = _get(f"{base}/info/")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(2)
        assert info is not None, log_path.read_text()[-5000:]
        models = info["models"]
        assert set(BUNDLES) <= set(models), models.keys()
        assert models["elvis_cxr_segmentation"]["labels"] == {"nodule": 1, "opacity": 2, "effusion": 3,
                                                              "pneumothorax": 4, "cardiomegaly": 5, "atelectasis": 6}  # fmt: skip
        assert models["elvis_grounding"]["labels"] == {"phrase": 1}
        assert models["elvis_grounding"]["config"]["phrase"] == ""  # the displayable config clients show

        # segmentation: the served masks are the bundle's own, in the studies' orientation
        own_seg = tmp_path / "own_seg"
        _bundle_run(monailabel_python, app / "model" / "elvis_cxr_segmentation", tmp_path, input_dir=studies,
                    output_dir=own_seg)  # fmt: skip
        for image_id, shape in shapes.items():
            served = _infer(base, "elvis_cxr_segmentation", image_id).squeeze()
            own = np.asarray(Image.open(own_seg / f"{image_id}_mask.png"))
            assert served.shape == own.shape == shape, (image_id, served.shape, own.shape)
            assert np.array_equal(served, own), (image_id, (served == own).mean())

        # grounding: 8 requests at once, a phrase each, on each study; each mask is the bundle's own for its phrase
        phrases_file = tmp_path / "phrases.json"
        phrases_file.write_text(json.dumps([{"image": str(studies / f"{i}.png"), "phrase": p}
                                            for i in shapes for p in PHRASES]))  # fmt: skip
        own_ground = tmp_path / "own_ground"
        _bundle_run(monailabel_python, app / "model" / "elvis_grounding", tmp_path, datalist_file=phrases_file,
                    output_dir=own_ground)  # fmt: skip
        own = {(Path(r["image"]).stem, r["phrase"]): np.asarray(Image.open(r["mask"])) > 0
               for r in json.loads((own_ground / "groundings.json").read_text())}  # fmt: skip
        for image_id, shape in shapes.items():
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                served = list(pool.map(lambda p: _infer(base, "elvis_grounding", image_id, {"phrase": p}).squeeze(),
                                       PHRASES))  # fmt: skip
            distinct = {own[(image_id, p)].tobytes() for p in PHRASES}
            assert len(distinct) >= 2, "the phrases' masks are all alike: a leak could not show"
            for phrase, mask in zip(PHRASES, served):
                assert mask.shape == shape and set(np.unique(mask).tolist()) <= {0, 1}, (image_id, phrase, mask.shape)
                assert np.array_equal(mask > 0, own[(image_id, phrase)]), (image_id, phrase)

        # a request without a phrase (or an empty one) is the client's mistake: 400 and a message, not a 500
        for params in ({}, {"phrase": "  "}):
            status, text = _post_status(base, "elvis_grounding", "wide", params)
            assert status == 400, (status, text)
            assert text.startswith("grounding needs a 'phrase' parameter: the text to find on the image, e.g. "
                                   '{"phrase": "left pleural effusion"}') and "wide.png" in text, text  # fmt: skip
        assert _get(f"{base}/info/")["models"].keys() == models.keys()  # the server is still up
        assert list(server_cwd.iterdir()) == [] or all(p.name in ("logs",) for p in server_cwd.iterdir())
    finally:  # stop the server and everything it started, whatever happened
        stop_server(server)
        log.close()
