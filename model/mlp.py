"""The SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

import keras
from keras import ops

from .config import DeepSeekV3Config


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class SwiGLUMLP(keras.layers.Layer):
    def __init__(self, config: DeepSeekV3Config, intermediate_size: int, **kwargs):
        super().__init__(**kwargs)
        init = keras.initializers.RandomNormal(stddev=config.initializer_range)
        self.intermediate_size = intermediate_size
        self.gate_proj = keras.layers.Dense(intermediate_size, use_bias=False,
                                            kernel_initializer=init, name="gate_proj")
        self.up_proj = keras.layers.Dense(intermediate_size, use_bias=False,
                                          kernel_initializer=init, name="up_proj")
        self.down_proj = keras.layers.Dense(config.hidden_size, use_bias=False,
                                            kernel_initializer=init, name="down_proj")

    def build(self, input_shape):
        self.gate_proj.build((None, input_shape[-1]))
        self.up_proj.build((None, input_shape[-1]))
        self.down_proj.build((None, self.intermediate_size))

    def call(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))
