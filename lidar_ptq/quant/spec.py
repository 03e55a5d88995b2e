"""What a quantizer is asked to do: a small, validated, serialisable description."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping


@dataclass(frozen=True)
class QuantSpec:
    """Settings of one fake quantizer.

    ``per_channel`` asks for one scale per channel; the module that owns the
    quantizer decides which axis that is (output channels for weights).
    ``learn_scale`` turns the step size into an LSQ parameter.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    per_channel: bool = False
    observer: str = "minmax"
    observer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    learn_scale: bool = False
    enable: bool = True
    scheme: str = "uniform"  # "uniform" or "log2" (powers of two below amax, for softmax outputs)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in [2, 8], got {self.bits!r}; "
                             "disable the quantizer (enable=False) to keep a tensor in float")
        if self.scheme not in ("uniform", "log2"):
            raise ValueError(f"scheme must be 'uniform' or 'log2', got {self.scheme!r}")
        if not isinstance(self.observer_kwargs, Mapping):
            raise TypeError(f"observer_kwargs must be a mapping, got {type(self.observer_kwargs).__name__}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    def updated(self, changes: Mapping[str, Any] | None) -> QuantSpec:
        """Return a copy with ``changes`` applied; unknown keys are a clear error."""
        if not changes:
            return self
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise KeyError(f"unknown quantizer setting(s) {unknown}; valid settings are {sorted(known)}")
        return replace(self, **dict(changes))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["observer_kwargs"] = dict(self.observer_kwargs)
        return out
