"""kiln.runtime.executor: the base Executor's refusals, in its caller's words."""

from __future__ import annotations

import pytest
import torch

from kiln.engine import BuildLimits
from kiln.errors import options_as_flags
from kiln.runtime.executor import Executor, SequenceChunk


class _LastOnly(Executor):
    limits = BuildLimits(max_batch_size=1, max_input_len=4, max_seq_len=8, max_num_tokens=4)
    vocab_size = 4

    def step(self, chunks):
        return torch.zeros(len(chunks), self.vocab_size)


@pytest.mark.parametrize("as_flags, named", [(False, "gather_context_logits=True"),
                                              (True, "--gather_context_logits")])
def test_context_logits_are_refused_naming_the_option_as_its_caller_gives_it(as_flags, named):
    """A Python caller had been told of the flag --gather_context_logits."""
    chunk = SequenceChunk(slot=0, tokens=[1, 2], start=0, context_logits=True)
    with options_as_flags(as_flags), pytest.raises(RuntimeError) as info:
        _LastOnly().step_logits([chunk])
    assert str(info.value) == (f"_LastOnly cannot return context logits (its engine was built "
                               f"without {named})")
