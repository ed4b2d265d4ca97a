"""Anderson acceleration (type II) of the Highway-BP iteration: the one owner of the mixing rule.

The iteration is a fixed-point map on the stacked adjoints (spec: highway-bp.md, section 10):

    F(w) = w^0 + N w,   N w = scan(block_vjp(w))    (FixedPoint: N w = full_vjp(w), no scan)

Plain Highway(k) returns w^k = F^k(w^0): the partial sums of the Neumann series of the
nilpotent N, exact at k = L, but whose terms can grow with their length on a trained model
(section 9). Anderson mixing (Anderson 1965; Walker & Ni 2011) spends the same F evaluations
better: with x_0 = w^0, f_j = F(x_j) and residuals r_j = f_j - x_j, it keeps the last m pairs
(f, r) and sets

    alpha = argmin || sum_i alpha_i r_i ||  subject to  sum_i alpha_i = 1
    x_{j+1} = sum_i alpha_i f_i

One F evaluation per iteration (one sweep of VJPs and one scan, as plain Highway-BP), plus
one row of an [m, m] Gram matrix of state inner products and one linear combination. F is
affine, so `sum_i alpha_i r_i` is exactly the residual of the mixed point and
x_{j+1} = F(sum_i alpha_i x_i); with an unbounded window this is GMRES on (I - N) w = w^0.

Rules (each tested in tests/core/test_anderson.py):

- Solve: alpha = beta / sum(beta), (G + lam I) beta = 1, G the Gram matrix of the window's
  residuals, lam = `reg` * max(diag G) (a Tikhonov term relative to the residuals' scale).
- Restart on ill-conditioning: when the Gram matrix normalised to a unit diagonal has a
  condition number above `cond_limit` (default 0.01 / eps of the states' dtype: beyond it the
  weights carry no digits), the window keeps only the newest pair and the step is plain.
- Safeguard: the mix is accepted only if its residual (alpha^T G alpha, exact for an affine
  F) is no larger than the plain step's (the newest residual, G[-1, -1]); otherwise the step
  is plain (x_{j+1} = f_j) and the window restarts. With lam = 0 and exact arithmetic the
  minimiser can never lose to alpha = e_newest; the rule catches the regularisation and
  rounding doing so.
- Exactness: `frontier` counts the top rows of an iterate that are provably exact: w^0 has
  one (h_L's adjoint is its own loss), F adds one (row i of F(x) reads rows > i of x), and a
  mix has the smallest frontier of the f's it combines. Plain steps reach L + 1 at
  iteration L (exact backprop); any mix before L delays it. So a fixed k >= L runs plain
  steps (mixing could only lose exactness), and an adaptive run is called exact only when
  its frontier says so.

Memory: the window holds m values of F and m residuals (2m states), plus the current iterate;
a caller that writes F in place (`f_buffer`, the RNN engines) holds 2m + 1 states besides w^0,
2m more than the plain iteration (tests/models/test_rnn_anderson.py counts them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from highwaybp.core.states import (
    States,
    combine_states_,
    copy_states_,
    dot_states,
    empty_like_states,
    sub_states_,
)


def _dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """Inner products of half-precision states in float32: in bfloat16 / float16 the Gram
    matrix would carry 2-3 digits (the restart threshold 0.01 / eps would be ~1-10)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---- the mixing rule ----------------------------------------------------------------------
@dataclass
class MixStep:
    """What one `AndersonMixer.step` did.

    residual: ||f - x|| of the iterate x the step started from; relative: residual / ||f||
    (the plain iteration's relative step ||w^{j+1} - w^j|| / ||w^{j+1}||); mixed: the new
    iterate is a mix of two or more values of F (False: a plain step, x_next = f);
    restarted: the window was cut to the newest pair (ill-conditioned Gram or safeguard);
    safeguarded: a mix was refused because its residual exceeded the plain step's;
    weights: the mixing weights, oldest first (None for a plain step).
    """

    residual: float
    relative: float
    mixed: bool
    restarted: bool = False
    safeguarded: bool = False
    weights: Optional[list[float]] = None


