"""sftforge report (report.py): the curves carry the runs' real values (read back from the embedded data AND from
the SVG paths), runs overlay, a run without validation or eval still reports, secrets never appear; rendered in a
real headless browser (Debian's chromium) with a plot that is not blank. Also the end-of-run hint and the plain
(non-terminal) output."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from test_eval import tiny_model_dir, write_qa

from sftforge.cli import main
from sftforge.config import ConfigError, load_config
from sftforge.metrics import read_metrics
from sftforge.report import build_report, embedded_data
from sftforge.sft import train

SECRET_ENV, SECRET_CFG = "hf_REPORTsecret4242", "sk-report-config-secret-99"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs: ``with_val`` (validation, generation eval, a checkpoint at step 5) and ``plain`` (neither)."""
    root = tmp_path_factory.mktemp("report")
    model_dir = tiny_model_dir(root)
    data = write_qa(root / "qa.jsonl")
    common = [f"model.path={model_dir}", f"data.train_files={data}", "data.train_batch_size=6",
              "data.micro_batch_size_per_gpu=6", "optim.lr=1e-2", "optim.weight_decay=0", "optim.warmup_steps=2",
              "trainer.device=cpu", "trainer.logger=[jsonl]", "data.cache_dir=none"]  # fmt: skip
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = SECRET_ENV
    try:
        a = load_config(None, common + [
            f"data.val_files={data}", f"data.eval_files={data}", "trainer.eval_freq=5", "trainer.test_freq=5",
            "trainer.max_steps=10", "trainer.save_freq=5", f"trainer.output_dir={root / 'with_val'}",
            f"data.chat_template_kwargs={{api_token: {SECRET_CFG}}}",
        ])  # fmt: skip
        train(a)
        train(load_config(None, common + ["trainer.max_steps=6", f"trainer.output_dir={root / 'plain'}"]))
    finally:
        if old is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = old
    return root / "with_val", root / "plain"


def _records(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if "step" in r]


def _svg_points(page: str, gid: str) -> np.ndarray:
    """The vertices of the line matplotlib drew for ``gid`` (its SVG <g id=...><path d="M x y L x y ...">)."""
    m = re.search(rf'<g id="{re.escape(gid)}">\s*<path d="([^"]+)"', page)
    assert m, f"no curve {gid} in the report's SVG"
    nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", m.group(1))]
    return np.array(nums).reshape(-1, 2)


def _affine_residual(x: np.ndarray, y: np.ndarray) -> float:
    """How far ``y`` is from an affine function of ``x`` (0: the SVG plots exactly these values on a linear axis)."""
    if len(x) < 3 or np.ptp(x) == 0:
        return 0.0
    a, b = np.polyfit(x, y, 1)
    return float(np.max(np.abs(a * x + b - y)) / max(np.ptp(y), 1e-12))


@pytest.mark.slow  # shares two tiny training runs (~15 s)
def test_each_curve_has_the_runs_real_values_in_the_data_and_in_the_svg(runs, tmp_path):
    run, _ = runs
    out, pngs = build_report([run], tmp_path / "r.html")
    page = out.read_text()
    data = embedded_data(out)["with_val"]["curves"]
    records = _records(run)
    for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "eval_accuracy"):
        truth = [(r["step"], r[key]) for r in records if key in r]
        assert truth, key
        assert np.allclose(np.array(data[key], float), np.array(truth, float), rtol=1e-12), key
        pts = _svg_points(page, f"curve-{key}-0")
        assert len(pts) == len(truth), key
        steps, values = np.array([s for s, _ in truth], float), np.array([v for _, v in truth], float)
        assert _affine_residual(steps, pts[:, 0]) < 1e-3, key  # x: the steps
        if np.ptp(values) > 0:
            assert _affine_residual(values, pts[:, 1]) < 1e-3, key  # y: the values (SVG y grows downwards)
            assert np.corrcoef(values, pts[:, 1])[0, 1] < -0.999, key
    assert [r["step"] for r in records if "val_loss" in r] == [5, 10]
    assert sorted(p.name for p in pngs) == sorted(
        f"r_{k}.png" for k in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "eval_accuracy")
    )
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # the data report, the plan, the checkpoints and the eval samples are there too
    summary = json.loads((run / "data_report.json").read_text())
    assert summary["train"]["report"]["rows"] == 12 and summary["val"]["samples"] == 12
    assert "rows read" in page and "trained tokens" in page and 'id="length-bar' in page
    assert "total steps" in page and ">step_5<" in page and ">final<" in page
    assert "eval samples (step_10.jsonl" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # self-contained


