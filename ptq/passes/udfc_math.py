"""Pure closed-form functions of UDFC (Bai et al., ICCV 2023) adapted to transformer MLPs. No data is read.

Setting.  A block computes hidden channels ``h [I]`` from a normalized input ``x = gamma * xhat (+ beta)`` and
the next linear ``y = D h (+ b)`` with ``D [N, I]``.  Two kinds of MLP:

  gated (Llama):   h_k = act(g_k) * u_k,   g_k = G_k . xhat,  u_k = U_k . xhat       (G = W_gate*gamma, U = W_up*gamma)
  fc (OPT / BERT): h_k = act(z_k),          z_k = G_k . xhat + m_k                    (G = W_fc1*gamma, m = W_fc1 beta + b)

Data-free input model (replaces the paper's BatchNorm statistics).  ``xhat`` is the RMS/Layer-normalized
residual stream, so ``E||xhat||^2 = H`` exactly; we take ``xhat ~ N(0, I_H)`` (the isotropic law with that
trace).  Every pre-activation is then Gaussian with moments given by weight inner products:
``E[g_a g_b] = G_a . G_b``, ``E[g_a u_b] = G_a . U_b`` ...

Statistical linearization of the activation (Stein).  For ``z ~ N(m, v)`` the L2-best affine fit is
``act(z) ~= c + beta (z - m)`` with ``c = E[act(z)]``, ``beta = E[act'(z)]`` (1-D Gaussian integrals, evaluated by
Gauss-Hermite quadrature).  For SiLU/GELU/ReLU with ``m = 0``, ``beta = 1/2`` exactly (``act(z) - z/2`` is even).

Channel moments (Isserlis' theorem on the Gaussian 4th moment for the gated case):

  gated:  mu_a = beta_a (G_a.U_a)
          Cov(h_a, h_b) = c_a c_b (U_a.U_b) + beta_a beta_b [ (G_a.G_b)(U_a.U_b) + (G_a.U_b)(U_a.G_b) ]
  fc:     mu_a = c_a,   Cov(h_a, h_b) = beta_a beta_b (G_a.G_b)

and the alpha-weighted second moment ``K_alpha(a, b) = Cov(a, b) + alpha mu_a mu_b``.  This is the paper's
Eq. 11-16 structure: the covariance term plays ``||(gamma/sigma)W_j - s (gamma/sigma)W_i||^2`` and the mean term
plays ``alpha_1 (beta~_j - s beta~_i)^2``.  Under the Gaussian model the exact weight of the mean term is 1.

Reconstruction (paper Eq. 7-9 and the joint loss l_re = l_p + l_q, Eq. 17-18).  A pruned channel j is
assumed ``h_j ~= s hhat_i`` (kept partner i, quantized); a kept channel i ``h_i ~= s' hhat_i``.  Minimizing
``E|| D_i h_i + D_j h_j - D'_i hhat_i ||^2`` (convex, quadratic in the scalars) gives

  s'_i = K_a2(h_i, hhat_i) / K_a2(hhat_i, hhat_i),     s_j = K_a1(h_j, hhat_i) / K_a1(hhat_i, hhat_i)
  D'_i = s'_i D_i + sum_{j -> i} s_j D_j,   partner i(j) = argmax_i K_a1(h_j, hhat_i)^2 / K_a1(hhat_i, hhat_i)

(the partner maximizes the error reduction ``||D_j||^2 K(j,i)^2 / K(i,i)``).  ``mode="lstsq"`` generalizes to
all remaining channels at once: ``D'_R = (D_R K(h_R, hhat_R) + D_P K(h_P, hhat_R)) (K(hhat_R, hhat_R) + ridge)^-1``.
When the next linear has a bias the mean is absorbed exactly (``b' = b + D mu - D' muhat``) and the fits use
the centered moments (alpha = 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ACTS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_new": lambda z: F.gelu(z, approximate="tanh"), "gelu_pytorch_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "linear": lambda z: z, "identity": lambda z: z,
}


def act_fn(name: str):
    if name not in ACTS:
        raise ValueError(f"UDFC: unsupported activation {name!r}; known: {', '.join(ACTS)}")
    return ACTS[name]


@torch.no_grad()
def gauss_act_moments(mean: torch.Tensor, var: torch.Tensor, act: str, n: int = 64):
    """``c = E[act(z)]``, ``beta = E[act'(z)]`` and ``e2 = E[act(z)^2]`` for ``z ~ N(mean, var)`` (elementwise,
    shapes ``[n_ch]``), by Gauss-Hermite quadrature (probabilists' weights, exact for polynomials of degree
    < 2n); ReLU (a kink, where quadrature converges slowly) in closed form with ``t = m / sd``:
    ``c = m Phi(t) + sd phi(t)``, ``beta = Phi(t)``, ``e2 = (m^2 + v) Phi(t) + m sd phi(t)``."""
    if act == "relu":
        m, v = mean.double(), var.double().clamp_min(1e-30)
        sd = v.sqrt()
        nrm = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
        t = m / sd
        cdf, pdf = nrm.cdf(t), nrm.log_prob(t).exp()
        return m * cdf + sd * pdf, cdf, (m * m + v) * cdf + m * sd * pdf
    x, w = np.polynomial.hermite_e.hermegauss(n)
    x = torch.tensor(x, dtype=torch.float64)
    w = torch.tensor(w / w.sum(), dtype=torch.float64)
    z = (mean.double()[:, None] + var.double().clamp_min(0).sqrt()[:, None] * x[None]).requires_grad_(True)
    with torch.enable_grad():
        y = act_fn(act)(z)
        (dy,) = torch.autograd.grad(y.sum(), z)
    y = y.detach()
    return (y * w).sum(-1), (dy * w).sum(-1), (y * y * w).sum(-1)


@dataclass
class Channels:
    """Data-free description of MLP hidden channels (norm weight already folded in).

    G ``[n, H]`` gate / fc1 rows, U ``[n, H]`` up rows (gated) or None (fc), m ``[n]`` pre-activation mean."""

    G: torch.Tensor
    U: torch.Tensor | None
    m: torch.Tensor
    act: str

    def __post_init__(self):
        self.G = self.G.double()
        self.U = None if self.U is None else self.U.double()
        self.m = self.m.double()
        v = (self.G * self.G).sum(1)
        self.c, self.beta, e2 = gauss_act_moments(self.m, v, self.act)
        # residual variance of the activation beyond its affine fit (orthogonal to 1 and z), kept as
        # channel-private noise: delta = (E act^2 - c^2 - beta^2 v) * E[u^2]
        r2 = (e2 - self.c**2 - self.beta**2 * v).clamp_min(0)
        self.delta = r2 * ((self.U * self.U).sum(1) if self.U is not None else 1.0)

    def select(self, idx: torch.Tensor) -> "Channels":
        return Channels(self.G[idx], None if self.U is None else self.U[idx], self.m[idx], self.act)

    def mean(self) -> torch.Tensor:
        """``mu [n] = E[h]``."""
        if self.U is None:
            return self.c
        return self.beta * (self.G * self.U).sum(1)


def channels_from_mlp(w_in: torch.Tensor, w_up: torch.Tensor | None, gamma: torch.Tensor | None,
                      beta: torch.Tensor | None, bias_in: torch.Tensor | None, act: str,
                      L: torch.Tensor | None = None) -> Channels:
    """Fold the norm ``x = gamma * xhat + beta`` into the MLP input linears ``w_in, w_up [I, H]``; ``L [H, H]``
    (``L L^T = E[xhat xhat^T]``) whitens an anisotropic input model (None = isotropic)."""
    g = torch.ones(w_in.shape[1], dtype=torch.float64) if gamma is None else gamma.double()
    if L is not None:
        g = torch.diag(g) @ L.double()
        m = torch.zeros(w_in.shape[0], dtype=torch.float64)
        if beta is not None:
            m = m + w_in.double() @ beta.double()
        if bias_in is not None:
            m = m + bias_in.double()
        return Channels(w_in.double() @ g, None if w_up is None else w_up.double() @ g, m, act)
    m = torch.zeros(w_in.shape[0], dtype=torch.float64)
    if beta is not None:
        m = m + w_in.double() @ beta.double()
    if bias_in is not None:
        m = m + bias_in.double()
    return Channels(w_in.double() * g, None if w_up is None else w_up.double() * g, m, act)


def cross_cov(a: Channels, b: Channels, matched: bool = False) -> torch.Tensor:
    """``Cov(h_a, h_b) [na, nb]`` under the Gaussian input model (module docstring). ``matched``: row k of a
    and b are the same channel (e.g. fp and quantized), so the channel-private residual ``sqrt(delta_a delta_b)``
    is added on the diagonal."""
    if a.U is None:
        cov = (a.beta[:, None] * b.beta[None]) * (a.G @ b.G.T)
    else:
        uu = a.U @ b.U.T
        cov = ((a.c[:, None] * b.c[None]) * uu
               + (a.beta[:, None] * b.beta[None]) * ((a.G @ b.G.T) * uu + (a.G @ b.U.T) * (a.U @ b.G.T)))
    if matched:
        cov = cov + torch.diag((a.delta * b.delta).sqrt())
    return cov


def kernel(a: Channels, b: Channels, alpha: float, matched: bool = False) -> torch.Tensor:
    """``K_alpha(a, b) = Cov(h_a, h_b) + alpha mu_a mu_b^T``  ``[na, nb]``."""
    return cross_cov(a, b, matched) + alpha * a.mean()[:, None] * b.mean()[None]


def energy_scores(D: torch.Tensor, ch: Channels, alpha: float) -> torch.Tensor:
    """Data-free importance ``e_j = ||D_j||^2 K_alpha(h_j, h_j)``: expected output energy of channel j ``[I]``."""
    return D.double().pow(2).sum(0) * diag_kernel(ch, ch, alpha)


def select_keep(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices (sorted) of the ``n_keep`` highest-scoring channels."""
    return torch.sort(torch.topk(scores, n_keep).indices).values


