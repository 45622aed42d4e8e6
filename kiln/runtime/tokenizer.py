"""The engine dir's tokenizer, chat template and generation defaults, without transformers.

Contract:
- :func:`load_tokenizer` reads ``tokenizer.json`` (``tokenizers`` library),
  ``tokenizer_config.json`` (special tokens, chat template), ``chat_template.jinja`` /
  ``chat_template.json`` when present, and ``generation_config.json`` (EOS ids, sampling
  defaults). A missing or unreadable ``tokenizer.json`` raises
  :class:`~kiln.runtime.errors.TokenizerError`.
- EOS ids = ``generation_config.eos_token_id`` (int or list) plus the tokenizer's ``eos_token``.
- Chat templates render as transformers renders them: a jinja2 ``ImmutableSandboxedEnvironment``
  with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter,
  ``raise_exception`` and ``strftime_now``, and the special tokens as variables. The rendered
  text is encoded without adding special tokens (the template wrote them).

Non-goals: slow (Python) tokenizers, tokenizers that exist only as ``tokenizer.model``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kiln.errors import UNREADABLE_JSON, USER_TEXT, as_json, shown
from kiln.runtime.errors import RequestError, SamplingParamsError, TokenizerError, prompt_too_long
from kiln.runtime.params import SamplingParams, is_utf8, not_applied

logger = logging.getLogger(__name__)

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

# A text of over HEAD_CHARS_PER_TOKEN x (max_input_len + HEAD_MARGIN) characters has its head
# encoded first (English averages about 4 characters a token); the margin covers the tokens a
# cut word may add
HEAD_CHARS_PER_TOKEN = 8
HEAD_MARGIN = 16
# a text the tokenizer cannot encode (kiln serve names the chat message part that holds it)
NOT_UTF8 = ("the text is not UTF-8: it holds a lone surrogate (a JSON \\udXXX escape of half a "
            "character, or bytes from a shell in another locale); fix the text")


@dataclass
class ModelTokenizer:
    """A ``tokenizers.Tokenizer`` plus the model's special tokens, chat template and defaults."""

    tokenizer: Any  # tokenizers.Tokenizer
    special_tokens: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None
    generation_config: dict[str, Any] = field(default_factory=dict)
    add_bos_token: bool | None = None  # None: as tokenizer.json's post-processor does

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = _configured_eos_ids(self.generation_config)
        eos = self.special_tokens.get("eos_token")
        if eos is not None and self.tokenizer.token_to_id(eos) is not None:
            ids.append(self.tokenizer.token_to_id(eos))
        return tuple(dict.fromkeys(ids))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def past_vocabulary(self, model_vocab_size: int) -> str | None:
        """What to say of a tokenizer with more tokens than the model's vocabulary (another
        model's tokenizer beside the weights: a retest's SmolLM2 tokenizer with a 256-token
        model), or None: text that encodes to the last ones is refused."""
        if self.vocab_size <= model_vocab_size:
            return None
        return (f"its tokenizer has {self.vocab_size} tokens, past the model's vocab_size "
                f"{model_vocab_size}: text that encodes to the last ones will be refused; the "
                f"tokenizer files may be another model's")

    def encode(self, text: str, add_special_tokens: bool = True,
               most: int | None = None) -> list[int]:
        """Token ids of ``text``. ``most``: the engine's max_input_len; a text whose first
        :data:`HEAD_CHARS_PER_TOKEN` x (``most`` + :data:`HEAD_MARGIN`) characters alone exceed
        ``most`` + :data:`HEAD_MARGIN` tokens is refused (RequestError) without encoding the
        rest: a 3.5 MB prompt had taken 2 s and 0.4 GB a server never gave back, to be
        refused."""
        if most is not None and len(text) > HEAD_CHARS_PER_TOKEN * (most + HEAD_MARGIN):
            self._refuse_long_head(text, most)
        if not is_utf8(text):
            raise RequestError(NOT_UTF8)
        # encode_batch lets go of the GIL while it works (encode holds it: a 3.6 MB text kept
        # every other thread, a server's event loop among them, waiting 2.3 s); same ids
        ids = self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        bos = self.special_tokens.get("bos_token")
        if add_special_tokens and self.add_bos_token and bos is not None:
            bos_id = self.tokenizer.token_to_id(bos)
            if bos_id is not None and (not ids or ids[0] != bos_id):
                ids = [bos_id, *ids]
        return ids

    def _refuse_long_head(self, text: str, most: int) -> None:
        cut = HEAD_CHARS_PER_TOKEN * (most + HEAD_MARGIN)
        space = text.rfind(" ", cut // 2, cut)  # (a word whole: the head's tokens are the text's)
        head = text[:space if space > 0 else cut]
        n = len(self.encode(head, add_special_tokens=False))
        if n > most + HEAD_MARGIN:
            raise RequestError(prompt_too_long(
                f"more than {most}", most,
                f"its first {len(head)} characters alone are {n} tokens"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, template: str | None = None,
                            **variables: Any) -> str:
        """Render ``messages`` with the model's chat template, or ``template`` (kiln serve's
        --chat_template) where given (see the module docstring)."""
        template = template if template is not None else self.chat_template
        if not template:
            raise TokenizerError("this engine dir has no chat template (tokenizer_config.json "
                                 "chat_template or chat_template.jinja); use generate() with a "
                                 "plain prompt, or copy the template into the engine dir")
        return render_chat_template(template, messages, add_generation_prompt,
                                    {**self.special_tokens, **variables})

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                 most: int | None = None, template: str | None = None) -> list[int]:
        """Token ids of ``messages`` rendered as :meth:`apply_chat_template` renders them (the
        text holds the special tokens already); ``most`` as :meth:`encode`'s."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, template),
                           add_special_tokens=False, most=most)


# The roles OpenAI's API takes (function: its deprecated form of tool), which kiln serve and
# LLM.chat pass to the chat template, which decides what each renders as. vLLM takes any role
# string; OpenAI, and kiln, refuse others (a typo would reach the template silently).
CHAT_ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool", "function")


TEXT_PART = '{"type": "text", "text": "Hi"}'  # OpenAI's list-of-parts content


def parts_error(parts: list[Any], taker: str) -> str | None:
    """Why list-of-parts content is not text parts (``taker`` takes those only), naming the
    first part that is not, as ``content[j] ...`` (trial 37: a part's ``"text": null`` had
    reached the model as the word "None"). An empty list is refused, as OpenAI refuses it (it
    had reached the template as an empty message)."""
    if not parts:
        return f"content is an empty list; give a string or at least one text part like " \
               f"{TEXT_PART}"
    for j, part in enumerate(parts):
        where = f"content[{j}]"
        if not isinstance(part, dict):
            return f"{where} is {as_json(part)}; a part is an object like {TEXT_PART}"
        if part.get("type") != "text":
            kind = f'"type": {as_json(part["type"])}' if "type" in part else "no type"
            return f"{where} has {kind}; {taker} takes text parts only, like {TEXT_PART}"
        if not isinstance(part.get("text"), str):
            text = f"is {as_json(part['text'])}" if "text" in part else "is missing"
            return f"{where}.text {text}; give the part's text as a string"
    return None


def text_of_parts(parts: list[Any]) -> str:
    """OpenAI's list-of-parts message content, which :func:`parts_error` passed, as the text it
    holds (its ``text`` parts joined). Chat templates are written for a string ``content``:
    ``kiln serve`` and ``LLM.chat`` give them one."""
    return "".join(part["text"] for part in parts)


def render_chat_template(template: str, messages: list[dict[str, Any]],
                         add_generation_prompt: bool, variables: dict[str, Any]) -> str:
    from jinja2 import TemplateError

    try:
        return _chat_environment().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as e:
        raise TokenizerError(f"chat template failed to render: {e}") from None
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
        # the template's own Python operations on what it was given (str + list: a content it
        # does not read); the template is the model's code, not kiln's
        raise TokenizerError(f"chat template failed to render these messages: "
                             f"{type(e).__name__}: {e}") from None


def check_chat_template(template: str) -> None:
    """Parse ``template`` as :func:`render_chat_template` would: a syntax error raises
    :class:`TokenizerError` naming its line (a server checks its template once, at start)."""
    from jinja2 import TemplateSyntaxError, meta

    if not template.strip():
        raise TokenizerError("is empty: it would render every conversation as an empty prompt")
    try:
        parsed = _chat_environment().parse(template)
    except TemplateSyntaxError as e:
        raise TokenizerError(f"not a Jinja template: line {e.lineno}: {e.message}") from None
    except RecursionError:
        raise TokenizerError("not a Jinja template kiln can parse: nested too deeply") from None
    try:  # (compiling it: an unknown filter is found here, not by the parser)
        undeclared = meta.find_undeclared_variables(parsed)
    except TemplateSyntaxError as e:  # (TemplateAssertionError: a retest's had been a traceback)
        raise TokenizerError(f"not a Jinja template kiln can render: line {e.lineno}: "
                             f"{e.message}") from None
    if "messages" not in undeclared:  # (plain text parses too)
        raise TokenizerError("never reads messages: it would render every conversation as the "
                             "same prompt; a chat template loops over messages ({% for message "
                             "in messages %})")
    # a template may refuse some conversations (a system message, roles that do not alternate),
    # but not all of them (a retest's template that always raised answered every chat request
    # with a 400 for the server's own fault)
    failures = []
    for what, conversation in TRIAL_CONVERSATIONS:
        try:
            text = render_chat_template(template, conversation, True, {})
        except TokenizerError as e:
            failures.append(f"{what}: {str(e).removeprefix('chat template ')}")
            continue
        if not text.strip():
            raise TokenizerError(f"renders a conversation ({what}) as empty text: every chat "
                                 f"request would be refused as an empty prompt")
        return
    raise TokenizerError("fails on every conversation tried, so it would refuse every chat "
                         "request: " + "; ".join(failures))


TRIAL_CONVERSATIONS = (  # what check_chat_template renders, the first one that renders
    ("one user message", [{"role": "user", "content": "Hi"}]),
    ("a system message and a user message", [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"}]),
    ("user, assistant, user", [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello."},
                               {"role": "user", "content": "Bye"}]),
)


def _chat_environment() -> Any:
    """HF's sandboxed Jinja environment for chat templates (its filters and globals)."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


RECOPY = "re-copy it from the checkpoint"  # the advice for an engine dir's unreadable file


def load_tokenizer(directory: str | Path) -> ModelTokenizer:
    """Read the tokenizer files of an engine (or checkpoint) dir; see the module docstring."""
    from tokenizers import Tokenizer

    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{path}: missing; the engine dir needs the tokenizer files "
                             f"(rebuild with kiln build from a checkpoint that has them)")
    try:
        tokenizer = Tokenizer.from_str(path.read_text(USER_TEXT))  # from_file: no BOM
    except Exception as e:  # tokenizers raises a bare Exception on corrupt files
        raise TokenizerError(f"{path}: unreadable ({e}); {RECOPY}") from None
    config = _read_json(directory / "tokenizer_config.json")
    special = {key: _token_text(config[key]) for key in _SPECIAL_KEYS
               if config.get(key) is not None}
    return ModelTokenizer(tokenizer, special, _chat_template(directory, config),
                          _generation_config(directory / "generation_config.json"),
                          config.get("add_bos_token"))


