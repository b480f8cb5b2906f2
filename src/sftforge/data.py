"""Files -> rows -> conversations -> (input_ids, loss_mask) samples, with bad-row and truncation policies and a cache.

Every row keeps its origin (``file:line`` for jsonl, ``file row N`` for parquet/json/hub) so that any problem names
the file, the row and what to change. Nothing is dropped silently: every skipped or dropped row is counted by reason
in :class:`DataReport`.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftforge import prefix_tree
from sftforge.chat import (
    Layout,
    RowError,
    TemplateMarkers,
    check_empty_assistant_turns,
    image_sources,
    layout,
    load_chat_template,
    render,
    row_to_conversation,
    template_markers,
    tokenize_layouts,
)
from sftforge.config import Config, ConfigError, DataConfig
from sftforge.model_files import pretrained_args
from sftforge.progress import Live, duration, on_terminal, say
from sftforge.store import Store, StoreWriter, exclusive, open_store, remove_partials
from sftforge.vision import image_file

CACHE_VERSION = "3"  # 2: masks from the template markers (closings per context); 3: the memory-mapped store


class DataError(ValueError):
    """A problem in the user's data; the message names the file, the row and what to change."""


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]
    """Same length as input_ids; 1 = the model is trained to predict this token."""
    source: str = ""
    """Where the sample came from: 'file:line' or 'file row N'."""
    system_merged: bool = False
    """data.system_into_first_user moved its system message into the first user message."""
    reasoning_dropped: int = 0
    """Assistant messages whose reasoning the chat template does not render."""
    parents: list[int] | None = None
    """data.reasoning_history=per_turn: the parent of each token in the sample's prefix tree (prefix_tree.py; -1: a
    root); None for a plain sequence."""
    expanded_tokens: int = 0
    """per_turn: the tokens of the K per-turn contexts laid out one after another (what the tree saves on)."""
    contexts: int = 0
    """per_turn: K, the assistant turns rendered in their own context."""
    images: list | None = None
    """(encoded bytes, (t, h, w) patch grid) of every image, in the order its placeholders come (vision.py)."""
    empty_turns: int = 0
    """Assistant messages with no content and no tool calls, trained as they are (data.empty_assistant_turns=keep)."""


