"""netmon: watch every connect() on a Linux host with eBPF."""
from ._version import __version__

try:
    from . import _core
except ImportError as e:  # pragma: no cover - a broken install, not a runtime state
    raise ImportError(f"netmon's extension is not built ({e}); reinstall: pip install .") from e

if _core.__version__ != __version__:  # pragma: no cover
    raise ImportError(f"netmon._core is version {_core.__version__} but netmon is {__version__}: "
                      "a stale build; rebuild with: pip install --force-reinstall .")

from .event import Event  # noqa: E402
from .monitor import Monitor, MonitorError  # noqa: E402

__all__ = ["Event", "Monitor", "MonitorError", "__version__"]
