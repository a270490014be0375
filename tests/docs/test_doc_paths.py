"""Docs and CI stay true: every repository path the docs name exists, and the README's test
command is the one CI runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A repository path as the docs write it: a top-level folder, then path characters.
PATH = re.compile(r"\b(?:pyengine|tests|bench|kernels|csrc|docs|examples|\.ci)/[\w./-]*\w")


def _exists(path: str) -> bool:
    # "csrc/nccl.*" is matched as "csrc/nccl": a stem stands for its files.
    return (ROOT / path).exists() or any(ROOT.glob(path + ".*"))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_a_doc_names_exists(doc):
    missing = sorted({p for p in PATH.findall(doc.read_text()) if not _exists(p)})
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_readme_test_command_is_the_one_ci_runs():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    assert f"&& {ci_command}  #" in readme
    assert "--durations=25" in ci_command
