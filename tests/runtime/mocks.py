"""Mock models behind the executor interface, for runtime tests that need no engine.

- :class:`HashExecutor`: logits are a pseudo-random function of the slot's whole token history
  (tokens and their positions), so any scheduling mistake (a token fed twice, skipped, to the
  wrong slot or at the wrong position) changes every later token.
- :class:`ScriptedExecutor`: after a prompt of known length, the most likely next token follows
  a fixed script, then EOS; for text, stop and streaming tests.
- :class:`SlowExecutor`: a HashExecutor whose steps take ``step_s`` seconds (a model's time on
  a device), so that waits and latencies are measurable.
- :class:`NonFiniteExecutor`: a HashExecutor whose logits for chosen sequences turn NaN or Inf
  (corrupt weights, a 16-bit overflow) after some tokens.
- :class:`MetaExecutor` with :class:`OnDevice` and :class:`FakeDeviceGenerator`: an accelerator
  emulated on a CPU-only machine. Logits are meta tensors (shapes, no data); OnDevice fails any
  torch call that would break or sync the host on a real accelerator (a CPU tensor mixed into a
  device op, a generator on another device) and counts host reads.
All executors check the executor contract on every step (start == cached length, limits).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from kiln.engine import BuildLimits
from kiln.runtime.executor import Executor, SequenceChunk


class _ContractExecutor(Executor):
    def __init__(self, limits: BuildLimits, vocab_size: int):
        self.limits = limits
        self.vocab_size = vocab_size
        self.history: dict[int, list[int]] = {}
        self.steps: list[list[SequenceChunk]] = []
        self.released: list[int] = []
        self.closed = False  # a real executor's step after close() reads freed memory

    def step(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        return torch.stack([self.logits(history) for history in self.record(chunks)])

    def record(self, chunks: Sequence[SequenceChunk]) -> list[list[int]]:
        """Check the contract, append the chunks to their slots; each chunk's slot history."""
        assert not self.closed, "a step of a closed executor"
        assert 0 < len(chunks) <= self.limits.max_batch_size
        assert sum(len(c.tokens) for c in chunks) <= self.limits.max_num_tokens
        assert len({c.slot for c in chunks}) == len(chunks), "a slot twice in one step"
        self.steps.append(list(chunks))
        histories = []
        for c in chunks:
            hist = self.history.setdefault(c.slot, [])
            assert c.start == len(hist), f"slot {c.slot}: start {c.start} != cached {len(hist)}"
            assert 0 <= c.slot < self.limits.max_batch_size
            hist.extend(c.tokens)
            assert len(hist) <= self.limits.max_seq_len
            histories.append(hist)
        return histories

    def release(self, slot: int) -> None:
        assert not self.closed, "a release on a closed executor"
        self.history.pop(slot, None)
        self.released.append(slot)

    def close(self) -> None:
        self.closed = True

    def logits(self, history: list[int]) -> torch.Tensor:
        raise NotImplementedError


