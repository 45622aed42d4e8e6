"""Issue 15, step 1: tensor/pipeline-parallel torch engines against tp 1, greedy tokens and
logprobs.

    PYTHONPATH=. python3 benchmarks/parallel_correctness.py --out DIR [--device cuda|cpu]
        [--layouts 1x1,2x1,4x1,1x2,2x2] [--dtypes bfloat16,float32] [--prompts 32]
        [--new_tokens 128] [--size 1b|tiny] [--work_dir DIR]

A random Llama-shaped Hugging Face model (transformers, seeded; ``--size 1b``: hidden 2048, 16
layers, 32 query / 8 key-value heads of 64, MLP 5632, vocab 32000, which one GPU holds;
``tiny``: a few MB, for a CPU check of this script) is converted and built (torch backend) for
every layout TPxPP and dtype. Every engine generates greedily, ``--new_tokens`` for each of
``--prompts`` random prompts of 16-64 tokens, all queued at once, with each generated token's
logprob (``SamplingParams(logprobs=0)``). Per layout and dtype, against the 1x1 engine of the
same dtype: prompts whose tokens are all identical, the first divergence, and the largest
|logprob difference| over the tokens before any divergence. Issue 15's bar: identical tokens
for every prompt; logprobs within 0.05 in bfloat16 (a bf16 ulp is 2^-8 relative: all-reduce and
pipeline hand-offs change summation order) and 1e-4 in float32. Layouts needing more GPUs than
this machine has are skipped, each named (``--device cpu``: processes over gloo, any layout).
Writes DIR/parallel_correctness_results.json and prints one line per engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

import kiln
from kiln.builder import build
from kiln.runtime import LLM, ExecutorOptions, SamplingParams
from kiln.runtime.loader import open_engine

log = logging.getLogger("benchmarks.parallel_correctness")
TOLERANCE = {"bfloat16": 0.05, "float16": 0.05, "float32": 1e-4}
SIZES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, intermediate_size=5632, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=8, intermediate_size=128, vocab_size=256),
}


def random_hf_model(size: str, path: Path, seed: int = 0) -> Path:
    """A seeded random LlamaForCausalLM of ``size`` saved (float32) at ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096, rope_theta=500000.0,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def engine_for(hf: Path, work: Path, tp: int, pp: int, dtype: str, limits: dict) -> Path:
    """The torch engine of layout tp x pp in ``dtype`` (built once under ``work``)."""
    root = work / f"{dtype}-tp{tp}-pp{pp}"
    if not (root / "engine" / "config.json").is_file():
        ckpt = kiln.convert_checkpoint(hf, root / "ckpt", tp_size=tp, pp_size=pp, dtype=dtype,
                                       overwrite=True, progress=False)
        build(ckpt, root / "engine", backend="torch", dtype=dtype, overwrite=True, **limits)
    return root / "engine"


