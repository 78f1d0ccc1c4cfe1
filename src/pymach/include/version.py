"""The pymach version: the kernel reports it (host_kernel_version); `pymach.__version__`."""

__version__ = "0.1.0"
