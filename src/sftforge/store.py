"""The tokenized store: samples on disk, read by index through memory maps, written once per cache entry.

One entry is a folder named by its cache key:

    meta.json      format version, sample count, column types, and what the writer adds (data report, files)
    offsets.bin    int64 × (n + 1): sample i is tokens offsets[i] .. offsets[i+1] of every token column
    <token>.bin    token columns, flat: input_ids (int32), loss_mask (uint8), parents (int32, prefix trees only)
    <row>.bin      one value per sample: length, trained tokens, file, row — readable without touching the tokens

Writing: the writer fills a private folder ``<key>.tmp-<pid>-<random>`` and renames it to ``<key>`` when complete
(atomic on POSIX), so a reader sees the whole entry or nothing; a writer killed midway leaves only its private
folder, which the next writer removes. ``exclusive`` (an ``fcntl.flock`` on ``<key>.lock``, released by the kernel
when its holder dies) makes one process the writer of an entry: under torchrun the other ranks, and any other job
that wants the same entry, wait for it (with a message and a timeout), then map the same files.

Reading maps the files (``numpy.memmap``): resident memory holds only the pages a reader touches, so it does not
grow with the dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sftforge import faults
from sftforge.progress import say

STORE_VERSION = 1


class StoreWriter:
    """Appends samples to a private folder; :meth:`commit` renames it into place, :meth:`abort` removes it."""

    def __init__(self, root: Path, key: str, tokens: dict[str, str], rows: dict[str, str]):
        self.root, self.key = Path(root), key
        self.tmp = self.root / f"{key}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir(parents=True)
        self.columns = {"tokens": dict(tokens), "rows": dict(rows)}
        self.files = {name: open(self.tmp / f"{name}.bin", "wb") for name in (*tokens, *rows, "offsets")}
        self.n, self.n_tokens, self.appends = 0, 0, 0
        self.files["offsets"].write(np.zeros(1, np.int64).tobytes())

    def append(self, lengths: np.ndarray, tokens: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> None:
        """``lengths``: tokens per sample; ``tokens``: each token column, the samples' tokens one after another;
        ``rows``: each row column, one value per sample."""
        if not len(lengths):
            return
        ends = self.n_tokens + np.cumsum(lengths, dtype=np.int64)
        for name, dtype in self.columns["tokens"].items():
            col = np.ascontiguousarray(tokens[name], dtype=dtype)
            if len(col) != ends[-1] - self.n_tokens:
                raise ValueError(f"store column {name}: {len(col)} tokens for {int(ends[-1] - self.n_tokens)}")
            self.files[name].write(col.tobytes())
        for name, dtype in self.columns["rows"].items():
            self.files[name].write(np.ascontiguousarray(rows[name], dtype=dtype).tobytes())
        self.files["offsets"].write(ends.tobytes())
        self.n += len(lengths)
        self.n_tokens = int(ends[-1])
        self.appends += 1
        faults.after_store_append(self.appends)

    def commit(self, meta: dict[str, Any]) -> Path:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        full = {"version": STORE_VERSION, "n": self.n, "n_tokens": self.n_tokens, **self.columns, **meta}
        (self.tmp / "meta.json").write_text(json.dumps(full))
        final = self.root / self.key
        try:
            os.rename(self.tmp, final)  # atomic; fails when another writer (not under our lock) got there first
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        return final

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Store:
    """A committed entry, memory-mapped: ``tokens(name, i)`` is sample i of a token column, ``rows(name)`` a row
    column (every sample's value), ``meta`` what the writer wrote."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path, self.meta = Path(path), meta
        self.n = int(meta["n"])
        self.offsets = self._map("offsets", "int64", self.n + 1)
        self._tokens = {k: self._map(k, t, int(meta["n_tokens"])) for k, t in meta["tokens"].items()}
        self._rows = {k: self._map(k, t, self.n) for k, t in meta["rows"].items()}

    def _map(self, name: str, dtype: str, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype)
        return np.memmap(self.path / f"{name}.bin", dtype=dtype, mode="r", shape=(count,))

    def __len__(self) -> int:
        return self.n

    def has(self, name: str) -> bool:
        return name in self._tokens or name in self._rows

    def tokens(self, name: str, i: int) -> np.ndarray:
        return self._tokens[name][self.offsets[i] : self.offsets[i + 1]]

    def rows(self, name: str) -> np.ndarray:
        return self._rows[name]

    def column(self, name: str) -> Column:
        """A row column for one pass over all samples (statistics): read slice by slice, nothing stays mapped."""
        return Column(self.path / f"{name}.bin", np.dtype(self.meta["rows"][name]), self.n, self._rows[name])


class Column:
    """``len()`` and slices of a row column, each slice read from its file (resident memory: one slice). A private
    store (data.cache_dir=none) is removed once mapped: its slices come from the map, which keeps the data."""

    def __init__(self, path: Path, dtype: np.dtype, n: int, mapped: np.ndarray | None = None):
        self.path, self.dtype, self.n, self.mapped = path, dtype, n, mapped

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop, _ = s.indices(self.n)
        count = max(0, stop - start)
        if not count:
            return np.zeros(0, self.dtype)
        if self.mapped is not None and not self.path.exists():
            return np.array(self.mapped[start:stop])
        return np.fromfile(self.path, self.dtype, count=count, offset=start * self.dtype.itemsize)


def open_store(path: Path) -> Store | None:
    """The committed entry at ``path``, or None when there is none (or it is from another format version)."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != STORE_VERSION or not _sizes_match(Path(path), meta):
        return None
    return Store(path, meta)


def _sizes_match(path: Path, meta: dict[str, Any]) -> bool:
    """Every column file has the size meta.json says (a damaged or half-copied entry is not read)."""
    want = {"offsets": (np.dtype("int64"), int(meta["n"]) + 1)}
    want |= {k: (np.dtype(t), int(meta["n_tokens"])) for k, t in meta["tokens"].items()}
    want |= {k: (np.dtype(t), int(meta["n"])) for k, t in meta["rows"].items()}
    try:
        return all((path / f"{k}.bin").stat().st_size == d.itemsize * n for k, (d, n) in want.items())
    except OSError:
        return False


def remove_partials(root: Path, key: str) -> int:
    """Remove what killed writers of ``key`` left, and the entry itself when it is damaged (call it holding the
    entry's lock, after :func:`open_store` found nothing readable); returns how many."""
    n = 0
    for p in [*Path(root).glob(f"{key}.tmp-*"), *([Path(root) / key] if (Path(root) / key).exists() else [])]:
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    return n


class Holder:
    """The writer's side of the lock: its progress, for those who wait (rate-limited writes to the lock file)."""

    def __init__(self, fd: int, what: str):
        self.fd, self.what, self.last = fd, what, 0.0
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "what": what}
        self._write()

    def progress(self, done: str) -> None:
        now = time.monotonic()
        if now - self.last >= 2.0:
            self.info["progress"] = done
            self._write()
            self.last = now

    def _write(self) -> None:
        data = json.dumps(self.info).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


def _describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", time.time())))
    progress = f", {info['progress']}" if info.get("progress") else ""
    return f"process {info.get('pid')} on {info.get('host')} (writing since {since}{progress})"


@contextlib.contextmanager
def exclusive(lock_path: Path, timeout_s: float, what: str, key: str = "data.cache_wait_s") -> Iterator[Holder]:
    """Hold the exclusive lock of one entry; wait for it up to ``timeout_s`` seconds, saying who holds it."""
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start, told = time.monotonic(), None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > timeout_s:
                    raise TimeoutError(
                        f"waited {waited:.0f} s for {_describe_holder(lock_path)} to finish {what} ({lock_path}). "
                        f"Raise {key} (now {timeout_s:g} s) to wait longer; the lock is released when that process "
                        "ends, so a crashed writer never blocks a rerun."
                    ) from None
                if told is None or time.monotonic() - told >= 30:
                    say(
                        f"info: waiting for {_describe_holder(lock_path)}: {what}; the result is then read from "
                        f"there (waited {waited:.0f} s of {key}={timeout_s:g})"
                    )
                    told = time.monotonic()
                time.sleep(0.2)
        holder = Holder(fd, what)
        try:
            yield holder
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


__all__ = ["STORE_VERSION", "Column", "Holder", "Store", "StoreWriter", "exclusive", "open_store", "remove_partials"]
