"""Model layouts: which of a model's layers are MoE layers, so files keyed by model layer map to
eplb's MoE-only rows and back.

eplb's placements and loads hold MoE layers only (row i is MoE layer i). Engines number layers by
model layer: SGLang keeps a row per model layer (``num_hidden_layers``), TensorRT-LLM keys its YAML
by model layer index. A `ModelLayout` says where the MoE layers sit: model layers
``first_moe .. num_layers - 1`` (every model listed here has its dense layers first).

Known layouts (`MODEL_LAYOUTS`) come from the models' public ``config.json``:
``num_hidden_layers``, ``first_k_dense_replace`` (DeepSeek-V3 family), ``decoder_sparse_step`` and
``mlp_only_layers`` (Qwen3-MoE), and the experts per layer (``n_routed_experts``,
``num_experts``, ``num_local_experts``).
"""

from __future__ import annotations

import re

import attrs
import numpy as np
import numpy.typing as npt

from eplb.io.errors import InputError

__all__ = [
    "MODEL_LAYOUTS",
    "ModelLayout",
    "RowMap",
    "keyed_layers",
    "layout_named",
    "load_rows",
    "model_rows",
    "parse_moe_layers",
    "resolve_layout",
]


@attrs.frozen(kw_only=True)
class ModelLayout:
    """MoE layers are model layers ``first_moe .. num_layers - 1``.

    ``num_layers`` None: the model's layer count is not known (``--first-layer`` alone); files with
    a row per model layer are then recognised by their dense rows.
    ``num_logical_experts``: routed experts per MoE layer, checked against the files when known.
    """

    name: str
    first_moe: int = attrs.field(validator=attrs.validators.ge(0))
    num_layers: int | None = None
    num_logical_experts: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.num_layers is not None and self.num_layers <= self.first_moe:
            raise InputError(
                f"layout {self.name}: num_layers ({self.num_layers}) must be > first_moe "
                f"({self.first_moe}); MoE layers are first_moe .. num_layers - 1."
            )

    @property
    def num_moe_layers(self) -> int | None:
        return None if self.num_layers is None else self.num_layers - self.first_moe

    def moe_range(self) -> str:
        """``"3-60"``: the MoE layers as ``--moe-layers`` takes them (``"3-"`` when open-ended)."""
        last = "" if self.num_layers is None else str(self.num_layers - 1)
        return f"{self.first_moe}-{last}"

    def __str__(self) -> str:
        total = "?" if self.num_layers is None else str(self.num_layers)
        return f"{self.name} ({total} model layers, MoE {self.moe_range()})"

    def check_moe_rows(self, num_rows: int, source: str) -> None:
        """``num_rows`` MoE rows (an eplb placement or load) must be this model's MoE layers."""
        want = self.num_moe_layers
        if want is not None and num_rows != want:
            raise InputError(
                f"{source} has {num_rows} MoE layer rows but {self} has {want}; pass the layout of "
                "the model it was made for (--model / --moe-layers)."
            )

    def check_experts(self, num_logical_experts: int, source: str) -> None:
        want = self.num_logical_experts
        if want is not None and num_logical_experts != want:
            raise InputError(
                f"{source} has {num_logical_experts} logical experts per layer but {self.name} has "
                f"{want}; pass the layout of the model it was made for (--model / --moe-layers)."
            )


@attrs.frozen(kw_only=True)
class RowMap:
    """How a file's rows map to MoE layers: rows ``start .. start + count - 1`` are MoE layers
    0 .. count - 1; ``note`` says what was recognised (e.g. dense rows dropped), for the report."""

    start: int
    count: int
    note: str | None = None


def model_rows(layout: ModelLayout | None, num_rows: int, source: str) -> RowMap:
    """Rows of a file that has a row per model layer, or MoE rows only (both are accepted when the
    model's layer count is known): which of them are MoE layers."""
    if layout is None or (layout.first_moe == 0 and layout.num_layers is None):
        return RowMap(start=0, count=num_rows)
    k, total, moe = layout.first_moe, layout.num_layers, layout.num_moe_layers
    if total is None:
        if num_rows <= k:
            raise InputError(
                f"{source} has {num_rows} layer rows, not more than --first-layer {k}; pass the model "
                "layer index of the first MoE layer (3 for DeepSeek-V3), or 0 for MoE layers only."
            )
        return RowMap(start=k, count=num_rows - k, note=f"model layers 0-{k - 1} dense, dropped")
    if num_rows == total:
        note = f"{num_rows} model-layer rows, MoE layers {layout.moe_range()}"
        return RowMap(start=k, count=total - k, note=note if k else None)
    if num_rows == moe:
        return RowMap(start=0, count=num_rows)
    raise InputError(
        f"{source} has {num_rows} layer rows, but {layout} needs {total} (a row per model layer) or "
        f"{moe} (MoE layers only); pass the layout of the model it was recorded on (--model / --moe-layers)."
    )


