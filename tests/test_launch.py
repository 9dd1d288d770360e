"""The launch environment: which share of the shards this process does, under torchrun, Slurm or alone."""

import pytest

from datafilter.common.launch import LaunchEnv, launch_env


@pytest.mark.parametrize("env, expected", [
    ({}, LaunchEnv(0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, LaunchEnv(3, 8, 1)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, LaunchEnv(5, 16, 1)),
    # An array of one-task jobs, as `#SBATCH -n 1 --array=10-13` sets it: tasks 10..13 are ranks 0..3.
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10",
      "SLURM_ARRAY_TASK_COUNT": "4"}, LaunchEnv(2, 4, 0)),
    # A stepped array (--array=0-15:4): ids 0, 4, 8, 12 are ranks 0..3.
    ({"SLURM_NTASKS": "1", "SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "4",
      "SLURM_ARRAY_TASK_COUNT": "4"}, LaunchEnv(2, 4, 0)),
])
def test_launch_env_reads_torchrun_then_slurm(env, expected):
    assert launch_env(env) == expected


def test_ranks_split_items_disjointly_and_completely():
    items = list(range(10))
    shares = [LaunchEnv(r, 3).take(items) for r in range(3)]
    assert sorted(x for s in shares for x in s) == items
    assert all(not set(a) & set(b) for i, a in enumerate(shares) for b in shares[i + 1:])


def test_an_array_task_outside_its_array_is_an_error():
    with pytest.raises(ValueError, match="outside its array"):
        launch_env({"SLURM_NTASKS": "1", "SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "0",
                    "SLURM_ARRAY_TASK_COUNT": "4"})


def test_training_never_joins_the_tasks_of_a_job_array():
    from datafilter.common.launch import ddp_env

    array = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert ddp_env(array) == LaunchEnv(0, 1, 0)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        ddp_env({"SLURM_NTASKS": "4", "SLURM_PROCID": "1"})
    assert ddp_env({"SLURM_NTASKS": "4", "SLURM_PROCID": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}).world_size == 4


def test_pick_device_gives_each_local_rank_its_own_gpu(monkeypatch):
    import torch

    from datafilter.models import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", 3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device("auto", 5) == torch.device("cuda", 1)  # rank 5 of a node with 4 GPUs
    assert pick_device("cuda", 2) == torch.device("cuda", 2)
    assert pick_device("cuda:3", 0) == torch.device("cuda", 3)  # an explicit index is kept
    assert pick_device("cpu", 2) == torch.device("cpu")
