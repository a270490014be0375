"""The output check of a run: the pipeline's logits against the independent reference.

Any non-finite value on either side counts as wrong: a NaN never passes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# |pipeline - reference| > atol + rtol*|reference| counts as wrong (logits are ~N(0, 1)).
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (2e-2, 2e-2), "bfloat16": (6e-2, 6e-2)}


@dataclass(slots=True)
class LogitsCheck:
    max_abs_err: float
    wrong: int
    elements: int
    atol: float
    rtol: float
    ok: bool


def check_logits(dtype: str, got: np.ndarray, ref: np.ndarray) -> LogitsCheck:
    atol, rtol = TOLERANCES[dtype]
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    # NaN compares False, so it fails `<=`; an infinite reference would make the tolerance
    # infinite and pass anything, so non-finite values on either side are wrong explicitly.
    bad = ~(err <= atol + rtol * np.abs(ref)) | ~np.isfinite(got) | ~np.isfinite(ref)
    wrong = int(np.count_nonzero(bad))
    finite = err[np.isfinite(err)]
    max_err = float(finite.max()) if finite.size == err.size and err.size else float("nan")
    return LogitsCheck(max_err, wrong, int(ref.size), atol, rtol, wrong == 0 and ref.size > 0)
