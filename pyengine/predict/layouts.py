"""The experts layout a spec chose, against its alternatives at the same micro-batches and
schedule: tensor vs expert parallelism on the same GPUs, and expert parallelism that also
puts experts on the router's GPU. `plan`'s layout verdict reads these."""

from __future__ import annotations

from pyengine.core.spec import DeploymentSpec, SpecError
from pyengine.model.routing import Routing
from pyengine.predict.balance import with_experts
from pyengine.predict.devices import DeviceProfile
from pyengine.predict.ep_layouts import ranked_ep_specs
from pyengine.predict.plan import LayoutOption
from pyengine.predict.prediction import Predicted, predict


def describe(spec: DeploymentSpec) -> str:
    st = spec.stage("experts")
    gpus = ",".join(map(str, st.gpus))
    if spec.expert_parallel:
        counts = "/".join(str(len(p)) for p in spec.expert_placement())
        return f"EP on GPUs {gpus} ({counts} experts)"
    return f"TP={len(st.gpus)} on GPUs {gpus}"


def best_ep(spec: DeploymentSpec, dev: DeviceProfile, gpus: list[int], output: int,
            routing: Routing | None) -> DeploymentSpec | None:
    """The EP layout on `gpus` with the best score (pyengine.predict.ep_layouts.score), or None."""
    ranked = ranked_ep_specs(spec, dev, gpus, output, routing)
    return ranked[0][1] if ranked else None


def alternatives(spec: DeploymentSpec, dev: DeviceProfile, routing: Routing | None) -> list[DeploymentSpec]:
    """The experts layouts to weigh against the spec's own: TP vs EP on the same GPUs, and EP that
    also puts experts on the router's GPU."""
    st, out = spec.stage("experts"), spec.stage("output").gpus[0]
    gpus = list(st.gpus)
    every = list(range(spec.hardware.num_gpus))
    others: list[DeploymentSpec | None] = []
    if spec.expert_parallel:
        try:
            others.append(with_experts(spec, gpus, None, out))
        except SpecError:  # F narrower than the group
            pass
    else:
        others.append(best_ep(spec, dev, gpus, out, routing))
    if sorted(gpus) != every:
        others.append(best_ep(spec, dev, every, out, routing))
    return [o for o in others if o is not None]


def layout_options(spec: DeploymentSpec, dev: DeviceProfile, pred: Predicted,
                   routing: Routing | None) -> list[LayoutOption]:
    options = [LayoutOption(describe(spec), pred.latency_s, pred.throughput_tokens_per_s, True)]
    for alt in alternatives(spec, dev, routing):
        p, _ = predict(alt, dev, routing=routing)
        options.append(LayoutOption(describe(alt), p.latency_s, p.throughput_tokens_per_s, False))
    return options
