"""Helpers shared by the tests, in one place (fixtures live in tests/conftest.py): `ROOT`, `write_config`;
`browser` (headless Chromium through Selenium), `tracker_files` (reading back tracker logs)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root


def write_config(path, sd, clip, manifest, **sections):
    """A small Diffusion-DPO run config; `sections` override keys (dicts are merged, `method` replaced)."""
    import yaml

    cfg = {
        "run": {"name": "test", "seed": 0},
        "generator": {"name": "sd", "pretrained": str(sd), "lora": {"rank": 4, "alpha": 4}},
        "reward": {"name": "clip", "model": f"local-dir:{clip}"},
        "method": {"name": "diffusion_dpo", "beta": 5000},
        "data": {"kind": "manifest", "path": str(manifest)},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3},
        "eval": {"enabled": False, "prompts": ["a red square"], "num_steps": 3},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict) and k != "method":
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))
    return path
