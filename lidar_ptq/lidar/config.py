"""What a LiDAR-PTQ run is told: the user-facing ``LidarPTQConfig`` with its expert sub-configs, and
``PTQRecipe``, the executable form ``run_ptq`` runs for LiDAR-PTQ and the baselines alike.

A recipe file (configs/quant/ptq/*.json) holds the same keys as ``LidarPTQConfig``; a sub-config is a
nested dict there (``"ranges": {"frames": 8}``) and a dotted key on the command line
(``--recipe-options ranges.frames=8``). What each stage does and what it was measured to
be worth: docs/method.md.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from ..errors import RecipeError
from ..recon.engine import ReconConfig
from .tgpl import TaskGuidedPositiveLoss, TGPLConfig

Sub = TypeVar("Sub")

# clipping rules: "maxmin" (none), "lp<p>" (Lp-error search), "pct<q>" (q-th percentile of |x|);
# "<rule>@all" takes activation statistics over every site instead of the active ones
DEFAULT_RANGE_RULES = ("maxmin", "lp2", "lp3", "lp4", "pct99.9", "pct99.99",
                       "maxmin@all", "lp2@all", "lp3@all", "pct99.99@all")


@dataclass
class PTQRecipe:
    """What ``run_ptq`` executes, for LiDAR-PTQ and the baselines alike (``LidarPTQConfig.recipe()`` and
    ``lidar_ptq.lidar.recipes`` make them): the quant config, where ranges are calibrated, the range
    candidates and the loss that judges them and guards the later stages, bias correction, and
    reconstruction (None: calibration only)."""
    name: str
    quant: dict[str, Any]
    recon: ReconConfig | None = None
    sparse_calibration: bool = False
    calib_frames: int = 256
    source: dict[str, Any] = field(default_factory=dict)  # the dict it was made from (saved with results)
    range_candidates: dict[str, dict[str, Any]] = field(default_factory=dict)  # rule -> its quant config
    select_loss: Any = None  # fn(quant_output, float_output, batch) -> scalar: judges and guards
    equalize: tuple[str, ...] = ()  # module patterns whose input channels are equalized
    equalize_alpha: float = 0.75
    bias_correction: bool = False
    search_frames: int | None = 16  # the range search judges on this many frames (bounds its cost)
    recon_frames: int | None = None  # reconstruction fits on this many frames (bounds its memory)
    guards: bool = False  # undo bias correction / reconstruction when they raise the task loss
    fp16_budget: float | None = None  # plan FP16 layers to this fraction of the all-INT8 task loss


@dataclass(frozen=True)
class EqualizeOptions:
    """Input equalization: the layers whose input channels are equalized and SmoothQuant's migration
    strength (max|X_c|^alpha / max|W_c|^(1-alpha)); docs/method.md ("Input equalization")."""
    patterns: tuple[str, ...] = ("*voxel_encoder*",)
    alpha: float = 0.75


@dataclass(frozen=True)
class RangeSearchOptions:
    """The range search: the candidate clipping rules and how many calibration frames judge them
    (its cost is rules x frames forwards); docs/method.md ("Range search")."""
    rules: tuple[str, ...] = DEFAULT_RANGE_RULES
    frames: int | None = 16


@dataclass(frozen=True)
class ReconstructionOptions:
    """Reconstruction (TGPL and adaptive rounding): how many calibration frames it fits on (its memory
    holds two activation sets per frame) and any ``ReconConfig`` setting (``iterations``,
    ``batch_size``, ``output_loss_every``, ``output_loss_weight``, ...);
    docs/method.md ("TGPL", "Adaptive rounding")."""
    frames: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> ReconstructionOptions:
        """The recipe form: one flat dict, ``frames`` beside the ``ReconConfig`` keys."""
        valid = {f.name for f in fields(ReconConfig)}
        unknown = sorted(set(spec) - valid - {"frames"})
        if unknown:
            raise RecipeError(f"unknown reconstruction key(s) {unknown} in the PTQ recipe ('recon'); valid: "
                              f"{sorted(valid | {'frames'})}")
        return cls(spec.get("frames"), {k: v for k, v in spec.items() if k != "frames"})


def sub_config(cls: type[Sub], value: Sub | Mapping[str, Any] | None, key: str) -> Sub:
    """A sub-config from its dataclass, its recipe dict (unknown keys are a RecipeError) or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise RecipeError(f"'{key}' in the PTQ recipe must be a dict of {cls.__name__} settings, got {value!r}")
    from_dict = getattr(cls, "from_dict", None)  # a sub-config whose recipe form is not its fields
    if from_dict is not None:
        return from_dict(value)
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - valid)
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown} in '{key}' of the PTQ recipe; valid: {sorted(valid)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})


