"""``sftforge report RUN_DIR [RUN_DIR ...] [--output report.html]``: what a run did, as one self-contained HTML file.

The file needs no network and no other file: the curves (loss, val_loss, lr, grad_norm, tokens/s, eval accuracy,
and the RL reward when present) are inline SVG, several runs overlaid and named by folder; then per run the data
report (rows, kept, skipped by reason, length histogram, trained share), the plan, the checkpoints written, the
resolved config (secrets redacted) and eval samples when the run wrote some. The numbers behind every curve are
embedded too (``<script type="application/json" id="sftforge-report-data">``), and each curve is also written as a
PNG next to the HTML (``<stem>_<curve>.png``).

What it reads from a run folder (all written by ``sftforge train``): metrics.jsonl, config.yaml, data_report.json,
plan.json, step_<N>/ and final/, eval/step_<N>.jsonl.

Plots: matplotlib (the optional extra ``pip install 'sftforge[report]'``). It is the long-kept standard of the
scientific Python stack, has wheels for every platform we run on, and writes SVG and PNG itself (the Agg and SVG
backends): no browser, JavaScript bundle or image-export helper is needed to make the file, and the file shows
without network access.
"""

from __future__ import annotations

import datetime
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftforge.config import ConfigError
from sftforge.metrics import read_metrics
from sftforge.redact import redacted, scrub

# (metrics key, title, y-axis label); a curve no run has is left out (and the report says so)
CURVES = [
    ("loss", "training loss", "loss"),
    ("val_loss", "validation loss", "loss"),
    ("lr", "learning rate", "lr"),
    ("grad_norm", "gradient norm (before clipping)", "norm"),
    ("tokens_per_s", "throughput (mean over the run so far)", "tokens/s"),
    ("eval_accuracy", "eval accuracy (trainer.eval_task)", "accuracy"),
    ("reward_mean", "reward (rl)", "mean reward"),
]
DATA_ID = "sftforge-report-data"
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def need_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "sftforge report draws its plots with matplotlib, which is not installed: pip install 'sftforge[report]' "
            "(or pip install matplotlib)."
        ) from None
    return matplotlib


@dataclass
class RunData:
    name: str
    path: Path
    records: list[dict]
    end: dict | None
    config: dict | None
    data: dict | None
    plan: dict | None
    checkpoints: list[dict] = field(default_factory=list)
    eval_file: str = ""
    eval_samples: list[dict] = field(default_factory=list)


def _json_file(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); remove it or run the training again.") from None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def load_run(path: str | Path, name: str = "") -> RunData:
    """Read what ``sftforge train`` wrote into the folder ``path``."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"sftforge report: {p} is not a folder; pass a run's trainer.output_dir.")
    metrics = p / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(
            f"sftforge report: {p} has no metrics.jsonl; pass a run's trainer.output_dir (with "
            "trainer.logger including jsonl, the default)."
        )
    rows = read_metrics(metrics)  # (a run still writing: its half-written last line is left out)
    records = [r for r in rows if "step" in r and "event" not in r]
    end = next((r for r in reversed(rows) if r.get("event") == "end"), None)
    config = None
    if (p / "config.yaml").is_file():
        config = redacted(yaml.safe_load((p / "config.yaml").read_text()) or {})
    checkpoints = []
    steps = sorted((d for d in p.glob("step_*") if d.is_dir() and d.name[5:].isdigit()), key=lambda d: int(d.name[5:]))
    for d in steps + ([p / "final"] if (p / "final").is_dir() else []):
        checkpoints.append(
            {
                "name": d.name,
                "size_mb": round(_size(d) / 2**20, 1),
                "huggingface": (d / "huggingface").is_dir() or (d / "config.json").is_file(),
            }
        )
    evals = sorted(
        (f for f in (p / "eval").glob("step_*.jsonl") if f.stem[5:].isdigit()), key=lambda f: int(f.stem[5:])
    )
    samples = [json.loads(line) for line in evals[-1].read_text().splitlines() if line.strip()] if evals else []
    return RunData(
        name or p.resolve().name,
        p,
        records,
        end,
        config,
        _json_file(p / "data_report.json"),
        _json_file(p / "plan.json"),
        checkpoints,
        evals[-1].name if evals else "",
        samples,
    )


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def series(run: RunData, key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in the run's step records; non-finite values ("nan" in the file) are left out."""
    return [(r["step"], v) for r in run.records if (v := _number(r.get(key))) is not None]


