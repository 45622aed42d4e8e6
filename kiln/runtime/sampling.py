"""Sampling: validated parameters and pure functions from rows of logits to tokens.

Contract:
- :class:`SamplingParams` is frozen and validated on construction; a bad value raises
  :class:`~kiln.runtime.errors.SamplingParamsError` naming the parameter.
- :func:`sample` (one row) and :func:`sample_rows` (one step of a batch) are pure functions of
  (logits, params, token history, generator): each request has its own random source
  (:class:`Generators`: one ``torch.Generator`` per device, made on first use on the logits'
  device) and nothing global is read, so a seeded request gives the same tokens alone or in any
  batch. Greedy (``temperature == 0``) never touches a generator.
- A row whose logits are not all finite (NaN or Inf) gets no token: ``sample_rows`` answers
  None for it (the caller fails that request), ``sample`` raises ValueError.
- Processing order (as HF/vLLM; tests/runtime/test_sampling.py checks it against HF's own
  processors): repetition penalty (prompt and output tokens), presence and frequency penalties
  (output tokens), temperature, then top-k, top-p and min-p filters, then a draw from the
  remaining distribution.
- Logprobs (``logprobs=n``) are the model's raw distribution: ``log_softmax`` of the logits before
  penalties, temperature and filters (vLLM's default), for the chosen token and the top n.
  :func:`context_logprobs` does the same for given tokens (prompt logprobs), one row each.

Where the work runs (two implementations of the same rules, checked against each other by
tests/runtime/test_sampling.py):
- Logits on an accelerator: torch ops on that device, with the request's generator on that
  device; penalty index tensors are built there. Every row's finite flag and argmax come from
  one pass (:func:`finite_argmax`: Triton kernels on CUDA, :mod:`kiln.plugins.greedy`), shared
  by the plain-greedy rows. A step reads the host once: the flags, the argmax, every drawn
  token and any logprobs come back in one transfer, copied on a side stream so that the next
  step's work does not queue behind it. :func:`launch_rows` splits that in two for async
  scheduling: it launches the work and returns :class:`SampledRows`, whose ``ids`` (the
  sampled tokens, a device tensor) the next step can consume on the device, and whose
  ``collect`` does the one read later, waiting on an event of this step's sampling only.
  Generators advance at launch (CUDA draws take their offsets on the host), so launching early
  changes no draw.
- Logits on the CPU: numpy, which stays on the calling thread. torch's CPU ops on a
  vocabulary-sized row go parallel (its intra-op grain is 32768 elements) and wake its OpenMP
  pool, whose workers then spin on the cores the executor's own threads (ONNX Runtime) need for
  the next step; changing torch's thread count per step instead would change the caller's
  process-wide setting. Torch only draws one uniform from the request's CPU generator per
  sampled token (a 1-element op, never parallel).

Non-goals: beam search, logit bias maps, guided decoding.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kiln.runtime.executor import GreedyHead
from kiln.runtime.params import SamplingParams, TokenLogprobs

logger = logging.getLogger(__name__)

# The largest temperature the logits are divided by (float32 ends near 3.4e38; logits / 1e30 are
# all zero to within float32's resolution around them, the same uniform draw).
MAX_TEMPERATURE = 1e30
MAX_PENALTY = 1e30  # the same for the repetition penalty (and 1 / it): float32 holds both


def _entropy() -> int:
    return int.from_bytes(os.urandom(8), "little")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device``: seeded, or from OS entropy when ``seed`` is None. Seeds equal
    modulo 2**64 give one stream (torch reads a negative seed as its two's complement), and
    distinct ones distinct streams on every device (:func:`_seed_cpu`)."""
    generator = torch.Generator(device=device)
    seed = seed if seed is not None else _entropy()
    if generator.device.type == "cpu":
        _seed_cpu(generator, seed)
    else:  # CUDA's Philox takes all 64 bits
        generator.manual_seed(seed)
    return generator


