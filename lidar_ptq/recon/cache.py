"""Captured tensors of a unit: held in RAM, or spilled to a memory-mapped file above a budget.

A ``TensorStore`` holds one tensor field (e.g. a unit's first input) for all
calibration samples, concatenated along the batch axis. ``capture`` fills stores
with forward hooks and stops each forward pass right after the unit.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..batches import StopForward, run_batches


class TensorStore:
    """Append batches of one field; index samples later. Spills to disk once ``budget_bytes`` is exceeded."""

    def __init__(self, budget_bytes: float = float("inf"), cache_dir: str | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.cache_dir = cache_dir
        self.chunks: list[torch.Tensor] = []
        self.nbytes = 0
        self.num_samples = 0
        self.sample_shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self._file = None
        self._path: str | None = None
        self._memmap: np.ndarray | None = None
        self._starts: torch.Tensor | None = None  # first sample number of every RAM chunk

    @property
    def spilled(self) -> bool:
        return self._path is not None

    def append(self, batch: torch.Tensor) -> None:
        batch = batch.detach().to("cpu").contiguous()
        if self.sample_shape is None:
            self.sample_shape, self.dtype = tuple(batch.shape[1:]), batch.dtype
        elif tuple(batch.shape[1:]) != self.sample_shape:
            raise ValueError(f"captured shapes differ between batches: {tuple(batch.shape[1:])} vs "
                             f"{self.sample_shape}; reconstruction needs a fixed input size")
        self.num_samples += batch.shape[0]
        self.nbytes += batch.numel() * batch.element_size()
        if self.spilled:
            self._file.write(batch.numpy().tobytes())
            return
        self.chunks.append(batch)
        if self.nbytes > self.budget_bytes:
            self._spill()

    def _spill(self) -> None:
        directory = self.cache_dir or tempfile.gettempdir()
        os.makedirs(directory, exist_ok=True)
        fd, self._path = tempfile.mkstemp(prefix="lidar_ptq_cache_", suffix=".bin", dir=directory)
        self._file = os.fdopen(fd, "wb")
        for chunk in self.chunks:
            self._file.write(chunk.numpy().tobytes())
        self.chunks = []

    def finalize(self) -> TensorStore:
        if self.spilled:
            self._file.close()
            np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
            self._memmap = np.memmap(self._path, dtype=np_dtype, mode="r",
                                     shape=(self.num_samples, *self.sample_shape))
        elif self.chunks:
            # The chunks stay as appended: they are often the very tensors a suspended forward still holds
            # (reconstruction's lanes), and concatenating them would hold every sample twice.
            self._starts = torch.tensor([0, *(len(c) for c in self.chunks)]).cumsum(0)[:-1]
        return self

    def __len__(self) -> int:
        return self.num_samples

    def get(self, index: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Samples at ``index`` (1-D tensor of sample numbers or a slice)."""
        if self._memmap is not None:
            idx = index if isinstance(index, slice) else index.cpu().numpy()
            return torch.from_numpy(np.ascontiguousarray(self._memmap[idx])).to(device)
        if self._starts is None:
            raise RuntimeError("store is empty or not finalized")
        if isinstance(index, slice):
            start, stop, step = index.indices(self.num_samples)
            first = int(torch.searchsorted(self._starts, torch.tensor(start), right=True)) - 1
            base = int(self._starts[first])
            if step == 1 and stop - base <= len(self.chunks[first]):  # inside one chunk: a view, as slicing is
                return self.chunks[first][start - base:stop - base].to(device)
            index = torch.arange(start, stop, step)
        owner = torch.searchsorted(self._starts, index, right=True) - 1
        rows = [self.chunks[c][int(i) - int(self._starts[c])] for c, i in zip(owner.tolist(), index.tolist())]
        return torch.stack(rows).to(device) if rows else self.chunks[0][:0].to(device)

    def mean_square(self, chunk: int = 4096) -> float:
        """Mean of the squared entries over all samples, read in chunks (bounded memory)."""
        total, count = 0.0, 0
        for start in range(0, self.num_samples, chunk):
            part = self.get(slice(start, min(start + chunk, self.num_samples))).double()
            total += float(part.pow(2).sum())
            count += part.numel()
        return total / max(count, 1)

    def close(self) -> None:
        """Delete the spill file (if any) and let go of the held samples."""
        self._memmap = None
        self.chunks, self._starts = [], None
        if self._path and os.path.exists(self._path):
            os.remove(self._path)
        self._path = None

    def __del__(self) -> None:  # spill files never outlive the store
        try:
            self.close()
        except Exception:
            pass


def _sparse_nbytes(args: Sequence[Any]) -> int:
    """Bytes a batch of sparse-unit inputs holds: features, coordinates and the cached index pairs."""
    total = 0
    for arg in args:
        tensors = [arg] if isinstance(arg, torch.Tensor) else [getattr(arg, "features", None),
                                                               getattr(arg, "indices", None)]
        for pairs in (getattr(arg, "indice_dict", None) or {}).values():
            tensors += [v for v in vars(pairs).values() if isinstance(v, torch.Tensor)]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


