"""The fixed support's gradient, route by route: the block routes SparseGrad used before issue 13 against the
chain cuts of `sparsegrad.support_gradient` (one-sided products, then k sampled dot products).

    python benchmarks/support_gradient.py --real --rounds 7           # real MiniLM: its 12 MLP matrices, BBC 16x128
    python benchmarks/support_gradient.py --shapes 3072x768,768x3072 --tokens 4096 --rounds 5   # random bases
    python benchmarks/support_gradient.py --e2e --rounds 7     # whole fixed-mode MiniLM steps: old route vs now

``--real``: the bundled MiniLM converted with a calibrated fixed support (scope mlp, 1 % per matrix); each MLP
matrix's (x, gy) is captured from one real BBC batch's backward. Otherwise random orthogonal bases and a random
support (which touches every row and column: the block routes' worst case). Rounds are interleaved (each round
times every route of every matrix once); the table gives per shape the median time of each route summed over the
matrices of that shape, the median of per-round ratios to the old block route the library chose, the route the
cost model picks, and each route's largest error against a float64 reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sparsegrad.support_gradient import SupportGradient


def old_block_route(x, gy, plan: SupportGradient, via: str, local: torch.Tensor):
    """The pre-issue-13 library's routes: the whole |R| x |C| block of the rotated gradient, then the k entries
    (``local``: each entry's flat position in the block)."""
    left, right = plan.u_out[:, plan.urows], plan.u_in[:, plan.ucols]
    if via == "tokens":
        block = (gy @ left).T @ (x @ right)
    else:
        block = left.T @ ((gy.T @ x) @ right)
    return block.reshape(-1)[local]


def old_choice(n: int, plan: SupportGradient) -> str:
    o, i = plan.shape
    nr, nc = plan.urows.numel(), plan.ucols.numel()
    return "tokens" if n * (o * nr + i * nc + nr * nc) < n * o * i + o * nc * (i + nr) else "G"


def routes(plan: SupportGradient, n: int) -> dict:
    chosen = old_choice(n, plan)
    _, _, inv_r, inv_c = plan.coordinates()
    local = inv_r * plan.ucols.numel() + inv_c
    table = {"before: block via " + chosen + " (library's choice)":
             lambda x, gy: old_block_route(x, gy, plan, chosen, local)}
    other = "G" if chosen == "tokens" else "tokens"
    table["before: block via " + other] = lambda x, gy: old_block_route(x, gy, plan, other, local)
    for name in SupportGradient.ROUTES:
        table[name] = (lambda r: lambda x, gy: plan(x, gy, r))(name)
    table[PICK] = lambda x, gy: plan(x, gy)
    return table


PICK = "now: the cost model's route per matrix"


def real_fixed_model():
    """The bundled MiniLM with a calibrated 1 % fixed support (scope mlp), and BBC batches of 16 x 128."""
    from transformers import AutoTokenizer

    from sparsegrad.finetune.data import load_task
    from sparsegrad.finetune.methods import prepare_method
    from sparsegrad.finetune.models import load_classifier, minilm_dir

    torch.manual_seed(0)
    data = load_task("bbc", max_train=128, max_eval=8)
    model, _ = load_classifier("minilm", 5)
    tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)

    def batch(j):
        enc = tok(data.train_texts[16 * j:16 * (j + 1)], truncation=True, max_length=128, padding="max_length",
                  return_tensors="pt")
        return {**enc, "labels": torch.tensor(data.train_labels[16 * j:16 * (j + 1)])}

    model.train()
    prepared = prepare_method(model, "sparsegrad", density=0.01, support="fixed", train_scope="mlp",
                              calibration_batches=[batch(0), batch(1)], calibration_steps=2)
    return prepared.model, batch


def real_cases(args) -> list[tuple[str, torch.Tensor, torch.Tensor, SupportGradient]]:
    import sparsegrad as sg

    model, batch = real_fixed_model()
    captured = {}
    for name, layer in sg.sparsegrad_layers(model).items():
        def grab(x, gy, name=name, layer=layer):
            captured[name] = (x.float().clone(), gy.float().clone(), layer)
            return torch.zeros(layer.k)
        layer._support_gradient = grab
    model(**batch(2)).loss.backward()
    cases = []
    for name, (x, gy, layer) in captured.items():
        plan = SupportGradient(layer.delta_indices, layer.u_out, layer.u_in, (layer.out_features, layer.in_features))
        cases.append((f"{layer.out_features}x{layer.in_features}", x, gy, plan))
    return cases


def random_cases(args) -> list:
    cases = []
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        o, i = (int(v) for v in shape.split("x"))
        u_out = torch.linalg.qr(torch.randn(o, o, generator=g))[0]
        u_in = torch.linalg.qr(torch.randn(i, i, generator=g))[0]
        for n in (int(t) for t in args.tokens.split(",")):
            k = round(args.density * o * i)
            idx = torch.randperm(o * i, generator=g)[:k].sort().values.to(torch.int32)
            x, gy = torch.randn(n, i, generator=g), torch.randn(n, o, generator=g)
            cases.append((f"{o}x{i}, {n} tokens", x, gy, SupportGradient(idx, u_out, u_in, (o, i))))
    return cases


