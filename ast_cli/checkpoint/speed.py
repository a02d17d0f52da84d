"""Fast inference modes: dynamic int8 Linear layers, CPU bf16 detection, thread settings.

``quantize_dynamic(model, "int8")`` swaps every ``nn.Linear`` (query/key/value/output projections, the MLP and
the classifier; 99% of the FLOPs outside attention) for a dynamically quantized one: weights int8, symmetric
per output channel, quantized once; activations quantized per call; int8 x int8 -> int32 products, float32
out. LayerNorm, GELU and the patch convolution stay in float32; attention runs on int16 dot products where the
CPU has AVX512-VNNI (``int16.py``: 17.5-19 -> 11 ms per window), else float32 SDPA.

``place_bf16_cpu`` runs bf16 on the CPU the way oneDNN wants it: weights converted once and reordered into
AMX's blocked layout, the MLP's GELU fused into its first GEMM (``PackedLinearBF16``); attention and LayerNorm
run in bf16 too, with no float32 round trip between layers. Attention runs on AMX tiles where the CPU has them
(``amx.py``: 190 -> 160 ms per forward on the 2-core Sapphire Rapids CPU), else SDPA.

Three kernels; ``--quantize int8`` takes ``int8_kernel()``, ``--fast`` measures them all (``fast.py``):

- ``fbgemm``: ``torch.ops.quantized.linear_dynamic`` (FBGEMM on x86, QNNPACK on ARM). It quantizes the input and
  applies scales and bias inside the GEMM, which makes it about 2.3x faster than fp32 ``F.linear`` on the
  2-core AVX512-VNNI development CPU. ``torch.ao.quantization.quantize_dynamic`` is deprecated in favour of
  torchao, whose int8 path needs ``torch.compile`` to be fast on CPUs; we call the underlying operator
  directly, with per-channel weights (half the error of the per-tensor default) and full-range activations
  on VNNI CPUs (``reduce_range`` only where int16 accumulation could saturate).
- ``onednn``: per-token activation scales (``_quantize_rows``: vectorized passes) and oneDNN's prepacked int8 GEMM,
  ``torch.ops.onednn.qlinear_pointwise``: AMX-INT8 where the CPU has it, else VNNI. On request:
  ``AST_INT8_KERNEL=onednn``.
- ``int_mm``: the same with ``torch._int_mm``. Portable (any build with the aten op), same products, slower on
  x86 where this torch's CPU ``_int_mm`` does not reach AMX. Used when the quantized engine is missing, or on
  request (``AST_INT8_KERNEL=int_mm``).
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch
from torch import nn

from ..constants import INT8_KERNELS
from . import amx, int16
from .model import ASTSelfAttention

QUANTIZE_MODES = ("int8",)


# -- CPU features ----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def cpu_capabilities() -> dict:
    """torch's view of the CPU (``torch.cpu.get_capabilities()``), or ``{}`` where torch has none."""
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        return dict(get()) if get is not None else {}
    except Exception:  # an exotic platform: treat as unknown
        return {}


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX, ARM BF16).

    Without it bf16 matmuls are emulated and run several times slower than fp32 (24 vs 90 GFLOP/s on a
    Cascade Lake core pair), so ``--dtype bf16`` only pays off where this is True.
    """
    caps = cpu_capabilities()
    if caps.get("avx512_bf16") or caps.get("amx_bf16"):
        return True
    flags = _cpuinfo_flags()
    if {"avx512_bf16", "amx_bf16", "bf16"} & flags:  # "bf16": ARMv8.6 Features line
        return True
    import platform

    if platform.system() == "Darwin" and platform.machine() == "arm64":
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=2)
            return out.stdout.strip() == "1"
        except (OSError, subprocess.SubprocessError):
            return False
    return False


def cpu_has_vnni() -> bool:
    """AVX512-VNNI / AVX-VNNI: int8 dot products accumulate straight into int32 (no int16 saturation)."""
    caps = cpu_capabilities()
    return bool(caps.get("avx512_vnni") or caps.get("avx_vnni") or {"avx512_vnni", "avx_vnni"} & _cpuinfo_flags())


# Tokens (windows x patches) per forward call on the CPU. One 10.24 s AudioSet window is 1214 tokens, and its
# MLP activations (1214 x 3072 floats, 15 MB) still fit a server CPU's L3; two or four windows at once spill
# to memory and cost 5% (fp32) to 10% (int8) more time per window on the 2-core development CPU.
CPU_TOKENS_PER_CALL = 2048


def cpu_windows_per_call(num_tokens: int) -> int:
    """How many windows of ``num_tokens`` tokens to put through the model at once on the CPU (at least 1)."""
    return max(1, CPU_TOKENS_PER_CALL // max(1, num_tokens))


def set_threads(threads: int | None) -> None:
    """Intra-op threads for the model (``--threads``); None leaves torch's default (one per core)."""
    if threads:
        torch.set_num_threads(int(threads))


