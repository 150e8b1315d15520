"""Access to the compiled cffi module ``pykvm._binding``.

Why this exists: when the binding is missing (pykvm imported from a source
tree that was never built, or a broken install) the user should read how to
fix it, not a bare ImportError.
"""

from __future__ import annotations

try:
    from .._binding import ffi, lib  # noqa: F401  (re-exported)
except ImportError as exc:  # pragma: no cover - depends on how pykvm was installed
    raise ImportError(
        "pykvm's compiled binding (pykvm._binding) is missing. It is built at install time "
        "against <linux/kvm.h>: run `pip install -e .` (or `pip install .`) in the pykvm source "
        "tree, with a C compiler, binutils and the Python headers installed. If you did install "
        "it, you are probably importing an unbuilt source checkout: run from another directory "
        f"or install it in editable mode. ({exc})") from exc
