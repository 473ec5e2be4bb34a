"""Vision-language preference data: rows -> encoded prompts/responses -> padded sequences.

Rows (JSONL, JSON or parquet; parquet and directories go through `datasets`):
- mmalign's own shape: `image` (path, or a list of paths) | `images`, `prompt`, `chosen`,
  `rejected`, optional `margin` (a reward-model margin, used by MM-DPO) and `weight`;
  unpaired (KTO) rows have `completion` and `label` (true = desirable) instead.
- RLAIF-V: `image` ({"bytes", "path"} or a decoded image), `question`, `chosen`, `rejected`.
- VLFeedback: `image`, `prompt`, `completions` = [{"response", "annotations": {aspect:
  {"Rating": ...}}}]: chosen/rejected are the best/worst mean-rated completions (ties dropped).
- chosen/rejected may also be conversational ([{"role", "content"}], the last turn is used).
Relative image paths are relative to the data file. A missing or corrupt image is a
`MediaError` naming the file and the row, or (skip_bad) a dropped, counted row.

Encoding (`VLMEncoder`) is correct by construction for image tokens: the prompt (chat
template + the processor's image-token expansion) and each response are tokenised
separately and concatenated, and only the response can ever be shortened, so the number
of image tokens in `input_ids` always equals the number of image features the processor
produced. The loss mask is 1 on response tokens only (the prompt, the image and padding
are masked out). Chosen and rejected share the one encoded prompt and image.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from mmalign import sources
from mmalign.data.preference import DataError, json_type, jsonl_rows, read_text
from mmalign.media import MediaError, open_image, pil_to_tensor, tensor_to_pil

# --------------------------------------------------------------------------- rows


@dataclass
class VLMRow:
    images: list[Any]  # paths, bytes or PIL images
    prompt: str
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None  # unpaired (KTO)
    label: bool | None = None
    margin: float = 0.0
    weight: float = 1.0
    name: str = ""  # "file:line" for error messages


@dataclass
class VLMRowSet:
    rows: list[VLMRow]
    source: str
    bad_skipped: int = 0
    ties_dropped: int = 0
    too_long_dropped: int = 0
    notes: list[str] = field(default_factory=list)


def _text(x: Any, where: str, key: str) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, list) and x and isinstance(x[-1], dict):  # conversational: last turn
        c = x[-1].get("content")
        if isinstance(c, list):
            return "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type", "text") == "text")
        if isinstance(c, str):
            return c
    raise DataError(f"{where}: {key}: expected a string or a list of chat messages, got {type(x).__name__}")


def _number(x: Any, where: str, key: str) -> float:
    """A finite number from a row's field, or a DataError naming the row and the key."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {key}: expected a number, got {x!r:.40}") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: {key}: expected a finite number, got {x!r}")
    return value


def _vlfeedback_score(c: dict) -> float:
    ann = c.get("annotations") or {}
    vals = []
    for v in ann.values():
        r = v.get("Rating") if isinstance(v, dict) else v
        try:
            vals.append(float(r))
        except (TypeError, ValueError):
            pass
    return sum(vals) / len(vals) if vals else float("nan")