def load_rows(layout: ModelLayout | None, load: npt.NDArray[np.float64], source: str) -> RowMap:
    """`model_rows` for a load ``[rows, experts]``: rows that should be dense layers must hold no
    load (SGLang's dumps record zeros there); otherwise they are MoE rows and the layout is wrong."""
    rows = model_rows(layout, load.shape[0], source)
    if rows.start == 0 or layout is None:
        return rows
    dense = load[: rows.start]
    busy = [int(i) for i in np.flatnonzero(dense.sum(axis=1))]
    if busy:
        n = load.shape[0]
        fix = (
            f"if its {n} rows are MoE layers only, pass --moe-layers {rows.start}-{rows.start + n - 1}"
            if layout.num_layers is None
            else "pass the layout of the model it was recorded on (--model / --moe-layers)"
        )
        raise InputError(
            f"{source}: rows {busy[:5]} hold load, but {layout} has dense layers 0-{rows.start - 1} there; "
            f"{fix}."
        )
    note = f"model layers 0-{rows.start - 1} dense (no load), dropped"
    return attrs.evolve(rows, note=note)


_M = {  # name -> (num_hidden_layers, first MoE layer, routed experts per layer)
    # config.json: num_hidden_layers 61, first_k_dense_replace 3, moe_layer_freq 1, n_routed_experts 256
    "deepseek-v3": (61, 3, 256),
    "deepseek-r1": (61, 3, 256),
    # config.json: num_hidden_layers 61, first_k_dense_replace 1, n_routed_experts 384
    "kimi-k2": (61, 1, 384),
    # config.json: num_hidden_layers 48 / 94, decoder_sparse_step 1, mlp_only_layers [], num_experts 128
    "qwen3-30b-a3b": (48, 0, 128),
    "qwen3-235b-a22b": (94, 0, 128),
    # config.json: num_hidden_layers 32, num_local_experts 8 (every layer a sparse MoE block)
    "mixtral-8x7b": (32, 0, 8),
}
MODEL_LAYOUTS: dict[str, ModelLayout] = {
    name: ModelLayout(name=name, num_layers=n, first_moe=k, num_logical_experts=e)
    for name, (n, k, e) in _M.items()
}


def resolve_layout(first_layer: int, layout: ModelLayout | None) -> ModelLayout | None:
    """The layout to use: ``layout``, or the one ``first_layer`` means (MoE layers from there, the
    layer count unknown); None for neither."""
    if first_layer < 0:
        raise InputError(f"--first-layer must be >= 0 (got {first_layer}).")
    if layout is not None:
        if first_layer and first_layer != layout.first_moe:
            raise InputError(f"first_layer {first_layer} contradicts {layout}; give one of them.")
        return layout
    if not first_layer:
        return None
    return ModelLayout(name=f"--first-layer {first_layer}", first_moe=first_layer)


def keyed_layers(layout: ModelLayout | None, layers: tuple[int, ...], source: str) -> None:
    """Files keyed by model layer (TensorRT-LLM) must name the layout's MoE layers."""
    if layout is None or not layers:
        return
    want = (
        tuple(range(layout.first_moe, layout.num_layers))
        if layout.num_layers is not None
        else tuple(range(layout.first_moe, layout.first_moe + len(layers)))
    )
    if layers != want:
        raise InputError(
            f"{source} names model layers {layers[0]}-{layers[-1]} ({len(layers)} layers), but {layout} "
            f"has MoE layers {want[0]}-{want[-1]}; pass the layout of the model it was recorded on."
        )


def layout_named(name: str) -> ModelLayout:
    key = name.strip().lower()
    if key not in MODEL_LAYOUTS:
        raise InputError(
            f"unknown model {name!r}; known: {', '.join(MODEL_LAYOUTS)}. For another model pass "
            "--moe-layers FIRST-LAST (model layer indices of its MoE layers, e.g. 3-60)."
        )
    return MODEL_LAYOUTS[key]


_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d*)\s*$")


def parse_moe_layers(text: str) -> ModelLayout:
    """``"3-60"`` (model layers 3..60 are MoE, 61 layers in all) or ``"3-"`` (count unknown)."""
    m = _RANGE.match(text)
    if not m:
        raise InputError(
            f"--moe-layers {text!r} is not FIRST-LAST; give the model layer indices of the first and last "
            "MoE layer, e.g. 3-60 for DeepSeek-V3 (61 layers, 3 dense)."
        )
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else None
    if last is not None and last < first:
        raise InputError(f"--moe-layers {text}: the last layer ({last}) is before the first ({first}).")
    return ModelLayout(
        name=f"--moe-layers {text.strip()}",
        first_moe=first,
        num_layers=None if last is None else last + 1,
    )
