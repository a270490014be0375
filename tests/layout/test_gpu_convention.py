"""GPU tests follow one convention: the `gpu` mark (on the test, its parameter, or the module's
`pytestmark`), which tests/conftest.py turns into a skip on a machine without CUDA and which
`pytest -m gpu` selects on a GPU machine. A test that skipped itself for want of CUDA would run
nowhere under `-m gpu` and be skipped for a reason no one selects by."""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SELF_SKIP = re.compile(r"if not torch\.cuda\.is_available\(\):\s*\n\s*pytest\.skip"
                       r"|skipif\(\s*not (?:torch\.)?(?:__import__\(\"torch\"\)\.)?cuda\.is_available\(\)")
MODULE_MARK = re.compile(r"^pytestmark = .*pytest\.mark\.gpu", re.M)


def _test_files():
    return sorted(p for p in TESTS.rglob("test_*.py") if p != Path(__file__).resolve())


def test_no_test_skips_itself_for_want_of_cuda():
    found = [str(p.relative_to(TESTS)) for p in _test_files() if SELF_SKIP.search(p.read_text())]
    assert not found, f"use the gpu mark instead of a skip: {found}"


def test_gpu_files_carry_the_mark():
    unmarked = [str(p.relative_to(TESTS)) for p in _test_files()
                if p.stem.endswith("_gpu") and not MODULE_MARK.search(p.read_text())]
    assert not unmarked, unmarked


def test_the_pattern_sees_a_self_skip():
    assert SELF_SKIP.search("    if not torch.cuda.is_available():\n        pytest.skip('no')")
    assert SELF_SKIP.search("@pytest.mark.skipif(not torch.cuda.is_available(), reason='x')")
    assert not SELF_SKIP.search("@pytest.mark.skipif(torch.cuda.is_available(), reason='checks CPU')")
