"""One name per idea across every command: the flags a user meets in more than one command, what each means, and
the spellings of the previous release that still parse.

This table is what `--help` hides (an old spelling), what a command warns about when it is used, and what
tests/test_vocabulary.py walks every command's options against: an option carries one visible name; a name used by
two commands is a term here; a term's name is given only to the parameters listed as carrying it; and a parameter
that carries one term only is shown under that term's name in every command. docs/CLI.md prints the table.

Three names of a data root, by what the command does with it: `--data` is the local root a stage writes into;
`--shards` is what training reads (a data root or its shards/, local or a URL that `redi publish` wrote); the
commands that inspect one root (info, verify, preview, publish) take it as their positional DATA.
Train's flags for its in-training samples and evaluations are sample's and eval's with a prefix
(`--sample-steps` is sample's `--steps`, `--eval-ref` is eval's `--ref`), so `--steps` counts sampler steps and
`--max-steps` optimiser steps.
"""
from __future__ import annotations

from dataclasses import dataclass

RELEASE_OF_REMOVAL = "0.3"  # old spellings are accepted until then


@dataclass(frozen=True)
class Term:
    """One idea and its flag."""

    name: str
    """The one visible flag, e.g. --workers."""
    meaning: str
    """What it names, in every command that has it."""
    fields: tuple[str, ...]
    """The parameters (config fields or command arguments) that carry it."""
    old: tuple[str, ...] = ()
    """Spellings of the previous release: still accepted where the term's flag is, hidden from --help, warned about."""


VOCABULARY: tuple[Term, ...] = (
    # where things are
    Term("--data", "the local data root a stage writes into (latents/, features/, pca.safetensors, shards/)", ("data",)),
    Term("--shards", "the shards to read: a data root or its shards/, a local path or a URL that `redi publish` wrote",
         ("shards",)),
    Term("--run", "a run directory of `redi train`", ("run",)),
    Term("--out", "where the command writes its result (a folder or a file, as its help says)", ("out", "out_dir")),
    # the frozen encoders
    Term("--vae", "the VAE: a hub id, a local directory or tiny-random", ("model", "vae")),
    Term("--vae-revision", "the hub revision (branch, tag or commit) of --vae", ("revision",), old=("--revision",)),
    Term("--encoder", "the representation encoder: a hub id, a local directory or tiny-random", ("model", "encoder")),
    Term("--encoder-revision", "the hub revision of --encoder", ("revision", "encoder_revision"), old=("--revision",)),
    Term("--resolution", "the image side in pixels", ("resolution",)),
    Term("--patch-size", "the diffusion model's patch size a token grid is made for", ("patch_size",)),
    # how the work runs
    Term("--device", "where the networks run: auto, cpu, cuda or cuda:N", ("device",)),
    Term("--precision", "the autocast dtype of the networks (bf16, fp16, fp32)", ("precision",)),
    Term("--batch-size", "images per forward pass (train: the global batch)", ("batch_size", "batch_images"),
         old=("--batch-images",)),
    Term("--workers", "processes (or threads) that read and decode the input", ("workers", "num_workers"),
         old=("--num-workers",)),
    Term("--chunk-size", "images per committed unit of a stage (what a killed run redoes)", ("chunk_size",)),
    Term("--dtype", "the storage dtype of a stage's arrays", ("dtype",)),
    Term("--format", "the shard stores: zarr, wds (WebDataset) or both", ("formats", "data_format")),
    Term("--seed", "the seed of every random choice the command makes", ("seed",)),
    Term("--force", "redo, or replace, what was made with other settings instead of refusing", ("force",)),
    Term("--from", "the code or method that wrote a checkpoint being converted", ("origin",)),
    Term("--trust-pickle", "allow unpickling a file that is not ours (it can run code)", ("trust_pickle",)),
    Term("--json", "print JSON for scripts instead of a table", ("as_json",)),
    # the model and its samples
    Term("--model", "the diffusion backbone, e.g. SiT-B/2", ("model",)),
    Term("--rep-drop", "the representation-drop probability a model is trained with", ("rep_drop",)),
    Term("--repa-depth", "the block that feeds the REPA projector", ("repa_depth",)),
    Term("--max-steps", "optimiser steps a run trains for", ("max_steps",), old=("--steps",)),
    Term("--lr", "the optimiser's learning rate", ("lr",)),
    Term("--steps", "sampler steps per image (train's grids: --sample-steps)", ("steps",)),
    Term("--num", "how many images (or samples) the command makes or reads", ("num",), old=("--samples",)),
    Term("--labels", "the class labels of generated images: random, balanced or a comma list", ("labels",),
         old=("--class-labels",)),
    Term("--guidance", "none, cfg, rg or cfg+rg", ("guidance",)),
    Term("--inception", "pytorch-fid's Inception weights, a local .pth file", ("inception",)),
)

TERMS = {term.name: term for term in VOCABULARY}


def hidden_names(opts: list[str]) -> set[str]:
    """The names among one option's `opts` that --help leaves out: old spellings of the term the option carries."""
    return {old for name in opts if name in TERMS for old in TERMS[name].old if old in opts}
