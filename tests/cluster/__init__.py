"""The project's emulated cluster for tests and benchmarks (not a user command): hosts as network
namespaces, one user-space switch with per-link delay and rate, mpirun across them by hostfile."""

from tests.cluster.netns import Cluster, sweep_leftovers, unavailable

__all__ = ["Cluster", "sweep_leftovers", "unavailable"]
