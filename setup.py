"""Package discovery (metadata lives in pyproject.toml).

Every ``hpx_analysis`` subpackage is found automatically, so a new one ships without editing a list. The Typer
app lives in the top-level ``cli/`` folder but installs as ``hpx_analysis_cli``: no generic top-level name in
site-packages, and ``hpx-analyze --help`` does not import torch through ``hpx_analysis``. The trained demo proxies
(``hpx_analysis/demo/proxies/*.safetensors``) and the C source of the native CPU kernels
(``hpx_analysis/models/native.c``, compiled on first use) ship as package data.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["hpx_analysis", "hpx_analysis.*"]) + ["hpx_analysis_cli"],
      package_dir={"hpx_analysis_cli": "cli"},
      package_data={"hpx_analysis.demo": ["proxies/*.safetensors"], "hpx_analysis.models": ["native.c"]})
