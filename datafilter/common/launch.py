"""The one place that reads the launch environment (torchrun, Slurm, or a plain process).

Per-shard stages split their shards by rank, so ``torchrun --nproc_per_node 8 -m datafilter embed ...`` or a Slurm
job array does each shard exactly once without any coordination beyond the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def take(self, items: list) -> list:
        """This rank's share of ``items``: every ``world_size``-th item, starting at ``rank``."""
        return items[self.rank :: self.world_size]


def _int(env: dict, *names: str, default: int) -> int:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


def launch_env(env: dict | None = None) -> LaunchEnv:
    """Read rank and world size from torchrun's variables, then Slurm's, else a single process."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env or "RANK" in env:
        return LaunchEnv(
            rank=_int(env, "RANK", default=0),
            world_size=_int(env, "WORLD_SIZE", default=1),
            local_rank=_int(env, "LOCAL_RANK", default=0),
        )
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env and _int(env, "SLURM_NTASKS", default=1) == 1:
        # A job array of one-task jobs: array tasks are the ranks (ids may start anywhere and step by more than 1).
        lo = _int(env, "SLURM_ARRAY_TASK_MIN", default=0)
        step = _int(env, "SLURM_ARRAY_TASK_STEP", default=1)
        rank = (_int(env, "SLURM_ARRAY_TASK_ID", default=0) - lo) // step
        world = _int(env, "SLURM_ARRAY_TASK_COUNT", default=1)
        if not 0 <= rank < world:
            raise ValueError(f"Slurm array task {env['SLURM_ARRAY_TASK_ID']} is outside its array "
                             f"(min {lo}, step {step}, count {world})")
        return LaunchEnv(rank=rank, world_size=world)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv(
            rank=_int(env, "SLURM_PROCID", default=0),
            world_size=_int(env, "SLURM_NTASKS", default=1),
            local_rank=_int(env, "SLURM_LOCALID", default=0),
        )
    return LaunchEnv()


def ddp_env(env: dict | None = None) -> LaunchEnv:
    """The process group of one distributed training run: torchrun's ranks, or the tasks of one Slurm step.

    Unlike ``launch_env`` it never treats a job array as one world: array tasks are independent runs (a seed sweep),
    each a world of its own. Slurm tasks need MASTER_ADDR and MASTER_PORT, which torch reads to meet.
    """
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env or "RANK" in env:
        return launch_env(env)
    if _int(env, "SLURM_NTASKS", default=1) > 1 and "SLURM_PROCID" in env:
        if not env.get("MASTER_ADDR") or not env.get("MASTER_PORT"):
            raise ValueError("distributed training under srun needs MASTER_ADDR and MASTER_PORT (e.g. the first host "
                             "of SLURM_NODELIST and a free port), or launch with torchrun")
        return LaunchEnv(rank=_int(env, "SLURM_PROCID", default=0), world_size=_int(env, "SLURM_NTASKS", default=1),
                         local_rank=_int(env, "SLURM_LOCALID", default=0))
    return LaunchEnv()


def free_cores() -> int:
    """Cores this process may use: the affinity mask, not the machine's count (containers, taskset, Slurm)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
