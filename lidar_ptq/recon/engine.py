"""One reconstruction loop for AdaRound, BRECQ, QDrop and FlexRound, chosen by configuration.

For each unit in order: capture its float output (target) and its input from
the model whose earlier units are already reconstructed (or from the float
model), then learn the weight rounding (and, optionally, LSQ activation step
sizes with QDrop) so the quantized unit reproduces the target. Finished units
keep a hard rounding attached; ``freeze`` writes it into the weights.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..batches import call_model
from ..lockstep import Arrival, Lane, Lockstep
from ..quant.model import iter_quantizers, set_quant_mode
from ..quant.modules import QuantModuleMixin
from ..quant.quantizer import QuantMode
from ..quant.rounding import AdaRound, attach_rounding, bake_rounding
from ..quant.tying import shared_input_groups, sync, tie, untie
from .cache import CaptureBuilder, Captured, TensorStore, primary_output
from .losses import OutputLoss, TaskLoss, fisher_loss, lp_loss
from .units import Unit, find_units, refine_units

logger = logging.getLogger(__name__)


ADAROUND_TRAVEL = 2.0  # lr x iterations of the AdaRound logits at short budgets (see ReconConfig.rounding_lr)


@dataclass
class ReconConfig:
    """Every knob of the reconstruction; defaults are the published ones (BRECQ/QDrop)."""

    granularity: str = "block"            # "layer" (AdaRound) or "block" (BRECQ/QDrop)
    unit_names: Sequence[str] | None = None
    max_block_layers: int = 3
    rounding: str = "adaround"            # "adaround", "flexround" or "nearest"
    iterations: int = 20000
    batch_size: int = 32
    # None: 1e-3 (published) for FlexRound; for AdaRound max(1e-3, ADAROUND_TRAVEL / iterations), see
    # ``rounding_lr``.
    lr_rounding: float | None = None
    lr_act_scale: float = 4e-5
    learn_act_scale: bool = True          # LSQ step sizes of the unit's activation quantizers
    drop_prob: float = 1.0                # QDrop: probability an activation is quantized (1 = BRECQ)
    round_lambda: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    loss: str = "mse"                     # "mse", "lp" (with p) or "fisher"
    p: float = 2.0
    input_from: str = "quantized"         # "quantized" (asymmetric) or "float"
    task_loss: TaskLoss | None = None     # for loss="fisher"
    output_loss: OutputLoss | None = None  # loss on the final model output, added to the unit loss
    output_loss_weight: float = 1.0
    output_loss_every: int = 1            # output-loss (full model) step every k iterations, local steps between
    # Quantizers reading one tensor share the first reader's learned step (lidar_ptq.quant.tying), so a
    # deployed engine can quantize that tensor once; False learns every reader's step on its own.
    tie_shared_inputs: bool = True
    cache_budget_mb: float = float("inf")
    cache_dir: str | None = None
    resume_dir: str | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {"loss": ("mse", "lp", "fisher"), "input_from": ("quantized", "float"),
                  "rounding": ("adaround", "flexround", "nearest")}
        for key, valid in checks.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"ReconConfig.{key}={getattr(self, key)!r}; choose from {valid}")
        if self.output_loss_every < 1:
            raise ValueError(f"output_loss_every must be >= 1, got {self.output_loss_every}")
        if not 0.0 < self.drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in (0, 1], got {self.drop_prob}")
        if self.loss == "fisher" and self.task_loss is None:
            raise ValueError("loss='fisher' needs task_loss=fn(model_output, batch)")

    def rounding_lr(self) -> float:
        """The rounding variables' learning rate.

        Adam moves an AdaRound logit by about ``lr`` per step and a logit must travel ~2 from its start
        for the soft rounding to settle at 0 or 1. The published 1e-3 does that in 20 000 steps; at a
        short budget it leaves nearly every weight soft, so the optimisation sees ~float weights and
        the deployed hard rounding is one it never saw (measured on a W4A8 toy model, 200 steps: 20.4 dB
        at 1e-3, worse than nearest rounding's 21.5, and 24.2 dB at the scaled 1e-2).
        """
        if self.lr_rounding is not None:
            return self.lr_rounding
        if self.rounding == "adaround":
            return max(1e-3, ADAROUND_TRAVEL / max(self.iterations, 1))
        return 1e-3

    @classmethod
    def from_method(cls, method: str, **overrides: Any) -> ReconConfig:
        """Config of a named method (``adaround``, ``brecq``, ``qdrop``, ``flexround``) plus overrides."""
        if method not in RECON_METHODS:
            raise KeyError(f"unknown reconstruction method {method!r}; choose from {sorted(RECON_METHODS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise KeyError(f"unknown reconstruction setting(s) {unknown}; valid: {sorted(known)}")
        return cls(**{**RECON_METHODS[method], **overrides})


RECON_METHODS: dict[str, dict[str, Any]] = {
    "adaround": {"granularity": "layer", "rounding": "adaround", "learn_act_scale": False, "drop_prob": 1.0},
    "brecq": {"granularity": "block", "rounding": "adaround", "learn_act_scale": True, "drop_prob": 1.0},
    "qdrop": {"granularity": "block", "rounding": "adaround", "learn_act_scale": True, "drop_prob": 0.5},
    "flexround": {"granularity": "block", "rounding": "flexround", "learn_act_scale": True, "drop_prob": 0.5},
}


@dataclass
class UnitReport:
    name: str
    layers: int
    first_loss: float
    final_loss: float
    seconds: float
    # AdaRound only: share of weights whose soft rounding h was still between 0.01 and 0.99 when the unit
    # finished (the optimisation ran on soft weights, so a large share means the deployed hard rounding
    # differs from what was optimised: raise ``iterations``), and share rounded away from nearest.
    rounding_undecided: float | None = None
    rounding_flipped: float | None = None


@dataclass
class ReconReport:
    units: list[UnitReport] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    tied_quantizers: list[list[str]] = field(default_factory=list)  # groups sharing one step (leader first)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _beta(step: int, cfg: ReconConfig) -> float | None:
    """AdaRound's annealed exponent: None during warm-up (no regulariser), then start -> end."""
    warm = int(cfg.warmup * cfg.iterations)
    if step < warm:
        return None
    progress = (step - warm) / max(cfg.iterations - warm, 1)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - progress)


