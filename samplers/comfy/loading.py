"""Native experts built the way ComfyUI builds its own models: read by ComfyUI's checkpoint reader,
their layers from ComfyUI's ``comfy.ops``.

ComfyUI names used here: ``comfy.utils.load_torch_file``, ``comfy.ops.pick_operations``,
``comfy.ops.manual_cast`` (and its layers' ``comfy_cast_weights``),
``comfy.model_management.unet_manual_cast`` (listed with the others in ``samplers/comfy``).

``model_loaders`` builds every network from an ``operations`` namespace. Given ComfyUI's, a
ModelPatcher can cast, stream and partially load the expert's weights (``--lowvram``), and weights
stored in a dtype the device cannot compute in (``--fp8_e4m3fn-unet``) are cast layer by layer to
the compute dtype, as ComfyUI's own UNets are.
"""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management
import comfy.ops
import comfy.utils

from ... import model_loaders

log = logging.getLogger("unite_and_conquer")


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict and metadata through ComfyUI's reader (weights only: nothing in the file runs).

    A file it cannot read as plain tensors goes to the pack's own reader, which refuses it with the
    pack's message (the file, and what was wrong) and never unpickles objects either.
    """
    try:
        sd, meta = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        if isinstance(sd, dict) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
            return sd, dict(meta or {})
    except Exception as err:  # noqa: BLE001  (the pack's reader below words the refusal)
        log.debug("load_torch_file could not read %s: %s", path, err)
    return model_loaders.read_checkpoint(path)


def operations_for(weight_dtype: torch.dtype, device: torch.device) -> tuple[type, torch.dtype | None]:
    """ComfyUI's layer namespace for weights of ``weight_dtype`` computed on ``device``, and the
    compute dtype where it is not the weights' (``None`` otherwise), as ``BaseModel`` picks them.

    The experts' norms keep float32 statistics, so they must cast their weights to their input's
    dtype: where the namespace ComfyUI picks has norms that do not cast (its weights are already
    the compute dtype), the norms come from ``comfy.ops.manual_cast``.
    """
    compute = comfy.model_management.unet_manual_cast(weight_dtype, device)
    ops = comfy.ops.pick_operations(weight_dtype, compute, load_device=device)
    if not getattr(ops.GroupNorm, "comfy_cast_weights", False):
        cast = comfy.ops.manual_cast
        ops = type(f"{ops.__name__}_float32_norms", (ops,), {
            "GroupNorm": cast.GroupNorm, "LayerNorm": cast.LayerNorm, "Embedding": cast.Embedding})
    return ops, compute


def runnable_weight_dtype(weight_dtype: torch.dtype, compute: torch.dtype | None,
                          device: torch.device) -> tuple[torch.dtype, str | None]:
    """``weight_dtype``, or the compute dtype with a note saying why, where weights of that dtype
    cannot be cast to it on ``device`` (a torch without float8 kernels there)."""
    if compute is None:
        return weight_dtype, None
    try:
        torch.ones(2, dtype=weight_dtype, device=device).to(compute)
        torch.ones(2, dtype=compute, device=device).to(weight_dtype)
    except (RuntimeError, TypeError) as err:
        note = (f"weights kept in {str(compute).removeprefix('torch.')}: {str(weight_dtype).removeprefix('torch.')} "
                f"cannot be cast on {device} ({str(err).splitlines()[0][:120]})")
        return compute, note
    return weight_dtype, None


def load_expert(path: str, family: str, schedule: str | None, weight_dtype_for, device: torch.device):
    """The expert of ``path`` on ComfyUI's layers, its weights in the dtype ``weight_dtype_for(n_params)``
    picks (ComfyUI's, for ``device``).

    Returns ``(expert, notes)``: notes for the node's summary (a compute dtype other than the
    weights', or a fallback from a weight dtype the device cannot cast).
    """
    folder = os.path.isdir(path)
    if folder:
        sd, meta = None, {}
        n_params = 0  # a folder's weights are read by the diffusers loader, after the layers are picked
    else:
        sd, meta = read_checkpoint(path)
        n_params = sum(v.numel() for v in sd.values() if v.is_floating_point())
    weight_dtype = weight_dtype_for(n_params)
    ops, compute = operations_for(weight_dtype, device)
    weight_dtype, fallback = runnable_weight_dtype(weight_dtype, compute, device)
    if fallback:
        log.warning("%s: %s", os.path.basename(path), fallback)
        ops, compute = operations_for(weight_dtype, device)
    if folder:
        expert = model_loaders.diffusers_expert_from_folder(path, schedule=schedule, operations=ops,
                                                            read=lambda p: read_checkpoint(p)[0])
    else:
        expert = model_loaders.expert_from_state_dict(sd, meta, path, family, schedule=schedule, operations=ops)
    network = expert.network.to(dtype=weight_dtype).eval().requires_grad_(False)
    network.compute_dtype = compute
    notes = [fallback] if fallback else []
    if compute is not None:
        notes.append(f"{str(weight_dtype).removeprefix('torch.')} weights computed in "
                     f"{str(compute).removeprefix('torch.')}")
    return expert, notes
