"""Router top-k in one launch vs references written from each family's routing rule, and vs the
transformers router modules themselves (DeepSeek-V3, gpt-oss) where they exist.

Ids must be equal (ties go to the lower expert id, in descending order of the choosing score);
weights within TOLERANCES (the kernel and the reference both compute in fp32 from the same
logits: only exp/sigmoid implementations and summation order differ).
"""

import pytest
import torch

from pyengine.kernels.launch_count import counting
from pyengine.kernels.router_topk import RouterTopK, RouterVariant, router_topk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {torch.float32: dict(atol=1e-6, rtol=1e-5)}


def stable_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest, descending, ties to the lower index (a stable sort)."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


def reference(logits, k, variant, renormalize=True, bias=None, n_group=1, topk_group=1, scaling=1.0):
    """Per row, the routing rule of each family, in fp32."""
    ids, weights = [], []
    for row in logits.float().cpu():
        if variant == "softmax":  # Mixtral / Qwen-MoE / OLMoE
            probs = torch.softmax(row, 0)
            chosen = stable_top(probs, k)
            w = probs[chosen]
            w = w / w.sum() if renormalize else w
        elif variant == "topk_softmax":  # gpt-oss
            chosen = stable_top(row, k)
            w = torch.softmax(row[chosen], 0)
        else:  # DeepSeek-V3: sigmoid, bias for choosing only, best groups by their top-2 sum
            scores = torch.sigmoid(row)
            biased = scores + (bias.cpu() if bias is not None else 0)
            groups = biased.view(n_group, -1)
            group_score = groups.sort(1, descending=True).values[:, :2].sum(1)
            keep = torch.zeros(n_group, dtype=torch.bool)
            keep[stable_top(group_score, topk_group)] = True
            masked = torch.where(keep[:, None], groups, float("-inf")).flatten()
            chosen = stable_top(masked, k)
            w = scores[chosen]
            w = w / (w.sum() + 1e-20) if renormalize else w
        ids.append(chosen)
        weights.append(w * scaling)
    return torch.stack(ids).to(torch.int32), torch.stack(weights)


def check(logits, k, variant, **kw):
    names = dict(bias="correction_bias", scaling="routed_scaling_factor")
    ids, w = router_topk(logits, k, variant=variant, **{names.get(key, key): v for key, v in kw.items()})
    ref_ids, ref_w = reference(logits, k, variant, **kw)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == (logits.shape[0], k)
    assert torch.equal(ids.cpu(), ref_ids), (ids.cpu(), ref_ids)
    torch.testing.assert_close(w.cpu(), ref_w, **TOLERANCES[torch.float32])
    return ids, w


def logits_of(n, E, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, E, generator=g) * 2).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,E,k", [(1, 8, 2), (3, 60, 4), (17, 64, 8)])  # n=1, E not a power of 2, k=8
@pytest.mark.parametrize("variant,renormalize", [
    ("softmax", True), ("softmax", False), ("topk_softmax", True)])
def test_softmax_variants(n, E, k, dtype, variant, renormalize):
    check(logits_of(n, E, dtype, seed=n + E), k, variant, renormalize=renormalize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,E,k,n_group,topk_group,renormalize", [
    (3, 64, 6, 8, 3, True),  # DeepSeek-V3's form, smaller
    (17, 60, 4, 4, 2, False),  # E not a power of two, 15 per group
    (1, 8, 2, 1, 1, True),  # one group
    (2, 256, 8, 8, 4, True),  # DeepSeek-V3's E, k, groups
])
def test_sigmoid_grouped(n, E, k, n_group, topk_group, renormalize, dtype):
    logits = logits_of(n, E, dtype, seed=E)
    bias = (torch.rand(E, generator=torch.Generator().manual_seed(1)) * 0.5).to(DEVICE)
    check(logits, k, "sigmoid_grouped", renormalize=renormalize, bias=bias, n_group=n_group,
          topk_group=topk_group, scaling=2.5)