@dataclass
class Reconstruction:
    D: torch.Tensor  # [N, |R|] new next-layer weight (kept columns)
    bias_delta: torch.Tensor | None  # [N] to add to the next layer's bias (mean absorption) or None
    partner: torch.Tensor | None  # [|P|] position in R of each pruned channel's partner (pair mode)
    s: torch.Tensor | None  # [|P|] pruning scales (pair mode)
    s_q: torch.Tensor | None  # [|R|] quantization scales s'


@torch.no_grad()
def reconstruct(D: torch.Tensor, ch: Channels, keep: torch.Tensor, ch_hat: Channels | None, alpha1: float,
                alpha2: float, mode: str = "pair", ridge: float = 1e-3, has_bias: bool = False) -> Reconstruction:
    """Closed-form UDFC compensation of ``D [N, I]`` for pruning all channels not in ``keep`` and replacing the
    kept channels by ``ch_hat`` (their quantized version; None = not quantized). Returns the kept columns."""
    I = D.shape[1]
    pruned = torch.ones(I, dtype=torch.bool)
    pruned[keep] = False
    P = pruned.nonzero().flatten()
    Dd = D.double()
    R_ch = ch.select(keep)
    hat = ch_hat if ch_hat is not None else R_ch
    if has_bias:
        alpha1 = alpha2 = 0.0
    partner = s = s_q = None
    if mode not in ("pair", "lstsq"):
        raise ValueError(f"UDFC mode must be 'pair' or 'lstsq', got {mode!r}")
    if len(P) == 0 and ch_hat is None:  # nothing damaged: the exact optimum is D itself
        newD = Dd[:, keep].clone()
    elif mode == "pair":
        newD = Dd[:, keep].clone()
        if ch_hat is not None:
            s_q = diag_kernel(R_ch, hat, alpha2) / diag_kernel(hat, hat, alpha2).clamp_min(1e-30)
            newD = newD * s_q[None]
        if len(P):
            k_pr = kernel(ch.select(P), hat, alpha1)  # [|P|, |R|]
            den = diag_kernel(hat, hat, alpha1).clamp_min(1e-30)
            partner = (k_pr.pow(2) / den[None]).argmax(1)
            s = k_pr.gather(1, partner[:, None]).squeeze(1) / den[partner]
            newD.index_add_(1, partner, Dd[:, P] * s[None])
    elif mode == "lstsq":
        k_rr = kernel(hat, hat, alpha1, matched=True)
        k_rr = k_rr + ridge * k_rr.diagonal().mean() * torch.eye(len(keep), dtype=torch.float64)
        rhs = Dd[:, keep] @ kernel(R_ch, hat, alpha1, matched=True)
        if len(P):
            rhs = rhs + Dd[:, P] @ kernel(ch.select(P), hat, alpha1)
        newD = torch.linalg.solve(k_rr, rhs.T).T  # K symmetric
    else:
        raise ValueError(f"UDFC mode must be 'pair' or 'lstsq', got {mode!r}")
    bias_delta = (Dd @ ch.mean() - newD @ hat.mean()) if has_bias else None
    return Reconstruction(newD.to(D.dtype), None if bias_delta is None else bias_delta.to(D.dtype), partner, s, s_q)


