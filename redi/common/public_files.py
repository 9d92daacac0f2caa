"""Reading checkpoint files that other code wrote (public releases, reference training runs): weights only, unless
the user trusts the file."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from redi.common.errors import UserError


def load_public_checkpoint(path: Path, trust_pickle: bool, pickled: str = "pickled Python objects") -> Any:
    """torch.load with weights_only; a file that needs pickle is refused unless trust_pickle (`pickled` says what such
    files of this kind hold, for the message)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No checkpoint at {path}.")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            if not trust_pickle:
                raise UserError(
                    f"{path} holds {pickled}, which weights-only loading refuses; pass --trust-pickle if you trust "
                    "the file's source (unpickling can run code)."
                ) from None
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"Cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}).") from None
