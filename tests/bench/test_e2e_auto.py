"""--spec auto: the planner measures the target on this device and picks a proposer (or plain decoding)."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from specq.bench.latency import auto_spec
from specq.bench.randmodel import build_random, config
from specq.engine import SpecEngine
from specq.generate import generate
from specq.sampling import SamplingParams
from specq.spec.eagle import EagleHead, EagleProposer, save_head
from specq.spec.factory import make_proposer_factory

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = build_random(config("tiny"), "bf16", "cpu", torch.float32)
    head = EagleHead(dataclasses.replace(model.cfg, num_layers=1))
    d = tmp_path_factory.mktemp("head")
    save_head(head, d, dtype=torch.float32)
    llm = SimpleNamespace(model=model, model_name="tiny", dtype=torch.float32, device=torch.device("cpu"))
    return llm, str(d)


def test_auto_spec_measures_and_ranks(tiny):
    llm, head = tiny
    c = auto_spec(llm, eagle_head=head, reps=1)
    names = [r["name"] for r in c["ranked"]]
    assert "none" in names and any(n.startswith("tree-") for n in names)
    assert c["choice"] == names[0]
    assert all(a["tok_s"] >= b["tok_s"] for a, b in zip(c["ranked"], c["ranked"][1:]))
    if c["spec"]["method"] == "eagle":
        assert c["spec"]["total_tokens"] == c["ranked"][0]["size"]


def test_factory_auto_uses_the_choice(tiny, monkeypatch):
    import specq.bench.latency as lat
    llm, head = tiny
    monkeypatch.setattr(lat, "auto_spec", lambda llm, **kw: {
        "spec": dict(method="eagle", total_tokens=10, depth=3, top_k=4, eagle_head=head), "choice": "tree-10",
        "ranked": [{"name": "tree-10", "tok_s": 1.0}], "profile": "x"})
    f = make_proposer_factory(llm, "auto", eagle_head=head)
    prop, _ = f(SamplingParams())
    assert isinstance(prop, EagleProposer) and prop.total_tokens == 10 and prop.depth == 3
    assert llm.spec_choice["choice"] == "tree-10"
    prompt = [1, 5, 9, 3]
    out, m = SpecEngine(llm.model, prop, SamplingParams(), seed=0).generate(prompt, 12)
    assert out == generate(llm.model, prompt, 12)          # lossless at T=0
    monkeypatch.setattr(lat, "auto_spec", lambda llm, **kw: {"spec": {"method": "none"}, "choice": "none",
                                                             "ranked": [{"name": "none", "tok_s": 1.0}], "profile": "x"})
    assert make_proposer_factory(llm, "auto") is None       # plain decoding


def test_cli_accepts_auto():
    from specq.cli import build_parser
    a = build_parser().parse_args(["generate", "--spec", "auto", "hi"])
    assert a.spec == "auto"
