"""Multi-node launches the Lightning way: qlit's CLI reads torchrun's and SLURM's environment as Lightning does.

Each node runs the same ``qlit fit`` command (under ``torchrun`` or ``srun``); the Trainer built from the config must
find its rank, node and world size in that environment. Only the Trainer is built here: no process group starts.
"""

from __future__ import annotations

import pytest
from helpers import ROOT, cli_args

from qlit.trainer_cli import QlitCLI

ARGS = [
    "--config",
    str(ROOT / "configs/demo.yaml"),
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "2",
    "--trainer.num_nodes",
    "2",
    "--trainer.strategy",
    "ddp",
]

TORCHRUN = {  # node 1 of 2, its second process: `torchrun --nnodes 2 --nproc-per-node 2 --node-rank 1 ...`
    "WORLD_SIZE": "4",
    "RANK": "3",
    "LOCAL_RANK": "1",
    "GROUP_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "qlit-test",
}

SLURM = {  # task 2 of 4 on the second node: `srun --nodes 2 --ntasks-per-node 2 qlit fit ...` in an sbatch script
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_NODELIST": "gpu-node[1-2]",
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NAME": "qlit-study",
}


def _clear_launchers(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*TORCHRUN, *SLURM, "SLURM_JOB_NAME", "SLURM_NNODES", "SLURM_STEP_NODELIST"]:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("env", "environment", "global_rank", "local_rank", "node_rank", "master"),
    [
        (TORCHRUN, "TorchElasticEnvironment", 3, 1, 1, "10.0.0.1"),
        (SLURM, "SLURMEnvironment", 2, 0, 1, "gpu-node1"),
    ],
    ids=["torchrun", "slurm"],
)
def test_a_multi_node_launch_is_read_from_the_environment(
    monkeypatch, tmp_path, env, environment, global_rank, local_rank, node_rank, master
) -> None:
    _clear_launchers(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cli = QlitCLI(args=cli_args(tmp_path, *ARGS), run=False)
    trainer = cli.trainer
    cluster = trainer.strategy.cluster_environment
    assert type(cluster).__name__ == environment
    assert (trainer.world_size, trainer.num_nodes, trainer.num_devices) == (4, 2, 2)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (global_rank, local_rank, node_rank)
    assert cluster.main_address == master
    assert not (tmp_path / "logs").exists()  # building the trainer starts no run


def test_without_a_launcher_each_node_would_think_it_is_alone(monkeypatch, tmp_path) -> None:
    """The contrast: no launcher environment, so the same command is one node's local processes."""
    _clear_launchers(monkeypatch)
    cli = QlitCLI(args=cli_args(tmp_path, *ARGS), run=False)
    assert type(cli.trainer.strategy.cluster_environment).__name__ == "LightningEnvironment"
    assert cli.trainer.node_rank == 0 and cli.trainer.global_rank == 0