def diag_kernel(a: Channels, b: Channels, alpha: float) -> torch.Tensor:
    """``K_alpha(h_a[k], h_b[k])`` for matched channels ``[n]`` (the diagonal of `kernel`, without the matrix)."""
    if a.U is None:
        cov = a.beta * b.beta * (a.G * b.G).sum(1)
    else:
        uu = (a.U * b.U).sum(1)
        cov = a.c * b.c * uu + a.beta * b.beta * ((a.G * b.G).sum(1) * uu + (a.G * b.U).sum(1) * (a.U * b.G).sum(1))
    return cov + (a.delta * b.delta).sqrt() + alpha * a.mean() * b.mean()


def linear_rescale(W: torch.Tensor, W_hat: torch.Tensor, gamma: torch.Tensor | None,
                   bias: torch.Tensor | None = None, alpha: float = 1.0, L: torch.Tensor | None = None) -> torch.Tensor:
    """Quantization term for a purely linear channel (v_proj -> o_proj): ``s'_k = E[v_k vhat_k] / E[vhat_k^2]``
    with ``v_k = W_k . (gamma xhat) + b_k``: ``s' = (W~_k.W~hat_k + alpha b_k^2) / (||W~hat_k||^2 + alpha b_k^2)`` ``[N]``."""
    g = 1.0 if gamma is None else gamma.double()[None]
    a, b = W.double() * g, W_hat.double() * g
    if L is not None:
        a, b = a @ L.double(), b @ L.double()
    bb = 0.0 if bias is None else alpha * bias.double() ** 2
    return ((a * b).sum(1) + bb) / ((b * b).sum(1) + bb).clamp_min(1e-30)


