"""Read back what the trackers wrote: TensorBoard event files (TensorBoard's own reader) and a
W&B offline run's .wandb file (its record log, parsed with W&B's protobuf messages)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files under `logdir`."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    mux.Reload()
    out: dict[str, dict[int, float]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("scalars", []):
            out.setdefault(tag, {}).update({e.step: e.value for e in mux.Scalars(run, tag)})
    return out


def tensorboard_images(logdir: Path) -> dict[str, list[int]]:
    """{tag: [steps]} of the images in the event files under `logdir`."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer(size_guidance={"images": 0}).AddRunsFromDirectory(str(logdir))
    mux.Reload()
    out: dict[str, list[int]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("images", []):
            out.setdefault(tag, []).extend(e.step for e in mux.Images(run, tag))
    return out


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) make up each record."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, record, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        record += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(record)
            record = b""
    return records


def wandb_offline_run(run_dir: Path) -> tuple[dict[str, dict[int, float]], dict, list[str]]:
    """({key: {step: value}} of the history, the config, the image keys) of the offline run under `run_dir`."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("**/offline-run-*/run-*.wandb")
    rows, config = [], {}
    for data in _wandb_records(path):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in rec.config.update})
        elif kind == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            )
    images = sorted(
        {
            k.removesuffix("/_type")
            for r in rows
            for k, v in r.items()
            if k.endswith("/_type") and v == "images/separated"
        }
    )
    history: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            is_image = any(key.startswith(f"{i}/") for i in images)
            if not key.startswith("_") and not is_image and isinstance(value, (int, float)):
                history.setdefault(key, {})[int(row["_step"])] = value
    return history, config, images
