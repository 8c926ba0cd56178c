"""Model weights on disk without the training state: DCP folders, HF folders, and the model args beside them.

A DCP folder holds the model under ``model.<fqn>`` (a training checkpoint ``step-N`` also holds the optimizer and
the rest, which is ignored here) plus ``model_args.json``. An HF folder is recognised by its ``config.json``.
Loading goes into modules of any layout: DCP reshards DTensors, and HF tensors are distributed from full ones.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from titan_dsv3.models.args import ModelArgs

# Single-process use is intended here (tools, tests, one-GPU runs); DCP warns about it on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

MODEL_ARGS_FILE = "model_args.json"
PARTIAL_SUFFIX = ".partial"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; str(e) is one line that names the folder."""


def one_line(e: BaseException) -> str:
    """The last non-empty line of an exception's message (DCP packs every rank's traceback into one)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


# ---- model args ------------------------------------------------------------------------------------------------


def write_model_args(args: ModelArgs, folder: str | Path) -> None:
    (Path(folder) / MODEL_ARGS_FILE).write_text(json.dumps(args.to_dict(), indent=2) + "\n")


def read_model_args(folder: str | Path) -> ModelArgs | None:
    """The args stored with a DCP checkpoint (model_args.json) or an HF folder (config.json); None if neither."""
    folder = Path(folder)
    if (folder / MODEL_ARGS_FILE).is_file():
        try:
            return ModelArgs.from_dict(json.loads((folder / MODEL_ARGS_FILE).read_text()))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{folder / MODEL_ARGS_FILE} is not valid ({one_line(e)})") from None
    if is_hf_folder(folder):
        from titan_dsv3.models.hf import args_from_hf_config

        try:
            return args_from_hf_config(json.loads((folder / "config.json").read_text()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{folder}/config.json: {one_line(e)}") from None
    return None


# ---- DCP reading with checks -----------------------------------------------------------------------------------


def read_metadata(path: str | Path) -> Metadata:
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is not a complete DCP checkpoint (no .metadata file)")
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except (Exception, CheckpointException) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its .metadata cannot be read ({one_line(e)})"
        ) from None


def tensor_leaves(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a nested dict under DCP's flattened names (``a.b.c``); lists are not entered."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensor_leaves(v, f"{prefix}{k}."))
    elif isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    return out


def check_against_metadata(path: Path, md: Metadata, state: dict) -> None:
    """Raise CheckpointError if a tensor of state is missing from the checkpoint or has another global shape."""
    stored = md.state_dict_metadata
    for key, t in tensor_leaves(state).items():
        meta = stored.get(key)
        if meta is None:
            section = key.split(".", 1)[0]
            have = sorted({k.split(".", 1)[0] for k in stored})
            hint = " (a model-only checkpoint?)" if section not in have and "model" in have else ""
            raise CheckpointError(
                f"checkpoint {path} does not fit this run: it has no {key}{hint}; it holds {', '.join(have)}"
            )
        if isinstance(meta, TensorStorageMetadata) and tuple(meta.size) != tuple(t.shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit this run: {key} has shape {tuple(meta.size)} there and "
                f"{tuple(t.shape)} here (another model config?)"
            )


def dcp_load(state: dict, path: str | Path, process_group=None) -> None:
    """dcp.load in place into a dict of (DTensor or plain) tensors and values, after checking names and shapes."""
    path = Path(path)
    check_against_metadata(path, read_metadata(path), state)
    try:
        dcp.load(
            state, checkpoint_id=str(path), process_group=process_group, no_dist=not dist.is_initialized()
        )
    except (Exception, CheckpointException) as e:  # DCP raises many types; the user needs folder and reason
        raise CheckpointError(f"checkpoint {path} could not be loaded ({one_line(e)})") from None


# ---- model-only checkpoints --------------------------------------------------------------------------------------


def save_model_dcp(sd: dict[str, torch.Tensor], folder: str | Path, args: ModelArgs | None = None) -> Path:
    """Write {model: sd} (plain tensors, one process) to folder via folder.partial, then rename."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if args is not None:
        write_model_args(args, partial)
    dcp.save({"model": sd}, checkpoint_id=str(partial), no_dist=True)
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


def load_model_tensors(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every ``model.*`` tensor of a DCP folder as plain CPU tensors in the stored dtype (or dtype), one process."""
    path = Path(path)
    md = read_metadata(path)
    sd = {
        key.removeprefix("model."): torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in md.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    if not sd:
        raise CheckpointError(f"checkpoint {path} holds no model weights (no model.* tensors)")
    state = {"model": sd}
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {path} could not be loaded ({one_line(e)})") from None
    out = state["model"]
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def model_state(parts: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """This rank's model state (DTensors under FSDP/TP), FQNs as in the full model, over all pipeline parts.

    A tied copy under the same name in two parts (the last stage's embedding) is taken from the first part.
    """
    sd: dict[str, torch.Tensor] = {}
    for p in parts:
        for k, v in get_model_state_dict(p).items():
            sd.setdefault(k, v)
    return sd


def load_model_weights(parts: list[torch.nn.Module], path: str | Path, process_group=None) -> None:
    """Load weights from a DCP folder (any saved layout) or an HF folder into the model parts of this rank."""
    path = Path(path)
    if is_hf_folder(path):
        _load_hf_weights(parts, path)
        return
    state = {"model": model_state(parts)}
    dcp_load(state, path, process_group)
    for p in parts:
        set_model_state_dict(p, state["model"], options=StateDictOptions(strict=False))


def _load_hf_weights(parts: list[torch.nn.Module], path: Path) -> None:
    # Every rank reads the whole HF checkpoint and keeps its own shards: simple, and fine up to mid-size models.
    from titan_dsv3.models.hf import load_hf_pretrained

    try:
        _, full = load_hf_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"HF checkpoint {path} could not be read ({one_line(e)})") from None
    want = model_state(parts)
    missing = sorted(set(want) - set(full))
    if missing:
        raise CheckpointError(
            f"HF checkpoint {path} has no weights for {len(missing)} tensors of this model, e.g. {missing[0]} "
            "(another model config, or MTP weights absent: set model.mtp_depth = 0)"
        )
    for key, t in want.items():
        if tuple(full[key].shape) != tuple(t.shape):
            raise CheckpointError(
                f"HF checkpoint {path} does not fit this run: {key} has shape {tuple(full[key].shape)} there "
                f"and {tuple(t.shape)} here"
            )
    opts = StateDictOptions(full_state_dict=True, strict=False)
    for p in parts:
        own = get_model_state_dict(p)
        set_model_state_dict(p, {k: full[k] for k in own}, options=opts)
