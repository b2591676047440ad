"""The model declares its own mesh layout (model.sharding): every weight is
covered, the routed experts (and only they) shard on "expert", and a weight
nobody declared is an error, not a silent replica."""

import pytest

from model import DeepSeekV3ForCausalLM, get_preset
from model.moe import DeepSeekMoE
from model.sharding import EXPERT, REPLICATED, ShardingError, weight_axes

pytestmark = [pytest.mark.unit, pytest.mark.model]


@pytest.mark.parametrize("float8", [False, True])
def test_every_weight_is_declared_and_only_routed_experts_shard(float8):
    config = get_preset("tiny")
    model = DeepSeekV3ForCausalLM(config)
    if float8:  # the quantized Dense layers' scales are weights too
        model.quantize("float8")
    axes = weight_axes(model)
    assert sorted(axes) == sorted(v.path for v in model.weights)
    sharded = {path: spec for path, spec in axes.items() if spec != REPLICATED}
    routed = [v for v in model.weights if v.path.rsplit("/", 1)[1].startswith("experts_")]
    assert routed and sorted(sharded) == sorted(v.path for v in routed)
    for v in routed:
        assert v.shape[0] == config.n_routed_experts and sharded[v.path] == (EXPERT, None, None)


def test_a_weight_nobody_declared_is_refused_naming_it():
    class MoEWithExtra(DeepSeekMoE):
        def build(self, input_shape):
            super().build(input_shape)
            self.extra = self.add_weight(name="extra", shape=(3,), initializer="zeros")

    config = get_preset("tiny")
    layer = MoEWithExtra(config, name="moe")
    layer.build((None, None, config.hidden_size))
    plain = DeepSeekMoE(config, name="plain")
    plain.build((None, None, config.hidden_size))
    assert weight_axes(plain)["plain/experts_up_proj"] == (EXPERT, None, None)
    with pytest.raises(ShardingError, match=r"moe/extra: MoEWithExtra declares no mesh layout for weight 'extra'"):
        weight_axes(layer)