def test_ties_go_to_the_lower_expert_id():
    logits = torch.zeros(3, 8, device=DEVICE)
    logits[1, [2, 5, 6]] = 1.0  # three equal best: the lower two win
    logits[2, [7, 3]] = 2.0
    for variant in ("softmax", "topk_softmax"):
        ids, _ = check(logits, 2, variant)
        assert ids.cpu().tolist() == [[0, 1], [2, 5], [3, 7]]
    ids, _ = check(torch.zeros(2, 16, device=DEVICE), 3, "sigmoid_grouped", n_group=4, topk_group=2)
    assert ids.cpu().tolist() == [[0, 1, 2]] * 2  # equal groups: the lower two; then the lower ids


def test_against_transformers_deepseek_v3_router():
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(hidden_size=16, n_routed_experts=64, num_experts_per_tok=6, n_group=8,
                              topk_group=3, norm_topk_prob=True, routed_scaling_factor=2.5)
    hf = DeepseekV3TopkRouter(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(64, 16, generator=g))
        hf.e_score_correction_bias.copy_(torch.rand(64, generator=g) * 0.3)
        logits, hf_w, hf_ids = hf(torch.randn(9, 16, generator=g))
    ids, w = router_topk(logits.to(DEVICE), 6, variant="sigmoid_grouped", n_group=8, topk_group=3,
                         correction_bias=hf.e_score_correction_bias.to(DEVICE), routed_scaling_factor=2.5)
    order = hf_ids.sort(1).indices  # transformers' top-k is unsorted: compare as id-sorted sets
    assert torch.equal(ids.cpu().long().sort(1).values, hf_ids.gather(1, order))
    torch.testing.assert_close(w.cpu().gather(1, ids.cpu().long().sort(1).indices), hf_w.gather(1, order),
                               atol=1e-6, rtol=1e-5)


def test_against_transformers_gpt_oss_router():
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    hf = GptOssTopKRouter(GptOssConfig(hidden_size=16, num_local_experts=32, num_experts_per_tok=4))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(32, 16, generator=g))
        hf.bias.copy_(torch.randn(32, generator=g))
        logits, hf_w, hf_ids = hf(torch.randn(9, 16, generator=g))
    ids, w = router_topk(logits.to(DEVICE), 4, variant="topk_softmax")
    assert torch.equal(ids.cpu().long(), hf_ids)  # sorted descending, as torch.topk returns them
    torch.testing.assert_close(w.cpu(), hf_w, atol=1e-6, rtol=1e-5)


def test_prepared_call_is_one_launch_into_given_buffers():
    router = RouterTopK(60, 4, DEVICE, variant=RouterVariant.SOFTMAX, renormalize=False)
    logits = logits_of(5, 60, torch.float32, seed=5)
    ids, w = torch.empty(5, 4, dtype=torch.int32, device=DEVICE), torch.empty(5, 4, device=DEVICE)
    with counting() as c:
        out = router(logits, ids, w)
    assert c.triton == 1 and out[0] is ids and out[1] is w
    ref_ids, ref_w = reference(logits, 4, "softmax", renormalize=False)
    assert torch.equal(ids.cpu(), ref_ids)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=9), r"k=9: must be <= min\(E=60, 8\)"),
    (dict(variant="sigmoid"), r"variant='sigmoid': must be one of"),
    (dict(n_group=4), r"n_group=4, topk_group=1: groups are sigmoid_grouped's only"),
    (dict(variant="sigmoid_grouped", n_group=7), r"n_group=7: must divide E=60"),
    (dict(variant="sigmoid_grouped", n_group=4, topk_group=5), r"topk_group=5: must be <= n_group=4"),
    (dict(variant="sigmoid_grouped", n_group=30, topk_group=1, k=4), r"k=4: must be <= topk_group \* E / n_group = 2"),
    (dict(correction_bias=torch.zeros(60)), r"correction_bias: must be None for variant='softmax'"),
    (dict(routed_scaling_factor=0), r"routed_scaling_factor=0: must be a number > 0"),
])
def test_bad_input_names_the_argument(kwargs, match):
    kwargs = {"k": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        router_topk(logits_of(2, 60, torch.float32, seed=0), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["softmax", "topk_softmax", "sigmoid_grouped"])
def test_bf16_logits_many_rows_on_gpu(variant):
    grouped = variant == "sigmoid_grouped"
    E, k = (256, 8) if grouped else (128, 8)
    kw = dict(n_group=8, topk_group=4, bias=torch.rand(E, device=DEVICE) * 0.1) if grouped else {}
    check(logits_of(3000, E, torch.bfloat16, seed=7), k, variant, **kw)
