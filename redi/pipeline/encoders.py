"""The frozen encoders' identity and loading: the VAE (diffusers; the families and their latent spaces are
`pipeline.vaes`) and the representation encoders (transformers; the families, pre-processing and tokens kept
are `pipeline.representations`).

An encoder is named by a hub id, a local directory or `tiny-random[:VARIANT]` (the same classes with
tiny widths and a fixed seed, for tests and the offline demo). `resolve` reads only the config and
returns the identity a manifest records; `load` builds the model.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.utils import get_session
from transformers import AutoConfig

from redi.common.atomic import read_json
from redi.common.errors import UserError
from redi.pipeline import representations, vaes
from redi.pipeline.stage import TINY_RANDOM

log = logging.getLogger(__name__)
TINY_SEED = 0  # torch seed of the tiny-random weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _transformers_hub_config(name: str, revision: str, offline: bool) -> dict[str, Any]:
    return AutoConfig.from_pretrained(name, revision=revision, local_files_only=offline).to_dict()


@dataclass(frozen=True)
class EncoderFamily:
    """What differs between the two frozen encoders."""

    what: str  # words for messages
    flag: str  # the CLI option that names it
    example_dir: str  # a plausible local directory for the error message
    model_class: Callable[[dict[str, Any]], type[torch.nn.Module]]  # config → class (the identity records it)
    tiny_configs: Callable[[], dict[str, Callable[[], dict[str, Any]]]]  # tiny-random[:VARIANT] ("" plain) → config
    dim_key: str  # config field recorded as the identity's "dim"
    config_keys: tuple[str, ...]  # fields every config of this family has (a config without them is another model)
    hub_config: Callable[[str, str, bool], dict[str, Any]]  # (id, revision, cached only) → config, no weights
    build: Callable[[dict[str, Any]], torch.nn.Module]  # config → randomly initialised model
    pretrained: Callable[..., torch.nn.Module]  # (config, source, **hub kwargs) → the pretrained model
    model_config: Callable[[dict[str, Any]], dict[str, Any]] = lambda config: config  # checkpoint config → the model's


VAE = EncoderFamily(  # every latent-space family (pipeline/vaes.py)
    "VAE", "--vae", "/path/to/sd-vae-ft-ema", vaes.model_class, vaes.tiny_configs, "latent_channels",
    ("latent_channels",), vaes.hub_config, vaes.build, vaes.from_pretrained,
)
ENCODER = EncoderFamily(  # every representation family (pipeline/representations.py)
    "representation encoder", "--encoder", "/path/to/dinov2-with-registers-base",
    lambda config: representations.family_of(config).model_class, representations.tiny_configs, "hidden_size",
    ("hidden_size", "patch_size"), _transformers_hub_config, representations.build, representations.from_pretrained,
    representations.vision_config,
)


@dataclass(frozen=True)
class EncoderRef:
    """An encoder resolved to its config and manifest identity, before any weights are read."""

    family: EncoderFamily
    name: str  # hub id, local directory or "tiny-random"
    revision: str  # hub revision asked for ("main" unless pinned)
    config: dict[str, Any]  # the model config (diffusers / transformers fields; a full CLIP/SigLIP's vision tower)
    identity: dict[str, Any]  # {"kind", "id", "revision" | "hash", "class", "dim"} for the manifest

    @property
    def tiny_random(self) -> bool:
        return self.identity["kind"] == TINY_RANDOM


HUB_PROBE_SECONDS = 3.0  # one request to the hub, without retries, before any hub id is looked up


def offline() -> bool:
    """True when HF_HUB_OFFLINE asks for cached files only, or the hub did not answer this process's one probe:
    then every lookup is a cached one and a model that is not cached is one sentence at once, instead of the hub
    client's retries (about 23 s per file, each warning printed twice)."""
    return _offline_by_request() or not _hub_answers()


def _offline_by_request() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@functools.cache
def _hub_answers() -> bool:
    """Whether the hub endpoint (HF_ENDPOINT) answers one HEAD request within HUB_PROBE_SECONDS; any answer counts."""
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except Exception:  # no route, no name, refused, timed out: the transport's errors, whatever its library
        log.info(f"{constants.ENDPOINT} does not answer: using the Hugging Face cache only.")
        return False
    return True


