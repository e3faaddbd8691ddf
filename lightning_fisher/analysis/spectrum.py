"""The spectrum of a linear module's mean weight gradient, and its noise floor, in one pass.

A rank-``r`` adapter can follow the top ``r`` singular directions of ``G``, the mean over
samples of the per-sample weight gradients ``G_i``; the loss decrease of a first step it can
capture is the sum of the top ``r`` squared singular values of ``G``.
:class:`SpectrumAccumulator` gathers what is needed to estimate them from the tensors the
collector's hooks already see, the input ``a`` (``[B, T, d_in]``) and output gradient ``g``
(``[B, T, d_out]``) of each batch, with no per-sample gradient and no extra forward or backward.

**Sums.** Sample ``i``'s weight gradient is ``G_i = s * g_i^T a_i`` (tokens summed); ``s = B``
for a batch-mean loss, whose backward scales each sample's gradient by ``1/B`` (the collector's
``loss_reduction="mean"``), and ``s = 1`` for a summed loss. A batch adds ``s * g^T a`` over
its samples. The bias is left out: LoRA adapts only the weight, so the bias gradient is not a
direction an adapter can follow. Samples go to one of two halves by the parity of their
position in the stream (as in :class:`~lightning_fisher.analysis.accumulator.FisherAccumulator`), so
``S_1``, ``S_2`` (sums) and ``n_1``, ``n_2`` (counts) are kept, ``N = n_1 + n_2``.

**Methods.** ``"exact"`` keeps ``S_h`` (``d_out x d_in`` each). ``"sketch"`` never forms them
(Tropp, Yurtsever, Udell, Cevher 2017, *Practical sketching algorithms for low-rank matrix
approximation*, SIAM J. Matrix Anal. Appl.): with Gaussian test matrices ``Omega``
(``d_in x k``) and ``Psi`` (``l x d_out``, ``l = 2k + 1``) it keeps ``Y_h = S_h Omega`` and
``W_h = Psi S_h``, added per batch as ``g^T (a Omega)`` and ``(g Psi^T)^T a``. With
``Q = orth(Y)`` and ``X = lstsq(Psi Q, W)``, ``G ~ Q X``; but ``X = Q^T G + L``, where the
leak ``L = (Psi Q)^+ Psi T`` carries the tail ``T = (I - Q Q^T) G`` through the part of ``Psi``
independent of ``Psi Q``, so ``E[L L^T] = ||T||_F^2 ((Psi Q)^T Psi Q)^{-1}``; and the
least-squares residual ``r`` (the projection of ``Psi T`` off ``range(Psi Q)``) has
``E||r||_F^2 = (l - k) ||T||_F^2``. The squared singular values reported are the eigenvalues
of ``X X^T - ||r||_F^2 / (l - k) * ((Psi Q)^T Psi Q)^{-1}`` (clipped at 0): without that
correction the one-pass estimate adds the tail's energy to every value (several times the
true value on a noise-dominated matrix).
The test matrices come from a generator seeded by ``(seed, module name)``, so every process
of a distributed run draws the same ones and the sums add up. ``"auto"`` is exact when
``d_out d_in <= EXACT_FACTOR * (k d_out + l d_in)``, i.e. when the exact sum costs at most
twice the memory of the sketch it replaces (and takes about as many operations per batch).

**Noise floor.** The two halves have the same expectation, so ``D = S_1/n_1 - S_2/n_2`` is
pure noise: ``Cov(vec D) = Sigma (1/n_1 + 1/n_2)`` where ``Sigma`` is the covariance of
``vec G_i``. The noise in ``G`` has covariance ``Sigma / N``, so it is distributed (to the
central-limit approximation) like ``sqrt(c) D`` with ``c = n_1 n_2 / N^2``. Two estimates of
the squared top singular value that noise alone gives ``G``:

* ``c * sigma_1(D)^2``: the direct one, right also for structured noise (anisotropic inputs,
  noise concentrated in a few output directions), but a single draw;
* ``c ||D||_F^2 (sqrt(d_out) + sqrt(d_in))^2 / (d_out d_in)``: the Marchenko-Pastur edge of
  iid noise with the same energy (``E||D||_F^2 = tr(Sigma)(1/n_1 + 1/n_2)``, so
  ``c ||D||_F^2`` estimates ``tr(Sigma)/N``); low-variance, but blind to structure. From
  sketches, ``||D||_F^2`` is ``(||D Omega||_F^2 + ||Psi D||_F^2) / (k + l)``, since
  ``E||A Omega||_F^2 = k ||A||_F^2``.

The floor is ``margin`` times the larger of the two. A sketch's ``sigma_1(D)`` goes through the
same debiased reconstruction, with the same ``Omega`` and ``Psi``, as ``G``'s values, so what
the reconstruction adds by chance it adds to both. A pure-noise ``G``'s top value and the
floor are then two draws of the same quantity; the margin (default :data:`NOISE_MARGIN` = 2,
i.e. a direction must be about ``sqrt(2)`` times the noise's top singular value) keeps the
chance that noise clears it small (measured on synthetic pure-noise modules of 32 to 128
features: see the tests).

**Precision.** Products are computed in float32 for half/single-precision inputs and in float64
for float64 ones, and added in place into sums of the same dtype (float32 sums become float64
with the first float64 batch). Float32 sums add rounding of about ``1e-7`` of the sums'
magnitude per batch, far below the sampling noise the floor measures (measured: 3e-7 relative
over 400 batches, see the tests); float64 sums needed a float64 copy of every product on CPU and
twice the kept state (``benchmarks/README.md``, the spectrum criterion's cost). The
test matrices are drawn in float64 and rounded to float32, whatever the sums' dtype, so
every process and every precision sketches with the same ones; every estimate (QR, SVD,
eigenvalues) runs in float64. The state is one flat float64 tensor of sums:
``all_reduce(SUM)`` of :meth:`SpectrumAccumulator.state_tensor` merges processes.

**Skipped samples.** A sample is used when its ``a`` and ``g`` are finite: one sum per sample
and tensor decides it (a sum of finite terms is finite unless it overflows, and only samples
whose sum is not finite are checked element by element), without a boolean copy of the inputs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Union

import torch
from torch import nn

from lightning_fisher.analysis.candidates import module_type_name, weight_shape
from lightning_fisher.errors import CandidateSelectionError, FisherAnalysisError

__all__ = [
    "EXACT_FACTOR", "NOISE_MARGIN", "STOP_CHECK_EVERY", "ModuleSpectrum", "SpectrumAccumulator", "SpectrumSet",
    "sketch_width",
]

SpectrumMethod = Literal["auto", "exact", "sketch"]

EXACT_FACTOR = 2
NOISE_MARGIN = 2.0
#: The spectrum criterion's stopping check runs after every this many batches (see
#: :meth:`SpectrumSet.check_due`): its per-module reconstructions and two allocations cost, per
#: check, 0.2 of a MiniLM training step and more than half of a digits model's.
STOP_CHECK_EVERY = 2
#: Sketches up to this size (``Y``'s entries) go through the stopping check's reconstruction in
#: one batched call; larger ones one at a time (their float64 copies would add up).
BATCHED_CHECK_ELEMENTS = 1 << 20


def sketch_width(rank_max: int, oversampling: int = 10) -> int:
    """Sketch width ``k`` for ranks up to ``rank_max``: ``rank_max + oversampling``."""
    return rank_max + oversampling


@dataclass(frozen=True)
class ModuleSpectrum:
    """What the allocation needs of one module.

    Attributes:
        name: the module's name.
        sigma_sq: top squared singular values of the mean weight gradient ``G``, descending.
        floor: the squared singular value noise alone would reach (see the module docstring).
        samples: samples accumulated.
    """

    name: str
    sigma_sq: tuple[float, ...]
    floor: float
    samples: int


class SpectrumAccumulator:
    """Running sums of one linear module's per-sample weight gradients, in two halves.

    Args:
        name: the module's name (seeds the test matrices; names errors).
        d_in: input features.
        d_out: output features.
        width: sketch width ``k`` (see :func:`sketch_width`); also decides ``"auto"``.
        method: ``"exact"``, ``"sketch"`` or ``"auto"`` (see the module docstring).
        seed: seed shared by every process.
        loss_reduction: ``"mean"`` if the batch loss is the mean of per-sample losses, ``"sum"``
            if their sum (as for :class:`~lightning_fisher.analysis.collector.FisherCollector`).
        device: where the sums start. They move to the device of the batches given to
            :meth:`update` on the first one: the accumulator may be built before a strategy
            moves (or materialises, or shards) the model.

    Attributes:
        method: ``"exact"`` or ``"sketch"``, as ``"auto"`` resolved it.
        omega: ``[d_in, k]`` and ``psi``: ``[2k + 1, d_out]`` test matrices, in the sums' dtype.
    """

    def __init__(
        self, name: str, d_in: int, d_out: int, *, width: int, method: SpectrumMethod = "auto", seed: int = 0,
        loss_reduction: Literal["mean", "sum"] = "mean", device: Union[torch.device, str, None] = None,
    ) -> None:
        if method not in ("auto", "exact", "sketch"):
            raise ValueError(f"method: must be 'auto', 'exact' or 'sketch', got {method!r} (module {name!r})")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction: must be 'mean' or 'sum', got {loss_reduction!r}")
        if min(d_in, d_out, width) < 1:
            raise ValueError(f"module {name!r}: d_in, d_out and width must be positive, got {d_in}, {d_out}, {width}")
        self.name, self.d_in, self.d_out, self.width = name, d_in, d_out, width
        self.loss_reduction = loss_reduction
        wide = 2 * width + 1
        if method == "auto":
            method = "exact" if d_out * d_in <= EXACT_FACTOR * (width * d_out + wide * d_in) else "sketch"
        self.method: Literal["exact", "sketch"] = method
        f32 = dict(dtype=torch.float32, device=device)
        self._seed, self._device = seed, device
        self._omega: Optional[torch.Tensor] = None
        self._psi: Optional[torch.Tensor] = None
        if method == "exact":
            self._sums = [torch.zeros(2, d_out, d_in, **f32)]
        else:
            self._sums = [torch.zeros(2, d_out, width, **f32), torch.zeros(2, wide, d_in, **f32)]
        self._count = torch.zeros(2, dtype=torch.float64)
        self._skipped = 0.0

    @property
    def dtype(self) -> torch.dtype:
        """The sums' dtype: float32, or float64 once a float64 batch came."""
        return self._sums[0].dtype

    @property
    def omega(self) -> torch.Tensor:
        """``[d_in, k]`` Gaussian test matrix, drawn on first use from ``(seed, name)``."""
        if self._omega is None:
            self._draw_test_matrices()
        return self._omega

    @property
    def psi(self) -> torch.Tensor:
        """``[2k + 1, d_out]`` Gaussian test matrix, drawn with :attr:`omega`."""
        if self._psi is None:
            self._draw_test_matrices()
        return self._psi

    def _draw_test_matrices(self) -> None:
        gen = torch.Generator().manual_seed(_module_seed(self._seed, self.name))
        # Rounded to float32 whatever the sums' dtype: the same matrices at every precision.
        omega = torch.randn(self.d_in, self.width, generator=gen, dtype=torch.float64).float()
        psi = torch.randn(2 * self.width + 1, self.d_out, generator=gen, dtype=torch.float64).float()
        self._omega, self._psi = omega.to(self._device, self.dtype), psi.to(self._device, self.dtype)

    @property
    def samples_seen(self) -> int:
        """All samples passed to :meth:`update`, used or skipped (their positions set the halves)."""
        return int(self._count.sum()) + int(self._skipped)

    @property
    def half_counts(self) -> tuple[int, int]:
        """Samples used per half, ``(n_1, n_2)``."""
        return int(self._count[0]), int(self._count[1])

    def update(self, a: torch.Tensor, g: torch.Tensor, finite: Optional[torch.Tensor] = None) -> None:
        """Add one batch: the module's input and output gradient (all its calls, tokens concatenated).

        A sample is used when ``finite`` allows it and its ``a`` and ``g`` are finite; a
        skipped sample still takes its position, so the halves depend only on the stream.

        Args:
            a: ``[B, ..., d_in]`` inputs.
            g: ``[B, ..., d_out]`` gradients of the outputs.
            finite: optional ``[B]`` boolean mask of samples to use.
        """
        if a.device != self._sums[0].device:
            self._move_to(a.device)
        batch = a.shape[0]
        if g.shape[0] != batch or a.shape[-1] != self.d_in or g.shape[-1] != self.d_out:
            raise FisherAnalysisError(
                f"module {self.name!r}: expected a [B, ..., {self.d_in}] input and a [B, ..., {self.d_out}] output "
                f"gradient, got {tuple(a.shape)} and {tuple(g.shape)}"
            )
        dtype = torch.float64 if torch.float64 in (a.dtype, g.dtype) else torch.float32
        if dtype != self.dtype:
            self._to_float64()
        a = a.detach().reshape(batch, -1, self.d_in).to(dtype)
        g = g.detach().reshape(batch, -1, self.d_out).to(dtype)
        if a.shape[1] != g.shape[1]:
            raise FisherAnalysisError(
                f"module {self.name!r}: {a.shape[1]} input tokens but {g.shape[1]} gradient tokens"
            )
        use = _finite_samples(a) & _finite_samples(g)
        if finite is not None:
            use &= finite.detach().to(use.device, torch.bool).reshape(-1)
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        first = self.samples_seen % 2  # the half of the batch's first sample
        every = bool(use.all())
        for h in (0, 1):
            if every:  # the common case: the half's samples are every other one, no index needed
                start = (h - first) % 2
                rows, used = slice(start, None, 2), len(range(start, batch, 2))
            else:
                rows = torch.nonzero(use & ((first + torch.arange(batch, device=use.device)) % 2 == h)).reshape(-1)
                used = int(rows.numel())
            self._count[h] += float(used)
            if used:
                self._add(h, a[rows].reshape(-1, self.d_in), g[rows].reshape(-1, self.d_out), scale)
        self._skipped += float(batch - int(use.sum()))

    def _to_float64(self) -> None:
        self._sums = [s.double() for s in self._sums]
        if self._omega is not None:
            self._omega, self._psi = self._omega.double(), self._psi.double()

    def _move_to(self, device: torch.device) -> None:
        self._device = device
        self._sums = [s.to(device) for s in self._sums]
        if self._omega is not None:
            self._omega, self._psi = self._omega.to(device), self._psi.to(device)

    def _add(self, h: int, a: torch.Tensor, g: torch.Tensor, scale: float) -> None:
        # In place, in the inputs' dtype: no product the size of the sums is ever made (a whole
        # d_out x d_in product and its float64 copy were up to 5x a weight gradient, transient).
        if self.method == "exact":
            self._sums[0][h].addmm_(g.T, a, alpha=scale)
            return
        y, w = self._sums
        y[h].addmm_(g.T, a @ self.omega, alpha=scale)
        w[h].addmm_((g @ self.psi.T).T, a, alpha=scale)

    def state_tensor(self, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        """All state as one flat float64 tensor of sums, ready for ``all_reduce(SUM)``.

        Layout: the sums (``S[2, d_out, d_in]``, or ``Y[2, d_out, k]`` then ``W[2, l, d_in]``),
        ``count[2]``, ``skipped``.

        Args:
            device: where to put the tensor (default: where the sums live).
        """
        sums = [s.reshape(-1).double() for s in self._sums]
        tail = torch.cat([self._count, torch.tensor([self._skipped], dtype=torch.float64)]).to(sums[0].device)
        flat = torch.cat(sums + [tail])
        return flat if device is None else flat.to(device)

    @property
    def state_size(self) -> int:
        """Entries of :meth:`state_tensor`: the sums, two half counts and the skipped count."""
        return sum(s.numel() for s in self._sums) + 3

    def load_state_tensor(self, state: torch.Tensor) -> None:
        """Replace all state with a tensor from :meth:`state_tensor` (possibly summed over processes).

        Args:
            state: flat tensor, from an accumulator with the same name, shape, width and method.
        """
        sizes = [s.numel() for s in self._sums]
        expected = self.state_size
        state = state.detach().reshape(-1).to(self._sums[0].device, torch.float64)
        if state.numel() != expected:
            raise FisherAnalysisError(
                f"module {self.name!r}: state tensor has {state.numel()} entries, {expected} expected "
                f"({self.method}, d_out={self.d_out}, d_in={self.d_in}, width={self.width})"
            )
        parts = torch.split(state, sizes + [2, 1])
        self._sums = [p.reshape(s.shape).to(s.dtype, copy=True) for p, s in zip(parts, self._sums)]
        self._count = parts[-2].cpu().clone()
        self._skipped = float(parts[-1])

    def spectrum(self, top: int, *, margin: float = NOISE_MARGIN) -> ModuleSpectrum:
        """The top squared singular values of the mean gradient ``G`` and the noise floor.

        Args:
            top: how many values to return (at most ``min(d_out, d_in)``, and ``k`` for a sketch).
            margin: factor on the noise estimate (see the module docstring).

        Raises:
            FisherAnalysisError: a half holds no sample, so the noise cannot be estimated.
        """
        n1, n2 = self.half_counts
        if min(n1, n2) == 0:
            raise FisherAnalysisError(
                f"module {self.name!r}: the noise floor needs samples in both halves, got {n1} and {n2}; "
                "run the analysis on at least two finite samples"
            )
        total = n1 + n2
        sums = [s.double() for s in self._sums]  # every estimate in float64
        mean = [(s[0] + s[1]) / total for s in sums]
        diff = [s[0] / n1 - s[1] / n2 for s in sums]
        top = min(top, self.d_out, self.d_in, self.width if self.method == "sketch" else top)
        if self.method == "exact":
            sigma_sq = torch.linalg.svdvals(mean[0].cpu())[:top].square()
            diff_top = float(torch.linalg.svdvals(diff[0].cpu())[0]) ** 2
            diff_frob = float(diff[0].square().sum())
        else:
            sigma_sq = self._sketch_sigma_sq(*mean)[:top]
            diff_top = float(self._sketch_sigma_sq(*diff)[0])
            diff_frob = self._sketch_frobenius_sq(*diff)
        floor = margin * (n1 * n2 / total**2) * max(diff_top, self._edge(diff_frob))
        return ModuleSpectrum(self.name, tuple(sigma_sq.tolist()), floor, total)

    # ------------------------------------------------------------------ the halves, for the stopping rule
    @property
    def half_sketch_size(self) -> int:
        """Entries of :meth:`half_sketch`."""
        return 2 * self.width * self.d_out + 2 * (2 * self.width + 1) * self.d_in + 2

    def half_sketch(self, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        """Each half's sums, sketched, as one flat tensor: ``Y[2, d_out, k]``, ``W[2, l, d_in]``, ``count[2]``.

        In the sums' dtype (float32 unless a float64 batch came): a float64 copy of every
        module's sketch at once was the check's largest transient on a 32,000-wide output layer;
        :meth:`half_spectra` takes each module's part to float64 on its own.

        The sketches of the sketch method are its state; the exact method's sums are sketched with
        the same test matrices when asked (``O(d_out d_in k)`` per half, in float64): the exact
        method is chosen only where its sums are small, so this costs less than keeping a sketch
        up to date with every batch (``O(tokens (d_out + d_in) k)``), which it used to do. A
        sketch is linear in the sums, so ``all_reduce(SUM)`` of these tensors is the sketch of
        the summed state: the stopping rule's traffic under DDP is the size of a rank-``k``
        adapter per module, not that of the exact sums.
        """
        if self.method == "sketch":
            y, w = self._sums
        else:
            sums = self._sums[0].double()
            y, w = (sums @ self.omega.double()).to(self.dtype), (self.psi.double() @ sums).to(self.dtype)
        flat = torch.cat([y.reshape(-1), w.reshape(-1), self._count.to(y.device, y.dtype)])
        return flat if device is None else flat.to(device)

    def half_spectra(
        self, sketch: torch.Tensor, top: int, *, margin: float = NOISE_MARGIN
    ) -> Optional[tuple[ModuleSpectrum, ModuleSpectrum]]:
        """Each half's own spectrum and floor, from a :meth:`half_sketch` (possibly summed over processes).

        Half ``h``'s mean gradient ``G_h = S_h / n_h`` carries noise of covariance ``Sigma / n_h``,
        distributed like ``sqrt(c_h) D`` with ``c_h = n_other / N`` (the module docstring's ``c``
        for the whole), so its floor is the whole's with ``c_h`` in place of ``c``: about twice as
        high for equal halves. Values come from the sketch estimator whatever the method (cheap
        enough to run after every batch); the map's values come from :meth:`spectrum`.

        Returns:
            ``(half_1, half_2)``, or ``None`` while a half holds no sample.
        """
        sketch = sketch.detach().reshape(-1).to(torch.float64).cpu()
        if sketch.numel() != self.half_sketch_size:
            raise FisherAnalysisError(
                f"module {self.name!r}: half sketch has {sketch.numel()} entries, {self.half_sketch_size} expected"
            )
        wide = 2 * self.width + 1
        y, w, count = torch.split(sketch, [2 * self.d_out * self.width, 2 * wide * self.d_in, 2])
        y, w = y.reshape(2, self.d_out, self.width), w.reshape(2, wide, self.d_in)
        n1, n2 = int(count[0]), int(count[1])
        if min(n1, n2) == 0:
            return None
        total = n1 + n2
        diff = (y[0] / n1 - y[1] / n2, w[0] / n1 - w[1] / n2)
        ys, ws = (diff[0], y[0] / n1, y[1] / n2), (diff[1], w[0] / n1, w[1] / n2)
        if y.numel() <= BATCHED_CHECK_ELEMENTS:
            # The difference and both halves in one batched reconstruction: on small modules the
            # per-call overhead of three separate ones was most of the stopping check's time.
            sigma_sq = self._sketch_sigma_sq(torch.stack(ys), torch.stack(ws))
        else:  # one at a time: three float64 copies of a large module's sketch at once cost memory
            sigma_sq = torch.stack([self._sketch_sigma_sq(a, b) for a, b in zip(ys, ws)])
        noise = max(float(sigma_sq[0, 0]), self._edge(self._sketch_frobenius_sq(*diff)))
        top = min(top, self.d_out, self.d_in, self.width)
        halves = []
        for h, (n, other) in enumerate(((n1, n2), (n2, n1))):
            values = tuple(sigma_sq[1 + h, :top].tolist())
            halves.append(ModuleSpectrum(self.name, values, margin * other / total * noise, n))
        return halves[0], halves[1]

    # ------------------------------------------------------------------ estimators
    def _edge(self, frobenius_sq: float) -> float:
        """Marchenko-Pastur edge of iid noise with this squared Frobenius norm."""
        return frobenius_sq * (math.sqrt(self.d_out) + math.sqrt(self.d_in)) ** 2 / (self.d_out * self.d_in)

    def _sketch_frobenius_sq(self, y: torch.Tensor, w: torch.Tensor) -> float:
        """``||A||_F^2`` from ``A Omega`` and ``Psi A``: ``E||A Omega||_F^2 = k ||A||_F^2``, likewise for ``Psi``."""
        return float(y.square().sum() + w.square().sum()) / (self.width + 2 * self.width + 1)

    def _psi_q(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``Psi Q`` with ``Q = orth(Y)``, without forming ``Q`` where ``Y`` is well conditioned.

        ``Psi Y = Psi S Omega = W Omega``, so with ``Y = Q R``, ``Psi Q = W Omega R^{-1}``: an
        ``l x d_in x k`` product and ``R`` alone instead of ``Q`` and an ``l x d_out x k`` product
        (80x fewer operations on a 32,000-row output layer). A rank-deficient ``Y`` (a module
        with no gradient) has no usable ``R^{-1}``, nor has a ``Y`` with fewer rows than columns a
        square ``R``: ``Q`` is formed then, as before.
        """
        if y.shape[-2] >= y.shape[-1]:  # else R is not square: fewer outputs than the sketch is wide
            r = torch.linalg.qr(y, mode="r").R
            diagonal = r.diagonal(dim1=-2, dim2=-1).abs()
            if bool((diagonal.amin(-1) > 1e-6 * diagonal.amax(-1)).all()):
                return torch.linalg.solve_triangular(r, w @ self.omega.cpu().double(), upper=True, left=False)
        return self.psi.cpu().double() @ torch.linalg.qr(y).Q

    def _sketch_sigma_sq(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Eigenvalues of ``X X^T - ||r||^2 / (l - k) ((Psi Q)^T Psi Q)^{-1}`` (module docstring), descending.

        With ``Psi Q = U R`` (thin QR), ``X = R^{-1} U^T W`` and ``||r||^2 = ||W||^2 - ||U^T W||^2``,
        so the matrix is ``R^{-1} (Z Z^T - ||r||^2 / (l - k) I) R^{-T}`` with ``Z = U^T W``: one
        matrix product with ``W`` instead of a least-squares solve (the stopping rule runs this
        for every module at every check). ``y`` (``[..., d_out, k]``) and ``w`` (``[..., l, d_in]``)
        may carry leading batch dimensions; so does the result.
        """
        w = w.cpu()
        u, r = torch.linalg.qr(self._psi_q(y.cpu(), w))
        z = u.mT @ w
        zz = z @ z.mT
        trace = zz.diagonal(dim1=-2, dim2=-1).sum(-1)
        tail = (w.square().sum((-2, -1)) - trace).clamp_min(0.0) / (u.shape[-2] - u.shape[-1])
        inner = zz - tail[..., None, None] * torch.eye(zz.shape[-1], dtype=zz.dtype)
        left = torch.linalg.solve_triangular(r, inner, upper=True)  # R^{-1} inner
        both = torch.linalg.solve_triangular(r, left.mT, upper=True)  # R^{-1} (R^{-1} inner)^T
        return torch.linalg.eigvalsh((both + both.mT) / 2).flip(-1).clamp_min(0.0)


class SpectrumSet:
    """One :class:`SpectrumAccumulator` per linear candidate, fed by the collector's observer.

    Usage::

        spectra = SpectrumSet(candidates, rank_max=32, seed=0)
        collector = FisherCollector(model, candidates, observer=spectra.observe)
        ...                                   # batches as usual
        spectra.spectra()                     # {name: ModuleSpectrum}

    Args:
        candidates: ``{name: module}`` of ``Linear`` / ``Conv1D`` modules.
        rank_max: the largest rank the allocation may give; sets the sketch width
            (:func:`sketch_width`) and how many values :meth:`spectra` returns.
        method: ``"auto"``, ``"exact"`` or ``"sketch"`` for every module.
        seed: seeds the sketches' test matrices (the same on every process).
        loss_reduction: as for the collector.
        check_every: the stopping check runs after every this many batches (:meth:`check_due`;
            default :data:`STOP_CHECK_EVERY`).

    Raises:
        CandidateSelectionError: a candidate is not a linear module (an ``Embedding`` has no
            ``d_out x d_in`` weight gradient to take the spectrum of: exclude it, or use the
            ``trace`` criterion).
    """

    def __init__(
        self, candidates: Mapping[str, nn.Module], *, rank_max: int, method: SpectrumMethod = "auto", seed: int = 0,
        loss_reduction: Literal["mean", "sum"] = "mean", check_every: Optional[int] = None,
    ) -> None:
        check_every = STOP_CHECK_EVERY if check_every is None else check_every
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every: must be a positive integer, got {check_every!r}")
        self.rank_max = rank_max
        self.check_every = check_every
        #: The stopping check's latest correlation, given again on the batches between checks.
        self.last_correlation: Optional[float] = None
        self._check_calls = 0
        self.accumulators: dict[str, SpectrumAccumulator] = {}
        for name, module in candidates.items():
            kind = module_type_name(module)
            if kind not in ("Linear", "Conv1D"):
                raise CandidateSelectionError(
                    f"candidate {name!r} is an {kind}: the spectrum criterion scores Linear and Conv1D modules; "
                    f"exclude it (exclude=[{name!r}]) or use criterion='trace'"
                )
            # not weight.shape: a quantized weight is packed (a sharded DTensor's shape is global)
            rows, cols = weight_shape(module)
            d_out, d_in = (cols, rows) if kind == "Conv1D" else (rows, cols)
            self.accumulators[name] = SpectrumAccumulator(
                name, d_in, d_out, width=sketch_width(rank_max), method=method, seed=seed,
                loss_reduction=loss_reduction,
            )

    def observe(self, name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        """The collector's observer: add one batch of module ``name``."""
        self.accumulators[name].update(a, g)

    def state_tensor(self, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        """Every accumulator's state, concatenated in candidate order (for one all-reduce)."""
        return torch.cat([acc.state_tensor(device) for acc in self.accumulators.values()])

    def load_state_tensor(self, state: torch.Tensor) -> None:
        """Replace every accumulator's state from :meth:`state_tensor` (possibly summed over processes)."""
        sizes = [acc.state_size for acc in self.accumulators.values()]
        for acc, part in zip(self.accumulators.values(), torch.split(state.reshape(-1), sizes)):
            acc.load_state_tensor(part)

    def spectra(self, *, margin: float = NOISE_MARGIN) -> dict[str, ModuleSpectrum]:
        """``{name: ModuleSpectrum}`` with up to ``rank_max`` values each."""
        return {name: acc.spectrum(self.rank_max, margin=margin) for name, acc in self.accumulators.items()}

    @property
    def rank_costs(self) -> dict[str, int]:
        """``{name: d_in + d_out}``: adapter parameters per unit of rank."""
        return {name: acc.d_in + acc.d_out for name, acc in self.accumulators.items()}

    @property
    def rank_limits(self) -> dict[str, int]:
        """``{name: min(d_in, d_out)}``: the largest rank that fits each module."""
        return {name: min(acc.d_in, acc.d_out) for name, acc in self.accumulators.items()}

    def check_due(self) -> bool:
        """Whether the stopping check runs after this batch: called once per batch, true every ``check_every``-th.

        On the batches between, the stopping rule counts :attr:`last_correlation` again (``None``
        before the first check): a streak of stable checks then ends at most ``check_every - 1``
        batches after the one checking every batch would have seen, and the map's statistics
        (summed every batch) are the same. Every process calls it once per batch, so under DDP
        the check's collective runs on the same batches everywhere.
        """
        self._check_calls += 1
        return self._check_calls % self.check_every == 0

    def half_sketch(self, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        """Every accumulator's :meth:`~SpectrumAccumulator.half_sketch`, concatenated (for one all-reduce)."""
        return torch.cat([acc.half_sketch(device) for acc in self.accumulators.values()])

    def half_spectra(
        self, sketch: torch.Tensor, *, margin: float = NOISE_MARGIN
    ) -> Optional[dict[str, tuple[ModuleSpectrum, ModuleSpectrum]]]:
        """``{name: (half_1, half_2)}`` from :meth:`half_sketch`; ``None`` while a half holds no sample."""
        sizes = [acc.half_sketch_size for acc in self.accumulators.values()]
        halves = {}
        for (name, acc), part in zip(self.accumulators.items(), torch.split(sketch.reshape(-1), sizes)):
            pair = acc.half_spectra(part, self.rank_max, margin=margin)
            if pair is None:
                return None
            halves[name] = pair
        return halves


def _finite_samples(x: torch.Tensor) -> torch.Tensor:
    """``[B]``: whether each sample of ``x`` (``[B, T, d]``) is finite everywhere.

    A sum is finite when every term is; a non-finite sum may also be an overflow of finite terms,
    so only those samples are checked element by element. One reduction instead of a boolean copy
    of ``x`` (and not a float64 sum: on CPU that makes a float64 copy of ``x`` first).
    """
    finite = torch.isfinite(x.sum((1, 2)))
    if not bool(finite.all()):
        for i in torch.nonzero(~finite).reshape(-1).tolist():
            finite[i] = bool(torch.isfinite(x[i]).all())
    return finite


def _module_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