def end_to_end(args) -> None:
    """Whole training steps of two copies of the fixed-mode MiniLM, one with the old block route patched in,
    interleaved on the same batches; the median of per-round ratios now / old."""
    import copy

    import sparsegrad as sg

    model, batch = real_fixed_model()
    old = copy.deepcopy(model)
    for layer in sg.sparsegrad_layers(old).values():
        def old_gradient(x, gy, layer=layer):
            plan = layer._support_plan()
            _, _, inv_r, inv_c = plan.coordinates()
            return old_block_route(x.float(), gy.float(), plan, old_choice(x.shape[0], plan),
                                   inv_r * plan.ucols.numel() + inv_c)
        layer._support_gradient = old_gradient
    runs = {"old": (old, sg.create_optimizer(old, lr=1e-4), []),
            "now": (model, sg.create_optimizer(model, lr=1e-4), [])}
    load = [os.getloadavg()[0]]
    for rnd in range(args.warmup + args.rounds):
        b = batch(3 + rnd % 4)
        for net, opt, times in runs.values():
            t0 = time.perf_counter()
            net(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rnd >= args.warmup:
                times.append(time.perf_counter() - t0)
        load.append(os.getloadavg()[0])
    ratios = [a / b for a, b in zip(runs["now"][2], runs["old"][2])]
    print(f"fixed-mode MiniLM step (16 x 128, scope mlp), {args.rounds} interleaved rounds, {torch.get_num_threads()} "
          f"threads, load {min(load):.1f}-{max(load):.1f}: median step old {statistics.median(runs['old'][2]):.2f} s, "
          f"now {statistics.median(runs['now'][2]):.2f} s; now / old median of per-round ratios "
          f"{statistics.median(ratios):.3f} (rounds {', '.join(f'{r:.2f}' for r in ratios)})")


def reference(x, gy, plan: SupportGradient) -> torch.Tensor:
    rotated = plan.u_out.double().T @ (gy.double().T @ x.double()) @ plan.u_in.double()
    r, c, _, _ = plan.coordinates()
    return rotated[r.long(), c.long()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true")
    p.add_argument("--e2e", action="store_true", help="whole fixed-mode MiniLM steps, old route vs now")
    p.add_argument("--shapes", default="1536x384,384x1536")
    p.add_argument("--tokens", default="2048")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.e2e:
        end_to_end(args)
        return
    cases = real_cases(args) if args.real else random_cases(args)
    tables = [routes(plan, x.shape[0]) for _, x, _, plan in cases]
    errors = [{name: float((fn(x, gy).double() - reference(x, gy, plan)).abs().max()) for name, fn in table.items()}
              for (_, x, gy, plan), table in zip(cases, tables)]
    times = [{name: [] for name in table} for table in tables]
    load = [os.getloadavg()[0]]
    for rnd in range(args.warmup + args.rounds):
        for (_, x, gy, _), table, t in zip(cases, tables, times):
            for name, fn in table.items():
                t0 = time.perf_counter()
                fn(x, gy)
                if rnd >= args.warmup:
                    t[name].append(time.perf_counter() - t0)
        load.append(os.getloadavg()[0])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds after "
          f"{args.warmup} warm-up, load average {min(load):.1f}-{max(load):.1f}")
    print("| shape | route | median ms (sum over matrices) | median per-round ratio to the library's old route "
          "| cost model picks | max abs error vs float64 |")
    print("|---|---|---|---|---|---|")
    for shape in dict.fromkeys(c[0] for c in cases):
        members = [j for j, c in enumerate(cases) if c[0] == shape]
        names = list(tables[members[0]])
        base = names[0]
        per_round = {name: [sum(times[j][_key(tables[j], name)][r] for j in members) for r in range(args.rounds)]
                     for name in names}
        picks = {cases[j][3].route(cases[j][1].shape[0]) for j in members} | {PICK}
        rows = cases[members[0]][3]
        print(f"| {shape} (k={rows.k}, rows {rows.urows.numel()}/{rows.shape[0]}, cols {rows.ucols.numel()}/"
              f"{rows.shape[1]} in the first) | | | | | |")
        for name in names:
            ratio = statistics.median(a / b for a, b in zip(per_round[name], per_round[base]))
            err = max(errors[j][_key(tables[j], name)] for j in members)
            print(f"| | {name} | {1000 * statistics.median(per_round[name]):.1f} | {ratio:.2f} | "
                  f"{'yes' if name in picks else ''} | {err:.1e} |", flush=True)


def _key(table: dict, name: str) -> str:
    """The same route's key in another matrix's table (the library's old choice may differ per matrix)."""
    if name in table:
        return name
    return next(k for k in table if k.startswith("before") and ("choice" in k) == ("choice" in name))


if __name__ == "__main__":
    main()
