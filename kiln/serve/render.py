"""Requests to engine inputs (prompts, SamplingParams) and results to OpenAI choices.

Contract:
- :meth:`Renderer.completion_params` / :meth:`Renderer.chat_params` start from the engine's
  defaults (its generation_config.json, as ``LLM``) and override the fields the request gives;
  a value SamplingParams refuses is an :class:`ApiError` 400 whose ``param`` is the request
  field (``logprobs``/``top_logprobs`` for SamplingParams' logprobs and prompt_logprobs).
- A completions prompt of the list forms is named ``prompt[i]`` in errors, even in a list of
  one; a token id outside the engine's vocabulary by its path (``prompt[1]``, ``prompt[0][1]``).
  A token id may be written as a whole float (``[1.0, 2.0]``, as vLLM's lax ``list[int]``
  reads it); 1.5, true or "1" is named by its path, as a value of no prompt form.
- A field name (a JSON object's key) holding a lone surrogate (a ``\\udXXX`` escape of half a
  character) is a 400 naming the field by its path, the surrogate escaped as the body escapes
  it: ``messages[0].x\\udc80``, ``mess\\udc80ages``; a stop string holding one is named by its
  path too (``stop[1]``), with its value, as is a chat message's ``name`` or other key's string
  (``messages[0].name``, ``messages[0].nmae``), whether or not the chat template reads it.
- Completions' default ``max_tokens`` is 16 (OpenAI's); chat's is the engine's max_seq_len
  (the runtime ends the request at the engine's length limit first). A ``max_tokens`` (or
  ``max_completion_tokens``) the request gives that the prompt leaves no room for (prompt +
  max_tokens over the context, ``max_model_len``: max_seq_len + 1) is a 400 naming it, in vLLM's
  and OpenAI's words ("This model's maximum context length is N tokens. However, you requested
  M tokens (P in the messages, K in the completion)..."; a list's prompt named ``prompt[i]``
  before them), each prompt checked (kiln.serve.state.too_long); a prompt alone too long keeps
  the engine's refusal. It had run to the end of the context, finish_reason length.
- ``echo`` prepends the prompt's text; with ``logprobs`` it also prepends the prompt tokens'
  log-probabilities (the first is null), which needs an engine built with
  ``--gather_context_logits`` (a 400 otherwise). Streaming echo sends the prompt's text in the
  first chunk; with ``logprobs``, also the prompt's log-probabilities, which the runtime's
  stream gives with the request's last delta only: such a stream's chunks are held and sent
  together at its end (the same chunks as otherwise; ``max_tokens`` 0 or 1, the usual scoring
  requests, lose nothing).
- Streamed completions' ``text_offset`` counts from the start of the choice's whole text (the
  echoed prompt included), as in the non-streamed response; every chunk carries
  ``stop_reason``, null but in the chunk with the ``finish_reason``.
- vLLM's conventions: ``top_k`` -1 is off (as 0), ``stop_token_ids``,
  ``include_stop_str_in_output`` and ``skip_special_tokens`` are SamplingParams'. vLLM's extras
  kiln does not implement (``min_tokens``, ``bad_words``, ``use_beam_search``... UNSUPPORTED)
  are refused by name, a 400, but at their no-op values (NO_OPS: ``min_tokens`` 0,
  ``add_special_tokens`` true in completions and false in chat, vLLM's defaults).
- Request fields kiln serve does not know (``max_token``, ``stream_options.include_usages``,
  a content part's ``messages[].content[].foo``) are ignored, and named in a WARNING of this
  module's logger the first time a server meets each (vLLM's "fields were present in the
  request but ignored"), at DEBUG after that. A line lists LIST_MOST names, then how many
  more; a server remembers WARN_MOST names, and the WARNING that reaches them says that names
  new to it are logged at DEBUG from then on. A null field asks for nothing and is not named,
  nor are ``user`` and the UNSUPPORTED fields (refused by name, or no-ops). A chat message's keys
  kiln serve does not know (``messages[].nmae``) reach the chat template, and are named in
  the same way, apart; those of MESSAGE_KEYS (OpenAI's ``tool_calls``...) are not.
- Chat prompts are the engine's chat template (or ``--chat_template``), rendered in jinja2's
  sandbox as :meth:`kiln.runtime.LLM.render_chat`; message ``content`` may be a string or a list
  of ``{"type": "text"}`` parts, or, in an assistant message with ``tool_calls`` (or
  ``function_call``), null, as OpenAI's (a replayed conversation that called a tool): "" to the
  template, as vLLM's. The calls, and a tool message's ``tool_call_id``, reach the template
  once they have OpenAI's shape (each a ``function`` object of string ``name`` and
  ``arguments``; a legacy ``function_call`` the same), a 400 naming the value otherwise (kiln
  serve calls no tools itself: ``tools`` is refused); as vLLM's, an assistant's tool call's
  ``arguments`` reach it parsed into their JSON object (for ``arguments | tojson``; "", null,
  missing, a string that is not JSON or JSON of no object: {}, the last two with a WARNING),
  and an empty ``tool_calls`` not at all.

Non-goals: images/audio parts, tool calls, the OpenAI logprobs ``bytes`` of partial UTF-8.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kiln.errors import as_json, cut, json_type, outside_vocabulary, shown
from kiln.runtime.core import check_encoded
from kiln.runtime.errors import RequestError, SamplingParamsError, TokenizerError
from kiln.runtime.llm import LLM, Prompt
from kiln.runtime.params import SEED_MAX, SamplingParams, TokenLogprobs, is_utf8
from kiln.runtime.results import CompletionResult, StreamDelta
from kiln.runtime.tokenizer import NOT_UTF8, TEXT_PART, parts_error, text_of_parts
from kiln.serve.protocol import (
    MAX_JSON_DEPTH,
    ROLES,
    UNSUPPORTED,
    UNSUPPORTED_IN_CHAT,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    StreamOptions,
    deeper,
    whole,
)
from kiln.serve.state import Job, error_code, public

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
             "frequency_penalty", "repetition_penalty")
COMPLETIONS_MAX_TOKENS = 16
# A chat message's keys beside its role, content and name that OpenAI's API defines (and vLLM's
# reasoning_content and reasoning, which clients send back and reasoning models' templates
# read): they reach the chat template, which reads those it knows, and are not warned of
MESSAGE_KEYS = ("tool_calls", "tool_call_id", "refusal", "audio", "function_call",
                "reasoning_content", "reasoning")
# OpenAI's form of an assistant message's tool call
TOOL_CALL = '{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}'
FUNCTION = '{"name": "f", "arguments": "{}"}'  # a tool call's function, a legacy function_call
# Distinct ignored field names a server warns of: past these (a client sending a new name each
# time), new names are logged at DEBUG, so neither the log nor the server's memory of them grows
# (the WARNING that fills the set says so, once)
WARN_MOST = 100
# Names a log line lists, then how many more (a request's 300 unknown fields were one line)
LIST_MOST = 10

logger = logging.getLogger(__name__)


def _labelled(prompt: Any) -> list[tuple[str, Prompt]]:
    """OpenAI's prompt forms (a string, strings, token ids, lists of token ids) as (label,
    prompt) pairs. The label names the prompt in errors: ``prompt[i]`` in the list forms, even
    of one prompt (the request indexed it); "" for a string or token ids, the whole ``prompt``."""
    if isinstance(prompt, str):
        return [("", prompt)]
    if not prompt:
        raise ApiError(400, "prompt is an empty list; give a string or token ids", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [("", list(prompt))]
    return [(f"prompt[{i}]", p) for i, p in enumerate(prompt)]


def prompt_form_error(prompt: Any) -> str:
    """Why ``prompt`` is none of OpenAI's forms, naming the first value that is wrong; a
    :func:`form_error`'s message (its param ``prompt[1]``, ``prompt[1][0]`` or ``prompt``)."""
    forms = ("prompt must be a string, a list of strings, a list of token ids (integers) or a "
             "list of such lists")
    if not isinstance(prompt, list):
        return f"{forms}, found {_given(prompt)}"
    for i, item in enumerate(prompt):
        if isinstance(item, list):
            wrong = next((j for j, t in enumerate(item) if not _token_id(t)), None)
            if wrong is not None:
                return f"prompt[{i}][{wrong}] is {_given(item[wrong])}, not a token id; {forms}"
        elif not (isinstance(item, str) or _token_id(item)):
            return f"prompt[{i}] is {_given(item)}; {forms}"

    def kind(item: Any) -> str:
        return "a string" if isinstance(item, str) else \
            "a list of token ids" if isinstance(item, list) else "a token id"
    i = next(i for i, item in enumerate(prompt) if kind(item) != kind(prompt[0]))
    return f"prompt[{i}] is {_given(prompt[i])}, where prompt[0] is {kind(prompt[0])}; {forms}"


