"""The host-cost measurement of `pyengine calibrate` (pyengine.execute.calibrate_host): its action
timing runs the real step loop (here on CPU, 3 virtual ranks) and returns host seconds per action
with the launches taken out; the launch and replay bursts need CUDA (the GPU suite runs them)."""

import torch

from pyengine.execute.calibrate_host import measure_action


def test_action_time_is_positive_and_shrinks_as_launches_cost_more():
    cpu = torch.device("cpu")
    free = measure_action(cpu, launch_s=0.0, steps=2)
    assert 0 < free < 0.05  # seconds per action: a few hundred microseconds of Python at most
    assert measure_action(cpu, launch_s=1.0, steps=2) == 0.0  # launches at 1 s each cover it all
