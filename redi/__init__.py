"""redi: ReDi, REPA and REG on one cached, resumable data pipeline (`redi --help`; README.md)."""

__version__ = "0.1.0"
