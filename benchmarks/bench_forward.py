"""SSD300-ResNet50 inference forward on CPU: images/s and achieved GFLOP/s vs. the matmul peak.

    .venv/bin/python benchmarks/bench_forward.py [--batch-size 8] [--iterations 3] [--compile]

FLOPs are counted once with torch.utils.flop_counter.FlopCounterMode: 2 x multiply-accumulates of
every convolution (BatchNorm, ReLU, additions and the output reshapes are not counted; they are
<1% of the work). The dense-matmul peak (fp32 and bf16, square matmuls) is measured in the same
process, interleaved with the model runs, so that the ratios hold even when the load drifts.

Variants: eager fp32 (NCHW), fp32 channels-last, bf16 autocast channels-last, each of the last two
with BatchNorm folded into the convolutions (``SSD300.fuse()``), TorchScript freeze +
optimize_for_inference (oneDNN layouts), and with ``--compile`` torch.compile with inductor's
freezing (about 40-100 s to compile on 2 cores).
On CPUs without native bf16 (no AVX512-BF16/AMX) bf16 is emulated and very slow: those rows then
run at batch 1 (and say so) to keep the script within a few minutes.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import time_interleaved  # noqa: E402
from ssd300.model import SSD300  # noqa: E402
from ssd300.runtime import Runtime  # noqa: E402

CL = torch.channels_last


@dataclass
class Row:
    name: str
    dtype: str
    batch: int
    seconds: float  # median per batch
    note: str = ""


def matmul_probe(dtype: torch.dtype, n: int) -> Callable[[], object]:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    return lambda: torch.mm(a, b)


def count_gflop_per_image(model: torch.nn.Module) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 300, 300))
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=3, help="timed rounds (median), after one warm-up")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = SSD300("resnet50", num_classes=81).eval()
    gflop = count_gflop_per_image(model)
    policy = Runtime.resolve("cpu", amp=True)
    bf16_native = policy.native_bf16
    bf16_batch = args.batch_size if bf16_native else 1

    print(f"torch {torch.__version__}; the commands' policy here: {policy.describe()}")
    print(f"one forward (1 image): {gflop:.2f} GFLOP (2 x conv MACs, FlopCounterMode)")

    model_cl = copy.deepcopy(model).to(memory_format=CL)
    fused_cl = model.fuse().to(memory_format=CL)

    def images(batch: int, channels_last: bool) -> torch.Tensor:
        x = torch.randn(batch, 3, 300, 300)
        return x.contiguous(memory_format=CL) if channels_last else x

    def run(net: torch.nn.Module, x: torch.Tensor, bf16: bool) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return net(x)
        return call

    bf16_note = "" if bf16_native else "bf16 emulated: batch 1"
    variants: list[tuple[str, str, int, Callable[[], object], str]] = [
        ("eager NCHW", "fp32", args.batch_size, run(model, images(args.batch_size, False), False), ""),
        ("eager channels-last", "fp32", args.batch_size, run(model_cl, images(args.batch_size, True), False), ""),
        ("eager channels-last", "bf16", bf16_batch, run(model_cl, images(bf16_batch, True), True), bf16_note),
        ("BN folded, channels-last", "fp32", args.batch_size, run(fused_cl, images(args.batch_size, True), False), ""),
        ("BN folded, channels-last", "bf16", bf16_batch, run(fused_cl, images(bf16_batch, True), True), bf16_note),
    ]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the simplest prepacking
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(model.fuse().to(memory_format=CL))))
    variants.append(("TorchScript freeze + optimize_for_inference", "fp32", args.batch_size,
                     run(frozen, images(args.batch_size, True), False), "prepacked oneDNN weights"))
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-fold weights, prepack them for oneDNN
        start = time.perf_counter()
        compiled = torch.compile(model.fuse().to(memory_format=CL))
        with torch.no_grad():
            compiled(images(args.batch_size, True))
        variants.append(("torch.compile (freezing), BN folded, channels-last", "fp32", args.batch_size,
                         run(compiled, images(args.batch_size, True), False),
                         f"compile {time.perf_counter() - start:.0f} s"))

    # Emulated bf16 matmul runs at well under 1 GFLOP/s: a small n keeps it to about a second.
    matmul_n = {"fp32": 2048, "bf16": 2048 if bf16_native else 512}
    probes = {f"matmul {d}": matmul_probe(dt, matmul_n[d])
              for d, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    calls = {f"{name} {dtype}": fn for name, dtype, _, fn, _ in variants} | probes
    # Interleaved (round-robin after one warm-up each): the ratios hold when the machine's load drifts.
    seconds = {name: timing.median for name, timing in time_interleaved(calls, args.iterations).items()}
    peak = {d: 2 * matmul_n[d] ** 3 / seconds[f"matmul {d}"] / 1e9 for d in matmul_n}
    rows = [Row(name, dtype, batch, seconds[f"{name} {dtype}"], note) for name, dtype, batch, _, note in variants]

    base = rows[0].batch / rows[0].seconds
    print()
    print("| variant | dtype | batch | images/s | GFLOP/s | % of matmul peak | vs fp32 NCHW | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ips = r.batch / r.seconds
        achieved = ips * gflop
        print(f"| {r.name} | {r.dtype} | {r.batch} | {ips:.2f} | {achieved:.1f} | "
              f"{100 * achieved / peak[r.dtype]:.0f}% | {ips / base:.2f}x | {r.note} |")
    print()
    print("| dense matmul peak (same run) | GFLOP/s | n x n |")
    print("|---|---|---|")
    for dtype, gflops in peak.items():
        print(f"| {dtype} | {gflops:.1f} | {matmul_n[dtype]} |")


if __name__ == "__main__":
    main()