def normalize_row(raw: dict, where: str, base: Path | None = None) -> VLMRow | None:
    """One raw row (any supported column shape) -> `VLMRow`; None for a VLFeedback tie."""
    img = next((raw[k] for k in ("images", "image", "image_path") if raw.get(k) is not None), None)
    if img is None:
        raise DataError(f"{where}: no image (expected a key 'image', 'images' or 'image_path')")
    imgs = img if isinstance(img, (list, tuple)) else [img]
    imgs = [str(base / i) if isinstance(i, str) and base is not None and not Path(i).is_absolute() else i for i in imgs]
    prompt = raw.get("prompt", raw.get("question"))
    if prompt is None:
        raise DataError(f"{where}: missing key 'prompt' (or 'question')")
    prompt = _text(prompt, where, "prompt")
    if not prompt.strip():
        raise DataError(f"{where}: prompt: is empty")
    margin = _number(raw.get("margin") or 0.0, where, "margin")
    weight = _number(raw["weight"], where, "weight") if raw.get("weight") is not None else 1.0
    if "completions" in raw and "chosen" not in raw:  # VLFeedback
        comps = [c for c in raw["completions"] if isinstance(c, dict) and c.get("response")]
        scored = sorted(
            ((s, c["response"]) for c in comps if not math.isnan(s := _vlfeedback_score(c))), key=lambda t: t[0]
        )
        if len(scored) < 2 or scored[-1][0] == scored[0][0]:
            return None
        return VLMRow(
            imgs, prompt, scored[-1][1], scored[0][1], margin=scored[-1][0] - scored[0][0], weight=weight, name=where
        )
    if "completion" in raw:
        if "label" not in raw:
            raise DataError(f"{where}: unpaired row has 'completion' but no 'label'")
        return VLMRow(
            imgs,
            prompt,
            completion=_text(raw["completion"], where, "completion"),
            label=bool(raw["label"]),
            margin=margin,
            weight=weight,
            name=where,
        )
    for k in ("chosen", "rejected"):
        if raw.get(k) is None:
            raise DataError(f"{where}: missing key {k!r}")
    return VLMRow(
        imgs,
        prompt,
        _text(raw["chosen"], where, "chosen"),
        _text(raw["rejected"], where, "rejected"),
        margin=margin,
        weight=weight,
        name=where,
    )


def read_rows(path: str | Path, max_samples: int | None = None) -> VLMRowSet:
    """Read preference rows from a .jsonl/.json file, a .parquet file or a directory of parquet
    (or a registered preference source `prefix:name`, such as the toy world's `toy:vlm_pairs`,
    materialised on first use; see mmalign.sources)."""
    if sources.is_spec(str(path)) and not Path(path).exists():
        try:
            path = sources.resolve("preference_source", str(path))
        except ValueError as e:
            raise DataError(f"data.path: {e}") from None
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    out = VLMRowSet([], str(p))
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        base = p.parent
        if p.suffix == ".json":
            try:
                data = json.loads(read_text(p))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
            if not isinstance(data, list):
                raise DataError(f"{p}: expected a JSON list of rows, got {json_type(data)}")
            raws = [(f"{p}[{i}]", r) for i, r in enumerate(data)]
        else:
            raws = jsonl_rows(p)
    else:
        import datasets

        files = [str(p)] if p.is_file() else sorted(str(f) for f in p.rglob("*.parquet"))
        if not files:
            raise DataError(f"{p}: no .parquet files")
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
        base = p.parent if p.is_file() else p
        raws = ((f"{p}[row {i}]", r) for i, r in enumerate(ds))
    for where, raw in raws:
        if max_samples and len(out.rows) >= max_samples:
            break
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object ({{...}}), got {json_type(raw)}")
        row = normalize_row(raw, where, base)
        if row is None:
            out.ties_dropped += 1
        else:
            out.rows.append(row)
    if not out.rows:
        raise DataError(f"{p}: no usable rows")
    return out


def load_row_images(row: VLMRow) -> list[Image.Image]:
    out = []
    for k, src in enumerate(row.images):
        name = f"{row.name}: image {k}"
        if isinstance(src, Image.Image):
            out.append(src.convert("RGB"))
        elif isinstance(src, dict):  # datasets' Image feature, undecoded: {"bytes", "path"}
            if src.get("bytes"):
                out.append(open_image(src["bytes"], f"{name} ({src.get('path') or 'bytes'})"))
            elif src.get("path"):
                out.append(open_image(src["path"], f"{name} ({src['path']})"))
            else:
                raise MediaError(f"{name}: empty image entry")
        elif isinstance(src, (bytes, bytearray)):
            out.append(open_image(src, f"{name} (bytes)"))
        else:
            out.append(open_image(src, f"{name} ({src})"))
    return out