# -- dynamic int8 Linear ------------------------------------------------------------------------------


def _quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (out, in) int8 and (out,) float32 scales: symmetric, per output channel."""
    weight = weight.detach().float().cpu()
    scales = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.div(weight, scales[:, None]).round_().clamp_(-127, 127).to(torch.int8), scales  # one temporary


class Int8LinearFbgemm(nn.Module):
    """``y = x @ W.T + b`` with W int8 (per output channel) and x quantized on the fly inside the kernel."""

    def __init__(self, linear: nn.Linear, reduce_range: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.reduce_range = reduce_range
        qweight, scales = _quantize_weight(linear.weight)
        zeros = torch.zeros(self.out_features, dtype=torch.int64)
        bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
        with warnings.catch_warnings():  # quantized-tensor creation is deprecated, the packed kernel is not
            warnings.simplefilter("ignore")
            # Wrapping our own int8 values is 3x faster than torch.quantize_per_channel (0.3 s vs 0.9 s for AST).
            wrapped = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zeros, 0)
            self._packed = torch.ops.quantized.linear_prepack(wrapped, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel's activation scale spans its whole input: one call per window (the first dimension: a
        # window's tokens, or the classifier's pooled rows), so that a window's numbers never depend on the
        # windows it shares a batch with (--batch-size, an index's batches). ``AST.windows_alone`` makes the
        # model's body take one window at a time, faster than splitting here (no copies of the outputs).
        x = x.float()
        if x.dim() < 2 or x.shape[0] == 1:
            return torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range)
        return torch.cat([torch.ops.quantized.linear_dynamic(window, self._packed, self.reduce_range)
                          for window in x.split(1)])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=fbgemm"


def _quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float32 -> (M, K) int8 and (M, 1) float32 per-row (per-token) symmetric scales.

    ``abs().amax`` (vectorized: 0.4 ms for 1214x768 on the development CPU, where ``aminmax`` along rows takes 8 ms
    and ``vector_norm(inf)`` 10 ms), one multiply by the reciprocal scale (no division), rounding in place and the
    int8 cast. The largest magnitude maps to +-127 exactly, so no clamp."""
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127)  # (M, 1)
    return torch.mul(rows, scale.reciprocal()).round_().to(torch.int8), scale


