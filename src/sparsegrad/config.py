"""`SparseGradConfig`: what to convert, how many entries train, and how the support is chosen."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

SUPPORT_MODES = ("dynamic", "fixed")
BASIS_SHARING = ("kind", "layer")
CALIBRATION_DTYPES = ("float32", "float64")

# The MLP linears of BERT-style encoders (and not `attention.output.dense`).
BERT_MLP_TARGETS = r".*layer\.\d+\.(intermediate|output)\.dense"
# The MLP linears of LLaMA-style decoders.
LLAMA_MLP_TARGETS = r".*layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)"


@dataclass
class SparseGradConfig:
    """Configuration of a SparseGrad conversion, in the shape of a PEFT config."""

    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Which matrices to convert (nn.Linear, its subclasses, GPT-2's Conv1D, or experts "
            "'<experts>.<e>.<param>' of a fused MoE parameter): a regular expression that must match the whole "
            "name, or a list of names (an entry matches a name that equals it or ends with '.' + entry). None: "
            "the model's MLP matrices (`sparsegrad.targets.MLP_TARGETS` by config.model_type, else found by shape)."
        },
    )
    k: int | None = field(
        default=None,
        metadata={"help": "Entries of each converted matrix that train per step (exact). Overrides `density`."},
    )
    density: float | None = field(
        default=0.01,
        metadata={"help": "Per-matrix budget as a share of its entries, in (0, 1]: k = round(density * out * in)."},
    )
    support: str = field(
        default="dynamic",
        metadata={
            "help": "'dynamic' (the paper): the top-k entries of the rotated gradient are re-chosen every step and "
            "updated by a lazy sparse Adam. 'fixed': the support is chosen once (from the calibration gradients, "
            "or else from the first step) and only k values train, so any optimizer keeps k-sized state."
        },
    )
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={"help": "Block indices to convert (the first integer in a module's name); None converts all."},
    )
    basis_sharing: str = field(
        default="kind",
        metadata={
            "help": "'kind': one (U_out, U_in) pair per kind of module, shared by all blocks (the paper). "
            "'layer': a pair per converted module."
        },
    )
    calibration_dtype: str = field(
        default="float32",
        metadata={"help": "Precision of the streaming Gram matrices and their eigendecomposition: float32 or float64."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules that train densely besides the SparseGrad matrices (and their biases), as in PEFT: "
            "names matched like target_modules' list entries (e.g. ['classifier', 'pooler']). None: the task head "
            "when the model has one ('classifier', 'score' or T5/BART's 'classification_head'); [] : none."
        },
    )
    score_steps: int | None = field(
        default=2,
        metadata={
            "help": "Calibration batches re-run once the bases are known, to score the rotated-gradient energy "
            "(the report and the fixed support). 0 skips it; None re-runs every calibration batch."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if self.target_modules is None:
            pass
        elif isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("SparseGradConfig.target_modules is an empty pattern")
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ValueError(f"SparseGradConfig.target_modules is not a valid regex: {exc}") from None
        elif isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError("SparseGradConfig.target_modules must be a regex or a non-empty list of names")
            self.target_modules = list(self.target_modules)
        else:
            raise ValueError(
                f"SparseGradConfig.target_modules must be a regex string, a list of names or None, "
                f"got {type(self.target_modules).__name__}"
            )
        if self.k is not None:
            if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
                raise ValueError(f"SparseGradConfig.k must be a positive integer, got {self.k!r}")
        elif self.density is None:
            raise ValueError("SparseGradConfig needs a budget: set k or density")
        if self.density is not None and not (  # True is an int: refused, as torch.optim refuses lr=True
            isinstance(self.density, (int, float)) and not isinstance(self.density, bool)
            and 0.0 < float(self.density) <= 1.0
        ):
            raise ValueError(f"SparseGradConfig.density must be in (0, 1], got {self.density!r}")
        if self.support not in SUPPORT_MODES:
            raise ValueError(f"SparseGradConfig.support must be one of {SUPPORT_MODES}, got {self.support!r}")
        if self.basis_sharing not in BASIS_SHARING:
            raise ValueError(
                f"SparseGradConfig.basis_sharing must be one of {BASIS_SHARING}, got {self.basis_sharing!r}"
            )
        if self.calibration_dtype not in CALIBRATION_DTYPES:
            raise ValueError(
                f"SparseGradConfig.calibration_dtype must be one of {CALIBRATION_DTYPES}, "
                f"got {self.calibration_dtype!r}"
            )
        if self.layers_to_transform is not None:
            if isinstance(self.layers_to_transform, int):
                self.layers_to_transform = [self.layers_to_transform]
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform):
                raise ValueError(
                    f"SparseGradConfig.layers_to_transform must be non-negative block indices, "
                    f"got {self.layers_to_transform!r}"
                )
            self.layers_to_transform = list(self.layers_to_transform)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                    isinstance(m, str) and m for m in self.modules_to_save):
                raise ValueError(f"SparseGradConfig.modules_to_save must be a list of module names, "
                                 f"got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        if self.score_steps is not None and (not isinstance(self.score_steps, int) or isinstance(self.score_steps, bool)
                                             or self.score_steps < 0):
            raise ValueError(f"SparseGradConfig.score_steps must be >= 0 or None, got {self.score_steps!r}")

    def budget(self, out_features: int, in_features: int, name: str = "module") -> int:
        """The exact number of entries k that train in an out x in matrix."""
        numel = out_features * in_features
        k = self.k if self.k is not None else max(1, round(float(self.density) * numel))
        if k > numel:
            raise ValueError(f"k={k} exceeds the {out_features}x{in_features}={numel} entries of {name}")
        return k

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseGradConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown SparseGradConfig fields: {sorted(unknown)}")
        return cls(**data)
