"""Lowering exported programs with AOTInductor into NativeRT pt2 archives.

The only package of the app that imports torch; only the sandboxed child imports it.
"""

from app.lowering.cachedir import use_cache_dir, warm_up
from app.lowering.pipeline import LoweringResult, run_lowering
from app.lowering.prime import prime
from app.lowering.toolchain import probe_toolchain
from app.lowering.verify import verify_archive

__all__ = ["LoweringResult", "prime", "probe_toolchain", "run_lowering", "use_cache_dir",
           "verify_archive", "warm_up"]
