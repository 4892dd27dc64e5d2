"""The ``hpx-analyze`` command line (installed as ``hpx_analysis_cli``): a thin layer over the library."""