# --------------------------------------------------------------------------- image corruptions


def corrupt_crop(im: Image.Image, seed: int, keep: float = 0.2) -> Image.Image:
    """mDPO's corrupted image: a random crop keeping at most `keep` of the area, resized back
    to the original size (so the image-token count is unchanged)."""
    g = torch.Generator().manual_seed(seed)
    w, h = im.size
    frac = keep * (0.25 + 0.75 * float(torch.rand(1, generator=g)))
    cw, ch = max(1, round(w * math.sqrt(frac))), max(1, round(h * math.sqrt(frac)))
    x0 = int(torch.randint(0, w - cw + 1, (1,), generator=g))
    y0 = int(torch.randint(0, h - ch + 1, (1,), generator=g))
    return im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)


def corrupt_noise(im: Image.Image, seed: int, step: int = 500, num_steps: int = 1000) -> Image.Image:
    """POVID's noisy image: the forward diffusion q(x_t | x_0) at step t of a linear-beta (DDPM)
    schedule, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, on pixels in [-1, 1]."""
    betas = torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
    abar = float(torch.cumprod(1 - betas, 0)[step - 1])
    x = pil_to_tensor(im) * 2 - 1
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    xt = math.sqrt(abar) * x + math.sqrt(1 - abar) * eps
    return tensor_to_pil(((xt + 1) / 2).clamp(0, 1))


# --------------------------------------------------------------------------- encoding


class TooLong(DataError):
    pass


@dataclass
class EncodedPrompt:
    ids: Tensor  # [P] prompt token ids (chat template, image tokens expanded)
    token_extras: dict[str, Tensor]  # per-token processor outputs (mm_token_type_ids, token_type_ids): [P]
    vision: dict[str, Tensor]  # pixel_values, image_grid_thw, image_sizes, ... (leading dim = images/patches)


