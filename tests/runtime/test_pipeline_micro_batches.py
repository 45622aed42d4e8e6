"""Micro-batched pipeline steps: the split, the executor's sends, and DistCollectives' send.

- :func:`split_micro_batches` as a pure function: contiguous, non-empty, deterministic,
  balanced by tokens.
- The stages of a pipeline engine run in one process, one after the other, over fake
  collectives (:class:`Stage`) that deliver a send only when the sender waits for it: each step
  must send one residual stream per micro-batch without waiting in between, and wait for them
  all before it returns; the last stage's logits and context logits are tp 1's (float32,
  1e-4), with tokens still on the device (``pending``) too. Two and three stages (a middle
  stage receives and sends).
- :class:`~kiln.runtime.distributed.comm.DistCollectives` over gloo (two ranks in threads):
  ``send_hidden`` returns before the peer receives (a gloo send completes only then, so a
  blocking one would time out here), and the streams arrive in order.

The engines of worker processes (pp 2, tp 2 x pp 2) with micro-batches on:
tests/runtime/test_distributed.py.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.checkpoint import load_config, load_rank
from kiln.config import Mapping
from kiln.engine import BuildLimits
from kiln.runtime.distributed.comm import Groups
from kiln.runtime.executor import DeviceTokens, SequenceChunk
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions
from kiln.runtime.torch_backend.inputs import split_micro_batches
from kiln.runtime.torch_backend.parallel import Collectives, RankShard
from tests.helpers import save_hf_model
from tests.models import LLAMA_BASE, kiln_checkpoint

LIMITS = BuildLimits(max_batch_size=4, max_input_len=24, max_seq_len=40, max_num_tokens=40)


# -- the split ------------------------------------------------------------------------------
def token_counts(lens: list[int], parts: list[slice]) -> list[int]:
    return [sum(lens[part]) for part in parts]


def test_the_split_is_contiguous_non_empty_deterministic_and_balanced():
    rng = random.Random(0)
    for _ in range(500):
        lens = [rng.choice([1, 1, 1, rng.randint(2, 64)]) for _ in range(rng.randint(1, 12))]
        count = rng.randint(1, 6)
        parts = split_micro_batches(lens, count)
        assert len(parts) == min(count, len(lens)), (lens, count)
        assert [p.start for p in parts] == [0] + [p.stop for p in parts[:-1]], (lens, count)
        assert parts[-1].stop == len(lens) and all(p.stop > p.start for p in parts)
        assert split_micro_batches(tuple(lens), count) == parts
        bound = sum(lens) / len(parts) + max(lens)
        assert max(token_counts(lens, parts)) <= bound, (lens, count, parts)


@pytest.mark.parametrize(("lens", "count", "tokens"), [
    ([1] * 7, 2, [3, 4]),  # decode tokens: as even as they go
    ([1] * 8, 4, [2, 2, 2, 2]),
    ([5, 5, 5, 5], 2, [10, 10]),
    ([1] * 10 + [500], 2, [10, 500]),  # a long prefill beside decode tokens: a micro-batch alone
    ([500] + [1] * 10, 2, [500, 10]),
    ([9, 1, 1, 9], 3, [9, 2, 9]),
    ([12], 4, [12]),  # more micro-batches asked than chunks: one per chunk at most
    ([3, 4, 5], 8, [3, 4, 5]),
    ([3, 4, 5], 1, [12]),
])
def test_the_split_of_typical_steps(lens, count, tokens):
    assert token_counts(lens, split_micro_batches(lens, count)) == tokens


def test_micro_batches_must_be_positive():
    with pytest.raises(ValueError, match="micro_batches is 0"):
        TorchExecutorOptions(micro_batches=0)
    with pytest.raises(ValueError, match="micro_batch_tokens is 0"):
        TorchExecutorOptions(micro_batch_tokens=0)


@pytest.mark.parametrize("micro_batches, tokens, want", [
    (None, 8, 1),      # a decode step of 8 sequences stays whole
    (None, 255, 1), (None, 256, 1), (None, 511, 1), (None, 512, 2),  # one per 256 tokens
    (None, 4096, 2),   # at most one per stage
    (3, 8, 3), (1, 4096, 1)])  # asked for: as asked (the split caps it at one per chunk)
def test_by_default_each_micro_batch_has_256_tokens_and_decode_steps_stay_whole(
        micro_batches, tokens, want):
    ex = TorchExecutor.__new__(TorchExecutor)  # the rule reads the options and the mapping
    ex.options = TorchExecutorOptions(micro_batches=micro_batches)
    ex.shard = SimpleNamespace(mapping=Mapping(pp_size=2))
    assert ex.micro_batch_count(tokens) == want


# -- the stages of a pipeline in one process ------------------------------------------------
class Stage(Collectives):
    """One stage's collectives (tp 1) in a pipeline run in one process, stage after stage: a
    send is delivered to the next stage's queue only when the sender waits for it (so a stage
    that never waits, or changes a tensor it sent before waiting, feeds the next stage wrong
    data); ``log`` records ``("send", sends in flight before it)`` and ``("wait", count)``."""

    def __init__(self, inbox: deque | None, outbox: deque):
        self.inbox, self.outbox = inbox, outbox
        self.in_flight: list[torch.Tensor] = []
        self.log: list[tuple[str, int]] = []

    def all_reduce(self, x):
        raise AssertionError("a tp 1 stage calls no all-reduce")

    def gather_vocab(self, x):
        raise AssertionError("a tp 1 stage gathers no vocab")

    def send_hidden(self, x):
        self.log.append(("send", len(self.in_flight)))
        self.in_flight.append(x)

    def wait_sent(self):
        self.log.append(("wait", len(self.in_flight)))
        self.outbox.extend(x.clone() for x in self.in_flight)
        self.in_flight = []

    def recv_hidden(self, rows, like):
        x = self.inbox.popleft()
        assert x.shape == (rows, like.shape[-1]) and x.dtype == like.dtype
        return x

    def min_over_world(self, value):
        return value


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A 3-layer random Llama converted for pp 1, 2 and 3."""
    root = tmp_path_factory.mktemp("llama3l")
    hf = save_hf_model(LlamaForCausalLM, LlamaConfig(**{**LLAMA_BASE, "num_hidden_layers": 3}),
                       root / "hf")
    return {pp: kiln_checkpoint(hf, root / f"pp{pp}", pp=pp) for pp in (1, 2, 3)}