def form_error(why: str) -> ApiError:
    """The 400 of a request value of the wrong form. ``why`` opens with the value's path, as the
    form checks here word it (``messages[0].content[1].text is null; ...``): that path is the
    error's ``param``, as OpenAI's errors name the value at fault (not always ``messages``)."""
    return ApiError(400, why, param=why.partition(" ")[0])


# pydantic's objections to a field's type, by their ``type``: the form the field takes
_TYPES = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
          "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
          "bool_parsing": "true or false", "string_type": "a string", "list_type": "an array",
          "dict_type": "an object", "model_type": "an object"}
# and to its range: the comparison and the bound's key in the error's ctx
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
           "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}


def field_error(error: dict[str, Any]) -> str:
    """pydantic's objection to a request field (one of ``ValidationError.errors()``) in kiln's
    words, a :func:`form_error`'s message: ``n must be >= 1, found a number 0``, ``stream
    must be true or false, found a string "yes"``, ``prompt is required`` (a trial: pydantic's
    "n: Input should be greater than or equal to 1" beside kiln's own messages). Objections of
    other kinds keep pydantic's words after the path."""
    path, kind, ctx = _path(error["loc"]), error["type"], error.get("ctx") or {}
    if kind == "missing":
        return f"{path} is required"
    if kind in _TYPES:
        return f"{path} must be {_TYPES[kind]}, found {_given(error['input'])}"
    if kind in _BOUNDS and _BOUNDS[kind][1] in ctx:
        op, key = _BOUNDS[kind]
        # (a whole float as the integer fields show theirs: an optional one's input is the
        # float, 1e2 had been "100.0" there and "100" in n's)
        return f"{path} must be {op} {ctx[key]}, found {_given(error['input'])}"
    return f"{path}: {error['msg']}"


