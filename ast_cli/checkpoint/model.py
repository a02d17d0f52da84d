"""The Audio Spectrogram Transformer (Gong, Chung & Glass 2021), compact and self-contained.

Parameter names mirror the Hugging Face checkpoints (``ASTForAudioClassification``) so that loading
is a strict one-to-one mapping. No I/O, no printing, no hub access here: see ``weights.py``.

Shapes: B batch, T frames (max_length), F mel bins, D hidden size, N tokens (patches + 2).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import POOLED_TOKENS, ASTConfig, AttnImplementation  # the config's home: importable without torch


def _activation(name: str, in_place: bool = False):
    if name == "gelu":  # exact (erf) GELU, as in the reference
        return torch.ops.aten.gelu_ if in_place else F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return (lambda x: torch.ops.aten.gelu_(x, approximate="tanh")) if in_place else (
            lambda x: F.gelu(x, approximate="tanh"))
    return torch.relu_ if in_place else F.relu


class ASTEmbeddings(nn.Module):
    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embeddings = ASTPatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.hidden_size))

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(input_values)  # (B, f*t, D)
        batch = x.shape[0]
        cls = self.cls_token.expand(batch, -1, -1)
        dist = self.distillation_token.expand(batch, -1, -1)
        x = torch.cat([cls, dist, x], dim=1)  # (B, N, D)
        return x + self.position_embeddings


class ASTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.projection = nn.Conv2d(
            1,
            cfg.hidden_size,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            stride=(cfg.frequency_stride, cfg.time_stride),
        )

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        x = input_values.unsqueeze(1).transpose(2, 3)  # (B, 1, F, T): frequency first
        x = self.projection(x)  # (B, D, f_dim, t_dim)
        return x.flatten(2).transpose(1, 2)  # (B, f_dim*t_dim, D), patch index = f * t_dim + t


class ASTSelfAttention(nn.Module):
    # softmax(Q K^T scale) V on (B, Q, D), (B, N, D), (B, N, D) float32 -> (B, Q, D), or None for SDPA: set on
    # int8 models (``speed.quantize_dynamic``: ``int16.attention``); float32 and bf16 models run SDPA or eager
    kernel: Callable[..., torch.Tensor | None] | None = None

    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5  # 0.125 for 64-d heads, exact in float
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)

    def forward(self, x: torch.Tensor, attn: AttnImplementation, queries: int | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); with ``queries``, the outputs of the first ``queries`` tokens only (B, queries,
        D), each attending to all N tokens as before."""
        batch, tokens, _ = x.shape
        shape = (batch, -1, self.num_heads, self.head_dim)
        q, k, v = self.query(x if queries is None else x[:, :queries]), self.key(x), self.value(x)
        if self.kernel is not None and attn == "sdpa":
            out = self.kernel(q, k, v, self.num_heads, self.scale)
            if out is not None:
                return out
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (B, nh, N, hs)
        return attention(q, k, v, self.scale, attn)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attn: AttnImplementation) -> torch.Tensor:
    """(B, nh, N, hs) queries, keys, values -> (B, N, nh * hs): SDPA, or the reference's eager matmul-softmax."""
    batch, _, tokens, _ = q.shape
    if attn == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, nh, N, N)
        # Softmax in float32 then back, as the reference eager path does for half precision.
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(batch, tokens, -1)  # (B, N, D)


class ASTSelfOutput(nn.Module):
    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class ASTAttention(nn.Module):
    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.attention = ASTSelfAttention(cfg)
        self.output = ASTSelfOutput(cfg)

    def forward(self, x: torch.Tensor, attn: AttnImplementation, queries: int | None = None) -> torch.Tensor:
        return self.output.dense(self.attention(x, attn, queries))


class ASTDense(nn.Module):
    """A holder for one ``dense`` Linear, so that key names read ``intermediate.dense.weight``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)


class ASTLayer(nn.Module):
    """One pre-LayerNorm transformer block."""

    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.attention = ASTAttention(cfg)
        self.intermediate = ASTDense(cfg.hidden_size, cfg.intermediate_size)
        self.output = ASTDense(cfg.intermediate_size, cfg.hidden_size)
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act, self.act_ = _activation(cfg.hidden_act), _activation(cfg.hidden_act, in_place=True)

    def forward(self, x: torch.Tensor, attn: AttnImplementation, queries: int | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); with ``queries``, only the first ``queries`` tokens' outputs (see
        ``AST.forward_features``): every token's key and value, those tokens' query, attention and MLP.

        Without autograd, GELU and the residual adds work in place on the fresh outputs of the layers before
        them: the same values bit for bit (x + y is y + x), without a fresh 15 MB tensor per step whose pages
        the kernel first faults in (GELU on the MLP's output took 2-4 ms that way against 0.7 ms in place):
        a full-size fp32 forward 866 -> 809 ms, int8 492 -> 467 ms on the 2-core Sapphire Rapids CPU."""
        residual = x if queries is None else x[:, :queries]
        attended = self.attention(self.layernorm_before(x), attn, queries)
        if torch.is_grad_enabled():
            x = residual + attended
            return x + self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))
        x = attended.add_(residual)
        hidden = self.act_(self.intermediate.dense(self.layernorm_after(x)))  # (B, N, 4D)
        return self.output.dense(hidden).add_(x)