def _names(paths: list[Path]) -> list[str]:
    """Folder names; where two runs share one, their parent folder is added."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def _figure(width: float = 6.4, height: float = 3.2):
    need_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot(1, 1, 1)


def _render(fig) -> tuple[str, bytes]:
    """(inline SVG text, PNG bytes) of a figure."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "sftforge", "path.simplify": False}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]  # drop the XML prolog and doctype: the SVG goes inline into the HTML
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)  # (an RDF block of links: no use offline)
    return svg, png.getvalue()


def curve_figure(runs: list[RunData], key: str, title: str, ylabel: str) -> tuple[str, bytes] | None:
    """The curve of ``key`` for every run that has it (one line each, SVG group id ``curve-<key>-<run index>``)."""
    drawn = [(i, run, series(run, key)) for i, run in enumerate(runs)]
    drawn = [(i, run, pts) for i, run, pts in drawn if pts]
    if not drawn:
        return None
    with _rc():
        fig, ax = _figure()
        for i, run, pts in drawn:
            few = len(pts) <= 30
            (line,) = ax.plot(
                [s for s, _ in pts],
                [v for _, v in pts],
                color=_COLORS[i % len(_COLORS)],
                marker="o" if few else None,
                markersize=3,
                linewidth=1.4,
                label=run.name,
            )
            line.set_gid(f"curve-{key}-{i}")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if key == "eval_accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        return _render(fig)


def histogram_figure(lengths: dict) -> str:
    edges, counts = lengths["edges"], lengths["counts"]
    with _rc():
        fig, ax = _figure(5.0, 2.4)
        widths = [b - a for a, b in zip(edges, edges[1:])]
        bars = ax.bar(edges[:-1], counts, width=widths, align="edge", color="#8c8c8c", edgecolor="white")
        for bar in bars:
            bar.set_gid("length-bar")
        ax.set_xlabel("tokens per sample")
        ax.set_ylabel("samples")
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        return _render(fig)[0]