def _capture_output_grads(model: nn.Module, unit: nn.Module, data: Sequence[Any], task_loss: TaskLoss,
                          budget: float, cache_dir: str | None) -> TensorStore:
    """Gradient of the task loss w.r.t. the unit's float output, per sample (Fisher weights)."""
    store = TensorStore(budget, cache_dir)

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        leaf = primary_output(output).detach().requires_grad_(True)
        leaf.register_hook(lambda g: store.append(g))
        return (leaf, *output[1:]) if isinstance(output, (tuple, list)) else leaf

    flags = {p: p.requires_grad for p in model.parameters()}
    handle = unit.register_forward_hook(hook)
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in data:
                task_loss(call_model(model, batch), batch).backward()
    finally:
        handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return store.finalize()


class _UnitOptimiser:
    """Learnable state of one unit: rounding variables and (optionally) LSQ activation steps."""

    def __init__(self, model: nn.Module, unit: Unit, cfg: ReconConfig) -> None:
        self.unit, self.cfg = unit, cfg
        self.layers = unit.quant_layers()
        # every float weight and bias of the model stays fixed (an output loss back-propagates through
        # the whole model); only this unit's quantization state, attached below, learns
        self.frozen = [p for p in model.parameters() if p.requires_grad]
        for p in self.frozen:
            p.requires_grad_(False)
        self.roundings = [attach_rounding(layer.weight_quantizer, layer.float_weight, cfg.rounding)
                          for layer in self.layers]
        self.act_quantizers = [q for q in unit.activation_quantizers() if q.enabled and q.calibrated]
        for q in self.act_quantizers:
            if cfg.learn_act_scale and q.leader is None:  # followers use their leader's step
                q.enable_lsq()
            q.drop_prob = cfg.drop_prob
        round_params = [p for r in self.roundings if r is not None for p in r.parameters()]
        act_params = [q.scale for q in self.act_quantizers if q.learns_scale]
        self.optimisers: list[torch.optim.Optimizer] = []
        self.schedulers: list[Any] = []
        if round_params:
            self.optimisers.append(torch.optim.Adam(round_params, lr=cfg.rounding_lr()))
        if act_params:
            opt = torch.optim.Adam(act_params, lr=cfg.lr_act_scale)
            self.optimisers.append(opt)
            self.schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iterations,
                                                                              eta_min=0.0))

    @property
    def has_parameters(self) -> bool:
        return bool(self.optimisers)

    def regulariser(self, beta: float | None) -> torch.Tensor | float:
        if beta is None:
            return 0.0
        return sum(r.regularizer(beta) for r in self.roundings if isinstance(r, AdaRound))

    def step(self, loss: torch.Tensor) -> None:
        for opt in self.optimisers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimisers:
            opt.step()
        for sched in self.schedulers:
            sched.step()

    def rounding_state(self) -> tuple[float | None, float | None]:
        """(undecided, flipped) shares of this unit's AdaRound weights; (None, None) without AdaRound."""
        soft = [r for r in self.roundings if isinstance(r, AdaRound)]
        if not soft:
            return None, None
        total = undecided = flipped = 0
        with torch.no_grad():
            for r in soft:
                h = r.h()
                total += h.numel()
                undecided += int(((h > 0.01) & (h < 0.99)).sum())
                flipped += int(((r.alpha >= 0) != (r.initial_rest >= 0.5)).sum())
        return undecided / total, flipped / total

    def finish(self) -> None:
        """Hard rounding from now on; learned steps become buffers again; drop off."""
        for r in self.roundings:
            if r is not None:
                r.hard = True
                r.requires_grad_(False)
        for q in self.act_quantizers:
            q.drop_prob = 1.0
            q.disable_lsq()
        for p in self.frozen:
            p.requires_grad_(True)


