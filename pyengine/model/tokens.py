"""Token ids from a file (`pyengine run --tokens FILE`): a `.pt` tensor or a `.npy` array of
integer ids, [B, S] or [T] (read as one sequence). Every id must be inside the vocabulary: an
id out of range would index past the embedding on one rank and fail mid-pipeline, so it is
refused here, in one line, before any rank starts."""

from __future__ import annotations

import os

import torch

from pyengine.core.errors import InputError
from pyengine.core.files import unreadable_file

FIELD = "--tokens"
INTEGER_DTYPES = frozenset(d for d in (getattr(torch, n, None) for n in (
    "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")) if d is not None)
"""What token ids may be stored as (quantized and floating types are not ids)."""


def id_problem(t: torch.Tensor) -> tuple[str, str] | None:
    """(what `t` is, the rule it breaks) when it cannot hold token ids: a nested, sparse or other
    non-dense tensor, a meta tensor, a dtype that is not an integer type; None when it can."""
    if t.is_nested:  # one tensor of rows of different lengths: the prompts' list form is what fits
        return "a nested tensor", "token ids must be a dense tensor (prompts of different lengths: a list of 1-D tensors)"
    if t.layout is not torch.strided:
        return f"a {str(t.layout).removeprefix('torch.')} tensor", "token ids must be a dense tensor (.to_dense())"
    if t.device.type == "meta":
        return "a meta tensor", "holds no values (ids on cpu or cuda)"
    if t.dtype not in INTEGER_DTYPES:
        return str(t.dtype), "token ids must be integers"
    return None


def load_tokens(path: str | os.PathLike) -> torch.Tensor:
    """int64 ids [B, S] from `path` (.pt or .npy); [T] becomes [1, T]."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".pt", ".npy"):
        raise InputError(FIELD, path, "must be a .pt (torch tensor) or .npy (numpy array) file of ids")
    _check_readable(path)
    ids = _read_pt(path) if ext == ".pt" else _read_npy(path)
    problem = id_problem(ids)
    if problem is not None:
        raise InputError(FIELD, path, "holds {}: {}".format(*problem))
    if ids.dim() not in (1, 2) or ids.numel() == 0:
        raise InputError(FIELD, path, f"has shape {list(ids.shape)}: must be a non-empty [B, S] or [T]")
    return (ids if ids.dim() == 2 else ids.unsqueeze(0)).to(torch.int64).contiguous()


def check_ids(ids: torch.Tensor, vocab_size: int, why: str = "", field: str = FIELD) -> None:
    """Refuse anything but a tensor of integer ids inside [0, vocab_size), naming the first
    offending id and where it is (the CLI's --tokens and the library's ids alike)."""
    if not isinstance(ids, torch.Tensor):
        raise InputError(field, type(ids).__name__, "must be a tensor of token ids")
    problem = id_problem(ids)
    if problem is not None:
        raise InputError(field, *problem)
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise InputError(field, int(ids[pos]), f"id at position {list(pos)} is outside the vocabulary "
                                               f"[0, {vocab_size}){why}")


def _read_pt(path: str) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a bad file; all mean "not readable"
        raise InputError(FIELD, path, f"cannot be read as a torch file: {_reason(e)}") from None
    if not isinstance(obj, torch.Tensor):
        raise InputError(FIELD, path, f"holds a {type(obj).__name__}, not a tensor of ids")
    return obj


def _read_npy(path: str) -> torch.Tensor:
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(FIELD, path, f"cannot be read as a .npy array: {_reason(e)}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
        raise InputError(FIELD, path, f"holds {getattr(arr, 'dtype', type(arr).__name__)}: token ids must be integers")
    return torch.from_numpy(arr.astype(np.int64))


def load_prompts(path: str | os.PathLike) -> list[torch.Tensor]:
    """Prompts from `path`: a .pt list of 1-D id tensors (any lengths), or a [B, S] / [T] tensor
    or .npy array (equal lengths, one prompt per row)."""
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() == ".pt":
        _check_readable(path)
        obj = _read_pt_any(path)
        if isinstance(obj, (list, tuple)):
            if not obj or not all(isinstance(p, torch.Tensor) and p.dim() == 1 and p.numel() for p in obj):
                raise InputError(FIELD, path, "must hold a non-empty list of non-empty 1-D id tensors")
            for i, p in enumerate(obj):
                problem = id_problem(p)
                if problem is not None:
                    raise InputError(FIELD, path, "prompt {} holds {}: {}".format(i, *problem))
            return [p.to(torch.int64).contiguous() for p in obj]
    return list(load_tokens(path))


def _read_pt_any(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a bad file; all mean "not readable"
        raise InputError(FIELD, path, f"cannot be read as a torch file: {_reason(e)}") from None


def _check_readable(path: str) -> None:
    problem = unreadable_file(path)
    if problem is not None:
        raise InputError(FIELD, path, problem)


def _reason(e: BaseException) -> str:
    """The first line of a loader's error that says what is wrong, never its advice to load
    with weights_only=False (arbitrary code from a file of ids is never run)."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0] if lines else f"{type(e).__name__} (a truncated or foreign file)"
