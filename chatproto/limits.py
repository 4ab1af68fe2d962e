"""
Kept only for old imports: the open-files limit helper is
L{chatproto.common.rlimits}, shared with the balancer.  Delete this module
once nothing imports C{chatproto.limits} (tests/test_units.py does).
"""

from chatproto.common.rlimits import raiseOpenFilesLimit

__all__ = ["raiseOpenFilesLimit"]
