"""main.py starts the distributed runtime where JAX's own cluster detection finds more than
one process: simulated here by the environment variables a SLURM job or a GKE TPU pod sets."""

import os

import pytest

import main

SLURM = {
  'SLURM_JOB_ID': '4242',
  'SLURM_STEP_NODELIST': 'node[001-002]',
  'SLURM_PROCID': '0',
  'SLURM_LOCALID': '0',
}


@pytest.fixture
def bare_environment(monkeypatch):
  """No cluster variables at all (the test machine may run under one)."""
  for name in list(os.environ):
    if name.startswith(('SLURM_', 'OMPI_', 'TPU_', 'MEGASCALE_', 'KUBERNETES_')):
      monkeypatch.delenv(name)
  return monkeypatch


def test_no_cluster_on_a_plain_machine(bare_environment):
  assert main.multi_process_cluster() is None


def test_a_slurm_job_of_two_tasks_is_a_cluster_and_one_task_is_not(bare_environment):
  for name, value in SLURM.items():
    bare_environment.setenv(name, value)
  bare_environment.setenv('SLURM_NTASKS', '2')
  assert main.multi_process_cluster() == 'SlurmCluster'
  bare_environment.setenv('SLURM_NTASKS', '1')
  assert main.multi_process_cluster() is None


def test_a_gke_tpu_pod_is_a_cluster(bare_environment):
  bare_environment.setenv('TPU_WORKER_HOSTNAMES', 'host-0,host-1')
  assert main.multi_process_cluster() == 'GkeTpuCluster'
  bare_environment.setenv('TPU_WORKER_HOSTNAMES', 'host-0')
  assert main.multi_process_cluster() is None
