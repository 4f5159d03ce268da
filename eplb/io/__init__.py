"""Files eplb reads and writes: expert load, placements and load traces in eplb's and the engines'
formats (SGLang, TensorRT-LLM, numpy, torch), and the model layouts that map eplb's MoE-only rows to
each engine's model-layer numbering.

One reader and one writer per format (`eplb.io.registry` names them); errors are `InputError`s
naming the value, the rule and the fix. The CLI builds on these; the planner does not import them.
"""

from __future__ import annotations

from eplb.io.errors import InputError, MissingExtraError, RanksNeededError
from eplb.io.layout import MODEL_LAYOUTS, ModelLayout, RowMap, layout_named, parse_moe_layers, resolve_layout
from eplb.io.load import LOAD_SUFFIXES, LoadFile, read_load, read_load_file
from eplb.io.placement import PLACEMENT_FORMATS, placement_bytes, read_any_placement
from eplb.io.registry import FORMATS, FileFormat, format_of, formats_holding
from eplb.io.trace import TRACE_SUFFIXES, TraceFile, read_trace, read_trace_file, trace_bytes
from eplb.io.trtllm import (
    TrtllmConfig,
    TrtllmStats,
    dump_trtllm_yaml,
    parse_trtllm_yaml,
    read_trtllm_stats,
    read_trtllm_yaml,
)

__all__ = [
    "FORMATS",
    "LOAD_SUFFIXES",
    "MODEL_LAYOUTS",
    "PLACEMENT_FORMATS",
    "TRACE_SUFFIXES",
    "FileFormat",
    "InputError",
    "LoadFile",
    "MissingExtraError",
    "ModelLayout",
    "RanksNeededError",
    "RowMap",
    "TraceFile",
    "TrtllmConfig",
    "TrtllmStats",
    "dump_trtllm_yaml",
    "format_of",
    "formats_holding",
    "layout_named",
    "parse_moe_layers",
    "parse_trtllm_yaml",
    "placement_bytes",
    "read_any_placement",
    "read_load",
    "read_load_file",
    "read_trace",
    "read_trace_file",
    "read_trtllm_stats",
    "read_trtllm_yaml",
    "resolve_layout",
    "trace_bytes",
]
