"""CSKV calibration pass: per decoder layer, ASVD-initialize low-rank factors of k_proj and v_proj from the
layer's calibration inputs and fit them with the layer-wise reconstruction loss (only A, B are trained).

For ``x [tokens, H]`` (input of k_proj/v_proj): ``m = mean_t |x_t|`` drives the ASVD init
(``S W^T = U Sigma V^T``, ``A^T = S^-1 U_r Sigma_r^1/2``, ``B^T = Sigma_r^1/2 V_r^T``, ``S = diag((m+1e-6)^alpha)``),
then Adam minimizes ``MSE(Q(x A^T) B^T, x W^T)`` (= the RoPE'd key MSE, RoPE being a rotation) on a token subsample;
``Q`` is the identity, or with ``qat: true`` the cache quantizer (k_bits / v_bits) with a straight-through estimator.

Output: the layer's weights are unchanged (k_proj/v_proj still produce the exact window K/V); the factors go to
``ctx.extra`` as ``model.layers.{i}.self_attn.{k,v}_proj_{a,b}.weight`` and `finalize` writes ``cskv.json``
(config, ranks, per-layer reconstruction errors). `ptq.kv.cskv.load_cskv_model(folder)` rebuilds the model; a
plain ``from_pretrained`` of the folder loads the dense model (the extra tensors are reported as unused).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.kv.cskv import SUPPORTED, CSKVConfig, factor_names
from ptq.kv.cskv_fit import asvd_factors, fit_factors, recon_error
from ptq.pipeline import LayerContext, Pass


class CSKVPass(Pass):
    name = "cskv"
    needs_calibration = True

    @dataclass
    class Options:
        k_density: float = 0.25
        v_density: float = 0.75
        window: int = 32
        k_bits: int = 16
        v_bits: int = 16
        store_dtype: str = "float16"
        init: str = "asvd"  # asvd | svd
        alpha: float = 0.5
        fit_steps: int = 300  # 0 = ASVD init only
        fit_lr: float = 1e-2  # Adam step relative to each factor's rms
        fit_tokens: int = 4096  # calibration tokens kept per layer for the fit
        qat: bool = False  # quantization-aware fit: the k_bits/v_bits cache quantizer in the loss (STE)
        keep_keys: bool = False  # run time: keep reconstructed keys of finished windows (faster decode, more bytes)
        seed: int = 0

        def __post_init__(self):
            if self.init not in ("asvd", "svd"):
                raise ValueError(f"init must be asvd or svd, got {self.init!r}")
            if self.fit_steps < 0 or self.fit_tokens < 2:
                raise ValueError("fit_steps must be >= 0 and fit_tokens >= 2")
            CSKVConfig(**self.cskv_fields())  # range checks; model-dependent dims are checked in setup

        def cskv_fields(self) -> dict:
            return {k: getattr(self, k) for k in ("k_density", "v_density", "window", "k_bits", "v_bits",
                                                  "store_dtype", "keep_keys")}

    def setup(self, sm) -> None:
        mt = getattr(sm.config, "model_type", None)
        if mt not in SUPPORTED:
            raise ValueError(f"cskv supports RoPE models ({', '.join(SUPPORTED)}), not {mt!r}")
        self.ccfg = CSKVConfig(**self.opts.cskv_fields())
        self.dims = self.ccfg.dims(sm.config)
        if self.dims["r_v"] % self.dims["gv"]:
            raise ValueError("v compressed dim must split into per-head groups")
        self.layer_stats: list[dict] = []

    @torch.no_grad()
    def _collect(self, ctx: LayerContext):
        """Mean |x| per input channel over all calibration tokens and a seeded subsample of rows."""
        o = self.opts
        per_batch = max(1, -(-o.fit_tokens // max(len(ctx.batches), 1)))
        g = torch.Generator().manual_seed(o.seed + ctx.index)
        acc = {"abs": None, "n": 0, "rows": []}

        def fn(_name, x):
            s = x.abs().sum(0)
            acc["abs"] = s if acc["abs"] is None else acc["abs"] + s
            acc["n"] += x.shape[0]
            idx = torch.randperm(x.shape[0], generator=g)[:per_batch]
            acc["rows"].append(x[idx].clone())

        ctx.collect_inputs(["self_attn.k_proj"], fn)
        return acc["abs"] / acc["n"], torch.cat(acc["rows"])[: o.fit_tokens]

    def apply(self, ctx: LayerContext) -> None:
        if not ctx.batches:
            raise ValueError("cskv needs calibration data")
        o = self.opts
        act_mean, x = self._collect(ctx)
        names = factor_names(ctx.prefix)
        stats = {}
        for kind, r in (("k", self.dims["r_k"]), ("v", self.dims["r_v"])):
            w = ctx.module(f"self_attn.{kind}_proj").weight.data.float()
            bits = o.k_bits if kind == "k" else o.v_bits
            if r == w.shape[0]:  # density 1: quantization only, the cache holds K (or V) itself
                ctx.extra[names[f"{kind}_proj_a"]] = w.to(ctx.module(f"self_attn.{kind}_proj").weight.dtype).clone()
                ctx.extra[names[f"{kind}_proj_b"]] = torch.eye(r, dtype=ctx.extra[names[f"{kind}_proj_a"]].dtype)
                stats[f"cskv.{kind}.err_init"] = stats[f"cskv.{kind}.err_fit"] = 0.0
                continue
            a, b = asvd_factors(w, r, act_mean if o.init == "asvd" else None, o.alpha)
            quant = None
            if o.qat and bits < 16:
                quant = ({"bits": bits, "axis": "channel", "window": o.window} if kind == "k"
                         else {"bits": bits, "axis": "token", "group": self.dims["gv"]})
            e_init = recon_error(w, a, b, x, quant)
            if o.fit_steps > 0:
                with torch.enable_grad():
                    a, b, _, _ = fit_factors(w, a, b, x, steps=o.fit_steps, lr=o.fit_lr, seed=o.seed + ctx.index,
                                             quant=quant)
            e_fit = recon_error(w, a, b, x, quant)
            dt = ctx.module(f"self_attn.{kind}_proj").weight.dtype
            ctx.extra[names[f"{kind}_proj_a"]] = a.to(dt).contiguous()
            ctx.extra[names[f"{kind}_proj_b"]] = b.to(dt).contiguous()
            stats[f"cskv.{kind}.err_init"] = e_init
            stats[f"cskv.{kind}.err_fit"] = e_fit
        ctx.stats.update(stats)
        self.layer_stats.append({"layer": ctx.index, **stats})

    def finalize(self, sm) -> dict:
        o = self.opts
        return {"cskv.json": {
            "method": "cskv", "config": self.ccfg.to_dict(), "dims": self.dims,
            "init": o.init, "alpha": o.alpha, "fit_steps": o.fit_steps, "fit_lr": o.fit_lr,
            "fit_tokens": o.fit_tokens, "qat": o.qat,
            "tensors": "model.layers.{i}.self_attn.{k,v}_proj_{a,b}.weight (A [r, hidden], B [n_kv*d, r])",
            "layers": self.layer_stats,
        }}
