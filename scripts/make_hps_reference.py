"""Record the ORIGINAL HPSv2 eval transform's outputs, for tests/unit/rewards/test_rewards.py.

Writes tests/fixtures/hps_reference.safetensors: for each case (input height x width, model
size) the tensor that HPSv2's preprocessing produces from a deterministic uint8 image
(`det_images(1, h, w, seed)` from rewards/fixtures.py: a splitmix64 hash, the same in any
environment, so the inputs are rebuilt by the test instead of stored).

What runs is the released code of the `hpsv2` package (1.2.0; identical to tgxs002/HPSv2 at
866735ecaae999fa714bd9edfa05aa2672669ee3 up to line endings), unmodified:
hpsv2/src/open_clip/transform.py's `image_transform(size, is_train=False, mean, std,
resize_longest_max=True)`, which is what hpsv2/img_score.py gets from
`create_model_and_transforms(..., light_augmentation=True)` (factory.py; mean/std are the
OpenAI CLIP constants because the laion2B-s32B-b79K pretrained config has none). It is applied
to PIL images, as img_score.py does. The package's __init__ (which imports huggingface_hub,
the scorer and the benchmark utilities) is bypassed by registering the package directories
without running them; transform.py itself imports only torch, torchvision and .constants.

Stored per case: `<case>/full` (the whole float32 output) for the model-size-32 cases; for the
224 cases (the released model size) a strided subset `<case>/sub4` = out[:, ::4, ::4] and the
row / column means `<case>/row_mean` [3, 224], `<case>/col_mean` [3, 224], which pin the
padding offsets, keeping the file small.

How it was run (the project venv has torch / torchvision / PIL; nothing is installed into it):

    .venv/bin/pip download hpsv2==1.2.0 --no-deps -d /tmp/hpsv2dl
    unzip /tmp/hpsv2dl/hpsv2-1.2.0-py3-none-any.whl -d /tmp/hpsv2dl/src
    .venv/bin/python scripts/make_hps_reference.py --hpsv2-src /tmp/hpsv2dl/src

(`--hpsv2-src` may also be a checkout of github.com/tgxs002/HPSv2: the directory holding `hpsv2/`.)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "hps_reference.safetensors"
SEED = 0
# (height, width, model size): downscale with vertical / horizontal padding, odd padding,
# Python round() at exactly .5 (64x37 -> 18, 64x39 -> 20 at size 32), upscaling, a square
# that is only resized, one already at the model size, and a non-square image whose longest
# side equals the model size (the reference neither resizes nor pads it)
CASES = [
    (512, 768, 224),
    (768, 512, 224),
    (300, 200, 32),
    (200, 300, 32),
    (37, 53, 32),
    (64, 37, 32),
    (64, 39, 32),
    (20, 30, 32),
    (64, 64, 32),
    (32, 32, 32),
    (32, 20, 32),
]


def case_name(h: int, w: int, size: int) -> str:
    return f"{h}x{w}_to_{size}"


def load_fixtures():
    """rewards/fixtures.py by path (its top level imports only json, pathlib and torch)."""
    spec = importlib.util.spec_from_file_location("mmalign_fixtures", ROOT / "rewards" / "fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def import_transform(src: Path):
    """hpsv2.src.open_clip.transform without running the package __init__s."""
    for name, rel in (("hpsv2", "hpsv2"), ("hpsv2.src", "hpsv2/src"), ("hpsv2.src.open_clip", "hpsv2/src/open_clip")):
        if not (src / rel).is_dir():
            raise SystemExit(f"--hpsv2-src: {src / rel} not found (give the directory holding hpsv2/)")
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(src / rel)]
        sys.modules[name] = pkg
    constants = importlib.import_module("hpsv2.src.open_clip.constants")
    return importlib.import_module("hpsv2.src.open_clip.transform"), constants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hpsv2-src", required=True, help="directory holding the unpacked hpsv2 package (hpsv2/...)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    import torch
    import torchvision
    from PIL import Image
    from safetensors.torch import save_file

    fx = load_fixtures()
    transform, constants = import_transform(Path(args.hpsv2_src))
    tensors = {}
    for h, w, size in CASES:
        tf = transform.image_transform(
            size,
            is_train=False,
            mean=constants.OPENAI_DATASET_MEAN,
            std=constants.OPENAI_DATASET_STD,
            resize_longest_max=True,
        )
        u8 = fx.det_images(1, h, w, SEED)[0]
        out = tf(Image.fromarray(u8.permute(1, 2, 0).numpy())).float().contiguous()
        name = case_name(h, w, size)
        if size == 224:
            tensors[f"{name}/sub4"] = out[:, ::4, ::4].contiguous()
            tensors[f"{name}/row_mean"] = out.mean(2).contiguous()
            tensors[f"{name}/col_mean"] = out.mean(1).contiguous()
        else:
            tensors[f"{name}/full"] = out
        print(f"{name}: output {tuple(out.shape)}, mean {out.mean().item():.6f}")
    meta = {
        "about": "HPSv2 eval transform (hpsv2 1.2.0 transform.py image_transform, resize_longest_max=True) "
        "on det_images(1, h, w, seed) from rewards/fixtures.py; made by scripts/make_hps_reference.py",
        "seed": str(SEED),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "hpsv2": "1.2.0",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
