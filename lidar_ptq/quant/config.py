"""Model-level quantization config: defaults plus per-module overrides by name pattern.

A config is a plain dict (so it lives in JSON, YAML or an mmengine config)::

    {
      "weight": {"bits": 8, "per_channel": True, "observer": "minmax"},
      "input":  {"bits": 8, "observer": "sparse_minmax"},
      "overrides": {                      # fnmatch patterns on module names, applied in order
        "backbone.blocks.0.*": {"weight": {"bits": 8}, "input": {"bits": 8}},
        "head.*": {"enable": False},      # keep in float
      },
    }
"""
from __future__ import annotations

import copy
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

from ..errors import QuantConfigError
from .spec import QuantSpec

DEFAULT_WEIGHT = QuantSpec(bits=8, signed=True, symmetric=True, per_channel=True, observer="minmax")
DEFAULT_INPUT = QuantSpec(bits=8, signed=True, symmetric=True, per_channel=False, observer="minmax")
# Extra activation roles some twins have (attention). Each is the module's input spec with these
# changes on top, so "input": {"bits": 4} also moves them unless they are set explicitly.
DEFAULT_ROLES: dict[str, dict[str, Any]] = {
    "attention": {},                   # operands of Q.K^T and attn.V
    "softmax": {"signed": False},      # attention probabilities, in [0, 1]
}
_SPEC_KEYS = {"weight", "input", *DEFAULT_ROLES}
_TOP_KEYS = {*_SPEC_KEYS, "overrides"}
_OVERRIDE_KEYS = {*_SPEC_KEYS, "enable"}


@dataclass
class ModuleQuantPlan:
    """What ``quantize`` does with one module."""

    enable: bool
    weight: QuantSpec
    input: QuantSpec
    roles: dict[str, QuantSpec] = field(default_factory=dict)


@dataclass
class QuantConfig:
    weight: QuantSpec = DEFAULT_WEIGHT
    input: QuantSpec = DEFAULT_INPUT
    roles: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_ROLES))
    overrides: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> QuantConfig:
        """Validate a plain dict; unknown keys fail with the list of valid ones."""
        unknown = sorted(set(cfg) - _TOP_KEYS)
        if unknown:
            raise QuantConfigError(f"unknown quant config key(s) {unknown}; valid keys are {sorted(_TOP_KEYS)}")
        overrides: list[tuple[str, dict[str, Any]]] = []
        for pattern, rule in dict(cfg.get("overrides") or {}).items():
            if not isinstance(rule, Mapping):
                raise TypeError(f"override {pattern!r} must be a dict like {{'enable': False}}, got {rule!r}")
            bad = sorted(set(rule) - _OVERRIDE_KEYS)
            if bad:
                raise QuantConfigError(f"override {pattern!r} has unknown key(s) {bad}; "
                                       f"valid keys are {sorted(_OVERRIDE_KEYS)}")
            overrides.append((str(pattern), dict(rule)))
        roles = {role: {**updates, **dict(cfg.get(role) or {})} for role, updates in DEFAULT_ROLES.items()}
        config = cls(weight=DEFAULT_WEIGHT.updated(cfg.get("weight")),
                     input=DEFAULT_INPUT.updated(cfg.get("input")), roles=roles, overrides=overrides)
        config.plan_for("")  # validates the role settings
        for _, rule in overrides:  # validate override specs eagerly, not at first match
            config.weight.updated(rule.get("weight"))
            config.input.updated(rule.get("input"))
            for role in DEFAULT_ROLES:
                config.input.updated(rule.get(role))
        return config

    def plan_for(self, module_name: str) -> ModuleQuantPlan:
        """Resolve defaults and every matching override (later ones win) for a module."""
        plan = ModuleQuantPlan(enable=True, weight=self.weight, input=self.input)
        role_updates = copy.deepcopy(self.roles)
        for pattern, rule in self.overrides:
            if fnmatch.fnmatchcase(module_name, pattern):
                plan.enable = bool(rule.get("enable", plan.enable))
                plan.weight = plan.weight.updated(rule.get("weight"))
                plan.input = plan.input.updated(rule.get("input"))
                for role in role_updates:
                    role_updates[role].update(rule.get(role) or {})
        plan.roles = {role: plan.input.updated(updates) for role, updates in role_updates.items()}
        return plan

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.to_dict(), "input": self.input.to_dict(), **copy.deepcopy(self.roles),
                "overrides": {p: copy.deepcopy(r) for p, r in self.overrides}}


def _bits(w: int, a: int) -> dict[str, Any]:
    return {"weight": {"bits": w}, "input": {"bits": a}}


PRESETS: dict[str, dict[str, Any]] = {
    "w8a8": _bits(8, 8),
    "w4a8": _bits(4, 8),
    "w4a4": _bits(4, 4),
    "w8a8_sparse_lp": {"weight": {"bits": 8}, "input": {"bits": 8, "observer": "lp_search",
                                                        "observer_kwargs": {"sparse": True}}},
}

ConfigLike = Union[None, str, Path, Mapping[str, Any], QuantConfig]


def load_quant_config(config: ConfigLike) -> QuantConfig:
    """Accept a QuantConfig, a dict, a preset name (``"w8a8"``) or a JSON file path."""
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, Mapping):
        return QuantConfig.from_dict(config)
    text = str(config)
    if text in PRESETS:
        return QuantConfig.from_dict(PRESETS[text])
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        return QuantConfig.from_dict(json.loads(path.read_text()))
    raise ValueError(f"cannot load quant config {text!r}: give a dict, a JSON file, or a preset "
                     f"name from {sorted(PRESETS)}")

