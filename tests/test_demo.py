"""The built-in demo (`sftforge train` with no config) is wired end to end (a short run; the full one learns)."""

import subprocess
import sys


def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "sftforge",
        "train",
        "trainer.max_steps=3",
        f"trainer.output_dir={out}",
        "trainer.logger=[jsonl]",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "before training:" in p.stdout and "after training:" in p.stdout
    assert (out / "final" / "model.safetensors").exists()
    assert (out / "assets" / "demo_model" / "tokenizer.json").exists()
