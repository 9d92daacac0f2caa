"""`python -m redi ARGS` is the `redi` console script (torchrun --module, or a clone that is not installed)."""
from redi.cli import app

app(prog_name="redi")
