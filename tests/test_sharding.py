"""The generic sharder: unshard(shard(w)) == w for every role and valid tp_size."""

from __future__ import annotations

import pytest
import torch

from kiln.config import DecoderConfig, Mapping, MlpType, tp_sizes
from kiln.errors import ConfigError, options_as_flags
from kiln.roles import SHARDING, Role, expected_shape, roles_for
from kiln.sharding import shard, shard_shape, unshard


def _config(**kw) -> DecoderConfig:
    base = dict(architecture="test", vocab_size=130, hidden_size=48, num_layers=2, num_heads=8,
                num_kv_heads=2, head_dim=6, intermediate_size=64, max_position_embeddings=32,
                qkv_bias=True, o_bias=True, mlp_bias=True)
    return DecoderConfig(**{**base, **kw})


CONFIGS = {
    "gqa": _config(),
    "mqa": _config(num_kv_heads=1),
    "mha": _config(num_kv_heads=8),
    "gelu": _config(mlp_type=MlpType.GELU),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_unshard_inverts_shard(name, tp):
    config = CONFIGS[name]
    mapping = Mapping(tp_size=tp)
    mapping.validate_for(config)
    for role in roles_for(config):
        full = torch.randn(expected_shape(role, config))
        shards = [shard(full, role, config, mapping, r) for r in range(tp)]
        for r, part in enumerate(shards):
            assert tuple(part.shape) == shard_shape(full.shape, role, config, mapping, r), role
        assert torch.equal(unshard(shards, role, config, mapping), full), role


def test_kv_heads_are_replicated_when_fewer_than_ranks():
    config, mapping = CONFIGS["gqa"], Mapping(tp_size=8)  # 2 KV heads, 8 ranks
    full = torch.arange(float(expected_shape(Role.QKV, config)[0]))[:, None].expand(-1, 3)
    q, kv, d = config.q_size, config.kv_size, config.head_dim
    for rank in range(8):
        part = shard(full, Role.QKV, config, mapping, rank)[:, 0]
        kv_head = rank * 2 // 8  # ranks 0-3 share KV head 0, ranks 4-7 head 1
        assert part[:d].tolist() == list(range(rank * d, rank * d + d))  # its one query head
        assert part[d:2 * d].tolist() == list(range(q + kv_head * d, q + kv_head * d + d))
        assert part[2 * d:].tolist() == list(range(q + kv + kv_head * d, q + kv + kv_head * d + d))


def test_vocab_parallel_lm_head_is_padded_with_zeros():
    config, mapping = CONFIGS["gqa"], Mapping(tp_size=4)  # vocab 130 -> 4 x 33 rows
    full = torch.randn(130, 48)
    parts = [shard(full, Role.LM_HEAD, config, mapping, r) for r in range(4)]
    assert [p.shape[0] for p in parts] == [33] * 4
    assert torch.equal(parts[3][31:], torch.zeros(2, 48))
    assert SHARDING[Role.LM_HEAD].pad_to_multiple


@pytest.mark.parametrize("tp,message", [(3, "query heads"), (16, "query heads")])
def test_invalid_tp_size_is_refused(tp, message):
    with pytest.raises(ConfigError, match=message):
        Mapping(tp_size=tp).validate_for(CONFIGS["gqa"])


def test_stage_layers_cover_all_layers_once():
    for layers in range(1, 9):
        for pp in range(1, layers + 1):
            mapping = Mapping(pp_size=pp)
            got = [i for s in range(pp) for i in mapping.stage_layers(s, layers)]
            assert got == list(range(layers))


def test_a_tp_size_error_lists_the_sizes_that_fit():
    """SmolLM2-135M's shape: 9 query heads, 3 KV heads, MLP 1536: tp 1 or 3 (9 does not
    divide 1536); 6 KV heads under tp 12 would be duplicated, 3 under 2 cannot split."""
    smollm2 = _config(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                      intermediate_size=1536)
    with pytest.raises(ConfigError) as info:
        Mapping(tp_size=2).validate_for(smollm2)
    assert str(info.value) == ("tp_size 2 does not divide the 9 query heads; this model allows "
                               "tp_size 1, 3")
    # a checkpoint's settings keep their names inside a kiln command; a user's options do not
    with options_as_flags():
        with pytest.raises(ConfigError, match="^tp_size 2 does not divide"):
            Mapping(tp_size=2).validate_for(smollm2)
        with pytest.raises(ConfigError) as info:
            Mapping(tp_size=2).validate_for(smollm2, as_options=True)
    assert str(info.value) == ("--tp_size 2 does not divide the 9 query heads; this model "
                               "allows --tp_size 1, 3")
    with pytest.raises(ConfigError) as info:
        Mapping(pp_size=3).validate_for(smollm2, as_options=True)
    assert str(info.value).startswith("pp_size 3 exceeds the 2 layers")
    assert tp_sizes(smollm2) == (1, 3)
    assert tp_sizes(CONFIGS["gqa"]) == (1, 2, 4, 8)