MICRO_BATCH_TOKENS = 4  # the default's tokens per micro-batch, small enough for these steps


def executor(ckpt, rank: int = 0, comm: Collectives | None = None,
             micro_batches: int | None = None) -> TorchExecutor:
    config = load_config(ckpt)
    shard = RankShard(config.mapping, rank, comm)
    options = TorchExecutorOptions(page_size=8, micro_batches=micro_batches,
                                   micro_batch_tokens=MICRO_BATCH_TOKENS)
    return TorchExecutor(config.decoder, load_rank(ckpt, rank, config), LIMITS,
                         options=options, gather_context_logits=True, shard=shard)


def pipeline(ckpt, micro_batches: int | None) -> list[tuple[TorchExecutor, Stage]]:
    stages = load_config(ckpt).mapping.pp_size
    queues = [deque() for _ in range(stages - 1)]
    comms = [Stage(queues[s - 1] if s else None, queues[s] if s + 1 < stages else deque())
             for s in range(stages)]
    return [(executor(ckpt, s, comm, micro_batches), comm) for s, comm in enumerate(comms)]


def steps(vocab: int) -> list[tuple[list[SequenceChunk], tuple[int, ...]]]:
    """(chunks, indices of the chunks whose token is fed on the device) of steps mixing
    prefill chunks and decode tokens, one chunk alone, context logits, and fed tokens."""
    g = torch.Generator().manual_seed(3)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return [
        ([SequenceChunk(0, tokens(13), 0), SequenceChunk(1, tokens(5), 0),
          SequenceChunk(2, tokens(9), 0, context_logits=True)], ()),
        ([SequenceChunk(0, tokens(1), 13), SequenceChunk(1, tokens(1), 5),
          SequenceChunk(2, tokens(1), 9), SequenceChunk(3, tokens(17), 0)], ()),
        ([SequenceChunk(3, tokens(6), 17, context_logits=True)], ()),  # one chunk
        ([SequenceChunk(0, tokens(1), 14), SequenceChunk(1, tokens(1), 6),
          SequenceChunk(2, tokens(1), 10), SequenceChunk(3, tokens(1), 23)], (1, 3)),
        ([SequenceChunk(1, tokens(1), 7), SequenceChunk(0, tokens(1), 15),
          SequenceChunk(3, tokens(4), 24, context_logits=True)], (0,)),
    ]


