"""zreg: content-addressed model registry, packaging toolchain and thin MLX runtime.

The code lives in three sibling folders installed as subpackages:
``zreg.registry`` (registry/), ``zreg.runtime`` (runtime/) and ``zreg.cli`` (cli/).
"""

__version__ = "0.1.0"
