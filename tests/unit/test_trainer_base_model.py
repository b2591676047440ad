"""The Trainer's `base_model` input (components.trainer.base_model_of): TFX
hands `<artifact uri>/Format-Serving`, an imported checkpoint directory is
the uri itself; a directory that cannot fill the model's weights stops
the Trainer before any data is read."""

import os
import shutil
import types

import pytest

from model.base_model import BaseModel
from model.safetensors_io import load_file, save_file

BASELINE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf", "baseline")


def test_the_imported_directory_is_found_from_tfxs_serving_path_and_checked(tmp_path):
    from components.trainer import TrainerConfigError, base_model_of

    base = BaseModel.read(BASELINE)
    config = base.model_config()
    found = base_model_of(types.SimpleNamespace(base_model=os.path.join(BASELINE, "Format-Serving")), config)
    assert (found.path, found.identity) == (base.path, base.identity)
    assert base_model_of(types.SimpleNamespace(base_model=None), config) is None

    broken = tmp_path / "broken"
    shutil.copytree(BASELINE, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(TrainerConfigError, match=r"^base_model: .*broken: the safetensors lack 1 tensor.*lm_head"):
        base_model_of(types.SimpleNamespace(base_model=str(broken / "Format-Serving")), config)
    with pytest.raises(TrainerConfigError, match=r"the safetensors lack .*model\.layers\.2\."):
        base_model_of(types.SimpleNamespace(base_model=str(BASELINE)), config.replace(num_hidden_layers=3))
