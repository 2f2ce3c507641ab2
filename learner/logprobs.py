"""Tokenizing (prompt, completion) pairs and scoring completions under a model.

Layout of a batch, one row per completion, right-padded to the longest row:

    input_ids        <prompt (chat template, generation prompt)> <completion> [eos] <pad>...
    attention_mask    1 ...                                       1 ...        1     0 ...
    completion_mask   0 ...                                       1 ...        1     0 ...

Position t of `token_logps` holds log p(input_ids[t] | input_ids[:t]), so it lines up
with `input_ids` and `completion_mask`: the loss masks are the completion mask itself.
"""

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from strop.model import cache_argument


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt as the engine served it: the template plus the
    assistant generation prompt. Rendered to text, then encoded without special tokens,
    because the template already writes them."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_batch(
    tokenizer: PreTrainedTokenizerBase,
    messages_list: Sequence[list[dict]],
    completions: Sequence[str | list[int]],
    max_len: int,
    append_eos: bool | Sequence[bool] = True,
) -> dict[str, Tensor]:
    """Tokenize prompts + completions into a right-padded batch.

    Args:
        tokenizer: the model's tokenizer (needs a chat template and an eos token).
        messages_list: one OpenAI-style message list per row (the prompt).
        completions: one completion per row, as text (encoded without special tokens,
            separately from the prompt, as the engine generated it after the prompt) or
            as the token ids the engine sampled.
        max_len: the most tokens a row may have, prompt included. The prompt is never
            cut: the completion is truncated to fit; a truncated completion loses its eos
            too, since the cut text did not end there. A prompt that leaves no room for
            one completion token raises ValueError.
        append_eos: add `tokenizer.eos_token_id` after the completion; True for a served
            completion whose finish_reason was "stop" (it ended with eos), False for
            "length". One flag for all rows, or one per row.

    Returns:
        `input_ids` (B, T) long, padded with the pad token (eos if none);
        `attention_mask` (B, T) long, 1 on prompt and completion tokens;
        `completion_mask` (B, T) long, 1 on completion tokens (eos included) only.
    """
    n = len(messages_list)
    if len(completions) != n:
        raise ValueError(f"{n} prompts but {len(completions)} completions")
    eos_flags = [append_eos] * n if isinstance(append_eos, bool) else list(append_eos)
    if len(eos_flags) != n:
        raise ValueError(f"{n} rows but {len(eos_flags)} append_eos flags")
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    rows = []
    for messages, completion, eos in zip(messages_list, completions, eos_flags, strict=True):
        prompt = prompt_ids(tokenizer, messages)
        if isinstance(completion, str):
            completion = tokenizer(completion, add_special_tokens=False)["input_ids"]
        completion = list(completion) + ([tokenizer.eos_token_id] if eos else [])
        room = max_len - len(prompt)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_len={max_len}")
        rows.append((prompt, completion[:room]))

    T = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((n, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((n, T), dtype=torch.long)  # (B, T)
    completion_mask = torch.zeros((n, T), dtype=torch.long)  # (B, T)
    for i, (prompt, completion) in enumerate(rows):
        p, c = len(prompt), len(completion)
        input_ids[i, : p + c] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, : p + c] = 1
        completion_mask[i, p : p + c] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }


def token_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-token log-probs of each token given its prefix, zero outside the completion.

    Returns: (B, T), aligned with `batch["input_ids"]`; on the model's device. Gradients
    flow unless the caller is under no_grad. Logits are upcast to float32 first, since a
    bf16 log-softmax over a large vocabulary loses most of the precision that matters.
    Two savings, both exact up to float rounding, worth about 40% of a GRPO step on CPU:
    only positions that predict a completion token go through the LM head (TRL's
    `logits_to_keep`), and the prompt prefix every row shares (a group's prompt, or the
    chat template's system turn) runs once, its keys and values repeated for each row.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)  # (B, T)
    attention_mask = batch["attention_mask"].to(device)  # (B, T)
    completion = batch["completion_mask"].to(device).bool()  # (B, T)
    # the logits at position t predict token t+1, so the first completion token of any
    # row is predicted at position `first`; the prompt before it needs no logits
    predicts = completion[:, 1:]  # (B, T-1)
    columns = predicts.any(dim=0).nonzero()
    first = int(columns[0]) if len(columns) else predicts.shape[1] - 1
    # leading tokens that every row has, unpadded: the shared prefix, at most `first` long
    head = input_ids[:, :first]  # (B, first)
    same = ((head == head[:1]) & attention_mask[:, :first].bool()).all(dim=0)  # (first,)
    shared = int(same.long().cumprod(0).sum()) if len(input_ids) > 1 else 0
    kw = {}
    if shared:
        cache = DynamicCache()
        kw = {cache_argument(model): cache}
        model(input_ids=input_ids[:1, :shared], use_cache=True, logits_to_keep=1, **kw)
        cache.batch_repeat_interleave(len(input_ids))
    keep = torch.arange(first - shared, predicts.shape[1] - shared, device=device)  # (K,)
    logits = model(
        input_ids=input_ids[:, shared:],
        attention_mask=attention_mask,
        logits_to_keep=keep,
        **kw,
    ).logits  # (B, K, V): positions first .. T-2
    wanted = predicts[:, first:]  # (B, K)
    logps = torch.log_softmax(logits[wanted].float(), dim=-1)  # (N, V), N completion tokens
    targets = input_ids[:, first + 1 :][wanted]  # (N,)
    picked = logps.gather(1, targets[:, None]).squeeze(1)  # (N,)
    # row-major order of `wanted` is that of `completion`, shifted by one position
    return torch.zeros(completion.shape, dtype=picked.dtype, device=device).masked_scatter(
        completion, picked
    )  # (B, T)


def sequence_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Log-probability of each completion: per-token log-probs summed over it. Shape: (B,)"""
    return token_logps(model, batch).sum(dim=1)  # (B,)


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-token log-probs under the reference policy: the same model with its adapter
    disabled, so no second model is held in memory. For a model that is not a PeftModel
    this is `token_logps` under no_grad. Shape: (B, T); `.sum(1)` gives the sequence
    log-probs DPO wants."""
    disabled = model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()
    with disabled:
        return token_logps(model, batch)  # (B, T)
