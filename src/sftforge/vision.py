"""Images in conversations (Qwen2.5-VL / Qwen3-VL and models built the same way): sources, the image processor,
placeholder expansion and the 3-D (temporal, height, width) rotary positions of a sample.

The flow, from a row to the model:

- a message part ``{"type": "image", "image": SOURCE}`` (chat.normalize_messages also takes OpenAI's ``image_url``
  and the ``images`` column + ``<image>`` placeholders of verl / LLaMA-Factory); SOURCE is a path (relative to the
  data file), ``file://`` URL, data URL, base64 text, raw bytes, or a ``{"bytes": ..., "path": ...}`` struct as
  Hugging Face ``datasets`` writes images into parquet. :func:`image_bytes` reads it; a missing or unreadable image
  is a :class:`~sftforge.chat.RowError` naming the image (the bad-row policy applies).
- the chat template renders one placeholder per image (``<|vision_start|><|image_pad|><|vision_end|>`` in Qwen's);
  :meth:`Vision.expand` repeats the placeholder token once per merged patch of the image, as the image processor
  will cut it (``smart_resize`` of the processor itself, with its min/max pixels or data.image_min_pixels /
  data.image_max_pixels). Vision tokens are never trained, whatever data.train_on says.
- the tokenized store keeps each image's ENCODED bytes (as in the source) and its patch grid; a micro-batch decodes
  and processes its images when it is collated (:meth:`Vision.pixels`). Measured (benchmarks/vlm_store.py): the
  processed float32 pixels are 67× (a 448×448 JPEG) to 198× (the demo's 112×112 PNGs) the encoded bytes, while
  decoding + processing costs 0.4 ms (demo) to 39 ms (1024×768) per image — 7% of the demo's CPU step — so the
  store stays the size of the images and the data stays on disk.
- :func:`rope_positions`: a sample's [3, L] positions (text tokens advance all three together; an image's tokens get
  (t, row, column) offsets from where the image starts, and the text after it resumes past the image's extent), the
  scheme of Qwen2-VL's ``get_rope_index``, computed per sample on the host, so that packed samples each restart at
  0 — a packed row equals the samples run one by one (tests/test_vision.py checks it against the model's own).

The image processor is transformers' ``Qwen2VLImageProcessorPil`` (Pillow only: torchvision does not import beside
the CPU torch build, and ``Qwen2_5_VLProcessor`` insists on a video processor), configured from the model's
``preprocessor_config.json`` (or data.image_processor).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftforge.chat import RowError
from sftforge.config import ConfigError

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")
"""Tokens of the vision placeholders: never trained."""
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
_SETTINGS = (
    "patch_size",
    "merge_size",
    "temporal_patch_size",
    "min_pixels",
    "max_pixels",
    "image_mean",
    "image_std",
    "do_resize",
    "do_rescale",
    "do_normalize",
    "do_convert_rgb",
    "rescale_factor",
    "resample",
    "size",
)


def check_pillow() -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ConfigError("the data has images: install Pillow (pip install 'sftforge[vision]').") from None


def _processor_module():
    """transformers' Pillow-only Qwen2-VL image processor module (no torchvision needed)."""
    check_pillow()
    try:
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as module
    except ImportError:
        import transformers

        raise ConfigError(
            f"images need transformers' Qwen2VLImageProcessorPil (Pillow only), which transformers "
            f"{transformers.__version__} lacks: pip install -U 'transformers>=5.24,<6'."
        ) from None
    return module


def image_bytes(source: Any, base_dir: str | Path | None, what: str) -> bytes:
    """The encoded bytes of one image SOURCE (see the module doc); ``what`` names it in errors ("image 2")."""
    if isinstance(source, dict):  # datasets' Image feature: {"bytes": b"...", "path": "..."}
        if source.get("bytes"):
            return bytes(source["bytes"])
        source = source.get("path") or source.get("url")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not isinstance(source, str) or not source:
        raise RowError(
            "bad image", f"{what}: expected a path, data URL, base64 text or bytes, got {type(source).__name__}"
        )
    if source.startswith("data:"):
        _, _, payload = source.partition(",")
        return _b64(payload, what)
    if source.startswith(("http://", "https://")):
        raise RowError(
            "bad image",
            f"{what}: {source[:80]} is a web URL; download the images and give their paths "
            "(nothing is fetched during training).",
        )
    path = _source_path(source, base_dir)
    try:
        return path.read_bytes()
    except OSError as e:
        data = _maybe_b64(source)
        if data is not None:  # not a file: base64 text of an image
            return data
        raise RowError(
            "bad image", f"{what}: cannot read {path} ({e.strerror or e}); paths are relative to the data file's folder"
        ) from None


