"""The learner's Args: settings read through, its own fields, the derived max_len."""

from dataclasses import fields

import pytest

from learner.args import Args
from strop.settings import Settings


def test_args_setting_read_from_settings_own_field_from_args():
    args = Args(Settings(batch_size=4, dpo_beta=0.3), read_block_ms=100)

    assert args.batch_size == 4 and args.dpo_beta == 0.3  # settings
    assert args.read_block_ms == 100 and args.max_grad_norm == 1.0  # the learner's own


def test_args_max_len_unset_derived_from_prompt_and_sample_limits():
    settings = Settings(max_prompt_tokens=100, sample_max_tokens=28)

    assert Args(settings).max_len == 128
    assert Args(settings, max_len=64).max_len == 64


def test_args_own_fields_never_shadow_a_setting():
    # a field declared in both places would silently hide the deployment's setting
    own = {f.name for f in fields(Args)}
    assert own & set(Settings.model_fields) == set()


def test_args_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_knob"):
        Args(Settings()).no_such_knob  # noqa: B018


def test_args_hyperparameters_only_the_algorithms_own():
    dpo = Args(Settings(algorithm="dpo", profile="gpu")).hyperparameters()
    grpo = Args(Settings(algorithm="grpo", profile="gpu")).hyperparameters()

    assert dpo["dpo_beta"] == 0.1 and "grpo_clip" not in dpo
    assert grpo["grpo_clip"] == 0.2 and "dpo_beta" not in grpo
    assert dpo["max_len"] == 1280 and dpo["lora_target_modules"] == grpo["lora_target_modules"]
