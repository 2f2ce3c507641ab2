"""Sampling: each row's next token (greedy, or seeded temperature + top_p) and its logprobs."""

from collections.abc import Callable

import torch

from service.engines.base import SamplingParams, TokenLogprob

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily
NUCLEUS_CANDIDATES = 256  # top_p looks for its nucleus among this many tokens first: a
# full sort of a 49k vocabulary costs ~4 ms a row on CPU, topk(256) ~0.1 ms


def generator_for(
    params: SamplingParams, index: int, device: torch.device
) -> torch.Generator | None:
    """The random source of choice `index` (seeded from params.seed if given); None if greedy."""
    if params.temperature < GREEDY_BELOW:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed((params.seed + index) % 2**64)
    return generator


def sample(
    logits: torch.Tensor,
    generators: list[torch.Generator | None],
    params: list[SamplingParams],
) -> torch.Tensor:
    """One token per row (greedy, or temperature + top_p with the row's generator)."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, g in enumerate(generators) if g is not None]
    if sampled:
        dev = logits.device
        rows = torch.tensor(sampled, device=dev)
        temps = torch.tensor([params[i].temperature for i in sampled], device=dev)
        probs = torch.softmax(logits.index_select(0, rows) / temps[:, None], dim=-1)
        # One uniform draw per row from the row's own generator: a sample depends on
        # its seed and its distribution, never on its neighbours in the batch.
        u = torch.cat(
            [
                torch.rand(1, generator=generators[i], device=dev, dtype=torch.float64)
                for i in sampled
            ]
        )
        top_p = [params[i].top_p for i in sampled]
        tokens[rows] = _draw(probs, top_p, u)
    return tokens


def token_logprobs(
    logits: torch.Tensor,
    tokens: list[int],
    params: list[SamplingParams],
    token_text: Callable[[int], str],
) -> list[TokenLogprob | None]:
    """Each row's chosen token and top alternatives under the raw distribution, if it asked."""
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs]
    if wanted:
        rows = torch.tensor(wanted, device=logits.device)
        picked = torch.tensor([tokens[i] for i in wanted], device=logits.device)
        # The raw distribution: temperature 1, no top_p.
        logp = torch.log_softmax(logits.index_select(0, rows), dim=-1)
        chosen = logp.gather(1, picked[:, None]).squeeze(1).tolist()
        # Clamped: one odd request must not fail the batch's step.
        k = max(0, min(max(params[i].top_logprobs for i in wanted), logp.shape[-1]))
        top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(wanted):
            t, kk = tokens[i], min(k, max(0, params[i].top_logprobs))
            logprobs[i] = TokenLogprob(
                token=token_text(t),
                logprob=chosen[j],
                token_id=t,
                top=[(token_text(x), v) for x, v in zip(top_i[j][:kk], top_v[j][:kk], strict=True)],
            )
    return logprobs


def _draw(probs: torch.Tensor, top_p: list[float], u: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (R, V), restricted to the top_p nucleus where top_p < 1."""
    out = torch.empty(len(top_p), dtype=torch.long, device=probs.device)
    whole = [j for j, p in enumerate(top_p) if p >= 1]
    if whole:
        pick = torch.tensor(whole, device=probs.device)
        out[pick] = _inverse_cdf(probs.index_select(0, pick), u.index_select(0, pick))
    nucleus = [j for j, p in enumerate(top_p) if p < 1]
    if nucleus:
        pick = torch.tensor(nucleus, device=probs.device)
        p = torch.tensor([top_p[j] for j in nucleus], device=probs.device)
        head, index = probs.index_select(0, pick).topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]))
        for r, j in enumerate(nucleus):
            if head[r].sum() < p[r]:  # a flat distribution: the nucleus needs the full sort
                head_r, index_r = probs[j : j + 1].sort(dim=-1, descending=True)
            else:
                head_r, index_r = head[r : r + 1], index[r : r + 1]
            out[j] = _nucleus(head_r, index_r, p[r : r + 1], u[j : j + 1])[0]
    return out


def _nucleus(
    head: torch.Tensor, index: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Sample from sorted `head` (R, K) the smallest prefix whose mass reaches top_p."""
    # A token stays if the mass before it is under top_p; the first always stays.
    drop = head.cumsum(dim=-1) - head >= top_p.clamp(min=1e-9)[:, None]
    return index.gather(1, _inverse_cdf(head.masked_fill(drop, 0.0), u)[:, None])[:, 0]


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of unnormalized `weights` (R, V) by its uniform u (R,)."""
    # float64: a float32 cumsum over 49k tokens drifts enough to skew the tail.
    cdf = weights.double().cumsum(dim=-1)
    x = (u * cdf[:, -1])[:, None]
    # right=True never lands on a zero-weight token: its cdf equals its predecessor's.
    return torch.searchsorted(cdf, x, right=True)[:, 0].clamp(max=weights.shape[-1] - 1)
