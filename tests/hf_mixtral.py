"""The block composed of transformers' Mixtral modules, with our weights copied in (for tests).

transformers stores Linear weights as [out, in] (ours are [in, out]); in transformers >= 5 the
experts are fused 3-D tensors (gate_up_proj [E, 2F, H], gate rows first; down_proj [E, H, F]),
before that one MLP per expert (w1 = gate, w3 = up, w2 = down). Both layouts are handled.
transformers is imported on first use: callers skip with pytest.importorskip("transformers").
Nothing here imports pyengine.
"""

from __future__ import annotations

import torch


def _modeling():
    from transformers.models.mixtral import modeling_mixtral

    return modeling_mixtral


def hf_config(H: int, F: int, E: int, k: int, eps: float):
    kw = dict(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
              hidden_act="silu", rms_norm_eps=eps, router_jitter_noise=0.0)
    config = _modeling().MixtralConfig(**kw)
    if hasattr(config, "_experts_implementation"):  # transformers >= 5 dispatches the experts'
        config._experts_implementation = "eager"  # forward: pin the plain loop over experts
    return config


def hf_norm(gain: torch.Tensor, eps: float):
    norm = _modeling().MixtralRMSNorm(gain.shape[0], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(gain)
    return norm


def hf_moe(w: dict, k: int, eps: float):
    """MixtralSparseMoeBlock holding our router and experts."""
    E, H, F = w["w_gate"].shape
    block = _modeling().MixtralSparseMoeBlock(hf_config(H, F, E, k, eps)).eval()
    with torch.no_grad():
        block.gate.weight.copy_(w["router"].t())  # Linear layout [E, H]
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):  # fused: [E, 2F, H] gate then up; [E, H, F]
            experts.gate_up_proj.copy_(torch.cat([w["w_gate"].transpose(1, 2), w["w_up"].transpose(1, 2)], 1))
            experts.down_proj.copy_(w["w_down"].transpose(1, 2))
        else:  # one MLP per expert, Linear layout [out, in]
            for e, mlp in enumerate(experts):
                mlp.w1.weight.copy_(w["w_gate"][e].t())
                mlp.w3.weight.copy_(w["w_up"][e].t())
                mlp.w2.weight.copy_(w["w_down"][e].t())
    return block


def hf_forward(w: dict, ids: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """The block composed of transformers' modules: embedding, RMSNorm, sparse MoE block,
    residual, RMSNorm, output head (a Linear with weight [V, H])."""
    V, H = w["embed"].shape
    embed = torch.nn.Embedding(V, H)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        embed.weight.copy_(w["embed"])
        head.weight.copy_(w["out"].t())
        x = embed(ids.reshape(1, -1))
        u = hf_norm(w["norm_in"], eps)(x)
        moe = hf_moe(w, k, eps)(u)
        if isinstance(moe, tuple):  # transformers < 5 also returns the router logits
            moe = moe[0]
        return head(hf_norm(w["norm_out"], eps)(x + moe))[0]
