"""Fine-tuning product of sparsegrad: bundled real data and models, batching, training CLI.

Submodules are imported explicitly (``sparsegrad.finetune.data``, ``sparsegrad.finetune.models``);
nothing heavy (torch, transformers) is imported here.
"""
