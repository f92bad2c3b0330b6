"""The names `sparsegrad.finetune.train` had before the engine was split into modules (kept for docs, examples and
benchmarks): the loop is in `loop`, the settings in `settings`, the run folder in `outputs`."""

from .errors import TrainingDiverged, TrainingInterrupted, UsageError
from .loop import calibrate, finetune, linear_schedule, seed_everything
from .methods import TRAINED_PARAMS_FILE, mlp_matrices
from .outputs import TASK_FILE, load_finetuned, read_task, save_trained, write_json, write_loss_csv
from .settings import NONFINITE_CHOICES, RESUME_MAY_CHANGE, FinetuneConfig, resume_config

__all__ = ["NONFINITE_CHOICES", "RESUME_MAY_CHANGE", "TASK_FILE", "TRAINED_PARAMS_FILE", "FinetuneConfig",
           "TrainingDiverged", "TrainingInterrupted", "UsageError", "calibrate", "finetune", "linear_schedule",
           "load_finetuned", "mlp_matrices", "read_task", "resume_config", "save_trained", "seed_everything",
           "write_json", "write_loss_csv"]