@dataclass
class LidarPTQConfig:
    """LiDAR-PTQ's settings: bit-widths, calibration frames, one switch per stage, the FP16 budget, and
    one sub-config per stage for its expert knobs.

    Stages (docs/method.md): ``sparse_calibration`` (ranges over active sites), ``equalize_inputs``,
    ``bias_correction``, ``range_search`` (judged by the task loss), ``tgpl`` (the task loss as
    reconstruction's output loss), ``adaptive_rounding``, ``guards`` (bias correction and reconstruction
    are undone when they raise the task loss). Bias correction, TGPL in reconstruction and the guards are
    off by default: none improved mAP by a resolved margin in the benchmark (docs/benchmarks.md), and
    TGPL and the guards cost more than half of the default's time; ``lidar_ptq_paper.json`` turns TGPL on.
    ``fp16_budget`` (None: every layer INT8) plans the layers that deploy in FP16: the
    fewest that bring the held-out task loss to this fraction of the all-INT8 loss
    (docs/precision_plan.md). ``overrides``: quant-config patterns (e.g. keep a layer float).

    Sub-configs (a dataclass or its dict): ``equalize`` (``EqualizeOptions``), ``ranges``
    (``RangeSearchOptions``), ``task_loss`` (``TGPLConfig``: the loss the range search, guards,
    reconstruction and precision plan share), ``recon`` (``ReconstructionOptions``; a recipe writes it
    flat, e.g. ``{"frames": 8, "iterations": 2000}``).
    """
    w_bits: int = 8
    a_bits: int = 8
    calib_frames: int = 256  # a small fraction of the training set, as in the paper
    sparse_calibration: bool = True
    equalize_inputs: bool = True  # not in the paper; a no-op without a layer matching equalize.patterns
    bias_correction: bool = False  # not in the paper
    range_search: bool = True
    tgpl: bool = False  # a paper stage; on in lidar_ptq_paper.json
    adaptive_rounding: bool = True  # AdaRound at every bit-width, as in the paper
    guards: bool = False  # not in the paper; worth turning on with bias_correction
    fp16_budget: float | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    equalize: EqualizeOptions = field(default_factory=EqualizeOptions)
    ranges: RangeSearchOptions = field(default_factory=RangeSearchOptions)
    task_loss: TGPLConfig = field(default_factory=TGPLConfig)
    recon: ReconstructionOptions = field(default_factory=ReconstructionOptions)

    def __post_init__(self) -> None:
        self.equalize = sub_config(EqualizeOptions, self.equalize, "equalize")
        self.ranges = sub_config(RangeSearchOptions, self.ranges, "ranges")
        self.task_loss = sub_config(TGPLConfig, self.task_loss, "task_loss")
        self.recon = sub_config(ReconstructionOptions, self.recon, "recon")

    def quant_config(self, clipping: str = "maxmin") -> dict[str, Any]:
        """The quant config of stages 1-2: max-min ranges (over active sites when sparse), clipped by
        the rule ``clipping`` (see ``RangeSearchOptions.rules``)."""
        clipping, _, sites = clipping.partition("@")
        if sites not in ("", "active", "all"):
            raise ValueError(f"unknown sites {sites!r} in clipping rule: use '<rule>', '<rule>@active' or '<rule>@all'")
        w_observer, w_kwargs = "minmax", {}
        a_observer, a_kwargs = "minmax", {"sparse": self.sparse_calibration and sites != "all"}
        if clipping.startswith("lp"):
            p = float(clipping[2:])
            w_observer, w_kwargs = "lp_search", {"p": p}
            a_observer, a_kwargs = "lp_search", {**a_kwargs, "p": p}
        elif clipping.startswith("pct"):
            a_observer, a_kwargs = "percentile", {**a_kwargs, "percentile": float(clipping[3:])}
        elif clipping != "maxmin":
            raise ValueError(f"unknown clipping rule {clipping!r}: use 'maxmin', 'lp<p>' or 'pct<q>'")
        return {
            "weight": {"bits": self.w_bits, "per_channel": True, "symmetric": True, "observer": w_observer,
                       "observer_kwargs": w_kwargs},
            "input": {"bits": self.a_bits, "symmetric": True, "observer": a_observer, "observer_kwargs": a_kwargs},
            "overrides": dict(self.overrides),
        }

    def recon_config(self) -> ReconConfig | None:
        """Stages 3-4 as one reconstruction config, or None when both are off."""
        if not (self.tgpl or self.adaptive_rounding):
            return None
        settings: dict[str, Any] = {"granularity": "block", "drop_prob": 1.0, "learn_act_scale": True,
                                    "rounding": "adaround" if self.adaptive_rounding else "nearest"}
        if self.tgpl:
            settings["output_loss"] = TaskGuidedPositiveLoss(self.task_loss)
        settings.update(self.recon.settings)
        return ReconConfig(**settings)

    def recipe(self, name: str | None = None) -> PTQRecipe:
        candidates: dict[str, dict[str, Any]] = {}
        for rule in self.ranges.rules if self.range_search else ():
            config = self.quant_config(rule)
            if config not in candidates.values():  # e.g. "lp2@all" is "lp2" without sparse calibration
                candidates[rule] = config
        recon = self.recon_config()
        judged = bool(candidates) or self.bias_correction or recon is not None or self.fp16_budget is not None
        return PTQRecipe(name or f"lidar_ptq_w{self.w_bits}a{self.a_bits}", self.quant_config(), recon,
                         self.sparse_calibration, self.calib_frames, range_candidates=candidates,
                         select_loss=TaskGuidedPositiveLoss(self.task_loss) if judged else None,
                         equalize=tuple(self.equalize.patterns) if self.equalize_inputs else (),
                         equalize_alpha=self.equalize.alpha, bias_correction=self.bias_correction,
                         search_frames=self.ranges.frames, recon_frames=self.recon.frames,
                         guards=self.guards, fp16_budget=self.fp16_budget)
