"""highway-bp: Highway backpropagation (Fagnou et al., ICLR 2025) for PyTorch.

    import highwaybp as hbp
    chain = hbp.ResidualChain([hbp.ResidualLayer(b) for b in blocks], method=hbp.Highway(k=3))
    loss_fn(head(chain(x)), t).backward()
"""

from highwaybp import distributed, schedules
from highwaybp._compat import require_tested as _require_tested
from highwaybp._version import __version__
from highwaybp.control import KController
from highwaybp.core.chain import ResidualChain
from highwaybp.core.fidelity import compare_gradients, gradient_fidelity, use_method
from highwaybp.core.iteration import Diagnostics
from highwaybp.core.methods import Exact, FixedPoint, Highway, Method, method_from_string
from highwaybp.core.residual import (
    Gated,
    Identity,
    LinearShortcut,
    ModuleShortcut,
    ReLUResidual,
    ResidualLayer,
    ResidualMap,
    Scaled,
)
from highwaybp.core.scan import (
    reverse_scan,
    reverse_scan_hillis_steele,
    reverse_scan_sequential,
)
from highwaybp.models import GRU, LSTM, from_huggingface, from_torchvision

# Only torch 2.13 is tested: another release is refused (HIGHWAYBP_ALLOW_UNTESTED=1 warns).
_require_tested("torch", "highway-bp")

__all__ = [
    "GRU",
    "LSTM",
    "Diagnostics",
    "Exact",
    "FixedPoint",
    "Gated",
    "Highway",
    "Identity",
    "KController",
    "LinearShortcut",
    "Method",
    "ModuleShortcut",
    "ReLUResidual",
    "ResidualChain",
    "ResidualLayer",
    "ResidualMap",
    "Scaled",
    "__version__",
    "compare_gradients",
    "distributed",
    "from_huggingface",
    "from_torchvision",
    "gradient_fidelity",
    "method_from_string",
    "reverse_scan",
    "reverse_scan_hillis_steele",
    "reverse_scan_sequential",
    "schedules",
    "use_method",
]