# ------------------------------------------------------------------------------------------------------------
# Data-free input model beyond isotropy: second-moment propagation through the residual stream (weights only).
#   M_0 = E_v[e_v e_v^T]  (uniform mean over the token-embedding rows ``E [V, H]``)
#   attention:  M += O Mv_rep O^T,  Mv = (W_v gamma) Mhat (W_v gamma)^T   (attention output ~ one value vector;
#               GQA: kv head of q head h is h // rep)
#   MLP:        M += D K D^T,       K = E[h h^T] of the channel model above with xhat ~ N(0, Mhat)
# with Mhat = M H / tr(M) for RMSNorm (LayerNorm: center first, M -> C M C, C = I - 11^T / H).  Cross terms
# between the residual and the new contributions are ignored.  The Gaussian formulas hold with every inner
# product ``a.b`` replaced by ``a^T Mhat b``, i.e. with rows multiplied by ``L`` where ``L L^T = Mhat``.
# ------------------------------------------------------------------------------------------------------------
def normalized_moment(M: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Second moment of the normalized stream ``xhat`` from that of the residual ``x`` ``[H, H]``."""
    M = M.double()
    if center:
        H = M.shape[0]
        C = torch.eye(H, dtype=M.dtype) - 1.0 / H
        M = C @ M @ C
    return M * (M.shape[0] / M.trace().clamp_min(1e-30))


def psd_sqrt(M: torch.Tensor) -> torch.Tensor:
    """``L [H, H]`` with ``L L^T = M`` (symmetric square root, negative eigenvalues clipped)."""
    w, V = torch.linalg.eigh(M.double())
    return (V * w.clamp_min(0).sqrt()) @ V.T


def attn_moment(Wv: torch.Tensor, Wo: torch.Tensor, gamma: torch.Tensor | None, Mhat: torch.Tensor,
                n_heads: int, bias_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``O Mv_rep O^T [H, H]``: second moment added to the residual by one attention block."""
    V = Wv.double() * (1.0 if gamma is None else gamma.double()[None])
    Mv = V @ Mhat @ V.T
    if bias_mean is not None:
        Mv = Mv + torch.outer(bias_mean.double(), bias_mean.double())
    hd = Wo.shape[1] // n_heads
    rep = n_heads // (Wv.shape[0] // hd)
    idx = torch.tensor([(h // rep) * hd + d for h in range(n_heads) for d in range(hd)])
    O = Wo.double()
    return O @ Mv[idx][:, idx] @ O.T


# ---------------------------------------------------------------------------------------------------------------
# Data-free merging baseline without the closed form (Neuron Merging, Kim et al. NeurIPS 2020; DFQ-style):
# every pruned channel j goes to its most similar kept channel i by cosine of the (norm-folded) input rows, with
# the norm-ratio scale of a positively homogeneous activation, act(s z) = s act(z); no covariance model.
@torch.no_grad()
def merge_by_cosine(D: torch.Tensor, G: torch.Tensor, U: torch.Tensor | None, keep: torch.Tensor,
                    threshold: float = 0.0) -> Reconstruction:
    """``D [N, I]``; ``G [I, H]`` the gate (fc1) rows and ``U [I, H]`` the up rows (None for fc MLPs), norm folded.

    gated ``h = act(g) u``: similarity ``(cos(g_j, g_i) + |cos(u_j, u_i)|) / 2``, scale
    ``s = sign(cos(u_j, u_i)) ||g_j|| ||u_j|| / (||g_i|| ||u_i||)``;  fc ``h = act(z)``: similarity
    ``cos(z_j, z_i)``, scale ``||z_j|| / ||z_i||``.  ``D'_i = D_i + sum_{j -> i} s_j D_j`` for pruned ``j`` whose best
    similarity exceeds ``threshold`` (the others are just dropped).  Returns the kept columns ``[N, |R|]``."""
    I = D.shape[1]
    pruned = torch.ones(I, dtype=torch.bool)
    pruned[keep] = False
    P = pruned.nonzero().flatten()
    newD = D.double()[:, keep].clone()
    if len(P) == 0:
        return Reconstruction(newD.to(D.dtype), None, None, None, None)
    Gd = G.double()
    gn = Gd.norm(dim=1).clamp_min(1e-30)
    cg = (Gd[P] / gn[P, None]) @ (Gd[keep] / gn[keep, None]).T  # [|P|, |R|]
    if U is None:
        sim, scale_num, scale_den, sign = cg, gn[P], gn[keep], None
    else:
        Ud = U.double()
        un = Ud.norm(dim=1).clamp_min(1e-30)
        cu = (Ud[P] / un[P, None]) @ (Ud[keep] / un[keep, None]).T
        sim, scale_num, scale_den, sign = (cg + cu.abs()) / 2, gn[P] * un[P], gn[keep] * un[keep], cu.sign()
    best, partner = sim.max(1)
    s = scale_num / scale_den[partner]
    if sign is not None:
        s = s * sign.gather(1, partner[:, None]).squeeze(1)
    s = torch.where(best > threshold, s, torch.zeros_like(s))
    newD.index_add_(1, partner, D.double()[:, P] * s[None])
    return Reconstruction(newD.to(D.dtype), None, partner, s, None)
