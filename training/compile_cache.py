"""JAX's persistent compilation cache for the engine.

The engine compiles its step in every run (tiny model: ~6 s of a 12 s
Trainer on 2 cores; mini: more). A rerun of the same model, batch and mesh
(a cached pipeline rerun that retrains, a resumed pod, the tests' many tiny
runs) finds the executable on disk instead. The cache is keyed by JAX on the
HLO, the compile options, the backend and the jaxlib version, so a changed
model or mesh compiles anew and a stale entry is never used.

$DEEPSEEK_TFX_JAX_CACHE: the directory (default
~/.cache/deepseek-tfx/jax-compilation); `off` disables the cache.
"""

from __future__ import annotations

import os
from typing import Optional

CACHE_ENV = "DEEPSEEK_TFX_JAX_CACHE"
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
           "/jax/compilation_cache/cache_misses": "misses"}
_STATS = {"dir": None, "hits": 0, "misses": 0}
DEFAULT_DIR = os.path.join("~", ".cache", "deepseek-tfx", "jax-compilation")


def cache_dir(env=None) -> Optional[str]:
    """The cache directory the environment asks for, or None (disabled)."""
    env = os.environ if env is None else env
    value = env.get(CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    return os.path.abspath(os.path.expanduser(value or DEFAULT_DIR))


def enable(env=None) -> Optional[str]:
    """Points JAX at the cache directory (before the first compile); returns
    it, or None when disabled or the directory cannot be created (then the
    engine compiles as without a cache)."""
    path = cache_dir(env)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    # Every executable that took over a second to compile; the small helper
    # jits compile in milliseconds and are not worth a file.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _STATS["dir"] = path

    def count(event: str, **kwargs) -> None:
        if event in _EVENTS:
            _STATS[_EVENTS[event]] += 1

    jax.monitoring.register_event_listener(count)
    return path


def stats() -> dict:
    """{"dir": the cache directory or None, "hits": executables read from
    it, "misses": looked up and compiled} for this process so far."""
    return dict(_STATS)
