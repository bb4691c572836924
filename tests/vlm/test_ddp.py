"""A VLM method on 2 CPU processes: the student is DDP-wrapped, the teacher sharded (FSDP) and outside it.

The two processes run tests/vlm/ddp_job.py in fresh interpreters (Lightning's ``ddp`` launcher), never forked from
the test process, whose threads would make a fork hang.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

JOB = Path(__file__).with_name("ddp_job.py")


def test_llava_kd_under_ddp_with_a_sharded_teacher(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(JOB.parents[2])}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run([sys.executable, str(JOB), str(tmp_path)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    full = facts[0]["teacher_full"]
    for f in facts:
        assert f["world"] == 2 and f["ddp"] and f["teacher_fsdp"] and not f["teacher_in_ddp"]
        assert f["loss_terms"] == ["train/loss_reg", "train/loss_rel", "train/loss_res", "train/loss_vis"]
        assert 0 < f["teacher_local"] < full  # each process holds a shard of the teacher
    assert sum(f["teacher_local"] for f in facts) == full
