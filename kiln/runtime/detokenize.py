"""Incremental detokenization and stop strings for streamed text.

Contract:
- :class:`IncrementalDetokenizer` turns tokens into text deltas one token at a time and never
  emits a delta ending in an incomplete UTF-8 sequence (byte-level BPE splits characters across
  tokens): text is held back until the bytes complete. ``flush()`` releases what is left at the
  end, less an incomplete character there (generation stopped mid-character): it is dropped,
  never emitted as U+FFFD; a U+FFFD the model really wrote stays. The deltas concatenate to
  ``tokenizer.decode(output_ids)``, less that dropped tail. ``held`` counts the whole
  characters held back behind a partial one: the next token's text starts past them.
- :class:`StopStringMatcher` finds stop strings in the text stream, also across token
  boundaries, and holds back the tail that could still become a stop string, so a stop string
  (or its prefix) is never streamed out and then retracted.

Both work with a ``tokenizers.Tokenizer`` (the runtime never needs transformers).

Non-goals: detokenizing the prompt; regex stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


# Prompt tokens kept as left context: decoders strip a leading space from the first token
# (SentencePiece "▁word"), so the first generated token must not be decoded on its own.
_CONTEXT_TOKENS = 4
_REPLACEMENT = "\ufffd"
# A token of the lone byte 0x80 (a UTF-8 continuation byte), to tell an incomplete character
# from a real U+FFFD: appended, it completes or extends an incomplete sequence (no new U+FFFD)
# but adds one after a complete character. Byte-level BPE spells that byte "Ģ" (GPT-2's
# bytes_to_unicode), SentencePiece byte fallback "<0x80>".
_CONTINUATION_TOKENS = ("Ģ", "<0x80>")


class IncrementalDetokenizer:
    """Text deltas for a growing list of output tokens (see the module docstring).

    Keeps two offsets into its token list: ``prefix`` (tokens whose text was already used as the
    left context) and ``read`` (tokens whose text was already emitted). Each new token decodes
    ``ids[prefix:]`` and emits what goes beyond the text of ``ids[prefix:read]``, unless that ends
    in a replacement character, which means the token ended mid-character.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int],
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        # whole characters decoded but held back (they precede a partial one): where the next
        # token's text starts, past the text emitted so far
        self.held = 0

    def push(self, token: int) -> str:
        """Append one token; return the text it completes ("" while a character is partial)."""
        self._ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back, less an incomplete character at the end (see the module
        docstring)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        delta = full_text[len(prefix_text):]
        if not final and (full_text.endswith(_REPLACEMENT) or len(full_text) <= len(prefix_text)):
            self.held = len(delta.rstrip(_REPLACEMENT))
            return ""
        self.held = 0
        if final and delta.endswith(_REPLACEMENT) and self._ends_mid_character(full_text):
            delta = delta[:-1]
        self._prefix, self._read = self._read, len(self._ids)
        return delta

    def _ends_mid_character(self, text: str) -> bool:
        """Whether ``text`` (the decode of ``ids[prefix:]``) ends in U+FFFD for an incomplete
        byte sequence rather than a real U+FFFD; False when the tokenizer has no byte token."""
        probe = _continuation_id(self._tok)
        if probe is None:
            return False
        probed = self._tok.decode([*self._ids[self._prefix:], probe], self._skip)
        return probed.count(_REPLACEMENT) <= text.count(_REPLACEMENT)


def _continuation_id(tokenizer: Decoder) -> int | None:
    """The id of a token of the lone byte 0x80, if the tokenizer has one."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # ModelTokenizer -> tokenizers.Tokenizer
    token_to_id = getattr(inner, "token_to_id", None)
    if token_to_id is None:
        return None
    for token in _CONTINUATION_TOKENS:
        if (found := token_to_id(token)) is not None:
            return found
    return None


class StopStringMatcher:
    """Finds the first stop string in streamed text; holds back a possible partial match."""

    def __init__(self, stops: Sequence[str], include_stop: bool = False):
        self._stops = tuple(stops)
        self._include = include_stop
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""
        self._sent = 0  # characters of _text already released
        self.matched: str | None = None

    def push(self, delta: str) -> str:
        """Add new text; return what is safe to release now. Sets ``matched`` on a stop."""
        if self.matched is not None:
            return ""
        start = max(0, len(self._text) - self._hold)
        self._text += delta
        hit = self._find(start)
        if hit is not None:
            index, stop = hit
            self.matched = stop
            self._text = self._text[:index + (len(stop) if self._include else 0)]
            return self._release(len(self._text))
        return self._release(len(self._text) - self._hold if self._stops else len(self._text))

    def flush(self) -> str:
        """Release the held tail at the end of a request (no stop string completed)."""
        return self._release(len(self._text))

    @property
    def text(self) -> str:
        """All text so far, truncated at a matched stop string."""
        return self._text

    def _find(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            index = self._text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _release(self, upto: int) -> str:
        upto = max(upto, self._sent)
        out = self._text[self._sent:upto]
        self._sent = upto
        return out
