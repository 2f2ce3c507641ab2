import pytest
import torch

from learner.logprobs import build_batch, prompt_ids, reference_logps, sequence_logps, token_logps
from learner.losses.dpo import dpo_loss

MESSAGES = [
    [{"role": "user", "content": "Say hello."}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is 2 + 2? Show work."},
    ],
]
COMPLETIONS = ["Hello there, friend!", "4"]


def _chat_prompt(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    return tokenizer.encode(text, add_special_tokens=False)


def test_build_batch_completion_mask_covers_completion_and_eos_only(tokenizer):
    batch = build_batch(tokenizer, MESSAGES, COMPLETIONS, max_len=256)

    eos = tokenizer.eos_token_id
    for i, (messages, completion) in enumerate(zip(MESSAGES, COMPLETIONS, strict=True)):
        ids = batch["input_ids"][i]
        prompt = _chat_prompt(tokenizer, messages)
        expected_completion = tokenizer.encode(completion, add_special_tokens=False) + [eos]
        n = len(prompt) + len(expected_completion)
        assert ids[: len(prompt)].tolist() == prompt
        assert ids[batch["completion_mask"][i].bool()].tolist() == expected_completion
        assert batch["completion_mask"][i, : len(prompt)].sum() == 0
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (ids.shape[0] - n)
    assert batch["input_ids"].shape[1] == max(batch["attention_mask"].sum(1).tolist())


def test_build_batch_append_eos_per_row_is_respected(tokenizer):
    batch = build_batch(tokenizer, MESSAGES, COMPLETIONS, max_len=256, append_eos=[False, True])

    row0 = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
    row1 = batch["input_ids"][1][batch["completion_mask"][1].bool()].tolist()
    assert row0 == tokenizer.encode(COMPLETIONS[0], add_special_tokens=False)
    assert row1[-1] == tokenizer.eos_token_id


def test_build_batch_long_completion_truncates_completion_not_prompt(tokenizer):
    prompt = prompt_ids(tokenizer, MESSAGES[0])
    max_len = len(prompt) + 3

    batch = build_batch(
        tokenizer, MESSAGES[:1], ["one two three four five six seven"], max_len=max_len
    )

    full = tokenizer.encode("one two three four five six seven", add_special_tokens=False)
    assert batch["input_ids"].shape == (1, max_len)
    assert batch["input_ids"][0, : len(prompt)].tolist() == prompt
    assert batch["input_ids"][0, len(prompt) :].tolist() == full[:3]  # eos cut with the text
    assert batch["completion_mask"][0].sum() == 3


def test_build_batch_prompt_longer_than_max_len_raises(tokenizer):
    with pytest.raises(ValueError, match="no room"):
        build_batch(
            tokenizer, MESSAGES[:1], ["hi"], max_len=len(prompt_ids(tokenizer, MESSAGES[0]))
        )


def test_build_batch_token_id_completion_is_used_verbatim(tokenizer):
    batch = build_batch(tokenizer, MESSAGES[:1], [[17, 18, 19]], max_len=256, append_eos=False)

    assert batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist() == [17, 18, 19]


def test_token_logps_padded_batch_matches_manual_log_softmax(base_model, tokenizer):
    batch = build_batch(tokenizer, MESSAGES, COMPLETIONS, max_len=256)

    with torch.no_grad():
        got = token_logps(base_model, batch)  # (B, T)
        # row 1 is the shorter one, so it is padded in the batch; score it alone, unpadded.
        n = int(batch["attention_mask"][1].sum())
        ids = batch["input_ids"][1, :n]
        logits = base_model(input_ids=ids[None]).logits[0]  # (n, V)
        logps = torch.log_softmax(logits, dim=-1)
    start = n - int(batch["completion_mask"][1].sum())
    manual = [logps[t - 1, ids[t]].item() for t in range(start, n)]

    assert got[1, start:n].tolist() == pytest.approx(manual, abs=1e-4)
    assert (got[1, :start] == 0).all() and (got[1, n:] == 0).all()
    assert sequence_logps(base_model, batch)[1].item() == pytest.approx(sum(manual), abs=1e-3)
    assert (got[batch["completion_mask"] == 1] < 0).all()


@pytest.mark.parametrize("messages", [MESSAGES, [MESSAGES[1], MESSAGES[1]]], ids=["two", "same"])
def test_token_logps_values_and_gradients_match_each_row_scored_alone(
    base_model, tokenizer, messages
):
    # token_logps runs the prefix the rows share once (the template's first tokens for two
    # prompts, the whole prompt for a group's) and takes the LM head at completion
    # positions only; log-probs and gradient must be those of each row alone, unpadded
    batch = build_batch(tokenizer, messages, COMPLETIONS, max_len=256)
    head = base_model.get_output_embeddings().weight

    got = token_logps(base_model, batch)  # (B, T)
    got.sum().backward()
    got_grad, head.grad = head.grad.clone(), None

    expected = torch.zeros_like(got)  # (B, T)
    for i in range(len(messages)):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n]
        logps = torch.log_softmax(base_model(input_ids=ids[None]).logits[0], dim=-1)  # (n, V)
        at = batch["completion_mask"][i, :n].bool().nonzero().squeeze(1)  # completion positions
        row = logps[at - 1, ids[at]]  # (completion tokens,)
        row.sum().backward()
        expected[i, at] = row.detach()

    assert torch.allclose(got.detach(), expected, atol=1e-4)
    assert torch.allclose(got_grad, head.grad, atol=1e-4)
    assert got_grad.abs().sum() > 0


def test_reference_logps_equals_base_model_before_and_after_training(
    lora_model, base_model, tokenizer
):
    batch = build_batch(tokenizer, MESSAGES, COMPLETIONS, max_len=256)
    with torch.no_grad():
        base = token_logps(base_model, batch)
        policy_before = token_logps(lora_model, batch)
    torch.testing.assert_close(reference_logps(lora_model, batch), base)
    torch.testing.assert_close(policy_before, base)  # LoRA's B starts at zero: a no-op

    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        logps = sequence_logps(lora_model, batch)
        loss, _ = dpo_loss(logps[:1], logps[1:], base.sum(1)[:1], base.sum(1)[1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        policy_after = token_logps(lora_model, batch)
    reference_after = reference_logps(lora_model, batch)
    torch.testing.assert_close(reference_after, base)
    assert not reference_after.requires_grad
    assert (policy_after - base).abs().max() > 1e-3
    with torch.no_grad():  # leaving the context switched the adapter back on
        torch.testing.assert_close(token_logps(lora_model, batch), policy_after)
