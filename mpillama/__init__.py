"""mpillama: tensor-parallel LLM inference over MPI, with numba kernels and HDF5 traces."""

__version__ = "0.1.0"