@dataclass
class DataReport:
    rows: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Rows dropped by data.bad_rows=skip, by reason."""
    over_length: int = 0
    """Samples longer than data.max_length before the truncation policy."""
    truncated: int = 0
    """Samples shortened by data.truncation=left|right."""
    dropped_over_length: int = 0
    """Samples removed by data.truncation=drop."""
    dropped_no_trained_tokens: int = 0
    """Samples removed because truncation cut away every trained token."""
    max_tokens_seen: int = 0
    system_merged: int = 0
    """Rows whose system message data.system_into_first_user moved into the first user message."""
    reasoning_dropped: int = 0
    """Assistant messages whose reasoning_content the chat template does not render (so it is not trained)."""
    empty_assistant_turns: int = 0
    """Assistant messages with no content and no tool calls kept and trained (data.empty_assistant_turns=keep); with
    the default such rows are bad rows (skipped under the reason 'empty assistant turn')."""
    contexts: int = 0
    """data.reasoning_history=per_turn: assistant turns rendered in their own inference context."""
    expanded_tokens: int = 0
    """per_turn: the tokens of every context one after another (naive expansion)."""
    images: int = 0
    """Images of the kept samples."""
    image_tokens: int = 0
    """Their placeholder tokens (never trained)."""
    image_bytes: int = 0
    """Their encoded size in the store."""
    dropped_image_cut: int = 0
    """Samples over data.max_length that truncation would have cut through an image: dropped."""
    first_problems: list[str] = field(default_factory=list)
    """A few examples (location: reason) of skipped or dropped rows."""

    def lines(self) -> list[str]:
        out = [
            f"rows read: {self.rows}; samples kept: {self.samples}; tokens: {self.tokens:,}; trained tokens: "
            f"{self.trained_tokens:,} ({self.trained_tokens / max(self.tokens, 1):.1%})"
        ]
        if self.system_merged:
            out.append(
                f"system message merged into the first user message (data.system_into_first_user): "
                f"{self.system_merged} rows"
            )
        if self.reasoning_dropped:
            if self.contexts:  # per_turn: not even in the turn being generated
                why = (
                    " — not even as the turn being generated, so data.reasoning_history=per_turn cannot train it "
                    "(DeepSeek-R1's template keeps only the text after </think>; Llama's and Qwen2.5's render no "
                    "reasoning): set data.chat_template to a template that renders the last assistant turn's "
                    "reasoning_content"
                )
            else:
                why = (
                    " (templates such as Qwen3's drop the reasoning of earlier turns; data.reasoning_history="
                    "per_turn trains it where the template renders the turn being generated with its reasoning)"
                )
            out.append(
                f"reasoning not rendered by the chat template (not trained): {self.reasoning_dropped} "
                f"assistant messages{why}"
            )
        if self.empty_assistant_turns:
            out.append(
                f"empty assistant turns kept and trained (data.empty_assistant_turns=keep): "
                f"{self.empty_assistant_turns} (no content, no tool calls)"
            )
        if self.contexts:
            saving = 1 - self.tokens / max(self.expanded_tokens, 1)
            out.append(
                f"data.reasoning_history=per_turn: {self.contexts} assistant turns, each in its own context, "
                f"as prefix trees: {self.tokens:,} tokens instead of {self.expanded_tokens:,} expanded "
                f"({saving:.1%} saved)"
            )
        if self.images:
            out.append(
                f"images: {self.images:,} ({self.image_tokens:,} image tokens, never trained; "
                f"{self.image_bytes / 2**20:.1f} MiB encoded in the store)"
            )
        for reason, n in sorted(self.skipped.items()):
            out.append(f"skipped (data.bad_rows=skip): {n} rows — {reason}")
        if self.over_length:
            out.append(
                f"over data.max_length: {self.over_length} (longest {self.max_tokens_seen}); truncated: {self.truncated}; "
                f"dropped: {self.dropped_over_length}; dropped because no trained token survived truncation: "
                f"{self.dropped_no_trained_tokens}"
                + (
                    f"; dropped because truncation would cut an image: {self.dropped_image_cut}"
                    if self.dropped_image_cut
                    else ""
                )
            )
        out += [f"  e.g. {p}" for p in self.first_problems[:5]]
        return out


# ------------------------------------------------------------------------------------------------------------------
# Files


def resolve_files(spec: Any, key: str = "data.train_files") -> list[str]:
    """A path, a glob, a list, or a verl-style string "['a.parquet','b.parquet']" -> list of paths or hub ids."""
    if spec is None or spec == "" or spec == []:
        raise ConfigError(f"{key} is empty: set it to a .jsonl/.json/.parquet file, a glob, or a list of them.")
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("["):
            try:
                spec = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                spec = [p.strip().strip("'\"") for p in s.strip("[]").split(",") if p.strip()]
        else:
            spec = [s]
    if not isinstance(spec, (list, tuple)):
        raise ConfigError(f"{key} must be a path, a glob or a list of paths, got {spec!r}.")
    files: list[str] = []
    for item in spec:
        item = os.path.expanduser(str(item))
        if any(c in item for c in "*?["):
            matched = sorted(m for m in glob.glob(item, recursive=True) if not os.path.isdir(m))  # files, not folders
            if not matched:
                raise ConfigError(f"{key}: the glob {item!r} matches no file.")
            files += matched
        elif os.path.isdir(item):
            raise ConfigError(
                f"{key}: {item!r} is a folder; name its files (a glob such as "
                f"{os.path.join(item, '*.parquet')!r} takes all of them)."
            )
        elif os.path.exists(item):
            files.append(item)
        elif _looks_like_hub_id(item):
            files.append(item)
        else:
            raise ConfigError(f"{key}: file {item!r} does not exist (relative paths start at {os.getcwd()}).")
    return files


SUFFIXES = (".jsonl", ".json", ".parquet")


def check_data_paths(data_cfg: DataConfig) -> None:
    """Every path of the data section checked before anything slow: the data files exist (a glob matches), each is a
    file with a readable suffix (not a folder), data.chat_template names a file when it is no template,
    data.image_processor exists and data.cache_dir is not a file."""
    for key in ("train_files", "val_files", "eval_files"):
        spec = getattr(data_cfg, key)
        if spec is None or spec == "" or spec == []:
            continue  # data.train_files: its absence is said where it is needed (rl reads other keys)
        for f in resolve_files(spec, f"data.{key}"):  # (a folder is refused there)
            if os.path.exists(f) and Path(f).suffix.lower() not in SUFFIXES:
                raise ConfigError(
                    f"data.{key}: {f!r} has the unsupported suffix {Path(f).suffix!r}; use "
                    ".jsonl, .json or .parquet (sftforge data convert writes them)."
                )
    if data_cfg.chat_template:
        load_chat_template(data_cfg.chat_template)
    if data_cfg.image_processor and not Path(data_cfg.image_processor).expanduser().exists():
        raise ConfigError(
            f"data.image_processor={data_cfg.image_processor!r} does not exist; give a "
            "preprocessor_config.json or the folder that holds it."
        )
    root = data_cfg.cache_dir
    if root and root.lower() != "none" and Path(root).expanduser().exists() and not Path(root).expanduser().is_dir():
        raise ConfigError(
            f"data.cache_dir={root!r} is a file; give a folder (it is created when missing) or none for no cache."
        )


def _looks_like_hub_id(item: str) -> bool:
    name = item.split(":")[0]
    return name.count("/") == 1 and not name.startswith((".", "/")) and Path(name).suffix == ""


def _location(path: str, n: int) -> str:
    """How a row is named in every message: ``file:line`` for jsonl, ``file row N`` (from 0) otherwise."""
    return f"{path}:{n}" if Path(path).suffix.lower() == ".jsonl" else f"{path} row {n}"


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (location, row) for every row; a line that is not JSON yields a RowError as its row."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield _location(path, n), json.loads(line)
                except json.JSONDecodeError as e:
                    yield _location(path, n), RowError("invalid JSON", f"the line is not valid JSON: {e}")
    elif suffix == ".json":
        for i, row in enumerate(_json_rows(path)):
            yield _location(path, i), row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield _location(path, i), row
                i += 1
    elif not os.path.exists(path) and _looks_like_hub_id(path):
        yield from _read_hub(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet.")


def _read_hub(spec: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{spec!r} is not a local file, and reading a hub dataset needs the 'datasets' package: "
            "pip install 'sftforge[hub]' (or pass a local .jsonl/.parquet file)."
        ) from None
    name, _, split = spec.partition(":")
    ds = datasets.load_dataset(name, split=split or "train")
    for i, row in enumerate(ds):
        yield _location(spec, i), row


def _json_rows(path: str) -> Iterator[Any]:
    """The rows of a .json file holding a list (or {"name": [rows]}), parsed as they come: the file is never read
    whole."""
    dec, f = json.JSONDecoder(), open(path, encoding="utf-8")
    buf, pos, eof = "", 0, False

    def fill() -> bool:
        nonlocal buf, pos, eof
        more = f.read(1 << 20)
        buf, pos, eof = buf[pos:] + more, 0, not more
        return bool(more)

    def peek() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not fill():
                return buf[pos] if pos < len(buf) else ""

    def value() -> Any:
        nonlocal pos
        peek()
        while True:
            try:
                obj, end = dec.raw_decode(buf, pos)
                if end < len(buf) or eof:
                    pos = end
                    return obj
            except json.JSONDecodeError as e:
                if eof:
                    raise DataError(
                        f"{path}: not valid JSON ({e}). A .json file must hold a list of rows; use .jsonl "
                        "for one row per line."
                    ) from None
            fill()

    def expect(ch: str, what: str) -> None:
        nonlocal pos
        if peek() != ch:
            raise DataError(f"{path}: a .json file must hold a list of rows ({what}); use .jsonl for one row per line.")
        pos += 1

    with f:
        first = peek()
        wrapped = first == "{"
        if wrapped:  # {"rows": [...]}: one key holding the list
            pos += 1
            value()
            expect(":", "an object with one key holding a list")
        expect("[", "got " + ("an object" if wrapped else "no list"))
        if peek() == "]":
            pos += 1
        else:
            while True:
                yield value()
                sep = peek()
                pos += 1
                if sep == "]":
                    break
                if sep != ",":
                    raise DataError(f"{path}: not valid JSON (expected ',' or ']' near character {pos}).")
        if wrapped:
            expect("}", "an object with more than one key")
        if peek():
            raise DataError(f"{path}: not valid JSON (extra data after the list).")


def file_fingerprint(path: str, memo: Path | None = None) -> str:
    """The sha256 of a file's bytes (a hub dataset: its id). With ``memo`` (a folder), the hash of an unchanged file
    (same path, size, mtime and inode) is read from there instead of re-reading the file."""
    if not os.path.exists(path):  # hub dataset: the id (and split) is all we have
        return f"hub:{path}"
    st = os.stat(path)
    stamp = [os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino]
    entry = memo / (hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32] + ".json") if memo else None
    if entry is not None:
        try:
            return json.loads(entry.read_text())["sha256"]
        except (OSError, ValueError, KeyError):
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if entry is not None and time.time() - st.st_mtime > 2:  # a file written this instant may change again unseen
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
            os.replace(tmp, entry)
        except OSError:
            pass
    return digest


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(cfg: Config):
    """The tokenizer from model.tokenizer_path (default model.path), with data.chat_template applied."""
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer_path or cfg.model.path
    if not path:
        raise ConfigError("Set model.path (or model.tokenizer_path) to a tokenizer folder or a hub id.")
    key = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path"
    source, gguf = pretrained_args(path, "" if cfg.model.tokenizer_path else cfg.model.gguf_file, key)
    try:  # a GGUF model: its tokenizer and chat template come from the same file
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code, **gguf)
    except Exception as e:
        raise ConfigError(f"{key}={path!r}: could not load a tokenizer ({type(e).__name__}: {e}).") from None
    if cfg.data.chat_template:
        tok.chat_template = load_chat_template(cfg.data.chat_template)
    return tok


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, merges, special tokens and chat template. Serializing a fast tokenizer
    takes ~0.1 s (150k-token vocabularies), so it is kept per tokenizer object, recomputed when its size, special
    tokens or template change (added tokens, a data.chat_template)."""
    state = (
        len(tokenizer),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else "",
    )
    try:
        kept = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # (an object without weak references)
        kept = None
    if kept is not None and kept[0] == state:
        return kept[1]
    digest = _tokenizer_digest(tokenizer)
    try:
        _FINGERPRINTS[tokenizer] = (state, digest)
    except TypeError:
        pass
    return digest