# torch's CPU generator state (CPUGeneratorImplState, aten/src/ATen/CPUGeneratorImpl.cpp):
# initial seed (u64), left (i32), seeded (i32), next (u64), then the 624 mt19937 words, as u64.
_MT_WORDS, _MT_AT, _CPU_STATE_BYTES = 624, 24, 5056


def _seed_cpu(generator: torch.Generator, seed: int) -> None:
    """Seed a CPU generator with all 64 bits of ``seed``. torch's CPU generator (mt19937) seeds
    from the low 32 bits alone, so 0, 2**32 and 2**63 had drawn the same samples (a trial's
    seeds 0 and 2**63; -1 and 2**63 - 1). Seeds below 2**32 keep torch's own seeding (their
    samples are as before); the others set mt19937's words as ``init_by_array`` of the seed's
    two 32-bit halves makes them (the reference MT19937's seeding from a key, as numpy's
    ``RandomState`` seeds from an array), torch's layout checked on the state it wrote."""
    seed %= 2**64
    generator.manual_seed(seed)  # the layout to fill in, and initial_seed() == seed
    if seed < 2**32:
        return
    state = generator.get_state()
    raw = state.numpy()
    words = raw[_MT_AT:_MT_AT + 8 * _MT_WORDS].view(np.uint64) if raw.size == _CPU_STATE_BYTES \
        else None
    if words is None or int(words[0]) != seed % 2**32 or int(raw[8:16].view(np.int32)[0]) != 1:
        raise RuntimeError(f"torch {torch.__version__}'s CPU generator state is not laid out as "
                           f"kiln reads it (kiln.runtime.sampling._seed_cpu)")
    key = np.array([seed % 2**32, seed >> 32], dtype=np.int64)
    words[:] = np.random.RandomState(key).get_state()[1]  # (legacy seeding: init_by_array)
    generator.set_state(state)


class Generators:
    """One request's random source: a ``torch.Generator`` per device, made on first use (greedy
    requests never make one) and seeded with the request's seed, drawn once from OS entropy
    when it has none. The stream on a device depends on the seed alone; CPU and CUDA streams
    differ."""

    def __init__(self, seed: int | None):
        self.seed = seed if seed is not None else _entropy()
        self._by_device: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        generator = self._by_device.get(device)
        if generator is None:
            generator = self._by_device[device] = make_generator(self.seed, device)
        return generator


@dataclass(frozen=True)
class Row:
    """One row of a step's logits to sample, with its request's parameters, token history and
    random source (``generator(device)`` gives the generator on the logits' device)."""

    index: int
    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: Callable[[torch.device], torch.Generator]


Picked = tuple[int, TokenLogprobs | None]


def is_plain_greedy(params: SamplingParams) -> bool:
    """Greedy with no penalty and no logprobs: the token is the argmax of the raw logits, so
    such rows of a batch can share one argmax (and one device-to-host copy)."""
    return params.greedy and params.logprobs is None and params.repetition_penalty == 1.0 \
        and not (params.presence_penalty or params.frequency_penalty)


def sample(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
           output_ids: Sequence[int], generator: torch.Generator) -> Picked:
    """The next token (and logprobs) of one request from its logits [vocab] on any device;
    ``generator`` must be on that device. Raises ValueError if the logits are not finite."""
    picked = sample_rows(logits[None], [Row(0, params, prompt_ids, output_ids,
                                            lambda device: generator)])[0]
    if picked is None:
        raise ValueError("the logits are not finite (NaN or Inf); there is nothing to sample")
    return picked


def sample_rows(logits: torch.Tensor, rows: Sequence[Row],
                greedy: GreedyHead | None = None) -> list[Picked | None]:
    """One step of a batch: the next token (and logprobs) of each row of ``logits``
    [batch, vocab], or None for a row whose logits are not all finite (NaN or Inf).

    CPU logits are sampled with numpy, other devices with torch ops on the device and one
    device-to-host read for the whole step (module docstring); ``greedy``: the step's own
    greedy pass over device logits (:func:`launch_rows_torch`)."""
    if not rows:
        return []
    if logits.device.type == "cpu":
        return sample_rows_numpy(logits.numpy(), rows)
    return launch_rows_torch(logits, rows, greedy).collect()


