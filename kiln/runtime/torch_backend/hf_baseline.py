"""HF transformers on the same weights, for ``--baseline hf`` comparisons and GPU tests.

:func:`hf_model` builds a ``LlamaForCausalLM`` / ``MistralForCausalLM`` whose parameters are
*views* of the torch backend's packed tensors (q/k/v and gate/up are row slices of the fused
matrices), so the baseline costs no second copy of the weights and runs exactly the numbers
kiln runs. :func:`hf_generate` times ``generate()`` greedily, batch by batch.

Non-goals: architectures HF serves with other classes (MPT, Falcon: their converters' layout
changes would need inverting), pre-transposed packings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.config import DecoderConfig, MlpType, NormType, PositionType, ResidualType
from kiln.converters.llama import LlamaConverter
from kiln.errors import ConfigError, a_or_an
from kiln.roles import SHARDING, Role
from kiln.sharding import SEGMENT_RULES

logger = logging.getLogger(__name__)


def _hf_config(config: DecoderConfig, dtype: torch.dtype):
    from transformers import LlamaConfig, MistralConfig

    unsupported = [why for why, bad in (
        ("LayerNorm", config.norm_type is not NormType.RMSNORM),
        ("ALiBi", config.position_type is not PositionType.ROPE),
        ("GELU MLP", config.mlp_type is not MlpType.SWIGLU),
        ("parallel residual", config.residual is not ResidualType.SEQUENTIAL),
        ("qk norm / clip_qkv / attention_scale", config.qk_norm or config.clip_qkv is not None
         or config.attention_scale is not None),
        ("separate o/qkv biases", config.qkv_bias != config.o_bias)) if bad]
    if unsupported:
        raise ConfigError(f"--baseline hf runs Llama/Mistral-style models only; this one has "
                          f"{', '.join(unsupported)}")
    kwargs = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size,
                  num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                  num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
                  max_position_embeddings=config.max_position_embeddings,
                  rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_word_embeddings,
                  dtype=dtype)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {"rope_type": s.type.value, "rope_theta": config.rope_theta, "factor": s.factor}
        for key in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"):
            if getattr(s, key) is not None:
                rope[key] = getattr(s, key)
    if config.sliding_window is not None:
        return MistralConfig(**kwargs, sliding_window=config.sliding_window,
                             rope_parameters=rope)
    return LlamaConfig(**kwargs, attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias,
                       rope_parameters=rope)


def _state_dict(config: DecoderConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> ``t``'s tensors: the Llama converter's tensor rules, inverted.

    A fused target (``concat_rows`` of its sources: q/k/v, gate/up) is split back into row
    views of its sources, by the segments the sharder splits it by. A tied lm_head's source is
    the embedding, which the embedding's own rule already gives (``hf_model`` ties them).
    """
    out: dict[str, torch.Tensor] = {}
    for rule in LlamaConverter.tensor_rules(config):
        for layer in range(config.num_layers) if rule.target.per_layer else (None,):
            name = rule.target.name(layer)
            if name not in t:  # a role this model does not have (biases)
                continue
            parts: Sequence[torch.Tensor] = (t[name],)
            if len(rule.sources) > 1:
                segments = SEGMENT_RULES[SHARDING[rule.target].segments](config)
                parts = t[name].split([seg.rows for seg in segments])
            for source, part in zip(rule.sources, parts, strict=True):
                out.setdefault(source.format(layer=layer), part)
    return out


def hf_model(config: DecoderConfig, tensors: dict[str, torch.Tensor]):
    """An HF causal LM sharing ``tensors`` (canonical names, ``[out, in]``; see module doc)."""
    from transformers import AutoModelForCausalLM

    embed = tensors[Role.EMBED.name()]
    hf_config = _hf_config(config, embed.dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=embed.dtype)
    state = _state_dict(config, tensors)
    model.load_state_dict(state, assign=True, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (rotary inv_freq) were made on the meta device: rebuild them.
    rotary_cls = type(model.model.rotary_emb)
    with torch.device(embed.device):
        model.model.rotary_emb = rotary_cls(config=hf_config)
    return model.eval()


@dataclass
class HfRun:
    batch_size: int
    output_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds


@torch.no_grad()
def hf_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                batch_size: int) -> tuple[list[list[int]], HfRun]:
    """Greedy ``generate()`` of equal-length prompts, ``batch_size`` at a time, timed."""
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise ValueError("hf_generate takes prompts of one length (no padding in the baseline)")
    device = model.lm_head.weight.device
    outputs: list[list[int]] = []
    started = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        ids = torch.tensor([list(p) for p in prompts[i:i + batch_size]], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             pad_token_id=0, eos_token_id=None)
        outputs.extend(out[:, ids.shape[1]:].tolist())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    # the batch that ran: no wider than the prompts
    run = HfRun(min(batch_size, len(prompts)), sum(len(o) for o in outputs),
                time.perf_counter() - started)
    logger.info("HF generate: %d tokens in %.2f s (%.1f tok/s, batch %d)", run.output_tokens,
                run.seconds, run.tokens_per_second, run.batch_size)
    return outputs, run


def hf_baseline_for_engine(engine_dir: str | Path, prompts: Sequence[Sequence[int]],
                           max_new_tokens: int, batch_size: int,
                           device: str = "cuda") -> tuple[list[list[int]], HfRun]:
    """``--baseline hf`` of ``kiln bench``: HF ``generate()`` on a torch engine's own weights.

    Loads rank 0's packed tensors onto ``device`` (release the kiln executor first: its KV
    cache holds most of the GPU), wraps them in an HF model without copying, and times greedy
    generation of ``prompts`` ``batch_size`` at a time.
    """
    from kiln.engine import EngineError, read_manifest
    from kiln.engine.torch_files import check_packed, read_packed

    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    if manifest.backend != "torch":
        raise EngineError(f"--baseline hf needs a torch engine (its packed weights); "
                          f"{engine_dir} is {a_or_an(manifest.backend)} engine: rebuild with --backend "
                          f"torch")
    tensors: dict[str, torch.Tensor] = {}
    for name in manifest.rank_files.get(0, ()):
        part, transposed = read_packed(engine_dir / name, torch.device(device))
        if transposed:
            raise EngineError(f"{engine_dir}: --baseline hf reads [out, in] weights; this engine "
                              f"stores {sorted(transposed)[:3]} transposed")
        tensors.update(part)
    check_packed(manifest.decoder, tensors, str(engine_dir))
    model = hf_model(manifest.decoder, tensors)
    hf_generate(model, [prompts[0]], min(4, max_new_tokens), 1)  # warm up
    return hf_generate(model, prompts, max_new_tokens, batch_size)
