"""Runtime: executors, KV caches, scheduling and sampling over built engines.

Public API: :class:`LLM` (sync generate / generate_stream / chat), :class:`AsyncLLM` (asyncio
submit / stream / abort), :class:`SamplingParams`, and the result types.
"""

from kiln.runtime.async_llm import AsyncLLM
from kiln.runtime.llm import LLM
from kiln.runtime.loader import ExecutorOptions, open_engine
from kiln.runtime.outputs import CompletionResult, RequestTimings, StreamDelta
from kiln.runtime.sampling import SamplingParams, TokenLogprobs

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "ExecutorOptions", "open_engine",
           "CompletionResult", "RequestTimings", "StreamDelta", "TokenLogprobs"]
