"""Next-token cross-entropy for `model.compile(loss=...)`: the labels are the
input ids themselves; position i's logits are scored against token i+1.

Plain id batches (what the Trainer and the demo feed `fit`) have no padding.
For padded batches pass `y` = the ids and `sample_weight` =
padding_mask[:, 1:] * padding_mask[:, :-1] (real target after a real position,
[B, S-1]) with `reduction="mean_with_sample_weight"`, so pad
targets are ignored and the mean is over real targets; a dict y
{"token_ids", "padding_mask"} does the same without a sample weight.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="deepseek_tfx")
class NextTokenLoss(keras.losses.Loss):
    def __init__(self, name="next_token_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        if isinstance(y_true, dict):
            ids, padding_mask = y_true["token_ids"], y_true.get("padding_mask")
        else:
            ids, padding_mask = y_true, None
        targets = ops.cast(ids, "int32")[:, 1:]
        logits = ops.cast(y_pred, "float32")[:, :-1]
        loss = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        if padding_mask is None:
            return loss
        # Per-token losses of pad targets become 0 and the rest are rescaled
        # so the batch mean is the mean over real targets.
        # A target counts when it and the position predicting it are real.
        pm = ops.cast(padding_mask, "float32")
        m = pm[:, 1:] * pm[:, :-1]
        return loss * m * ops.cast(ops.size(m), "float32") / ops.maximum(ops.sum(m), 1.0)
