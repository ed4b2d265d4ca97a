"""Every ```python snippet in README.md, and the runnable starts the README links to in
docs/, runs as written, as a script (top to bottom of its section), and prints what it says
it prints.

A snippet is named by its section's heading. Each one is either expected to run (with a
pattern its output must contain) or listed in NOT_RUNNABLE with the reason; a snippet in
neither fails the test, so a new snippet cannot be skipped silently. The snippets that
start processes do so through the library's own launchers (`spawn`, `spawn_ddg`), under
an `if __name__ == "__main__":` guard, as any spawning script must.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT = 600  # generous: CI shares 2 cores; the process snippets start 2 ranks each

# section heading -> a pattern its output must contain
EXPECTED = {
    "A residual chain": r"stop_reason=.*\n\{'Highway\(k=1\)': [\d.]+, 'Highway\(k=3\)': [\d.]+\}",
    "RNNs: drop-in GRU and LSTM": r"stop_reason=",
    "Hugging Face and torchvision models": r"loss [\d.]+",
}
# the runnable starts in docs/ that the README links to: (file, section) -> pattern
DOC_EXPECTED = {
    ("docs/ddg.md", "Across processes: a runnable start"):
        r"last module's loss [\d.]+ -> [\d.]+",
    ("docs/layer-parallel.md", "A runnable start"): r"\[None, tensor\([\d.]+\)\]",
}
# section heading -> why its snippet cannot run in a test (keep this short)
NOT_RUNNABLE: dict[str, str] = {}


def python_snippets(text: str) -> dict[str, str]:
    """{section heading: its ```python block}; two blocks in one section are an error (name
    them apart, or join them)."""
    out: dict[str, str] = {}
    section = None
    for match in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```$", text, re.M | re.S):
        if match.group(1) is not None:
            section = match.group(1).strip()
            continue
        assert section is not None, "a ```python block before the first section"
        assert section not in out, f"two python snippets in section {section!r}"
        out[section] = match.group(2)
    return out


SNIPPETS = python_snippets(README.read_text())
RUNS = {**{(None, section): pattern for section, pattern in EXPECTED.items()},
        **DOC_EXPECTED}


def snippet(path: str | None, section: str) -> str:
    if path is None:
        return SNIPPETS[section]
    return python_snippets((ROOT / path).read_text())[section]


def test_every_snippet_is_run_or_listed_with_a_reason():
    assert set(SNIPPETS) == set(EXPECTED) | set(NOT_RUNNABLE), (
        "README sections with a python snippet must be in EXPECTED or NOT_RUNNABLE: "
        f"{sorted(set(SNIPPETS) ^ (set(EXPECTED) | set(NOT_RUNNABLE)))}")
    assert not set(EXPECTED) & set(NOT_RUNNABLE)


def test_snippet_extraction_sees_sections_and_blocks():
    text = ("## One\n```python\nprint(1)\n```\n```bash\nls\n```\n"
            "## Two\n```python\na = 2\nb = 3\n```\n")
    assert python_snippets(text) == {"One": "print(1)\n", "Two": "a = 2\nb = 3\n"}


@pytest.mark.parametrize(("path", "section"), sorted(RUNS, key=lambda k: (k[0] or "", k[1])))
def test_readme_snippet_runs_as_written(path, section, tmp_path):
    if section.startswith("Hugging Face"):
        pytest.importorskip("transformers", reason="the hf extra is not installed")
    script = tmp_path / "snippet.py"
    script.write_text(snippet(path, section))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # config-built models only
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(RUNS[(path, section)], proc.stdout), proc.stdout
