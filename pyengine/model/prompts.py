"""What generation accepts, checked before any rank works (the CLI and `Engine.generate` alike):
prompts are non-empty 1-D integer id tensors inside the vocabulary, and prompt + new tokens fit
the model's positions. One InputError names the field, the value and the rule."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyengine.core.errors import InputError
from pyengine.core.limits import MAX_ITERS

if TYPE_CHECKING:
    import torch

    from pyengine.core.spec import DeploymentSpec

MAX_NEW_TOKENS = MAX_ITERS
"""Decode steps one generation may take at most (beyond the model's own max positions)."""


def prompt_list(prompts) -> list:
    """The library's prompts argument as a list, read once: a single tensor is refused (a common
    slip: wrap it, [ids]); any other iterable of prompts is accepted."""
    import torch

    if isinstance(prompts, torch.Tensor):
        raise InputError("prompts", f"one tensor of shape {list(prompts.shape)}",
                         "must be a list of 1-D id tensors (one prompt: [ids])")
    try:
        return list(prompts)
    except TypeError:
        raise InputError("prompts", type(prompts).__name__, "must be a list of 1-D id tensors") from None


def check_generation(spec: DeploymentSpec, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                     field: str = "prompts", steps_field: str = "--max-new-tokens") -> None:
    import torch

    from pyengine.model.tokens import check_ids

    m = spec.model
    if not m.layered:
        raise InputError("model.num_layers", None, "generation needs a model of layers (the attention-free "
                                                   "block has no sequence to continue)")
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) \
            or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InputError(steps_field, max_new_tokens, f"must be an integer in [1, {MAX_NEW_TOKENS}]")
    if not prompts:
        raise InputError(field, [], "needs at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0:
            shape = list(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise InputError(f"{field}[{i}]", shape, "must be a non-empty 1-D tensor of token ids")
        check_ids(p, m.vocab_size, field=f"{field}[{i}]")
        check_positions(m, int(p.numel()), max_new_tokens, f"{field}[{i}]", steps_field)


def past_positions(model, tokens: int, max_new_tokens: int) -> bool:
    """Whether `tokens` plus `max_new_tokens` new ones overrun the model's positions (filling
    them exactly is fine): generate's prompts and plan's priced decode after seq_len alike."""
    return model.max_positions is not None and tokens + max_new_tokens > model.max_positions


def check_positions(model, tokens: int, max_new_tokens: int, field: str, steps_field: str) -> None:
    if past_positions(model, tokens, max_new_tokens):
        raise InputError(field, tokens, f"tokens + {steps_field} {max_new_tokens} exceed the model's "
                                        f"{model.max_positions} positions")
