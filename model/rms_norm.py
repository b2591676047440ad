"""RMSNorm as DeepSeek-V3 uses it (statistics in float32, learned scale)."""

import keras
from keras import ops

from .sharding import REPLICATED


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class RMSNorm(keras.layers.Layer):
    WEIGHT_AXES = {"scale": REPLICATED}  # the mesh layout (model.sharding)

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        dtype = x.dtype
        x32 = ops.cast(x, "float32")
        variance = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        normed = x32 * ops.rsqrt(variance + self.epsilon)
        return ops.cast(normed, dtype) * ops.cast(self.scale, dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
