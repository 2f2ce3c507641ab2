"""The tiny model wrapped in a fresh LoRA adapter, its tokenizer, and learners on it."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.learner.harness import learners

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def base_model(tiny_model_dir):
    """The tiny model on its own, never wrapped: what the reference must reproduce."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture
def lora_model(tiny_model_dir):
    """A fresh PeftModel; LoRA's B starts at zero, so it begins equal to the base model."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(**LORA))


@pytest.fixture
def make_learner(tiny_model_dir, tiny_engine, redis_prefix, tmp_path):
    """Build a learner on the tiny model (QUICK, overridden by keyword arguments), with a
    real service on the same Redis prefix and adapter directory for its gate to ask."""
    yield from learners(tiny_model_dir, redis_prefix, tmp_path, tiny_engine)