def _generation_config(path: Path) -> dict[str, Any]:
    """The model's ``generation_config.json``, its EOS ids and sampling defaults checked where
    they are read, so that a bad value is named with its file (it had been refused as the
    request's own ``SamplingParams.top_p``, which no flag could then override, and a float EOS
    id had ended in a TypeError)."""
    config = _read_json(path)
    ids = config.get("eos_token_id")
    if not (ids is None or _is_id(ids) or isinstance(ids, list) and all(map(_is_id, ids))):
        raise TokenizerError(f"{path}: eos_token_id must be a token id (an integer >= 0) or a "
                             f"list of them, found {as_json(ids)}; correct or remove the field")
    try:
        SamplingParams.from_generation_config(config)
    except SamplingParamsError as e:
        said = f"max_new_tokens must be an integer >= 1, found " \
            f"{as_json(config['max_new_tokens'])}" if e.name == "max_tokens" \
            else f"{e.name} {e.worded(as_json)}"
        raise TokenizerError(f"{path}: {said} (a default of the model's sampling); correct or "
                             f"remove the field") from None
    return config


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(USER_TEXT)
    template = _read_json(directory / "chat_template.json").get("chat_template") \
        or config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _token_text(value: Any) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(USER_TEXT))
    except UNREADABLE_JSON as e:
        raise TokenizerError(f"{path}: invalid JSON ({e}); {RECOPY}") from None
    if not isinstance(data, dict):  # (a list or a string had been read as an empty file)
        raise TokenizerError(f"{path}: not a JSON object (found {as_json(data)}); "
                             f"{RECOPY}")
    return data


