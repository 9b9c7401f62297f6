"""dcn_fast: fast structured-receptive-field convolutions for Deep Continuous Networks."""

from . import functional
from .basis import MAX_RADIUS, num_basis, srf_taps
from .functional import srf_conv2d, srf_taps_for
from .modules import SRFConv2d
from .reference import srf_conv2d_reference, srf_filters_reference

__version__ = "0.1.0"

__all__ = [
    "MAX_RADIUS",
    "SRFConv2d",
    "functional",
    "num_basis",
    "srf_conv2d",
    "srf_conv2d_reference",
    "srf_filters_reference",
    "srf_taps",
    "srf_taps_for",
]
