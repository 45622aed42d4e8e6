"""The executor interface: one model step over a batch of sequences, behind every backend.

Invariant: an executor is a pure step function over its own KV cache. The scheduler decides
which sequences run and which tokens they feed; the executor never reorders, drops or samples.

A step takes a list of :class:`SequenceChunk` (at most ``limits.max_batch_size`` of them,
``sum(len(c.tokens)) <= limits.max_num_tokens``), each naming the KV-cache slot of its
sequence and the position of its first token (= tokens already cached for that slot). It
returns float32 logits ``[len(chunks), vocab_size]`` for the last token of each chunk, in
chunk order, after appending every chunk's tokens to its slot's cache.

A chunk is a prefill (or a piece of one: chunked prefill) when it has several tokens, a
decode step when it has one; a step may mix both. Slots are integers in
``[0, limits.max_batch_size)``; the scheduler owns their assignment. ``reserve`` asks for
cache capacity (paged caches can run out; contiguous ones hold ``max_seq_len`` per slot) and
``release`` frees a finished sequence's slot.

Context logits: an executor whose engine was built with ``--gather_context_logits``
(``gathers_context_logits``) also returns, through :meth:`Executor.step_logits`, float32 logits
``[len(tokens), vocab_size]`` for every token of each chunk marked ``context_logits`` (row j:
the distribution of the token after ``tokens[j]``), on the same device as the last-token
logits. Other executors refuse such a chunk (``RuntimeError``: the core checks first).

Async scheduling (``supports_async``; the core's default loop where it is True): the core may
launch step n+1 before it has read step n's sampled tokens to the host. Such an executor
1. accepts ``step_logits(chunks, pending)``: :class:`DeviceTokens` names the chunks whose last
   token is still on the device (the previous step's sampled ids; the chunk's own value there is
   a placeholder); the executor writes ``pending.ids[row]`` into the step's token input on the
   device, never reading it to the host;
2. launches the step without reading anything from the device (no host sync): the returned
   logits are device tensors whose values are ready in stream order;
3. runs steps in launch order on one stream, so a write launched earlier lands earlier. The core
   relies on it when it releases a slot whose blocks a launched step still writes (a request
   that stopped at step n while its row of step n+1 was in flight): a later owner of those
   blocks only writes them in a later step.
Other executors (onnx, tensorrt) keep the synchronous loop and never get ``pending``.

A step's own greedy pass (:class:`GreedyHead`, the torch executor's CUDA-graph decode steps):
``step_logits`` may return, beside the logits, every row's finite flag and argmax, computed in
the step and already on their way to the host, so the sampler does not run that pass itself.
Its ``last`` logits are then the step's own buffer in the model's dtype, which the executor's
next step overwrites: the core reads them (in stream order, for rows that draw) before it
launches that step. ``step`` always returns a float32 copy.

Interrupts (:meth:`Executor.interrupt`, from any thread): the step under way, or the next
one if none is, ends early with :class:`~kiln.runtime.errors.StepInterrupted`, leaving the
cache as if it had not run (a step writes the same positions when it runs again), so the core
can run it again. An executor whose step is one long native call implements it (onnx:
``RunOptions.terminate``; a 2,048-token window on a CPU takes seconds, and a closing server
waited for it); the base class's does nothing, for executors whose steps end within
milliseconds (GPU graphs) or that cannot stop one (the step then ends as usual).

Warm-up (``needs_warm_up``): True where the first steps of a shape or path pay a one-time cost
(GPU kernel compiles and set-up) that :meth:`kiln.runtime.LLM.warm_up` should move before the
first request; executors on the CPU say False, and the warm-up skips them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kiln.engine import BuildLimits
from kiln.errors import option


@dataclass(frozen=True)
class SequenceChunk:
    slot: int
    tokens: Sequence[int]
    start: int  # position of tokens[0]; the slot's cache holds positions [0, start)
    context_logits: bool = False  # also return the logits of every token (step_logits)


@dataclass(frozen=True)
class DeviceTokens:
    """Tokens a previous step sampled, still on the executor's device (async scheduling):
    ``ids`` [rows] int64; ``feeds`` maps a chunk index of this step to the row of ``ids``
    holding that chunk's last token (the chunk's own value there is a placeholder)."""

    ids: torch.Tensor
    feeds: dict[int, int]


@dataclass(frozen=True)
class GreedyHead:
    """Every row's finite flag and argmax of a step's logits, computed by the step (module
    docstring): ``host`` float64 ``[2R]`` in pinned memory, ``[flags | argmax]`` of R >= n rows
    (rows from n on are a CUDA graph's padding), valid once ``ready`` has completed; ``ids``
    int64 ``[R]`` on the device, the argmax, which the sampler overwrites in place at rows that
    draw and the next step feeds on."""

    host: torch.Tensor
    ready: torch.cuda.Event
    ids: torch.Tensor


@dataclass(frozen=True)
class StepLogits:
    """What :meth:`Executor.step_logits` returns: each chunk's last-token logits [n, V] and,
    for chunks marked ``context_logits``, chunk index -> logits of all its tokens [len, V];
    ``greedy``: the step's own greedy pass (module docstring), or None (float32 ``last``)."""

    last: torch.Tensor
    context: dict[int, torch.Tensor]
    greedy: GreedyHead | None = None


class Executor(ABC):
    """One backend's model step (see the module docstring for the contract)."""

    limits: BuildLimits
    vocab_size: int
    gathers_context_logits: bool = False  # the engine returns context logits (step_logits)
    supports_async: bool = False  # step_logits takes ``pending`` device tokens (docstring)
    # ...and gains from it (a device that runs apart from the host): the core's default
    prefers_async: bool = False
    needs_warm_up: bool = True  # its first steps pay a one-time cost (docstring); CPU: False

    @abstractmethod
    def step(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """Run one step; float32 logits [len(chunks), vocab_size] of each chunk's last token."""

    def step_logits(self, chunks: Sequence[SequenceChunk],
                    pending: DeviceTokens | None = None) -> StepLogits:
        """:meth:`step`, plus the context logits of chunks that ask for them; ``pending``
        only where ``supports_async``."""
        if pending is not None:
            raise RuntimeError(f"{type(self).__name__} cannot take tokens still on the device "
                               f"(supports_async is False); read them to the host first")
        if any(c.context_logits for c in chunks):
            raise RuntimeError(f"{type(self).__name__} cannot return context logits (its engine "
                               f"was built without {option('gather_context_logits', True)})")
        return StepLogits(self.step(chunks), {})

    def reserve(self, slot: int, num_tokens: int) -> bool:
        """Ensure ``slot`` can hold ``num_tokens`` tokens in total; False if not now."""
        return num_tokens <= self.limits.max_seq_len

    def release(self, slot: int) -> None:
        """The sequence in ``slot`` has ended; its cache may be reused."""

    def interrupt(self) -> None:
        """End the step under way early, or the next one (module docstring); from any thread.
        Here nothing: the step ends as usual."""

    def close(self) -> None:
        """Free backend resources (sessions, GPU memory)."""
