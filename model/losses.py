"""Next-token cross-entropy for `model.compile(loss=...)`: the labels are the
input ids themselves; position i's logits are scored against token i+1."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class NextTokenLoss(keras.losses.Loss):
    def __init__(self, name="next_token_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        targets = ops.cast(y_true, "int32")[:, 1:]
        logits = ops.cast(y_pred, "float32")[:, :-1]
        return keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
