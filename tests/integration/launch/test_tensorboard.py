"""What a person sees: launch/tensorboard.sh serving real runs, read through TensorBoard's HTTP
API the way its web page reads it: the scalars, the TA-MIM reconstructions and KDSL's labelled
confusion matrices are listed and load as images; the server answers on localhost only."""

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from PIL import Image

from mmtrain.data.synth import synth
from tests.helpers import REPO, eval_ranks, free_port, train

pytestmark = pytest.mark.heavy


def get(port, path, **query):
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read()
    return body if path.endswith("individualImage") else json.loads(body)


def image(port, run, tag):
    """The newest image of `tag` in `run`, decoded."""
    items = get(port, "/data/plugin/images/images", run=run, tag=tag)
    assert items, (run, tag)
    query = dict(urllib.parse.parse_qsl(items[-1]["query"]))
    return Image.open(io.BytesIO(get(port, "/data/plugin/images/individualImage", **query)))


@pytest.fixture
def kdsl_run(tmp_path, tiny_models):
    synth("intent", str(tmp_path / "intent"), 200, seed=0)
    run = tmp_path / "runs" / "kdsl"
    data = tmp_path / "intent"
    train(
        run,
        [
            f"recipe.model_path={tiny_models / 'qwen2vl'}",
            f"recipe.data.train={data / 'train'}",
            f"recipe.data.val={data / 'val'}",
            "train.steps=6",
        ],
        config=REPO / "configs" / "demo" / "kdsl.yaml",
    )
    eval_ranks(run, "--split", "test")  # mmtrain eval writes its figures beside training's
    return run


def test_tensorboard_serves_scalars_reconstructions_and_labelled_confusion_matrices(
    tmp_path, stage1_run, kdsl_run
):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    (logdir / "stage1").symlink_to(stage1_run[0])
    (logdir / "kdsl").symlink_to(kdsl_run)
    port = free_port()
    server = subprocess.Popen(
        ["bash", str(REPO / "launch/tensorboard.sh"), str(logdir), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHON": sys.executable},
    )
    try:
        deadline, runs = time.time() + 120, []
        while time.time() < deadline and len(runs) < 2:
            try:
                runs = get(port, "/data/runs")
            except OSError:
                time.sleep(1)
        assert sorted(runs) == ["kdsl/tensorboard", "stage1/tensorboard"], runs
        scalars = get(port, "/data/plugin/scalars/tags")
        assert {"loss/tim", "eval/mean_r@1"} <= set(scalars["stage1/tensorboard"])
        assert {"loss/scene", "test/intent_wf1"} <= set(scalars["kdsl/tensorboard"])
        images = get(port, "/data/plugin/images/tags")
        assert "images/ta_mim" in images["stage1/tensorboard"]
        assert {"eval/confusion/intent", "test/confusion/scene"} <= set(images["kdsl/tensorboard"])
        recon = image(port, "stage1/tensorboard", "images/ta_mim")
        assert recon.size[0] == 3 * recon.size[1]  # original | masked | reconstruction
        confusion = image(port, "kdsl/tensorboard", "test/confusion/intent")
        assert confusion.size[0] > 200 and confusion.size[1] > 200  # a figure, not a cell grid
        # localhost only: the machine's network address does not answer (with --expose it would)
        others = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
        others = [a for a in others if ":" not in a and not a.startswith("127.")]
        assert others, "this machine has no network address to try"
        for addr in others:
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=3).close()
    finally:
        server.terminate()
        server.wait(timeout=30)
