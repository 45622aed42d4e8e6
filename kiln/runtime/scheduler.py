"""In-flight batching: which sequences run in the next executor step, and with which tokens.

Invariant: a sequence's tokens are fed to its KV-cache slot exactly once, in order, at the
positions they have in the sequence, whatever else shares the step. So with a deterministic
executor and greedy sampling, a request's output does not depend on when it arrived or what
ran beside it.

The scheduler is a small state machine over sequences:

    waiting --admit (free slot, reserve ok)--> running --finish/abort--> gone (slot released)
    waiting --abort--> gone

Each :meth:`Scheduler.schedule` call returns a :class:`SchedulerOutput` (its only output): the
chunks of the next step, at most ``max_batch_size`` of them and at most ``max_num_tokens``
tokens in all. A running sequence with one pending token is a decode; with more it is a
(chunked) prefill. After the executor ran the step, :meth:`Scheduler.commit` marks the chunks
cached and :meth:`Scheduler.append` adds each sampled token. :meth:`Scheduler.finish` releases a
slot at once, so the next step may admit a waiting request into it.

Async scheduling (the core's default on executors that support it): the core appends
:data:`PLACEHOLDER` for a token sampled on the device but not yet read, so the next step can be
scheduled before it is known (its chunk carries the placeholder, which the executor replaces on
the device); :meth:`Scheduler.fill` then puts the real token in its place.

A sequence added with ``context_logits`` (prompt logprobs) marks each of its prompt chunks
``context_logits``: the executor then returns the logits of every prompt token.

Policies are strategies (:class:`Policy`): the order in which running sequences take the token
budget, and which waiting sequence is admitted next. The default runs decodes first, then
prefills, oldest first, and admits first-come-first-served.

KV capacity: on admission a sequence reserves its whole worst case (prompt + max new tokens - 1
cached tokens) through ``Executor.reserve``; a paged cache that cannot hold it yet answers
False and the request waits (head of line) until a running one finishes. Nothing is preempted.

Non-goals: priorities, preemption, prefix caching, speculative decoding.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from kiln.engine import BuildLimits
from kiln.runtime.executor import SequenceChunk

PLACEHOLDER = -1  # a sampled token still on the device (async scheduling)


@dataclass(eq=False)  # one object per request: compared by identity, not by its token lists
class SequenceState:
    """One request's tokens and progress, as the scheduler sees it."""

    request_id: str
    tokens: list[int]  # prompt then generated tokens
    num_prompt: int
    capacity: int  # KV-cache tokens it may ever need (reserved on admission)
    arrival: int  # admission order key (monotonic)
    slot: int | None = None
    num_cached: int = 0  # tokens already written to its slot's cache
    context_logits: bool = False  # its prompt chunks ask for every token's logits

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.num_cached

    @property
    def is_decode(self) -> bool:
        return self.num_cached >= self.num_prompt


@dataclass(frozen=True)
class ScheduledChunk:
    """One row of a step: a chunk for the executor and whether its logits pick a token."""

    request_id: str
    chunk: SequenceChunk
    samples: bool  # the chunk ends at the sequence's last token: sample from its logits


@dataclass(frozen=True)
class SchedulerOutput:
    """The next step: ``chunks`` in executor row order; ``admitted`` joined the batch now."""

    chunks: tuple[ScheduledChunk, ...]
    admitted: tuple[str, ...] = ()
    num_tokens: int = 0

    @property
    def empty(self) -> bool:
        return not self.chunks


class WaitingQueue(Sequence[SequenceState]):
    """The waiting sequences, oldest first: appended at the end, any one removed in O(1) (an
    OrderedDict by request id, a linked list underneath; a deque's removal scanned it, so
    aborting n queued requests in random order, as a server's clients leave, took O(n^2):
    benchmarks/scheduler_queue.py). A Sequence as policies read it: [0] and [-1] in O(1),
    [i] in O(min(i, n - i))."""

    def __init__(self) -> None:
        self._by_id: OrderedDict[str, SequenceState] = OrderedDict()

    def append(self, seq: SequenceState) -> None:
        self._by_id[seq.request_id] = seq

    def get(self, request_id: str) -> SequenceState | None:
        return self._by_id.get(request_id)

    def pop(self, request_id: str) -> SequenceState | None:
        """Remove the sequence of ``request_id``; None if none of that id waits."""
        return self._by_id.pop(request_id, None)

    def remove(self, seq: SequenceState) -> None:
        """Remove ``seq`` (the object itself: ValueError if it does not wait here)."""
        if seq not in self:
            raise ValueError(f"request {seq.request_id!r} is not waiting")
        del self._by_id[seq.request_id]

    def __contains__(self, seq: object) -> bool:
        return isinstance(seq, SequenceState) and self._by_id.get(seq.request_id) is seq

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[SequenceState]:
        return iter(self._by_id.values())

    def __reversed__(self) -> Iterator[SequenceState]:
        return reversed(self._by_id.values())

    @overload
    def __getitem__(self, index: int) -> SequenceState: ...

    @overload
    def __getitem__(self, index: slice) -> list[SequenceState]: ...

    def __getitem__(self, index: int | slice) -> SequenceState | list[SequenceState]:
        if isinstance(index, slice):
            return list(self)[index]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} of a queue of {n} waiting")
        index %= n
        if index < n - index:
            return next(itertools.islice(iter(self), index, None))
        return next(itertools.islice(reversed(self), n - 1 - index, None))


