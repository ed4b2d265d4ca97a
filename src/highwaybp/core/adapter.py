"""`ChainAdapter`: the one owner of handing a `ResidualChain`'s switches to the chains an
adapter builds.

The in-place adapters (`from_huggingface`'s `HighwayStack`, `from_torchvision`'s
`ResNetStage`) keep the user's block modules and build a fresh `ResidualChain` over them
at each forward (the HF stack binds that call's attention mask into its sub-layers). A
switch set on the adapter must therefore reach each chain it builds, or tools that set it
(`gradient_fidelity`'s step norms, `KController`'s watch) silently measure nothing.

The switches are, by definition, `ResidualChain`'s keyword-only constructor parameters
(`SWITCHES`, read from its signature: scan, vjp, preserve_rng_state, recompute,
record_step_norms, layerwise_sweeps): a switch added to the chain is carried by every
adapter without touching it. The adapter holds `method` and each switch as an attribute
of the same name, meaning and default; `_chain_of(layers)` builds the chain with the
values they have at that forward, and `_running(chain)` makes it the one reported.
`last_diagnostics` reads (and, as on a chain, can be cleared through) the report of the
last backward; a forward that ran the original blocks with gradients on (Exact) reports
an exact backward, as a chain under Exact does.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Optional

from torch import nn

from highwaybp.core.chain import ResidualChain
from highwaybp.core.iteration import Diagnostics
from highwaybp.core.methods import Method, check_method
from highwaybp.core.residual import ResidualLayer

#: name -> default of every switch `ResidualChain` takes besides its layers and method.
SWITCH_DEFAULTS: dict[str, Any] = {
    name: p.default
    for name, p in inspect.signature(ResidualChain.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}
SWITCHES: tuple[str, ...] = tuple(SWITCH_DEFAULTS)


class ChainAdapter:
    """Mixin for an `nn.Module` that runs blocks as a `ResidualChain` built per forward.

    Subclasses call `_configure(method, **switches)` once (and again to re-configure),
    build their chain with `_chain_of(layers)` and hand the one a forward runs to
    `_running(chain)`, call `_ran_original(needs_backward)` when a
    forward runs the original blocks instead, and give `num_chain_layers` (the weight of
    this unit in `KController`'s sweep average). A subclass whose configuration lives on
    another module (a later ResNet stage defers to the first) overrides `_owner`.
    """

    def _owner(self) -> ChainAdapter:
        return self

    @property
    def num_chain_layers(self) -> int:
        """Layers of the chain this adapter runs (the sub-layers, not the blocks)."""
        raise NotImplementedError

    def _check_switches(self, switches: dict[str, Any]) -> None:
        """Adapter-specific refusals (e.g. a VJP backend the cast cannot use)."""

    def _configure(self, method: Method, **switches: Any) -> None:
        """Set `method` and every switch (those not given: `ResidualChain`'s defaults)."""
        unknown = sorted(set(switches) - set(SWITCHES))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unknown chain option(s) {', '.join(unknown)}; "
                f"ResidualChain takes {', '.join(SWITCHES)}"
            )
        values = {**SWITCH_DEFAULTS, **switches}
        self._check_switches(values)
        # ResidualChain's own checks (names, vjp/scan combinations), now, on a dummy chain.
        ResidualChain([ResidualLayer(nn.Identity())], **values)
        self.method = check_method(method)
        for name, value in values.items():
            setattr(self, name, value)
        self._last_chain: list[ResidualChain] = []  # a list: not registered as a submodule
        self._exact_report: Optional[Diagnostics] = None

    def chain_options(self) -> dict[str, Any]:
        """The switches as they are now (read at each forward: set them as attributes)."""
        owner = self._owner()
        values = {name: getattr(owner, name) for name in SWITCHES}
        self._check_switches(values)
        return values

    def _chain_of(self, layers: Sequence[nn.Module]) -> ResidualChain:
        """The chain over `layers` with the method and switches as they are now."""
        return ResidualChain(layers, method=self._owner().method, **self.chain_options())

    def _running(self, chain: ResidualChain) -> ResidualChain:
        """`chain` runs this forward: from now on `last_diagnostics` reports it."""
        owner = self._owner()
        owner._last_chain[:] = [chain]
        owner._exact_report = None
        return chain

    def _ran_original(self, needs_backward: bool) -> None:
        """This forward ran the original blocks (Exact or no gradients): as a chain does,
        report an exact backward when one will follow, keep the last report otherwise."""
        owner = self._owner()
        if needs_backward:
            owner._last_chain[:] = []
            owner._exact_report = Diagnostics(method=repr(owner.method), stop_reason="exact")

    @property
    def last_chain(self) -> Optional[ResidualChain]:
        """The chain built at the last Highway/FixedPoint forward (None after an exact one)."""
        chains = self._owner()._last_chain
        return chains[0] if chains else None

    @property
    def last_diagnostics(self) -> Optional[Diagnostics]:
        """The last backward's `Diagnostics` (None before one; see `ResidualChain`)."""
        chain = self.last_chain
        return chain.last_diagnostics if chain is not None else self._owner()._exact_report

    @last_diagnostics.setter
    def last_diagnostics(self, value: Optional[Diagnostics]) -> None:
        chain = self.last_chain
        if chain is not None:
            chain.last_diagnostics = value
        else:
            self._owner()._exact_report = value