class AndersonMixer:
    """Anderson (type II) mixing over a window of `window` >= 2 values of F.

        mixer = AndersonMixer(window=5, like=w0, num_layers=L)
        x = w0
        for j in 1..k:
            f = mixer.f_buffer()          # write F(x) into it
            ... f <- F(x)
            x, step = mixer.step(x, f)    # the next iterate, in a buffer the mixer owns and
                                          # overwrites at the next step (copy it to keep it)

    Args:
        window: m, the number of (F value, residual) pairs kept.
        like: a state sequence whose shapes, dtype and device the buffers copy.
        num_layers: L, for the exactness frontier (see the module docstring).
        new_state: allocates one state sequence (default: empty_like_states(like)); the RNN
            engines pass their buffer pool's.
        reduce: sums a 1-d float tensor of partial inner products over the processes that
            hold the other states (the layer-parallel pipeline: one all-reduce per
            iteration); None in one process.
        reg, cond_limit: the Tikhonov factor and the restart threshold (defaults from the
            inner products' dtype: 100 eps and 0.01 / eps; the inner products are taken in
            the states' dtype, in float32 for half-precision states, and again in float64
            when they overflow).
        reuse_buffers: keep the F values and residuals that leave the window for reuse
            (`f_buffer`, the residuals): a caller that writes F in place (the RNN engines)
            allocates nothing after the window fills. False: a dropped F value is released
            (a caller that forms a fresh F each iteration).
    """

    def __init__(
        self,
        window: int,
        like: States,
        num_layers: int,
        new_state: Optional[Callable[[], States]] = None,
        reduce: Optional[Callable[[Tensor], Tensor]] = None,
        reg: Optional[float] = None,
        cond_limit: Optional[float] = None,
        reuse_buffers: bool = True,
    ) -> None:
        if window < 2:
            raise ValueError(
                f"AndersonMixer: window must be >= 2 (1 is the plain step), got {window}")
        self.window = window
        self.num_layers = num_layers
        self._new = new_state if new_state is not None else (lambda: empty_like_states(like))
        self._reduce = reduce
        self._reuse = reuse_buffers
        first = like if isinstance(like, Tensor) else next(t for t in like if t is not None)
        self._dot_dtype = _dot_dtype(first.dtype)
        eps = torch.finfo(self._dot_dtype).eps
        self.reg = 100.0 * eps if reg is None else float(reg)
        self.cond_limit = 0.01 / eps if cond_limit is None else float(cond_limit)
        # Ring of (F value, residual, frontier of the F value); Gram of the residuals.
        self._f: list[States] = []
        self._r: list[States] = []
        self._front: list[int] = []
        self._gram = np.zeros((0, 0))
        self._spare_f: list[States] = []  # F buffers dropped from the window, for reuse
        self._spare_r: list[States] = []
        self._x: Optional[States] = None  # the mixer's iterate buffer
        self.frontier = 1  # of the current iterate: x_0 = w^0 has its top row exact

    @property
    def is_exact(self) -> bool:
        """Whether the current iterate is provably exact backprop (frontier past h_0)."""
        return self.frontier > self.num_layers

    def f_buffer(self) -> States:
        """A buffer to write the next value of F into: with a full window, the oldest F
        value's (which the next `step` drops before mixing), else a spare or a new one; so
        a caller writing F in place holds m F values, never m + 1."""
        if self._reuse and len(self._f) == self.window:
            return self._f[0]
        return self._spare_f.pop() if self._spare_f else self._new()

    def step(self, x: States, f: States) -> tuple[States, MixStep]:
        """From the iterate x and f = F(x), the next iterate. The mixer keeps f (it must not
        be written afterwards) and only reads x. `residual_dots` then `mix`, with `reduce`
        applied to the inner products between them."""
        r, dots = self.residual_dots(x, f)
        if self._reduce is not None:
            dots = self._reduce(dots)
        return self.mix(f, r, dots)

    def residual_dots(self, x: States, f: States) -> tuple[States, Tensor]:
        """r = f - x and this process's inner products (float64 [m' + 2]: r against the
        window's residuals, r with itself, f with itself), to be summed over the processes
        holding the other states before `mix` (the pipeline times the two apart)."""
        if len(self._f) == self.window:  # the oldest pair leaves before the new one comes
            self._drop(self._f.pop(0), self._r.pop(0), reused=f)
            self._front.pop(0)
            self._gram = self._gram[1:, 1:]
        r = self._spare_r.pop() if self._spare_r else self._new()
        sub_states_(r, f, x)
        pairs = [*((r, old) for old in self._r), (r, r), (f, f)]
        dots = torch.stack([dot_states(a, b, self._dot_dtype) for a, b in pairs])
        if not bool(torch.isfinite(dots).all()):
            # Finite states whose products overflow the states' dtype (float32 beyond ~1e19
            # per element): redo the products in float64 rather than lose the mix to inf.
            dots = torch.stack([dot_states(a, b, torch.float64) for a, b in pairs])
        return r, dots.to(torch.float64)

    def mix(self, f: States, r: States, dots: Tensor) -> tuple[States, MixStep]:
        """The next iterate from f, its residual r and the summed inner products."""
        values = dots.tolist()
        row, rr, ff = values[:-2], values[-2], values[-1]
        residual = max(rr, 0.0) ** 0.5
        relative = 0.0 if residual == 0.0 else residual / max(ff ** 0.5, 1e-300)
        self._push(f, r, row, rr, self.frontier + 1)
        restarted = safeguarded = False
        weights = None
        if len(self._f) > 1 and rr > 0.0:
            weights = self._solve()
            if weights is None:
                restarted = True
            elif self._mix_residual(weights) > rr:
                weights, restarted, safeguarded = None, True, True
            if restarted:
                self._keep_newest()
        elif rr == 0.0:
            self._keep_newest()  # x is a fixed point: F(x) = x is the answer, history is moot
        # x is read for the last time above (r = f - x): the next iterate may overwrite it.
        if self._x is None:
            self._x = self._new()
        out = self._x
        if weights is None:
            copy_states_(out, f)
            self.frontier = self._front[-1]
        else:
            combine_states_(out, weights, self._f)
            self.frontier = min(self._front)
        return out, MixStep(residual, relative, weights is not None, restarted, safeguarded,
                            weights)

    # ---- internals --------------------------------------------------------------------
    def _drop(self, f: States, r: States, reused: Optional[States] = None) -> None:
        if self._reuse and f is not reused:  # (`reused`: already the new F value's buffer)
            self._spare_f.append(f)
        self._spare_r.append(r)

    def _push(self, f: States, r: States, row: list[float], rr: float, front: int) -> None:
        n = len(self._f)
        gram = np.empty((n + 1, n + 1))
        gram[:n, :n] = self._gram
        gram[n, :n] = gram[:n, n] = row
        gram[n, n] = rr
        self._gram = gram
        self._f.append(f)
        self._r.append(r)
        self._front.append(min(front, self.num_layers + 1))

    def _keep_newest(self) -> None:
        for f, r in zip(self._f[:-1], self._r[:-1]):
            self._drop(f, r)
        self._f, self._r, self._front = self._f[-1:], self._r[-1:], self._front[-1:]
        self._gram = self._gram[-1:, -1:]

    def _solve(self) -> Optional[list[float]]:
        """The mixing weights, or None when the Gram matrix is too ill-conditioned."""
        gram = self._gram
        diag = np.diag(gram)
        if not np.all(diag > 0.0):
            return None  # a zero residual in the window: nothing to mix
        scale = np.sqrt(diag)
        unit = gram / np.outer(scale, scale)
        eig = np.linalg.eigvalsh(unit)
        if not eig[0] > 0.0 or eig[-1] / eig[0] > self.cond_limit:
            return None
        lam = self.reg * float(diag.max())
        beta = np.linalg.solve(gram + lam * np.eye(len(diag)), np.ones(len(diag)))
        total = beta.sum()
        if not np.isfinite(total) or total == 0.0:
            return None
        return (beta / total).tolist()

    def _mix_residual(self, weights: list[float]) -> float:
        """||sum_i alpha_i r_i||^2 = alpha^T G alpha (exact for an affine F)."""
        a = np.asarray(weights)
        return float(a @ self._gram @ a)
