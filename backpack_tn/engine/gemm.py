"""Batched GEMMs ``a @ bᵀ`` through the faster of PyTorch's two CPU GEMM libraries.

On CPU, ``torch.bmm`` calls MKL, and PyTorch's convolutions call oneDNN, which
also has its own GEMM (``torch.ops.mkldnn._linear_pointwise``). They are not
equally fast everywhere: on the AMD EPYC (AVX-512) machine this project is
measured on, oneDNN ran ``[5120, 784] @ [784, 512]`` at 417 GFLOP/s and MKL at
200. Which library wins is a property of the machine, so with the ``'auto'``
backend (the default) one probe GEMM is timed with both on first use, and large
float32/bfloat16 GEMMs on CPU go to oneDNN when it was clearly faster.

oneDNN's GEMM has no batched form and no autograd formula: a batch runs as one
call per matrix (only GEMMs of at least ``MIN_FLOPS`` each, where the calls'
overhead is small), and tensors that need gradients or sit inside ``torch.func``
transforms, CUDA tensors and other dtypes always take ``bmm``. So do bfloat16
GEMMs on processors whose oneDNN has no bfloat16 inner product (AVX2-only ones: it
fails to create the primitive); each dtype is tried once on first use.
"""

from __future__ import annotations

import torch
from torch import Tensor, bmm

from backpack_tn._timing import fastest_times

#: GEMM backends: ``'auto'`` measures, ``'bmm'`` is MKL (cuBLAS on CUDA), and
#: ``'onednn'`` uses oneDNN for large CPU GEMMs where it can.
BACKENDS = ("auto", "bmm", "onednn")
#: Smallest GEMM (in FLOPs) that goes to oneDNN in one call.
MIN_FLOPS = 2**22
#: Smallest GEMM per matrix of a batch that oneDNN runs one call at a time: with
#: four matrices of 5 MFLOP each, the calls cost 1.7x the time of one ``bmm``.
LOOP_MIN_FLOPS = 2**24
#: Shortest summed dimension of a batch that oneDNN runs one call at a time. Each
#: call's result is copied into the batch's; with a short summed dimension the
#: GEMM is bound by writing its result, and the copy doubles that (square-root GGN
#: backpropagation through ResNet18: 1.6 s against 0.9 s with ``bmm``).
LOOP_MIN_INNER = 128
#: GEMMs whose operands oneDNN would have to copy (MKL reads transposed ones as
#: they lie) need this many times ``MIN_FLOPS``: a transposing copy of a Gram
#: operand ``[49, 2048]`` took as long as its GEMM.
COPY_PENALTY = 32
#: oneDNN must beat MKL by this factor on the probe to be used by ``'auto'``.
MARGIN = 1.2
#: Probe GEMM ``[M, K] @ [K, N]`` timed by ``'auto'``.
PROBE = (512, 256, 512)
#: Interleaved rounds of the probe; each library keeps its fastest.
PROBE_ROUNDS = 8

_SETTING = {"backend": "auto", "resolved": None}
#: dtypes oneDNN's GEMM may serve, and whether this process's oneDNN can (tried once).
_DTYPES = (torch.float32, torch.bfloat16)
_AVAILABLE: dict[torch.dtype, bool] = {}


def set_gemm_backend(name: str):
    """Choose the library of large CPU GEMMs.

    Args:
        name: One of ``BACKENDS``.

    Raises:
        ValueError: If ``name`` is not a backend.
    """
    if name not in BACKENDS:
        raise ValueError(f"Unsupported GEMM backend {name!r}. Supported: {BACKENDS}.")
    _SETTING["backend"] = name
    _SETTING["resolved"] = None


def gemm_backend() -> str:
    """The library that large float32 CPU GEMMs use now.

    Returns:
        ``'bmm'`` or ``'onednn'`` (``'auto'`` is resolved by a probe on first use).
    """
    resolved = _SETTING["resolved"]
    if resolved is None:
        backend = _SETTING["backend"]
        if backend == "auto":
            backend = "onednn" if _onednn_is_faster() else "bmm"
        elif backend == "onednn" and not _onednn_available():
            backend = "bmm"
        resolved = _SETTING["resolved"] = backend
    return resolved


def _onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this build and processor run oneDNN's GEMM in ``dtype``.

    Args:
        dtype: One of ``_DTYPES``.

    Returns:
        ``True`` if a 1x1 product in ``dtype`` runs (the answer is cached).
    """
    if dtype not in _AVAILABLE:
        try:
            with torch._C.DisableTorchFunction(), torch.no_grad():
                one = torch.ones(1, 1, dtype=dtype)
                _linear(one, one)
        except (AttributeError, RuntimeError):
            _AVAILABLE[dtype] = False
        else:
            _AVAILABLE[dtype] = True
    return _AVAILABLE[dtype]


def _linear(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ bᵀ + bias`` by oneDNN for matrices ``a [M, K]`` and ``b [N, K]``.

    oneDNN copies a left operand that is not contiguous, and reorders a right
    operand that is neither contiguous nor exactly transposed element by element:
    a row-major ``b`` with a leading dimension above ``K`` took 22 s instead of
    11 ms. Such a right operand is copied first; without a bias, a product whose
    left operand is transposed and whose right one is contiguous is computed
    transposed, ``(b @ aᵀ)ᵀ``, which copies nothing. An operand that serves as
    both is copied once.

    Returns:
        The product, of shape ``[M, N]`` (possibly a transposed view).
    """
    if a is b and not a.is_contiguous():
        a = b = a.contiguous()
    if bias is None and not a.is_contiguous() and b.is_contiguous() and _readable(a):
        return _linear(b, a).T
    if not _readable(b):
        b = b.contiguous()
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def _readable(b: Tensor) -> bool:
    """Whether oneDNN reads a right operand as it lies (contiguous or transposed).

    Returns:
        ``True`` for contiguous and exactly transposed contiguous matrices.
    """
    return b.is_contiguous() or b.T.is_contiguous()


