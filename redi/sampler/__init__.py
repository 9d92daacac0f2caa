"""Samplers, guidance, decoding, output files and metrics."""
