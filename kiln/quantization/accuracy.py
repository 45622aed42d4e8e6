"""The accuracy gate: the quantized model against its source on text calibration never saw.

Contract: :class:`AccuracyMeter` takes both models' logits for the same samples and
accumulates, over every next-token prediction (positions 0..L-2 of each sample predict tokens
1..L-1; samples are independent windows):

- ``perplexity_source`` / ``perplexity_quantized``: ``exp(mean NLL)``;
- ``ppl_ratio``: quantized / source;
- ``top1_agreement``: the share of positions where both argmaxes agree;
- ``kl_divergence``: mean ``KL(source || quantized)`` of the next-token distributions (nats).

Sums are float64. :func:`check_gate` refuses (:class:`~kiln.errors.AccuracyGateError`, one line
with the figures) a ratio above the limit, and any NaN/inf figure whatever the limit says.

Non-goals: sliding-window perplexity across samples (``kiln eval`` does that on engines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kiln.errors import AccuracyGateError, option

FIGURES = ("perplexity_source", "perplexity_quantized", "ppl_ratio", "top1_agreement",
           "kl_divergence")


class AccuracyMeter:
    """Running sums of the gate's figures (module docstring)."""

    def __init__(self) -> None:
        self.nll_source = self.nll_quantized = self.kl = 0.0
        self.agree = self.tokens = 0

    def update(self, source: torch.Tensor, quantized: torch.Tensor, tokens: torch.Tensor) -> None:
        """Logits [B, L, V] of both models for samples ``tokens`` [B, L]."""
        targets = tokens[:, 1:].reshape(-1).to(source.device)
        ls = F.log_softmax(source[:, :-1].float(), dim=-1).flatten(0, 1)
        lq = F.log_softmax(quantized[:, :-1].float(), dim=-1).flatten(0, 1)
        self.nll_source -= float(ls.gather(1, targets[:, None]).sum(dtype=torch.float64))
        self.nll_quantized -= float(lq.gather(1, targets[:, None]).sum(dtype=torch.float64))
        self.kl += float((ls.exp() * (ls - lq)).sum(dtype=torch.float64))
        self.agree += int((ls.argmax(-1) == lq.argmax(-1)).sum())
        self.tokens += int(targets.numel())

    def result(self) -> dict[str, Any]:
        n = max(self.tokens, 1)
        ppl_s, ppl_q = _exp(self.nll_source / n), _exp(self.nll_quantized / n)
        return {"perplexity_source": ppl_s, "perplexity_quantized": ppl_q,
                "ppl_ratio": ppl_q / ppl_s if ppl_s > 0 else math.nan,
                "top1_agreement": self.agree / n, "kl_divergence": self.kl / n,
                "tokens": self.tokens}


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def _remedies(qformat: str, settings: Sequence[str]) -> list[str]:
    """What may win the accuracy back: leaving out ``settings`` (the options that cost
    accuracy besides the format itself), more data (only a calibrated format learns from it),
    a more accurate format (one whose default gate is tighter, named: none for int8_wo), and
    for a calibrated format the uncalibrated one of its weight size (int4_awq: int4_wo)."""
    from kiln.quantization.config import FORMATS

    info = FORMATS.get(qformat)
    remedies = [f"try without {' or '.join(settings)}"] if settings else []
    if info is not None and info.needs_calibration:
        remedies.append("calibrate with more or other data")
    closer = sorted((f.max_ppl_ratio, name) for name, f in FORMATS.items()
                    if info is None or f.max_ppl_ratio < info.max_ppl_ratio)
    if closer:  # the formats of tighter default gates, tightest first
        remedies.append(f"choose a more accurate format ({', '.join(n for _, n in closer)})")
    if info is not None and info.needs_calibration:  # e.g. int4_awq on too little data
        remedies += [f"take {f.name} (the same weight size, no calibration; its default gate "
                     f"is {f.max_ppl_ratio})" for f in FORMATS.values()
                     if f.weight_dtype == info.weight_dtype and not f.needs_calibration
                     and f.max_ppl_ratio >= info.max_ppl_ratio]
    return remedies


def check_gate(accuracy: dict[str, Any], qformat: str, max_ppl_ratio: float,
               enforce: bool, settings: Sequence[str] = ()) -> bool:
    """True if the figures pass; above the limit raises AccuracyGateError when ``enforce``,
    a NaN/inf figure always (a model that computes NaN is broken, not less accurate).
    ``settings``: the options given that cost accuracy besides the format (``--kv_cache_dtype
    int8``), named in the refusal."""
    figures = [accuracy[k] for k in FIGURES]
    bad = any(not math.isfinite(v) for v in figures)
    passed = not bad and accuracy["ppl_ratio"] <= max_ppl_ratio
    if bad or (not passed and enforce):
        if bad and not math.isfinite(accuracy["perplexity_source"]):  # no format can help
            why = "the source model's own perplexity is NaN/inf"
            remedies = ["check the source checkpoint (kiln verify) and convert it again"]
        elif bad:  # not accepted by any option either
            why = "a figure is NaN/inf"
            remedies = _remedies(qformat, settings) or [
                "keep the checkpoint unquantized (its own figures are finite; please report "
                "it)"]
        else:
            why = f"ratio above max_ppl_ratio {max_ppl_ratio}"
            remedies = [*_remedies(qformat, settings),
                        f"pass {option('max_ppl_ratio')} / {option('no_accuracy_gate', True)} "
                        f"to accept it"]
        either = remedies[0] if len(remedies) == 1 else \
            f"{', '.join(remedies[:-1])}, or {remedies[-1]}"
        raise AccuracyGateError(
            f"{qformat} fails the accuracy gate ({why}): {summary(accuracy)}; nothing written; "
            f"{either}")
    return passed


def summary(accuracy: dict[str, Any]) -> str:
    return (f"perplexity {accuracy['perplexity_source']:.4f} -> "
            f"{accuracy['perplexity_quantized']:.4f} (ratio {accuracy['ppl_ratio']:.4f}), "
            f"top-1 agreement {100 * accuracy['top1_agreement']:.2f}%, KL "
            f"{accuracy['kl_divergence']:.5f} over {accuracy['tokens']} tokens of "
            f"{accuracy.get('dataset', '?')}")