def _tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: its vocabulary and special tokens
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update((tokenizer.chat_template or "").encode() if isinstance(tokenizer.chat_template, str) else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------------
# Tokenization (one row)


def tokenize_row(loc: str, row: Any, tokenizer, data_cfg: DataConfig, markers: TemplateMarkers) -> Sample:
    """One row as one sample (the reference the batched path of :func:`build_dataset` must equal)."""
    if isinstance(row, RowError):
        raise row
    messages, tools, flags = row_to_conversation(row, data_cfg)
    empty = check_empty_assistant_turns(messages, data_cfg)
    if image_sources(messages):
        raise RowError(
            "images",
            "this path renders text only: conversations with images are tokenized by "
            "build_dataset with the model's image processor (data.reasoning_history=per_turn "
            "does not take images)",
        )
    if data_cfg.reasoning_history == "per_turn":
        s = _per_turn(loc, messages, tools, flags, tokenizer, data_cfg, markers)
        s.empty_turns = empty
        return s
    r = render(
        tokenizer,
        messages,
        tools,
        flags,
        data_cfg.train_on,
        data_cfg.chat_template_kwargs,
        markers,
        data_cfg.system_into_first_user,
    )
    if not any(r.loss_mask):
        raise RowError(*_NO_TRAINED)
    return Sample(r.input_ids, r.loss_mask, loc, r.system_merged, r.reasoning_dropped, empty_turns=empty)


_NO_TRAINED = ("no trained tokens", "no token of this conversation is trained (check the train flags)")


def _per_turn(loc, messages, tools, flags, tokenizer, data_cfg: DataConfig, markers) -> Sample:
    """data.reasoning_history=per_turn: every trained assistant turn k as the model generates it — the render of
    messages[:k+1], only turn k trained (each render checked like the default one) — merged into one prefix tree."""
    flags = list(flags or [None] * len(messages))
    contexts, merged, dropped = [], False, 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or flags[k] is False:
            continue
        own = [False if j < k and messages[j]["role"] == "assistant" else flags[j] for j in range(k + 1)]
        r = render(
            tokenizer,
            messages[: k + 1],
            tools,
            own,
            "assistant",
            data_cfg.chat_template_kwargs,
            markers,
            data_cfg.system_into_first_user,
        )
        if any(r.loss_mask):
            contexts.append((r.input_ids, r.loss_mask))
        merged = merged or r.system_merged
        reasoning = (m.get("reasoning_content") or "").strip()
        dropped += int(bool(reasoning) and reasoning not in r.text)
    if not contexts:
        raise RowError(*_NO_TRAINED)
    ids, mask, parents = prefix_tree.merge(contexts)
    expanded = sum(len(x) for x, _ in contexts)
    tree = None if prefix_tree.is_chain(parents) else parents
    return Sample(ids, mask, loc, merged, dropped, tree, expanded, len(contexts))


# ------------------------------------------------------------------------------------------------------------------
# Tokenization (many rows): chunks of rows, each tokenized with one tokenizer call, in worker processes, in order


@dataclass
class _Task:
    """A chunk of input: raw jsonl lines (``lines``, the first one numbered ``first``), an Arrow record batch of a
    parquet file (its first row numbered ``first``), or rows already read (``rows``: (row number, row))."""

    file: int
    lines: bytes | None = None
    batch: Any = None
    rows: list | None = None
    first: int = 0
    done: float = 0.0
    """The share of all input read once this chunk is done (for the progress line)."""


@dataclass
class _Chunk:
    """What a worker made of one task: the kept samples as flat arrays, and the counts for the data report."""

    rows: int = 0
    lengths: Any = None
    ids: Any = None
    mask: Any = None
    parents: Any = None
    tree: Any = None
    trained: Any = None
    row: Any = None
    file: int = 0
    images: Any = None
    """Per kept sample: its number of images (vision models only)."""
    image_bytes: list = field(default_factory=list)
    """Per image of the kept samples: its bytes, or the path of its file (read by the writer: a worker's memory and
    its result stay the size of its input, not of the image files it names)."""
    image_grids: list = field(default_factory=list)
    image_files: set = field(default_factory=set)
    """(path, size, mtime_ns) of the image files read (the store checks them when opened)."""
    bad: list = field(default_factory=list)
    """(location, reason, detail) of every bad row, in input order."""
    counts: Counter = field(default_factory=Counter)
    max_seen: int = 0
    over_examples: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    done: float = 0.0


_WORKER: dict[str, Any] = {}
_PROBLEMS_KEPT = 20


def _task_rows(task: _Task, path: str) -> list[tuple[int, Any]]:
    if task.rows is not None:
        return task.rows
    if task.batch is not None:
        return list(enumerate(task.batch.to_pylist(), task.first))
    out = []
    try:
        text = task.lines.decode("utf-8")
    except UnicodeDecodeError as e:
        n = task.first + _count_lines(task.lines[: e.start])
        raise DataError(f"{path}:{n}: the line is not valid UTF-8 ({e.reason}); save the file as UTF-8.") from None
    for n, line in enumerate(io.StringIO(text, newline=None), task.first):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((n, RowError("invalid JSON", f"the line is not valid JSON: {e}")))
    return out


def _count_lines(b: bytes) -> int:
    """Lines as Python's text mode counts them (universal newlines: \\n, \\r\\n and a lone \\r)."""
    return b.count(b"\n") + b.count(b"\r") - b.count(b"\r\n")


def _tokenize_chunk(task: _Task) -> _Chunk:
    tok, data_cfg, markers, files = _WORKER["tok"], _WORKER["cfg"], _WORKER["markers"], _WORKER["files"]
    path = files[task.file]
    rows = _task_rows(task, path)
    out = _Chunk(rows=len(rows), file=task.file, done=task.done)
    kept: list[tuple[int, str, Any, Any, Any]] = []  # (row, location, ids, mask, parents) in input order
    bad: list[tuple[int, str, str, str]] = []
    lays: list[tuple[int, str, Layout]] = []
    empty: dict[int, int] = {}  # row -> its empty assistant turns kept (data.empty_assistant_turns=keep)
    per_turn = data_cfg.reasoning_history == "per_turn"
    vis = _WORKER.get("vision")
    images: dict[int, list] = {}  # row -> its images (bytes, grid)
    for n, row in rows:
        loc = _location(path, n)
        try:
            if per_turn:
                s = tokenize_row(loc, row, tok, data_cfg, markers)
                out.counts.update(
                    system_merged=int(s.system_merged),
                    reasoning_dropped=s.reasoning_dropped,
                    contexts=s.contexts,
                    expanded_tokens=s.expanded_tokens,
                    empty_assistant_turns=s.empty_turns,
                )
                kept.append((n, loc, np.asarray(s.input_ids, np.int32), np.asarray(s.loss_mask, np.uint8), s.parents))
                continue
            if isinstance(row, RowError):
                raise row
            messages, tools, flags = row_to_conversation(row, data_cfg)
            n_empty = check_empty_assistant_turns(messages, data_cfg)
            imgs = _load_images(messages, path, vis, out.image_files)
            lay = layout(
                tok,
                messages,
                tools,
                flags,
                data_cfg.train_on,
                data_cfg.chat_template_kwargs,
                markers,
                data_cfg.system_into_first_user,
            )
            lays.append((n, loc, lay))
            if imgs:
                images[n] = imgs
            if n_empty:
                empty[n] = n_empty
        except RowError as e:
            bad.append((n, loc, e.reason, e.detail))
    if lays:
        encoded = []  # one tokenizer call per ~256k characters: long conversations keep the call's memory bounded
        for group in _by_size([x for _, _, x in lays], _CALL_CHARS):
            encoded += tokenize_layouts(tok, group)
        for (n, loc, lay), (ids, mask) in zip(lays, encoded):
            if n in images:
                try:
                    ids, mask = vis.expand(ids, mask, [g for _, g in images[n]])
                except RowError as e:
                    bad.append((n, loc, e.reason, e.detail))
                    continue
            if not mask.any():
                bad.append((n, loc, *_NO_TRAINED))
                continue
            out.counts.update(
                system_merged=int(lay.system_merged),
                reasoning_dropped=lay.reasoning_dropped,
                empty_assistant_turns=empty.get(n, 0),
            )
            kept.append((n, loc, ids, mask, None))
        kept.sort(key=lambda x: x[0])
    out.bad = [(loc, reason, detail) for _, loc, reason, detail in sorted(bad, key=lambda x: x[0])]
    out.counts["tokenized"] = len(kept)
    final = [
        x for x in (_truncate(*k, data_cfg, out, n_images=len(images.get(k[0], ()))) for k in kept) if x is not None
    ]
    if vis is not None:
        out.images = np.asarray([len(images.get(x[0], ())) for x in final], np.int32)
        for x in final:
            for data, grid in images.get(x[0], ()):
                out.image_bytes.append(data)
                out.image_grids.append(grid)
    lengths = [len(x[1]) for x in final]
    out.lengths = np.asarray(lengths, np.int32)
    out.ids = np.concatenate([x[1] for x in final]) if final else np.zeros(0, np.int32)
    out.mask = np.concatenate([x[2] for x in final]) if final else np.zeros(0, np.uint8)
    out.trained = np.asarray([int(x[2].sum()) for x in final], np.int32)
    out.row = np.asarray([x[0] for x in final], np.int32)
    if per_turn:  # a plain chain keeps the chain's parents (and tree=0: read back as None)
        out.tree = np.asarray([x[3] is not None for x in final], np.uint8)
        chains = [
            np.asarray(x[3], np.int32) if x[3] is not None else np.arange(-1, len(x[1]) - 1, dtype=np.int32)
            for x in final
        ]
        out.parents = np.concatenate(chains) if chains else np.zeros(0, np.int32)
    return out


def _by_size(layouts: list[Layout], chars: int) -> Iterator[list[Layout]]:
    group, size = [], 0
    for lay in layouts:
        if group and size + len(lay.text) > chars:
            yield group
            group, size = [], 0
        group.append(lay)
        size += len(lay.text)
    if group:
        yield group


def _load_images(messages: list[dict], path: str, vis, files: set) -> list | None:
    """(bytes, grid) of every image of a conversation; paths are relative to the data file's folder. ``files``
    collects (path, size, mtime_ns) of the image files read."""
    sources = image_sources(messages)
    if not sources:
        return None
    if vis is None:
        raise RowError(
            "images on a text model",
            "the conversation has images but model.path has no vision tower "
            "(no vision_config in its config.json): use a vision-language model "
            "(e.g. Qwen2.5-VL) or remove the images",
        )
    base = os.path.dirname(os.path.abspath(path)) if os.path.exists(path) else None
    out = []
    for k, src in enumerate(sources):
        data, grid = vis.load(src, base, f"image {k} ({_describe_source(src)})")
        f = image_file(src, base)
        if f is not None:
            st = f.stat()
            files.add((str(f.resolve()), st.st_size, st.st_mtime_ns))
            data = str(f.resolve())
        out.append((data, grid))
    return out


def _describe_source(src) -> str:
    if isinstance(src, dict):
        src = src.get("path") or ("bytes" if src.get("bytes") else src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"{len(src)} bytes"
    text = str(src)
    return text if len(text) <= 80 else text[:40] + "…"


def _truncate(n, loc, ids, mask, parents, data_cfg: DataConfig, out: _Chunk, n_images: int = 0):
    """data.truncation for one sample: (row, ids, mask, parents), or None when it is dropped (counted in ``out``).
    A sample with images is never cut (its images would lose tokens or their place): over the limit it is dropped
    (counted) under left/right, as under drop."""
    limit, length = data_cfg.max_length, len(ids)
    out.max_seen = max(out.max_seen, length)
    if length <= limit:
        return n, ids, mask, parents
    out.counts["over_length"] += 1
    if data_cfg.truncation == "error":
        if len(out.over_examples) < 3:
            out.over_examples.append(f"{loc} ({length} tokens)")
        return None
    if data_cfg.truncation == "drop":
        out.counts["dropped_over_length"] += 1
        if len(out.problems) < _PROBLEMS_KEPT:
            out.problems.append(f"{loc}: dropped, {length} tokens > data.max_length")
        return None
    if n_images:
        out.counts["dropped_image_cut"] += 1
        if len(out.problems) < _PROBLEMS_KEPT:
            out.problems.append(
                f"{loc}: dropped, {length} tokens > data.max_length and truncation would cut an "
                f"image (raise data.max_length or lower data.image_max_pixels)"
            )
        return None
    if parents is not None:
        raise DataError(
            f"{loc}: its prefix tree (data.reasoning_history=per_turn) has {length} tokens > "
            f"data.max_length={limit}, and a tree cannot be cut at one end: set data.truncation=drop or error, or "
            "raise data.max_length."
        )
    cut = slice(-limit, None) if data_cfg.truncation == "left" else slice(0, limit)
    ids, mask = ids[cut], mask[cut]
    if not mask[1:].any():  # the first token is never a prediction target
        out.counts["dropped_no_trained_tokens"] += 1
        if len(out.problems) < _PROBLEMS_KEPT:
            out.problems.append(f"{loc}: dropped, truncation cut away every trained token")
        return None
    out.counts["truncated"] += 1
    return n, ids, mask, None


_CHUNK_BYTES = 1 << 20  # jsonl bytes per task (~2,700 short conversations, ~150 long agent episodes)
_CHUNK_ROWS = 1024  # rows per task for json and hub datasets, and at most for parquet (fewer for long rows)
_CALL_CHARS = 1 << 18  # characters per tokenizer call


def _tasks(files: list[str]) -> Iterator[_Task]:
    """The input as tasks, streamed: no file is read whole (jsonl by byte blocks cut at line ends, parquet by record
    batches, .json by a streaming parser)."""
    sizes = [os.path.getsize(f) if os.path.exists(f) else 0 for f in files]
    total, before = max(sum(sizes), 1), 0
    for i, f in enumerate(files):
        suffix = Path(f).suffix.lower()
        if suffix == ".jsonl":
            with open(f, "rb") as fh:
                line, rest, pos = 1, b"", 0
                while True:
                    block = fh.read(_CHUNK_BYTES)
                    buf = rest + block
                    cut = buf.rfind(b"\n") + 1 if block else len(buf)
                    if cut == 0 and block:  # no line end yet: read on
                        rest = buf
                        continue
                    chunk, rest = buf[:cut], buf[cut:]
                    if chunk:
                        pos += len(chunk)
                        yield _Task(i, lines=chunk, first=line, done=(before + pos) / total)
                        line += _count_lines(chunk)
                    if not block:
                        break
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            n_rows, first = max(pf.metadata.num_rows, 1), 0
            md = pf.metadata
            row_bytes = sum(md.row_group(g).total_byte_size for g in range(md.num_row_groups)) / n_rows
            rows = int(min(_CHUNK_ROWS, max(16, _CHUNK_BYTES // max(row_bytes, 1))))  # ~_CHUNK_BYTES a task
            for batch in pf.iter_batches(batch_size=rows):
                first += batch.num_rows
                yield _Task(
                    i, batch=batch, first=first - batch.num_rows, done=(before + sizes[i] * first / n_rows) / total
                )
        else:  # .json (streamed) and hub datasets: rows parsed here, tokenized by the workers
            rows = (row for _, row in read_rows(f))  # numbered from 0, as read_rows names them
            for k, chunk in enumerate(_chunks(rows, _CHUNK_ROWS)):
                yield _Task(i, rows=list(enumerate(chunk, k * _CHUNK_ROWS)), done=before / total)
        before += sizes[i]


def _chunks(it: Iterator, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def worker_count(data_cfg: DataConfig, files: list[str]) -> int:
    """data.num_proc: a number, or auto = the usable cores, fewer for a small input (4 MiB of files per worker)."""
    if str(data_cfg.num_proc) != "auto":
        return int(data_cfg.num_proc)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if any(not os.path.exists(f) for f in files):  # a hub dataset: size unknown
        return cores
    size = sum(os.path.getsize(f) for f in files)
    return max(1, min(cores, -(-size // (4 << 20))))


def _chunk_results(
    files: list[str], tokenizer, data_cfg: DataConfig, markers, procs: int, vision=None
) -> Iterator[_Chunk]:
    _WORKER.update(tok=tokenizer, cfg=data_cfg, markers=markers, files=files, vision=vision)
    if procs <= 1:
        for task in _tasks(files):
            yield _tokenize_chunk(task)
        return
    import multiprocessing as mp
    from collections import deque

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # fork: the workers inherit the tokenizer instead of unpickling it. At most 2 tasks per worker are in flight
    # (memory stays bounded however large the input); results are taken in submission order.
    with mp.get_context("fork").Pool(procs) as pool:
        pending: deque = deque()
        for task in _tasks(files):
            pending.append(pool.apply_async(_tokenize_chunk, (task,)))
            if len(pending) >= 2 * procs:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Progress:
    """Tokenization progress once it has taken more than a few seconds: a live bar on a terminal (progress.Live),
    else a plain line on stderr with rows/s and an ETA every 30 s."""

    def __init__(self, what: str, after_s: float = 3.0):
        self.what, self.after = what, after_s
        self.start, self.last = time.monotonic(), float("-inf")  # the first line as soon as after_s has passed
        self.shown, self.tty, self.live = False, on_terminal(), None

    def update(self, rows: int, tokens: int, done: float) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        if elapsed < self.after or now - self.last < (0.2 if self.tty else 30.0):
            return
        self.last, self.shown = now, True
        numbers = f"{rows:,} rows, {tokens:,} tokens, {rows / elapsed:,.0f} rows/s"
        if self.tty:
            if self.live is None:
                self.live = Live(f"tokenize {self.what}", 100)
            self.live.update(int(done * 100), numbers)
            return
        eta = f", ETA {duration(elapsed * (1 - done) / done)}" if 0 < done < 1 else ""
        print(f"tokenizing {self.what}: {numbers}{f', {done:.0%}' if done else ''}{eta}", file=sys.stderr, flush=True)

    def close(self, rows: int, tokens: int) -> None:
        if self.live is not None:
            self.live.close()
        if self.shown:
            elapsed = time.monotonic() - self.start
            line = f"tokenized {self.what}: {rows:,} rows, {tokens:,} tokens in {duration(elapsed)} ({rows / elapsed:,.0f} rows/s)"
            print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------------
# The dataset: policies, the on-disk store, the cache


def template_name(tokenizer, data_cfg: DataConfig) -> str:
    """Which chat template a row was rendered with, for error messages."""
    if data_cfg.chat_template:
        shown = data_cfg.chat_template if "{" not in data_cfg.chat_template else "an inline template"
        return f"chat template: data.chat_template={shown}"
    return f"chat template: the tokenizer's own, {getattr(tokenizer, 'name_or_path', '') or '(unnamed)'}"


_FIX_HINT = "Fix the row, or set data.bad_rows=skip to drop such rows (they are counted and reported)."


class TokenizedDataset(Sequence):
    """The kept samples, in input order, read by index from the memory-mapped store (store.py), plus the report of
    what happened to every row. ``lengths`` and ``trained`` (tokens and trained tokens per sample) are read without
    touching the tokens."""

    def __init__(self, st: Store, report: DataReport, fingerprint: str = "", origin: str = "cache"):
        self.store, self.report = st, report
        self.origin = origin
        """cache (found in the cache), waited (written by another process while this one waited), tokenized"""
        self.fingerprint = fingerprint  # the cache key: files, tokenizer, template and data options
        self.files = [str(f) for f in st.meta.get("files", [])]
        self._tree = st.rows("tree") if st.has("tree") else None
        self._images = open_store(st.path / "images") if st.has("images") else None

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i) -> Sample:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        i %= len(self)
        st = self.store
        parents = st.tokens("parents", i).tolist() if self._tree is not None and self._tree[i] else None
        return Sample(
            st.tokens("input_ids", i).tolist(),
            st.tokens("loss_mask", i).tolist(),
            self.source(i),
            parents=parents,
            images=self.images(i),
        )

    def images(self, i: int) -> list | None:
        """(encoded bytes, (t, h, w)) of sample i's images; None when it has none."""
        if self._images is None or not self.store.rows("images")[i]:
            return None
        first, im = int(self.store.rows("image_first")[i]), self._images
        return [
            (im.tokens("bytes", k).tobytes(), (int(im.rows("t")[k]), int(im.rows("h")[k]), int(im.rows("w")[k])))
            for k in range(first, first + int(self.store.rows("images")[i]))
        ]

    def describe(self) -> str:
        how = {
            "cache": "read from the cache",
            "waited": "written by another process (waited for it), read from there",
            "tokenized": "tokenized into the cache",
        }[self.origin]
        where = self.store.path if self.store.path.exists() else "a temporary store (data.cache_dir=none)"
        return f"tokenized store: {len(self):,} samples {how} ({where})"

    def source(self, i: int) -> str:
        return _location(self.files[int(self.store.rows("file")[i])], int(self.store.rows("row")[i]))

    @property
    def lengths(self) -> np.ndarray:
        return self.store.rows("length")

    @property
    def trained(self) -> np.ndarray:
        return self.store.rows("trained")


def cache_key(
    files: list[str],
    tokenizer,
    data_cfg: DataConfig,
    markers: TemplateMarkers | None = None,
    memo: Path | None = None,
    vision=None,
) -> str:
    opts = {
        k: v
        for k, v in asdict(data_cfg).items()
        if k
        in (
            "format",
            "messages_key",
            "tools_key",
            "prompt_key",
            "response_key",
            "chat_template",
            "chat_template_kwargs",
            "system_into_first_user",
            "train_on",
            "max_length",
            "truncation",
            "bad_rows",
            "empty_assistant_turns",
        )
    }
    if data_cfg.reasoning_history != "template":  # (absent at the default: earlier caches stay valid)
        opts["reasoning_history"] = data_cfg.reasoning_history
    h = hashlib.sha256()
    learned = asdict(markers) if markers is not None else None  # also what the generation config added (stop tokens)
    key = [CACHE_VERSION, opts, tokenizer_fingerprint(tokenizer), learned]
    if vision is not None:  # (absent for text models: their caches stay valid)
        key += [vision.fingerprint(), data_cfg.images_key]
    h.update(json.dumps(key, sort_keys=True, default=str).encode())
    for f in files:
        h.update(f"{f}\0{file_fingerprint(f, memo)}".encode())
    return h.hexdigest()[:32]


def cache_dir(data_cfg: DataConfig) -> Path | None:
    if data_cfg.cache_dir.lower() == "none":
        return None
    root = data_cfg.cache_dir or os.environ.get("SFTFORGE_CACHE") or os.path.join("~", ".cache", "sftforge")
    return Path(os.path.expanduser(root)) / "tokenized"


def _open(path: Path, key: str, origin: str = "cache") -> TokenizedDataset | None:
    st = open_store(path)
    if st is None or (st.has("images") and open_store(Path(path) / "images") is None):  # (a damaged image store too)
        return None
    if st.has("images") and changed_images(Path(path)):
        return None
    return TokenizedDataset(st, DataReport(**st.meta["report"]), key[:16], origin)


def changed_images(entry: Path) -> str:
    """'' when every image file the entry copied is as it was at tokenization; else which changed (the entry is
    then tokenized again: it holds the old bytes)."""
    listing = entry / "images" / _IMAGE_FILES
    if not listing.exists():
        return ""
    changed, n = [], 0
    with open(listing, encoding="utf-8") as f:
        for line in f:
            size, mtime, p = line.rstrip("\n").split("\t", 2)
            try:
                st = os.stat(p)
                same = st.st_size == int(size) and st.st_mtime_ns == int(mtime)
            except OSError:
                same = False
            if not same:
                n += 1
                if len(changed) < 3:
                    changed.append(p)
    return f"{n} image file(s) changed or removed since it was tokenized (e.g. {', '.join(changed)})" if n else ""


def _writable(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            return True
    except OSError as e:
        say(
            f"warning: the tokenization cache {root} is not writable ({e}); tokenizing into a temporary folder "
            "for this run only (set data.cache_dir to a writable folder to keep it)."
        )
        return False


def build_dataset(
    data_cfg: DataConfig, tokenizer, files: Any = None, key: str = "data.train_files", vision=None
) -> TokenizedDataset:
    """Read, normalize, render and tokenize every row of ``files``; apply the bad-row and truncation policies.

    The samples go to a memory-mapped store in the cache (written once: under torchrun one process writes it, the
    others wait and map it) and are read from there by index. ``vision``: a vision-language model's
    :class:`~sftforge.vision.Vision` (images are read, counted into tokens and kept in the store); None for a text
    model (a row with images is then a bad row)."""
    option = key
    files = resolve_files(data_cfg.train_files if files is None else files, key)
    markers = template_markers(tokenizer, data_cfg.chat_template_kwargs)
    root = cache_dir(data_cfg)
    fp = cache_key(
        files, tokenizer, data_cfg, markers, memo=root.parent / "file-hashes" if root else None, vision=vision
    )
    if root is not None:
        found = _open(root / fp, fp)
        if found is not None:
            return found
        root = root if _writable(root) else None
    temporary = root is None
    if temporary:  # no cache: a private store, removed once mapped (the maps keep the files until they close)
        root = Path(tempfile.mkdtemp(prefix="sftforge-tokenized-"))
    what = f"tokenizing {option} ({len(files)} file{'s' * (len(files) > 1)})"
    try:
        with exclusive(root / f"{fp}.lock", data_cfg.cache_wait_s, what) as holder:
            found = _open(root / fp, fp, "waited")
            if found is not None:  # another process (a rank of this job, another job) wrote it while we waited
                return found
            if (root / fp).exists():
                why = changed_images(root / fp)
                what_now = f": {why}" if why else " is damaged (a column's size does not match its meta.json)"
                say(f"warning: the tokenized store {root / fp}{what_now}; tokenizing again.")
            remove_partials(root, fp)
            path = _write(files, tokenizer, data_cfg, markers, root, fp, holder, option, vision)
        return _open(path, fp, "tokenized")
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


def _write(
    files, tokenizer, data_cfg: DataConfig, markers, root: Path, fp: str, holder, option: str, vision=None
) -> Path:
    per_turn = data_cfg.reasoning_history == "per_turn"
    tokens = {"input_ids": "int32", "loss_mask": "uint8", **({"parents": "int32"} if per_turn else {})}
    rows = {
        "length": "int32",
        "trained": "int32",
        "file": "int32",
        "row": "int32",
        **({"tree": "uint8"} if per_turn else {}),
    }
    if vision is not None:
        rows.update(images="int32", image_first="int64")
    writer = StoreWriter(root, fp, tokens, rows)
    # images: a store of their own inside the entry, one "sample" per image (its encoded bytes, its patch grid)
    image_writer = (
        StoreWriter(writer.tmp, "images", {"bytes": "uint8"}, {"t": "int32", "h": "int32", "w": "int32"})
        if vision is not None
        else None
    )
    report, skipped, counts = DataReport(), Counter(), Counter()
    problems, trunc_problems, over_examples = [], [], []
    progress = _Progress(option)
    try:
        for c in _chunk_results(files, tokenizer, data_cfg, markers, worker_count(data_cfg, files), vision):
            report.rows += c.rows
            for loc, reason, detail in c.bad:
                if data_cfg.bad_rows == "error":
                    raise DataError(f"{loc}: {reason}: {detail} [{template_name(tokenizer, data_cfg)}]. {_FIX_HINT}")
                skipped[reason] += 1
                if len(problems) < _PROBLEMS_KEPT:
                    problems.append(f"{loc}: {reason}: {detail}")
            counts.update(c.counts)
            report.max_tokens_seen = max(report.max_tokens_seen, c.max_seen)
            over_examples += c.over_examples[: 3 - len(over_examples)]
            trunc_problems += c.problems[: _PROBLEMS_KEPT - len(trunc_problems)]
            cols = {"input_ids": c.ids, "loss_mask": c.mask, "parents": c.parents}
            extra = {}
            if image_writer is not None:
                first = image_writer.n + np.concatenate([[0], np.cumsum(c.images[:-1], dtype=np.int64)])
                extra = {"images": c.images, "image_first": first[: len(c.images)]}
                _append_images(image_writer, c, vision, report)
            writer.append(
                c.lengths,
                cols,
                {
                    "length": c.lengths,
                    "trained": c.trained,
                    "row": c.row,
                    "tree": c.tree,
                    "file": np.full(len(c.lengths), c.file, np.int32),
                    **extra,
                },
            )
            report.samples, report.tokens = writer.n, writer.n_tokens
            report.trained_tokens += int(c.trained.sum(dtype=np.int64))
            progress.update(report.rows, report.tokens, c.done)
            holder.progress(f"{report.rows:,} rows")
        progress.close(report.rows, report.tokens)
        report.skipped = dict(skipped)
        report.system_merged, report.reasoning_dropped = counts["system_merged"], counts["reasoning_dropped"]
        report.empty_assistant_turns = counts["empty_assistant_turns"]
        if per_turn:
            report.contexts, report.expanded_tokens = counts["contexts"], counts["expanded_tokens"]
        report.over_length, report.truncated = counts["over_length"], counts["truncated"]
        report.dropped_over_length = counts["dropped_over_length"]
        report.dropped_no_trained_tokens = counts["dropped_no_trained_tokens"]
        report.dropped_image_cut = counts["dropped_image_cut"]
        report.first_problems = problems + trunc_problems
        if data_cfg.truncation == "error" and report.over_length:
            raise DataError(
                f"{report.over_length} of {counts['tokenized']} samples are longer than data.max_length="
                f"{data_cfg.max_length} (longest {report.max_tokens_seen} tokens), e.g. {'; '.join(over_examples)}. "
                f"Raise data.max_length to at least {report.max_tokens_seen}, or set data.truncation to left (keep the "
                "end), right (keep the start) or drop."
            )
        if not report.samples:
            raise DataError(
                f"No usable sample in {', '.join(files)} ({report.rows} rows read). " + " ".join(report.lines()[1:])
            )
        if image_writer is not None:
            image_writer.commit({"vision": vision.source})
        return writer.commit({"report": asdict(report), "files": files})
    except BaseException:
        if image_writer is not None:
            image_writer.abort()
        writer.abort()
        raise


_IMAGE_FILES = "files.tsv"  # in the images store: size, mtime_ns and path of every image file read
_IMAGE_GROUP_BYTES = 1 << 26  # image bytes the writer holds at a time


def _append_images(image_writer: StoreWriter, c: _Chunk, vision, report: DataReport) -> None:
    if c.image_files:
        with open(image_writer.tmp / _IMAGE_FILES, "a", encoding="utf-8") as f:
            f.writelines(f"{size}\t{mtime}\t{p}\n" for p, size, mtime in sorted(c.image_files))
    group: list[bytes] = []

    def flush():
        if group:
            grids = np.asarray(c.image_grids[report.images - first : report.images - first + len(group)], np.int32)
            sizes = np.asarray([len(b) for b in group], np.int64)
            image_writer.append(
                sizes,
                {"bytes": np.frombuffer(b"".join(group), np.uint8)},
                {"t": grids[:, 0], "h": grids[:, 1], "w": grids[:, 2]},
            )
            report.images += len(group)
            report.image_bytes += int(sizes.sum())
            group.clear()

    first, size = report.images, 0
    for b in c.image_bytes:  # file images are read here, ~64 MiB at a time
        group.append(b if isinstance(b, bytes) else Path(b).read_bytes())
        size += len(group[-1])
        if size >= _IMAGE_GROUP_BYTES:
            flush()
            size = 0
    flush()
    report.image_tokens += int(sum(vision.tokens(g) for g in c.image_grids))
