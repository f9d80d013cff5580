"""Tests of cluster execution: the SLURM profile at scale (dry run) and on a real scheduler."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cluster: needs a running SLURM cluster (as root on Debian: tests/cluster/slurm.sh up)")
