"""The quickest honest demo of the model, without the pipeline: train a
preset on seeded Markov-chain tokens, print the loss falling toward the
data's known optimum, then generate a few tokens with the KV cache."""

from __future__ import annotations

import time

import numpy as np


def _router_bias_update(model):
    """Aux-loss-free balancing for `fit`: once per optimizer step, moves each
    MoE router bias by the load routed during that step (counter snapshot at
    batch begin, delta at batch end). The MoE forward never moves the bias."""
    import keras

    class RouterBiasUpdate(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.layers = [m for m in model.moe_layers() if m.config.bias_update_speed > 0]
            self._before = []

        def on_train_batch_begin(self, batch, logs=None):
            self._before = [np.asarray(keras.ops.convert_to_numpy(m.expert_load)) for m in self.layers]

        def on_train_batch_end(self, batch, logs=None):
            for moe, before in zip(self.layers, self._before):
                moe.apply_bias_update(np.asarray(keras.ops.convert_to_numpy(moe.expert_load)) - before)

    return RouterBiasUpdate()


def run_demo(preset: str = "mini", steps: int = 300, batch_size: int = 32, seq_len: int = 64,
             learning_rate: float = 3e-3, seed: int = 0, log_every: int = 25, print_fn=print) -> dict:
    import keras

    from data import DataSpec, optimal_loss
    from data import generate as generate_tokens
    from model import DeepSeekV3ForCausalLM, NextTokenLoss, generate, get_preset
    from training.settings import TrainingSettings

    config = get_preset(preset)
    spec = DataSpec("markov", vocab_size=config.vocab_size, seq_len=seq_len, seed=seed,
                    order=1, temperature=0.5)
    train = generate_tokens(spec, steps * batch_size // 4 + batch_size)
    held_out = generate_tokens(spec, 256, start_index=10_000_000)
    best = optimal_loss(spec)

    keras.utils.set_random_seed(seed)
    model = DeepSeekV3ForCausalLM(config)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=TrainingSettings.weight_decay),
                  loss=NextTokenLoss())
    initial = model.evaluate(held_out, held_out, batch_size=128, verbose=0)
    print_fn(f"{preset}: {model.count_params():,} parameters; markov data, "
             f"optimal loss {best:.3f} nats, uniform guess {np.log(config.vocab_size):.3f}")
    print_fn(f"step    0  eval loss {initial:.3f}")

    history = []

    class Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = batch + 1
            if step % log_every == 0 or step == steps:
                history.append((step, float(logs["loss"])))
                print_fn(f"step {step:4d}  train loss {logs['loss']:.3f}  "
                         f"({time.time() - start:.0f}s)")

    start = time.time()
    dataset = np.resize(train, (steps * batch_size, seq_len))
    model.fit(dataset, dataset, batch_size=batch_size, epochs=1, verbose=0,
              callbacks=[_router_bias_update(model), Progress()])
    final = model.evaluate(held_out, held_out, batch_size=128, verbose=0)
    print_fn(f"eval loss {initial:.3f} -> {final:.3f} (optimal {best:.3f}) in {time.time() - start:.0f}s")
    util = model.get_expert_utilization()
    for name, stats in util.items():
        print_fn(f"  {name}: expert load max/min {stats['max_min_ratio']:.2f}, cv {stats['cv']:.2f}")
    prompt = held_out[0, :8].tolist()
    out = generate(model, [prompt], 16)[0]
    print_fn(f"prompt {prompt} -> generated {out}")
    return {"initial_loss": initial, "final_loss": final, "optimal_loss": best, "history": history,
            "generated": out}