def _source_path(source: str, base_dir) -> Path:
    if source.startswith("file://"):
        source = source[len("file://") :]
    path = Path(source).expanduser()
    return Path(base_dir) / path if not path.is_absolute() and base_dir is not None else path


def image_file(source: Any, base_dir) -> Path | None:
    """The file an image source names (None for bytes, base64 and data URLs): the tokenized store keeps a copy of
    its bytes and checks, when it is opened, that the file has not changed since (data.py)."""
    if isinstance(source, dict) and not source.get("bytes"):
        source = source.get("path")
    if not isinstance(source, str) or source.startswith("data:"):
        return None
    path = _source_path(source, base_dir)
    return path if path.is_file() else None


def _maybe_b64(text: str) -> bytes | None:
    if len(text) < 16 or "/" in text[:8] and not text.startswith("/9j/"):  # (JPEG's base64 starts with /9j/)
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if data.startswith(_MAGIC) else None


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise RowError("bad image", f"{what}: not valid base64 ({e})") from None


def open_image(data: bytes, what: str):
    """A decoded RGB PIL image; RowError when the bytes are not an image Pillow reads."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise RowError("bad image", f"{what}: not a readable image ({type(e).__name__}: {e})") from None
    return img.convert("RGB") if img.mode != "RGB" else img


@dataclass
class Vision:
    """What images need, from the model's config and its image processor's settings (picklable: data workers get
    it); :func:`load_vision` builds it."""

    settings: dict
    """The image processor's settings (preprocessor_config.json, with the data.image_* overrides)."""
    image_token: str
    image_token_id: int
    untrained_ids: tuple[int, ...]
    merge_size: int
    frame_ids: tuple[int, int] | None = None
    """(vision start, vision end) token ids around an image's placeholders (for :meth:`blank_sample`)."""
    source: str = ""
    """Where the settings came from (shown in the data report)."""
    _processor: Any = field(default=None, repr=False, compare=False)

    @property
    def patch_size(self) -> int:
        return int(self.settings.get("patch_size", 14))

    @property
    def min_pixels(self) -> int:
        return int(self.settings["min_pixels"])

    @property
    def max_pixels(self) -> int:
        return int(self.settings["max_pixels"])

    def fingerprint(self) -> str:
        """Everything that changes the tokens of an image (part of the tokenization cache key)."""
        blob = json.dumps([self.settings, self.image_token_id, self.untrained_ids, self.merge_size], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def grid(self, width: int, height: int) -> tuple[int, int, int]:
        """(t, h, w) patches of a still image, as the processor will resize it."""
        smart_resize = _processor_module().smart_resize
        factor = self.patch_size * self.merge_size
        try:
            h, w = smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as e:  # an extreme aspect ratio
            raise RowError("bad image", f"{width}×{height}: {e}") from None
        return 1, h // self.patch_size, w // self.patch_size

    def tokens(self, grid) -> int:
        t, h, w = (int(x) for x in grid)
        return t * h * w // (self.merge_size**2)

    def load(self, source: Any, base_dir, what: str) -> tuple[bytes, tuple[int, int, int]]:
        """(encoded bytes, patch grid) of one image source, checked to decode."""
        data = image_bytes(source, base_dir, what)
        img = open_image(data, what)
        return data, self.grid(*img.size)

    def expand(self, ids: np.ndarray, mask: np.ndarray, grids: list) -> tuple[np.ndarray, np.ndarray]:
        """Each image placeholder token repeated once per merged patch of its image; vision tokens untrained."""
        at = np.flatnonzero(ids == self.image_token_id)
        if len(at) != len(grids):
            raise RowError(
                "template mismatch",
                f"the chat template rendered {len(at)} image placeholder(s) "
                f"{self.image_token!r} for {len(grids)} image(s)",
            )
        if len(at):
            reps = np.ones(len(ids), np.int64)
            reps[at] = [self.tokens(g) for g in grids]
            ids, mask = np.repeat(ids, reps), np.repeat(mask, reps)
        if self.untrained_ids:
            mask = np.where(np.isin(ids, self.untrained_ids), 0, mask).astype(np.uint8)
        return ids, mask

    def processor(self):
        if self._processor is None:
            cls = _processor_module().Qwen2VLImageProcessorPil
            self._processor = cls(**{k: v for k, v in self.settings.items() if k in _SETTINGS})
        return self._processor

    def pixels(self, images: list[bytes], grids: list) -> dict:
        """``pixel_values`` and ``image_grid_thw`` of a micro-batch's images (in row order), checked against the grids
        counted at tokenization."""
        import torch

        pil = [open_image(b, f"image {k}") for k, b in enumerate(images)]
        out = self.processor()(images=pil, return_tensors="pt")
        got = out["image_grid_thw"].tolist()
        if [list(map(int, g)) for g in grids] != got:
            raise ValueError(
                f"the image processor cut the images into {got} patches but tokenization counted {grids}: the "
                "tokenized store was made with other image settings; remove data.cache_dir's entry or retokenize."
            )
        return {"pixel_values": out["pixel_values"], "image_grid_thw": torch.as_tensor(got, dtype=torch.long)}

    def save(self, folder: str | Path) -> Path:
        """preprocessor_config.json in ``folder`` (an export): the settings used in training, min/max pixels
        included, in the form transformers' AutoImageProcessor reads."""
        out = {k: v for k, v in self.settings.items() if k not in ("min_pixels", "max_pixels")}
        out["size"] = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        out.setdefault("image_processor_type", "Qwen2VLImageProcessor")
        path = Path(folder) / "preprocessor_config.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        return path

    def blank_sample(self) -> dict:
        """An untrained sample holding one black image of the smallest size the processor makes: under DDP/FSDP2 a
        micro-batch without images gets it, so that every rank runs the vision tower (the same collectives and
        gradient reductions; the sample's outputs reach no loss, so its gradients are zero)."""
        factor = self.patch_size * self.merge_size
        check_pillow()
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (factor, factor)).save(buf, "PNG")
        data = buf.getvalue()
        grid = self.grid(factor, factor)
        start, end = self.frame_ids or (self.image_token_id, self.image_token_id)
        ids = [start] + [self.image_token_id] * self.tokens(grid) + [end]
        return {"input_ids": ids, "loss_mask": [0] * len(ids), "images": [(data, grid)]}

    def positions(self, ids, grids) -> np.ndarray:
        return rope_positions(ids, grids, self.image_token_id, self.merge_size)


