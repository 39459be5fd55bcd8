import pytest

from neuqi.errors import ModelError
from neuqi.pipeline import models


def test_parse_dtype():
    import torch

    assert models.parse_dtype("bf16") is torch.bfloat16 and models.parse_dtype(None) is None
    with pytest.raises(ModelError, match="unknown dtype"):
        models.parse_dtype("float8")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load model"):
        models.load_model("no-such-org/no-such-model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        models.load_model(str(tmp_path / "missing.gguf"))


@pytest.mark.slow
def test_demo_model_loads_offline():
    model, tokenizer = models.load_model(None)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert len(tokenizer("hello world")["input_ids"]) >= 2
