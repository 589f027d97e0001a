"""OpenAI-compatible server over a real socket with a tiny checkpoint: completions and chat equal the Python API's
greedy output, streaming deltas add up to the same text, speculative serving stays lossless, and bad requests get
4xx errors with an OpenAI-style error object."""
import http.client
import json
import re
import threading

import pytest

from specq.api import LLM
from specq.server import make_server
from tests.models.test_hf import make_ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    _, d = make_ckpt(tmp_path_factory.mktemp("srv"), "llama")
    return d


def start(llm, name="tiny"):
    srv = make_server(llm, name, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def server(ckpt):
    llm = LLM(str(ckpt), device="cpu")
    srv = start(llm)
    yield llm, srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def call(port, method, path, body=None, raw=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    c.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    return r.status, r.getheader("Content-Type"), text


def sse(text):
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_and_health(server):
    _, port = server
    st, _, t = call(port, "GET", "/v1/models")
    assert st == 200 and [m["id"] for m in json.loads(t)["data"]] == ["tiny"]
    assert call(port, "GET", "/health")[0] == 200


def test_completion_equals_api(server):
    llm, port = server
    want = llm.generate("w3 w4 w5", max_new_tokens=6, temperature=0.0)
    st, ctype, t = call(port, "POST", "/v1/completions",
                        {"model": "tiny", "prompt": "w3 w4 w5", "max_tokens": 6, "temperature": 0})
    assert st == 200 and ctype == "application/json"
    r = json.loads(t)
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == want.text
    assert r["choices"][0]["finish_reason"] == want.finish_reason
    assert r["usage"] == {"prompt_tokens": want.prompt_tokens, "completion_tokens": len(want.ids),
                          "total_tokens": want.prompt_tokens + len(want.ids)}
    ids = llm.tok.encode("w3 w4 w5")                       # a token-id prompt gives the same answer
    st, _, t = call(port, "POST", "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0})
    assert st == 200 and json.loads(t)["choices"][0]["text"] == want.text


def test_chat_and_stream(server):
    llm, port = server
    msgs = [{"role": "system", "content": "w7"}, {"role": "user", "content": "w1 w2"}]
    want = llm.chat(msgs, max_new_tokens=8, temperature=0.0)
    st, _, t = call(port, "POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 8, "temperature": 0})
    r = json.loads(t)
    assert st == 200 and r["object"] == "chat.completion"
    assert r["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    st, ctype, t = call(port, "POST", "/v1/chat/completions",
                        {"messages": msgs, "max_tokens": 8, "temperature": 0, "stream": True})
    assert st == 200 and ctype == "text/event-stream"
    ev = sse(t)
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in ev) == want.text
    assert ev[-1]["choices"][0]["finish_reason"] == want.finish_reason and ev[-1]["usage"]["completion_tokens"] == len(want.ids)
    st, _, t = call(port, "POST", "/v1/completions", {"prompt": "w3 w4", "max_tokens": 5, "temperature": 0,
                                                       "stream": True})
    assert "".join(e["choices"][0]["text"] for e in sse(t)) == llm.generate("w3 w4", max_new_tokens=5,
                                                                             temperature=0.0).text


@pytest.mark.parametrize("method,path,body,status,param", [
    ("POST", "/v1/completions", b"{not json", 400, None),
    ("POST", "/v1/completions", [1, 2], 400, None),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": [99999]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "w1", "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "w1", "top_p": 1.5}, 400, "top_p"),
    ("POST", "/v1/completions", {"prompt": "w1", "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "w1", "max_tokens": "5"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "w1", "n": 2}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": "w1", "stop": 5}, 400, "stop"),
    ("POST", "/v1/completions", {"prompt": "w1", "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/completions", {"prompt": "w1", "model": "gpt-4"}, 404, "model"),
    ("POST", "/v1/completions", {"prompt": " ".join(["w5"] * 300)}, 400, None),   # longer than the context (256)
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    ("GET", "/v1/completions", None, 405, None),
    ("POST", "/v1/nothing", {}, 404, None),
])
def test_bad_requests(server, method, path, body, status, param):
    _, port = server
    raw = body if isinstance(body, bytes) else None
    st, ctype, t = call(port, method, path, None if raw else body, raw=raw)
    assert st == status and ctype == "application/json", t
    err = json.loads(t)["error"]
    assert err["code"] == status and err["message"] and "Traceback" not in t
    assert err["param"] == param


def test_oversized_body_and_server_survives(server):
    _, port = server
    st, _, t = call(port, "POST", "/v1/completions", raw=b"{}", headers={"Content-Length": str(10 ** 9)})
    assert st == 413 and "at most" in json.loads(t)["error"]["message"]
    assert call(port, "GET", "/health")[0] == 200


def test_speculative_server_is_lossless(ckpt):
    """Served with a draft chain (n-gram): greedy output equals plain greedy decoding of the same model."""
    plain = LLM(str(ckpt), device="cpu")
    spec = LLM(str(ckpt), device="cpu", spec=dict(method="ngram", k=3))
    srv = start(spec)
    try:
        port = srv.server_address[1]
        for prompt in ("w3 w4 w3 w4 w3", "w9 w8 w7"):
            st, _, t = call(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0})
            assert st == 200
            assert json.loads(t)["choices"][0]["text"] == plain.generate(prompt, max_new_tokens=12, temperature=0.0).text
    finally:
        srv.shutdown()
        srv.server_close()


def test_cli_serve_bad_port(capsys):
    from specq.cli import main
    assert main(["serve", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "invalid --port" in err and err.count("\n") == 1


def test_concurrent_requests_and_client_gone(server):
    """Requests run one at a time behind a lock: concurrent clients all get the greedy answer; a client that
    hangs up mid-stream leaves the server serving."""
    llm, port = server
    want = llm.generate("w2 w6", max_new_tokens=10, temperature=0.0).text
    got = []

    def one():
        got.append(json.loads(call(port, "POST", "/v1/completions",
                                   {"prompt": "w2 w6", "max_tokens": 10, "temperature": 0})[2])["choices"][0]["text"])
    ts = [threading.Thread(target=one) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == [want] * 4
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/v1/completions", body=json.dumps({"prompt": "w2", "max_tokens": 200, "stream": True}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    r.fp.read(10)
    r.close()                                          # hang up mid-stream
    c.close()
    assert call(port, "GET", "/health")[0] == 200
    st, _, t = call(port, "POST", "/v1/completions", {"prompt": "w2 w6", "max_tokens": 10, "temperature": 0})
    assert st == 200 and json.loads(t)["choices"][0]["text"] == want


def test_stats_line(ckpt, capsys):
    llm = LLM(str(ckpt), device="cpu", spec=dict(method="ngram", k=3))
    srv = make_server(llm, "tiny", "127.0.0.1", 0, quiet=True, stats=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert call(srv.server_address[1], "POST", "/v1/completions", {"prompt": "w3 w4 w3", "max_tokens": 6, "temperature": 0})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
    err = capsys.readouterr().err
    assert re.search(r"specq serve: \d+ tokens in [0-9.]+s \([0-9.]+ tok/s, tau [0-9.]+\)", err), err


def test_cli_serve_port_in_use(ckpt, capsys):
    import socket
    from specq.cli import main
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        rc = main(["serve", "--model", str(ckpt), "--device", "cpu", "--port", str(s.getsockname()[1])])
    finally:
        s.close()
    err = capsys.readouterr().err
    assert rc == 2 and "cannot listen on" in err and err.count("\n") == 1 and "Traceback" not in err
