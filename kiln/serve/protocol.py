"""The OpenAI wire format kiln serve speaks: pydantic request models, response builders, errors.

Contract:
- Request models accept the OpenAI fields kiln implements plus vLLM's sampling extras
  (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``,
  ``include_stop_str_in_output``); unknown fields are accepted and ignored (clients send newer
  fields than any server knows), in ``stream_options``, messages and content parts too, and
  each is named in a warning (kiln.serve.render: a misspelt ``max_token`` asks for nothing; a
  message's keys reach the chat template, OpenAI's ``tool_calls``... unwarned); ``user`` is
  accepted and ignored without a word. An optional field sent as JSON ``null`` takes its
  default, as OpenAI's API (the openai client sends ``"n": null``...).
- Types are strict, as OpenAI's, but for numbers: an integer field takes a float with no
  fractional part (``"max_tokens": 4.0``) as vLLM's pydantic does, a float field an integer;
  so do token ids, in ``prompt`` (``[1.0, 2.0]``, ``[[1.0]]``) and ``stop_token_ids``, as
  vLLM's ``list[int]`` (pydantic's lax int) takes them. (Lax pydantic also takes ``true`` and
  ``"1"`` as 1; kiln does not, in a token id as in any integer field.)
- A type error in a field (pydantic) and a value SamplingParams refuses both become
  :class:`ApiError` 400 naming the parameter; nothing a client sends can cause a 500.
- Response bodies are plain dicts in OpenAI's shapes (``text_completion``, ``chat.completion``
  and their ``.chunk`` stream forms), with ``usage``.

Non-goals: tools/function calling, ``response_format``, ``logit_bias``, ``suffix``, ``best_of``
other than n (completions) or 1 (chat), audio/images in messages; vLLM's ``min_tokens``,
``bad_words``, beam search and the other extras of UNSUPPORTED.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from kiln.runtime.tokenizer import CHAT_ROLES


class ApiError(Exception):
    """An OpenAI-shaped error response: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The response body; a lone surrogate a message repeats from the request (a role or
        an ``n`` of ``"\\udc80"``) as its escape: UTF-8 JSON cannot hold it (a retest's 500)."""
        return {"error": {"message": _escaped(self.message),
                          "type": self.TYPES.get(self.status, "error"),
                          "param": _escaped(self.param), "code": self.code}}


def _escaped(text: str | None) -> str | None:
    """``text`` with any lone surrogate as its backslash escape (``\\udc80``), else as is."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _NullIsDefault(BaseModel):
    """A model whose optional fields read JSON ``null`` as "not given" (OpenAI's meaning: a
    trial's ``"n": null`` and ``"stream": null`` were 400s); a required field stays required."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or k not in fields or fields[k].is_required()}


def whole(value: Any) -> Any:
    """A float with no fractional part as its int (``4.0``: 4), as vLLM's pydantic (lax mode)
    reads one where an integer is asked for (a trial's ``"max_tokens": 4.0`` had been a 400);
    anything else as given, for the strict int to refuse (4.5, inf, nan, true)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(whole)]
"""An integer request field: an int, or a float with no fractional part (:func:`whole`)."""


class StreamOptions(_NullIsDefault):
    """OpenAI's ``include_usage``, and vLLM's ``continuous_usage_stats``, which kiln serve
    refuses when true (usage in every chunk: kiln.serve.render checks). Other keys are kept in
    ``model_extra`` and ignored with a warning, as unknown request fields are (OpenAI's newer
    ``include_obfuscation``, a misspelt ``include_usages``...)."""

    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: bool = False
    continuous_usage_stats: bool = False


# OpenAI request fields kiln cannot honour: refused by name (a client relying on JSON mode or
# tool calls must not get free text back as if they had been applied; kiln.serve.render
# checks). Other unknown fields are ignored with a warning, as vLLM does.
UNSUPPORTED = ("response_format", "tools", "tool_choice", "functions", "function_call",
               "logit_bias", "suffix", "parallel_tool_calls",
               # vLLM's structured outputs and prompt logprobs (a retest's guided_json had
               # answered 200 with free text)
               "guided_json", "guided_regex", "guided_choice", "guided_grammar",
               "structured_outputs", "prompt_logprobs",
               # vLLM's sampling and request extras (its CompletionRequest and
               # ChatCompletionRequest, vllm/entrypoints/openai/{completion,chat_completion}/
               # protocol.py) that ask for what kiln does not do: refused but at their no-op
               # values (render.NO_OPS: min_tokens 0...); a min_tokens 10 had been ignored with
               # a warning, the completion shorter than asked
               "min_tokens", "bad_words", "allowed_token_ids", "logprob_token_ids",
               "logits_processors", "truncate_prompt_tokens", "use_beam_search",
               "add_special_tokens", "priority",
               "return_tokens_as_token_ids", "return_token_ids", "repetition_detection",
               "thinking_token_budget", "watermarking", "vllm_xargs",
               "spaces_between_special_tokens")
# vLLM's chat fields: ``echo`` (the last message prepended to the reply), a request's own
# ``chat_template``, ``continue_final_message``, ``chat_template_kwargs`` and ``documents``
# (the template's to read); and ``best_of``, which completions checks (a trial's chat echo had
# answered 200, nothing echoed); completions' echo is kiln's
UNSUPPORTED_IN_CHAT = ("echo", "chat_template", "continue_final_message", "best_of",
                       "chat_template_kwargs", "documents")


class _Sampling(_NullIsDefault):
    """Fields shared by both endpoints (mapped onto SamplingParams by kiln.serve.app). Types are
    strict, as OpenAI's: "5" or true is not a max_tokens, "yes" not a stream (a number may be
    an integer where a float is asked for, and a whole float where an integer is: Int)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None  # none: the served model, as vLLM's (app.py checks a name)
    max_tokens: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    min_p: float | None = None
    n: Int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: Int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[Int, Field(ge=0)]] | None = None  # vLLM's
    include_stop_str_in_output: bool = False  # vLLM's
    skip_special_tokens: bool = True  # vLLM's: false keeps special tokens in the text
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, ignored


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[Int] | list[list[Int]]  # (token ids as Int: a whole float
    # is one, as vLLM's lax list[int] reads it; [1.0, 2.0] had been a 400)
    echo: bool = False
    logprobs: Int | None = Field(None, ge=0, le=20)
    best_of: Int | None = Field(None, ge=1)  # n only (the app checks it: n candidates, n shown)


