"""Peak memory of training, each method in its own fresh process, on the bundled MiniLM (CPU).

    python benchmarks/memory.py --scopes mlp,all --steps 3                # the table of docs/benchmarks.md §7 "Memory"
    python benchmarks/memory.py --methods lora,sparsegrad-layerwise --scopes mlp --malloc default
    python benchmarks/memory.py --table runs.jsonl          # the table of earlier runs (--jsonl runs.jsonl)
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/memory.py --trace sparsegrad --scopes mlp   # where the peak is
    python benchmarks/memory.py --w0-read      # an exact rebuild with W0 held vs re-read from the checkpoint file

Methods: full, lora, meprop, sparsegrad (dynamic), sparsegrad-fixed, and ``-layerwise`` variants of the dynamic
ones (`create_optimizer(layerwise=True)`: each layer steps in its post-accumulate-grad hook). Each child process
loads MiniLM, converts it (2 calibration batches), then trains ``--steps`` steps (forward, backward, step,
zero_grad; train mode; 16 x 128 random token ids, every row full, as `benchmarks/e2e_step.py`). Reported per method:

* ``peak RSS, training``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the steps, the high-water mark having
  been reset (``/proc/self/clear_refs`` = 5) once the method was set up, so that calibration's peak is not in it;
* ``peak RSS, process``: the same without the reset (load, calibration and training);
* ``tensors held``: bytes of the distinct storages of the model's parameters and buffers, the gradients as they are
  after the last backward, the optimizer's state (with SparseGrad's position maps and buffers) and the layers'
  journals and plans; ``bookkeeping`` is `sg.training_state_bytes`' entry of that name.

``--malloc fixed`` (default) runs the children with ``MALLOC_MMAP_THRESHOLD_=131072``, so that glibc returns every
freed tensor to the system at once and RSS follows the live tensors (with its default, adaptive threshold, freed
blocks stay in the heap and the peaks of different methods blur together); ``--malloc default`` leaves malloc alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

METHODS = ("full", "lora", "meprop", "sparsegrad", "sparsegrad-fixed", "meprop-layerwise", "sparsegrad-layerwise")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _optimizer_tensors(opt) -> list:
    """The optimizer's state tensors and, for SparseGradAdamW, its supports' position maps and buffers."""
    import torch

    tensors = [v for entry in opt.state.values() for v in entry.values() if isinstance(v, torch.Tensor)]
    for stack in getattr(opt, "_stacks", {}).values():
        tensors += [stack.pos_map.table, stack.indices, stack.slots]
    return tensors


def child(method: str, scope: str, steps: int, batch_size: int, length: int) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from e2e_step import build_model, prepare

    import sparsegrad as sg

    torch.manual_seed(0)
    layerwise = method.endswith("-layerwise")
    name = method.removesuffix("-layerwise")
    model = build_model("minilm", 2)
    loaded = _rss_mb()
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(1000, model.config.vocab_size, (batch_size, length), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch_size,),
                                                                                                   generator=g)}

    args = argparse.Namespace(density=0.01, train_scope=scope)
    model = prepare(model, name, args, batch).model.train()
    opt = sg.create_optimizer(model, lr=1e-4, layerwise=layerwise)
    process_peak = _rss_mb()
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark: the training phase alone from here
        f.write("5")
    state = None
    for step in range(steps):
        model(**batch()).loss.backward()
        if step == steps - 1:
            state = sg.training_state_bytes(model, opt)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
        opt.step()
        opt.zero_grad(set_to_none=True)
    model_bytes = _storage_bytes([*model.parameters(), *model.buffers()])
    held = _storage_bytes([*model.parameters(), *model.buffers(), *grads, *_optimizer_tensors(opt)]) + sum(
        layer.bookkeeping_bytes() for layer in sg.sparsegrad_layers(model).values())
    return {"method": method, "scope": scope, "batch": f"{batch_size}x{length}", "steps": steps,
            "rss_after_load_mb": round(loaded, 1), "peak_rss_process_mb": round(max(process_peak, _rss_mb()), 1),
            "peak_rss_training_mb": round(_rss_mb(), 1), "model_tensor_bytes": model_bytes,
            "train_state": state, "tensors_held_bytes": held,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "loadavg": os.getloadavg()}


def _status_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process, MiB."""
    found = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            found[key] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["VmHWM"]


