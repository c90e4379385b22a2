"""2-rank generation through the real `deepspeed` launcher (CPU, gloo): with EP=2 inside a ZeRO-2 engine, a rank
whose sequences end first keeps stepping in lockstep (no hang) and that changes no rank's outputs
(tests/dist/generate_lockstep.py). A hang fails by timeout, with every rank's Python stack."""
import pytest

from tests.launcher import run_deepspeed

pytestmark = pytest.mark.slow


def test_a_rank_that_finishes_first_keeps_stepping_and_outputs_do_not_change():
    proc = run_deepspeed("tests.dist.generate_lockstep", [], nproc=2, timeout=240)
    assert proc.stdout.count("LOCKSTEP_OK") == 2, proc.stdout[-3000:]
    assert proc.stdout.count("lockstep decoding ok") == 8, proc.stdout[-3000:]  # 2 ranks x 2 MoE x 2 searches