class Int8LinearIntMM(nn.Module):
    """The same computation with ``torch._int_mm``: per-token symmetric activation scales."""

    kernel = "int_mm"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        qweight, scales = _quantize_weight(linear.weight)
        self._prepare(qweight)
        self.register_buffer("weight_scale", scales, persistent=False)  # (out,)
        bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def _prepare(self, qweight: torch.Tensor) -> None:
        self.register_buffer("weight_t", qweight.t(), persistent=False)  # (in, out) view: oneDNN's fast layout

    def _matmul(self, qrows: torch.Tensor) -> torch.Tensor:
        """(M, in) int8 -> (M, out) float32 products scaled by the weight scales (not yet by the row scales)."""
        return torch._int_mm(qrows, self.weight_t).to(torch.float32).mul_(self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        qrows, scale = _quantize_rows(x.reshape(-1, self.in_features).float())  # (M, in), (M, 1)
        out = self._matmul(qrows)  # (M, out)
        out = out.mul_(scale) if self.bias is None else torch.addcmul(self.bias, out, scale)
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class Int8LinearOneDNN(Int8LinearIntMM):
    """``Int8LinearIntMM`` on oneDNN's prepacked int8 GEMM (``torch.ops.onednn.qlinear_pointwise``: AMX-INT8 or
    VNNI, the kernel torch.compile uses for x86 int8), which also applies the weight scales. On the 2-core
    Sapphire Rapids development CPU it is 3.6x faster than ``torch._int_mm`` for a 1214x768 @ 768x3072 GEMM
    (8 vs 29 ms, same exact int32 products)."""

    kernel = "onednn"

    def _prepare(self, qweight: torch.Tensor) -> None:
        self._packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        self._zeros = torch.zeros(self.out_features, dtype=torch.int64)

    def _matmul(self, qrows: torch.Tensor) -> torch.Tensor:
        # input scale 1 and zero point 0 (the row scales come after), float32 out, no fused post-op
        return torch.ops.onednn.qlinear_pointwise(qrows, 1.0, 0, self._packed, self.weight_scale, self._zeros, None,
                                                  1.0, 0, torch.float32, "none", [], "")


@lru_cache(maxsize=1)
def _fbgemm_works() -> bool:
    try:
        Int8LinearFbgemm(nn.Linear(8, 4), reduce_range=False)(torch.zeros(2, 8))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@lru_cache(maxsize=None)
def _kernel_works(kind: type) -> bool:
    try:
        kind(nn.Linear(8, 4))(torch.randn(2, 8))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _int_mm_works() -> bool:
    return _kernel_works(Int8LinearIntMM)


def _onednn_works() -> bool:
    return _kernel_works(Int8LinearOneDNN)


def int8_kernel() -> str:
    """``fbgemm`` where this torch build has the quantized engine, else ``int_mm``; ``AST_INT8_KERNEL`` overrides
    (a value that names no kernel: ``UsageError``)."""
    from .names import int8_kernel_override

    return int8_kernel_override() or ("fbgemm" if _fbgemm_works() else "int_mm")


def quantize_dynamic(model: nn.Module, mode: str = "int8", kernel: str | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (on the CPU, float) with a dynamic int8 one, in place.

    Returns the model, in eval mode. Parameters of the replaced layers are dropped (the int8 copies are
    what runs); everything else keeps its dtype.
    """
    from ..errors import UsageError

    if mode not in QUANTIZE_MODES:
        raise UsageError(f"unknown quantization {mode!r} ({', '.join(QUANTIZE_MODES)})")
    kernel = kernel or int8_kernel()
    if kernel not in INT8_KERNELS:
        raise UsageError(f"unknown int8 kernel {kernel!r} ({', '.join(INT8_KERNELS)})")
    reduce_range = not cpu_has_vnni()

    def build(child: nn.Linear) -> nn.Module:
        return (Int8LinearFbgemm(child, reduce_range) if kernel == "fbgemm" else
                Int8LinearOneDNN(child) if kernel == "onednn" else Int8LinearIntMM(child))

    linears = [(parent, name, child) for parent in list(model.modules())
               for name, child in list(parent.named_children()) if type(child) is nn.Linear]
    # Each layer's quantization and packing on its own thread, as many as torch's: the packing runs on one core
    # (a full-size model: 0.35-0.47 s -> 0.26-0.28 s on the 2-core Sapphire Rapids CPU; the same weights).
    workers = min(torch.get_num_threads(), len(linears))
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        # Each layer silences a deprecation warning with catch_warnings, which is not thread-safe: this one, in
        # this thread, is what the filters go back to, whatever order the layers' contexts end in.
        with warnings.catch_warnings(), ThreadPoolExecutor(workers, thread_name_prefix="ast-quantize") as pool:
            warnings.simplefilter("ignore")
            built = list(pool.map(build, [child for _, _, child in linears]))
    else:
        built = [build(child) for _, _, child in linears]
    for (parent, name, _), fast in zip(linears, built):
        setattr(parent, name, fast)
    for module in model.modules():  # attention on int16 dot products where the CPU has VNNI (int16.py)
        if isinstance(module, ASTSelfAttention):
            module.kernel = int16.attention
    model.windows_alone = kernel == "fbgemm"  # its activation scale spans a call: one window per call
    return model.eval()


# -- bf16 on oneDNN (AMX) --------------------------------------------------------------------------------


class PackedLinearBF16(nn.Module):
    """A bf16 ``nn.Linear`` on oneDNN with its weight reordered once into the blocked layout AMX reads
    (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile emits for x86 bf16), optionally with the
    exact (erf) GELU fused into the GEMM. On the 2-core Sapphire Rapids development CPU a 1214x768 @ 768x3072
    GEMM + GELU takes 12.5 ms this way against 24 ms for ``F.linear`` then ``F.gelu``."""

    def __init__(self, linear: nn.Linear, tokens: int, gelu: bool = False):
        super().__init__()
        self._pack(linear.weight, linear.bias, tokens, gelu)

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, tokens: int, gelu: bool = False
           ) -> "PackedLinearBF16":
        """The same from a weight and bias, with no ``nn.Linear`` built: a module with a random init costs ~0.1 s
        for the fused QKV weights, and ``skip_init`` imports sympy through the meta device (~0.4 s)."""
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        packed._pack(weight, bias, tokens, gelu)
        return packed

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor | None, tokens: int, gelu: bool) -> None:
        self.out_features, self.in_features = weight.shape
        self.post_op = "gelu" if gelu else "none"
        weight = weight.detach().to(torch.bfloat16)
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, tokens)  # tokens: a hint of M
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, self.post_op, [], "none")

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``forward(x) + residual``, the add done by the GEMM (no post-op other than it)."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self._packed, self.bias, "add")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, post_op={self.post_op}"


MLP_PARTS = 2  # the MLP's hidden units in this many parts, each its own pair of GEMMs (see PackedLayerBF16)


class PackedLayerBF16(nn.Module):
    """One transformer block of a bf16 CPU AST as oneDNN runs it fastest: query, key and value in one packed GEMM
    (768 -> 2304: 2.2x faster than three 768 -> 768 GEMMs on the 2-core Sapphire Rapids CPU), the residual adds
    fused into the output GEMMs (oneDNN's binary ``add`` post-op), GELU fused into the first MLP GEMM, and the
    MLP's 3072 hidden units in ``MLP_PARTS`` parts: each part's 768 -> 1536 GEMM (+ GELU) and 1536 -> 768 GEMM,
    whose output adds onto the residual and the parts before it. The output GEMM's 3072-long rows ran at ~700
    GFLOP/s on the whole window there (~1100 on 256-token slices); at 1536 the two parts take ~5% off the whole
    forward against the slices (296-301 ms against 317, medians of 15 interleaved rounds). The MLP's sum over its
    hidden units is the same sum in two pieces: the same arithmetic as ``ASTLayer``, bf16 roundings aside (one
    more: the first part's sum is rounded to bf16 before the second adds on)."""

    def __init__(self, layer: nn.Module, tokens: int, gelu: bool):
        super().__init__()
        from .model import attention

        self._attention = attention
        self_attention = layer.attention.attention
        self.heads, self.head_dim, self.scale = self_attention.num_heads, self_attention.head_dim, self_attention.scale
        self.layernorm_before, self.layernorm_after = layer.layernorm_before, layer.layernorm_after
        parts = [self_attention.query, self_attention.key, self_attention.value]
        with torch.no_grad():
            bias = None if parts[0].bias is None else torch.cat([part.bias for part in parts])
            self.qkv = PackedLinearBF16.of(torch.cat([part.weight for part in parts]), bias, tokens)
        self.attention_out = PackedLinearBF16(layer.attention.output.dense, tokens)
        self.act = nn.Identity() if gelu else layer.act
        self.mlp_in, self.mlp_out = self._mlp_parts(layer.intermediate.dense, layer.output.dense, tokens, gelu)

    @staticmethod
    def _mlp_parts(first: nn.Linear, second: nn.Linear, tokens: int, gelu: bool):
        """(parts of ``first``'s output units, GELU fused; the matching parts of ``second``'s input units, the
        bias on the first part only): ``MLP_PARTS`` of them, as equal as the hidden size allows."""
        hidden = first.out_features
        size = -(-hidden // min(MLP_PARTS, hidden))
        spans = [slice(start, min(start + size, hidden)) for start in range(0, hidden, size)]
        with torch.no_grad():
            ins = [PackedLinearBF16.of(first.weight[span], None if first.bias is None else first.bias[span], tokens,
                                       gelu) for span in spans]
            outs = [PackedLinearBF16.of(second.weight[:, span].contiguous(), second.bias if i == 0 else None, tokens)
                    for i, span in enumerate(spans)]
        return nn.ModuleList(ins), nn.ModuleList(outs)

    def forward(self, x: torch.Tensor, attn: str, queries: int | None = None) -> torch.Tensor:
        """As ``ASTLayer.forward``; with ``queries``, the queries of the other tokens are computed (one GEMM for
        all three) but not attended with."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.layernorm_before(x))
        context = amx.attention(qkv, self.heads, queries or tokens, self.scale) if attn == "sdpa" else None
        if queries is not None:
            x = x[:, :queries].contiguous()
        if context is None:
            q, k, v = qkv.view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            context = self._attention(q if queries is None else q[:, :, :queries], k, v, self.scale, attn)
        x = self.attention_out.add(context, x)
        normed = self.layernorm_after(x)
        for first, second in zip(reversed(self.mlp_in), reversed(self.mlp_out)):  # the output bias comes last
            x = second.add(self.act(first(normed)), x)
        return x


def pack_bf16(model: nn.Module) -> nn.Module:
    """A CPU AST's (float32 or bf16) blocks -> ``PackedLayerBF16`` and its other ``nn.Linear`` layers (the
    classifier) -> ``PackedLinearBF16``, in place: the packed weights are bf16 either way. Returns the model;
    unchanged where this torch has no oneDNN bf16 linear."""
    if not _bf16_packing_works():
        return model
    tokens = model.config.num_tokens
    gelu = model.config.hidden_act == "gelu"  # the fused post-op is erf GELU, as the reference's
    layers = model.audio_spectrogram_transformer.encoder.layer
    for i, layer in enumerate(layers):
        layers[i] = PackedLayerBF16(layer, tokens, gelu)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinearBF16(child, tokens))
    return model


def place_bf16_cpu(model: nn.Module) -> nn.Module:
    """A float32 CPU AST -> Linear layers packed for oneDNN from their float32 weights (``pack_bf16``: each weight
    rounded to bf16 on its way into its packed copy), then every other weight converted to bf16. Packing first
    skips a bf16 copy of the Linear weights that packing would only copy again: 99 k -> 58 k fresh pages of the
    load on a full-size model. The same roundings, so the same model."""
    return pack_bf16(model.eval()).to(torch.bfloat16)


@lru_cache(maxsize=1)
def _bf16_packing_works() -> bool:
    try:
        with torch.inference_mode():
            packed, x = PackedLinearBF16(nn.Linear(8, 4), 2), torch.zeros(2, 8, dtype=torch.bfloat16)
            packed.add(x, packed(x))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8LinearFbgemm, Int8LinearIntMM)) for m in model.modules())  # OneDNN: an IntMM


__all__ = [
    "CPU_TOKENS_PER_CALL", "INT8_KERNELS", "QUANTIZE_MODES", "cpu_has_native_bf16", "cpu_has_vnni",
    "cpu_windows_per_call", "int8_kernel", "is_quantized", "pack_bf16", "place_bf16_cpu", "quantize_dynamic",
    "set_threads",
]

