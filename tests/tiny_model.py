"""A tiny random model with the default model's real tokenizer: what the fast tests run on."""

from pathlib import Path

import torch

from strop.model import DEFAULT_MODEL, load_tokenizer


def build_tiny_model(out_dir: Path, cache_dir: Path, seed: int = 0) -> Path:
    """A tiny random Llama with the default model's real tokenizer, for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM  # only the tests need it

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tok = load_tokenizer(DEFAULT_MODEL, cache_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
