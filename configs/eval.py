"""Evaluate any local checkpoint: Avg@n and Pass@k on a task's eval split, a JSON report and a markdown table
(workdir/eval/step_<step>.{json,md}) and summary.json.

    python -m trd_jax.main --config configs/eval.py --workdir DIR --config.model.path=CKPT [--config.task...]

CKPT is a Hugging Face folder (config.json + safetensors) or a trd_jax run's workdir (its latest
checkpoint, through workdir/student_model). The task section chooses the data and the grader.
"""

from trd_jax.config import base_config


def get_config():
    cfg = base_config()
    cfg.mode = "eval"
    cfg.student.source = "path"
    cfg.model = cfg.student  # the same section under a clearer name: --config.model.path sets student.path
    cfg.eval.update(n=16, k=0)  # Avg@16 / Pass@16 (TRD_SPEC §5)
    cfg.log.diagnostics = False
    return cfg
