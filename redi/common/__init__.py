"""What every package shares: user errors, atomic writes, locks, the process group, devices and workers, logging and progress."""
