"""Files eplb reads and writes: expert load, placements and load traces in eplb's and the engines'
formats, and the model layouts that map eplb's MoE-only rows to each engine's model layers."""

from __future__ import annotations

from eplb.io.layout import MODEL_LAYOUTS, ModelLayout, RowMap, layout_named, parse_moe_layers

__all__ = ["MODEL_LAYOUTS", "ModelLayout", "RowMap", "layout_named", "parse_moe_layers"]
