"""Router logits [n, E] -> top-k expert ids [n, k] int32 and weights [n, k] fp32, in one launch.

One program per row holds the row's E logits in fp32 (E up to 256) as n_group x group_size
(one group unless grouped) and picks the k experts one at a time: the largest remaining
score, ties to the lower expert id (what a stable descending sort gives: the engine's rule).
Ids come out in that order. Variants (RouterVariant):
- SOFTMAX (Mixtral, Qwen2/3-MoE, OLMoE): softmax over all E, top-k of the probabilities,
  optionally renormalised to sum to 1 (norm_topk_prob; Mixtral always).
- TOPK_SOFTMAX (gpt-oss): top-k of the logits, softmax over the k chosen.
- SIGMOID_GROUPED (DeepSeek-V3): s = sigmoid(logits); the choice uses s + correction_bias;
  each group is scored by the sum of its two largest biased scores, the topk_group best
  groups are kept and the top-k taken among their experts; the weights are the unbiased s of
  the chosen, divided by their sum + 1e-20 when renormalising.
Every variant's weights are then multiplied by routed_scaling_factor (DeepSeek-V3's; 1.0
elsewhere).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from pyengine.kernels import tuning
from pyengine.kernels.choices import Choice
from pyengine.kernels.launch_count import count_launch

MAX_EXPERTS = 256
MAX_TOP_K = 8


class RouterVariant(Choice, field="variant"):
    SOFTMAX = 0
    TOPK_SOFTMAX = 1
    SIGMOID_GROUPED = 2


@triton.jit
def _take_largest(x, expert):
    """(value, id) of the largest x, ties to the lower id; that entry is then -inf."""
    best = tl.max(tl.max(x, 1), 0)
    pick = tl.min(tl.min(tl.where(x == best, expert, 1 << 30), 1), 0)
    return best, pick, tl.where(expert == pick, float("-inf"), x)


@triton.jit
def _router_topk_kernel(
    logits_ptr,  # (n, E) any float dtype
    bias_ptr,  # (E,) fp32 correction bias; read only when HAS_BIAS
    ids_ptr,  # (n, K) int32
    weights_ptr,  # (n, K) fp32
    stride_logits, scaling,
    E: tl.constexpr, K: tl.constexpr, VARIANT: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    G_PAD: tl.constexpr, GS_PAD: tl.constexpr, K_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    GROUP_SIZE: tl.constexpr = E // N_GROUP
    g = tl.arange(0, G_PAD)[:, None]
    j = tl.arange(0, GS_PAD)[None, :]
    real = (g < N_GROUP) & (j < GROUP_SIZE)
    expert = tl.where(real, g * GROUP_SIZE + j, 1 << 30)
    x = tl.load(logits_ptr + row * stride_logits + expert, mask=real, other=float("-inf")).to(tl.float32)
    if VARIANT == 0:  # softmax over every expert, then choose by probability
        e = tl.exp(x - tl.max(tl.max(x, 1), 0))
        x = tl.where(real, e / tl.sum(tl.sum(e, 1), 0), float("-inf"))
    weight_of = x  # what a chosen expert's weight is read from
    if VARIANT == 2:
        weight_of = tl.sigmoid(x)
        x = weight_of
        if HAS_BIAS:
            x += tl.load(bias_ptr + expert, mask=real, other=0.0)
        x = tl.where(real, x, float("-inf"))
        # each group's score: its two largest biased scores (a group of one counts it once)
        top1 = tl.max(x, 1)
        first = tl.min(tl.where(x == top1[:, None], j, GS_PAD), 1)
        second = tl.max(tl.where(j == first[:, None], float("-inf"), x), 1)
        group_score = top1 + tl.where(second == float("-inf"), 0.0, second)
        group_score = tl.where(tl.arange(0, G_PAD) < N_GROUP, group_score, float("-inf"))
        keep = tl.zeros((G_PAD,), dtype=tl.int1)
        gid = tl.arange(0, G_PAD)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(group_score, 0)
            pick = tl.min(tl.where(group_score == best, gid, G_PAD), 0)
            keep = keep | (gid == pick)
            group_score = tl.where(gid == pick, float("-inf"), group_score)
        x = tl.where(keep[:, None], x, float("-inf"))
    slot = tl.arange(0, K_PAD)
    ids = tl.zeros((K_PAD,), dtype=tl.int32)
    vals = tl.zeros((K_PAD,), dtype=tl.float32)
    for i in tl.static_range(K):
        best, pick, x = _take_largest(x, expert)
        ids = tl.where(slot == i, pick, ids)
        if VARIANT == 2:  # the unbiased score of the chosen expert
            best = tl.sum(tl.sum(tl.where(expert == pick, weight_of, 0.0), 1), 0)
        vals = tl.where(slot == i, best, vals)
    chosen = slot < K
    if VARIANT == 1:  # softmax over the k chosen logits (the first is the largest)
        e = tl.where(chosen, tl.exp(vals - tl.max(tl.where(chosen, vals, float("-inf")), 0)), 0.0)
        vals = e / tl.sum(e, 0)
    if RENORMALIZE:
        total = tl.sum(tl.where(chosen, vals, 0.0), 0)
        if VARIANT == 2:
            total += 1e-20
        vals = vals / total
    tl.store(ids_ptr + row * K + slot, ids, mask=chosen)
    tl.store(weights_ptr + row * K + slot, vals * scaling, mask=chosen)


def router_topk_config(E: int, n_group: int) -> dict:
    """The [groups, group size] tile of one row (powers of two holding the real shape)."""
    return dict(G_PAD=triton.next_power_of_2(n_group),
                GS_PAD=triton.next_power_of_2(E // n_group), num_warps=1)


class RouterTopK:
    """The router's top-k prepared for static shapes: one launch, no check, no allocation when
    outputs are given, no host sync (CUDA-graph capturable). See router_topk for the meaning
    of the arguments."""

    def __init__(self, E: int, k: int, device: torch.device | str, *, variant="softmax",
                 renormalize: bool = True, n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0):
        self.variant = RouterVariant.parse(variant)
        _check_static(E, k, self.variant, n_group, topk_group, routed_scaling_factor)
        self.E, self.k, self.device = E, k, torch.device(device)
        self.renormalize, self.n_group, self.topk_group = renormalize, n_group, topk_group
        self.scaling = float(routed_scaling_factor)
        tuning.check_runnable(_router_topk_kernel, self.device)
        self.config = router_topk_config(E, n_group)

    def __call__(self, logits, ids_out=None, weights_out=None, *, correction_bias=None):
        """(ids [n, k] int32, weights [n, k] fp32) for logits [n, E] (unit stride along E)."""
        n = logits.shape[0]
        if ids_out is None:
            ids_out = torch.empty(n, self.k, device=logits.device, dtype=torch.int32)
        if weights_out is None:
            weights_out = torch.empty(n, self.k, device=logits.device, dtype=torch.float32)
        if n == 0:
            return ids_out, weights_out
        count_launch()
        _router_topk_kernel[(n,)](
            logits, correction_bias if correction_bias is not None else weights_out, ids_out,
            weights_out, logits.stride(0), self.scaling,
            E=self.E, K=self.k, VARIANT=int(self.variant), RENORMALIZE=self.renormalize,
            HAS_BIAS=correction_bias is not None, N_GROUP=self.n_group, TOPK_GROUP=self.topk_group,
            K_PAD=triton.next_power_of_2(self.k), **self.config)
        return ids_out, weights_out


def router_topk(logits: torch.Tensor, k: int, *, variant="softmax", renormalize: bool = True,
                correction_bias: torch.Tensor | None = None, n_group: int = 1,
                topk_group: int = 1, routed_scaling_factor: float = 1.0):
    """(ids [n, k] int32, weights [n, k] fp32) of router logits [n, E] (any float dtype).

    variant: softmax / topk_softmax / sigmoid_grouped (module docstring). renormalize: the
    chosen weights sum to 1 (softmax: norm_topk_prob; sigmoid_grouped: DeepSeek-V3's
    norm_topk_prob; topk_softmax sums to 1 anyway). correction_bias [E] fp32 and
    n_group / topk_group (E divisible by n_group, groups of >= 2 experts) are
    sigmoid_grouped's only. Ties go to the lower expert id.
    """
    variant = RouterVariant.parse(variant)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: got {type(logits).__name__}; must be a torch.Tensor")
    if not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"logits: shape {tuple(logits.shape)}, dtype {logits.dtype}: must be a "
                         f"float [n, E]")
    E = logits.shape[1]
    _check_static(E, k, variant, n_group, topk_group, routed_scaling_factor)
    if correction_bias is not None:
        if variant != RouterVariant.SIGMOID_GROUPED:
            raise ValueError(f"correction_bias: must be None for variant={variant.name.lower()!r}")
        if (not isinstance(correction_bias, torch.Tensor) or correction_bias.dtype != torch.float32
                or tuple(correction_bias.shape) != (E,) or correction_bias.device != logits.device):
            raise ValueError(f"correction_bias: must be a float32 [E={E}] tensor on {logits.device}")
    router = RouterTopK(E, k, logits.device, variant=variant, renormalize=renormalize,
                        n_group=n_group, topk_group=topk_group,
                        routed_scaling_factor=routed_scaling_factor)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    bias = correction_bias.contiguous() if correction_bias is not None else None
    return router(logits, correction_bias=bias)


def _check_static(E, k, variant: RouterVariant, n_group, topk_group, scaling) -> None:
    for name, value in (("E", E), ("k", k), ("n_group", n_group), ("topk_group", topk_group)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an int >= 1")
    if E > MAX_EXPERTS:
        raise ValueError(f"E={E}: must be <= {MAX_EXPERTS}")
    if not k <= min(E, MAX_TOP_K):
        raise ValueError(f"k={k}: must be <= min(E={E}, {MAX_TOP_K})")
    if variant != RouterVariant.SIGMOID_GROUPED and (n_group, topk_group) != (1, 1):
        raise ValueError(f"n_group={n_group}, topk_group={topk_group}: groups are "
                         f"sigmoid_grouped's only (must be 1, 1 for {variant.name.lower()!r})")
    if E % n_group:
        raise ValueError(f"n_group={n_group}: must divide E={E}")
    if n_group > 1 and E // n_group < 2:
        raise ValueError(f"n_group={n_group}: groups must hold >= 2 experts (E={E})")
    if topk_group > n_group:
        raise ValueError(f"topk_group={topk_group}: must be <= n_group={n_group}")
    if n_group > 1 and k > topk_group * (E // n_group):
        raise ValueError(f"k={k}: must be <= topk_group * E / n_group = {topk_group * (E // n_group)}")
    if not (isinstance(scaling, (int, float)) and scaling > 0):
        raise ValueError(f"routed_scaling_factor={scaling!r}: must be a number > 0")