class SampledRows:
    """A step's sampling, launched (:func:`launch_rows`): ``ids`` [batch] int64 on the logits'
    device holds each sampled row's token (the argmax in the other rows, a valid but
    unspecified token id in a non-finite one) with no host read, for the next step to feed on
    the device; :meth:`collect` gives what :func:`sample_rows` returns, reading the device
    once (it waits for this step's sampling only, not for work launched after it)."""

    def __init__(self, ids: torch.Tensor, collect: Callable[[], list[Picked | None]]):
        self.ids = ids
        self._collect = collect

    def collect(self) -> list[Picked | None]:
        return self._collect()


def launch_rows(logits: torch.Tensor, rows: Sequence[Row],
                greedy: GreedyHead | None = None) -> SampledRows:
    """:func:`sample_rows` in two halves (async scheduling): launch now, collect later. Same
    tokens, same generator draws. CPU logits are sampled at once (numpy); ``ids`` then is a
    CPU tensor of the picks."""
    if logits.device.type == "cpu":
        picked = sample_rows_numpy(logits.numpy(), rows) if rows else []
        ids = [0] * logits.shape[0]
        for row, pick in zip(rows, picked, strict=True):
            ids[row.index] = 0 if pick is None else pick[0]
        return SampledRows(torch.tensor(ids, dtype=torch.long), lambda: picked)
    return launch_rows_torch(logits, rows, greedy)


def _generator(row: Row, device: torch.device) -> torch.Generator | None:
    if row.params.greedy:
        return None
    generator = row.generator(device)
    if generator.device != device:
        raise ValueError(f"the generator is on {generator.device} but the logits are on "
                         f"{device}; make it on the logits' device (Generators.on)")
    return generator


# -- torch, on the logits' device -----------------------------------------------------------
def sample_rows_torch(logits: torch.Tensor, rows: Sequence[Row]) -> list[Picked | None]:
    """Everything stays on the device until one read of [finite flags, argmax, tokens,
    logprobs], packed as float64 (token ids < 2^53 are exact)."""
    return launch_rows_torch(logits, rows).collect()


def launch_rows_torch(logits: torch.Tensor, rows: Sequence[Row],
                      greedy: GreedyHead | None = None) -> SampledRows:
    """:func:`sample_rows_torch`, launched: on CUDA the packed result is copied to pinned host
    memory on a side stream without blocking, and an event marks its end; ``collect`` waits
    on that event. The finite flags and the argmax of every row come from one pass
    (:func:`finite_argmax`), or from ``greedy``, the step's own pass, whose flags and argmax
    are already on their way to the host (logits then in the model's dtype: rows that draw
    are sampled from a float32 copy of their row, as from float32 logits); rows that draw
    are sampled one by one after it."""
    batch, device = logits.shape[0], logits.device
    if greedy is None:
        head, ids = finite_argmax(logits)  # [finite flags | argmax] float64, argmax int64
    else:
        head, ids = None, greedy.ids
    parts, drawn, drawn_rows = [], [], []
    for row in rows:
        if is_plain_greedy(row.params):
            continue
        x = logits[row.index].float()  # a float32 row (a copy of a 16-bit one)
        token = sample_torch(x, row.params, row.prompt_ids, row.output_ids,
                             _generator(row, device))
        drawn.append(token.reshape(1))
        drawn_rows.append(row.index)
        parts.append(token.reshape(1))
        if row.params.logprobs is not None:
            parts.extend(_logprobs_on_device(x, token, row.params.logprobs))
    if drawn:  # in place: the argmax is this step's (or the step's own pass's) to overwrite
        ids.index_copy_(0, _index(drawn_rows, device), torch.cat(drawn))
    drawn_parts = [p.reshape(-1).double() for p in parts]
    if greedy is None:
        packed = torch.cat([head] + drawn_parts) if drawn_parts else head
    else:
        packed = torch.cat(drawn_parts) if drawn_parts else None
    events = [] if greedy is None else [greedy.ready]
    if packed is not None and device.type == "cuda":
        packed, event = _copy_to_host(packed)
        events.append(event)
    vocab = logits.shape[-1]

    def collect() -> list[Picked | None]:
        for event in events:
            event.synchronize()
        host = packed.tolist() if packed is not None else []  # the one host read
        if greedy is not None:
            host = greedy.host.tolist() + host
        return _unpack(host, rows, batch if greedy is None else len(greedy.ids), vocab)
    return SampledRows(ids, collect)


