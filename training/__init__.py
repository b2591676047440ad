"""The training engine: Keras 3 on JAX, jitted, distributed with
keras.distribution (data and expert parallelism). Imports no TensorFlow.

* `training.optim`: the warmup-cosine schedule and AdamW.
* `training.parallel`: the device mesh ("batch", "expert") and the sharding plan.
* `training.checkpoint`: atomic, mesh-independent training checkpoints.
* `training.engine`: the jitted step and the training loop.
* `training.token_stream`: training batches read in order from the worker's stdin.
* `training.worker`: the child-process entry point the Trainer adapter starts.
"""
