import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from mmalign.media import tensor_to_pil
from mmalign.testing import make_tiny_open_clip, make_tiny_sd


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models run fastest on one thread (and far faster on a loaded machine); the slow
    toy-world runs keep every core."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("models") / "sd")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return make_tiny_open_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="session")
def pairs_manifest(tmp_path_factory):
    """Six preference pairs of 32x32 images: chosen = reddish, rejected = bluish."""
    d = tmp_path_factory.mktemp("pairs")
    (d / "img").mkdir()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(6):
        a = torch.rand(3, 32, 32, generator=g) * 0.3
        b = a.clone()
        a[0] += 0.6
        b[2] += 0.6
        tensor_to_pil(a).save(d / f"img/{i}_w.png")
        tensor_to_pil(b).save(d / f"img/{i}_l.png")
        rows.append({"prompt": f"a red square number {i}", "chosen": f"img/{i}_w.png", "rejected": f"img/{i}_l.png"})
    (d / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d / "pairs.jsonl"
