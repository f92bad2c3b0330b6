"""Does batching the gradient rotations of one kind pay? u_outᵀ G_l u_in for the L blocks of a kind, as a loop of
matrix products (what `SparseGradAdamW` does) against one batched product over the stacked gradients.

    python benchmarks/rotation_batching.py --shape 1536x384 --blocks 6 --threads 1
    python benchmarks/rotation_batching.py --shape 3072x768 --blocks 12 --threads 2

Rounds are interleaved; medians are reported with the ratio to the loop. The FLOPs are the same; only the
matrix-product calls differ (L pairs against 2), plus the copy that stacks the gradients.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1536x384", help="OUTxIN of one matrix")
    p.add_argument("--blocks", type=int, default=6, help="matrices of the kind (one per block)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_f, in_f = (int(v) for v in args.shape.lower().split("x"))
    g = torch.Generator().manual_seed(0)
    u_out = torch.linalg.qr(torch.randn(out_f, out_f, generator=g))[0]
    u_in = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))[0]
    grads = [torch.randn(out_f, in_f, generator=g) for _ in range(args.blocks)]
    stacked = torch.stack(grads)
    variants = {
        "loop of products (as the optimizer does)": lambda: [u_out.T @ x @ u_in for x in grads],
        "one batched product, stacking included": lambda: torch.matmul(torch.matmul(u_out.T, torch.stack(grads)), u_in),
        "one batched product, already stacked": lambda: torch.matmul(torch.matmul(u_out.T, stacked), u_in),
    }
    ref = torch.stack(variants["loop of products (as the optimizer does)"]())
    torch.testing.assert_close(variants["one batched product, already stacked"](), ref, rtol=1e-4, atol=1e-4)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["loop of products (as the optimizer does)"])
    print(f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.blocks} x {out_f}x{in_f}, "
          f"{args.rounds} interleaved rounds, medians")
    print("| variant | median (ms) | / loop |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {1000 * statistics.median(ts):.1f} | {statistics.median(ts) / base:.2f} |")


if __name__ == "__main__":
    main()
