"""The file formats eplb reads and writes, each named once: its name, the file names it goes by,
and what it holds (``load``, ``placement``, ``trace``). Readers and writers are registered beside
their format in `eplb.io.load`, `eplb.io.placement` and `eplb.io.trace`."""

from __future__ import annotations

from pathlib import Path

import attrs

from eplb.io.errors import InputError

__all__ = ["FORMATS", "FileFormat", "format_of", "formats_holding"]


@attrs.frozen(kw_only=True)
class FileFormat:
    """``patterns``: how file names of this format end (``/`` for a folder); ``holds``: what the
    files hold."""

    name: str
    patterns: tuple[str, ...]
    holds: frozenset[str]
    summary: str


FORMATS: dict[str, FileFormat] = {
    f.name: f
    for f in (
        FileFormat(
            name="ir",
            patterns=(".json",),
            holds=frozenset({"placement", "load", "trace"}),
            summary="eplb's JSON: IR placements (records the rank count), load lists, traces",
        ),
        FileFormat(
            name="sglang",
            patterns=(".sglang.json",),
            holds=frozenset({"placement"}),
            summary="SGLang's --init-expert-location JSON {physical_to_logical_map}, a row per model layer",
        ),
        FileFormat(
            name="pt",
            patterns=(".pt", ".pth"),
            holds=frozenset({"placement", "load", "trace"}),
            summary="torch files: SGLang's map as a tensor, its expert-distribution dumps (stat, "
            "per_pass), or a plain tensor",
        ),
        FileFormat(
            name="trtllm",
            patterns=(".yaml", ".yml"),
            holds=frozenset({"placement"}),
            summary="TensorRT-LLM's load-balancer YAML, keyed by model layer",
        ),
        FileFormat(
            name="trtllm-stats",
            patterns=("/",),
            holds=frozenset({"load", "trace"}),
            summary="TensorRT-LLM's ExpertStatistic folder: meta_info.json + rank{r}.safetensors",
        ),
        FileFormat(
            name="npy",
            patterns=(".npy", ".npz"),
            holds=frozenset({"placement", "load", "trace"}),
            summary="numpy arrays: [layers, slots] ids, [layers, experts] or [windows, layers, experts] load",
        ),
    )
}


def formats_holding(what: str) -> tuple[str, ...]:
    return tuple(name for name, f in FORMATS.items() if what in f.holds)


def format_of(path: str | Path, what: str = "placement") -> str:
    """The format a file name implies for a file holding ``what``: the most specific pattern wins
    (``x.sglang.json`` is sglang, ``x.json`` ir)."""
    p = Path(path)
    name_lc = p.name.lower()
    best: tuple[int, str] | None = None
    for name in formats_holding(what):
        for pat in FORMATS[name].patterns:
            fits = p.is_dir() if pat == "/" else name_lc.endswith(pat)
            if fits and (best is None or len(pat) > best[0]):
                best = (len(pat), name)
    if best is None:
        names = " ".join(p for n in formats_holding(what) for p in FORMATS[n].patterns if p != "/")
        raise InputError(f"{path}: unknown {what} file type; name it with one of: {names}.")
    return best[1]