class ASTEncoder(nn.Module):
    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.layer = nn.ModuleList(ASTLayer(cfg) for _ in range(cfg.num_hidden_layers))


class ASTBackbone(nn.Module):
    """``audio_spectrogram_transformer.*`` in the checkpoints."""

    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.embeddings = ASTEmbeddings(cfg)
        self.encoder = ASTEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class ASTClassifierHead(nn.Module):
    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dense = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.dense(self.layernorm(pooled))


class AST(nn.Module):
    """AST encoder plus classification head; ``forward`` returns raw logits (B, num_labels).

    A config without labels builds the encoder only (``forward_features``).
    """

    def __init__(self, cfg: ASTConfig, attn: AttnImplementation = "sdpa"):
        super().__init__()
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"attn must be 'sdpa' or 'eager', not {attn!r}")
        self.config = cfg
        self.attn: AttnImplementation = attn
        self.audio_spectrogram_transformer = ASTBackbone(cfg)
        self.classifier = ASTClassifierHead(cfg) if cfg.num_labels else None

    windows_alone = False  # True (an int8 model on FBGEMM, whose activation scale spans its input): one window
    # per pass, so that a window's numbers never depend on its batch; on the 2-core Sapphire Rapids CPU also
    # faster than one pass of two full-size windows (480-528 against 549-713 ms per window)

    def forward_features(self, input_values: torch.Tensor, attn: AttnImplementation | None = None) -> torch.Tensor:
        """(B, T, F) normalized log-mel -> (B, D) pooled embedding (mean of CLS and distillation).

        ``attn`` overrides the model's attention implementation for this call (the model is not changed).
        """
        if self.windows_alone and input_values.shape[0] > 1:
            return torch.cat([self.forward_features(window, attn) for window in input_values.split(1)])
        attn = attn or self.attn
        expected = (self.config.max_length, self.config.num_mel_bins)
        if tuple(input_values.shape[1:]) != expected:
            raise ValueError(f"expected input (B, {expected[0]}, {expected[1]}), got {tuple(input_values.shape)}")
        backbone = self.audio_spectrogram_transformer
        x = backbone.embeddings(input_values)  # (B, N, D)
        *body, last = backbone.encoder.layer
        for layer in body:
            x = layer(x, attn)
        # The pooled embedding reads the last layer's outputs of the CLS and distillation tokens alone, and every
        # step after attention works token by token: the last layer computes those two tokens' outputs (every
        # token's key and value, two queries), the same arithmetic for them, a twelfth of the forward saved. One
        # window at a time, so that a window's result never depends on the batch it came in: a GEMM of 2 rows
        # and one of 2B rows may sum in different orders (a resumed index would store other bits).
        x = torch.cat([last(window, attn, queries=POOLED_TOKENS) for window in x.split(1)])
        x = backbone.layernorm(x)  # (B, 2, D)
        return (x[:, 0] + x[:, 1]) / 2  # (B, D)

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled embedding -> (B, num_labels) raw logits."""
        if self.classifier is None:
            raise ValueError("this checkpoint has no classification head")
        return self.classifier(pooled)

    def forward(self, input_values: torch.Tensor, attn: AttnImplementation | None = None) -> torch.Tensor:
        """(B, T, F) -> (B, num_labels) raw logits; ``attn`` as in ``forward_features``."""
        return self.forward_head(self.forward_features(input_values, attn))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_clip(cfg: ASTConfig) -> float:
    """Approximate multiply-add FLOPs (x2) of one forward pass, for throughput reporting: the model's FLOPs, every
    token through every layer, as the reference computes them (rates over it are model FLOPs utilization;
    ``forward_features`` skips the last layer's work for tokens the pooling never reads, ~7% of it)."""
    n, d, inner = cfg.num_tokens, cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * n * (4 * d * d + 2 * d * inner) + 2 * 2 * n * n * d
    patch = 2 * (n - 2) * d * cfg.patch_size**2
    return float(cfg.num_hidden_layers * per_layer + patch)


__all__ = ["AST", "ASTConfig", "AttnImplementation", "count_parameters", "flops_per_clip"]