class VLMEncoder:
    """Chat template + processor for prompts; plain tokenisation for responses."""

    def __init__(
        self,
        processor,
        max_length: int | None = None,
        on_too_long: Literal["error", "drop", "truncate_response"] = "error",
        system: str | None = None,
    ):
        self.processor = processor
        self.tok = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.on_too_long = on_too_long
        self.system = system
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.tok.eos_token_id or 0)

    def _messages(self, n_images: int, prompt: str) -> list[dict]:
        msgs = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        return msgs + [{"role": "user", "content": content}]

    def prompt_text(self, n_images: int, prompt: str) -> str:
        return self.processor.apply_chat_template(
            self._messages(n_images, prompt), add_generation_prompt=True, tokenize=False
        )

    def response_text(self, n_images: int, prompt: str, response: str) -> str:
        """The assistant turn as the chat template renders it (end-of-turn tokens included)."""
        head = self.prompt_text(n_images, prompt)
        msgs = self._messages(n_images, prompt) + [
            {"role": "assistant", "content": [{"type": "text", "text": response}]}
        ]
        full = self.processor.apply_chat_template(msgs, tokenize=False)
        if full.startswith(head):
            return full[len(head) :]
        return response + (self.tok.eos_token or "")

    def encode_prompt(self, images: list[Image.Image], prompt: str) -> EncodedPrompt:
        text = self.prompt_text(len(images), prompt)
        enc = self.processor(text=[text], images=images or None, return_tensors="pt")
        ids = enc["input_ids"][0]
        extras, vision = {}, {}
        for k, v in enc.items():
            if k in ("input_ids", "attention_mask") or not isinstance(v, Tensor):
                continue
            if v.ndim == 2 and v.shape == enc["input_ids"].shape:
                extras[k] = v[0]
            else:
                vision[k] = v
        return EncodedPrompt(ids, extras, vision)

    @property
    def media_token_ids(self) -> set[int]:
        ids = set()
        for k in ("image_token_id", "video_token_id"):
            v = getattr(self.processor, k, None)
            if isinstance(v, int):
                ids.add(v)
        return ids

    def encode_response(self, n_images: int, prompt: str, response: str, name: str = "") -> Tensor:
        text = self.response_text(n_images, prompt, response)
        ids = torch.tensor(self.tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        bad = self.media_token_ids & set(ids.tolist())
        if bad:
            raise DataError(
                f"{name or 'response'}: the response contains image/video placeholder tokens {sorted(bad)} "
                f"(e.g. a literal '<image>'); they would not match the image features"
            )
        return ids

    def check_length(self, p: EncodedPrompt, responses: list[Tensor], name: str) -> list[Tensor]:
        """Enforce max_length without ever touching the prompt (and so the image tokens)."""
        if self.max_length is None:
            return responses
        longest = max(len(r) for r in responses)
        if len(p.ids) + longest <= self.max_length:
            return responses
        if self.on_too_long == "truncate_response" and len(p.ids) < self.max_length:
            room = self.max_length - len(p.ids)
            return [r[:room] for r in responses]
        raise TooLong(
            f"{name}: {len(p.ids)} prompt tokens (image tokens included) + {longest} response tokens "
            f"> max_length {self.max_length}; image tokens are never truncated: raise max_length, "
            f"shrink the images (processor max_pixels), or set on_too_long: drop"
        )


def changed_mask(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token flags of where responses a and b differ (RLHF-V's y_c): tokens outside the
    longest common matching blocks (difflib on token ids)."""
    sm = difflib.SequenceMatcher(a=a.tolist(), b=b.tolist(), autojunk=False)
    ca, cb = torch.ones(len(a), dtype=torch.bool), torch.ones(len(b), dtype=torch.bool)
    for i, j, n in sm.get_matching_blocks():
        ca[i : i + n] = False
        cb[j : j + n] = False
    return ca, cb


# --------------------------------------------------------------------------- dataset


class VLMPreferenceDataset(Dataset):
    """Encodes one row per item. Items hold the encoded prompt (+ an optional corrupted-image
    prompt) and the response token ids; `collate` keeps them as a list so a method can build
    whichever sequences it needs with `build_sequences`."""

    def __init__(
        self,
        rowset: VLMRowSet,
        encoder: VLMEncoder,
        corrupt: Literal["crop", "noise"] | None = None,
        skip_bad: bool = False,
        corrupt_kw: dict | None = None,
        log=print,
    ):
        self.encoder = encoder
        self.corrupt = corrupt
        self.corrupt_kw = corrupt_kw or {}
        self.rowset = rowset
        self.ref: dict[str, Tensor] | None = None  # cached reference scores, by item index
        rows = []
        # Fail fast: every image must open and (with max_length) every sample must fit, before training.
        for row in rowset.rows:
            try:
                ims = load_row_images(row)
                resp = [
                    encoder.encode_response(len(ims), row.prompt, r, row.name)
                    for r in (row.chosen, row.rejected, row.completion)
                    if r is not None
                ]
                if encoder.max_length is not None:
                    encoder.check_length(encoder.encode_prompt(ims, row.prompt), resp, row.name)
            except MediaError:
                if not skip_bad:
                    raise
                rowset.bad_skipped += 1
                continue
            except TooLong:
                if encoder.on_too_long != "drop":
                    raise
                rowset.too_long_dropped += 1
                continue
            rows.append(row)
        if not rows:
            raise DataError(
                f"{rowset.source}: no rows left after dropping {rowset.bad_skipped} bad and "
                f"{rowset.too_long_dropped} too-long rows"
            )
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        enc = self.encoder
        ims = load_row_images(row)
        p = enc.encode_prompt(ims, row.prompt)
        item: dict[str, Any] = {
            "prompt": row.prompt,
            "name": row.name,
            "index": i,
            "prompt_enc": p,
            "margin": torch.tensor(row.margin),
            "weight": torch.tensor(row.weight),
        }
        if row.completion is not None:
            (r,) = enc.check_length(p, [enc.encode_response(len(ims), row.prompt, row.completion, row.name)], row.name)
            item.update(response=r, label=torch.tensor(bool(row.label)))
        else:
            w, l = enc.check_length(
                p,
                [
                    enc.encode_response(len(ims), row.prompt, row.chosen, row.name),
                    enc.encode_response(len(ims), row.prompt, row.rejected, row.name),
                ],
                row.name,
            )
            cw, cl = changed_mask(w, l)
            item.update(chosen=w, rejected=l, changed_w=cw, changed_l=cl)
        if self.corrupt:
            fn = corrupt_crop if self.corrupt == "crop" else corrupt_noise
            bad = [fn(im, seed=i * 7919 + k, **self.corrupt_kw) for k, im in enumerate(ims)]
            item["prompt_corrupt"] = enc.encode_prompt(bad, row.prompt)
        if self.ref is not None:
            item["ref"] = {k: v[i] for k, v in self.ref.items()}
        return item

    @staticmethod
    def collate(items: list[dict]) -> dict:
        out: dict[str, Any] = {"prompts": [it["prompt"] for it in items], "items": items}
        for k in ("margin", "weight", "index", "seeds", "label"):
            if k in items[0]:
                out[k] = torch.stack([torch.as_tensor(it[k]) for it in items])
        if "ref" in items[0]:
            out["ref"] = {k: torch.stack([it["ref"][k] for it in items]) for k in items[0]["ref"]}
        return out


# --------------------------------------------------------------------------- padded sequences


def _cat_vision(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    out = {}
    for k in parts[0]:
        xs = [p[k] for p in parts]
        if xs[0].ndim >= 3 and len({x.shape[1:] for x in xs}) > 1:  # e.g. LLaVA-NeXT patch counts differ
            n = max(x.shape[1] for x in xs)
            xs = [torch.cat([x, x.new_zeros(x.shape[0], n - x.shape[1], *x.shape[2:])], 1) for x in xs]
        out[k] = torch.cat(xs)
    return out


def build_sequences(
    prompts: Sequence[EncodedPrompt],
    responses: Sequence[Tensor],
    pad_id: int,
    padding_side: Literal["right", "left"] = "right",
    changed: Sequence[Tensor] | None = None,
) -> dict[str, Any]:
    """Prompt_i + response_i for every i, padded into one batch.

    Returns input_ids / attention_mask / loss_mask (1 on response tokens) / changed (RLHF-V
    flags, on response tokens) [N, L], the per-token processor extras padded with 0, and the
    vision tensors of every prompt concatenated in order (`vision`), ready for the model."""
    n = len(prompts)
    lens = [len(p.ids) + len(r) for p, r in zip(prompts, responses)]
    L = max(lens)
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    att = torch.zeros(n, L, dtype=torch.long)
    lm = torch.zeros(n, L, dtype=torch.long)
    ch = torch.zeros(n, L, dtype=torch.bool)
    keys = list(prompts[0].token_extras)
    extras = {k: torch.zeros(n, L, dtype=prompts[0].token_extras[k].dtype) for k in keys}
    for i, (p, r) in enumerate(zip(prompts, responses)):
        s = L - lens[i] if padding_side == "left" else 0
        P = len(p.ids)
        ids[i, s : s + P] = p.ids
        ids[i, s + P : s + lens[i]] = r
        att[i, s : s + lens[i]] = 1
        lm[i, s + P : s + lens[i]] = 1
        if changed is not None:
            ch[i, s + P : s + lens[i]] = changed[i]
        for k in keys:
            extras[k][i, s : s + P] = p.token_extras[k]
    return {
        "input_ids": ids,
        "attention_mask": att,
        "loss_mask": lm,
        "changed": ch,
        "token_extras": extras,
        "vision": _cat_vision([p.vision for p in prompts]) if prompts[0].vision else {},
    }
