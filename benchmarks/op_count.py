"""Aten ops and host syncs of ONE optimizer step on the converted real MiniLM, per SparseGrad matrix and per step.

    python benchmarks/op_count.py                      # full, meprop, sparsegrad (dynamic), sparsegrad-fixed
    python benchmarks/op_count.py --methods sparsegrad --batch-size 4 --length 64

"One step" is ``opt.step()`` followed by the weight rebuild each SparseGrad layer's next forward makes
(``_forward_sync``: a fixed-support layer rebuilds there; a dynamic one updated its weight inside the step), traced by torch.profiler on the
CPU after ``--warmup`` steps (so the dynamic support has grown). Counted:

* ``aten ops``: top-level ``aten::*`` events (an aten op called by another aten op is not counted again), and
  ``kernel ops``: the same without views, metadata and dtype no-ops (`VIEW_OPS`), which launch no GPU kernel;
* ``syncs``: events that make a device wait for the host to read a value: ``aten::_local_scalar_dense``
  (``.item()``, ``bool()``, ``int()`` of a tensor) and the ops whose output size depends on the data
  (``nonzero``, ``unique``, boolean-mask indexing), all counted at any depth;
* ``dense AdamW``: the same counts inside torch's AdamW step (every parameter that is not a dynamic SparseGrad
  weight: biases, head, and the fixed mode's ``delta_values``); its syncs are reads of the CPU step counters
  (``_get_value(step)``), which do not stall a GPU.

"per matrix" divides the SparseGrad part (the step outside dense AdamW, plus the rebuilds) by the number of
SparseGrad matrices.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

import sparsegrad as sg
from sparsegrad.finetune.methods import prepare_method
from sparsegrad.finetune.models import load_classifier

SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
            "aten::unique_consecutive", "aten::masked_select", "aten::nonzero_static",
            "sparsegrad::host_read"}  # SparseGradAdamW's one read of a small tensor (tolist: no aten event on CPU)
DENSE_STEP = "dense_adamw"
# ops that launch no kernel (views, metadata, dtype no-ops): counted apart as "view ops"
VIEW_OPS = {"aten::slice", "aten::select", "aten::t", "aten::numpy_T", "aten::reshape", "aten::view",
            "aten::as_strided", "aten::expand", "aten::squeeze", "aten::unsqueeze", "aten::permute",
            "aten::transpose", "aten::alias", "aten::detach", "aten::resolve_conj", "aten::resolve_neg",
            "aten::lift_fresh", "aten::sparse_compressed_tensor", "aten::split_with_sizes", "aten::split"}


def _mark_dense_adamw() -> None:
    """Wrap torch's AdamW.step (what SparseGradAdamW.step calls for the dense parameters) in a profiler range."""
    inner = torch.optim.AdamW.step
    if getattr(inner, "_op_count_marked", False):
        return

    def step(self, *args, **kwargs):
        with torch.profiler.record_function(DENSE_STEP):
            return inner(self, *args, **kwargs)

    step._op_count_marked = True
    torch.optim.AdamW.step = step


def _count(events) -> dict[str, int]:
    """Top-level aten ops and syncs (any depth) among ``events``, split into dense AdamW and the rest."""
    counts = {"aten_ops": 0, "syncs": 0, "dense_aten_ops": 0, "dense_syncs": 0, "view_ops": 0, "dense_view_ops": 0}
    for ev in events:
        if not ev.name.startswith("aten::") and ev.name not in SYNC_OPS:
            continue
        ancestors, parent = [], ev.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        top = not any(a.startswith("aten::") for a in ancestors)
        dense = DENSE_STEP in ancestors
        prefix = "dense_" if dense else ""
        if top and ev.name.startswith("aten::"):
            counts[prefix + "aten_ops"] += 1
            noop_to = ev.name == "aten::to" and not ev.cpu_children
            if ev.name in VIEW_OPS or noop_to:
                counts[prefix + "view_ops"] += 1
        if ev.name in SYNC_OPS:
            counts[prefix + "syncs"] += 1
    return counts


def count_step(method: str, batch_size: int, length: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = load_classifier("minilm", 2)[0]
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(1000, vocab, (batch_size, length), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch_size,), generator=g)}

    base = "sparsegrad" if method == "sparsegrad-fixed" else method
    support = "fixed" if method == "sparsegrad-fixed" else "dynamic"
    prepared = prepare_method(model, base, density=0.01, support=support, train_scope="mlp",
                              calibration_batches=[batch() for _ in range(2)], calibration_steps=2)
    model = prepared.model.train()  # as training runs (eval-mode forwards rebuild SparseGrad weights exactly)
    opt = sg.create_optimizer(model, lr=1e-4)
    layers = list(sg.sparsegrad_layers(model).values())
    _mark_dense_adamw()
    for _ in range(warmup + 1):
        opt.zero_grad(set_to_none=True)
        model(**batch()).loss.backward()
        if _ < warmup:
            opt.step()
            for layer in layers:
                layer._forward_sync()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("one_step"):
            opt.step()
            for layer in layers:
                layer._forward_sync()
    counts = _count(prof.events())
    n = max(1, len(layers))
    return {"method": method, "batch": f"{batch_size}x{length}", "sparsegrad_matrices": len(layers),
            "step_aten_ops": counts["aten_ops"] + counts["dense_aten_ops"],
            "step_syncs": counts["syncs"] + counts["dense_syncs"],
            "sparse_aten_ops_per_matrix": round(counts["aten_ops"] / n, 1) if layers else None,
            "sparse_kernel_ops_per_matrix": round((counts["aten_ops"] - counts["view_ops"]) / n, 1) if layers else None,
            "sparse_syncs": counts["syncs"],
            "dense_adamw_aten_ops": counts["dense_aten_ops"],
            "dense_adamw_kernel_ops": counts["dense_aten_ops"] - counts["dense_view_ops"],
            "dense_adamw_syncs": counts["dense_syncs"],
            "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,meprop,sparsegrad,sparsegrad-fixed")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    for m in args.methods.split(","):
        print(json.dumps(count_step(m, args.batch_size, args.length, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
