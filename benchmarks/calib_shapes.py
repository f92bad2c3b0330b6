"""Calibration cost at a given matrix shape: streaming Gram matrices + eigh (sparsegrad) vs the stacked HOSVD (SVD of
the steps x out x in tensor's two mode unfoldings, as the paper's code does), on synthetic gradients.

Each mode runs in its own process so that peak memory is honest. The gradients are random low-rank-plus-noise
matrices made on the device (their making is timed alone as the "gradients only" row and is inside both modes).

    python benchmarks/calib_shapes.py --shape 11008x4096 --slices 120 --device cuda     # LLaMA-2-7B up_proj
    python benchmarks/calib_shapes.py --shape 3072x768 --slices 132 --device cuda       # BERT-base, 11 steps x 12

Peak memory: `torch.cuda.max_memory_allocated` on CUDA, peak RSS on CPU. The paper (Limitations) quotes 276 MB and
78 s for BERT and 5.2 GB and 668 s for LLaMA-2 7B for the stacked tensor.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from sparsegrad.bases import factors_from_gram


def gradient(i: int, out_f: int, in_f: int, rank: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(i)
    a = torch.randn(out_f, rank, generator=g, device=device)
    b = torch.randn(rank, in_f, generator=g, device=device)
    return a @ b + 0.1 * torch.randn(out_f, in_f, generator=g, device=device)


def worker(mode: str, out_f: int, in_f: int, slices: int, rank: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.zeros(1, device=device)
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    if mode == "gradients":
        for i in range(slices):
            gradient(i, out_f, in_f, rank, device)
    elif mode == "streaming":
        gram_out = torch.zeros(out_f, out_f, device=device)
        gram_in = torch.zeros(in_f, in_f, device=device)
        for i in range(slices):
            g = gradient(i, out_f, in_f, rank, device)
            gram_out.addmm_(g, g.T)
            gram_in.addmm_(g.T, g)
        factors_from_gram(gram_out)
        factors_from_gram(gram_in)
    elif mode == "stacked":
        t = torch.stack([gradient(i, out_f, in_f, rank, device) for i in range(slices)])
        torch.linalg.svd(t.permute(1, 0, 2).reshape(out_f, slices * in_f), full_matrices=False)
        torch.linalg.svd(t.permute(2, 0, 1).reshape(in_f, slices * out_f), full_matrices=False)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    sync()
    elapsed = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"mode": mode, "time_s": round(elapsed, 2), "peak_mb": round(peak, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1536x384", help="OUTxIN of one matrix (nn.Linear weight shape)")
    p.add_argument("--slices", type=int, default=12, help="gradient slices: calibration steps x blocks of the kind")
    p.add_argument("--rank", type=int, default=32, help="rank of the synthetic gradients' low-rank part")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default="gradients,streaming,stacked")
    p.add_argument("--timeout", type=float, default=None, help="seconds per mode; a mode over it is reported so")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out_f, in_f = (int(v) for v in args.shape.lower().split("x"))
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(worker(args.worker, out_f, in_f, args.slices, args.rank, device)))
        return
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    stack_mb = args.slices * out_f * in_f * 4 / 2**20
    gram_mb = (out_f**2 + in_f**2) * 4 / 2**20
    print(f"{where}, torch {torch.__version__}; {out_f}x{in_f}, {args.slices} slices, fp32: stacked tensor "
          f"{stack_mb:.0f} MB vs Gram matrices {gram_mb:.0f} MB ({stack_mb / gram_mb:.1f}x)")
    print("| calibration | time (s) | peak memory (MB) |")
    print("|---|---|---|")
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--worker", mode, "--shape", args.shape, "--slices", str(args.slices),
               "--rank", str(args.rank), "--device", args.device]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"| {mode} | > {args.timeout:.0f} (stopped) | - |", flush=True)
            continue
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"| {mode} | failed: {last[:120]} | - |", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {mode} | {row['time_s']:.2f} | {row['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
