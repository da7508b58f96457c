"""The inverse-Hessian factor shared by GPTQ-style sequential rounding (GPTQ on the uniform grid, NUPES on the
power grid): ``U`` = upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` for ``H [K, K]``, so that
column ``i``'s rounding error is spread over the later columns as ``err / U_ii * U_i,i:`` (Frantar et al. 2022,
Eq. 3 in its Cholesky form)."""
from __future__ import annotations

import torch


def inverse_cholesky_factor(H: torch.Tensor, damp: float, max_tries: int = 4,
                            method: str = "GPTQ") -> tuple[torch.Tensor, float]:
    """``(U [K, K], damp used)``; the damping is raised x10 on each failed Cholesky, up to ``max_tries`` times."""
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for _ in range(max_tries):
        try:
            Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H + damp * mean_diag * eye))
            return torch.linalg.cholesky(Hinv, upper=True), damp
        except torch.linalg.LinAlgError:
            damp *= 10
    raise RuntimeError(f"{method}: Hessian not positive definite even with damping {damp / 10:g}; "
                       "use more calibration samples or a larger damp")