def _rc():
    matplotlib = need_matplotlib()
    return matplotlib.rc_context({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def _grid(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='grid'><tr>{head}</tr>{body}</table>"


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{v:.1%}"
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.4g}"
    return str(v)


def _summary_rows(run: RunData) -> list[list[Any]]:
    last = run.records[-1] if run.records else {}
    total = (run.plan or {}).get("total_steps", "?")
    vals = series(run, "val_loss")
    evals = series(run, "eval_accuracy")
    end = run.end or {}
    status = "finished" if run.end and (run.plan is None or last.get("step") == total) else "running or stopped"
    if end.get("interrupted_by"):
        status = f"interrupted by {end['interrupted_by']}"
    mem = max((v for _, v in series(run, "memory_gb")), default=None)
    return [
        [
            run.name,
            f"{last.get('step', 0)}/{total}",
            _fmt(_number(last.get("loss"))),
            _fmt(min(v for _, v in vals)) if vals else "–",
            _fmt(evals[-1][1], pct=True) if evals else "–",
            _fmt(end.get("train_runtime_s")),
            f"{end['tokens_per_s']:,.0f}" if "tokens_per_s" in end else "–",
            f"{mem:.2f}" if mem is not None else "–",
            status,
        ]
    ]


def _data_section(run: RunData) -> str:
    if not run.data:
        return "<p class='note'>no data_report.json in this run folder (sftforge train writes one; sftforge rl does not yet).</p>"
    out = []
    for split, d in run.data.items():
        rep = d.get("report") or {}
        rows = [
            ("files", d.get("files")),
            ("rows read", rep.get("rows", "–")),
            ("samples kept", d["samples"]),
            ("tokens", f"{d['tokens']:,}"),
        ]
        if rep:
            share = rep["trained_tokens"] / max(rep["tokens"], 1)
            rows.append(("trained tokens", f"{rep['trained_tokens']:,} ({share:.1%} of all tokens)"))
            for reason, n in sorted((rep.get("skipped") or {}).items()):
                rows.append((f"skipped: {reason}", n))
            for key, label in (
                ("over_length", "over data.max_length"),
                ("truncated", "truncated"),
                ("dropped_over_length", "dropped (too long)"),
                ("dropped_no_trained_tokens", "dropped (no trained token left)"),
                ("images", "images"),
                ("system_merged", "system merged into first user"),
            ):
                if rep.get(key):
                    rows.append((label, rep[key]))
            if not rep.get("skipped"):
                rows.append(("skipped rows", 0))
        ln = d["lengths"]
        rows.append(
            ("tokens per sample", f"min {ln['min']}, median {ln['median']:g}, mean {ln['mean']:.1f}, max {ln['max']}")
        )
        problems = rep.get("first_problems") or []
        out.append(f"<h4>{html.escape(split)}</h4><div class='row'>{_table(rows)}{histogram_figure(ln)}</div>")
        if problems:
            items = "".join(f"<li>{html.escape(p)}</li>" for p in problems[:10])
            out.append(f"<p>first problems:</p><ul>{items}</ul>")
    return "".join(out)


def _plan_section(run: RunData) -> str:
    if not run.plan:
        return "<p class='note'>no plan.json in this run folder.</p>"
    labels = {
        "samples": "training samples",
        "steps_per_epoch": "steps per epoch",
        "total_steps": "total steps",
        "grad_accum": "gradient accumulation",
        "dropped_per_epoch": "samples left out per epoch (drop_last)",
        "world_size": "data-parallel size",
        "dp_size": "data-parallel groups",
        "sp_size": "sequence parallel",
        "strategy": "trainer.strategy",
        "device": "device",
        "prompts": "prompts (rl)",
        "prompts_per_step": "rollout.prompts_per_step",
        "responses_per_prompt": "rollout.n",
    }
    return _table([(labels.get(k, k), v) for k, v in run.plan.items() if k != "rank"])


def _eval_section(run: RunData) -> str:
    if not run.eval_samples:
        return ""
    rows = []
    for r in run.eval_samples[:12]:
        prompt = str(r.get("prompt", ""))
        rows.append(
            [
                ("…" + prompt[-160:]) if len(prompt) > 160 else prompt,
                r.get("generation", ""),
                r.get("reference", ""),
                r.get("score", ""),
            ]
        )
    head = f"<h4>eval samples ({html.escape(run.eval_file)}, first {len(rows)} of {len(run.eval_samples)})</h4>"
    return head + _grid(["prompt (end)", "generation", "reference", "score"], rows)


def _checkpoint_section(run: RunData) -> str:
    if not run.checkpoints:
        return "<p class='note'>no checkpoint in this run folder.</p>"
    rows = [[c["name"], f"{c['size_mb']:,.1f} MiB", "yes" if c["huggingface"] else "no"] for c in run.checkpoints]
    return _grid(["folder", "size", "Hugging Face folder"], rows)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1320px;color:#222}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px} h4{font-size:13px;margin:12px 0 4px}
.plots{display:flex;flex-wrap:wrap;gap:12px} .plot svg{width:640px;height:auto}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start} .row svg{width:500px;height:auto}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top} .kv th{background:#f6f6f6;font-weight:600} .grid th{background:#f0f0f0}
.grid td{max-width:420px;white-space:pre-wrap;word-break:break-word}
pre{background:#f7f7f7;padding:10px;font-size:11px;max-height:420px;overflow:auto} .note{color:#777}
"""


def build_report(run_dirs: list[str | Path], output: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Write the HTML report of ``run_dirs`` (and one PNG per curve next to it); returns (html, pngs)."""
    need_matplotlib()
    if not run_dirs:
        raise ConfigError("sftforge report: name at least one run folder (a trainer.output_dir).")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, _names(paths))]
    out = Path(output) if output else (paths[0] / "report.html" if len(paths) == 1 else Path("report.html"))
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"sftforge report --output {out}: name an .html file.")
    out.parent.mkdir(parents=True, exist_ok=True)
    plots, pngs, missing = [], [], []
    for key, title, ylabel in CURVES:
        fig = curve_figure(runs, key, title, ylabel)
        if fig is None:
            missing.append(key)
            continue
        svg, png = fig
        plots.append(f'<div class="plot" id="plot-{key}">{svg}</div>')
        png_path = out.with_name(f"{out.stem}_{key}.png")
        png_path.write_bytes(png)
        pngs.append(png_path)
    hints = {
        "val_loss": "set data.val_files",
        "eval_accuracy": "set data.eval_files and trainer.eval_freq",
        "reward_mean": "sftforge rl runs only",
    }
    note = "; ".join(f"{k} ({hints[k]})" for k in missing if k in hints)
    parts = [
        f"<h1>sftforge report: {html.escape(', '.join(r.name for r in runs))}</h1>",
        f"<p class='note'>written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} from "
        f"{html.escape(', '.join(str(p) for p in paths))}</p>",
        "<h2>Runs</h2>",
        _grid(
            [
                "run",
                "step",
                "last loss",
                "best val_loss",
                "last eval accuracy",
                "train runtime (s)",
                "tokens/s",
                "peak memory (GiB)",
                "status",
            ],
            [row for r in runs for row in _summary_rows(r)],
        ),
        "<h2>Curves</h2>",
        f"<div class='plots'>{''.join(plots) or '<p>no step recorded yet.</p>'}</div>",
    ]
    if note:
        parts.append(f"<p class='note'>not in these runs: {html.escape(note)}.</p>")
    for r in runs:
        parts.append(
            f"<h2>Run {html.escape(r.name)}</h2><h3>Data</h3>{_data_section(r)}<h3>Plan</h3>"
            f"{_plan_section(r)}<h3>Checkpoints</h3>{_checkpoint_section(r)}{_eval_section(r)}"
        )
        if r.config is not None:
            text = yaml.safe_dump(r.config, sort_keys=False)
            parts.append(f"<h3>Resolved config</h3><pre>{html.escape(text)}</pre>")
    data = {
        r.name: {"path": str(r.path), "curves": {k: series(r, k) for k, _, _ in CURVES if series(r, k)}, "end": r.end}
        for r in runs
    }
    blob = json.dumps(data).replace("</", "<\\/")
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sftforge report</title><style>{_CSS}</style>"
        f"</head><body>{''.join(parts)}<script type='application/json' id='{DATA_ID}'>{blob}</script>"
        "</body></html>"
    )
    out.write_text(scrub(page), encoding="utf-8")
    return out, pngs


def embedded_data(path: str | Path) -> dict:
    """The numbers behind the curves of a report file (for tests and scripts)."""
    m = re.search(rf"<script type='application/json' id='{DATA_ID}'>(.*?)</script>", Path(path).read_text(), re.S)
    if not m:
        raise ConfigError(f"{path}: not an sftforge report (no embedded data).")
    return json.loads(m.group(1).replace("<\\/", "</"))


def report_main(run_dirs: list[str], output: str | None = None) -> int:
    out, pngs = build_report(run_dirs, output)
    print(f"report: {out} ({out.stat().st_size / 1024:,.0f} KiB, self-contained; open it in a browser)")
    if pngs:
        print(f"curves as PNG: {', '.join(p.name for p in pngs)} (next to it)")
    return 0


__all__ = ["CURVES", "DATA_ID", "RunData", "build_report", "embedded_data", "load_run", "report_main", "series"]
