"""Every number a user gives is finite and within sane bounds, in configs (JSON or Python),
device profiles and the checker itself; each refusal is one short line naming the field."""

import copy
import json
import math

import pytest

from pyengine.core.errors import InputError, UsageError, echo
from pyengine.core.limits import MAX_INT, check_number
from pyengine.core.spec import DeploymentSpec, SpecError, load_spec
from pyengine.predict.devices import DeviceProfileError, load_profile

SEED = load_spec(None).to_dict()


def _json_with(section: str, key: str, literal: str) -> str:
    """The seed's JSON with one value replaced by a raw literal (JSON that json.dumps won't write)."""
    d = copy.deepcopy(SEED)
    d[section][key] = "@@"
    return json.dumps(d).replace('"@@"', literal)


@pytest.mark.parametrize("section,key,literal,rule", [
    ("model", "norm_eps", "1e400", "finite"),  # JSON reads 1e400 as Infinity
    ("comm", "timeout_s", "-1e999", "finite"),
    ("hardware", "gpu_memory_gb", "1e309", "finite"),
    ("model", "hidden_size", "1" * 5000, "out of range"),  # beyond Python's int() digit limit
    ("model", "hidden_size", str(2**40), "out of range"),
    ("model", "vocab_size", str(-2**40), "out of range"),
    ("comm", "timeout_s", "1e9", "in [1, 86400]"),
    ("comm", "timeout_s", "1e-9", "in [1, 86400]"),
    ("schedule", "micro_batches", "1" * 30, "out of range"),
])
def test_json_numbers_are_bounded(section, key, literal, rule):
    with pytest.raises(SpecError) as e:
        DeploymentSpec.from_json(_json_with(section, key, literal), "c.json")
    assert rule in str(e.value)
    assert e.value.field in (f"{section}.{key}", "c.json")
    assert len(str(e.value)) < 300 and "\n" not in str(e.value)


def test_an_int_too_big_for_a_float_field_is_refused():
    d = copy.deepcopy(SEED)
    d["hardware"]["gpu_memory_gb"] = 10**400  # from Python: float() of it overflows
    with pytest.raises(SpecError) as e:
        DeploymentSpec.from_dict(d)
    assert e.value.field == "hardware.gpu_memory_gb" and "out of range" in str(e.value)


@pytest.mark.parametrize("path,value", [
    (("model", "norm_eps"), math.nan),
    (("model", "norm_eps"), math.inf),
    (("comm", "timeout_s"), math.nan),
    (("hardware", "gpu_memory_gb"), -math.inf),
])
def test_python_level_nan_and_inf_are_refused(path, value):
    """A spec built in Python skips the JSON parser: the rules still refuse non-finite values."""
    d = copy.deepcopy(SEED)
    d[path[0]][path[1]] = value
    with pytest.raises(SpecError) as e:
        DeploymentSpec.from_dict(d)
    assert e.value.field == ".".join(path)


def test_nan_in_a_list_names_the_element():
    d = copy.deepcopy(SEED)
    d["parallel"]["stages"][1]["shard_fractions"] = [0.5, math.nan]
    with pytest.raises(SpecError) as e:
        DeploymentSpec.from_dict(d)
    assert e.value.field == "parallel.stages[1].shard_fractions[1]" and "finite" in str(e.value)


def test_too_many_tokens_for_a_32_bit_index():
    d = copy.deepcopy(SEED)
    d["model"].update(batch_size=2**16, seq_len=2**16)
    with pytest.raises(SpecError) as e:
        DeploymentSpec.from_dict(d)
    assert e.value.field == "model.batch_size" and "32-bit" in str(e.value)


@pytest.mark.parametrize("value,bounds,words", [
    (math.nan, {"lo": 0}, "finite"),
    (math.inf, {"lo": 0}, "finite"),
    (0, {"lo": 0, "lo_open": True}, "> 0"),
    (10**12, {"lo": 1, "hi": 10**6}, "in [1, 1000000]"),
    (1.5, {"integer": True}, "integer"),
    (True, {}, "number"),
    ("3", {}, "number"),
])
def test_check_number_refuses(value, bounds, words):
    with pytest.raises(UsageError) as e:
        check_number("--x", value, error=UsageError, **bounds)
    assert e.value.field == "--x" and words in str(e.value)


def test_check_number_accepts_bounds_inclusive():
    check_number("--x", 1, lo=1, hi=1, integer=True)
    check_number("--x", MAX_INT, lo=0, hi=MAX_INT, integer=True)
    check_number("--x", 0.5, lo=0, hi=1, lo_open=True)


def test_echo_is_short_for_huge_values():
    assert len(echo("x" * 50_000_000)) < 120
    assert "digits" in echo(10**5000)  # repr() itself would raise
    assert len(str(InputError("f", b"\xff" * 10**6, "rule"))) < 150


@pytest.mark.parametrize("text,words", [
    (b'{"base": "h100", "hbm_gb_s": NaN}', "NaN and Infinity"),
    (b'{"base": "h100", "hbm_gb_s": 1e400}', "finite"),
    (b'{"base": "h100", "gemm_efficiency": 0.5, "gemm_efficiency": 0.9}', "appears twice"),
    (b'{"base": "h100", "name": "\xff"}', "not UTF-8"),
    (b'{"base": "h100", "kernel_launch_us": -Infinity}', "NaN and Infinity"),
])
def test_device_profile_json_is_strict(tmp_path, text, words):
    path = tmp_path / "gpu.json"
    path.write_bytes(text)
    with pytest.raises(DeviceProfileError) as e:
        load_profile(path)
    assert words in str(e.value) and len(str(e.value)) < 300
