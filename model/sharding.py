"""Where the model's weights live on the training mesh, declared by the layers
that create them.

Every layer class that creates weights names, per weight, the mesh axis each
dimension shards on (`WEIGHT_AXES = {weight name: (axis or None, ...)}`,
`REPLICATED` for a full copy on every device); Keras' own layers are declared
here (`KERAS_LAYER_AXES`, `ALL` for every weight of the layer, float8 scales
included). The routed experts' weights [E, ...] shard on `EXPERT` (expert
parallelism, DeepSeek-V3 sec. 3.2); everything else is replicated (data
parallelism). `weight_axes(model)` reads the declaration of every weight and
refuses one nobody declared, so a new weight never becomes a silent replica.
The distribution plan (`training.parallel`) lays the weights out from it.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

Axes = Tuple[Optional[str], ...]

#: The mesh axes (training.parallel builds the mesh with these names).
BATCH, EXPERT = "batch", "expert"
REPLICATED: Axes = ()
ALL = "*"


class ShardingError(ValueError):
    """A weight with no declared layout, or a declaration that does not fit it."""


def _keras_layer_axes() -> dict:
    import keras

    return {keras.layers.Dense: {ALL: REPLICATED}, keras.layers.EinsumDense: {ALL: REPLICATED},
            keras.layers.Embedding: {ALL: REPLICATED}}


def _declaration(layer, keras_axes: dict) -> Optional[dict]:
    for cls in type(layer).__mro__:
        if "WEIGHT_AXES" in vars(cls):
            return vars(cls)["WEIGHT_AXES"]
        if cls in keras_axes:
            return keras_axes[cls]
    return None


def weight_axes(model) -> Dict[str, Axes]:
    """{variable path: per-dimension mesh axis (None: not split)} for every
    weight of `model` (a built Keras model); REPLICATED is ()."""
    keras_axes = _keras_layer_axes()
    layers = {layer.path: layer for layer in model._flatten_layers(include_self=True)}
    axes: Dict[str, Axes] = {}
    for variable in model.weights:
        owner_path, _, name = variable.path.rpartition("/")
        layer = layers.get(owner_path)
        declared = _declaration(layer, keras_axes) if layer is not None else None
        if declared is None or (name not in declared and ALL not in declared):
            owner = type(layer).__name__ if layer is not None else "no layer"
            raise ShardingError(f"{variable.path}: {owner} declares no mesh layout for weight "
                                f"{name!r} (add it to {owner}.WEIGHT_AXES)")
        spec = tuple(declared.get(name, declared.get(ALL)))
        if spec and len(spec) != len(variable.shape):
            raise ShardingError(f"{variable.path}: declared axes {spec} do not fit its shape "
                                f"{tuple(variable.shape)}")
        axes[variable.path] = spec
    return axes
