"""Projection heads and the parameter-free cross-modal attention of ELVIS."""

from __future__ import annotations

import math

import torch
from torch import nn

from monai_elvis.utils import check_ndim, zero_padding

__all__ = ["ProjectionHead", "CrossModalAttention", "AttentionPooling"]


class ProjectionHead(nn.Module):
    """MLP projecting encoder features into the shared embedding space.

    ``Linear -> LayerNorm -> ReLU -> ... -> Linear`` with ``num_layers`` linear layers. LayerNorm (not BatchNorm)
    so that padded sentences in a batch cannot change the projection of real ones.

    Args:
        in_dim: input feature size.
        out_dim: embedding size ``d``.
        hidden_dim: hidden size (default ``in_dim``).
        num_layers: number of linear layers (1 is a plain linear projection).

    Shapes: ``[..., in_dim]`` -> ``[..., out_dim]`` (works on ``[B, C]`` and ``[B, N, C]`` alike).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
        hidden_dim = hidden_dim or in_dim
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossModalAttention(nn.Module):
    """Parameter-free cross-modal attention.

    ``out_i = sum_k softmax_k(<q_i, k_k> / temperature) k_k``, with ``temperature = sqrt(d)`` by default; padded
    keys get no weight and their values (even NaN) do not reach the output.

    Args:
        temperature: softmax temperature; ``None`` uses ``sqrt(d)``.

    Shapes:
        ``query [B, Q, d]``, ``key [B, K, d]``, ``key_mask [B, K]`` (True = valid, optional) ->
        ``(attended [B, Q, d], weights [B, Q, K])``.
    """

    def __init__(self, temperature: float | None = None) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_ndim(query, "query", 3, "[B, Q, d]")
        check_ndim(key, "key", 3, "[B, K, d]")
        if query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
            raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must agree in B and d.")
        tau = self.temperature or math.sqrt(query.shape[-1])
        key = zero_padding(key, key_mask)
        scores = torch.bmm(query, key.transpose(1, 2)) / tau  # [B, Q, K]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.bool().unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(key.dtype)
        return torch.bmm(weights, key), weights


class AttentionPooling(nn.Module):
    """Global feature by attention over the local features, as LoVT pools regions and sentences
    (its ``avgpool_attention`` aggregator).

    The masked mean of the local features is the query of a multi-head attention (``nn.MultiheadAttention``, with
    its learned projections) over the local features; the attention weights, averaged over the heads, are returned
    too: LoVT weights its local losses by them.

    Args:
        dim: feature size ``D`` (divisible by ``num_heads``).
        num_heads: attention heads (LoVT: 8).

    Shapes: ``x [B, M, D]``, ``mask [B, M]`` (True = valid, optional) -> ``(pooled [B, D], weights [B, M])``;
    the weights of a sample sum to 1 over its valid units and are 0 on padding.
    """

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}.")
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_ndim(x, "x", 3, "[B, M, D]")
        if mask is None:
            query = x.mean(dim=1, keepdim=True)
            padding = None
        else:
            mask = mask.bool()
            x = zero_padding(x, mask)
            query = x.sum(dim=1, keepdim=True) / mask.sum(dim=1).clamp(min=1).view(-1, 1, 1).to(x.dtype)
            padding = ~mask
        pooled, weights = self.attention(query, x, x, key_padding_mask=padding, need_weights=True)
        return pooled.squeeze(1), weights.squeeze(1)
