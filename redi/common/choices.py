"""The choice lists that both trainer/ (its in-training sampling flags) and sampler/ validate against.

They live here so that trainer/ never imports sampler/ (DESIGN: sampler imports the network from trainer, never the
other way round).
"""
from __future__ import annotations

GUIDANCE_MODES: tuple[str, ...] = ("none", "cfg", "rg", "cfg+rg")  # docs/METHOD.md: CFG, Representation Guidance
AUTOGUIDANCE_MODES: tuple[str, ...] = ("autoguidance", "autoguidance+rg")  # with a second, guiding network (sample only)
LABEL_MODES: tuple[str, ...] = ("random", "balanced")  # sampler/labels.py says what each draws
LATENT_NORMS: tuple[str, ...] = ("config", "channel")  # pipeline/latent_norm.py: the VAE config's, or measured per channel
