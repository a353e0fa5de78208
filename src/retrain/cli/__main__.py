"""`python -m retrain.cli ...`: the `retrain` command (how torchrun starts it)."""

from retrain.cli import main

main()
