"""Files -> rows -> conversations -> (input_ids, loss_mask) samples, with bad-row and truncation policies and a cache.

Every row keeps its origin (``file:line`` for jsonl, ``file row N`` for parquet/json/hub) so that any problem names
the file, the row and what to change. Nothing is dropped silently: every skipped or dropped row is counted by reason
in :class:`DataReport`.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sftforge import prefix_tree
from sftforge.chat import RowError, TemplateMarkers, load_chat_template, render, row_to_conversation, template_markers
from sftforge.config import Config, ConfigError, DataConfig

CACHE_VERSION = "2"  # 2: masks from the template markers of chat.template_markers (closings per context)


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
    contexts: int = 0
    """data.reasoning_history=per_turn: assistant turns rendered in their own inference context."""
    expanded_tokens: int = 0
    """per_turn: the tokens of every context one after another (naive expansion)."""
    first_problems: list[str] = field(default_factory=list)
    """A few examples (location: reason) of skipped or dropped rows."""

    def lines(self) -> list[str]:
        out = [
            f"rows read: {self.rows}; samples kept: {self.samples}; tokens: {self.tokens:,}; trained tokens: "
            f"{self.trained_tokens:,} ({self.trained_tokens / max(self.tokens, 1):.1%})"
        ]
        if self.system_merged:
            out.append(f"system message merged into the first user message (data.system_into_first_user): "
                       f"{self.system_merged} rows")  # fmt: skip
        if self.reasoning_dropped:
            out.append(f"reasoning not rendered by the chat template (not trained): {self.reasoning_dropped} "
                       "assistant messages (templates such as Qwen3's drop the reasoning of earlier turns)")  # fmt: skip
        if self.contexts:
            saving = 1 - self.tokens / max(self.expanded_tokens, 1)
            out.append(f"data.reasoning_history=per_turn: {self.contexts} assistant turns, each in its own context, "
                       f"as prefix trees: {self.tokens:,} tokens instead of {self.expanded_tokens:,} expanded "
                       f"({saving:.1%} saved)")  # fmt: skip
        for reason, n in sorted(self.skipped.items()):
            out.append(f"skipped (data.bad_rows=skip): {n} rows — {reason}")
        if self.over_length:
            out.append(
                f"over data.max_length: {self.over_length} (longest {self.max_tokens_seen}); truncated: {self.truncated}; "
                f"dropped: {self.dropped_over_length}; dropped because no trained token survived truncation: "
                f"{self.dropped_no_trained_tokens}"
            )
        out += [f"  e.g. {p}" for p in self.first_problems[:5]]
        return out


class TokenizedDataset(Sequence):
    """The kept samples, in input order, plus the report of what happened to every row."""

    def __init__(self, samples: list[Sample], report: DataReport, fingerprint: str = ""):
        self.samples = samples
        self.report = report
        self.fingerprint = fingerprint  # the cache key: files, tokenizer, template and data options

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


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
            matched = sorted(glob.glob(item, recursive=True))
            if not matched:
                raise ConfigError(f"{key}: the glob {item!r} matches no file.")
            files += matched
        elif os.path.exists(item):
            files.append(item)
        elif _looks_like_hub_id(item):
            files.append(item)
        else:
            raise ConfigError(f"{key}: file {item!r} does not exist (relative paths start at {os.getcwd()}).")
    return files


def _looks_like_hub_id(item: str) -> bool:
    name = item.split(":")[0]
    return name.count("/") == 1 and not name.startswith((".", "/")) and Path(name).suffix == ""


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (location, row) for every row; a line that is not JSON yields a RowError as its row."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{n}", RowError("invalid JSON", f"the line is not valid JSON: {e}")
    elif suffix == ".json":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: not valid JSON ({e}). A .json file must hold a list of rows; use .jsonl for one row per line."
            ) from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json file must hold a list of rows, got {type(data).__name__}.")
        for i, row in enumerate(data):
            yield f"{path} row {i}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path} row {i}", row
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
        yield f"{spec} row {i}", row


def file_fingerprint(path: str) -> str:
    if not os.path.exists(path):  # hub dataset: the id (and split) is all we have
        return f"hub:{path}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(cfg: Config):
    """The tokenizer from model.tokenizer_path (default model.path), with data.chat_template applied."""
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer_path or cfg.model.path
    if not path:
        raise ConfigError("Set model.path (or model.tokenizer_path) to a tokenizer folder or a hub id.")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:
        key = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path"
        raise ConfigError(f"{key}={path!r}: could not load a tokenizer ({type(e).__name__}: {e}).") from None
    if cfg.data.chat_template:
        tok.chat_template = load_chat_template(cfg.data.chat_template)
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
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

_WORKER: dict[str, Any] = {}


def tokenize_row(loc: str, row: Any, tokenizer, data_cfg: DataConfig, markers: TemplateMarkers) -> Sample:
    if isinstance(row, RowError):
        raise row
    messages, tools, flags = row_to_conversation(row, data_cfg)
    if data_cfg.reasoning_history == "per_turn":
        return _per_turn(loc, messages, tools, flags, tokenizer, data_cfg, markers)
    r = render(tokenizer, messages, tools, flags, data_cfg.train_on, data_cfg.chat_template_kwargs, markers,
               data_cfg.system_into_first_user)  # fmt: skip
    if not any(r.loss_mask):
        raise RowError("no trained tokens", "no token of this conversation is trained (check the train flags)")
    return Sample(r.input_ids, r.loss_mask, loc, r.system_merged, r.reasoning_dropped)


def _per_turn(loc, messages, tools, flags, tokenizer, data_cfg: DataConfig, markers) -> Sample:
    """data.reasoning_history=per_turn: every trained assistant turn k as the model generates it — the render of
    messages[:k+1], only turn k trained (each render checked like the default one) — merged into one prefix tree."""
    flags = list(flags or [None] * len(messages))
    contexts, merged, dropped = [], False, 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or flags[k] is False:
            continue
        own = [False if j < k and messages[j]["role"] == "assistant" else flags[j] for j in range(k + 1)]
        r = render(tokenizer, messages[: k + 1], tools, own, "assistant", data_cfg.chat_template_kwargs, markers,
                   data_cfg.system_into_first_user)  # fmt: skip
        if any(r.loss_mask):
            contexts.append((r.input_ids, r.loss_mask))
        merged = merged or r.system_merged
        reasoning = (m.get("reasoning_content") or "").strip()
        dropped += int(bool(reasoning) and reasoning not in r.text)
    if not contexts:
        raise RowError("no trained tokens", "no token of this conversation is trained (check the train flags)")
    ids, mask, parents = prefix_tree.merge(contexts)
    expanded = sum(len(x) for x, _ in contexts)
    tree = None if prefix_tree.is_chain(parents) else parents
    return Sample(ids, mask, loc, merged, dropped, tree, expanded, len(contexts))


def _worker_chunk(chunk: list[tuple[str, Any]]) -> list[Sample | tuple[str, str, str]]:
    tok, data_cfg, markers = _WORKER["tok"], _WORKER["cfg"], _WORKER["markers"]
    out: list[Sample | tuple[str, str, str]] = []
    for loc, row in chunk:
        try:
            out.append(tokenize_row(loc, row, tok, data_cfg, markers))
        except RowError as e:
            out.append((loc, e.reason, e.detail))
    return out


def _chunks(it: Iterator, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _tokenize_all(files: list[str], tokenizer, data_cfg: DataConfig, markers) -> Iterator[Sample | tuple]:
    rows = (item for f in files for item in read_rows(f))
    _WORKER.update(tok=tokenizer, cfg=data_cfg, markers=markers)
    if data_cfg.num_proc <= 1:
        for chunk in _chunks(rows, 256):
            yield from _worker_chunk(chunk)
        return
    import multiprocessing as mp

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # fork: workers inherit the tokenizer instead of unpickling it; imap keeps input order.
    with mp.get_context("fork").Pool(data_cfg.num_proc) as pool:
        for result in pool.imap(_worker_chunk, _chunks(rows, 64)):
            yield from result


# ------------------------------------------------------------------------------------------------------------------
# The dataset: policies and cache


def template_name(tokenizer, data_cfg: DataConfig) -> str:
    """Which chat template a row was rendered with, for error messages."""
    if data_cfg.chat_template:
        shown = data_cfg.chat_template if "{" not in data_cfg.chat_template else "an inline template"
        return f"chat template: data.chat_template={shown}"
    return f"chat template: the tokenizer's own, {getattr(tokenizer, 'name_or_path', '') or '(unnamed)'}"


_FIX_HINT = "Fix the row, or set data.bad_rows=skip to drop such rows (they are counted and reported)."


def _apply_truncation(samples: list[Sample], data_cfg: DataConfig, report: DataReport) -> list[Sample]:
    limit = data_cfg.max_length
    over = [s for s in samples if len(s.input_ids) > limit]
    report.over_length = len(over)
    report.max_tokens_seen = max((len(s.input_ids) for s in samples), default=0)
    if not over:
        return samples
    if data_cfg.truncation == "error":
        examples = "; ".join(f"{s.source} ({len(s.input_ids)} tokens)" for s in over[:3])
        raise DataError(
            f"{len(over)} of {len(samples)} samples are longer than data.max_length={limit} (longest "
            f"{report.max_tokens_seen} tokens), e.g. {examples}. Raise data.max_length to at least "
            f"{report.max_tokens_seen}, or set data.truncation to left (keep the end), right (keep the start) or drop."
        )
    kept = []
    for s in samples:
        if len(s.input_ids) <= limit:
            kept.append(s)
            continue
        if data_cfg.truncation == "drop":
            report.dropped_over_length += 1
            report.first_problems.append(f"{s.source}: dropped, {len(s.input_ids)} tokens > data.max_length")
            continue
        if s.parents is not None:
            raise DataError(
                f"{s.source}: its prefix tree (data.reasoning_history=per_turn) has {len(s.input_ids)} tokens > "
                f"data.max_length={limit}, and a tree cannot be cut at one end: set data.truncation=drop or error, or "
                "raise data.max_length."
            )
        cut = slice(-limit, None) if data_cfg.truncation == "left" else slice(0, limit)
        s = Sample(s.input_ids[cut], s.loss_mask[cut], s.source)
        if not any(s.loss_mask[1:]):  # the first token is never a prediction target
            report.dropped_no_trained_tokens += 1
            report.first_problems.append(f"{s.source}: dropped, truncation cut away every trained token")
            continue
        report.truncated += 1
        kept.append(s)
    return kept


def cache_key(files: list[str], tokenizer, data_cfg: DataConfig, markers: TemplateMarkers | None = None) -> str:
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
        )
    }
    if data_cfg.reasoning_history != "template":  # (absent at the default: earlier caches stay valid)
        opts["reasoning_history"] = data_cfg.reasoning_history
    h = hashlib.sha256()
    learned = asdict(markers) if markers is not None else None  # also what the generation config added (stop tokens)
    key = [CACHE_VERSION, opts, tokenizer_fingerprint(tokenizer), learned]
    h.update(json.dumps(key, sort_keys=True, default=str).encode())
    for f in files:
        h.update(f"{f}\0{file_fingerprint(f)}".encode())
    return h.hexdigest()[:32]


def cache_dir(data_cfg: DataConfig) -> Path | None:
    if data_cfg.cache_dir.lower() == "none":
        return None
    root = data_cfg.cache_dir or os.environ.get("SFTFORGE_CACHE") or os.path.join("~", ".cache", "sftforge")
    return Path(os.path.expanduser(root)) / "tokenized"


def _save_cache(path: Path, ds: TokenizedDataset) -> None:
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "input_ids": pa.array([s.input_ids for s in ds.samples], type=pa.list_(pa.int32())),
            "loss_mask": pa.array([s.loss_mask for s in ds.samples], type=pa.list_(pa.int8())),
            "source": pa.array([s.source for s in ds.samples], type=pa.string()),
            "parents": pa.array([s.parents for s in ds.samples], type=pa.list_(pa.int32())),
        },
        metadata={"report": json.dumps(asdict(ds.report))},
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)  # atomic: a reader never sees a half-written cache


def _load_cache(path: Path) -> TokenizedDataset | None:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid):
        return None
    report = DataReport(**json.loads(table.schema.metadata[b"report"]))
    cols = table.to_pydict()
    parents = cols.get("parents") or [None] * len(cols["input_ids"])
    samples = [Sample(i, m, s, parents=p) for i, m, s, p in zip(cols["input_ids"], cols["loss_mask"], cols["source"],
                                                                 parents)]  # fmt: skip
    return TokenizedDataset(samples, report)


def build_dataset(
    data_cfg: DataConfig, tokenizer, files: Any = None, key: str = "data.train_files"
) -> TokenizedDataset:
    """Read, normalize, render and tokenize every row of ``files``; apply the bad-row and truncation policies."""
    files = resolve_files(data_cfg.train_files if files is None else files, key)
    markers = template_markers(tokenizer, data_cfg.chat_template_kwargs)
    cdir = cache_dir(data_cfg)
    key = cache_key(files, tokenizer, data_cfg, markers)
    cpath = cdir / f"{key}.arrow" if cdir else None
    if cpath is not None and cpath.exists():
        cached = _load_cache(cpath)
        if cached is not None:
            cached.fingerprint = key[:16]
            return cached
    report = DataReport()
    skipped: Counter[str] = Counter()
    samples: list[Sample] = []
    for result in _tokenize_all(files, tokenizer, data_cfg, markers):
        report.rows += 1
        if isinstance(result, Sample):
            samples.append(result)
            report.system_merged += result.system_merged
            report.reasoning_dropped += result.reasoning_dropped
            if data_cfg.reasoning_history == "per_turn":
                report.contexts += result.contexts
                report.expanded_tokens += result.expanded_tokens
            continue
        loc, reason, detail = result
        if data_cfg.bad_rows == "error":
            raise DataError(f"{loc}: {reason}: {detail} [{template_name(tokenizer, data_cfg)}]. {_FIX_HINT}")
        skipped[reason] += 1
        if len(report.first_problems) < 20:
            report.first_problems.append(f"{loc}: {reason}: {detail}")
    report.skipped = dict(skipped)
    samples = _apply_truncation(samples, data_cfg, report)
    if not samples:
        raise DataError(
            f"No usable sample in {', '.join(files)} ({report.rows} rows read). " + " ".join(report.lines()[1:])
        )
    report.samples = len(samples)
    report.tokens = sum(len(s.input_ids) for s in samples)
    report.trained_tokens = sum(sum(s.loss_mask) for s in samples)
    ds = TokenizedDataset(samples, report, key[:16])
    if cpath is not None:
        try:
            _save_cache(cpath, ds)
        except OSError as e:  # a read-only home must not stop training
            print(f"warning: could not write the tokenization cache {cpath}: {e}", file=sys.stderr)
    return ds