def run_step(ex: TorchExecutor, chunks: list[SequenceChunk], fed: tuple[int, ...]):
    """The step with the last tokens of chunks ``fed`` taken on the device, from rows of
    ``ids`` in reverse order (their chunk's value there is a placeholder, 0)."""
    if not fed:
        return ex.step_logits(chunks)
    ids = torch.tensor([chunks[i].tokens[-1] for i in reversed(fed)], dtype=torch.int64)
    placeholders = [SequenceChunk(c.slot, [*c.tokens[:-1], 0], c.start, c.context_logits)
                    if i in fed else c for i, c in enumerate(chunks)]
    rows = {i: len(fed) - 1 - r for r, i in enumerate(fed)}
    return ex.step_logits(placeholders, DeviceTokens(ids, rows))


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("micro_batches", [None, 1, 3, 4])
def test_each_micro_batch_is_sent_without_waiting_and_the_step_waits_for_all(
        checkpoints, stages, micro_batches):
    single = executor(checkpoints[1])
    ranks = pipeline(checkpoints[stages], micro_batches)
    for chunks, fed in steps(single.vocab_size):
        for ex in (single, *(ex for ex, _ in ranks)):
            for c in chunks:
                assert ex.reserve(c.slot, c.start + len(c.tokens))
        want = run_step(single, chunks, fed)
        tokens = sum(len(c.tokens) for c in chunks)
        default = max(1, min(stages, tokens // MICRO_BATCH_TOKENS))
        count = min(micro_batches or default, len(chunks))
        for s, (ex, comm) in enumerate(ranks):
            comm.log.clear()
            got = run_step(ex, chunks, fed)
            if s + 1 < stages:  # sends one by one, then one wait before the step returns
                assert comm.log == [("send", i) for i in range(count)] + [("wait", count)]
                assert got.last.shape == (0, single.vocab_size) and not got.context
        assert all(not comm.inbox for _, comm in ranks[1:])  # the last stage took every send
        assert float((got.last - want.last).abs().max()) <= 1e-4
        assert sorted(got.context) == sorted(want.context)
        for i, logits in want.context.items():
            assert got.context[i].shape == logits.shape
            assert float((got.context[i] - logits).abs().max()) <= 1e-4


# -- DistCollectives over gloo ---------------------------------------------------------------
def test_dist_send_hidden_returns_before_the_peer_receives_and_streams_arrive_in_order():
    store, timeout = dist.HashStore(), timedelta(seconds=5)
    groups: dict[int, Groups] = {}

    def connect(rank: int) -> None:
        groups[rank] = Groups(store, rank, 2, "cpu", timeout)

    threads = [threading.Thread(target=connect, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mapping = Mapping(pp_size=2)
    first, second = (groups[rank].collectives(mapping) for rank in (0, 1))
    sent = [torch.randn(rows, 8) for rows in (3, 5)]
    for x in sent:  # a send that waited for its receive would time out here
        first.send_hidden(x)
    got = [second.recv_hidden(len(x), x) for x in sent]
    first.wait_sent()
    first.wait_sent()  # nothing left in flight
    assert all(torch.equal(a, b) for a, b in zip(got, sent, strict=True))
