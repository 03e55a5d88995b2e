"""The uniform affine fake quantizer: one object per quantized tensor."""
from __future__ import annotations

import contextlib
import enum
import math
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..errors import LidarPTQError
from .functional import broadcast_shape, fake_quantize, fake_quantize_log2, grad_scale, quantize_to_int, range_to_scale
from .observers import Observer, build_observer
from .spec import QuantSpec


class QuantMode(str, enum.Enum):
    """What every quantizer of a model does on forward; switched model-wide by ``set_quant_mode``."""

    FLOAT = "float"          # pass through untouched
    CALIBRATE = "calibrate"  # pass through, observers record statistics
    QUANTIZE = "quantize"    # fake-quantize with the calibrated scale


class UncalibratedError(LidarPTQError, RuntimeError):
    """A quantizer was used (or exported) before it received a range."""


class FakeQuantizer(nn.Module):
    """Uniform affine fake quantization of one tensor.

    ``scale``/``zero_point`` are buffers (empty until calibrated), so a state dict
    carries the calibration and the owning module keeps its float keys. With
    ``learn_scale`` the step size becomes an LSQ parameter whose gradient is scaled
    by ``1/sqrt(N * qmax)`` (Esser et al., 2020).
    """

    def __init__(self, spec: QuantSpec, channel_axis: int | None = None, feature_axis: int = 1) -> None:
        super().__init__()
        self.spec = spec
        self.channel_axis = channel_axis if spec.per_channel else None
        self.feature_axis = feature_axis
        self.mode = QuantMode.QUANTIZE
        self.name = ""
        self.observer: Observer | None = None
        # Reconstruction hooks: a learned rounding (AdaRound/FlexRound) replaces
        # round-to-nearest; drop_prob < 1 quantizes each element with that probability (QDrop).
        self.rounding: nn.Module | None = None
        self.drop_prob = 1.0
        # Calibration only: gives the active-site mask for an input (e.g. the BEV occupancy resized to
        # this layer's grid); None means "derive it from the data" (non-zero feature vectors).
        self.site_mask_provider: Callable[[torch.Tensor], torch.Tensor | None] | None = None
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        # Another quantizer of the same tensor whose step this one uses (lidar_ptq.quant.tying); a plain
        # list so it is neither a submodule nor in the state dict.
        self._leader: list[FakeQuantizer] = []
        if spec.learn_scale:
            self.enable_lsq()

    # ----- state -------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.spec.enable

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    @property
    def learns_scale(self) -> bool:
        return isinstance(self.scale, nn.Parameter)

    @property
    def leader(self) -> FakeQuantizer | None:
        return self._leader[0] if self._leader else None

    def follow(self, leader: FakeQuantizer | None) -> None:
        """Quantize with ``leader``'s step and zero point from now on (None: own again); own buffers synced."""
        self._leader = [leader] if leader is not None else []
        self.sync_from_leader()

    def sync_from_leader(self) -> None:
        """Copy the leader's (possibly learned) step into this quantizer's buffers: state dicts, exporters
        and reports then read the value the forward pass uses."""
        if self._leader and self._leader[0].calibrated:
            self._assign(self._leader[0].scale.detach().clone(), self._leader[0].zero_point.clone())

    def enable_lsq(self) -> None:
        """Make the step size trainable (LSQ); the zero point stays fixed."""
        if not self.learns_scale:
            self.scale = nn.Parameter(self.scale.detach().clone())

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set scale and zero point from a clipping range (per channel: 1-D of size C)."""
        scale, zero_point = range_to_scale(torch.as_tensor(lo), torch.as_tensor(hi), self.spec)
        if self.channel_axis is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        self._assign(scale, zero_point)

    def _assign(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        device = self.scale.device
        if self.learns_scale:
            self.scale = nn.Parameter(scale.detach().to(device))
        else:
            self.scale = scale.to(device)
        self.zero_point = zero_point.to(device)

    # ----- calibration -------------------------------------------------------------------
    def observe(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Feed a tensor to this quantizer's observer (created on first use)."""
        if not torch.isfinite(x).all():
            raise ValueError(f"quantizer '{self.name or '<unnamed>'}' saw NaN/Inf values during calibration; "
                             "a range computed from them would be garbage: clean the input data (e.g. drop "
                             "NaN points before voxelization) or fix the layer producing them")
        if self.observer is None:
            self.observer = build_observer(self.spec, self.channel_axis, self.feature_axis)
        if mask is None and self.site_mask_provider is not None and self.observer.sparse:
            mask = self.site_mask_provider(x)
        self.observer.observe(x, mask)

    def finish_calibration(self) -> bool:
        """Turn the observer's statistics into a range; returns False if it saw nothing."""
        if self.observer is None or self.observer.num_observed == 0:
            self.observer = None
            return False
        lo, hi = self.observer.compute_range()
        self.set_range(lo, hi)
        self.observer = None
        return True

    # ----- forward -----------------------------------------------------------------------
    def _broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.reshape(broadcast_shape(t.numel(), x.dim(), self.channel_axis)) if self.channel_axis is not None else t

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled or self.mode is QuantMode.FLOAT:
            return x
        if self.mode is QuantMode.CALIBRATE:
            self.observe(x, mask)
            return x
        source = self._leader[0] if self._leader else self
        source._require_calibrated()
        scale = source.scale
        if source.learns_scale:
            per_scale = x.numel() // max(scale.numel(), 1)
            scale = grad_scale(scale, 1.0 / math.sqrt(per_scale * self.spec.qmax))
        scale, zero_point = self._broadcast(scale, x), self._broadcast(source.zero_point, x)
        if self.spec.scheme == "log2":
            out = fake_quantize_log2(x, scale * self.spec.qmax, 2 ** self.spec.bits)
        elif self.rounding is not None:
            out = self.rounding(x, scale, zero_point, self.spec.qmin, self.spec.qmax)
        else:
            out = fake_quantize(x, scale, zero_point, self.spec.qmin, self.spec.qmax, self.spec.symmetric)
        if self.drop_prob < 1.0:
            keep_quantized = torch.rand(x.shape, device=x.device) < self.drop_prob
            out = torch.where(keep_quantized, out, x)
        return out

    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` under the calibrated scale (what an INT8 engine stores)."""
        self._require_calibrated()
        return quantize_to_int(x, self._broadcast(self.scale.detach(), x),
                               self._broadcast(self.zero_point, x), self.spec.qmin, self.spec.qmax)

    def disable_lsq(self) -> None:
        """Freeze a learned step size back into a buffer."""
        if self.learns_scale:
            value = self.scale.detach().clone()
            del self.scale
            self.register_buffer("scale", value)

    def _require_calibrated(self) -> None:
        if not self.calibrated:
            raise UncalibratedError(
                f"quantizer '{self.name or '<unnamed>'}' has no range: run lidar_ptq.calibrate(model, data) "
                "before using the model in quantize mode, or disable this quantizer in the config")

    # ----- reporting / export ------------------------------------------------------------
    def amax(self) -> torch.Tensor:
        """Largest representable magnitude (per channel when per-channel)."""
        self._require_calibrated()
        s = self.scale.detach()
        return torch.maximum((self.spec.qmax - self.zero_point) * s, (self.zero_point - self.spec.qmin) * s)

    def quant_params(self) -> dict[str, Any]:
        """Readable parameters for summaries and exporters."""
        out: dict[str, Any] = {"name": self.name, **self.spec.to_dict(), "axis": self.channel_axis,
                               "calibrated": self.calibrated}
        if self.calibrated:
            out["scale"] = self.scale.detach().cpu().reshape(-1).tolist()
            out["zero_point"] = self.zero_point.cpu().reshape(-1).to(torch.int64).tolist()
            out["amax"] = self.amax().cpu().reshape(-1).tolist()
        return out

    def extra_repr(self) -> str:
        gran = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        state = "calibrated" if self.calibrated else "uncalibrated"
        flag = "" if self.enabled else ", disabled"
        return (f"{self.spec.bits}bit, {'signed' if self.spec.signed else 'unsigned'}, "
                f"{'sym' if self.spec.symmetric else 'asym'}, {gran}, {self.spec.observer}, {state}{flag}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Calibrated buffers change shape (empty -> [C]); resize before loading. A float
        # checkpoint has no quantizer keys: leave this quantizer uncalibrated, not an error.
        for key in ("scale", "zero_point"):
            full = prefix + key
            if full in state_dict:
                value = state_dict[full]
                if key == "scale" and self.learns_scale:
                    self.scale = nn.Parameter(value.detach().clone().to(self.scale.device))
                else:
                    setattr(self, key, value.detach().clone().to(getattr(self, key).device))
        present = [k for k in (prefix + "scale", prefix + "zero_point") if k in state_dict]
        if present:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)


@contextlib.contextmanager
def temporary_quant_mode(modules: nn.Module | Iterable[nn.Module], mode: QuantMode | str) -> Iterator[None]:
    """Every quantizer inside ``modules`` in ``mode`` for the duration; each gets its own mode back after
    (``lidar_ptq.set_quant_mode`` switches a model for good)."""
    mode = QuantMode(mode)
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    previous = {q: q.mode for root in roots for q in root.modules() if isinstance(q, FakeQuantizer)}
    for q in previous:
        q.mode = mode
    try:
        yield
    finally:
        for q, old in previous.items():
            q.mode = old
