"""What the engine runs on: its interpreter and the versions of the libraries
that decide its numerics and speed (recorded in result.json and the
Trainer's training_summary.json)."""

from __future__ import annotations

import platform
import sys
from typing import Dict


def engine_environment() -> Dict[str, str]:
    """Python, JAX, jaxlib, Keras and numpy versions of this process."""
    import jax
    import jaxlib
    import keras
    import numpy as np

    return {"python": platform.python_version(), "executable": sys.executable,
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "keras": keras.__version__, "numpy": np.__version__}