def rope_positions(ids, grids, image_token_id: int, merge_size: int) -> np.ndarray:
    """[3, L] (temporal, height, width) positions of one sample (see the module doc)."""
    ids = np.asarray(ids)
    out = np.empty((3, len(ids)), np.int64)
    image = ids == image_token_id
    edges = np.flatnonzero(np.diff(image.astype(np.int8))) + 1  # where a text run or an image's tokens begin
    pos, k = 0, 0
    for start, end in zip([0, *edges.tolist()], [*edges.tolist(), len(ids)]):
        if not image[start]:
            out[:, start:end] = np.arange(pos, pos + end - start)
            pos += end - start
            continue
        while start < end:  # one image's tokens after another (adjacent images share a run)
            t, h, w = (int(x) for x in grids[k])
            k += 1
            gh, gw = h // merge_size, w // merge_size
            size = t * gh * gw
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            out[:, start : start + size] = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos
            pos += max(gh, gw)
            start += size
    return out


def _settings_file(path: str) -> Path | None:
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if (p / "preprocessor_config.json").exists():
        return p / "preprocessor_config.json"
    return None


def load_vision(cfg, tokenizer) -> Vision | None:
    """The model's :class:`Vision`, or None for a model without a vision tower (its config has no vision_config).

    Settings: data.image_processor (a preprocessor_config.json or its folder), else the one beside the tokenizer or
    the model (a local folder or a hub id)."""
    model_cfg = _model_config(cfg)
    vcfg = model_cfg.get("vision_config") if model_cfg else None
    if not vcfg:
        if cfg.data.image_processor:
            raise ConfigError(
                f"data.image_processor={cfg.data.image_processor!r} is set but model.path "
                f"({cfg.model.path}) has no vision tower (no vision_config in its config)."
            )
        return None
    candidates = [cfg.data.image_processor] if cfg.data.image_processor else [cfg.model.tokenizer_path, cfg.model.path]
    found = next((f for c in candidates if c for f in [_settings_file(c) or _hub_file(c)] if f), None)
    if found is None:
        key = "data.image_processor" if cfg.data.image_processor else "model.path"
        raise ConfigError(
            f"{key}: no preprocessor_config.json found in {', '.join(c for c in candidates if c)}; the model has a "
            "vision tower and its image processor settings are needed. Set data.image_processor to the file (or its "
            "folder)."
        )
    try:
        settings = json.loads(Path(found).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{found}: not a readable preprocessor_config.json ({e}).") from None
    size = settings.get("size") or {}
    settings.setdefault("min_pixels", size.get("shortest_edge", 56 * 56))
    settings.setdefault("max_pixels", size.get("longest_edge", 28 * 28 * 1280))
    settings.pop("size", None)
    if cfg.data.image_min_pixels:
        settings["min_pixels"] = cfg.data.image_min_pixels
    if cfg.data.image_max_pixels:
        settings["max_pixels"] = cfg.data.image_max_pixels
    if settings["min_pixels"] > settings["max_pixels"]:
        raise ConfigError(
            f"data.image_min_pixels ({settings['min_pixels']}) > data.image_max_pixels ({settings['max_pixels']})."
        )
    merge = int(vcfg.get("spatial_merge_size", settings.get("merge_size", 2)))
    if int(settings.get("merge_size", merge)) != merge:
        raise ConfigError(
            f"{found}: merge_size {settings['merge_size']} differs from the model's "
            f"vision_config.spatial_merge_size {merge}."
        )
    if "patch_size" in vcfg and int(settings.get("patch_size", vcfg["patch_size"])) != int(vcfg["patch_size"]):
        raise ConfigError(
            f"{found}: patch_size {settings['patch_size']} differs from the model's "
            f"vision_config.patch_size {vcfg['patch_size']}."
        )
    image_id = model_cfg.get("image_token_id", model_cfg.get("image_token_index"))
    if image_id is None:
        raise ConfigError(f"model.path={cfg.model.path!r}: its config has a vision tower but no image_token_id.")
    token = tokenizer.convert_ids_to_tokens(int(image_id))
    untrained = sorted(
        {int(image_id)}
        | {
            int(i)
            for t in VISION_TOKENS
            for i in [tokenizer.convert_tokens_to_ids(t)]
            if i is not None and i != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(i) == t
        }
    )
    frame = (model_cfg.get("vision_start_token_id"), model_cfg.get("vision_end_token_id"))
    frame_ids = (int(frame[0]), int(frame[1])) if None not in frame else None
    return Vision(settings, token, int(image_id), tuple(untrained), merge, frame_ids, str(found))


def _model_config(cfg) -> dict | None:
    """The model's config.json as a dict (a local folder or a hub id), None when there is none to read."""
    path = cfg.model.path
    if not path:
        return None
    local = Path(path).expanduser()
    f = local / "config.json" if local.is_dir() else _hub_file(path, "config.json")
    try:
        return json.loads(Path(f).read_text()) if f else None
    except (OSError, ValueError):
        return None


def _hub_file(repo: str, name: str = "preprocessor_config.json") -> Path | None:
    if Path(repo).expanduser().exists() or repo.count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, name))
    except Exception:
        return None


__all__ = [
    "VISION_TOKENS",
    "Vision",
    "check_pillow",
    "image_bytes",
    "image_file",
    "load_vision",
    "open_image",
    "rope_positions",
]
