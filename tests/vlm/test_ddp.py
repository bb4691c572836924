"""A VLM method on 2 CPU processes: the student is DDP-wrapped, the teacher sharded (FSDP) and outside it.

The two processes run tests/vlm/ddp_job.py in fresh interpreters (Lightning's ``ddp`` launcher), never forked from
the test process, whose threads would make a fork hang.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

JOB = Path(__file__).with_name("ddp_job.py")
#: what an earlier in-process DDP run (Lightning sets them in os.environ) would otherwise hand the new processes
DISTRIBUTED = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
               "LOCAL_WORLD_SIZE")


def test_llava_kd_under_ddp_with_a_sharded_teacher(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED and not k.startswith(("PL_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(JOB.parents[2]))
    log = tmp_path / "job.log"
    with log.open("w") as out:  # a file, not a pipe: rank 1 inherits it and may outlive rank 0
        job = subprocess.Popen([sys.executable, str(JOB), str(tmp_path)], env=env, cwd=tmp_path, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = job.wait(timeout=600)
        finally:
            try:
                os.killpg(job.pid, signal.SIGKILL)  # both ranks, whatever happened
            except ProcessLookupError:
                pass
    assert code == 0, log.read_text()[-3000:]
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    full = facts[0]["teacher_full"]
    for f in facts:
        assert f["world"] == 2 and f["ddp"] and f["teacher_fsdp"] and not f["teacher_in_ddp"]
        assert f["loss_terms"] == ["train/loss_reg", "train/loss_rel", "train/loss_res", "train/loss_vis"]
        assert 0 < f["teacher_local"] < full  # each process holds a shard of the teacher
    assert sum(f["teacher_local"] for f in facts) == full