class SparseBatchStore:
    """The inputs of a sparse unit, one list per calibration batch (voxel counts differ, so batches are
    kept whole). Held in RAM up to ``budget_bytes``, then every batch goes to its own file and is read
    back when a step samples it, so sparse captures obey the same memory budget as dense ones."""

    def __init__(self, budget_bytes: float = float("inf"), cache_dir: str | None = None) -> None:
        self.budget_bytes, self.cache_dir = budget_bytes, cache_dir
        self.batches: list[list[Any] | str] = []  # in RAM, or the path of its file
        self.nbytes = 0
        self._dir: str | None = None

    @property
    def spilled(self) -> bool:
        return self._dir is not None

    def append(self, args: list[Any]) -> None:
        self.nbytes += _sparse_nbytes(args)
        self.batches.append(args)
        if self.spilled:
            self.batches[-1] = self._write(len(self.batches) - 1, args)
        elif self.nbytes > self.budget_bytes:  # from now on on disk, the batches held so far too
            os.makedirs(self.cache_dir or tempfile.gettempdir(), exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="lidar_ptq_sparse_", dir=self.cache_dir)
            self.batches = [self._write(i, b) for i, b in enumerate(self.batches)]

    def _write(self, index: int, args: list[Any]) -> str:
        path = os.path.join(self._dir or "", f"{index}.pt")
        torch.save(args, path)
        return path

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[Any]:
        item = self.batches[index]
        return torch.load(item, weights_only=False) if isinstance(item, str) else item

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.batches = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@dataclass
class Captured:
    """What a unit saw: its positional inputs and its output.

    Dense units: one ``TensorStore`` per input, samples on dim 0. Sparse units (spconv
    ``SparseConvTensor`` inputs, whose voxel count varies per frame): the input tensors
    of each batch are kept whole in ``sparse_inputs`` (a ``SparseBatchStore``) and the
    output features are concatenated; ``batch_rows`` says how many output rows each
    calibration batch produced.
    """

    inputs: list[TensorStore] = field(default_factory=list)
    sparse_inputs: SparseBatchStore = field(default_factory=SparseBatchStore)
    output: TensorStore | None = None
    batch_rows: list[int] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)  # constant non-tensor keyword arguments
    sparse: bool = False

    @property
    def offsets(self) -> list[int]:
        return torch.tensor([0, *self.batch_rows]).cumsum(0).tolist()

    def batch_output(self, b: int, device: torch.device | str) -> torch.Tensor:
        """Output rows of calibration batch ``b``."""
        offsets = self.offsets
        return self.output.get(slice(offsets[b], offsets[b + 1]), device)

    def close(self) -> None:
        for store in [*self.inputs, self.output]:
            if store is not None:
                store.close()
        self.sparse_inputs.close()


def is_sparse_tensor(x: Any) -> bool:
    """spconv's SparseConvTensor (duck-typed, so spconv is never imported here)."""
    return hasattr(x, "features") and hasattr(x, "indices") and hasattr(x, "replace_feature")


def _tensor_args(args: Sequence[Any]) -> list[torch.Tensor]:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if len(tensors) != len(args):
        raise TypeError("reconstruction units must take tensors as positional inputs")
    return tensors


def primary_output(output: Any) -> torch.Tensor:
    """The tensor a unit is judged on: the output itself, the features of a sparse tensor, or
    the first element of a tuple (``nn.MultiheadAttention`` returns (output, weights))."""
    if is_sparse_tensor(output):
        return output.features
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"unit output must be a tensor or a tuple starting with one, got {type(output).__name__}")
    return output


class CaptureBuilder:
    """Fills a ``Captured`` call by call (one per calibration batch, in order), then ``finish``."""

    def __init__(self, want_inputs: bool = True, want_output: bool = True, budget_bytes: float = float("inf"),
                 cache_dir: str | None = None) -> None:
        self.want_inputs, self.want_output = want_inputs, want_output
        self.budget_bytes, self.cache_dir = budget_bytes, cache_dir
        self.result = Captured(sparse_inputs=SparseBatchStore(budget_bytes, cache_dir))

    def add(self, args: tuple, kwargs: dict, output: Any) -> None:
        result = self.result
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            raise TypeError("reconstruction units must take tensors as positional inputs, not keywords")
        result.kwargs = dict(kwargs)
        result.sparse = bool(args) and is_sparse_tensor(args[0])
        if self.want_inputs and result.sparse:
            result.sparse_inputs.append([a.replace_feature(a.features.detach()) if is_sparse_tensor(a)
                                         else a.detach() for a in args])
        elif self.want_inputs:
            tensors = _tensor_args(args)
            if not result.inputs:
                result.inputs = [TensorStore(self.budget_bytes, self.cache_dir) for _ in tensors]
            for store, tensor in zip(result.inputs, tensors):
                store.append(tensor)
        rows = primary_output(output)
        if self.want_output:
            if result.output is None:
                result.output = TensorStore(self.budget_bytes, self.cache_dir)
            result.output.append(rows)
        result.batch_rows.append(rows.shape[0])

    def finish(self) -> Captured:
        if not self.result.batch_rows:
            raise RuntimeError("the unit was never called by the model on the calibration data")
        for store in [*self.result.inputs, self.result.output]:
            if store is not None:
                store.finalize()
        return self.result


def capture(model: nn.Module, unit: nn.Module, data: Iterable[Any], *, want_inputs: bool = True,
            want_output: bool = True, budget_bytes: float = float("inf"), cache_dir: str | None = None,
            stop_early: bool = True) -> Captured:
    """Run ``data`` through ``model`` (in its current quant mode) and record ``unit``'s inputs/outputs
    (one forward per batch, stopped after the unit; ``reconstruct`` captures every unit in lockstep)."""
    builder = CaptureBuilder(want_inputs, want_output, budget_bytes, cache_dir)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        builder.add(args, kwargs, output)
        if stop_early:
            raise StopForward

    handle = unit.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run_batches(model, data)
    finally:
        handle.remove()
    return builder.finish()
