"""What a loaded expert declares: the one place that documents the expert protocol.

An expert is a pixel-space diffusion network plus everything the product of experts needs to
know about it. Every family loader (``adm.py``, ``glide.py``, ``diffusers_unet.py``, ``face.py``,
``tiny.py``) returns an :class:`Expert`; nothing downstream looks at the family again except to
format labels.

Conditions
----------
A *condition* is a plain ``dict[str, torch.Tensor]`` of keyword arguments for the network, each
tensor with a leading batch dimension of 1 (shared by every image in the batch) or B (one row per
image). ``{}`` is a valid condition (an unconditional model). The sampler expands and concatenates
conditions of one expert along the batch so that all of them, nulls included, go through one
forward pass; so every condition of one expert, its null included, must have the same keys.

Modalities
----------
``encoders`` maps a modality name to a function that turns user input into a condition. The
binding nodes call them; a modality that is not in ``encoders`` is refused with a message that
lists the ones the expert accepts. Names in use: ``class`` (int index), ``text`` (str),
``segmentation`` (B x 1 x H x W map in [0, 1], plus a ``slot`` keyword), ``sketch`` (B x 3 x H x W
in [-1, 1]), ``image`` (B x 3 x h x w low-resolution image in [-1, 1]), ``colour`` (str).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .schedules import alphas_cumprod_at

Condition = dict[str, torch.Tensor]

PREDICTIONS = ("eps", "eps_learned_sigma", "v", "v_learned_sigma")


@dataclass(eq=False)
class Expert:
    """A loaded pixel-space diffusion expert.

    Args:
        network (`torch.nn.Module`):
            Called as ``network(x, t, **condition)``. ``x`` is the VP-scaled sample
            ``sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps`` (B x ``image_channels`` x H x W), ``t``
            a float tensor of B continuous timesteps in ``[0, T - 1]``. It returns exactly what the
            original architecture returns (for learned-sigma models, 2 x ``image_channels``
            channels: eps then the variance interpolation ``v``).
        name (`str`):
            Short display name used in labels and errors, for example ``"ADM-64"``.
        family (`str`):
            Loader family that built it: ``adm``, ``glide``, ``glide_upsample``, ``diffusers``,
            ``face``, ``tiny`` or ``analytic`` (tests).
        resolution (`int`):
            Side of the square images it was trained on. All experts of a product must share it.
        alphas_cumprod (`torch.Tensor`):
            The training schedule: T cumulative products of alphas, float64, decreasing.
        prediction (`str`, defaults to ``"eps"``):
            ``"eps"``, ``"eps_learned_sigma"`` (output channels ``[eps | v]``; eps is the first half),
            ``"v"`` (v-prediction, Salimans & Ho 2022: ``sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0``,
            turned into eps at the input's own timestep), or ``"v_learned_sigma"`` (``[v-prediction |
            variance values]``). The ``_learned_sigma`` second half is IDDPM's variance interpolation
            (Nichol & Dhariwal 2021, eq. 15), returned by :meth:`predict`.
        image_channels (`int`, defaults to 3):
            Channels of the image the expert denoises (conditioning channels excluded).
        encoders (`dict[str, Callable[..., Condition]]`):
            Modality name to condition builder; see the module docstring.
        null_condition (`Condition` or `None`):
            The condition the expert was trained to treat as "no condition" (label dropout, empty
            text, zero slots). ``None`` when it has no trained null; then a binding must say how
            its null is formed (for example ADM's class-0 convention) or use reliability 0.
        warners (`dict[str, Callable[..., str | None]]`):
            Modality name to a function taking the encoder's arguments and returning a warning for
            the user (a prompt truncated to the context, a map resized), or ``None``.
        null_for (`Callable[[Condition], Condition | None]`, *optional*):
            For experts whose null depends on the condition it pairs with (GLIDE's upsampler keeps
            its low-resolution image and blanks only the text). Defaults to ``null_condition``.
        class_names (`list[str]`, *optional*):
            Names of the classes for a class-conditional expert, index order.
        info (`dict`):
            What the loader inferred (channels, attention layout, schedule name, source file...),
            shown in errors and in the loader node's summary.
        memory_format (`torch.memory_format`, defaults to ``torch.preserve_format``):
            The layout :meth:`eps` gives the network its input in; ``torch.channels_last`` once
            ``speed.set_channels_last`` has converted the weights.
        compiled (`Callable`, *optional*):
            A compiled stand-in for ``network`` (same signature, same weights) that :meth:`eps`
            calls instead of it (``speed.compile_expert``).
    """

    network: torch.nn.Module
    name: str
    family: str
    resolution: int
    alphas_cumprod: torch.Tensor
    prediction: str = "eps"
    image_channels: int = 3
    encoders: dict[str, Callable[..., Condition]] = field(default_factory=dict)
    null_condition: Condition | None = None
    warners: dict[str, Callable[..., str | None]] = field(default_factory=dict)
    null_for: Callable[[Condition], Condition | None] | None = None
    class_names: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    memory_format: torch.memory_format = torch.preserve_format
    compiled: Callable[..., torch.Tensor] | None = None

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"{self.name}: prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        self.alphas_cumprod = self.alphas_cumprod.detach().to(torch.float64).cpu()

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def modalities(self) -> list[str]:
        return sorted(self.encoders)

    def null_of(self, condition: Condition) -> Condition | None:
        """The trained null paired with ``condition``, or ``None`` where the expert has none."""
        return self.null_for(condition) if self.null_for is not None else self.null_condition

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
        """The raw network output, exactly what the original architecture returns."""
        return self.network(x, t, **condition)

    @property
    def learned_sigma(self) -> bool:
        """Whether the network also predicts its reverse-step variance (IDDPM's second block of channels)."""
        return self.prediction.endswith("_learned_sigma")

    def eps(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        """The noise prediction in float32, casting inputs to the network's dtype and device."""
        return self.predict(x, t, condition)[0]

    def predict(self, x: torch.Tensor, t: torch.Tensor, condition: Condition,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(eps, variance values)`` in float32: the values are the learned-sigma half of the output
        (IDDPM eq. 15: -1 stands for beta~_t, 1 for beta_t), ``None`` for experts without one.
        ``device``: where to compute, when the weights are not all there (a partially loaded network
        whose layers fetch their weights); by default the weights' device."""
        dtype, weights_device = compute_placement(self.network, x)
        device = weights_device if device is None else device
        cond = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
                for k, v in condition.items()}
        t = t.to(device=device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        forward = self.compiled if self.compiled is not None else self.network
        out = forward(x.to(device=device, dtype=dtype, memory_format=self.memory_format), t, **cond).float()
        values = None
        if self.learned_sigma:
            out, values = out[:, : self.image_channels], out[:, self.image_channels: 2 * self.image_channels]
        if self.prediction.startswith("v"):
            out = v_to_eps(out, x.to(device=device, dtype=torch.float32), alphas_cumprod_at(t, self.alphas_cumprod))
        return out, values

    def warning(self, modality: str, *args, **kwargs) -> str | None:
        """What the user should know about this input (for example a truncated prompt), or None."""
        fn = self.warners.get(modality)
        return fn(*args, **kwargs) if fn is not None else None

    def encode(self, modality: str, *args, **kwargs) -> Condition:
        """Build a condition of one modality, or explain which modalities this expert takes."""
        if modality not in self.encoders:
            accepted = ", ".join(self.modalities) or "none (it is unconditional)"
            raise ValueError(f"{self.name} does not take a {modality!r} condition; it accepts: {accepted}")
        return self.encoders[modality](*args, **kwargs)


def compute_placement(network: torch.nn.Module, x: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    """The dtype and device ``network`` computes in: its ``compute_dtype`` attribute where set
    (weights stored in a dtype its layers cast from, such as fp8), else its first weight's dtype;
    its first weight's device; ``x``'s for a network without weights."""
    param = next(network.parameters(), None)
    dtype = getattr(network, "compute_dtype", None) or (param.dtype if param is not None else x.dtype)
    return dtype, param.device if param is not None else x.device


def check_image(image, what: str, channels: int, lo: float, hi: float, name: str) -> torch.Tensor:
    """A user image for an encoder as a float32 CPU tensor clamped to [lo, hi]; refuses the wrong
    shape, NaN or infinite values, and values outside [lo, hi] by more than rounding."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != channels:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: the {what} must be a B x {channels} x H x W tensor, got {shape}")
    image = image.detach().float().cpu()
    if not torch.isfinite(image).all():
        raise ValueError(f"{name}: the {what} has NaN or infinite values")
    if image.min() < lo - 1e-3 or image.max() > hi + 1e-3:
        raise ValueError(f"{name}: the {what} must lie in [{lo:g}, {hi:g}], got "
                         f"[{float(image.min()):.3g}, {float(image.max()):.3g}]")
    return image.clamp(lo, hi)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint without running any code from it.

    ``.safetensors`` is read with safetensors; anything else goes through
    ``torch.load(weights_only=True)``, which refuses pickles that would build arbitrary objects.
    """
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{os.path.basename(path)}: not a readable safetensors file ({err})") from err
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{os.path.basename(path)}: refused to load. Only plain tensor checkpoints are read "
            f"(torch.load with weights_only=True); this file is corrupt or holds other Python objects "
            f"({_load_error_reason(err)}). Convert it to .safetensors from a trusted source."
        ) from err
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{os.path.basename(path)}: expected a state dict of tensors, found {type(sd).__name__}")
    return sd


def _load_error_reason(err: Exception) -> str:
    """The informative line of torch's refusal: the global it would not unpickle, never its advice
    to retry with weights_only=False (which would run the file's code)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    for line in text.splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.strip()
    first = text.strip().splitlines()[0] if text.strip() else ""
    if "weights_only" in first:
        first = "it is not a plain weights file"
    return f"{type(err).__name__}: {first}"[:300]


def v_to_eps(v: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps from a v-prediction at a VP-scaled ``x``: eps = sqrt(1 - alpha_bar) x + sqrt(alpha_bar) v."""
    a = alpha_bar.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return (1 - a).sqrt() * x + a.sqrt() * v
