"""Warming an engine up: a few short requests of every kind, run before it serves anyone.

What a backend compiles or sets up the first time a step needs it would otherwise be paid by
the first clients: Triton kernel variants (one per specialization of their integer arguments:
equal to 1, a multiple of 16, or neither), the device sampling path's kernels (penalties,
top-k/top-p sorts, draws), cuBLAS and ONNX Runtime set-up for new shapes. ``kiln serve``'s first
requests on an H200 waited 1.3-1.9 s (TTFT p99) where later ones took tens of ms
(benchmarks/GPU_NOTES.md). The torch executor compiles the kernel variants it can foresee while
it loads (``_warm_up_kernels``, its memory probe's steps; compile_watch names any it missed);
this runs whole requests through the core on top of that, so every layer a request crosses
(scheduler, executor steps, sampling, detokenization) has run once. Measured on an H200
(GPU_NOTES.md): those 1.3-1.9 s were attention-kernel variants specialized on each step's
index-pointer alignment, which no warm-up could enumerate (fixed at their source,
kiln.runtime.torch_backend.inputs); since, this warm-up compiles nothing the load did not, takes
0.5 s, and the first requests after it had TTFT 51 ms p50 against 25-29 ms later (not measured
without it).

Contract: :func:`warm_up` takes an idle :class:`~kiln.runtime.core.EngineCore` and, where its
executor ``needs_warm_up`` (on a GPU; on the CPU nothing compiles and the first steps cost what
later ones do, so it returns False at once), runs :func:`warm_up_requests` to their ends and
leaves the core idle again, every slot free (the
requests are popped; per-request failures, such as a KV cache too small for one of them, are
ignored: they are the engine's answer to that request, not a warm-up failure). The set:

- as many requests as the engine batches at once, with prompts of 1, 3, 16 and 17 tokens, so
  the first steps prefill several prompts together and the next ones decode full batches;
- greedy and sampled rows in the same steps: plain greedy; a repetition penalty with logprobs;
  temperature with top-k, top-p and min-p; presence and frequency penalties with logprobs;
- max_tokens 4 to 7, so requests leave the batch at different steps (decode batches of several
  widths), and two requests beyond the batch, admitted as slots free (prefill beside decodes):
  a prompt of max_num_tokens + 1 tokens (a chunked prefill; capped at max_input_len) and, where
  the engine gathers context logits, a prompt scored with prompt logprobs and max_tokens 0
  (``kiln serve``'s echo scoring).

Cost: about 10 x max_batch_size + max_num_tokens prompt tokens and ten steps, a second or so
of a GPU's time.

Non-goals: every shape a workload may bring (``kiln bench --warmup`` runs its own workload's);
timing anything.
"""

from __future__ import annotations

from kiln.engine import BuildLimits
from kiln.runtime.core import EngineCore
from kiln.runtime.params import SamplingParams

PROMPT_LENGTHS = (1, 3, 16, 17)  # Triton specializes integers equal to 1 and multiples of 16
KINDS = (
    SamplingParams(temperature=0, ignore_eos=True),
    SamplingParams(temperature=0, repetition_penalty=1.1, logprobs=2, ignore_eos=True),
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=1, ignore_eos=True),
    SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5, logprobs=1,
                   seed=2, ignore_eos=True),
)


def warm_up_requests(limits: BuildLimits, vocab_size: int, gathers_context_logits: bool,
                     ) -> list[tuple[list[int], SamplingParams]]:
    """The warm-up's (prompt ids, params), in order (see the module docstring)."""
    def prompt(n: int, salt: int) -> list[int]:
        return [(7919 * (j + 1) + 104729 * salt) % vocab_size
                for j in range(min(n, limits.max_input_len))]

    out = [(prompt(PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)], i),
            KINDS[i % len(KINDS)].replace(max_tokens=4 + i % 4))
           for i in range(limits.max_batch_size)]
    out.append((prompt(limits.max_num_tokens + 1, len(out)), KINDS[0].replace(max_tokens=3)))
    if gathers_context_logits:
        out.append((prompt(17, len(out)), SamplingParams(temperature=0, max_tokens=0,
                                                         prompt_logprobs=2)))
    return out


def warm_up(core: EngineCore) -> bool:
    """Run :func:`warm_up_requests` through an idle core to their ends where its executor needs
    a warm-up; whether it did (module docstring)."""
    if core.has_work() or core.requests:
        raise RuntimeError("warm an engine up before it takes requests: this one has some")
    if not core.executor.needs_warm_up:
        return False
    requests = warm_up_requests(core.limits, core.vocab_size,
                                core.executor.gathers_context_logits)
    ids = [core.add_request(prompt, params, f"warm-up-{i}").request_id
           for i, (prompt, params) in enumerate(requests)]
    while core.has_work():
        core.step()
    for request_id in ids:
        core.pop(request_id)
    return True
