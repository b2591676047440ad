"""The training engine: Keras 3 on JAX, jitted, distributed with
keras.distribution (data and expert parallelism). Imports no TensorFlow.

* `training.settings`: `TrainingSettings`, the one training-settings type.
* `training.engine`: `Engine` (model, optimizer, mesh) and its loop, `train`.
* `training.step`: the jitted SPMD step (accumulation, AdamW, bias balancing).
* `training.metrics`: console lines, history, expert-balance summaries, timings.
* `training.checkpoint`: atomic, mesh-independent training checkpoints.
* `training.parallel`: the device mesh ("batch", "expert") and the sharding
  plan, read from the model's declaration (`model.sharding`).
* `training.optim`, `training.precision`, `training.seed`: schedule and AdamW,
  dtype policy, seeding.
* `training.token_stream`: training batches read in order from the worker's stdin.
* `training.launch` / `training.worker`: the child process the Trainer adapter starts.
"""
