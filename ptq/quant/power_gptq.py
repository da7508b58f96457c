"""GPTQ-style sequential rounding on the power grid (NUPES data-driven, ptq.passes.nupes).

For ``W [N, K]``, the layer's input second moment ``H [K, K]`` (``X^T X``, as GPTQ accumulates it), an exponent
``a`` and fixed power-domain scales ``s [N, G]`` (static groups, from the original weights): columns are rounded one
at a time to the nearest level of the power grid ``sign(q)(|q| s)^(1/a)`` (ptq.quant.power; nearest in the linear
domain, among the two power-domain neighbours of ``round_half``), and each column's rounding error is pushed onto the
not-yet-rounded columns through the upper Cholesky factor ``U`` of ``H^-1`` exactly as in GPTQ (Frantar et al. 2023,
Alg. 1): ``err_i = (w_i - q_i) / U_ii``, ``W[:, j>i] -= err_i U[i, j>i]``. Only the projection differs from
uniform GPTQ. The objective that GPTQ minimizes greedily is the output error ``tr((W^ - W) H (W^ - W)^T)``.
"""
from __future__ import annotations

import torch

from ptq.quant.hessian import inverse_cholesky_factor
from ptq.quant.power import _col, qmax, round_half


def _project(w: torch.Tensor, s: torch.Tensor, a, inv_a, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest power-grid level of ``w [N]`` (scales ``s [N]``, exponent ``a`` float or ``[N]``) in the linear
    domain: ``(q [N] half-integer, W^ [N])``."""
    L = qmax(bits)
    u = torch.sign(w) * torch.pow(w.abs(), a) / s
    q0 = round_half(u, bits)
    best_q, best = q0, torch.sign(q0) * torch.pow(q0.abs() * s, inv_a)
    for d in (-1.0, 1.0):
        q = torch.clamp(q0 + d, -L, L)
        v = torch.sign(q) * torch.pow(q.abs() * s, inv_a)
        better = (w - v).abs() < (w - best).abs()
        best_q, best = torch.where(better, q, best_q), torch.where(better, v, best)
    return best_q, best


@torch.no_grad()
def gptq_power(W: torch.Tensor, H: torch.Tensor, a, s: torch.Tensor, bits: int, g_idx: torch.Tensor,
               block_size: int = 128, damp: float = 0.01, act_order: bool = True,
               U: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes uint8 ``[N, K]`` (``c = q + L``) and the dequantized ``W^ [N, K]`` of ``W`` on the power grid.
    ``U``: a precomputed ``(upper Cholesky factor of H^-1, perm)`` pair is reused across exponents."""
    W = W.detach().float().clone()
    N, K = W.shape
    a_c = _col(a)
    a_n = a_c.reshape(-1) if isinstance(a_c, torch.Tensor) else a_c
    inv_a = 1.0 / a_n
    U, perm = U if U is not None else inverse_factor(H, damp, act_order)
    dead = torch.diag(H) == 0
    W[:, dead] = 0
    W = W[:, perm]
    gp = g_idx[perm].long()
    q_all = torch.zeros(N, K)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q, wq = _project(w, s[:, gp[i1 + i]], a_n, inv_a, bits)
            q_all[:, i1 + i] = q
            err = (w - wq) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    q_all = q_all[:, inv]
    codes = (q_all + qmax(bits)).to(torch.uint8)
    deq = torch.sign(q_all) * torch.pow(q_all.abs() * s[:, g_idx.long()], inv_a if not torch.is_tensor(inv_a)
                                         else inv_a[:, None])
    return codes, deq


def inverse_factor(H: torch.Tensor, damp: float = 0.01, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, perm)``: columns by descending ``diag H`` (act-order) and the upper Cholesky factor of the permuted,
    dampened ``H^-1`` (dead columns get ``H_ii = 1``)."""
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    K = H.shape[0]
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(K)
    U, _ = inverse_cholesky_factor(H[perm][:, perm], damp, method="NUPES")
    return U, perm


def output_error(w_hat: torch.Tensor, w: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr((W^ - W) H (W^ - W)^T)`` for ``W [N, K]``, ``H [K, K]``."""
    e = (w_hat - w).float()
    return ((e @ H) * e).sum()
