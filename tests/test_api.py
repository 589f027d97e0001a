"""Python API: speculative methods through the factory give the plain greedy output; stop strings; errors."""
import pytest

from specq.api import LLM
from specq.errors import SpecqError
from tests.models.test_hf import make_ckpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_ckpt(tmp_path_factory.mktemp("api"), "llama")[1])


def test_spec_methods_match_plain(ckpt):
    prompt = "w1 w2 w3 w1 w2 w3 w1 w2"
    plain = LLM(ckpt).generate(prompt, max_new_tokens=24)
    for spec in ({"method": "ngram", "k": 3}, {"method": "draft", "k": 3}, {"method": "multi", "k": 2, "n_drafts": 2}):
        out = LLM(ckpt, spec=spec).generate(prompt, max_new_tokens=24)
        assert out.ids == plain.ids, spec
        assert out.metrics["tau"] >= 1.0


def test_quantized_target_with_spec_matches_quantized_plain(ckpt):
    q = {"fmt": "w4a16", "method": "rtn", "group_size": 32}
    plain = LLM(ckpt, quant=q).generate("w4 w5 w6", max_new_tokens=16)
    out = LLM(ckpt, quant=q, spec={"method": "ngram"}).generate("w4 w5 w6", max_new_tokens=16)
    assert out.ids == plain.ids


def test_stop_string_and_errors(ckpt):
    llm = LLM(ckpt)
    full = llm.generate("w7 w8", max_new_tokens=10)
    words = full.text.split()
    if len(words) >= 3:
        cut = llm.generate("w7 w8", max_new_tokens=10, stop=[words[2]])
        assert words[2] not in cut.text and cut.finish_reason == "stop"
    with pytest.raises(SpecqError):
        llm.generate("w1", temperature=-0.5)
    with pytest.raises(SpecqError):
        LLM(ckpt, spec={"method": "eagle"})  # no bundled head for this model
    with pytest.raises(SpecqError):
        LLM(ckpt, compensate="k=0.01")       # compensation needs a quantized target
