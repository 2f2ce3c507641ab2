"""The embedded engine: transformers + PEFT in this process, with continuous batching.

One scheduler thread owns the model. Requests reach it through a command queue. Between
two decode steps it prefills newly arrived prompts and joins their sequences to the
running batch (left-padded to one length), then feeds every active sequence its last
token, samples the next one, and drops finished or cancelled sequences from the KV cache,
so a short answer never waits for a long one and a new request never waits for a batch.
Adapter loads and unloads are commands too: they run between steps, so a request in
flight never sees the model change under it.

Logprobs are those of the model's raw distribution: log_softmax of the logits at
temperature 1, before top_p, whatever temperature and top_p the token was sampled with.
A choice that ends on an EOS token counts that token in `token_ids`, `logprobs` and the
completion tokens, but not in its text (as vLLM does).

One idea a module: `front` (EmbeddedEngine and a request's handle), `scheduler` (the
thread and its commands), `sequence` (a choice's text and stop strings), `sampling`
(choosing tokens, logprobs) and `cache` (the batch's KV cache).
"""

from service.engines.embedded.front import EmbeddedEngine

__all__ = ["EmbeddedEngine"]
