"""Multi-round offline distillation (offline.rounds, offline.steps_per_round): the reference code's chunked
variant. Round r first writes the targets of its steps_per_round steps into offline.dir/round-<r>, from the
student as it is at the round's first step (and the teacher, which a multi-round run therefore loads), then
trains those steps on them. Everything resumes: a killed generation keeps its finished shards (the round's
manifest pins the student's weights it started from), and a run resumed inside a round restores its
position in that round's rows. With offline.teacher_job the rounds are written by a separate job instead
(offline/teacher_job.py) and this run loads no teacher."""

from __future__ import annotations

from trd_jax.errors import TrainingError
from trd_jax.offline import shards
from trd_jax.offline.generate import generate_targets

round_dir = shards.round_dir


class RoundRows:
    """The training data of a multi-round run, with the next()/state()/restore() of a prompt iterator; prepare(step)
    before each step opens the round the step belongs to: generated first when needed, or, with a teacher job
    (offline.teacher_job, offline/teacher_job.py), waited for after publishing the student it needs."""

    def __init__(self, trainer, offline, *, seed: int):
        self.trainer, self.o, self.seed = trainer, offline, seed
        self.round: int | None = None
        self.rows = None
        self._pending: dict | None = None  # a checkpoint's state, applied when its round is opened
        self.blocked_s = 0.0  # seconds spent waiting for a teacher job's targets since the last take_blocked()

    def prepare(self, step: int) -> None:
        r = step // self.o.steps_per_round
        if r == self.round:
            return
        path = round_dir(self.o.dir, r)
        if self.o.teacher_job:
            from trd_jax.offline.teacher_job import await_round

            self.blocked_s += await_round(self.trainer, r, at_round_start=step % self.o.steps_per_round == 0)
        elif not shards.round_complete(self.o.dir, r, self.o.steps_per_round):
            # (a complete round is not checked again: a run resumed inside it has moved its student past the
            # weights the round's manifest pins)
            generate_targets(self.trainer, path, k=self.o.top_k, num_shards=self.o.steps_per_round,
                             first_step=r * self.o.steps_per_round)
        try:
            self.rows = shards.open_rows(path, seed=self.seed + r)
        except ValueError as e:  # e.g. every row of the round dropped: nothing to train on
            raise TrainingError(f"offline round {r}: {e}") from None
        self.round = r
        if self._pending is not None and self._pending.get("round") == r:
            self.rows.restore(self._pending["rows"])
        self._pending = None

    def take_blocked(self) -> float:
        waited, self.blocked_s = self.blocked_s, 0.0
        return waited

    def next(self, size: int) -> list[dict]:
        return self.rows.next(size)

    def state(self) -> dict:
        return {"iterator": "offline_rounds", "round": self.round,
                "rows": None if self.rows is None else self.rows.state()}

    def restore(self, state: dict) -> None:
        if state.get("iterator") != "offline_rounds":
            raise ValueError(f"data iterator state {dict(state)}: not a multi-round offline run's")
        self._pending = dict(state)