def trace(method: str, scope: str, steps: int, batch_size: int, length: int) -> None:
    """Where the peak is: RSS and its high-water mark at every encoder block's forward and backward hook (and around
    the step) of the last step, in this process; "PEAK" where the high-water mark rose since the previous mark."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from e2e_step import build_model, prepare

    import sparsegrad as sg

    torch.manual_seed(0)
    model = build_model("minilm", 2)
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(1000, model.config.vocab_size, (batch_size, length), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (batch_size,), generator=g)}

    name = method.removesuffix("-layerwise")
    model = prepare(model, name, argparse.Namespace(density=0.01, train_scope=scope), batch).model.train()
    opt = sg.create_optimizer(model, lr=1e-4, layerwise=method.endswith("-layerwise"))
    marks, high = [], [0.0]

    def mark(tag):
        rss, hwm = _status_mb()
        marks.append(f"{tag}\t{rss:.1f}\t{hwm:.1f}\t{'PEAK' if hwm > high[0] + 0.5 else ''}")
        high[0] = hwm
    for i, block in enumerate(model.bert.encoder.layer):
        block.register_forward_hook(lambda *_, i=i: mark(f"forward block {i}"))
        block.register_full_backward_hook(lambda *_, i=i: mark(f"backward block {i}"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(steps):
        marks.clear()
        mark("step start")
        loss = model(**batch()).loss
        mark("forward done")
        loss.backward()
        mark("backward done")
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
        mark("step done")
    print(f"{method}, scope {scope}, last of {steps} steps: mark, RSS (MiB), high-water mark (MiB)")
    print("\n".join(marks))


def w0_read_time(rounds: int = 30) -> None:
    """Exact rebuild of one MiniLM MLP matrix with W0 held vs re-read from the checkpoint file (`FileBase`),
    interleaved in this process, and the read alone: medians, ms."""
    import copy
    import statistics
    import time

    import torch

    import sparsegrad as sg
    from sparsegrad.finetune.models import load_classifier

    model, _ = load_classifier("minilm", 2)
    cfg = sg.SparseGradConfig(density=0.01)
    bases = sg.identity_bases(model, cfg)
    held = copy.deepcopy(model)
    held.config._name_or_path = ""  # as a model built in memory: W0 held
    sg.get_sparsegrad_model(model, cfg, bases)
    sg.get_sparsegrad_model(held, cfg, bases)
    name = "bert.encoder.layer.0.intermediate.dense"
    a, b = sg.sparsegrad_layers(model)[name], sg.sparsegrad_layers(held)[name]
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(a.out_features * a.in_features, generator=g)[:a.k].sort().values.to(a.index_dtype)
    vals = torch.randn(a.k, generator=g)
    for layer in (a, b):
        layer._buffers["delta_indices"], layer._buffers["delta_values"] = idx.clone(), vals.clone()
    times: dict[str, list[float]] = {"file": [], "held": [], "read": []}
    for _ in range(rounds):
        for key, run in (("file", a._rebuild), ("held", b._rebuild),
                         ("read", lambda: a._file_base.read(a.weight.device, a.weight.dtype))):
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)
    assert torch.equal(a.weight, b.weight) and a._file_base is not None and b._file_base is None
    print(json.dumps({f"{k}_ms": round(1e3 * statistics.median(v), 2) for k, v in times.items()}
                     | {"shape": [a.out_features, a.in_features], "loadavg": os.getloadavg()}))


def table(rows: list[dict]) -> None:
    print("| scope | method | peak RSS, training (MB) | / LoRA | peak RSS, process (MB) | / LoRA | tensors held (MB) "
          "| / LoRA | of which bookkeeping (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lora = next((x for x in rows if x["scope"] == r["scope"] and x["method"] == "lora"), None)

        def ratio(key):
            return f"{r[key] / lora[key]:.3f}" if lora else "-"
        print(f"| {r['scope']} | {r['method']} | {r['peak_rss_training_mb']:.0f} | {ratio('peak_rss_training_mb')} | "
              f"{r['peak_rss_process_mb']:.0f} | {ratio('peak_rss_process_mb')} | "
              f"{r['tensors_held_bytes'] / 2**20:.1f} | {ratio('tensors_held_bytes')} | {r['train_state'].get('bookkeeping', 0) / 2**20:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--scopes", default="mlp,all")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--malloc", choices=("fixed", "default"), default="fixed")
    p.add_argument("--jsonl", help="also append each child's JSON line here")
    p.add_argument("--table", metavar="JSONL", help="print the table of earlier runs' JSON lines (the last run of each "
                                                    "method and scope), and stop")
    p.add_argument("--trace", metavar="METHOD", help="print RSS at every block's forward and backward hook of "
                                                    "the last step of METHOD (first of --scopes), here, and stop")
    p.add_argument("--w0-read", action="store_true", help="time an exact rebuild with W0 held vs re-read from the "
                                                          "checkpoint file, and stop")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "SCOPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trace:
        trace(args.trace, args.scopes.split(",")[0], args.steps, args.batch_size, args.length)
        return
    if args.w0_read:
        w0_read_time()
        return
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.batch_size, args.length)))
        return
    if args.table:
        latest = {}
        for line in open(args.table):
            if line.strip():
                row = json.loads(line)
                latest[(row["scope"], row["method"])] = row
        table(sorted(latest.values(), key=lambda r: (r["scope"] != "mlp", METHODS.index(r["method"]))))
        return
    env = dict(os.environ)
    if args.malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    rows = []
    for scope in args.scopes.split(","):
        for method in args.methods.split(","):
            if method.removesuffix("-layerwise") not in METHODS:
                raise SystemExit(f"memory.py: error: unknown method {method!r} (choose from {', '.join(METHODS)})")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", method, scope, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--length", str(args.length)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"memory.py: error: {method} ({scope}) failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(f"MiniLM (bundled), CPU, batch {args.batch_size}x{args.length}, {args.steps} steps per process, malloc "
          f"{'MALLOC_MMAP_THRESHOLD_=131072' if args.malloc == 'fixed' else 'default'}")
    table(rows)


if __name__ == "__main__":
    main()
