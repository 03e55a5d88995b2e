"""PTQ recipes: LiDAR-PTQ and the baselines it is compared with, as one data structure.

A recipe says how to quantize (the quant config), how to calibrate (over active
BEV sites or all of them) and whether/how to reconstruct. ``run_ptq`` executes
any recipe; LiDAR-PTQ and its ablations are recipes made by ``LidarPTQConfig``.
Recipes load from JSON files (configs/quant/ptq/*.json) or dicts:

    {"method": "lidar_ptq", "w_bits": 8, "a_bits": 8, "recon": {"iterations": 2000}}
    {"method": "qdrop", "w_bits": 4, "a_bits": 8, "recon": {"iterations": 2000}}
    {"method": "percentile", "equalize_inputs": true}   (any method: input-channel equalization)

Baselines follow common deployment practice: symmetric INT8 with per-channel
weight max and per-tensor activations calibrated by max-min, TensorRT's entropy,
or a percentile, over every site (empty pillars included); BRECQ and QDrop add
block reconstruction from the max-min start.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..recon.engine import ReconConfig
from .config import EqualizeOptions, LidarPTQConfig, PTQRecipe, ReconstructionOptions, sub_config
from .tgpl import TaskGuidedPositiveLoss

ACTIVATION_OBSERVERS = {"maxmin": "minmax", "entropy": "entropy", "percentile": "percentile",
                        "brecq": "minmax", "qdrop": "minmax"}
BASELINES = tuple(ACTIVATION_OBSERVERS)
METHODS = ("lidar_ptq", *BASELINES)


def _baseline(method: str, spec: Mapping[str, Any]) -> PTQRecipe:
    w_bits, a_bits = int(spec.get("w_bits", 8)), int(spec.get("a_bits", 8))
    observer_kwargs = dict(spec.get("observer_kwargs", {}))
    quant = {"weight": {"bits": w_bits, "per_channel": True, "symmetric": True, "observer": "minmax"},
             "input": {"bits": a_bits, "symmetric": True, "observer": ACTIVATION_OBSERVERS[method],
                       "observer_kwargs": observer_kwargs},
             "overrides": dict(spec.get("overrides", {}))}
    recon_options = sub_config(ReconstructionOptions, spec.get("recon"), "recon")
    recon = None
    if method in ("brecq", "qdrop"):
        recon = ReconConfig.from_method(method, **dict(recon_options.settings))
    elif spec.get("recon"):
        raise RecipeError(f"method {method!r} does not reconstruct; drop 'recon' or use brecq/qdrop/lidar_ptq")
    equalize = sub_config(EqualizeOptions, spec.get("equalize"), "equalize")
    fp16_budget = spec.get("fp16_budget")
    # a precision plan needs the task loss; the baseline's own stages stay unguarded (PTQRecipe's default)
    return PTQRecipe(f"{method}_w{w_bits}a{a_bits}", quant, recon, False, int(spec.get("calib_frames", 256)),
                     dict(spec), equalize=tuple(equalize.patterns) if spec.get("equalize_inputs") else (),
                     equalize_alpha=equalize.alpha, bias_correction=bool(spec.get("bias_correction", False)),
                     recon_frames=recon_options.frames,
                     select_loss=TaskGuidedPositiveLoss() if fp16_budget is not None else None,
                     fp16_budget=fp16_budget)


def _check_values(spec: Mapping[str, Any]) -> None:
    """Bit-widths and the FP16 budget, checked before anything runs (not after the float evaluation); the
    sub-configs check their own keys when they are built."""
    for key in ("w_bits", "a_bits"):
        value = spec.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
            raise RecipeError(f"{key}={value!r} in the PTQ recipe: use an integer bit-width from 2 to 8 "
                              "(INT8 engines run 8; 4 is weight-only compression)")
    budget = spec.get("fp16_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
        raise RecipeError(f"fp16_budget={budget!r} in the PTQ recipe: use a fraction > 0 of the all-INT8 task loss "
                          "(e.g. 0.3), or leave it out to deploy every layer in INT8")


# top-level keys a recipe might carry that belong to a sub-config, and where each is set
MOVED_KEYS = {"search_frames": "ranges.frames", "range_rules": "ranges.rules", "recon_frames": "recon.frames",
              "equalize_patterns": "equalize.patterns", "equalize_alpha": "equalize.alpha",
              "tgpl_config": "task_loss", "tgpl_weight": "recon.output_loss_weight"}


def _reject_unknown(spec: Mapping[str, Any], allowed: set[str], method: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        moved = [f"{key} is now {MOVED_KEYS[key]}" for key in unknown if key in MOVED_KEYS]
        hint = f" ({'; '.join(moved)})" if moved else ""
        raise RecipeError(f"unknown key(s) {unknown} in a {method!r} recipe{hint}; valid: {sorted(allowed)}")


def recipe_from_dict(spec: Mapping[str, Any]) -> PTQRecipe:
    """A recipe from its dict form; unknown methods or keys are errors that list the valid ones."""
    method = spec.get("method", "lidar_ptq")
    if method not in METHODS:
        raise RecipeError(f"unknown PTQ method {method!r}; choose from {list(METHODS)}")
    _check_values(spec)
    if method != "lidar_ptq":
        _reject_unknown(spec, {"method", "name", "w_bits", "a_bits", "observer_kwargs", "overrides", "recon",
                               "calib_frames", "equalize_inputs", "equalize", "bias_correction", "fp16_budget"},
                        method)
        recipe = _baseline(method, spec)
    else:
        known = {f.name for f in fields(LidarPTQConfig)}
        _reject_unknown(spec, known | {"method", "name"}, method)
        recipe = LidarPTQConfig(**{k: v for k, v in spec.items() if k in known}).recipe()
    if spec.get("name"):
        recipe.name = str(spec["name"])
    recipe.source = dict(spec)
    return recipe


def load_recipe(recipe: str | Path | Mapping[str, Any] | LidarPTQConfig | PTQRecipe | None) -> PTQRecipe:
    """A recipe from a JSON file, a method name (defaults), a dict, a LidarPTQConfig, or None (LiDAR-PTQ W8A8)."""
    if recipe is None:
        return recipe_from_dict({"method": "lidar_ptq"})
    if isinstance(recipe, PTQRecipe):
        return recipe
    if isinstance(recipe, LidarPTQConfig):
        return recipe.recipe()
    if isinstance(recipe, Mapping):
        return recipe_from_dict(recipe)
    text = str(recipe)
    if text in METHODS:
        return recipe_from_dict({"method": text})
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"PTQ recipe {text!r} is neither a file nor a method name ({list(METHODS)})")
    try:
        return recipe_from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise RecipeError(f"PTQ recipe {path} is not valid JSON: {err}") from err


def merge_options(spec: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """Apply dotted ``key.sub=value`` overrides (from the command line) to a recipe dict."""
    merged = json.loads(json.dumps(dict(spec)))
    for dotted, value in options.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return merged


def resolve_recipe(recipe: str | Path | Mapping[str, Any] | PTQRecipe | None, calib_frames: int | None = None,
                   options: Mapping[str, Any] | None = None) -> PTQRecipe:
    """``load_recipe`` plus command-line style overrides (dotted options, calibration frames)."""
    if isinstance(recipe, PTQRecipe):
        if options or calib_frames is not None:
            raise RecipeError("overrides apply to recipe dicts/files/names, not to a built PTQRecipe")
        return recipe
    spec = dict(recipe) if isinstance(recipe, Mapping) else load_recipe(recipe).source
    spec = merge_options(spec, options or {})
    if calib_frames is not None:
        spec["calib_frames"] = int(calib_frames)
    return load_recipe(spec)
