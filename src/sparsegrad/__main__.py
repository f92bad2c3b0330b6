"""`python -m sparsegrad`: the `sparsegrad` command line (also under torchrun)."""

from sparsegrad.finetune.cli import main

raise SystemExit(main())
