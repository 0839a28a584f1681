"""Shared test policy (DESIGN §4): one tolerance table, hypothesis profiles, assert helpers."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# (rtol, atol) by comparison kind. Never scale these by array size.
TOL = {
    "exact": (1e-10, 1e-12),        # exact vs exact (float64 round-off with wide margin)
    "fd": (1e-5, 1e-7),             # exact vs central finite differences
    "f32": (1e-4, 1e-5),            # float32 vs float64 reference
}

# tpg's tensors are tiny (tens to thousands of elements): intra-op threads only add synchronisation,
# which measured 3–10× slower on a loaded 2-core machine. TPG_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("TPG_TEST_THREADS", "1")))

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Monte Carlo tests use fixed seeds; TPG_MC_FRESH=1 draws fresh ones so flakiness can be measured.
MC_FRESH = os.environ.get("TPG_MC_FRESH", "") not in ("", "0")


def mc_seed(fixed: int) -> int:
    """The seed a Monte Carlo test uses: ``fixed``, or a fresh random one under TPG_MC_FRESH=1."""
    if MC_FRESH:
        s = int.from_bytes(os.urandom(4), "little")
        print(f"[mc] fresh seed {s} (fixed would be {fixed})")
        return s
    return fixed


def assert_close(actual, expected, kind: str = "exact", what: str = ""):
    """assert_close with the table's tolerance; the message prints expected, actual and max error."""
    rtol, atol = TOL[kind]
    a = torch.as_tensor(actual, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bool(bad.any()):
        i = int(torch.argmax((err - atol - rtol * e.abs()).reshape(-1)))
        raise AssertionError(f"{what} [{kind}: rtol={rtol}, atol={atol}] max abs error {float(err.max()):.3e}; "
                             f"worst element #{i}: expected {float(e.reshape(-1)[i]):.17g}, "
                             f"actual {float(a.reshape(-1)[i]):.17g}")


@pytest.fixture
def tol():
    return TOL


def assert_vec_close(actual, expected, kind: str = "exact", what: str = ""):
    """Vector version: ‖a − e‖ ≤ rtol‖e‖ + atol (for gradients, whose small entries carry no scale)."""
    rtol, atol = TOL[kind]
    a = torch.as_tensor(actual, dtype=torch.float64).reshape(-1)
    e = torch.as_tensor(expected, dtype=torch.float64).reshape(-1)
    err, ref = float((a - e).norm()), float(e.norm())
    if not err <= atol + rtol * ref:
        raise AssertionError(f"{what} [{kind}: rtol={rtol}, atol={atol}] ‖actual − expected‖ = {err:.3e}, "
                             f"‖expected‖ = {ref:.3e}, relative {err / max(ref, 1e-300):.3e}")