def resolve(family: EncoderFamily, name: str, revision: str = "main") -> EncoderRef:
    """Find the config of `name` (tiny-random[:VARIANT], local directory or hub id) without loading weights."""
    base = {"id": name}
    if name == TINY_RANDOM or name.startswith(TINY_RANDOM + ":"):
        variants = family.tiny_configs()
        variant = name.removeprefix(TINY_RANDOM).removeprefix(":")
        if variant not in variants:
            names = ", ".join(TINY_RANDOM + (f":{v}" if v else "") for v in variants)
            raise UserError(f"{family.flag} {name} is not a tiny-random model; choose one of {names}.")
        config = variants[variant]()
        ident = {**base, "kind": TINY_RANDOM, "hash": _config_hash(config, []), "seed": TINY_SEED}
    elif Path(name).expanduser().exists() or name.startswith(("/", ".", "~")):
        path = Path(name).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise UserError(f"{name} is not a model directory (no config.json there); pass {family.flag} DIR or a hub id.")
        raw = read_json(path / "config.json", dict, f"pass {family.flag} a model directory or a hub id")
        weights = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
        ident = {**base, "id": str(path), "kind": "local", "hash": _config_hash(raw, weights)}
        config = family.model_config(raw)
    else:
        try:
            with _quiet_hub():
                raw = family.hub_config(name, revision, offline())
        except (OSError, ValueError):  # missing files, no network, or an id the hub rejects
            raise _unavailable(family, name, revision) from None
        config = family.model_config(raw)
        ident = {**base, "kind": "hub", "revision": revision}
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
        if isinstance(cached, str):
            ident["commit"] = Path(cached).parent.name  # …/snapshots/<commit>/config.json
    ident["class"] = family.model_class(config).__name__
    if missing := [k for k in family.config_keys if k not in config]:
        kind = config.get("_class_name") or config.get("model_type") or "an unknown model"
        raise UserError(f"{name} is not a {family.what}: its config ({kind}) lacks {', '.join(missing)}; pass "
                        f"{family.flag} a {family.what} directory or hub id.")
    if wrong := [k for k in family.config_keys if type(config[k]) is not int or config[k] < 1]:
        raise UserError(f"{name}'s config gives {wrong[0]} = {config[wrong[0]]!r}, not a positive integer; pass "
                        f"{family.flag} a {family.what} directory or hub id with a valid config.")
    ident["dim"] = config[family.dim_key]
    return EncoderRef(family, name, revision, config, ident)


def load(ref: EncoderRef, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The frozen model in eval mode: random with a fixed seed for tiny-random, else the pretrained weights."""
    if ref.tiny_random:
        model = random_init(ref.family, ref.config, TINY_SEED)
    else:
        kind = ref.identity["kind"]
        source = ref.identity["id"]
        hub = {"revision": ref.revision, "local_files_only": offline()} if kind == "hub" else {}
        try:
            with _quiet_hub():
                model = ref.family.pretrained(ref.config, source, **hub)
        except OSError:
            raise _unavailable(ref.family, ref.name, ref.revision) from None
    model = model.to(device=device)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def sidecar(ref: EncoderRef, filename: str) -> dict[str, Any] | None:
    """A JSON file of the model's directory or hub repo besides its config (e.g. preprocessor_config.json), if it has one."""
    if ref.tiny_random:
        return None
    if ref.identity["kind"] == "local":
        path: Path | None = Path(ref.identity["id"]) / filename
    else:
        try:
            with _quiet_hub():
                path = Path(hf_hub_download(ref.name, filename, revision=ref.revision, local_files_only=offline()))
        except (OSError, ValueError, EntryNotFoundError):  # not in the repo, not cached, no network
            path = None
    if path is None or not path.is_file():
        return None
    return read_json(path, dict, "repair or delete it")


def random_init(family: EncoderFamily, config: dict[str, Any], seed: int) -> torch.nn.Module:
    """`family`'s model built from `config` with weights drawn from torch seed `seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return family.build(config)


def _config_hash(config: dict[str, Any], weights: list[tuple[str, int]]) -> str:
    """SHA-256 of a config and the names and sizes of the weight files next to it."""
    text = json.dumps(config, sort_keys=True) + "".join(f"\n{n}\t{s}" for n, s in weights)
    return hashlib.sha256(text.encode()).hexdigest()


def _unavailable(family: EncoderFamily, name: str, revision: str) -> UserError:
    if _offline_by_request():
        reason = "not in the Hugging Face cache, and HF_HUB_OFFLINE forbids a download"
    elif not _hub_answers():
        reason = f"not in the Hugging Face cache, and {constants.ENDPOINT} does not answer"
    else:
        reason = "neither in the Hugging Face cache nor downloadable here"
    return UserError(f"Cannot load the {family.what} '{name}' (revision {revision}): it is {reason}; pass a local "
                     f"directory instead, e.g. {family.flag} {family.example_dir}.")


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Load without the libraries' chatter: diffusers' and transformers' warnings (`accelerate` advice, a full
    image-text checkpoint's unused text weights; what a model lacks is our own sentence) and the deprecation
    warnings diffusers triggers inside huggingface_hub. Errors still show; downloads keep their progress bars."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.setLevel(level)
