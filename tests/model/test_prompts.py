"""What generation accepts (pyengine.model.prompts.check_generation): prompt + new tokens may
fill the model's positions exactly, not one more."""

import pytest
import torch

from helpers import small_spec
from pyengine.core.errors import InputError
from pyengine.model.prompts import check_generation

SPEC = small_spec(model={"num_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "max_positions": 10,
                         "seq_len": 8})  # the longest prompt below


def test_prompt_plus_new_tokens_may_fill_every_position():
    check_generation(SPEC, [torch.arange(7), torch.arange(3)], 3)  # 7 + 3 = 10 positions: all of them


def test_one_position_past_is_refused_naming_the_prompt():
    with pytest.raises(InputError) as e:
        check_generation(SPEC, [torch.arange(3), torch.arange(8)], 3)  # 8 + 3 = 11
    assert e.value.field == "prompts[1]" and "exceed the model's 10 positions" in str(e.value)