def _onednn_is_faster() -> bool:
    """Time the probe GEMM with both libraries (outside any record).

    The global random state is left as it was: the probe runs on first use, which
    can be inside the user's backward pass.

    Returns:
        Whether oneDNN was faster by ``MARGIN``.
    """
    if not _onednn_available():
        return False
    m, k, n = PROBE
    with (
        torch._C.DisableTorchFunction(),
        torch.no_grad(),
        torch.random.fork_rng(devices=[]),
    ):
        a, b = torch.randn(1, m, k), torch.randn(1, n, k)
        best = fastest_times(
            {
                "bmm": lambda: bmm(a, b.transpose(1, 2)),
                "onednn": lambda: _onednn_bmm(a, b),
            },
            PROBE_ROUNDS,
        )
    return best["onednn"] * MARGIN < best["bmm"]


def _onednn_bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ bᵀ`` by oneDNN, one call per matrix of the batch.

    Returns:
        The products of shape ``[B, M, N]``.
    """
    if a.shape[0] == 1:
        return _linear(a[0], b[0]).contiguous().unsqueeze(0)
    if _one_call(a, b):
        batch, rows = a.shape[:2]  # a shared right operand: one call
        return _linear(a.reshape(batch * rows, -1), b[0]).view(batch, rows, -1)
    result = a.new_empty(a.shape[0], a.shape[1], b.shape[1])
    for i in range(a.shape[0]):
        left = a[i]
        result[i] = _linear(left, left if a is b else b[i])  # a Gram product
    return result


def uses_onednn(a: Tensor, b: Tensor, flops: int) -> bool:
    """Whether a GEMM of two operands goes to oneDNN.

    Returns:
        ``True`` for large enough float32/bfloat16 CPU GEMMs without gradients,
        outside ``torch.func`` transforms, when the backend is oneDNN and it runs
        in their dtype on this processor.
    """
    return (
        flops >= MIN_FLOPS
        and a.device.type == "cpu"
        and a.dtype in _DTYPES
        and b.dtype == a.dtype
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        and not torch._C._functorch.is_functorch_wrapped_tensor(a)
        and not torch._C._functorch.is_functorch_wrapped_tensor(b)
        and gemm_backend() == "onednn"
        and _onednn_available(a.dtype)
    )


#: A product with fewer result columns than this, whose left operand is stored
#: transposed (its rows contiguous), runs as the transposed product ``b @ aᵀ``:
#: GEMM kernels vectorise over the result's columns (2 threads, ``M = 50176``,
#: ``K = 64``, ``N = 3``: 13.2 → 2.8 ms; ``M = 1024``, ``K = 256``, ``N = 3``: 1.09
#: → 0.09 ms; from ``N = 16`` on, both orders run alike). With the left operand's
#: rows stored row by row, the narrow product is as fast or faster.
NARROW_COLUMNS = 16


def gemm_nt(a: Tensor, b: Tensor) -> Tensor:
    """Batched ``a @ bᵀ`` by the current backend.

    Args:
        a: Matrices of shape ``[B, M, K]`` (any strides).
        b: Matrices of shape ``[B, N, K]`` (any strides; a broadcast batch is fine).

    Returns:
        The products, of shape ``[B, M, N]`` (a transposed view for narrow
        products of a transposed ``a``, see ``NARROW_COLUMNS``).
    """
    rows, columns = a.shape[1], b.shape[1]
    if columns < min(rows, NARROW_COLUMNS) and a.stride(1) == 1 != a.stride(2):
        return gemm_nt(b, a).transpose(1, 2)
    flops = 2 * a.shape[1] * b.shape[1] * a.shape[2]
    if not _one_call(a, b):  # a loop of calls, each with its own overhead
        flops = flops * MIN_FLOPS // LOOP_MIN_FLOPS
        if a.shape[2] < LOOP_MIN_INNER:
            flops = 0
    if uses_onednn(a, b, flops) and (
        flops >= COPY_PENALTY * MIN_FLOPS or _copy_free(a[0], b[0])
    ):
        return _onednn_bmm(a, b)
    return bmm(a, b.transpose(1, 2))


def _one_call(a: Tensor, b: Tensor) -> bool:
    """Whether oneDNN computes the batch in one call.

    Returns:
        ``True`` for a single matrix, or a right operand shared by the batch
        whose left matrices stack into one.
    """
    return a.shape[0] == 1 or (
        b.stride(0) == 0 and a.stride(0) == a.shape[1] * a.stride(1)
    )


def _copy_free(a: Tensor, b: Tensor) -> bool:
    """Whether oneDNN multiplies ``a @ bᵀ`` without copying an operand.

    Returns:
        ``True`` if one operand is contiguous and the other contiguous or exactly
        transposed (and, for a product of a matrix with itself, if it is
        contiguous).
    """
    if a is b or a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return a.is_contiguous()
    return (a.is_contiguous() and _readable(b)) or (b.is_contiguous() and _readable(a))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weightᵀ + bias`` (``torch.nn.functional.linear``) by the current backend.

    Args:
        x: Inputs of shape ``[*, K]``.
        weight: Matrix of shape ``[N, K]`` (any strides).
        bias: Optional vector of shape ``[N]``.

    Returns:
        The result, of shape ``[*, N]``.
    """
    flops = 2 * x.numel() * weight.shape[0]
    if (bias is None or bias.dtype == x.dtype) and uses_onednn(x, weight, flops):
        result = _linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return result.view(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight, bias)
