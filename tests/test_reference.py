"""kiln.reference: the oracle refuses what no engine takes, as the runtime does."""

from __future__ import annotations

import pytest
import torch

from kiln.config import DecoderConfig
from kiln.reference import ReferenceDecoder
from kiln.roles import expected_shape, parse_tensor, tensor_names

VOCAB = 16


@pytest.fixture(scope="module")
def decoder() -> ReferenceDecoder:
    config = DecoderConfig(architecture="test", vocab_size=VOCAB, hidden_size=16, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=32,
                           max_position_embeddings=32)
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(expected_shape(parse_tensor(name)[0], config),
                                 generator=generator) for name in tensor_names(config)}
    return ReferenceDecoder(config, weights, dtype=torch.float64)


@pytest.mark.parametrize("prompt, message", [
    # -2 had read the embedding's second-last row, and [] failed on an empty max()
    ([1, -2], r"^prompt\[1\]: token id -2 is outside the vocabulary \[0, 16\); pass ids of "
              r"the model's tokenizer$"),
    ([16, 3], r"^prompt\[0\]: token id 16 is outside the vocabulary \[0, 16\); pass ids of "
              r"the model's tokenizer$"),
    ([], r"^prompt is empty; give at least one token$"),
])
def test_generate_refuses_ids_no_engine_takes(decoder, prompt, message):
    with pytest.raises(ValueError, match=message):
        decoder.generate(prompt, max_new_tokens=1)


@pytest.mark.parametrize("prompt, found", [
    ([1.0, 2.0], "list [1.0, 2.0]"), ([True], "list [True]"), ([[1]], "list [[1]]"),
    ([1, "x"], "list [1, 'x']"), ("ab", "str 'ab'"), (torch.tensor([1.5]), "a 1-D torch.float32 "
                                                                          "tensor"),
    (torch.zeros(1, 2, dtype=torch.long), "a 2-D torch.int64 tensor"),
    (torch.zeros(2, dtype=torch.long, device="meta"), "a 1-D torch.int64 tensor on meta"),
    (torch.tensor([1, 2]).to_sparse(), "a 1-D torch.int64 tensor (sparse)"),
])
def test_generate_refuses_a_prompt_of_no_token_ids_in_one_line(decoder, prompt, found):
    """Floats had failed in the embedding ("tensors used as indices must be long...")."""
    with pytest.raises(ValueError) as raised:
        decoder.generate(prompt, max_new_tokens=1)
    assert str(raised.value) == ("prompt must be token ids, a list of ints or a 1-D integer "
                                 f"tensor, found {found}")


def test_generate_takes_a_1d_integer_tensor(decoder):
    assert decoder.generate(torch.tensor([1, 2]), max_new_tokens=2) == \
        decoder.generate([1, 2], max_new_tokens=2)


def test_forward_names_the_row_and_position_of_an_id_outside(decoder):
    with pytest.raises(ValueError, match=r"^input_ids\[1\]\[2\]: token id -1 is outside"):
        decoder.forward(torch.tensor([[1, 2, 3], [4, 5, -1]]))
    assert len(decoder.generate([1, 15], max_new_tokens=2)) == 2  # the edges of the vocabulary
