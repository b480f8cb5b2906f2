"""The sandbox a model's code runs in: what an attacker's program tries, and how each attempt ends.

Every network check stays on this machine: a listener on the host's loopback that the sandboxed program must not
reach, and the list of interfaces it sees. Where bubblewrap cannot start (no user namespaces), the tests skip, saying
so; the refusal itself is tested with a stand-in binary."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sftforge import sandbox
from sftforge.config import ConfigError, SandboxConfig
from sftforge.sandbox import run_code

ROOT = Path(__file__).resolve().parent.parent


def _available() -> str:
    try:
        sandbox.check_sandbox(SandboxConfig())
    except ConfigError as e:
        return str(e)
    return ""


WHY = _available()
needs_bwrap = pytest.mark.skipif(bool(WHY), reason=f"the sandbox cannot start here: {WHY}")
FAST = SandboxConfig(wall_time_s=5, cpu_time_s=3)


@needs_bwrap
def test_a_plain_program_runs_and_says_how_it_ended():
    r = run_code("import sys\nprint('6 * 7 =', 6 * 7)\nprint('warn', file=sys.stderr)\nsys.exit(3)", FAST)
    assert (r.stdout, r.stderr, r.exit_code, r.limit) == ("6 * 7 = 42\n", "warn\n", 3, None)
    assert r.status() == "exit status 3" and r.observation(100) == "6 * 7 = 42\nwarn\n[exit status 3]"
    ok = run_code("print(sum(range(10)))", FAST)
    assert ok.ok and ok.observation(100) == "45\n" and ok.seconds < 5


@needs_bwrap
def test_no_network_but_its_own_loopback(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = f"""
import socket
print(sorted(name for _, name in socket.if_nameindex()))
s = socket.socket(); s.settimeout(2)
try:
    s.connect(("127.0.0.1", {port})); print("connected")
except OSError as e:
    print("refused", type(e).__name__)
"""
    r = run_code(code, FAST)
    assert r.stdout.splitlines() == ["['lo']", "refused ConnectionRefusedError"], r
    with pytest.raises(TimeoutError):  # nothing ever reached the host's listener
        listener.accept()
    listener.close()


@needs_bwrap
def test_no_view_of_the_project_home_other_files_or_the_trainers_environment(tmp_path, monkeypatch):
    secret = tmp_path / "credentials.txt"
    secret.write_text("s3cr3t")
    monkeypatch.setenv("HF_TOKEN", "hf_s3cr3t")
    monkeypatch.setenv("WANDB_API_KEY", "wandb_s3cr3t")
    paths = [str(ROOT), str(ROOT / "pyproject.toml"), str(Path.home()), str(secret), "/etc/passwd", "/etc/shadow",
             "/root", "/home", "/var", "/run", "/proc/1/environ"]  # fmt: skip
    code = f"""
import os
for p in {paths!r}:
    try:
        print(p, "READ" if os.path.isfile(p) and open(p).read(1) is not None else ("SEEN" if os.path.exists(p) else "absent"))
    except OSError as e:
        print(p, "refused")
print(sorted(os.environ))
print(os.getcwd(), os.getuid() != 0 or "root-in-namespace")
"""
    r = run_code(code, FAST)
    lines = r.stdout.splitlines()
    seen = dict(line.rsplit(" ", 1) for line in lines[: len(paths)])
    assert all(seen[p] in ("absent", "refused") for p in paths if p != "/proc/1/environ"), seen
    assert "s3cr3t" not in r.stdout + r.stderr
    env = eval(lines[len(paths)])  # noqa: S307 -- our own program's print of a list of names
    assert "HF_TOKEN" not in env and "WANDB_API_KEY" not in env and set(env) <= {
        "PATH", "HOME", "LANG", "PWD", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "MPLBACKEND",
        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TMPDIR"}  # fmt: skip
    assert lines[-1].startswith("/sandbox")


@needs_bwrap
def test_writes_only_in_its_scratch_folder_which_is_removed_after(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("sftforge-sandbox-*"))
    target = tmp_path / "planted.txt"
    code = f"""
