import numpy as np
import pytest
import torch
from transformers import Gemma3Config, LlamaConfig

from sharq._checks import as_count, check_count, position_limit, repeated


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3), torch.tensor(3)])
def test_integers_of_every_kind_count(value):
    assert as_count(value) == 3 and type(check_count("n", value)) is int


@pytest.mark.parametrize("value", [True, 3.0, "3", None, np.float32(3), [3]])
def test_non_integers_do_not_count(value):
    assert as_count(value) is None
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got"):
        check_count("n", value)


def test_a_count_below_its_least_is_refused_with_the_least():
    assert check_count("max_tokens", 2, least=2) == 2
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 2, got 1"):
        check_count("max_tokens", 1, least=2)


def test_repeated_names_the_first_item_given_again():
    assert repeated(["a", "b", "c"]) is None and repeated([]) is None
    assert repeated(("a", "b", "c", "b", "a")) == "b"


def test_position_limit_is_the_text_models():
    assert position_limit(LlamaConfig(max_position_embeddings=777)) == 777
    multimodal = Gemma3Config(text_config={"max_position_embeddings": 555})
    assert position_limit(multimodal) == 555
    assert position_limit(object()) is None
