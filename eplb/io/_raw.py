"""The low-level readers every format shares: JSON, text, numpy and torch files, each failure an
`InputError` naming the file and the fix."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eplb.io.errors import InputError

__all__ = [
    "check_numeric",
    "dump_folder",
    "expert_count",
    "need_file",
    "np_array",
    "np_load",
    "read_json",
    "read_text",
    "torch_load",
]


def need_file(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"cannot read {path}: it is a folder; name a file.")
    if not path.is_file():
        raise InputError(f"cannot read {path}: no such file; check the path.")


def _open_error(path: Path, exc: OSError) -> InputError:
    """The `InputError` for a file that cannot be opened: missing, a folder, or unreadable."""
    if isinstance(exc, FileNotFoundError):
        return InputError(f"cannot read {path}: no such file; check the path.")
    if isinstance(exc, IsADirectoryError):
        return InputError(f"cannot read {path}: it is a folder; name a file.")
    return InputError(f"cannot read {path}: {exc.strerror}; check the path.")


def read_text(path: Path, fix: str, what: str = "text") -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _open_error(path, exc) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not a {what} file ({exc}); {fix}.") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except IsADirectoryError:
        raise InputError(f"cannot read {path}: it is a folder; name a file.") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}; check the path.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); write it with json.dump.") from None


def torch_load(path: Path) -> Any:
    import torch  # only .pt files need torch

    try:
        with warnings.catch_warnings():  # e.g. the pickle-protocol warning of a non-torch pickle
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"cannot read {path}: no such file; check the path.") from None
    except IsADirectoryError:
        raise InputError(f"cannot read {path}: it is a folder; name a file.") from None
    except OSError as exc:
        if not exc.strerror:  # torch's own "not a zip file" errors carry no errno
            raise InputError(f"{path} is not a torch file ({exc}); save it with torch.save.") from None
        raise InputError(f"cannot read {path}: {exc.strerror}; check the path.") from None
    except Exception as exc:  # torch raises many kinds (pickle, zip, unsupported global)
        raise InputError(
            f"{path} is not a torch file eplb can load safely (torch.load with weights_only=True: "
            f"{_torch_reason(exc)}); save a plain tensor or dict of tensors with torch.save."
        ) from None


def _torch_reason(exc: Exception) -> str:
    """The useful part of a torch.load error: the unpickler's own reason, else the first line."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        after = text.split("WeightsUnpickler error:", 1)[1]
        reason = next((line.strip() for line in after.splitlines() if line.strip()), "")
        return reason.split(". ")[0].rstrip(".") or type(exc).__name__
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def np_load(path: Path) -> Any:
    """``numpy.load`` of a ``.npy`` / ``.npz`` without pickles; every failure is an `InputError`."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        raise _open_error(path, exc) from None
    if head != b"\x93NUMPY" and head[:4] != b"PK\x03\x04":
        what = "empty" if not head else "not a numpy file (no .npy or .npz header)"
        raise InputError(f"{path} is {what}; save it with numpy.save.")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path} is not a numeric .npy array ({exc}); save it with numpy.save.") from None


def dump_folder(path: Path) -> str | None:
    """``"trtllm"`` for a folder TensorRT-LLM's ExpertStatistic wrote, ``"sglang"`` for a folder of
    SGLang's recorder dumps (``*.pt``), None for a file; any other folder is refused."""
    if not path.is_dir():
        return None
    if (path / "meta_info.json").is_file() or any(path.glob("rank*.safetensors")):
        return "trtllm"
    if any(path.glob("*.pt")):
        return "sglang"
    raise InputError(
        f"cannot read {path}: it is a folder; name a file, a TensorRT-LLM ExpertStatistic folder "
        "(meta_info.json and rank{r}.safetensors) or a folder of SGLang's recorder dumps (*.pt)."
    )


def np_array(path: Path, what: str) -> npt.NDArray[Any]:
    """The array of an ``.npy`` file; an ``.npz`` archive is refused (``what`` it should hold)."""
    data = np_load(path)
    if not isinstance(data, np.ndarray):
        data.close()
        raise InputError(f"{path} is an .npz archive, not an .npy array; save the {what} with numpy.save.")
    return data


def check_numeric(data: Any, path: Path) -> None:
    """Refuse arrays and tensors of booleans, complex numbers or other non-numbers as load."""
    dtype = getattr(data, "dtype", None)
    if dtype is None:
        return
    name = str(dtype).removeprefix("torch.")
    numeric = (
        dtype.kind in "iuf"
        if isinstance(dtype, np.dtype)
        else not (name == "bool" or name.startswith("complex"))
    )
    if not numeric:
        raise InputError(f"{path}: the load holds {name} values; save token counts as integers or floats.")


def expert_count(ids: npt.NDArray[Any]) -> int:
    """The expert count a file of expert ids implies (the largest id + 1; at least 1, so that a
    negative id is reported as out of range rather than as an empty model)."""
    if not ids.size or ids.dtype.kind not in "iu":
        return 1
    return max(int(ids.max()) + 1, 1)