def generate(engine: Path, device: str, prompts: list[list[int]], new_tokens: int,
             ) -> tuple[list[list[int]], list[list[dict[int, float]]], float]:
    """Greedy tokens for every prompt, each step's two most likely tokens' logprobs (the
    chosen one first: {id: logprob}), and the seconds it took."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=2)
    _, executor = open_engine(engine, ExecutorOptions(device=device))  # token ids: no tokenizer
    with LLM.from_executor(executor) as llm:
        started = time.perf_counter()
        results = llm.generate(prompts, params)
        seconds = time.perf_counter() - started
    failed = [r.error for r in results if r.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"{engine}: {failed[0]}")
    return ([list(r.token_ids) for r in results],
            [[{lp.token_id: lp.logprob, **lp.top} for lp in r.logprobs] for r in results],
            seconds)


def compare(tokens, logprobs, want_tokens, want_logprobs) -> dict:
    """Identical prompts, the first divergence (prompt, position), the largest logprob
    difference over every prompt's tokens up to its first divergence, and at each divergence
    how close the reference's choice was: the reference's logprob of its own token minus that
    of the token chosen instead (None where that token was not among its two most likely).
    A divergence at a gap within the noise of the dtype is a near-tie broken the other way."""
    identical, first, worst, gaps = 0, None, 0.0, []
    for i, (got, want) in enumerate(zip(tokens, want_tokens, strict=True)):
        same = next((j for j, (a, b) in enumerate(zip(got, want, strict=True)) if a != b),
                    len(want))
        identical += same == len(want)
        if same < len(want):
            first = first or (i, same)
            theirs = want_logprobs[i][same]
            other = theirs.get(got[same])
            gaps.append(None if other is None else theirs[want[same]] - other)
        # the logprob of the diverging step's chosen token is compared too: the same context
        for j in range(min(same + 1, len(want))):
            worst = max(worst, abs(logprobs[i][j][got[j]] - want_logprobs[i][j][want[j]]))
    near = [g for g in gaps if g is not None]
    return dict(identical_prompts=identical, first_divergence=first, max_logprob_diff=worst,
                divergences=len(gaps), largest_gap_at_divergence=max(near) if near else None,
                divergences_beyond_top2=sum(g is None for g in gaps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/kiln-parallel-correctness"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--layouts", default="1x1,2x1,4x1,1x2,2x2")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--size", default="1b", choices=sorted(SIZES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    layouts = [tuple(int(v) for v in s.split("x")) for s in args.layouts.split(",")]
    if (1, 1) not in layouts:
        layouts.insert(0, (1, 1))  # the reference
    gpus = torch.cuda.device_count() if args.device == "cuda" else None
    if args.device == "cuda" and not gpus:
        raise SystemExit("error: --device cuda needs a CUDA GPU; pass --device cpu")

    hf = random_hf_model(args.size, args.work_dir / f"hf-{args.size}")
    g = torch.Generator().manual_seed(1)
    vocab = SIZES[args.size]["vocab_size"]
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 65, (args.prompts,), generator=g)]
    limits = dict(max_batch_size=args.prompts, max_input_len=64,
                  max_seq_len=64 + args.new_tokens, max_num_tokens=max(2048, 64 * args.prompts))
    results = dict(device=torch.cuda.get_device_name() if gpus else platform.processor() or "cpu",
                   gpus=gpus, size=args.size, prompts=args.prompts, new_tokens=args.new_tokens,
                   tolerance=TOLERANCE, engines=[], skipped=[])
    for dtype in args.dtypes.split(","):
        reference = None
        for tp, pp in layouts:
            if gpus is not None and tp * pp > gpus:
                results["skipped"].append(f"{dtype} tp{tp} x pp{pp}: needs {tp * pp} GPUs, "
                                          f"this machine has {gpus}")
                log.warning("skipped: %s", results["skipped"][-1])
                continue
            engine = engine_for(hf, args.work_dir / args.size, tp, pp, dtype, limits)
            tokens, logprobs, seconds = generate(engine, args.device, prompts, args.new_tokens)
            if reference is None:
                reference = tokens, logprobs
            row = dict(dtype=dtype, tp=tp, pp=pp, seconds=seconds,
                       **compare(tokens, logprobs, *reference))
            row["ok"] = (row["identical_prompts"] == len(prompts)
                         and row["max_logprob_diff"] <= TOLERANCE[dtype])
            results["engines"].append(row)
            gap = row["largest_gap_at_divergence"]
            print(f"{dtype:9} tp{tp} x pp{pp}: {row['identical_prompts']}/{len(prompts)} prompts "
                  f"identical, first divergence {row['first_divergence']}, max |logprob diff| "
                  f"{row['max_logprob_diff']:.2e} (tolerance {TOLERANCE[dtype]:g}) "
                  f"{'OK' if row['ok'] else 'MISSED'}; at the divergences the reference's "
                  f"margin was at most {'-' if gap is None else f'{gap:.2e}'} "
                  f"({row['divergences_beyond_top2']} beyond its top 2); {seconds:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "parallel_correctness_results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