class Policy:
    """Default strategy: decodes, then prefills, oldest first; admit first come first served."""

    def running_order(self, running: Iterable[SequenceState]) -> list[SequenceState]:
        return sorted(running, key=lambda s: (not s.is_decode, s.arrival))

    def next_waiting(self, waiting: Sequence[SequenceState]) -> SequenceState | None:
        return waiting[0] if waiting else None


@dataclass
class Scheduler:
    """See the module docstring. ``reserve``/``release`` are the executor's."""

    limits: BuildLimits
    reserve: Callable[[int, int], bool]
    release: Callable[[int], None]
    policy: Policy = field(default_factory=Policy)

    def __post_init__(self) -> None:
        self.waiting = WaitingQueue()  # in the policy's hands: a sequence
        self.running: dict[str, SequenceState] = {}
        self._free = list(range(self.limits.max_batch_size))
        heapq.heapify(self._free)
        self._counter = 0

    def add(self, request_id: str, prompt: Sequence[int], capacity: int,
            context_logits: bool = False) -> None:
        """Queue a request; ``capacity`` = cache tokens it needs at most (<= max_seq_len);
        ``context_logits``: its prompt chunks ask for every token's logits."""
        if request_id in self.running or self.waiting.get(request_id) is not None:
            raise ValueError(f"request id {request_id!r} is already scheduled")
        self._counter += 1
        seq = SequenceState(request_id, list(prompt), len(prompt), capacity, self._counter,
                            context_logits=context_logits)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.limits.max_num_tokens
        rows: list[ScheduledChunk] = []
        for seq in self.policy.running_order(self.running.values()):
            if budget == 0:
                break
            n = min(seq.pending, budget)
            if n > 0:
                rows.append(self._chunk(seq, n))
                budget -= n
        admitted = []
        while budget > 0 and self._free and len(rows) < self.limits.max_batch_size:
            seq = self.policy.next_waiting(self.waiting)
            if seq is None or not self.reserve(self._free[0], seq.capacity):
                break
            self.waiting.remove(seq)
            seq.slot = heapq.heappop(self._free)
            self.running[seq.request_id] = seq
            admitted.append(seq.request_id)
            n = min(seq.pending, budget)
            rows.append(self._chunk(seq, n))
            budget -= n
        return SchedulerOutput(tuple(rows), tuple(admitted),
                               self.limits.max_num_tokens - budget)

    def stalled(self) -> SequenceState | None:
        """A waiting sequence that can never be admitted (nothing running, reserve refused)."""
        if self.running or not self.waiting or len(self._free) < self.limits.max_batch_size:
            return None
        seq = self.policy.next_waiting(self.waiting)
        return None if seq is None or self.reserve(self._free[0], seq.capacity) else seq

    @staticmethod
    def _chunk(seq: SequenceState, n: int) -> ScheduledChunk:
        start = seq.num_cached
        chunk = SequenceChunk(seq.slot, tuple(seq.tokens[start:start + n]), start,
                              context_logits=seq.context_logits and start < seq.num_prompt)
        return ScheduledChunk(seq.request_id, chunk, samples=start + n == len(seq.tokens))

    def commit(self, output: SchedulerOutput) -> None:
        """The executor ran ``output``: its chunks are now cached."""
        for row in output.chunks:
            seq = self.running.get(row.request_id)
            if seq is not None:
                seq.num_cached = row.chunk.start + len(row.chunk.tokens)

    def append(self, request_id: str, token: int) -> None:
        self.running[request_id].tokens.append(token)

    def fill(self, request_id: str, token: int) -> None:
        """Replace the sequence's trailing :data:`PLACEHOLDER` by the token it stands for."""
        tokens = self.running[request_id].tokens
        if tokens[-1] != PLACEHOLDER:
            raise RuntimeError(f"{request_id}: no placeholder to fill (core bug)")
        tokens[-1] = token

    def finish(self, request_id: str) -> None:
        """Remove a request (finished or aborted), releasing its slot now. Unknown ids: no-op."""
        seq = self.running.pop(request_id, None)
        if seq is not None:
            self.release(seq.slot)
            heapq.heappush(self._free, seq.slot)
            return
        # in O(1) in any order (a scan of the queue, removing by the dataclass's equality, had
        # made an eval's abort of 18,749 queued windows take 19 s after its Ctrl-C)
        self.waiting.pop(request_id)