def _unit_loss(cfg: ReconConfig, out: torch.Tensor, target: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    if cfg.loss == "fisher":
        return fisher_loss(out, target, grad)
    return lp_loss(out, target, 2.0 if cfg.loss == "mse" else cfg.p)


def _optimise_unit(model: nn.Module, unit: Unit, data: Sequence[Any], cfg: ReconConfig, target: Captured,
                   inputs_q: Captured | None, grads: TensorStore | None, device: torch.device,
                   float_outputs: dict[int, Any]) -> UnitReport:
    start = time.perf_counter()
    state = _UnitOptimiser(model, unit, cfg)
    n = len(target.output)
    gen = torch.Generator().manual_seed(cfg.seed)
    # Fisher weights are rescaled to unit mean square: confident models give tiny task-loss
    # gradients, which would otherwise let the rounding regulariser swamp the loss.
    grad_gain = 1.0 / max(grads.mean_square(), 1e-30) ** 0.5 if grads is not None else 1.0
    losses: list[float] = []
    iterations = cfg.iterations if state.has_parameters else 0
    bar = tqdm(range(iterations), desc=f"recon {unit.name}", disable=not cfg.progress, leave=False)
    for step in bar:
        beta = _beta(step, cfg)
        if cfg.output_loss is not None and step % cfg.output_loss_every == 0:
            loss = _output_loss_step(model, unit, data, cfg, target, step // cfg.output_loss_every, device,
                                     float_outputs)
        elif target.sparse:  # whole calibration batches: voxel counts differ between frames
            b = int(torch.randint(0, len(target.batch_rows), (1,), generator=gen))
            out = primary_output(unit.module(*_sparse_unit_inputs(inputs_q, target, b, cfg), **target.kwargs))
            loss = _unit_loss(cfg, out, target.batch_output(b, device), None)
        else:
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
            args = _unit_inputs(inputs_q, target.inputs, idx, cfg, device)
            out = primary_output(unit.module(*args, **target.kwargs))
            grad = grads.get(idx, device) * grad_gain if grads is not None else None
            loss = _unit_loss(cfg, out, target.output.get(idx, device), grad)
        total = loss + cfg.round_lambda * state.regulariser(beta)
        state.step(total)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4g}", beta="-" if beta is None else f"{beta:.1f}")
    undecided, flipped = state.rounding_state()
    state.finish()
    # mean of the first and last few steps: single minibatch losses are too noisy to compare
    window = max(1, min(20, len(losses) // 5))
    first = sum(losses[:window]) / window if losses else float("nan")
    last = sum(losses[-window:]) / window if losses else float("nan")
    return UnitReport(unit.name, len(state.layers), first, last, round(time.perf_counter() - start, 2),
                      undecided, flipped)


def _unit_inputs(inputs_q: Captured | None, inputs_fp: list[TensorStore], idx: torch.Tensor, cfg: ReconConfig,
                 device: torch.device) -> list[torch.Tensor]:
    fp = [store.get(idx, device) for store in inputs_fp]
    if inputs_q is None:
        return fp
    q = [store.get(idx, device) for store in inputs_q.inputs]
    if cfg.drop_prob >= 1.0:
        return q
    # QDrop: mix the quantized-path and float-path inputs element-wise with probability p
    return [torch.where(torch.rand(a.shape, device=device) < cfg.drop_prob, a, b) for a, b in zip(q, fp)]


def _sparse_unit_inputs(inputs_q: Captured | None, target: Captured, b: int, cfg: ReconConfig) -> list[Any]:
    """Inputs of calibration batch ``b`` for a sparse unit; QDrop mixes the features element-wise."""
    fp = target.sparse_inputs[b]
    if inputs_q is None:
        return fp
    q = inputs_q.sparse_inputs[b]
    if cfg.drop_prob >= 1.0:
        return q
    return [a.replace_feature(torch.where(torch.rand(a.features.shape, device=a.features.device) < cfg.drop_prob,
                                          a.features, f.features)) for a, f in zip(q, fp)]


def _output_loss_step(model: nn.Module, unit: Unit, data: Sequence[Any], cfg: ReconConfig, target: Captured,
                      step: int, device: torch.device, float_outputs: dict[int, Any]) -> torch.Tensor:
    """Full-model step: unit loss on the captured output + an output loss against the float model
    (whose outputs never change during reconstruction, so they are computed once per batch)."""
    b = step % len(data)
    batch = data[b]
    if b not in float_outputs:
        with torch.no_grad():
            set_quant_mode(model, QuantMode.FLOAT)
            float_outputs[b] = call_model(model, batch)
            set_quant_mode(model, QuantMode.QUANTIZE)
    float_out = float_outputs[b]
    seen: dict[str, torch.Tensor] = {}
    handle = unit.module.register_forward_hook(lambda m, a, o: seen.__setitem__("out", primary_output(o)))
    try:
        quant_out = call_model(model, batch)
    finally:
        handle.remove()
    unit_target = target.batch_output(b, device)
    unit_loss = _unit_loss(cfg, seen["out"], unit_target, None) if cfg.loss != "fisher" else 0.0
    return unit_loss + cfg.output_loss_weight * cfg.output_loss(quant_out, float_out, batch)


def _resume_path(cfg: ReconConfig) -> str | None:
    return os.path.join(cfg.resume_dir, "recon_state.pth") if cfg.resume_dir else None


def _save_resume(model: nn.Module, finished: list[str], reports: list[UnitReport], cfg: ReconConfig) -> None:
    path = _resume_path(cfg)
    if path is None:
        return
    os.makedirs(cfg.resume_dir, exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"finished": finished, "model": model.state_dict(), "reports": [asdict(r) for r in reports],
                "rounding": cfg.rounding}, tmp)
    os.replace(tmp, path)  # atomic: a kill never leaves half a file


def _load_resume(model: nn.Module, units: list[Unit], cfg: ReconConfig) -> tuple[list[str], list[UnitReport]]:
    path = _resume_path(cfg)
    if path is None or not os.path.isfile(path):
        return [], []
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["rounding"] != cfg.rounding:
        raise ValueError(f"resume state in {path} was made with rounding={state['rounding']!r}, "
                         f"not {cfg.rounding!r}; use another resume_dir or delete it")
    finished = list(state["finished"])
    by_name = {u.name: u for u in units}
    for name in finished:  # recreate the learned state so the saved tensors have somewhere to go
        if name not in by_name:
            raise ValueError(f"resume state in {path} names unit {name!r} that this model does not have")
        _UnitOptimiser(model, by_name[name], replace(cfg, progress=False)).finish()  # hard rounding, LSQ off
    model.load_state_dict(state["model"])
    logger.info("resuming reconstruction: %d unit(s) already done", len(finished))
    return finished, [UnitReport(**r) for r in state["reports"]]


def _captured(arrivals: list[Arrival], want_output: bool, budget: float, cache_dir: str | None) -> Captured:
    """A unit's inputs (and output) as every batch's lane brought them to it."""
    builder = CaptureBuilder(want_output=want_output, budget_bytes=budget, cache_dir=cache_dir)
    for arrival in arrivals:
        builder.add(arrival.args, arrival.kwargs, arrival.output)
    return builder.finish()


def reconstruct(model: nn.Module, data: Iterable[Any], config: ReconConfig | None = None,
                float_outputs: Sequence[Any] | None = None, **overrides: Any) -> ReconReport:
    """Reconstruct ``model`` (quantized and calibrated) unit by unit on calibration ``data``.

    ``data`` is an iterable of batches (tensor, tuple or dict, as for ``calibrate``);
    it is materialised once since every unit needs it again. ``float_outputs`` (one per batch) spares
    the output loss a float pass when the caller has them already. Returns per-unit losses.
    """
    cfg = replace(config or ReconConfig(), **overrides) if overrides else (config or ReconConfig())
    data = list(data)
    if not data:
        raise ValueError("reconstruction needs calibration data: got an empty iterable")
    uncalibrated = [n for n, q in iter_quantizers(model) if q.enabled and not q.calibrated]
    if uncalibrated:
        raise RuntimeError(f"run lidar_ptq.calibrate(model, data) before reconstruct(); uncalibrated: "
                           f"{uncalibrated[:5]}{' ...' if len(uncalibrated) > 5 else ''}")
    units = find_units(model, cfg.granularity, cfg.unit_names, cfg.max_block_layers)
    if cfg.granularity == "block" and not cfg.unit_names:
        units = refine_units(units, lambda: call_model(model, data[0]), cfg.max_block_layers)
    if not units:
        raise RuntimeError("no reconstruction unit found: quantize the model first")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    budget = cfg.cache_budget_mb * 2**20
    report = ReconReport()
    finished, report.units = _load_resume(model, units, cfg)
    report.resumed = list(finished)
    float_by_batch: dict[int, Any] = dict(enumerate(float_outputs or []))  # float output per batch (output loss)
    groups = shared_input_groups(model, lambda: call_model(model, data[0])) if cfg.tie_shared_inputs else []
    tie(groups)
    index_of = {u.name: i for i, u in enumerate(units)}
    bar = tqdm(total=len(units), initial=len(finished), desc="reconstruction", unit="unit", disable=not cfg.progress)

    def meet(name: str, module: nn.Module, arrivals: list[Arrival]) -> list[int]:
        """Every batch has reached this unit: capture, optimise it, let the quantized lanes recompute it."""
        unit, index = units[index_of[name]], index_of[name]
        if unit.name in finished:  # resumed: the quantized lanes ran it with its loaded learned state
            return []
        torch.manual_seed(cfg.seed + index)
        target = _captured(arrivals[:len(data)], True, budget, cfg.cache_dir)
        inputs_q = (_captured(arrivals[len(data):], False, budget, cfg.cache_dir)
                    if cfg.input_from == "quantized" else None)
        if cfg.loss == "fisher" and target.sparse:
            raise NotImplementedError(f"loss='fisher' is not supported for sparse unit {unit.name!r}; "
                                      "use 'mse' or an output_loss")
        set_quant_mode(model, QuantMode.FLOAT)
        grads = None
        try:
            with torch.enable_grad():
                grads = (_capture_output_grads(model, unit.module, data, cfg.task_loss, budget, cfg.cache_dir)
                         if cfg.loss == "fisher" else None)
                set_quant_mode(model, QuantMode.QUANTIZE)
                unit_report = _optimise_unit(model, unit, data, replace(cfg, seed=cfg.seed + index), target,
                                             inputs_q, grads, device, float_by_batch)
        finally:
            for c in (target, inputs_q):
                if c is not None:
                    c.close()
            if grads is not None:
                grads.close()
        sync(groups)  # before the resume checkpoint: saved followers carry their leader's step
        report.units.append(unit_report)
        finished.append(unit.name)
        bar.update(1)
        logger.info("unit %s: loss %.4g -> %.4g (%d layers, %.1fs)", unit.name, unit_report.first_loss,
                    unit_report.final_loss, unit_report.layers, unit_report.seconds)
        _save_resume(model, finished, report.units, cfg)
        return [a.lane for a in arrivals[len(data):]]

    # One forward per batch for every unit: float lanes give the targets (and float inputs), quantized
    # lanes the inputs from the model whose earlier units are already reconstructed.
    lanes = [Lane(batch, QuantMode.FLOAT) for batch in data]
    if cfg.input_from == "quantized":
        lanes += [Lane(batch, QuantMode.QUANTIZE) for batch in data]
    try:
        Lockstep(model, lanes, {u.name: u.module for u in units}, meet).run()
    finally:
        bar.close()
        untie(groups)
        set_quant_mode(model, QuantMode.QUANTIZE)
        model.train(was_training)
    report.units.sort(key=lambda r: index_of.get(r.name, len(units)))
    report.tied_quantizers = [[q.name for q in g] for g in groups]
    _warn_unconverged_rounding(report.units)
    return report


# Warn above this share of still-soft AdaRound weights. Measured on the W4A8 toy model (tests): the published
# lr 1e-3 at 200 steps leaves over 80% soft and is worse than nearest rounding, while the default scaled lr
# leaves 17-34% soft and gives the best output SQNR of every lr tried (200 steps, lr x steps = 2/5/10/20:
# 24.2/21.8/22.9/23.3 dB, the last with every weight decided); on the digits ResNet/ViT at 1000 steps the
# default leaves 18-50% soft in the worst unit. A share in between is normal, not a failure.
UNDECIDED_WARN_SHARE = 0.6


def _warn_unconverged_rounding(units: list[UnitReport], limit: float = UNDECIDED_WARN_SHARE) -> None:
    """AdaRound optimises soft weights; if most are still soft at the end, it optimised ~float weights and
    the deployed hard rounding is one it never saw (the published lr at a short budget)."""
    open_units = [u for u in units if u.rounding_undecided is not None and u.rounding_undecided > limit]
    if open_units:
        worst = max(open_units, key=lambda u: u.rounding_undecided or 0.0)
        logger.warning("adaptive rounding barely moved in %d of %d unit(s) (worst %s: %.0f%% of weights "
                       "still soft): it optimised nearly float weights, not the deployed rounding; raise "
                       "iterations or lr_rounding (None scales it to the budget)",
                       len(open_units), len(units), worst.name, 100 * (worst.rounding_undecided or 0.0))


def freeze(model: nn.Module) -> nn.Module:
    """Write every learned hard rounding into its weight (exactly on the integer grid) and drop it.

    After this the model is a plain calibrated fake-quant model: its state dict
    loads into ``quantize(fresh_model, config)`` and exporters read integer codes
    with nearest rounding. Float mode then runs the on-grid weights.
    """
    for module in model.modules():
        if isinstance(module, QuantModuleMixin) and module.weight_quantizer.rounding is not None:
            bake_rounding(module.weight_quantizer, module.float_weight)
    return model
