"""dcn_fast: fast structured-receptive-field convolutions for Deep Continuous Networks."""

from . import functional
from .basis import MAX_RADIUS, num_basis, srf_taps
from .drop_in import Conversion, convert_model, export_model, format_report
from .fit import SRFFit, fit_srf
from .functional import SRFCall, plan_srf_conv2d, srf_conv2d, srf_taps_for
from .modules import SRFConv2d
from .reference import srf_conv2d_reference, srf_filters_reference

__version__ = "0.1.0"

__all__ = [
    "MAX_RADIUS",
    "Conversion",
    "SRFCall",
    "SRFConv2d",
    "SRFFit",
    "convert_model",
    "export_model",
    "fit_srf",
    "format_report",
    "functional",
    "num_basis",
    "plan_srf_conv2d",
    "srf_conv2d",
    "srf_conv2d_reference",
    "srf_filters_reference",
    "srf_taps",
    "srf_taps_for",
]
