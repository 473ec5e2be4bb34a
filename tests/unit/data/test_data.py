import io
import json

import pytest
import torch
from PIL import Image

from mmalign.data.preference import DataError, PreferenceDataset, read_manifest, read_pickapic, validate_pairs
from mmalign.data.sampling import GlobalBatchSampler


def _png(color, size=(40, 36)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _manifest(tmp_path, rows, name="m.jsonl"):
    (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path / name


def test_manifest_ties_and_relative_paths(tmp_path):
    (tmp_path / "a.png").write_bytes(_png("red"))
    (tmp_path / "b.png").write_bytes(_png("blue"))
    m = _manifest(
        tmp_path,
        [
            {"prompt": "p1", "chosen": "a.png", "rejected": "b.png"},
            {"prompt": "p2", "chosen": "b.png", "rejected": "a.png", "tie": True},
        ],
    )
    ps = validate_pairs(read_manifest(m), skip_bad=False)
    assert len(ps.pairs) == 1 and ps.ties_dropped == 1
    item = PreferenceDataset(ps, resolution=32)[0]
    assert item["chosen"].shape == (3, 32, 32)  # resized + center-cropped
    assert item["chosen"][0].mean() > 0.8 and item["rejected"][2].mean() > 0.8


def test_csv_manifest(tmp_path):
    (tmp_path / "a.png").write_bytes(_png("red"))
    (tmp_path / "m.csv").write_text("prompt,chosen,rejected\nhello,a.png,a.png\n")
    assert len(read_manifest(tmp_path / "m.csv").pairs) == 1


def test_corrupt_and_missing_images_are_named(tmp_path):
    (tmp_path / "a.png").write_bytes(_png("red"))
    (tmp_path / "bad.png").write_bytes(_png("red")[:40])  # truncated
    m = _manifest(
        tmp_path,
        [
            {"prompt": "p1", "chosen": "a.png", "rejected": "bad.png"},
            {"prompt": "p2", "chosen": "a.png", "rejected": "gone.png"},
            {"prompt": "p3", "chosen": "a.png", "rejected": "a.png"},
        ],
    )
    with pytest.raises(DataError, match=r"bad\.png: not a readable image.*skip_bad"):
        validate_pairs(read_manifest(m), skip_bad=False)
    ps = validate_pairs(read_manifest(m), skip_bad=True)
    assert len(ps.pairs) == 1 and ps.bad_skipped == 2


def test_malformed_manifest_rows(tmp_path):
    m = _manifest(tmp_path, [{"prompt": "p1", "chosen": "a.png"}])
    with pytest.raises(DataError, match=r"\.jsonl:1: missing rejected"):
        read_manifest(m)
    (tmp_path / "x.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"x\.jsonl:1: not valid JSON"):
        read_manifest(tmp_path / "x.jsonl")


def test_pickapic_columns_from_local_parquet(tmp_path):
    import datasets

    red, blue = _png("red"), _png("blue")
    ds = datasets.Dataset.from_dict(
        {
            "caption": ["c0", "c1", "c2"],
            "jpg_0": [red, red, red],
            "jpg_1": [blue, blue, blue],
            "label_0": [1.0, 0.0, 0.5],
        }
    )
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ps = validate_pairs(read_pickapic(tmp_path), skip_bad=False)
    assert [p.prompt for p in ps.pairs] == ["c0", "c1"] and ps.ties_dropped == 1
    d = PreferenceDataset(ps, resolution=16)
    assert d[0]["chosen"][0].mean() > 0.8  # label_0=1: jpg_0 (red) preferred
    assert d[1]["chosen"][2].mean() > 0.8  # label_0=0: jpg_1 (blue) preferred
    ds.save_to_disk(str(tmp_path / "arrow"))
    assert len(read_pickapic(tmp_path / "arrow").pairs) == 2


def test_latent_cache_is_reused(tmp_path, tiny_sd, pairs_manifest):
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))
    ds = PreferenceDataset(validate_pairs(read_manifest(pairs_manifest), False), 32)
    path = ds.cache_latents(gen, tmp_path / "cache")
    mtime = path.stat().st_mtime_ns
    assert ds.cache_latents(gen, tmp_path / "cache") == path and path.stat().st_mtime_ns == mtime
    direct_w = gen.encode_images(ds[2]["chosen"][None], [2])[0]  # pair 2's posterior draw
    direct_l = gen.encode_images(ds[2]["rejected"][None], [2])[0]
    gen.cfg.vae_latents = "mean"  # means are another cache
    assert ds.cache_latents(gen, tmp_path / "cache") != path
    ds.use_latents(path)
    torch.testing.assert_close(ds[2]["latents_w"], direct_w)
    torch.testing.assert_close(ds[2]["latents_l"], direct_l)


def test_global_batches_split_over_processes():
    one = iter(GlobalBatchSampler(10, 4, world=1, rank=0, seed=3))
    r0 = iter(GlobalBatchSampler(10, 2, world=2, rank=0, seed=3))
    r1 = iter(GlobalBatchSampler(10, 2, world=2, rank=1, seed=3))
    for _ in range(6):  # crosses epochs
        assert next(one) == next(r0) + next(r1)
    resumed = iter(GlobalBatchSampler(10, 4, world=1, rank=0, seed=3, start_micro_step=6))
    again = iter(GlobalBatchSampler(10, 4, world=1, rank=0, seed=3))
    for _ in range(6):
        next(again)
    assert next(resumed) == next(again)