@pytest.mark.slow
def test_two_runs_overlay_named_by_folder(runs, tmp_path):
    a, b = runs
    out, _ = build_report([a, b], tmp_path / "both.html")
    page = out.read_text()
    assert len(_svg_points(page, "curve-loss-0")) == len(_records(a)) == 10
    assert len(_svg_points(page, "curve-loss-1")) == len(_records(b)) == 6
    assert 'id="curve-val_loss-0"' in page and 'id="curve-val_loss-1"' not in page  # only the run that validated
    assert ">with_val<" in page and ">plain<" in page  # the legend and the table name the runs by folder
    assert set(embedded_data(out)) == {"with_val", "plain"}


@pytest.mark.slow
def test_a_run_without_validation_or_eval_still_reports(runs, tmp_path, capsys):
    _, plain = runs
    assert main(["report", str(plain)]) == 0
    out = plain / "report.html"
    page = out.read_text()
    assert f"report: {out}" in capsys.readouterr().out
    assert 'id="plot-loss"' in page and 'id="plot-val_loss"' not in page and 'id="plot-eval_accuracy"' not in page
    assert "val_loss (set data.val_files)" in page and "eval_accuracy (set data.eval_files" in page
    assert (plain / "report_loss.png").is_file() and not (plain / "report_val_loss.png").exists()


@pytest.mark.slow
def test_secrets_never_appear_in_the_report(runs, tmp_path):
    out, pngs = build_report(list(runs), tmp_path / "s.html")
    page = out.read_text()
    assert SECRET_CFG not in page and SECRET_ENV not in page
    assert "api_token: &#x27;***&#x27;" in page  # the resolved config is there, redacted (HTML-escaped)
    for p in pngs:
        assert SECRET_CFG.encode() not in p.read_bytes()


def test_clear_errors_for_a_wrong_folder_and_a_missing_plotting_library(tmp_path, monkeypatch, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "is not a folder; pass a run's trainer.output_dir" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no metrics.jsonl"):
        build_report([tmp_path / "empty"])
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"matplotlib, which is not installed: pip install 'sftforge\[report\]'"):
        build_report([tmp_path / "empty"])


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_the_report_renders_in_a_headless_browser_with_a_plot_that_is_not_blank(runs, tmp_path):
    """Debian's chromium (installed by .ci/run; `apt-get install chromium`) takes a screenshot of the report; the
    plot area must hold the curves' color (matplotlib's first color, used by nothing else on the page)."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (apt-get install chromium; .ci/run installs it where it can)")
    from PIL import Image

    out, _ = build_report(list(runs), tmp_path / "b.html")
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1320,1000",
           f"--screenshot={shot}", out.as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    blue = np.abs(img - np.array([31, 119, 180])).sum(-1) < 60  # #1f77b4: the first run's curves
    assert blue.sum() > 400, f"only {blue.sum()} curve pixels: the plots did not render"
    rows, cols = np.nonzero(blue)
    assert rows.min() > 100  # below the title and the runs table, i.e. inside the plot area
    assert (img != 255).any(-1).mean() > 0.05  # the page is not blank


def test_live_displays_stay_off_without_a_terminal_and_the_end_names_the_report(tmp_path, capsys):
    from sftforge.progress import Live, on_terminal

    assert not on_terminal()  # pytest captures stderr: no terminal
    bar = Live("x", 3)
    bar.update(1, "info")
    bar.close()
    from sftforge.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, ["console", "jsonl"], 1)
    log.log_step({"step": 1, "epoch": 0, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "elapsed_s": 0.1, "memory_gb": 0.4})
    log.close({"train_runtime_s": 0.1})
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err  # plain lines, as in a CI log
    assert "step 1/1" in err and f"sftforge report {tmp_path}" in err


def test_an_rl_run_or_a_bare_metrics_file_reports_what_it_has(tmp_path):
    """sftforge rl writes metrics.jsonl (with reward_mean) and config.yaml only: the report draws what is there and
    says what is not; a non-finite loss (a skipped step) is left out of the curve, not drawn as 0."""
    run = tmp_path / "rl_run"
    run.mkdir()
    rows = [{"step": s, "epoch": 0, "loss": 0.5 / s if s != 2 else "nan", "lr": 1e-6, "grad_norm": 1.0,
             "reward_mean": 0.1 * s, "kept_groups": 2, "elapsed_s": s} for s in range(1, 5)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')  # still writing
    out, _ = build_report([run])
    page = out.read_text()
    assert out == run / "report.html"
    assert 'id="plot-reward_mean"' in page and len(_svg_points(page, "curve-reward_mean-0")) == 4
    assert [s for s, _ in embedded_data(out)["rl_run"]["curves"]["loss"]] == [1, 3, 4]
    assert "no data_report.json" in page and "no plan.json" in page and "no checkpoint" in page
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl: line 2 is not JSON"):
        build_report([run])


def test_a_resume_over_a_half_written_metrics_line_keeps_the_earlier_records(tmp_path):
    """A run killed mid-write leaves a partial last line; the resumed run's logger keeps the complete records."""
    from sftforge.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    log = MetricsLogger(tmp_path, ["jsonl"], 4, start_step=2)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
