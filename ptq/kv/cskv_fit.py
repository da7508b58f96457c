"""CSKV's factor fit (Wang et al. 2024, arXiv 2409.10593; reference ``init_asvd`` and ``train.py``): ASVD
initialization of ``W [N, H] ~ B A`` and the layer-wise Adam fit of ``A [r, H]``, ``B [N, r]`` on calibration
inputs, optionally through the cache quantizer with a straight-through estimator (quantization-aware fit).
Pure tensor functions; `ptq.passes.cskv` runs them per layer, `ptq.kv.cskv` holds the run time.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def asvd_factors(w: torch.Tensor, r: int, act_mean: torch.Tensor | None = None, alpha: float = 0.5):
    """``W [N, H]`` -> ``A [r, H], B [N, r]`` with ``B A ~ W`` (plain SVD when ``act_mean`` is None)."""
    wt = w.double().t()  # [H, N]
    if act_mean is not None:
        s = (act_mean.double() + 1e-6) ** alpha
        wt = s[:, None] * wt
    u, sig, vt = torch.linalg.svd(wt, full_matrices=False)
    u, sig, vt = u[:, :r], sig[:r], vt[:r]
    if act_mean is not None:
        u = u / s[:, None]
    a = (u * sig.sqrt()).t()  # [r, H]
    b = (sig.sqrt()[:, None] * vt).t()  # [N, r]
    return a.to(w.dtype).contiguous(), b.to(w.dtype).contiguous()


def fake_quant_ste(c: torch.Tensor, bits: int, axis: str, window: int = 32, group: int | None = None):
    """Cache quantizer in the training graph (straight-through estimator): ``c [n, r]`` features, ``axis``
    ``"channel"`` = K (min/max per channel over blocks of ``window`` consecutive rows, KIVI) or ``"token"`` = V
    (per row in groups of ``group`` channels). Forward: ``q s + min`` exactly as `quantize_groups` stores it
    (fp16 scale and minimum); backward: identity (min/max ranges never clip)."""
    if bits >= 16:
        return c
    n, r = c.shape
    if axis == "channel":
        n_use = (n // window) * window
        if n_use == 0:
            return c
        v, dim = c[:n_use].reshape(n_use // window, window, r), 1
    else:
        g = group or r
        v, dim = c.reshape(n, r // g, g), 2
    qmax = 2**bits - 1
    with torch.no_grad():
        lo = v.amin(dim, keepdim=True)
        s = ((v.amax(dim, keepdim=True) - lo).clamp(min=1e-5) / qmax).half().float()
        lo = lo.half().float()
        deq = torch.clamp(torch.round((v - lo) / s), 0, qmax) * s + lo
    out = v + (deq - v).detach()
    out = out.reshape(-1, r)
    return torch.cat([out, c[out.shape[0]:]]) if out.shape[0] < n else out


def recon_error(w, a, b, x, quant: dict | None = None) -> float:
    """Relative output error ``||x W^T - Q(x A^T) B^T||^2 / ||x W^T||^2`` on ``x [n, H]`` (``Q`` = identity, or
    `fake_quant_ste` with ``quant`` = its keyword arguments)."""
    with torch.no_grad():
        y = x @ w.t()
        c = x @ a.t()
        if quant:
            c = fake_quant_ste(c.float(), **quant).to(c.dtype)
        return float((c @ b.t() - y).pow(2).sum() / y.pow(2).sum().clamp(min=1e-20))


def fit_factors(w, a, b, x: torch.Tensor, steps: int = 300, lr: float = 1e-2, batch: int = 1024,
                holdout: float = 0.2, seed: int = 0, quant: dict | None = None):
    """Adam on ``MSE(Q(x A^T) B^T, x W^T)`` (normalized by ``mean (x W^T)^2``) over ``x [n, H]``.

    ``quant`` (keyword arguments of `fake_quant_ste`: bits, axis, window, group) puts the cache quantizer in the
    graph with a straight-through estimator (quantization-aware fit, reference QAT); None = plain fit. The step
    size of each factor is ``lr * rms(factor)`` (scale-free), cosine-decayed; the factors with the lowest
    held-out error (including the init, both measured through ``Q``) are returned with ``(err_init, err_final)``.
    With ``quant`` the rows keep their calibration order (K ranges are per block of consecutive tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    if quant and quant.get("axis") == "channel":  # shuffle whole windows, not tokens
        wdw = quant.get("window", 32)
        nb = x.shape[0] // wdw
        x = x[: nb * wdw].reshape(nb, wdw, -1)[torch.randperm(nb, generator=g)].reshape(nb * wdw, -1)
    else:
        x = x[torch.randperm(x.shape[0], generator=g)]
    nh = max(1, int(holdout * x.shape[0]))
    if quant and quant.get("axis") == "channel":
        nh = max(quant.get("window", 32), nh // quant.get("window", 32) * quant.get("window", 32))
    xh, xt = x[:nh], x[nh:]
    w = w.float()
    yt = xt @ w.t()
    norm = yt.pow(2).mean().clamp(min=1e-20)
    A = nn.Parameter(a.float().clone())
    B = nn.Parameter(b.float().clone())
    opt = torch.optim.Adam([{"params": [A], "lr": lr * float(a.float().pow(2).mean().sqrt())},
                            {"params": [B], "lr": lr * float(b.float().pow(2).mean().sqrt())}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    err0 = recon_error(w, a.float(), b.float(), xh, quant)
    best = (err0, a.float().clone(), b.float().clone())
    blk = quant.get("window", 32) if quant and quant.get("axis") == "channel" else 1
    nblk = xt.shape[0] // blk
    for step in range(steps):
        sel = torch.randint(0, nblk, (max(1, min(batch, xt.shape[0]) // blk),), generator=g)
        idx = (sel[:, None] * blk + torch.arange(blk)[None]).reshape(-1)
        c = fake_quant_ste(xt[idx] @ A.t(), **quant) if quant else xt[idx] @ A.t()
        loss = (c @ B.t() - yt[idx]).pow(2).mean() / norm
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            e = recon_error(w, A.data, B.data, xh, quant)
            if e < best[0]:
                best = (e, A.data.clone(), B.data.clone())
    return best[1].to(a.dtype), best[2].to(b.dtype), err0, best[0]
