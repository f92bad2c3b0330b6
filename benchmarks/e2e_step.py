"""End-to-end training step of a BERT classifier for one method, in this process (run one method per process so
that peak memory is honest): median step time, steps/s, peak memory, exact training-state bytes.

    python benchmarks/e2e_step.py --method sparsegrad --model minilm --batch-size 16 --length 128
    python benchmarks/e2e_step.py --method lora --model bert-base --device cuda      # random-init BERT-base
    python benchmarks/e2e_step.py --table runs.jsonl     # markdown table of such JSON lines, ratios per scope
    for m in full lora meprop sparsegrad sparsegrad-fixed; do python benchmarks/e2e_step.py --method $m; done
    python benchmarks/e2e_step.py --interleave full,lora,meprop,sparsegrad,sparsegrad-fixed --steps 7   # time ratios
    python benchmarks/e2e_step.py --interleave full,meprop,sparsegrad --threads 1 --cpu-time    # the work, per phase
    python benchmarks/e2e_step.py --interleave full,meprop --threads 1 --cpu-time --step-only --steps 21   # the step

``--interleave``: every method's model in this one process, timed round by round (each round runs one step of
each method on the same batch, in train mode); prints each method's median of the per-round ratios to full, the
median step, each phase's median (forward, backward, optimizer step, zero_grad; in units of full's median step)
and the load average (no memory: run one method per process for that). ``--threads 1 --cpu-time`` times the
thread's CPU time instead of wall time: on a shared machine that measures the work, not the waits.

Models run in train mode (dropout on, as in training). Peak memory: `torch.cuda.max_memory_allocated` on CUDA, peak RSS (ru_maxrss) on CPU. Tokens are random ids (time
and memory do not depend on the text), every row full length (no padding). Scope `mlp` unless --train-scope all.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

import sparsegrad as sg
from sparsegrad.finetune.methods import prepare_method


def build_model(name: str, num_labels: int):
    from transformers import BertConfig, BertForSequenceClassification

    if name in ("bert-base", "tiny"):  # random init: time and memory only ("tiny": a smoke test of this script)
        cfg = BertConfig(num_labels=num_labels) if name == "bert-base" else BertConfig(
            num_labels=num_labels, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, vocab_size=2000)
        torch.manual_seed(0)
        return BertForSequenceClassification(cfg)
    from sparsegrad.finetune.models import load_classifier

    return load_classifier(name, num_labels)[0]


def table(path: str) -> None:
    """Markdown table of e2e_step JSON lines: per scope, each method's steps/s and peak memory, with ratios to full
    fine-tuning and to LoRA of the same scope."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    good = [r for r in rows if "error" not in r]
    if good:
        r0 = good[0]
        print(f"{r0['device_name']}, {r0['model']}, batch {r0['batch']}, peak memory = {r0['peak_memory_kind']}")
    print("| scope | method | steps/s | step / full | step / LoRA | peak memory (MB) | / full | / LoRA "
          "| training state (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['scope']} | {r['method']} | {r['error']} | | | | | | |")
            continue
        ref = {m["method"]: m for m in good if (m["scope"], m.get("tf32")) == (r["scope"], r.get("tf32"))}
        full, lora = ref.get("full"), ref.get("lora")

        def ratio(key, other):
            return f"{r[key] / other[key]:.2f}" if other else "-"
        name = r["method"] + (" (TF32)" if r.get("tf32") else "")
        print(f"| {r['scope']} | {name} | {r['steps_per_s']:.2f} | {ratio('median_step_s', full)} | "
              f"{ratio('median_step_s', lora)} | {r['peak_memory_mb']:.0f} | {ratio('peak_memory_mb', full)} | "
              f"{ratio('peak_memory_mb', lora)} | {r['train_state_bytes'] / 2**20:.1f} |")


