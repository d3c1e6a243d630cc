"""``make demo`` as a newcomer sees it: a real process with its own Ray, MLflow and Serve,
whose terminal output is spam-gpt's own lines only, within a line budget."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import NOISE, free_port

LINE_BUDGET = 40


def test_the_demo_prints_only_its_own_lines(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "spam_gpt.demo", "--out", str(out), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, "\n".join(lines[-40:])
    assert len(lines) <= LINE_BUDGET, "\n".join(lines)
    assert not [line for line in lines if NOISE.search(line)]
    assert sum(line.startswith("Epoch ") for line in lines) == 5  # a line per epoch
    assert re.search(r"^\s+spam  \(0\.\d+\)  You are a winner", done.stdout, re.MULTILINE)
    assert re.search(r"^not spam  \(0\.\d+\)  Hey, just wanted", done.stdout, re.MULTILINE)
    log_file = out / "logs" / "spam-gpt.log"
    assert f"Logs: {log_file}" in lines[-1]
    assert "ray" in log_file.read_text().lower()  # the libraries' logs went here instead