def _path(loc: tuple[str | int, ...]) -> str:
    """A pydantic ``loc`` as the request's path: ``messages[0].content``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).removeprefix(".")


def name_error(data: dict[str, Any], error: dict[str, Any]) -> ApiError | None:
    """The 400 of a field name (a JSON object's key) holding a lone surrogate, which pydantic
    objects to as ``string_unicode`` at the object holding it (its ``input`` the name): named by
    its path, ``messages[0].x\\udc80`` as the body escapes it (a retest's ``"mess\\udc80ages"``
    had been told ": Input should be a valid string...", param ":"). None for other errors."""
    if error["type"] != "string_unicode":
        return None
    holder, name = data, error["input"]
    try:
        for p in error["loc"]:
            holder = holder[p]
    except (LookupError, TypeError):  # a loc of pydantic's own (a union's branch)
        return None
    if not (isinstance(holder, dict) and isinstance(name, str) and name in holder):
        return None
    return _misnamed(".".join(filter(None, (_path(error["loc"]), cut(name)))))


def _misnamed(path: str) -> ApiError:
    """The 400 of the field at ``path``, whose name holds a lone surrogate."""
    return ApiError(400, f"{path}: the field's name is not UTF-8: it holds a lone surrogate (a "
                         f"JSON \\udXXX escape of half a character); fix the name", param=path)


def messages_form_error(messages: Any) -> str | None:
    """Why ``messages`` is not OpenAI's list of ``{"role", "content"}`` objects, naming the
    first value that is wrong (None where pydantic's objection is another one); a
    :func:`form_error`'s message."""
    form = 'messages must be a list of objects like {"role": "user", "content": "Hi"}'
    if not isinstance(messages, list):
        return f"{form}, found {_given(messages)}"
    if not messages:
        return "messages is an empty list; give at least one message"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] is {_given(message)}; {form}"
        if "role" not in message:
            return f"messages[{i}] has no role; {form}"
        if not isinstance(message["role"], str):
            return f"messages[{i}].role is {_given(message['role'])}; give one of " \
                   f"{', '.join(ROLES)}"
        name = message.get("name")
        if not (name is None or isinstance(name, str)):
            return f"messages[{i}].name is {_given(name)}; give the participant's name as a " \
                   f"string, or leave it out"
        content = message.get("content")
        if not (content is None or isinstance(content, (str, list))):
            return f"messages[{i}].content is {_given(content)}; give a string or a list " \
                   f"of text parts like {TEXT_PART}"
        if isinstance(content, list) and (why := _parts_error(i, content)) is not None:
            return why
    return None


def stop_form_error(stop: Any) -> str | None:
    """Why ``stop`` is not a string or a list of strings, naming the first value that is not
    (None where pydantic's objection is another one); a :func:`form_error`'s message."""
    form = "stop must be a string or a list of strings"
    if not isinstance(stop, list):
        return f"{form}, found {_given(stop)}"
    k = next((k for k, item in enumerate(stop) if not isinstance(item, str)), None)
    return None if k is None else f"stop[{k}] is {_given(stop[k])}; {form}"


def stop_token_ids_form_error(ids: Any) -> str | None:
    """Why ``stop_token_ids`` is not a list of token ids, naming the first entry that is not one
    (None where pydantic's objection is another one); a :func:`form_error`'s message."""
    form = "stop_token_ids must be a list of token ids (integers >= 0)"
    if not isinstance(ids, list):
        return f"{form}, found {_given(ids)}"
    k = next((k for k, t in enumerate(ids) if not (_token_id(t) and whole(t) >= 0)), None)
    return None if k is None else f"stop_token_ids[{k}] is {_given(ids[k])}; {form}"


def stream_options_form_error(options: Any) -> str | None:
    """Why ``stream_options`` is not an object of booleans, naming the first field that is not
    one (None where pydantic's objection is another one); a :func:`form_error`'s message."""
    if not isinstance(options, dict):
        return f'stream_options must be an object like {{"include_usage": true}}, found ' \
               f'{_given(options)}'
    key = next((k for k in StreamOptions.model_fields  # booleans all
                if not isinstance(options.get(k), (bool, type(None)))), None)
    return None if key is None else \
        f"stream_options.{key} is {_given(options[key])}; give true or false"


def _listed(paths: list[str]) -> str:
    """Field paths for a log line: the first LIST_MOST, each cut short, as JSON escapes it in
    ASCII (a key's newline must not start a line of its own, nor a lone surrogate fail the
    log's encoding), and how many more."""
    named = ", ".join(cut(json.dumps(p)[1:-1]) for p in paths[:LIST_MOST])
    return named if len(paths) <= LIST_MOST else f"{named} and {len(paths) - LIST_MOST} more"


def _given(value: Any) -> str:
    """A request's value in a 400, as :func:`~kiln.errors.as_json` shows it, a whole float as
    its integer (:func:`whole`): every field's "found a number 100" alike (a retest's
    ``"stream": 1e2`` had been "found a number 100.0" beside n's "found a number 100")."""
    return as_json(whole(value))


def _token_id(value: Any) -> bool:
    """Whether a parsed JSON value is a token id as the request models take one: an integer
    (true and false are not) or a float with no fractional part (:func:`whole`)."""
    value = whole(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _parts_error(i: int, parts: list[Any]) -> str | None:
    """Why message ``i``'s list content is not text parts (:func:`parts_error`)."""
    why = parts_error(parts, "kiln serve")
    return None if why is None else f"messages[{i}].{why}"


def max_tokens_field(req: CompletionRequest | ChatCompletionRequest) -> str | None:
    """The request field that gave its max_tokens (chat's ``max_completion_tokens`` before its
    ``max_tokens``, as :meth:`Renderer.chat_params` reads them); None where neither was given
    (the endpoint's default). Jobs carry it: a prompt leaving less room than it asks for is
    refused (kiln.serve.state.too_long)."""
    fields = ("max_completion_tokens", "max_tokens") if isinstance(req, ChatCompletionRequest) \
        else ("max_tokens",)
    return next((name for name in fields if getattr(req, name) is not None), None)


def nth(params: SamplingParams, j: int) -> SamplingParams:
    """Choice j of ``n``: a seeded request's choices use seed + j (distinct, reproducible),
    modulo 2**64 as the generator reads a seed: 2**64 - 1's choice 1 is seed 0, as -1's is (a
    trial's 2**64 - 1 with n 2 had been refused as "found 18446744073709551616")."""
    if j == 0 or params.seed is None:
        return params
    seed = params.seed + j
    return params.replace(seed=seed - 2**64 if seed > SEED_MAX else seed)


def failed(result: CompletionResult) -> ApiError:
    """The error response of a request that ended with finish_reason ``error`` (without the
    internal request id the runtime's message starts with)."""
    error = public(result.error or "", [result.request_id])
    if "KV cache" in error:  # too big for this engine: the request's fault
        return ApiError(400, error, param="max_tokens")
    return ApiError(500, f"the request failed: {error}", code="engine_error")


# The values of UNSUPPORTED fields that ask for nothing kiln would not do anyway (a client
# library's defaults, which a trial's requests sent): no bias, no tools, plain text.
NO_OPS: dict[str, tuple[Any, ...]] = {
    "logit_bias": ({},), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
    "function_call": ("none",), "response_format": ({"type": "text"},), "suffix": ("",),
    "parallel_tool_calls": (True, False), "echo": (False,), "continue_final_message": (False,),
    "best_of": (1,),
    # vLLM's extras at their defaults (-1: thinking_token_budget's "unlimited"; a special token
    # added to a completions prompt, none to a chat's, as vLLM's add_special_tokens defaults)
    "min_tokens": (0,), "bad_words": ([],), "logits_processors": ([],),
    "use_beam_search": (False,), "add_special_tokens": (True,),
    "priority": (0,), "return_tokens_as_token_ids": (False,), "return_token_ids": (False,),
    "thinking_token_budget": (-1,), "watermarking": (False,), "vllm_xargs": ({},),
    "chat_template_kwargs": ({},), "documents": ([],),
    # either value: vLLM reads it only in its slow tokenizers' detokenizer; a fast tokenizer's
    # (its default, and kiln's only kind) decodes as kiln does, no space added between special
    # tokens (a retest's default true had been warned of as a field kiln does not know)
    "spaces_between_special_tokens": (True, False)}
CHAT_NO_OPS = {**NO_OPS, "add_special_tokens": (False,)}  # (the template adds them)

_OBJECT_OR_STRING = ("tool_choice", "function_call")  # "none" or {"type": "function", ...}


def _no_op(name: str, value: Any, chat: bool) -> bool:
    """Whether an UNSUPPORTED field's value asks for nothing: absent, null or in NO_OPS (of
    its own type: ``logit_bias: []`` is not an empty map; chat's ``best_of: 1.0`` is 1, as
    an integer field's whole float is); CHAT_NO_OPS in chat."""
    value = whole(value)
    return value is None or any(type(value) is type(v) and value == v
                                for v in (CHAT_NO_OPS if chat else NO_OPS).get(name, ()))


def _refusal(name: str, value: Any, chat: bool) -> str:
    """Why an UNSUPPORTED field's value is refused: of the wrong type (a retest's ``"echo": 0``
    had been told echo is unsupported; a whole float is of an integer's, as _no_op reads it),
    or asking for what kiln serve does not do."""
    kind = type(NO_OPS[name][0]) if name in NO_OPS else None
    if kind is not None and name not in _OBJECT_OR_STRING and type(whole(value)) is not kind:
        wanted = "an integer" if kind is int else json_type(NO_OPS[name][0])
        return f"{name} must be {wanted}, found {_given(value)}"
    if chat and name == "echo":  # a retest: "not supported" read as not at all
        return ("echo is not supported on /v1/chat/completions (/v1/completions takes it); "
                "send the request without it")
    return f"{name} is not supported by kiln serve; send the request without it"


def _number_given(value: Any) -> str:
    """A value in a SamplingParams refusal: a number as :func:`_given` shows one ("found a
    number NaN", not Python's "found nan"; a whole float as an integer: a retest's top_p 1e2
    had been "found 100.0"), else as Python's callers are shown it."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return _given(value) if number else shown(value)


def _checked(make, renames: dict[str, str]) -> SamplingParams:
    """``make()``'s SamplingParams, its error a 400 naming the request's field (down to
    ``stop[0]``), its value shown as :func:`_number_given` shows it."""
    try:
        return make()
    except SamplingParamsError as e:
        raise ApiError(400, f"{e.name} {e.worded(_number_given)}",
                       param=renames.get(e.field, e.field)) from None


class Renderer:
    """Prompts, params and response choices for one engine (see the module docstring)."""

    def __init__(self, llm: LLM, chat_template: str | None = None):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.chat_template = chat_template
        self.warned: set[str] = set()  # ignored fields named at WARNING already (_ignored)

    # -- inputs ------------------------------------------------------------------------------
    def _params(self, req: Any, max_tokens: int, renames: dict[str, str],
                **fields: Any) -> SamplingParams:
        chat = isinstance(req, ChatCompletionRequest)
        for name in UNSUPPORTED + (UNSUPPORTED_IN_CHAT if chat else ()):
            value = (req.model_extra or {}).get(name)
            if not _no_op(name, value, chat):
                raise ApiError(400, _refusal(name, value, chat), param=name)
        if req.stream_options is not None and not req.stream:  # OpenAI's 400 (it had been
            # ignored: a client asking for usage chunks would not get them)
            raise ApiError(400, "stream_options is only allowed with stream: true; set stream: "
                                "true, or send the request without stream_options",
                           param="stream_options")
        if req.stream_options is not None and req.stream_options.continuous_usage_stats:
            raise form_error("stream_options.continuous_usage_stats is not supported by kiln "
                             "serve (it takes include_usage: true, the usage in a last chunk); "
                             "send the request without it")
        self._ignored(req, chat)
        given = {k: getattr(req, k) for k in _SAMPLING if getattr(req, k) is not None}
        if req.stop is not None:
            _utf8_check("stop", req.stop)  # by path and value (SamplingParams' had shown a tuple)
            given["stop"] = req.stop if isinstance(req.stop, str) else tuple(req.stop)
        if req.stop_token_ids is not None:
            given["stop_token_ids"] = tuple(req.stop_token_ids)
        for flag in ("ignore_eos", "include_stop_str_in_output"):
            if getattr(req, flag):
                given[flag] = True
        if not req.skip_special_tokens:
            given["skip_special_tokens"] = False
        return _checked(lambda: self.llm.default_params.replace(
            max_tokens=max_tokens, **given, **fields), renames)

    def _ignored(self, req: Any, chat: bool) -> None:
        """Log the fields of ``req`` that kiln serve ignores, by path (module docstring); a chat
        message's, which reach the template, apart."""
        checked = UNSUPPORTED + (UNSUPPORTED_IN_CHAT if chat else ())
        paths = [name for name, value in (req.model_extra or {}).items()
                 if value is not None and name not in checked]
        if req.stream_options is not None:
            paths += [f"stream_options.{key}"
                      for key, value in (req.stream_options.model_extra or {}).items()
                      if value is not None]
        templated = []
        for message in req.messages if chat else ():
            templated += [f"messages[].{key}" for key, value in (message.model_extra or {}).items()
                          if value is not None and key not in MESSAGE_KEYS]
            if isinstance(message.content, list):  # joined into its text: the rest is dropped
                paths += [f"messages[].content[].{key}" for part in message.content
                          if isinstance(part, dict) for key, value in part.items()
                          if value is not None and key not in ("type", "text")]
        self._warn(paths, "request fields kiln serve does not know were ignored")
        self._warn(templated, "chat message fields kiln serve does not know were passed to the "
                              "chat template, which may not read them")

    def _warn(self, paths: list[str], what: str) -> None:
        """Log ``what: paths``, at WARNING for the paths this server has not named yet (up to
        WARN_MOST in all: the WARNING reaching it says that new names go to DEBUG from then
        on), at DEBUG for the rest."""
        paths = list(dict.fromkeys(paths))  # (many messages may have the same key)
        new = [p for p in paths if p not in self.warned]
        # all of them told (a request's 300 had been told as 100), the first remembered
        fresh = new if len(self.warned) < WARN_MOST else []
        self.warned.update(new[:WARN_MOST - len(self.warned)])
        if fresh:
            full = "" if len(self.warned) < WARN_MOST else \
                f"; this server remembers {WARN_MOST} names it warned of, its most: names " \
                f"new to it are logged at DEBUG from now on"
            logger.warning("%s: %s (each name is warned of once per server, later at DEBUG%s)",
                           what, _listed(fresh), full)
        if again := [p for p in paths if p not in fresh]:
            logger.debug("%s: %s", what, _listed(again))

    def completion_params(self, req: CompletionRequest) -> SamplingParams:
        prompt_logprobs = None
        if req.echo and req.logprobs is not None:
            if not self.llm.gathers_context_logits:  # replicas (dp) have no executor here
                raise ApiError(400, "echo with logprobs scores the prompt, which needs every "
                                    "prompt position's logits; this engine returns the last "
                                    "one only: rebuild it with kiln build "
                                    "--gather_context_logits", param="echo")
            prompt_logprobs = req.logprobs
        max_tokens = COMPLETIONS_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        if max_tokens < 0:  # (SamplingParams' message speaks of prompt_logprobs)
            raise ApiError(400, f"max_tokens must be an integer >= 1 (0 only with echo: true "
                                f"and logprobs, to score the prompt), found {_given(max_tokens)}",
                           param="max_tokens")
        if max_tokens == 0 and prompt_logprobs is None:
            raise ApiError(400, "max_tokens 0 only scores the prompt: set echo: true and "
                                "logprobs (0-20) as well, or ask for max_tokens >= 1",
                           param="max_tokens")
        return self._params(req, max_tokens, {"prompt_logprobs": "logprobs"},
                            logprobs=req.logprobs, prompt_logprobs=prompt_logprobs)

    def chat_params(self, req: ChatCompletionRequest) -> SamplingParams:
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = next((m for m in (req.max_completion_tokens, req.max_tokens)
                           if m is not None), self.llm.limits.max_seq_len)
        name = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        if max_tokens < 0:
            raise ApiError(400, f"{name} must be an integer >= 1, found {_given(max_tokens)}",
                           param=name)
        if max_tokens == 0:
            raise ApiError(400, f"chat needs {name} >= 1 (a prompt is scored on "
                                "/v1/completions with echo: true, logprobs and max_tokens 0)",
                           param=name)
        renames = {"logprobs": "top_logprobs", "max_tokens": "max_tokens"}
        return self._params(req, max_tokens, renames,
                            logprobs=(req.top_logprobs or 0) if req.logprobs else None)

    def completion_prompts(self, req: CompletionRequest) -> list[tuple[str, Prompt]]:
        """The request's (label, prompt) pairs (:func:`_labelled`); a token id outside the
        engine's vocabulary is a 400 naming its path, ``prompt[1]`` or ``prompt[0][1]`` (the
        runtime's message names the prompt only, its param had been ``prompt``), as is a text
        holding a lone surrogate, ``prompt`` or ``prompt[1]``."""
        prompts, vocab = _labelled(req.prompt), self.llm.core.vocab_size
        for label, prompt in prompts:
            path = label or "prompt"
            if isinstance(prompt, str):  # (the tokenizer's refusal named no prompt)
                _text_check(path, prompt)
            else:
                outside = outside_vocabulary(prompt, vocab, path)
                if outside is not None:
                    raise ApiError(400, str(outside), param=outside.path)
        return prompts

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(400, "this engine has no tokenizer; chat needs one", param="messages")
        messages = [_message(i, m.model_dump(exclude_none=True))
                    for i, m in enumerate(req.messages)]
        try:
            return check_encoded(self.tokenizer.chat_ids(messages, req.add_generation_prompt,
                                                         most=self.llm.limits.max_input_len,
                                                         template=self.chat_template),
                                 self.llm.core.vocab_size)
        except (TokenizerError, RequestError) as e:
            raise ApiError(400, str(e), param="messages", code=error_code(str(e))) from None

    # -- outputs -----------------------------------------------------------------------------
    def token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _prompt_text(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return "" if self.tokenizer is None else self.tokenizer.decode(list(prompt), False)

    def _completion_logprobs(self, entries: list[TokenLogprobs | None],
                             token_ids: list[int], at: int = 0) -> dict[str, list]:
        """OpenAI's completion logprobs; ``text_offset`` counts from ``at`` (the length of the
        choice's tokens before these)."""
        tokens = [self.token(t) for t in token_ids]
        offsets = []
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {"tokens": tokens,
                "token_logprobs": [None if e is None else e.logprob for e in entries],
                "top_logprobs": [None if e is None else
                                 {self.token(t): lp for t, lp in e.top.items()}
                                 for e in entries],
                "text_offset": offsets}

    def completion_choice(self, job: Job, result: CompletionResult,
                          req: CompletionRequest) -> dict[str, Any]:
        text, entries, ids = result.text, list(result.logprobs or ()), list(result.token_ids)
        if req.echo:
            text = self._prompt_text(job.prompt) + text
            if result.prompt_logprobs is not None:
                entries, ids = _scored_prompt(result) + entries, list(result.prompt_token_ids) + ids
        logprobs = None if req.logprobs is None else self._completion_logprobs(entries, ids)
        return {"index": job.index, "text": text, "logprobs": logprobs,
                "finish_reason": result.finish_reason, "stop_reason": result.stop_reason}

    def _chat_logprobs(self, entries: tuple[TokenLogprobs, ...]) -> dict[str, list]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return {"content": [
            {**one(e.token_id, e.logprob),
             "top_logprobs": [one(t, lp) for t, lp in sorted(e.top.items(),
                                                             key=lambda kv: -kv[1])]}
            for e in entries]}

    def chat_choice(self, job: Job, result: CompletionResult,
                    req: ChatCompletionRequest) -> dict[str, Any]:
        logprobs = self._chat_logprobs(result.logprobs or ()) if req.logprobs else None
        return {"index": job.index, "message": {"role": "assistant", "content": result.text},
                "logprobs": logprobs, "finish_reason": result.finish_reason,
                "stop_reason": result.stop_reason}

    def chat_chunk(self, req: ChatCompletionRequest, job: Job, delta: StreamDelta,
                   first: bool) -> list[dict[str, Any]]:
        chunks = []
        if first:
            chunks.append({"index": job.index, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None, "stop_reason": None})
        wants_logprobs = req.logprobs and bool(delta.token_ids)
        if delta.text or delta.finished or wants_logprobs:
            chunks.append({"index": job.index,
                           "delta": {"content": delta.text} if delta.text else {},
                           "logprobs": self._chat_logprobs(delta.logprobs)
                           if wants_logprobs else None,
                           "finish_reason": delta.finish_reason,
                           "stop_reason": _stop_reason(delta)})
        return chunks


class CompletionStream:
    """The chunks of one streamed completion request, delta by delta (called as
    ``stream(job, delta, first)``): each choice's ``text_offset`` goes on from its earlier
    chunks, and an echo with prompt logprobs is held until they come (module docstring)."""

    def __init__(self, renderer: Renderer, req: CompletionRequest):
        self.renderer, self.req = renderer, req
        self.at: dict[int, int] = {}  # choice index -> text offset of its next token
        self.held: dict[int, list[StreamDelta]] = {}  # choice index -> deltas not sent yet

    def __call__(self, job: Job, delta: StreamDelta, first: bool) -> list[dict[str, Any]]:
        if not (self.req.echo and job.params.prompt_logprobs is not None):
            prefix = self.renderer._prompt_text(job.prompt) if self.req.echo and first else ""
            return self._chunk(job, delta, prefix, [], [])
        held = self.held.setdefault(job.index, [])
        held.append(delta)
        if delta.result is None:
            return []
        del self.held[job.index]
        result = delta.result
        chunks = self._chunk(job, held[0], self.renderer._prompt_text(job.prompt),
                             _scored_prompt(result), list(result.prompt_token_ids))
        for later in held[1:]:
            chunks += self._chunk(job, later, "", [], [])
        return chunks

    def _chunk(self, job: Job, delta: StreamDelta, prefix: str,
               entries: list[TokenLogprobs | None], ids: list[int]) -> list[dict[str, Any]]:
        """``delta``'s chunk, after ``prefix`` text and the tokens ``ids`` (logprobs
        ``entries``) it carries first; none when it would carry nothing."""
        text = prefix + delta.text
        entries, ids = entries + list(delta.logprobs), ids + list(delta.token_ids)
        wants_logprobs = self.req.logprobs is not None and bool(ids)
        if not (text or delta.finished or wants_logprobs):
            return []
        logprobs = None
        if wants_logprobs:
            at = self.at.get(job.index, 0)
            logprobs = self.renderer._completion_logprobs(entries, ids, at)
            self.at[job.index] = at + sum(len(t) for t in logprobs["tokens"])
        return [{"index": job.index, "text": text, "logprobs": logprobs,
                 "finish_reason": delta.finish_reason, "stop_reason": _stop_reason(delta)}]


def _stop_reason(delta: StreamDelta) -> str | int | None:
    """The stop string or token id that ended the request, on its last delta (as vLLM)."""
    return None if delta.result is None else delta.result.stop_reason


def _scored_prompt(result: CompletionResult) -> list[TokenLogprobs | None]:
    """The prompt tokens' logprobs, one per prompt token (a request aborted before its whole
    prompt was scored has fewer: the rest are null)."""
    scored = list(result.prompt_logprobs or ())
    return scored + [None] * (len(result.prompt_token_ids) - len(scored))


def _message(i: int, message: dict[str, Any]) -> dict[str, Any]:
    """A message with list-of-parts content joined into its text, and an assistant's null
    content beside its ``tool_calls`` (or ``function_call``) as ""; other keys as given."""
    role = message.get("role")
    if role not in ROLES:
        shown_role = cut(json.dumps(role, ensure_ascii=False))  # a string: pydantic's check
        raise form_error(f"messages[{i}].role {shown_role} is not a chat role; use one of "
                         f"{', '.join(ROLES)}")
    if (why := _calls_error(i, message)) is not None:
        raise form_error(why)
    content = message.get("content")
    if content is None and role == "assistant" and (message.get("tool_calls")
                                                    or message.get("function_call")):
        # OpenAI's: the calls stand for the text (a client replaying a conversation); "" as
        # vLLM's, for a template that reads the content (a missing one: a jinja error)
        content = message["content"] = ""
    if content is None and message.get("tool_calls") == []:
        raise form_error(f"messages[{i}].tool_calls is an empty list and its content missing or "
                         f"null; give the {role} message's text or its tool calls")
    if content is None:
        calls = " (or its tool_calls)" if role == "assistant" else ""
        raise form_error(f"messages[{i}].content is missing or null; give the {role} "
                         f"message's text{calls}")
    if role == "assistant":
        _parse_arguments(i, message)
    if isinstance(content, list):
        why = _parts_error(i, content)
        if why is not None:
            raise form_error(why)
        for j, part in enumerate(content):  # (a message's own, pydantic refuses: name_error)
            if (name := next((k for k in part if not is_utf8(k)), None)) is not None:
                raise _misnamed(f"messages[{i}].content[{j}].{cut(name)}")
        texts = [(f"messages[{i}].content[{j}].text", part["text"])
                 for j, part in enumerate(content)]
        message["content"] = text_of_parts(content)
    else:
        texts = [(f"messages[{i}].content", content)]
    for path, text in texts:  # named here: the rendered prompt's refusal could name no part
        if isinstance(text, str):
            _text_check(path, text)
    for key, value in message.items():  # name, nmae, tool_calls...: the template's to read
        if key not in ("role", "content"):
            _utf8_check(f"messages[{i}].{cut(key)}", value)
    return message


def _calls_error(i: int, message: dict[str, Any]) -> str | None:
    """Why message ``i``'s ``tool_calls`` or legacy ``function_call`` are not OpenAI's shape: a
    list of objects, each a ``function`` object (``type``, if given, "function") of string
    ``name`` and ``arguments`` (a tool call's may also be an object, null or missing, as vLLM
    takes them: :func:`_parse_arguments`); a function_call the same function object. A string
    ``tool_calls`` had reached the template without a word, a missing function failed in
    jinja's words ("Undefined is not JSON serializable"), naming ``messages``."""
    calls = message.get("tool_calls")
    if not (calls is None or isinstance(calls, list)):
        return f"messages[{i}].tool_calls is {_given(calls)}; give the assistant's tool calls " \
               f"as a list of objects like {TOOL_CALL}, or leave it out"
    j = next((j for j, call in enumerate(calls or ()) if not isinstance(call, dict)), None)
    if j is not None:
        return f"messages[{i}].tool_calls[{j}] is {_given(calls[j])}; a tool call is an " \
               f"object like {TOOL_CALL}"
    functions = []
    for j, call in enumerate(calls or ()):
        path = f"messages[{i}].tool_calls[{j}]"
        if call.get("type", "function") != "function":
            return f'{path}.type is {_given(call["type"])}; the one tool call type is "function"'
        if not isinstance(call.get("function"), dict):
            found = _given(call["function"]) if "function" in call else "missing"
            return f"{path}.function is {found}; a tool call is an object like {TOOL_CALL}"
        functions.append((f"{path}.function", call["function"], True))
    if message.get("function_call") is not None:
        functions.append((f"messages[{i}].function_call", message["function_call"], False))
    for path, function, tool in functions:
        if not isinstance(function, dict):
            return f"{path} is {_given(function)}; give the function called as an object like " \
                   f"{FUNCTION}"
        for key, kinds in (("name", str), ("arguments", (str, dict) if tool else str)):
            value = function.get(key)
            if not (isinstance(value, kinds) or (tool and key == "arguments" and value is None)):
                found = _given(value) if key in function else "missing"
                return f"{path}.{key} is {found}; give the function's {key} as a string, like " \
                       f"{FUNCTION}"
    return None


def _parse_arguments(i: int, message: dict[str, Any]) -> None:
    """An assistant message's tool calls as vLLM gives them to the chat template (its
    ``_postprocess_messages``, vllm/renderers/chat_utils/parse_chat_message.py): each
    ``function.arguments`` JSON string parsed into its object (templates write ``arguments |
    tojson``; Transformers' tool-use templates expect a mapping), "", null or missing as {}; a
    string that is not JSON, or JSON of no object ("[]", "42"), as {} with a WARNING (vLLM's
    reason: the string is in the conversation's history, and refusing it would refuse every
    later turn too); an empty ``tool_calls`` dropped, the template's plain assistant path.
    Arguments nested deeper than MAX_JSON_DEPTH are a 400, as a body's are."""
    if message.get("tool_calls") == []:
        del message["tool_calls"]
    for j, call in enumerate(message.get("tool_calls") or ()):
        function, path = call["function"], f"messages[{i}].tool_calls[{j}].function.arguments"
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            _utf8_check(path, arguments)  # (before it is parsed: a lone one would be lost)
            deep = form_error(f"{path} is JSON nested deeper than {MAX_JSON_DEPTH} levels "
                              f"(arrays and objects within each other), the most kiln serve "
                              f"reads; flatten it")
            try:
                arguments = json.loads(arguments)
            except RecursionError:  # (a 500 otherwise; vLLM's is a 400 too)
                raise deep from None
            except ValueError:
                logger.warning("%s (of tool %s) is not JSON (%d characters); the chat template "
                               "gets {} for it, as vLLM's does", path,
                               cut(json.dumps(function["name"])), len(arguments))
                arguments = {}
            if isinstance(arguments, (dict, list)) and deeper(arguments, MAX_JSON_DEPTH):
                raise deep  # (the template's tojson would fail as json.loads did)
            if not isinstance(arguments, dict):
                logger.warning("%s (of tool %s) is %s in JSON, not an object; the chat "
                               "template gets {} for it, as vLLM's does", path,
                               cut(json.dumps(function["name"])), json_type(arguments))
                arguments = {}
        function["arguments"] = arguments or {}


def _text_check(path: str, text: str) -> None:
    """Refuse a prompt's or a message's text holding a lone surrogate, by its path
    (``prompt``, ``prompt[1]``, ``messages[0].content``), without showing the text."""
    if not is_utf8(text):
        raise ApiError(400, f"{path}: {NOT_UTF8}", param=path)


def _utf8_check(path: str, value: Any) -> None:
    """Refuse a string in ``value`` (a parsed JSON value at ``path``) holding a lone surrogate,
    or a key of its objects, by its path (``messages[0].name``, ``messages[0].x[1].y``): the
    rendered prompt's refusal named ``messages`` only, and only were the template to read it."""
    if isinstance(value, str) and not is_utf8(value):
        raise ApiError(400, f"{path} is {_given(value)}; {NOT_UTF8}", param=path)
    for key, item in value.items() if isinstance(value, dict) else enumerate(
            value if isinstance(value, list) else ()):
        if isinstance(key, str) and not is_utf8(key):
            raise _misnamed(f"{path}.{cut(key)}")
        _utf8_check(f"{path}.{cut(key)}" if isinstance(key, str) else f"{path}[{key}]", item)
