"""User-facing errors: one clear sentence, a non-zero exit, no traceback (the CLI catches these)."""


class UserError(Exception):
    """An error the user caused and can fix (bad path, incompatible data, refused rerun)."""