import os
open("notes.txt", "w").write("mine")
print("scratch", os.path.exists("notes.txt"))
for p in ["{target}", "/usr/planted", "/planted", "{ROOT}/planted", "/etc/planted"]:
    try:
        open(p, "w").write("x"); print(p, "WROTE")
    except OSError as e:
        print(p, "refused")
"""
    r = run_code(code, FAST)
    assert r.ok and r.stdout.count("refused") == 5 and "WROTE" not in r.stdout, r
    assert not target.exists() and not (ROOT / "planted").exists()
    assert set(Path(tempfile.gettempdir()).glob("sftforge-sandbox-*")) == before  # the scratch folder is gone
    tmp = run_code("import tempfile\nwith tempfile.NamedTemporaryFile() as f: print(f.name)", FAST)
    assert tmp.ok and tmp.stdout.startswith("/sandbox/"), tmp
    for code in ("open('big', 'wb').write(b'0' * (4 * 2**20))",  # one file, or many small ones: the folder is full
                 "for i in range(100):\n    open(f'f{i}', 'wb').write(b'0' * 2**19)"):  # fmt: skip
        big = run_code(code, SandboxConfig(scratch_mb=2))
        assert big.limit == "scratch" and big.status() == "stopped by the sandbox's scratch limit", big


def _host_has(marker: str, wait_s: float = 2.0) -> bool:
    """A process whose command line holds ``marker`` still runs ``wait_s`` after the call returned (the kernel tears
    a PID namespace down asynchronously: its processes get SIGKILL, and vanish a few milliseconds later)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = False
        for proc in Path("/proc").iterdir():
            try:
                found = found or marker in (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@needs_bwrap
@pytest.mark.parametrize("name,code,limit", [
    ("busy loop", "while True: pass", "cpu_time"),
    ("sleep in a thread", "import threading, time\nthreading.Thread(target=time.sleep, args=(600,)).start()",
     "wall_time"),
    ("child left behind, parent waits", "import subprocess, time\nsubprocess.Popen(['sleep', '611.5'], "
     "start_new_session=True)\ntime.sleep(600)", "wall_time"),
    ("memory", "x = bytearray(8 * 2**30)", "memory"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()", "processes"),
    ("output flood", "while True: print('x' * 1000)", "output"),
])  # fmt: skip
def test_each_attack_ends_with_its_limit_and_the_trainer_goes_on(name, code, limit):
    cfg = SandboxConfig(wall_time_s=2, cpu_time_s=1, memory_mb=256, max_processes=8, max_output_bytes=10_000)
    r = run_code(code, cfg)
    assert r.limit == limit, (name, r)
    assert r.seconds < 6, (name, r.seconds)
    assert len(r.stdout) + len(r.stderr) <= 10_000
    assert f"[stopped by the sandbox's {limit} limit]" in r.observation(200)
    assert not _host_has("611.5")  # nothing it started outlives it
    assert run_code("print('next')", FAST).stdout == "next\n"  # the trainer goes on


@needs_bwrap
def test_a_child_left_behind_by_a_finished_program_dies_with_the_sandbox():
    r = run_code("import subprocess\nsubprocess.Popen(['sleep', '622.5'], start_new_session=True)\nprint('bye')", FAST)
    assert r.ok and r.stdout == "bye\n"
    assert not _host_has("622.5")


@needs_bwrap
def test_it_cannot_kill_its_parent_or_anyone_else():
    code = "import os, signal\nfor pid in (os.getppid(), 1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
    code += (
        "    except OSError as e:\n        print(pid, type(e).__name__)\nos.kill(-1, signal.SIGKILL)\nprint('alive')"
    )
    r = run_code(code, FAST)
    assert "alive" not in r.stdout and r.limit is None  # kill(-1) reached only the sandbox's own processes
    assert os.getppid() > 1  # we (the trainer) are still here
    assert run_code("print('next')", FAST).stdout == "next\n"


@needs_bwrap
def test_concurrent_calls_from_threads_keep_their_own_output():
    results = [None] * 8

    def one(i):
        results[i] = run_code(f"print({i} * 11)", FAST)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == [f"{i * 11}\n" for i in range(8)]


def test_a_missing_or_blocked_bubblewrap_is_refused_saying_what_to_do(monkeypatch):
    sandbox._probe.cache_clear()
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    with pytest.raises(ConfigError, match="needs bubblewrap.*apt-get install bubblewrap.*sandbox.backend=rlimits_only"):
        run_code("print(1)", SandboxConfig())
    sandbox._probe.cache_clear()
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: "/bin/false")  # a bwrap that cannot start
    with pytest.raises(ConfigError, match="cannot start here.*user namespaces.*rlimits_only"):
        run_code("print(1)", SandboxConfig())
    sandbox._probe.cache_clear()
    with pytest.raises(ConfigError, match="sandbox.interpreter='/nope' is not an executable"):
        run_code("print(1)", SandboxConfig(interpreter="/nope"))


def test_rlimits_only_warns_and_still_limits(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)  # never falls back silently: it is asked for by name
    cfg = SandboxConfig(backend="rlimits_only", wall_time_s=3, cpu_time_s=1)
    with pytest.warns(UserWarning, match="WITHOUT isolation"):
        r = run_code("import os\nprint(sorted(os.environ))\nwhile True: pass", cfg)
    assert r.limit == "cpu_time" and "HF_TOKEN" not in r.stdout


def _cli(args, stdin=""):
    return subprocess.run([sys.executable, "-m", "sftforge", "sandbox", "run", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@needs_bwrap
def test_sandbox_run_cli_file_and_stdin(tmp_path):
    f = tmp_path / "prog.py"
    f.write_text("print('out'); import sys; print('err', file=sys.stderr); sys.exit(5)")
    p = _cli([str(f)])
    assert p.returncode == 5 and p.stdout.splitlines()[:4] == ["--- stdout (4 characters)", "out",
                                                              "--- stderr (4 characters)", "err"]  # fmt: skip
    assert p.stdout.splitlines()[-1].startswith("--- exit status 5 after ")
    p = _cli(["-", "sandbox.wall_time_s=1", "sandbox.cpu_time_s=30"], "import time; time.sleep(30)")
    assert p.returncode == 3 and "--- stopped by the sandbox's wall_time limit after" in p.stdout
    p = _cli([str(f), "model.path=x"])
    assert p.returncode == 2 and "sandbox.* keys only" in p.stderr
    p = _cli([str(f), "sandbox.memory_mb=1"])
    assert p.returncode == 2 and "sandbox.memory_mb" in p.stderr
    p = _cli([str(tmp_path / "missing.py")])
    assert p.returncode == 2 and "cannot read" in p.stderr


# ------------------------------------------------------------------------------------------------------------------
# SandboxFusion (sandbox.backend=fusion): the client against a loopback replay of a real server's answers, and, where
# SFTFORGE_SANDBOX_FUSION_URL names a running server (CI has none), against that server itself.

FUSION_CALLS = json.loads((ROOT / "tests" / "fixtures" / "sandbox_fusion.json").read_text())["calls"]


class _Replay(http.server.BaseHTTPRequestHandler):
    """Answers POST /run_code as the recorded SandboxFusion server did; ``fail`` first answers that many 503s."""

    answers = {c["request"]["code"]: c["response"] for c in FUSION_CALLS}
    seen: list = []
    fail = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(payload)
        if type(self).fail > 0:
            type(self).fail -= 1
            status, body = 503, {"detail": "busy"}
        elif self.path != "/run_code" or payload.get("language") != "python":
            status, body = 422, {"detail": "bad request"}
        else:
            status, body = 200, self.answers.get(payload["code"], self.answers["print(6*7)"])
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def replay():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Replay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Replay.seen, _Replay.fail = [], 0
    sandbox._probe_fusion.cache_clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    sandbox._probe_fusion.cache_clear()


def _fusion(url: str, **kw) -> SandboxConfig:
    return SandboxConfig(backend="fusion", fusion_url=url, wall_time_s=kw.pop("wall_time_s", 10), memory_mb=256, **kw)


def test_fusion_answers_read_like_the_local_sandboxes(replay):
    cfg = _fusion(replay + "/run_code", max_output_bytes=1000)
    with pytest.warns(UserWarning, match="with that server's isolation, not sftforge's"):
        r = run_code("print(6*7)", cfg)
    assert (r.stdout, r.exit_code, r.limit, r.ok) == ("42\n", 0, None, True)
    assert _Replay.seen[-1] == {"code": "print(6*7)", "language": "python", "run_timeout": 10, "memory_limit_MB": 256}
    ends = {
        "import time\ntime.sleep(30)": ("wall_time", None, None),
        "import sys\nprint('to stdout')\nsys.stderr.write('boom\\n')\nsys.exit(3)": (None, 3, None),
        "x = bytearray(600 * 2**20)": ("memory", 1, None),  # memory_limit_MB: a MemoryError, as here
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)": (None, None, 9),
        "print('a' * 5000)": ("output", None, None),  # cut here: 1,000 bytes
        "print(1": (None, 1, None),  # a SyntaxError is the program's
    }
    for code, (limit, exit_code, sig) in ends.items():
        r = run_code(
            code, _fusion(replay + "/run_code", max_output_bytes=1000, wall_time_s=2 if "sleep" in code else 10)
        )
        assert (r.limit, r.exit_code, r.signal) == (limit, exit_code, sig), code
    assert len(r.stderr) < 1000 and "SyntaxError" in r.observation(200)
    cut = run_code("print('a' * 5000)", cfg)
    assert len(cut.stdout) == 1000 and cut.observation(50).endswith("[stopped by the sandbox's output limit]")


def test_fusion_retries_a_busy_server_and_names_one_that_does_not_answer(replay):
    cfg = _fusion(replay + "/run_code")
    run_code("print(6*7)", cfg)  # the probe, once per process
    _Replay.seen, _Replay.fail = [], 2
    assert run_code("print(6*7)", cfg).stdout == "42\n" and len(_Replay.seen) == 3  # two 503s, then the answer
    _Replay.fail = 99
    with pytest.raises(sandbox.SandboxUnavailable, match=r"failed \(tries: 3\): HTTP 503"):
        run_code("print(6*7)", cfg)
    _Replay.fail = 0
    with pytest.raises(ConfigError, match=r"failed \(tries: 1\): HTTP 422"):  # a wrong request: no retry
        run_code("print(6*7)", _fusion(replay + "/wrong_path"))


def test_fusion_configuration_is_checked_before_any_code_runs(replay):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))  # bound, never listening: connection refused, on this machine
    closed = f"http://127.0.0.1:{port.getsockname()[1]}/run_code?token=SECRET"
    with pytest.raises(ConfigError, match=r"server at http://127\.0\.0\.1:\d+/run_code failed.*Start the server") as e:
        sandbox.check_sandbox(_fusion(closed))
    assert "SECRET" not in str(e.value)  # a gateway URL's token is never printed
    port.close()
    with pytest.raises(ConfigError, match="needs sandbox.fusion_url"):
        sandbox.check_sandbox(_fusion(""))
    with pytest.raises(ConfigError, match="set sandbox.backend=fusion"):
        sandbox.check_sandbox(SandboxConfig(fusion_url=replay + "/run_code"))


LIVE = os.environ.get("SFTFORGE_SANDBOX_FUSION_URL", "")


@pytest.mark.skipif(
    not LIVE, reason="no SandboxFusion server: set SFTFORGE_SANDBOX_FUSION_URL=http://HOST:PORT/run_code"
)
def test_fusion_against_a_real_server():
    cfg = _fusion(LIVE, wall_time_s=2)
    sandbox._probe_fusion.cache_clear()
    with pytest.warns(UserWarning):
        assert run_code("print(6*7)", cfg).stdout == "42\n"
    assert run_code("import time\ntime.sleep(30)", cfg).limit == "wall_time"
    assert run_code("import sys\nsys.exit(3)", cfg).exit_code == 3
    assert run_code("x = bytearray(600 * 2**20)", cfg).limit == "memory"
    out = subprocess.run([sys.executable, "-m", "sftforge", "sandbox", "run", "-", "sandbox.backend=fusion",
                          f"sandbox.fusion_url={LIVE}"], input="print(6*7)", capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "42" in out.stdout and "sandbox.backend=fusion" in out.stdout
