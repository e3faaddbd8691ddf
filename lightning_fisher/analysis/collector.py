"""Per-sample empirical Fisher of each candidate module, from one forward and backward pass.

For sample ``i`` of a batch and candidate module ``m`` with weight ``W`` and bias ``b``, the
collector records::

    F[m, i] = (||dl_i/dW||^2 + ||dl_i/db||^2) / (numel(W) + numel(b))

where ``l_i`` is sample ``i``'s own loss. It never forms a per-parameter gradient: a forward
hook keeps each call's input ``a`` and a hook on the call's output receives its gradient
``g``; the squared norms come from ``a`` and ``g`` by the kernels of
:mod:`lightning_fisher.analysis.per_sample_norms` (which states the formulas and the ``ghost`` /
``materialize`` / ``auto`` strategies). The norm is computed as soon as a call's gradient
arrives and the kept input is dropped, so memory stays at a training step's level. Values
are returned as float64. ``numel(W)`` is the unquantized weight's (``out_features *
in_features``), also for a quantized layer whose packed weight holds fewer entries
(:func:`~lightning_fisher.analysis.candidates.num_parameters`).

Loss convention (``loss_reduction``):

* ``"mean"`` (default): the batch loss is ``(1/B) sum_i l_i``, so each sample's gradient
  reaching a module is scaled by ``1/B``; squared norms are multiplied by ``B**2``. For a
  token-mean language-model loss the "sample loss" is therefore the sample's share of the
  batch mean times ``B``.
* ``"sum"``: the batch loss is ``sum_i l_i``; no scaling. Losses reduced any other way should
  be rescaled by the caller to a sum of per-sample losses and declared ``"sum"``.

Requirements and behaviour:

* Inputs must be batch-first: a candidate whose input's first dimension is not the batch
  size raises :class:`FisherAnalysisError` (exclude it from the candidates).
* A module called several times in one forward (weight sharing) gets the squared norm of the
  *sum* of its calls' gradients: calls are concatenated along the token axis.
* Frozen weights work and are faster: the collector never reads or writes any ``.grad``. If a
  candidate's output does not require grad (nothing upstream does), its forward hook returns
  a non-leaf copy that does, so backward reaches it. The analysis freezes weights for speed.
* Only forwards with grad enabled, inside :meth:`FisherCollector.batch`, are captured. Forward
  hooks that fire *during* backward (activation-checkpoint recompute, non-reentrant mode)
  are not captured, because the first forward's hooks already carry the gradient.
  Reentrant checkpointing (``use_reentrant=True``) runs the first forward without grad, so
  its modules would be seen only during backward; that raises :class:`FisherAnalysisError`.
* Samples with a non-finite value in any module are marked ``finite = False``; a module that
  got no gradient in a batch has value 0 for it.
* Different modules that share a weight tensor (tied embeddings) are scored separately.
* Dropout in train mode makes the Fisher that of the sampled mask; the analysis usually runs
  in eval mode.
* Only one backward per block: a second gradient for the same forward call raises.
* Precision: inputs and gradients of any float dtype are accepted; the norms (and what the
  ``observer`` receives) are in :func:`~lightning_fisher.analysis.per_sample_norms.compute_dtype`,
  float32 for bf16/fp16 models, with autocast switched off while they are computed (a
  backward inside an autocast region, as under Lightning's ``bf16-mixed``, would otherwise
  run them in bf16).

Under sharding (FSDP2's ``fully_shard``, Lightning's ``ModelParallelStrategy``) nothing changes
for the hooks. Each process runs forward and backward on its own local batch; FSDP2 gathers a
layer's whole weight just before its forward (and again in backward) and frees it after, but
the hooks never read a weight: the forward hook keeps the call's input ``a`` (the local
batch's activations, ``[B_local, ..., d_in]``, an ordinary tensor) and the gradient hook gets
``g = dl/d(output)`` (``[B_local, ..., d_out]``, ordinary too). A sample's weight gradient is
``sum_t g_t a_t^T``, built only from its own ``a`` and ``g``, so its squared norm needs
neither the weight nor another process's samples; only the normalising parameter count
comes from the module (its logical sizes: a ``DTensor`` reports the global shape). Each process therefore scores
its own samples exactly, and the per-module sums are added across processes (the analysis
module's all-reduce), as under DDP. What a process never sees is a *sharded* activation
(tensor/sequence parallelism splitting ``d_in``, ``d_out`` or tokens): there ``a`` and ``g``
would hold part of each sample's gradient and the norms would be partial; that case is not
supported.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Mapping, Optional

import torch
from torch import nn

from lightning_fisher.analysis.candidates import SUPPORTED_TYPE_NAMES, module_type_name, num_parameters, select_candidates
from lightning_fisher.errors import CandidateSelectionError, FisherAnalysisError
from lightning_fisher.wording import a_or_an
from lightning_fisher.analysis.per_sample_norms import (
    CHUNK_ELEMENTS,
    GramBlocks,
    NormStrategy,
    compute_dtype,
    embedding_sq_norms,
    input_gram,
    linear_sq_norms,
    uses_ghost,
)

__all__ = ["BatchRecord", "FisherCollector"]

LossReduction = Literal["mean", "sum"]


# ----------------------------------------------------------------------- batch state


@dataclass
class _Call:
    """One forward call of one candidate: its kept input and, later, its output gradient."""

    a: Optional[torch.Tensor]
    version: int  # of ``a`` when captured: an in-place change later would corrupt the norm
    g: Optional[torch.Tensor] = None
    done: bool = False


@dataclass
class _ModuleBatch:
    """What one candidate collected in the current batch."""

    calls: list[_Call] = field(default_factory=list)
    pending: int = 0
    sq: Optional[torch.Tensor] = None  # [B] accumulated squared norms, compute dtype


class _BatchState:
    """State of one ``collector.batch()`` block; closures check ``open`` so stale ones do nothing."""

    def __init__(self, num_modules: int, batch_size: Optional[int]) -> None:
        self.open = True
        self.batch_size = batch_size
        self.modules = [_ModuleBatch() for _ in range(num_modules)]
        self.captured: set[int] = set()
        self.grad_any = False
        self.seen_in_backward: set[int] = set()
        self._grams: dict[tuple, GramBlocks] = {}

    def input_gram(self, a: torch.Tensor, source: torch.Tensor) -> Optional[GramBlocks]:
        """``input_gram(a)``, computed once per batch for modules that read the same tensor.

        ``a`` is the ``[B, T, d]`` compute-dtype view or copy of ``source``, the input tensor
        captured in the forward pass. An attention block's query, key and value read one
        hidden-state tensor: the cache key is ``source``'s memory and layout. All captured
        inputs were alive together during the forward pass, so equal keys mean the same data
        (the version counter catches in-place changes). The key must not come from ``a``: a
        dtype conversion or reshape copy is freed after use, and the next module's copy may
        get the same address. ``None`` when too large to keep.
        """
        if a.shape[0] * a.shape[1] * a.shape[1] > CHUNK_ELEMENTS:
            return None  # too large to keep: computed chunk by chunk instead
        key = (source.data_ptr(), tuple(source.shape), tuple(source.stride()), source.dtype, source._version, a.dtype)
        gram = self._grams.get(key)
        if gram is None:
            gram = self._grams[key] = input_gram(a)
        return gram

    def close(self) -> None:
        self.open = False
        self.modules = []
        self._grams = {}


class BatchRecord:
    """Result of one ``collector.batch()`` block; readable once the block has ended.

    Attributes:
        names: candidate names, the row order of :attr:`values`.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self._values: Optional[torch.Tensor] = None
        self._finite: Optional[torch.Tensor] = None

    def _set(self, values: torch.Tensor) -> None:
        self._values = values
        self._finite = torch.isfinite(values).all(dim=0)

    def _require(self) -> None:
        if self._values is None:
            raise FisherAnalysisError(
                "record.values is available only after the 'with collector.batch()' block has ended without error"
            )

    @property
    def values(self) -> torch.Tensor:
        """``[M, B]`` float64 per-module, per-sample Fisher values (``nan``/``inf`` possible)."""
        self._require()
        return self._values

    @property
    def finite(self) -> torch.Tensor:
        """``[B]`` bool: sample ``i`` has finite values in every module."""
        self._require()
        return self._finite

    @property
    def batch_size(self) -> int:
        """Number of samples in the batch."""
        return int(self.values.shape[1])

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Per-sample values by module name (rows of :attr:`values`)."""
        return dict(zip(self.names, self.values))


# -------------------------------------------------------------------------- collector


class FisherCollector:
    """Hooks that record per-sample, per-module empirical Fisher values in one backward pass.

    Usage::

        collector = FisherCollector(model)
        with collector:                                   # hooks installed, removed on exit
            for batch in loader:
                with collector.batch() as record:
                    loss_fn(model, batch).backward()      # batch loss = mean of sample losses
                accumulator.update(record.values, record.finite)

    Args:
        model: the model; candidate names are relative to it.
        candidates: ``{full name: module}`` to score; default :func:`select_candidates` (all
            ``nn.Linear``). Each must be a submodule of ``model`` of a supported type.
        loss_reduction: ``"mean"`` if the batch loss is the mean of per-sample losses (squared
            norms scaled by ``B**2``), ``"sum"`` if it is their sum.
        norm_strategy: ``"ghost"`` (Gram matrices), ``"materialize"`` (per-sample gradients) or
            ``"auto"`` (cheaper per layer and batch).
        observer: called once per batch for each linear candidate (``Linear``, ``Conv1D``)
            with ``(name, a, g)``: its input ``[B, T, d_in]`` and output gradient
            ``[B, T, d_out]``, calls concatenated along ``T``, before both are dropped; e.g.
            :meth:`lightning_fisher.analysis.spectrum.SpectrumSet.observe`.

    Raises:
        CandidateSelectionError: an unsupported, duplicated or foreign candidate module.
    """

    def __init__(
        self,
        model: nn.Module,
        candidates: Optional[Mapping[str, nn.Module]] = None,
        *,
        loss_reduction: LossReduction = "mean",
        norm_strategy: NormStrategy = "auto",
        observer: Optional[Callable[[str, torch.Tensor, torch.Tensor], None]] = None,
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if norm_strategy not in ("auto", "ghost", "materialize"):
            raise ValueError(f"norm_strategy must be 'auto', 'ghost' or 'materialize', got {norm_strategy!r}")
        self.model = model
        self.candidates: dict[str, nn.Module] = dict(select_candidates(model) if candidates is None else candidates)
        self.names: tuple[str, ...] = tuple(self.candidates)
        self.loss_reduction = loss_reduction
        self.norm_strategy = norm_strategy
        self.observer = observer
        self._modules = list(self.candidates.values())
        self._kinds = self._validate()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._batch: Optional[_BatchState] = None

    def _validate(self) -> list[str]:
        """Kind of each candidate; rejects what the hooks could not score correctly."""
        submodules = {id(m) for m in self.model.modules()}
        seen: set[int] = set()
        kinds = []
        for name, module in self.candidates.items():
            try:
                kind = module_type_name(module)
            except CandidateSelectionError as err:
                raise CandidateSelectionError(
                    f"candidate {name!r} is {a_or_an(type(module).__name__)}; supported types are "
                    f"{', '.join(SUPPORTED_TYPE_NAMES)}"
                ) from err
            if kind == "Embedding" and module.scale_grad_by_freq:
                raise CandidateSelectionError(
                    f"candidate {name!r} is an Embedding with scale_grad_by_freq=True, whose gradient depends on "
                    f"the whole batch, so it has no per-sample Fisher; exclude it (exclude=[{name!r}])"
                )
            if id(module) not in submodules:
                raise CandidateSelectionError(
                    f"candidate {name!r} is not a submodule of the model given to FisherCollector"
                )
            if id(module) in seen:
                # One module under two names would get its hooks twice and be counted twice.
                raise CandidateSelectionError(f"module {name!r} appears more than once among the candidates")
            seen.add(id(module))
            kinds.append(kind)
        return kinds

    # ------------------------------------------------------------------ hooks on/off

    @property
    def attached(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def attach(self) -> "FisherCollector":
        """Install one forward hook per candidate (idempotent)."""
        if not self._handles:
            for index, module in enumerate(self.candidates.values()):
                hook = functools.partial(self._on_forward, index)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove every hook this collector installed and drop any batch state."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._batch is not None:
            self._batch.close()
            self._batch = None

    def __enter__(self) -> "FisherCollector":
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    # ------------------------------------------------------------------- batches

    @contextlib.contextmanager
    def batch(self, batch_size: Optional[int] = None) -> Iterator[BatchRecord]:
        """Collect one batch: run forward and ``backward()`` inside the block.

        Args:
            batch_size: number of samples; default: the first dimension of the first
                candidate input seen.

        Yields:
            A :class:`BatchRecord` whose values are readable after the block.

        Raises:
            FisherAnalysisError: the collector is not attached, blocks are nested, no candidate
                ran with grad enabled, no gradient reached any candidate, or an input is not
                batch-first.
        """
        if not self.attached:
            raise FisherAnalysisError(
                "FisherCollector.batch() needs the hooks: use 'with collector:' or attach() first"
            )
        if self._batch is not None:
            raise FisherAnalysisError("collector.batch() blocks cannot be nested")
        state = _BatchState(len(self.names), batch_size)
        record = BatchRecord(self.names)
        self._batch = state
        try:
            yield record
            record._set(self._finish(state))
        finally:
            state.close()
            self._batch = None

    def _finish(self, state: _BatchState) -> torch.Tensor:
        only_in_backward = state.seen_in_backward - state.captured
        if only_in_backward:
            names = [self.names[i] for i in sorted(only_in_backward)][:5]
            raise FisherAnalysisError(
                f"candidates {names} ran only during backward (reentrant gradient checkpointing?); per-sample "
                "scores need the first forward with grad enabled: disable gradient checkpointing or use "
                "use_reentrant=False"
            )
        if not state.captured:
            raise FisherAnalysisError(
                f"none of the {len(self.names)} candidate modules ran with grad enabled inside collector.batch(); "
                "run the forward pass inside the block, outside torch.no_grad()"
            )
        for index, mod in enumerate(state.modules):
            self._flush(state, index, mod)
        if not state.grad_any:
            raise FisherAnalysisError(
                "no gradient reached any candidate module in this batch; call loss.backward() inside collector.batch()"
            )
        return self._values(state)

    def _values(self, state: _BatchState) -> torch.Tensor:
        batch = state.batch_size
        rows = [mod.sq for mod in state.modules]
        device = next(r.device for r in rows if r is not None)
        values = torch.zeros(len(rows), batch, dtype=torch.float64, device=device)
        scale = float(batch) ** 2 if self.loss_reduction == "mean" else 1.0
        for index, (row, module) in enumerate(zip(rows, self._modules)):
            if row is not None:
                values[index] = row.to(torch.float64) * (scale / num_parameters(module))
        return values

    # ------------------------------------------------------------------ callbacks

    def _on_forward(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        state = self._batch
        if state is None or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        replaced = None
        if not output.requires_grad:
            # Frozen upstream: give backward a path into this module. Adding a zero leaf (not
            # detach().requires_grad_()) keeps the result a non-leaf, so in-place ops on it still work.
            anchor = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            replaced = output = output.detach() + anchor
        if _inside_backward():
            # Recompute inside backward (activation checkpointing): the first forward already
            # registered this call's gradient hook; capturing again would only hold memory.
            state.seen_in_backward.add(index)
            return replaced
        x = args[0] if args else next(iter(kwargs.values()))
        self._check_batch_dim(state, index, x.shape)
        call = _Call(a=x.detach(), version=x._version)
        mod = state.modules[index]
        mod.calls.append(call)
        mod.pending += 1
        state.captured.add(index)
        output.register_hook(functools.partial(self._on_grad, state, index, call))
        return replaced

    def _on_grad(self, state: _BatchState, index: int, call: _Call, grad: torch.Tensor) -> None:
        if not state.open:
            return None
        name = self.names[index]
        if call.g is not None or call.done:
            raise FisherAnalysisError(
                f"a second gradient reached candidate {name!r} for the same forward call; call backward() once "
                "per collector.batch() block"
            )
        self._check_batch_dim(state, index, grad.shape, what="output gradient")
        call.g = grad.detach()
        state.grad_any = True
        mod = state.modules[index]
        mod.pending -= 1
        if mod.pending == 0:
            self._flush(state, index, mod)
        return None

    def _check_batch_dim(self, state: _BatchState, index: int, shape: torch.Size, what: str = "input") -> None:
        if state.batch_size is None and len(shape) >= 1:
            state.batch_size = int(shape[0])
        name = self.names[index]
        min_dims = 1 if self._kinds[index] == "Embedding" else 2
        if len(shape) < min_dims or shape[0] != state.batch_size:
            raise FisherAnalysisError(
                f"candidate module {name!r} got an {what} of shape {tuple(shape)} whose first dimension is not the "
                f"batch size {state.batch_size}; per-sample scores need batch-first inputs. Exclude it from the "
                f"candidates (exclude=[{name!r}]) or pass the right batch_size to collector.batch()"
            )

    # ------------------------------------------------------------------- the math

    def _flush(self, state: _BatchState, index: int, mod: _ModuleBatch) -> None:
        """Add the squared norm of the calls whose gradient arrived; drop every kept tensor."""
        ready = [c for c in mod.calls if c.g is not None]
        inputs, grads = [c.a for c in ready], [c.g for c in ready]
        modified = any(c.a._version != c.version for c in ready)
        for call in mod.calls:
            call.a, call.g, call.done = None, None, True
        mod.calls, mod.pending = [], 0
        if modified:
            # Autograd catches this itself only when it saved the input (trainable weights).
            name = self.names[index]
            raise FisherAnalysisError(
                f"the input of candidate {name!r} was modified in place after the module used it, so its "
                f"per-sample norm cannot be computed; remove the in-place op or exclude it (exclude=[{name!r}])"
            )
        if grads:
            with _without_autocast(grads[0].device):
                sq = self._sq_norms(state, index, inputs, grads)
            mod.sq = sq if mod.sq is None else mod.sq + sq

    def _sq_norms(
        self, state: _BatchState, index: int, inputs: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> torch.Tensor:
        batch = state.batch_size
        # Calls of a shared module are concatenated along the token axis: the per-sample
        # gradient is the sum over every token of every call, squared after summing.
        module = self._modules[index]
        dtype = compute_dtype(*grads) if self._kinds[index] == "Embedding" else compute_dtype(*inputs, *grads)
        g = _tokens([y.reshape(batch, -1, y.shape[-1]).to(dtype) for y in grads])
        if self._kinds[index] == "Embedding":
            idx = _tokens([x.reshape(batch, -1) for x in inputs])
            return embedding_sq_norms(
                idx,
                g,
                num_embeddings=module.num_embeddings,
                padding_idx=module.padding_idx,
                strategy=self.norm_strategy,
            )
        a = _tokens([x.reshape(batch, -1, x.shape[-1]).to(dtype) for x in inputs])
        if self.observer is not None:
            self.observer(self.names[index], a, g)
        gram = None
        if len(inputs) == 1 and uses_ghost(self.norm_strategy, a.shape[1], a.shape[2], g.shape[2]):
            gram = state.input_gram(a, source=inputs[0])
        return linear_sq_norms(a, g, bias=module.bias is not None, strategy=self.norm_strategy, gram=gram)


def _tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    # torch.cat copies even a single tensor; most modules are called once per forward.
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # The backward usually runs inside the training step, so inside its autocast region under a
    # mixed precision ("bf16-mixed"), which would run the kernels' matrix products in bf16: the
    # norms are float32 (or float64) whatever the model's precision.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _inside_backward() -> bool:
    # -1 means no autograd graph task is running on this thread, i.e. we are not in backward.
    return torch._C._current_graph_task_id() != -1
