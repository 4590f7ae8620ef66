"""The original module (docs/origin.md), re-implemented faithfully: the baseline every speed target beats.

Benchmark code only, never imported by the library. Its defects are kept on purpose, because they are what is
being measured against: the Givens planes come from the global RNG and may repeat an index (i == j, then the
"rotation" is a scaling), the matrices are built once with their autograd graph and reused (a second backward
raises), each head vector goes through head_dim/2 dense matrix products in sequence, and the halves are
concatenated (permuting channels). The only change: ``rebuild()`` drops the cached matrices so that the
module can be timed over repeated forward+backward passes, which it otherwise cannot survive.
"""

from __future__ import annotations

import torch
from torch import nn


class OriginalRotary(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.base = 10000
        self.dims = dims
        self.heads = heads
        self.h_dim = dims // heads
        self.rot = (dims // heads) // 2
        self.theta = nn.Parameter(torch.zeros(1), requires_grad=True)
        freq_data = 1.0 / (self.base ** (torch.arange(0, self.h_dim, 2).float() / self.h_dim))
        self.register_buffer("inv_freq", freq_data)
        self.rotation_matrices = None

    def rebuild(self) -> None:
        self.rotation_matrices = None

    def rotation_matrix(self, dims, i, j, theta):
        G = torch.eye(dims).to(theta.device)
        G[i, i] = torch.cos(theta)
        G[i, j] = -torch.sin(theta)
        G[j, i] = torch.sin(theta)
        G[j, j] = torch.cos(theta)
        return G

    def _precompute_rotation_matrices(self):
        self.rotation_matrices = []
        for _ in range(self.rot):
            i, j = torch.randint(0, self.h_dim, (2,)).long()
            self.rotation_matrices.append(self.rotation_matrix(self.h_dim, i, j, self.theta))

    def forward(self, x):
        batch_size, seq_len = x.shape[:2]
        x = x.view(batch_size, seq_len, self.heads, self.h_dim).reshape(-1, self.h_dim)
        if self.rotation_matrices is None:
            self._precompute_rotation_matrices()
        for B in self.rotation_matrices:
            x = torch.matmul(x, B)
        x = x.view(batch_size, seq_len, self.heads, self.h_dim)
        sinusoid_inp = torch.einsum("i, j -> i j", torch.arange(seq_len, device=x.device), self.inv_freq)
        sin = sinusoid_inp.sin().unsqueeze(0).unsqueeze(2)
        cos = sinusoid_inp.cos().unsqueeze(0).unsqueeze(2)
        x1, x2 = x[..., ::2], x[..., 1::2]
        x = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return x.view(batch_size, seq_len, self.dims)
