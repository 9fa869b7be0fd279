"""ssmlab.core: the shared PyTorch library of the SSM course.

`backends()` says which implementations can run here; every fast path has a
readable `*_ref` twin with the same signature.
"""

from ssmlab.core.native import BackendUnavailableError, available_backends, backends, describe
from ssmlab.core.scan import linear_scan, linear_scan_blelloch, linear_scan_ref

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "backends",
    "describe",
    "linear_scan",
    "linear_scan_blelloch",
    "linear_scan_ref",
]
