"""2-rank tests through the real `deepspeed` launcher (CPU, gloo): EP equivalence and the
same-MoE-calls invariant with ranks whose batches differ. A hang fails by timeout."""
import pytest

from tests.launcher import run_deepspeed

pytestmark = pytest.mark.slow


def test_ep2_equals_ep1():
    proc = run_deepspeed("tests.dist.moe_ep_equivalence", [], nproc=2, timeout=240)
    assert proc.stdout.count("EP_EQUIVALENCE_OK") == 2, proc.stdout[-3000:]


def test_ranks_with_different_batches_neither_crash_nor_hang(tmp_path):
    proc = run_deepspeed("tests.dist.moe_invariant", [str(tmp_path)], nproc=2, timeout=300)
    assert proc.stdout.count("INVARIANT_OK") == 2, proc.stdout[-3000:]
