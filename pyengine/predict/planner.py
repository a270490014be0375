"""`plan(spec, device)`: what a deployment costs per GPU and per stage, its predicted latency,
throughput, bubble and utilisation, the seed's baselines, and a verdict on each of the seed
note's claims. Every figure is defined in the module that computes it (prediction, resources)."""

from __future__ import annotations

from pyengine.core.spec import DeploymentSpec
from pyengine.model.routing import Routing, imbalance, uniform
from pyengine.model.stages import rank_flops, stages_of
from pyengine.predict.balance import balanced_fractions
from pyengine.predict.devices import DeviceProfile, load_profile
from pyengine.predict.decode import decode_plan
from pyengine.predict.disaggregation import layers_that_fit, ping_pong
from pyengine.predict.layouts import layout_options
from pyengine.predict.mlp_placement import mlp_placements
from pyengine.predict.plan import GpuPlan, Plan, StagePlan
from pyengine.predict.prediction import baselines, predict, predict_busy
from pyengine.predict.resources import activation_bytes, parts, state_bytes, traffic, weight_bytes
from pyengine.predict.roofline import message_bytes, op_costs
from pyengine.predict.verdicts import verdicts
from pyengine.schedule import Kind, Table, build


DEFAULT_NEW_TOKENS = 128
"""Decode steps a plan of a model of layers prices after its prompts, unless told otherwise."""


def plan(spec: DeploymentSpec, device: DeviceProfile | str | None = None,
         routing: Routing | None = None, new_tokens: int = DEFAULT_NEW_TOKENS) -> Plan:
    """`routing` (default: uniform) is what expert-parallel costs assume; `new_tokens` how many
    decode steps a model of layers is priced for."""
    dev = load_profile(device)
    table = build(spec)
    pred, tl = predict(spec, dev, table, routing=routing)
    bal = balanced_fractions(spec, dev) if spec.hardware.num_gpus > 1 else None
    out = Plan(spec=spec, device=dev, gpus=_gpus(spec, dev, table, routing),
               stages=_stages(spec, dev, table, routing), predicted=pred,
               baselines=baselines(spec, dev, routing), verdicts=[], balanced_fractions=bal, timeline=tl,
               layouts=layout_options(spec, dev, pred, routing), routing=_routing(spec, routing))
    if spec.model.layered:
        out.ping_pong = ping_pong(spec, dev, routing)
        out.layers_fit = layers_that_fit(spec, dev, routing)
        out.decode = decode_plan(spec, dev, new_tokens, routing)
        out.mlp_placement = mlp_placements(spec, dev, routing)
    out.verdicts = verdicts(out)
    return out


def _routing(spec: DeploymentSpec, routing: Routing | None) -> dict:
    r = routing or uniform(spec)
    return {"source": r.source, "expert_loads": list(r.expert_loads()), "imbalance": imbalance(r)}


def _gpus(spec: DeploymentSpec, dev: DeviceProfile, table: Table, routing: Routing | None) -> list[GpuPlan]:
    cost = op_costs(spec, dev, routing)
    flops, weights, acts = rank_flops(spec, routing=routing), weight_bytes(spec), activation_bytes(spec, routing)
    sent, recv = traffic(spec, table, routing)
    busy = {r: sum(cost(a) for a in table[r] if a.kind is Kind.COMPUTE) for r in table}
    comm = {r: sum(cost(a) for a in table[r] if a.kind is not Kind.COMPUTE) for r in table}
    cap = spec.hardware.gpu_memory_gb * 1e9
    reserved = int(dev.reserved_gb * 1e9)
    kv = state_bytes(spec)
    used = {r: sum(weights[r].values()) + acts[r] + kv[r] for r in spec.ranks}
    m = spec.schedule.micro_batches
    division = parts(spec)
    out = []
    for r in spec.ranks:
        mem = used[r] + reserved
        out.append(GpuPlan(
            index=r, parts=division[r], flops=flops[r], weight_bytes=sum(weights[r].values()),
            weights=weights[r], activation_bytes=acts[r], memory_bytes=mem,
            memory_fraction=mem / cap, memory_share=used[r] / sum(used.values()), fits=mem <= cap,
            sent_bytes=int(sum(sent[r].values())), recv_bytes=int(sum(recv[r].values())),
            sent_per_peer={p: b / m for p, b in sorted(sent[r].items())},
            recv_per_peer={p: b / m for p, b in sorted(recv[r].items())},
            busy_s=busy[r], comm_s=comm[r],
            flop_share=flops[r] / sum(flops.values()), busy_share=busy[r] / sum(busy.values()),
            kv_cache_bytes=kv[r]))
    return out


def _stages(spec: DeploymentSpec, dev: DeviceProfile, table: Table, routing: Routing | None) -> list[StagePlan]:
    per_stage = predict_busy(spec, dev, by_stage=True, routing=routing)
    t_max, tokens = max(spec.micro_batch_sizes()), spec.model.tokens
    out = []
    for st in stages_of(spec, routing):
        sent = sum(sum(message_bytes(spec, a, routing) for a in table[g]
                       if a.kind is Kind.SEND and a.stage == st.kind) for g in st.ranks)
        out.append(StagePlan(
            index=int(st.kind), name=st.name, gpus=list(st.ranks),
            flops=sum(st.flops(tokens, g, layer) for g in st.ranks for layer in st.layers()),
            weight_bytes=sum(sum(st.weight_bytes(g).values()) for g in st.ranks),
            activation_bytes=sum(st.working_set(t_max, g)[0] for g in st.ranks),
            sent_bytes=int(sent), busy_s=max(per_stage[(g, st.kind)] for g in st.ranks)))
    return out