def generation_config_warnings(config: dict[str, Any], vocab_size: int, where: str,
                               copy: bool = False) -> list[str]:
    """What to tell of a valid ``generation_config.json`` (``where``: the file named, ``copy``:
    an engine's copy, which ``kiln verify`` checks): fields HF generate applies and kiln does
    not; EOS ids outside the model's vocabulary, which never end a generation. Said at convert
    (naming the Hugging Face file) and at load."""
    said = []
    if skipped := not_applied(config):
        said.append(f"{where} sets {', '.join(f'{k}={shown(v)}' for k, v in skipped.items())}, "
                    f"which kiln's sampling does not apply (HF generate does): of its sampling "
                    f"fields kiln applies do_sample, temperature, top_k, top_p, min_p and "
                    f"repetition_penalty")
    if outside := [i for i in _configured_eos_ids(config) if i >= vocab_size]:
        fix = ("correct it in the Hugging Face checkpoint's file, then convert and build again"
               if copy else "correct or remove it")
        said.append(f"{where} sets eos_token_id {', '.join(map(str, outside))}, outside the "
                    f"model's vocabulary [0, {vocab_size}): generation never stops on "
                    f"{'it' if len(outside) == 1 else 'them'}; {fix}")
    return said


def _configured_eos_ids(config: dict[str, Any]) -> list[int]:
    """The generation config's ``eos_token_id`` (an int or a list, checked at load) as a list."""
    ids = config.get("eos_token_id")
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