def timed_step(model, opt, b, device, before_step=None):
    """(seconds of one forward + backward + optimizer step + zero_grad, what ``before_step`` returned) (called between backward and step, inside the timing, as this script always did)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(**b).loss.backward()
    extra = before_step() if before_step is not None else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, extra


def prepare(model, name: str, args, batch):
    method = "sparsegrad" if name == "sparsegrad-fixed" else name
    support = "fixed" if name == "sparsegrad-fixed" else "dynamic"
    return prepare_method(model, method, density=args.density, support=support, train_scope=args.train_scope,
                          calibration_batches=[batch() for _ in range(2)], calibration_steps=2)


PHASES = ("forward", "backward", "step", "zero_grad")


def phased_step(model, opt, b, clock) -> dict[str, float]:
    """One training step's phases, timed by ``clock``: forward (a fixed support's rebuild included), backward,
    optimizer step, zero_grad."""
    t0 = clock()
    loss = model(**b).loss
    t1 = clock()
    loss.backward()
    t2 = clock()
    opt.step()
    t3 = clock()
    opt.zero_grad(set_to_none=True)
    t4 = clock()
    return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)))


def interleaved(args, batch, device) -> None:
    import os

    names = args.interleave.split(",")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    runs = {}
    for name in names:
        model = prepare(build_model(args.model, 2).to(device), name, args, batch).model.train()
        runs[name] = (model, sg.create_optimizer(model, lr=1e-4), [])
    for rnd in range(args.warmup + args.steps):
        b = batch()
        for model, opt, rounds in runs.values():
            if device.type == "cuda":
                torch.cuda.synchronize()
            phases = phased_step(model, opt, b, clock)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rnd >= args.warmup:
                rounds.append(phases)
    ref = [sum(r.values()) for r in runs[names[0]][2]]
    unit = statistics.median(ref)
    for name, (_, _, rounds) in runs.items():
        times = [sum(r.values()) for r in rounds]
        ratios = [t / r for t, r in zip(times, ref)]
        # each phase's median in units of the reference method's median step (they need not add up to the ratio)
        phases = {p: round(statistics.median(r[p] for r in rounds) / unit, 3) for p in PHASES}
        print(json.dumps({"method": name, "vs": names[0], "median_ratio": round(statistics.median(ratios), 3),
                          "ratios": [round(r, 2) for r in ratios], "median_step_s": round(statistics.median(times), 3),
                          "phases_of_ref_step": phases, "clock": "thread CPU" if args.cpu_time else "wall",
                          "threads": torch.get_num_threads(), "batch": f"{args.batch_size}x{args.length}",
                          "scope": args.train_scope, "loadavg": os.getloadavg()}))


def step_only(args, batch, device) -> None:
    """``--interleave ... --step-only``: each method's optimizer step alone, on the same real gradients every round
    (one backward after the warm-up steps, its gradients restored before each timed step; a SparseGrad layer's
    rebuild at its next forward counted as step), so that the step's cost stands out of the forward and backward's
    noise. Prints each method's median step (ms, this thread's CPU time with --cpu-time) and the median of its
    per-round difference to the first method's."""
    import os

    names = args.interleave.split(",")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    b, runs = batch(), {}
    for name in names:
        model = prepare(build_model(args.model, 2).to(device), name, args, batch).model.train()
        opt = sg.create_optimizer(model, lr=1e-4)
        for _ in range(args.warmup):
            phased_step(model, opt, b, clock)
        model(**b).loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        runs[name] = (model, opt, params, [p.grad.clone() for p in params], list(sg.sparsegrad_layers(model).values()), [])
    for _ in range(args.steps):
        for model, opt, params, grads, layers, times in runs.values():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            t0 = clock()
            opt.step()
            for layer in layers:
                layer._forward_sync()
            times.append(clock() - t0)
            opt.zero_grad(set_to_none=True)
    ref = runs[names[0]][-1]
    for name, run in runs.items():
        times = run[-1]
        print(json.dumps({"method": name, "median_step_ms": round(1e3 * statistics.median(times), 2),
                          "median_excess_ms_vs": names[0],
                          "median_excess_ms": round(1e3 * statistics.median(t - r for t, r in zip(times, ref)), 2),
                          "clock": "thread CPU" if args.cpu_time else "wall", "threads": torch.get_num_threads(),
                          "rounds": args.steps, "loadavg": os.getloadavg()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="sparsegrad",
                   choices=["full", "lora", "meprop", "sparsegrad", "sparsegrad-fixed"])
    p.add_argument("--model", default="minilm", help="minilm (bundled), bert-base (random init), or a local dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--train-scope", default="mlp", choices=["mlp", "all"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tf32", action="store_true", help="let CUDA matmuls use TF32 (every method's, bases too)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of 3 steps")
    p.add_argument("--table", metavar="JSONL", help="print the markdown table of earlier runs' JSON lines, and stop")
    p.add_argument("--interleave", metavar="METHODS", help="comma-separated methods timed in interleaved rounds")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true", help="--interleave: time by this thread's CPU time (with "
                   "--threads 1: the work itself, steady on a shared machine) instead of wall time")
    p.add_argument("--step-only", action="store_true", help="--interleave: time the optimizer step alone on the "
                   "same real gradients each round (the step's cost apart from the forward and backward)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        table(args.table)
        return
    device = torch.device(args.device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(args.model, 2).to(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(1000, vocab, (args.batch_size, args.length), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "labels": torch.randint(0, 2, (args.batch_size,), generator=g).to(device)}

    if args.interleave:
        (step_only if args.step_only else interleaved)(args, batch, device)
        return

    prepared = prepare(model, args.method, args, batch)
    model = prepared.model.train()  # as training runs (dropout on; SparseGrad's eval-mode forwards rebuild exactly)
    opt = sg.create_optimizer(model, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, state = [], None
    for step in range(args.warmup + args.steps):
        last = step == args.warmup + args.steps - 1
        elapsed, measured = timed_step(model, opt, batch(), device,
                                       before_step=(lambda: sg.training_state_bytes(model, opt)) if last else None)
        state = measured if last else state
        if step >= args.warmup:
            times.append(elapsed)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                model(**batch()).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=48), flush=True)
    med = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"method": args.method, "model": args.model, "device": str(device),
                      "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "batch": f"{args.batch_size}x{args.length}", "scope": args.train_scope,
                      "median_step_s": round(med, 4), "steps_per_s": round(1 / med, 3),
                      "peak_memory_mb": round(peak, 1), "tf32": args.tf32,
                      "peak_memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss",
                      "train_state_bytes": state["total"], "k": prepared.k, "lora_rank": prepared.lora_rank}))


if __name__ == "__main__":
    main()
