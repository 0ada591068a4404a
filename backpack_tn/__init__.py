"""backpack_tn: BackPACK's Linear and convolution derivatives as einsum tensor networks.

Switch from stock BackPACK by changing one import::

    from backpack import backpack, extend
    from backpack_tn.extensions import BatchGrad, DiagGGNExact, KFAC

or convert any extension instance with :func:`use_tn`.

Index table (legs of every network, see :mod:`backpack_tn.expressions.layer_spec`):

======  ================================================================
leg     meaning
======  ================================================================
``v``   vectors (columns of a matrix square root, MC samples, ...)
``n``   batch
``g``   channel groups ``G``
``a``   output channels within a group (``C_out // G``)
``b``   input channels within a group (``C_in // G``)
``k0…`` kernel positions ``K`` per spatial dimension
``o0…`` positions on a pattern's output side ``O`` (a conv's output)
``i0…`` positions on a pattern's input side ``I`` (a conv's input)
``s0…`` shared positions of a Linear layer's input ``[N, *, C_in]``
======  ================================================================

A convolution is ``y[n,g,a,o] = Σ x[n,g,b,i] W[g,a,b,k] Π[k,o,i]`` with one index
pattern ``Π`` per spatial dimension; a transposed convolution swaps the roles of
``i`` and ``o``.
"""

from backpack_tn.derivatives import STRATEGIES, set_autotune, set_host_probe
from backpack_tn.engine.contract import optimizer, set_optimizer
from backpack_tn.engine.gemm import set_gemm_backend
from backpack_tn.register import use_tn

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "__version__",
    "optimizer",
    "set_autotune",
    "set_host_probe",
    "set_gemm_backend",
    "set_optimizer",
    "use_tn",
]