class HashExecutor(_ContractExecutor):
    def logits(self, history: list[int]) -> torch.Tensor:
        digest = hashlib.sha256(repr(history).encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.randn(self.vocab_size, generator=g) * 3


class ScriptedExecutor(_ContractExecutor):
    """Next token after ``prompt_len + k`` tokens is ``script[k]`` (then ``eos``)."""

    def __init__(self, limits: BuildLimits, vocab_size: int, prompt_len: int,
                 script: Sequence[int], eos: int):
        super().__init__(limits, vocab_size)
        self.prompt_len, self.script, self.eos = prompt_len, list(script), eos

    def logits(self, history: list[int]) -> torch.Tensor:
        k = len(history) - self.prompt_len
        token = self.script[k] if 0 <= k < len(self.script) else self.eos
        out = torch.zeros(self.vocab_size)
        out[token] = 10.0
        return out


class SlowExecutor(HashExecutor):
    def __init__(self, limits: BuildLimits, vocab_size: int, step_s: float):
        super().__init__(limits, vocab_size)
        self.step_s = step_s

    def step(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        time.sleep(self.step_s)
        return super().step(chunks)


class CapacityExecutor(HashExecutor):
    """A paged-cache stand-in: at most ``capacity`` reserved tokens over all slots."""

    def __init__(self, limits: BuildLimits, vocab_size: int, capacity: int):
        super().__init__(limits, vocab_size)
        self.capacity = capacity
        self.reserved: dict[int, int] = {}

    def reserve(self, slot: int, num_tokens: int) -> bool:
        others = sum(n for s, n in self.reserved.items() if s != slot)
        if others + num_tokens > self.capacity:
            return False
        self.reserved[slot] = num_tokens
        return True

    def release(self, slot: int) -> None:
        super().release(slot)
        self.reserved.pop(slot, None)


class NonFiniteExecutor(HashExecutor):
    """Sequences whose first token is ``poison`` get one ``value`` (NaN, +inf or -inf) among
    their logits once they hold ``after`` tokens; all others are HashExecutor's."""

    def __init__(self, limits: BuildLimits, vocab_size: int, poison: int, after: int,
                 value: float = math.nan):
        super().__init__(limits, vocab_size)
        self.poison, self.after, self.value = poison, after, value

    def logits(self, history: list[int]) -> torch.Tensor:
        out = super().logits(history)
        if history[0] == self.poison and len(history) >= self.after:
            out[len(history) % self.vocab_size] = self.value
        return out


class MetaExecutor(_ContractExecutor):
    """Logits on the meta device: an accelerator's output, emulated (see :class:`OnDevice`)."""

    def step(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        self.record(chunks)
        return torch.zeros(len(chunks), self.vocab_size, device="meta")


class FakeDeviceGenerator(torch.Generator):
    """A CPU generator that says it lives on ``device``: stands for an accelerator's generator
    where none can be made (meta tensors ignore generators; OnDevice checks the device)."""

    def __new__(cls, device: torch.device | str, seed: int = 0):
        generator = super().__new__(cls)
        generator._device = torch.device(device)
        generator.manual_seed(seed)
        return generator

    def __init__(self, device: torch.device | str, seed: int = 0):
        pass

    @property
    def device(self) -> torch.device:
        return self._device


_HOST_READS = {"__int__", "__float__", "__bool__", "__index__", "item", "tolist", "cpu",
               "numpy"}


class OnDevice(TorchFunctionMode):
    """Run code on meta tensors as if they were on an accelerator, failing what would break or
    block there:

    - a tensor of one element or more on another device (a CPU index or count tensor) in a torch
      call with device tensors: CUDA refuses most such mixes, and the others copy to the device
      and block (a host sync). Uploads (``.to(device)``) are fine, and so are 0-d CPU tensors
      (scalars, as on CUDA).
    - a ``torch.Generator`` not on the device (CUDA ops refuse a CPU generator).

    Host reads (int(), item(), tolist(), cpu(), numpy(), ``.to("cpu")``) are recorded in
    ``reads`` and answer ones (meta tensors hold no data).
    """

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device = torch.device(device)
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        if name in _HOST_READS or (name == "to" and self._target(args, kwargs) == "host"):
            self.reads.append(name)
            return _ones_like(name, args[0])
        if not (name == "to" and self._target(args, kwargs) == "device"):
            for value in _flatten((args, kwargs)):
                if isinstance(value, torch.Tensor) and value.device != self.device \
                        and value.dim() > 0:
                    raise AssertionError(f"torch.{name} got a tensor {tuple(value.shape)} on "
                                         f"{value.device}, not on {self.device}")
                if isinstance(value, torch.Generator) and value.device != self.device:
                    raise AssertionError(f"torch.{name} got a generator on {value.device} for "
                                         f"tensors on {self.device}")
        kwargs.pop("generator", None)  # meta kernels draw nothing (and refuse generators)
        return func(*args, **kwargs)

    def _target(self, args: tuple, kwargs: dict[str, Any]) -> str | None:
        device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
        if device is None:
            return None
        return "device" if device == self.device else "host"


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return _flatten(list(value.values()))
    return [value]


def _ones_like(name: str, tensor: torch.Tensor) -> Any:
    ones = torch.ones(tensor.shape, dtype=tensor.dtype)
    if name == "tolist":
        return ones.tolist()
    if name in ("cpu", "to"):
        return ones
    if name == "numpy":
        return ones.numpy()
    return {"__int__": int, "__index__": int, "__float__": float, "__bool__": bool,
            "item": lambda x: x.item()}[name](ones.reshape(-1)[0])