ROLES = CHAT_ROLES  # LLM.chat takes the same


class ChatMessage(BaseModel):
    # name, tool_call_id...: passed to the template (others warned of: kiln.serve.render)
    model_config = ConfigDict(extra="allow", strict=True)

    role: str  # one of ROLES (kiln.serve.render checks, naming the message)
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # a number had reached the template
    # (tool_calls, function_call: their shape is checked by kiln.serve.render, in one place)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    max_completion_tokens: Int | None = None
    add_generation_prompt: bool = True


# The deepest a body may nest arrays and objects within each other (and a tool call's
# arguments, JSON in a string, kiln.serve.render): one number, well below what Python's json
# reads from a handler (its recursion limit less the server's own frames, about 950 levels
# here: a trial's 990 had been told "not JSON (maximum recursion depth exceeded)")
MAX_JSON_DEPTH = 512


def deeper(data: dict | list, most: int) -> bool:
    """Whether parsed JSON ``data`` nests arrays and objects more than ``most`` levels deep
    (``data`` itself is level 1), level by level: no recursion."""
    level = [data]
    for _ in range(most):
        level = [item for held in level
                 for item in (held.values() if isinstance(held, dict) else held)
                 if isinstance(item, (dict, list))]
        if not level:
            return False
    return True


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[dict], use: dict | None,
                    chunk: bool = False) -> dict[str, Any]:
    body = {"id": rid, "object": "text_completion", "created": now(), "model": model,
            "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, choices: list[dict], use: dict | None,
              chunk: bool = False) -> dict[str, Any]:
    body = {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": now(), "model": model, "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


FinishReason = Literal["stop", "length", "abort", "error"]
