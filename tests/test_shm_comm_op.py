"""DeepSpeed's CPU SHM comm op is never built: it serves only DeepSpeed-Inference's inference_all_reduce, and
building it meant a C++ compile per new environment, a build lock without timeout, and a 66 MiB /dev/shm
workspace per rank that DeepSpeed never unlinks (pipeline.run.distributed.skip_shm_comm_op)."""
import glob
import os

from tests.launcher import run_deepspeed


def test_ranks_communicate_without_building_or_mapping_the_shm_comm_op():
    proc = run_deepspeed("tests.dist.comm_probe", [], nproc=2, timeout=180)
    for rank in (0, 1):  # 1 + 2 summed; both ranks' values gathered; no op loaded, none registered
        assert f"rank {rank} sum 3 gathered [0, 1] shm_op False inference_op False" in proc.stdout, proc.stdout
    assert "deepspeed_shm_comm_op built successfully" not in proc.stdout + proc.stderr
    port = proc.args[proc.args.index("--master_port") + 1]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
