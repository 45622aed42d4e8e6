"""Pipeline overlap: step time of a pp 2 torch engine on the CPU (gloo) with 1, 2 and 4
micro-batches per step.

A random Llama (hidden 512, MLP 1536, 8 heads / 4 KV heads, 8 layers, vocab 4096: 4 layers per
stage) is converted for pp 2 and for pp 1 and built as float32 torch engines. Every rank runs
one thread (the driver is stage 0, one worker process stage 1), so on a 2-core machine each
stage has a core. Workload per round: one prefill step of N sequences of L tokens (fresh
slots), then D decode steps of those N sequences (one token each); the step call is timed. The
engines of every micro-batch count (and the pp 1 engine, one process, for reference) are open
at once and take their rounds in turn, so drift on the machine affects them alike. Other
processes' share of the machine is measured per round (/proc/stat less this process tree's
ticks, so Linux only); the figures are over the quiet rounds (at most 5%; all rounds, said so,
when none was): medians of the step times, and each count's time relative to one micro-batch
as the median over rounds of the ratio of the two's (median) steps in that round.

Expectation: with M micro-batches over 2 equal stages a step takes (M+1)/(2M) of the time with
one (0.75 for M = 2, 0.625 for M = 4), if the two stages compute at once as fast as alone.
Two things move it here, and both are measured in every round. This machine: two idle
processes run a stage's matrix products (its projections on 128 rows, over its 50 MB of
weights, one thread), alone then both at once; at s, the speed of each when both are busy
relative to alone (cores, caches and memory bandwidth shared), the expectation is
1/M + (M-1)/(2Ms). The split: each micro-batch pays the per-forward costs again (Python,
kernel calls; reading the stage's weights, which is most of a decode step), measured as the
pp 1 engine running each step as M consecutive steps over the same micro-batches; the
expectation is multiplied by that cost. Not modelled: the stages are not quite equal (the last
one applies the lm_head), and gloo's transport and the driver's pipe share the two cores.

    python benchmarks/pipeline_overlap.py [--rounds 9] [--sequences 8] [--prompt_len 64]
        [--decode_steps 8] [--output benchmarks/pipeline_overlap_results.json]

Measured on the 2-core development machine (defaults, about 90 s; two runs, every round quiet):
prefill steps of 512 tokens took 0.86 and 0.92 of the one-micro-batch time with 2 micro-batches
(here x0.80 and x0.75), 0.83 and 0.89 with 4 (x0.82, x0.71); decode steps of 8 tokens 1.07 and
1.09 with 2, 1.18 and 1.06 with 4 (one process takes 1.35 times as long for such a step as 2
forwards). Single rounds vary by about +-15% on this machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHAPE = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
MICRO_BATCHES = (1, 2, 4)
QUIET = 0.05  # a round counts when other processes took at most this share of the machine


def stage_products() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input [128, in], weight [out, in]) of every projection of one stage's layers (half of
    them): a stage's matrix products on 128 rows, over as many weight bytes as it reads."""
    hidden, inter = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    head_dim = hidden // SHAPE["num_attention_heads"]
    qkv = (SHAPE["num_attention_heads"] + 2 * SHAPE["num_key_value_heads"]) * head_dim
    x, h = torch.randn(128, hidden), torch.randn(128, inter)
    layer = [(x, (qkv, hidden)), (x, (hidden, hidden)), (x, (2 * inter, hidden)),
             (h, (hidden, inter))]
    return [(a, torch.randn(shape)) for _ in range(SHAPE["num_hidden_layers"] // 2)
            for a, shape in layer]


def _products(conn) -> None:
    """A calibration process: on ``(start, seconds)``, one stage's matrix products
    (:func:`stage_products`, one thread) from wall-clock ``start`` for ``seconds``, over and
    over; replies with how many it ran."""
    torch.set_num_threads(1)
    products = stage_products()
    while (job := conn.recv()) is not None:
        begin, seconds = job
        time.sleep(max(0.0, begin - time.time()))
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            for x, w in products:
                torch.nn.functional.linear(x, w)
                count += 1
        conn.send(count)


class Calibration:
    """Two idle processes that measure, when asked, what this machine gives two stages at
    once: the speed of each while both run a stage's matrix products, relative to one alone
    (1.0: two independent cores, and memory bandwidth enough for both)."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(2):
            mine, theirs = ctx.Pipe()
            self.procs.append(ctx.Process(target=_products, args=(theirs,), daemon=True))
            self.procs[-1].start()
            self.conns.append(mine)

    def _counts(self, n: int, seconds: float) -> list[int]:
        begin = time.time() + 0.05
        for conn in self.conns[:n]:
            conn.send((begin, seconds))
        return [conn.recv() for conn in self.conns[:n]]

    def two_busy_speed(self, seconds: float = 0.3) -> float:
        alone = self._counts(1, seconds)[0]
        return statistics.mean(self._counts(2, seconds)) / alone

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=True):
            conn.send(None)
            proc.join()


def expected_ratio(m: int, speed: float) -> float:
    """Step time with m micro-batches over 2 equal stages relative to 1, when two busy processes
    each run at ``speed``: the first and last micro-batch run alone, the m - 1 others overlap
    (1/m + (m-1)/(2m speed); (m+1)/(2m) at speed 1)."""
    return 1 / m + (m - 1) / (2 * m * speed)


def build_engines(work: Path, args: argparse.Namespace) -> dict[int, Path]:
    """pp -> engine dir (pp 1 and pp 2) of the random model (module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import kiln
    from kiln.builder import build

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(work / "hf")
    engines = {}
    for pp in (1, 2):
        checkpoint = kiln.convert_checkpoint(work / "hf", work / f"ckpt-pp{pp}", pp_size=pp,
                                             dtype="float32", progress=False)
        engines[pp] = work / f"engine-pp{pp}"
        build(checkpoint, engines[pp], backend="torch", dtype="float32",
              max_batch_size=args.sequences, max_input_len=args.prompt_len,
              max_seq_len=args.prompt_len + args.decode_steps,
              max_num_tokens=args.sequences * args.prompt_len)
    return engines


def open_engines(engines: dict[int, Path]) -> dict[str, tuple[object, int]]:
    """label -> (executor, parts): the pp 2 drivers ``M=<m>`` (parts 1), and the pp 1 engine
    (a plain TorchExecutor, one process) as ``pp1`` and as ``pp1/<m>``: each step run as m
    consecutive steps over the micro-batches (what the split alone costs)."""
    from kiln.engine import read_manifest
    from kiln.runtime.distributed import DistributedExecutor
    from kiln.runtime.torch_backend.executor import TorchExecutorOptions
    from kiln.runtime.torch_executor import build_executor, read_rank

    cpu = torch.device("cpu")
    manifest = read_manifest(engines[1])
    single = build_executor(engines[1], manifest, read_rank(engines[1], manifest, 0, cpu), cpu,
                            TorchExecutorOptions())
    opened = {"pp1": (single, 1), **{f"pp1/{m}": (single, m) for m in MICRO_BATCHES[1:]}}
    manifest = read_manifest(engines[2])
    for m in MICRO_BATCHES:
        opened[f"M={m}"] = (DistributedExecutor.open(engines[2], manifest, cpu,
                                                     TorchExecutorOptions(micro_batches=m),
                                                     num_threads=1), 1)
    return opened


def run_step(executor, chunks: list, parts: int) -> torch.Tensor:
    """One step, or ``parts`` consecutive steps over its micro-batches: the logits."""
    from kiln.runtime.torch_backend.inputs import split_micro_batches

    if parts == 1:
        return executor.step(chunks)
    split = split_micro_batches([len(c.tokens) for c in chunks], parts)
    return torch.cat([executor.step(chunks[part]) for part in split])


def one_round(executor, parts: int, prompts: list[list[int]], decode_steps: int,
              ) -> tuple[float, list[float]]:
    """One prefill step of every prompt, then ``decode_steps`` decode steps: their seconds."""
    from kiln.runtime.executor import SequenceChunk

    total = len(prompts[0]) + decode_steps
    for slot in range(len(prompts)):
        if not executor.reserve(slot, total):
            raise RuntimeError(f"slot {slot}: no KV-cache room for {total} tokens")
    start = time.perf_counter()
    logits = run_step(executor, [SequenceChunk(s, p, 0) for s, p in enumerate(prompts)], parts)
    prefill = time.perf_counter() - start
    decode = []
    for i in range(decode_steps):
        tokens = logits.argmax(-1).tolist()
        chunks = [SequenceChunk(s, [t], len(prompts[0]) + i) for s, t in enumerate(tokens)]
        start = time.perf_counter()
        logits = run_step(executor, chunks, parts)
        decode.append(time.perf_counter() - start)
    for slot in range(len(prompts)):
        executor.release(slot)
    return prefill, decode


def cpu_ticks() -> tuple[int, int]:
    """(busy, all) clock ticks of the machine's CPUs so far (Linux: /proc/stat)."""
    user, nice, system, idle, iowait, irq, softirq = map(
        int, Path("/proc/stat").read_text().split()[1:8])
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait


def own_ticks() -> int:
    """Clock ticks run by this process and its children (the ranks, the calibration)."""
    total = 0
    for pid in [os.getpid(), *(p.pid for p in multiprocessing.active_children())]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def measure(executors: dict[str, tuple[object, int]], args: argparse.Namespace) -> dict:
    """Rounds of every engine in turn, each after a calibration of the machine (its
    :meth:`Calibration.two_busy_speed`): the seconds of every step, the speeds, and the share
    of the machine other processes took during each round."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, SHAPE["vocab_size"], (args.sequences, args.prompt_len),
                            generator=g).tolist()
    times = {label: {"prefill": [], "decode": []} for label in executors}
    for executor, parts in executors.values():  # a warm-up round, not counted
        one_round(executor, parts, prompts, args.decode_steps)
    calibration, speeds, others = Calibration(), [], []
    try:
        for _ in range(args.rounds):
            (busy, ticks), own = cpu_ticks(), own_ticks()
            speeds.append(calibration.two_busy_speed())
            for label, (executor, parts) in executors.items():
                prefill, decode = one_round(executor, parts, prompts, args.decode_steps)
                times[label]["prefill"].append([prefill])
                times[label]["decode"].append(decode)
            (busy_end, ticks_end), own_end = cpu_ticks(), own_ticks()
            others.append(((busy_end - busy) - (own_end - own)) / (ticks_end - ticks))
    finally:
        calibration.close()
    return {"times": times, "speeds": speeds, "others": others}


def per_round(rounds: dict[str, list[float]], label: str, base: str) -> list[float]:
    """``label``'s time relative to ``base``'s in each round."""
    return [a / b for a, b in zip(rounds[label], rounds[base], strict=True)]


def paired(rounds: dict[str, list[float]], label: str, base: str) -> float:
    """The median over rounds of ``label``'s time relative to ``base``'s in the same round."""
    return statistics.median(per_round(rounds, label, base))


def summarize(measured: dict) -> dict:
    """Over the quiet rounds (other processes took at most :data:`QUIET` of the machine; all
    rounds when none was), per step kind: median ms of each engine; each micro-batch count's
    time relative to M=1 (:func:`paired`, over each round's median step) beside the ideal
    (M+1)/(2M) and the expectation here: :func:`expected_ratio` at this machine's
    two-busy-process speed, times what splitting the step into M forwards costs one process
    (``pp1/<m>`` to ``pp1``)."""
    others = measured["others"]
    kept = [i for i, share in enumerate(others) if share <= QUIET] or list(range(len(others)))
    times = {label: {kind: [t[kind][i] for i in kept] for kind in t}
             for label, t in measured["times"].items()}
    speeds = [measured["speeds"][i] for i in kept]
    speed = statistics.median(speeds)
    out = {"rounds": len(others), "quiet_rounds": sum(share <= QUIET for share in others),
           "rounds_used": len(kept), "others_share_per_round": [round(x, 3) for x in others],
           "two_busy_speed": round(speed, 3),
           "two_busy_speed_range": [round(min(speeds), 3), round(max(speeds), 3)]}
    for kind in ("prefill", "decode"):
        rounds = {label: [statistics.median(r) for r in t[kind]] for label, t in times.items()}
        ms = {label: 1000 * statistics.median([x for r in t[kind] for x in r])
              for label, t in times.items()}
        split = {m: paired(rounds, f"pp1/{m}", "pp1") if m > 1 else 1.0
                 for m in MICRO_BATCHES}
        out[kind] = {
            "median_ms": {label: round(v, 2) for label, v in ms.items()},
            "ratio_to_M1": {f"M={m}": round(paired(rounds, f"M={m}", "M=1"), 3)
                            for m in MICRO_BATCHES},
            "ratio_to_M1_range": {f"M={m}": [round(f(per_round(rounds, f"M={m}", "M=1")), 3)
                                             for f in (min, max)] for m in MICRO_BATCHES[1:]},
            "ideal_ratio": {f"M={m}": round((m + 1) / (2 * m), 3) for m in MICRO_BATCHES},
            "split_cost_pp1": {f"M={m}": round(split[m], 3) for m in MICRO_BATCHES},
            "expected_here": {f"M={m}": round(expected_ratio(m, speed) * split[m], 3)
                              for m in MICRO_BATCHES},
            "steps": sum(len(r) for r in times["M=1"][kind]),
        }
    return out


def line(m: int, s: dict) -> str:
    """One micro-batch count's figures of one step kind, as printed."""
    label = f"M={m}"
    spread = "" if m == 1 else \
        " (rounds {:.2f}-{:.2f})".format(*s["ratio_to_M1_range"][label])
    return (f"  pp 2, {m} micro-batch{'es' if m > 1 else ''}: {s['median_ms'][label]:6.1f} ms, "
            f"x{s['ratio_to_M1'][label]:.3f} of M=1{spread}; ideal x{s['ideal_ratio'][label]:.3f},"
            f" here x{s['expected_here'][label]:.3f} (two-process speed, and {m} forwards "
            f"cost pp 1 x{s['split_cost_pp1'][label]:.3f} of one)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--decode_steps", type=int, default=8)
    parser.add_argument("--output", default=str(HERE / "pipeline_overlap_results.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the driver's rank; the worker gets num_threads=1
    began, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        executors = open_engines(build_engines(Path(tmp), args))
        try:
            summary = summarize(measure(executors, args))
        finally:
            for executor in {id(e): e for e, _ in executors.values()}.values():
                executor.close()
    print(f"{summary['quiet_rounds']} of {summary['rounds']} rounds quiet (other processes "
          f"<= {QUIET:.0%} of the machine; their shares: "
          f"{', '.join(f'{x:.0%}' for x in summary['others_share_per_round'])}); figures over "
          f"{summary['rounds_used']} rounds")
    print(f"this machine: two busy processes each run at {summary['two_busy_speed']:.2f} of "
          f"one alone (median; {summary['two_busy_speed_range'][0]:.2f}-"
          f"{summary['two_busy_speed_range'][1]:.2f})")
    for kind in ("prefill", "decode"):
        s = summary[kind]
        tokens = args.sequences * (args.prompt_len if kind == "prefill" else 1)
        print(f"{kind} steps ({args.sequences} sequences, {tokens} tokens), median of "
              f"{s['steps']}: pp 1 (one process) {s['median_ms']['pp1']:.1f} ms")
        for m in MICRO_BATCHES:
            print(line(m, s))
    result = {
        "benchmark": "pipeline_overlap",
        "command": "python benchmarks/pipeline_overlap.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "output"),
        "model": {**SHAPE, "dtype": "float32", "pp_size": 2},
        "workload": {"sequences": args.sequences, "prompt_len": args.prompt_len,
                     "decode_steps": args.decode_steps, "rounds": args.rounds,
                     "threads_per_rank": 1, "device": "cpu (gloo)"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "load_average_1min_before": round(load, 2)},
        "results": summary,
        "wall_s": round(time.perf_counter() - began, 1),
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