def finite_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, ids)`` of :mod:`kiln.plugins.greedy`: every row's finite flag and argmax
    as float64 ``[2B]``, and the argmax as int64 ``[B]``; Triton kernels on CUDA for 16- and
    32-bit floats, the reference's torch ops otherwise (a float64 row would lose its exact
    flags and picks in the kernels' float32)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.is_cuda and logits.dtype in (torch.float16, torch.bfloat16, torch.float32):
        kernels = _greedy_kernels()
        if kernels is not None:
            return kernels.finite_argmax(logits)
    from kiln.plugins.greedy import triton_reference
    return triton_reference.finite_argmax(logits)


@functools.cache
def _greedy_kernels():
    try:
        from kiln.plugins.greedy import triton_kernels
    except ImportError as e:
        logger.warning("the sampler's greedy pass runs as torch ops, nine kernels a step "
                       "instead of one or two: its Triton kernels could not be imported (%s); "
                       "pip install triton", e)
        return None
    return triton_kernels


_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_to_host(packed: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Copy ``packed`` to pinned host memory on a side stream, after the work queued so far
    on the current one, so that the current stream goes on to the next step without waiting
    for the copy; returns the host tensor and an event recorded after the copy."""
    device = packed.device
    stream = _copy_streams.get(device)
    if stream is None:
        stream = _copy_streams[device] = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    packed.record_stream(stream)  # its memory is not reused before the copy has read it
    return host, event


def _unpack(host: list[float], rows: Sequence[Row], batch: int, vocab: int,
            ) -> list[Picked | None]:
    finite, argmax, pos = host[:batch], host[batch:2 * batch], 2 * batch
    picked: list[Picked | None] = []
    for row in rows:
        logprobs = None
        if is_plain_greedy(row.params):
            token = int(argmax[row.index])
        else:
            token, pos = int(host[pos]), pos + 1
            if row.params.logprobs is not None:
                n = min(row.params.logprobs, vocab)
                values, ids = host[pos:pos + 1 + n], host[pos + 1 + n:pos + 1 + 2 * n]
                pos += 1 + 2 * n
                logprobs = TokenLogprobs(token, values[0], {int(i): v for i, v in
                                                            zip(ids, values[1:], strict=True)})
        picked.append((token, logprobs) if finite[row.index] else None)
    return picked


def sample_torch(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
                 output_ids: Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
    """The next token of one row [vocab] as a 0-d tensor on its device (no host sync).

    The draw is the exponential race argmax(p / q), q ~ Exp(1): torch.multinomial's own
    single-sample algorithm, written out so that nothing validates the distribution: a
    non-finite row must give a (discarded) token, not a failed device-side check that would
    take the whole step, or the CUDA context, down."""
    processed = apply_penalties(logits, params, prompt_ids, output_ids)
    if params.greedy:
        return processed.argmax()
    probs = torch.softmax(filter_logits(processed, params), -1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race.clamp_min_(torch.finfo(race.dtype).tiny)).argmax()


def _index(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """Token ids as a long tensor on ``device``. To CUDA from pinned memory without blocking:
    a blocking copy would wait for the step's kernels, a host sync per row."""
    host = torch.tensor(list(ids), dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
                    output_ids: Sequence[int]) -> torch.Tensor:
    """Repetition (prompt + output) then presence/frequency (output) penalties, on the logits'
    device. Returns ``logits`` itself when no penalty applies, else a new tensor."""
    if params.repetition_penalty == 1.0 and not (params.presence_penalty
                                                 or params.frequency_penalty):
        return logits
    vocab, device = logits.shape[-1], logits.device
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.zeros(vocab, dtype=torch.bool, device=device).index_fill_(
            0, _index([*prompt_ids, *output_ids], device), True)
        penalty = _repetition_penalty(params)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = torch.zeros(vocab, dtype=logits.dtype, device=device).index_add_(
            0, _index(output_ids, device), torch.ones(len(output_ids), dtype=logits.dtype,
                                                      device=device))
        logits = logits - params.frequency_penalty * counts \
            - params.presence_penalty * (counts > 0)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: dropped tokens get -inf. Needs temperature > 0.

    Top-p keeps the smallest prefix of the sorted tokens whose mass reaches top_p (the first
    always stays), then every token at least as likely as the last one kept, so tied tokens
    stay or go together."""
    logits = logits / _temperature(params)
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        ordered = torch.sort(logits, descending=True).values
        probs = torch.softmax(ordered, -1)
        kept = (probs.cumsum(-1) - probs) < params.top_p  # mass before each token: a prefix
        threshold = torch.where(kept, ordered, math.inf).min()
        logits = logits.masked_fill(logits < threshold, -math.inf)
    if params.min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), -math.inf)
    return logits


def _repetition_penalty(params: SamplingParams) -> float:
    """The repetition penalty applied: the request's, within [1 / MAX_PENALTY, MAX_PENALTY]
    (a larger one overflows float32 when cast, and numpy warned of it; a penalized logit is
    then ~0 or below any other either way)."""
    return min(max(params.repetition_penalty, 1 / MAX_PENALTY), MAX_PENALTY)


def _temperature(params: SamplingParams) -> float:
    """The temperature the logits are divided by: the request's, at most ``MAX_TEMPERATURE``
    (a larger one, up to float64's range, would overflow float32 to inf; the draw is uniform
    well before either)."""
    return min(params.temperature, MAX_TEMPERATURE)


def _logprobs_on_device(logits: torch.Tensor, token: torch.Tensor, n: int,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """[chosen, top n values] and [top n ids] of the raw log_softmax, on the device."""
    logprobs = torch.log_softmax(logits.float(), -1)
    top = torch.topk(logprobs, min(n, logprobs.shape[-1]))
    return torch.cat([logprobs.gather(0, token.reshape(1)), top.values]), top.indices


# -- numpy, for CPU logits -------------------------------------------------------------------
def sample_rows_numpy(logits: np.ndarray, rows: Sequence[Row]) -> list[Picked | None]:
    finite = {row.index: bool(np.isfinite(logits[row.index]).all()) for row in rows}
    plain = [row.index for row in rows if finite[row.index] and is_plain_greedy(row.params)]
    every = len(plain) == logits.shape[0]
    argmax = dict(zip(plain, (logits if every else logits[plain]).argmax(-1).tolist(),
                      strict=True))
    cpu = torch.device("cpu")
    picked: list[Picked | None] = []
    for row in rows:
        if not finite[row.index]:
            picked.append(None)
        elif row.index in argmax:
            picked.append((argmax[row.index], None))
        else:
            picked.append(sample_numpy(logits[row.index], row.params, row.prompt_ids,
                                       row.output_ids, _generator(row, cpu)))
    return picked


def sample_numpy(logits: np.ndarray, params: SamplingParams, prompt_ids: Sequence[int],
                 output_ids: Sequence[int], generator: torch.Generator | None) -> Picked:
    """:func:`sample_torch`'s twin for one CPU row [vocab]: the same penalties and filters
    in numpy; the draw inverts the CDF at one uniform from the (CPU) generator."""
    processed = penalties_numpy(logits, params, prompt_ids, output_ids)
    if params.greedy:
        token = int(processed.argmax())
    else:
        kept = filter_numpy(processed, params)
        cdf = np.cumsum(np.exp(kept - kept.max()), dtype=np.float64)  # dropped tokens add 0
        u = torch.rand((), dtype=torch.float64, generator=generator).item()
        token = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return token, (None if params.logprobs is None else _logprobs_numpy(logits, token,
                                                                         params.logprobs))


def penalties_numpy(logits: np.ndarray, params: SamplingParams, prompt_ids: Sequence[int],
                    output_ids: Sequence[int]) -> np.ndarray:
    """:func:`apply_penalties` in numpy (same float32 arithmetic)."""
    if params.repetition_penalty == 1.0 and not (params.presence_penalty
                                                 or params.frequency_penalty):
        return logits
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = np.unique(np.asarray([*prompt_ids, *output_ids], np.int64))
        logits = logits.copy()
        picked = logits[seen]
        penalty = np.float32(_repetition_penalty(params))
        logits[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = np.bincount(np.asarray(output_ids, np.int64),
                             minlength=logits.shape[-1]).astype(logits.dtype)
        logits = logits - np.float32(params.frequency_penalty) * counts \
            - np.float32(params.presence_penalty) * (counts > 0)
    return logits


def filter_numpy(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """:func:`filter_logits` in numpy (same rules; sums in float64)."""
    logits = logits / np.float32(_temperature(params))
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = np.partition(logits, vocab - params.top_k)[vocab - params.top_k]
        logits[logits < kth] = -np.inf
    if params.top_p < 1.0:
        ordered = np.sort(logits)[::-1]
        weights = np.exp(ordered - ordered[0])
        probs = weights / weights.sum(dtype=np.float64)
        kept = np.count_nonzero((np.cumsum(probs) - probs) < params.top_p)
        logits[logits < ordered[kept - 1]] = -np.inf
    if params.min_p > 0:
        weights = np.exp(logits - logits.max())  # probabilities over the most likely one's
        logits[weights < params.min_p] = -np.inf
    return logits


def _logprobs_numpy(logits: np.ndarray, token: int, n: int) -> TokenLogprobs:
    top = logits.max()
    logprobs = logits - np.float32(top + np.log(np.exp(logits - top).sum(dtype=np.float64)))
    n = min(n, logprobs.shape[-1])
    best = np.argpartition(-logprobs, n - 1)[:n] if n else np.empty(0, np.int64)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprobs(token, float(logprobs[token]),
                         {int(i): float(logprobs[i]) for i in best})


def context_logprobs(logits: torch.Tensor, token_ids: Sequence[int], n: int,
                     ) -> list[TokenLogprobs] | None:
    """Row j's raw logprob of ``token_ids[j]`` and its top ``n``, from float32 ``logits``
    [len(token_ids), vocab] on any device (prompt logprobs); None if any row is not finite."""
    rows = len(token_ids)
    if rows == 0:
        return []
    if logits.device.type != "cpu":
        logprobs = torch.log_softmax(logits[:rows].float(), -1)
        if not bool(torch.isfinite(logits[:rows]).all()):
            return None
        ids = torch.tensor(list(token_ids), device=logits.device)
        chosen = logprobs.gather(1, ids[:, None])[:, 0]
        top = torch.topk(logprobs, min(n, logprobs.shape[-1]))
        chosen, values, indices = chosen.tolist(), top.values.tolist(), top.indices.tolist()
    else:
        x = logits[:rows].numpy()
        if not np.isfinite(x).all():
            return None
        peak = x.max(axis=1, keepdims=True)
        total = np.exp(x - peak).sum(axis=1, keepdims=True, dtype=np.float64)
        logprobs = x - (peak + np.log(total)).astype(np.float32)  # as _logprobs_numpy
        chosen = logprobs[np.arange(rows), np.asarray(token_ids)].tolist()
        n = min(n, logprobs.shape[-1])
        best = np.argpartition(-logprobs, n - 1, axis=1)[:, :n] if n else \
            np.empty((rows, 0), np.int64)
        order = np.argsort(-np.take_along_axis(logprobs, best, 1), axis=1, kind="stable")
        indices = np.take_along_axis(best, order, 1).tolist()
        values = np.take_along_axis(logprobs, np.asarray(indices, np.int64).reshape(rows, n),
                                    1).tolist()
    return [TokenLogprobs(int(t), float(c), {int(i): float(v) for i, v in zip(ix, vs,
                                                                              strict=True)})
            for t, c, ix, vs in zip(token_ids, chosen, indices, values, strict=True)]
