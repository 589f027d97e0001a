"""OpenAI-compatible HTTP server (standard library only): one loaded model, one request at a time (batch size 1,
the case specq is built for; later requests wait their turn).

    GET  /health                  {"status": "ok"}
    GET  /v1/models               the served model
    POST /v1/completions          prompt (string, or a list of token ids) -> text
    POST /v1/chat/completions     messages (chat template) -> assistant message
Both POST routes take max_tokens (or max_completion_tokens), temperature, top_p, top_k (an extension), stop
(string or list), seed, n (must be 1) and stream (server-sent events ending with "data: [DONE]").
Speculative decoding, quantization and compilation are the server's, chosen at start (`specq serve --help`);
output is what the quantized target alone would say. Bad requests get a 4xx with an OpenAI-style error object,
never a traceback.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import SpecqError
from .sampling import SamplingParams

MAX_BODY = 1 << 20          # bytes per request body
MAX_STOP = 4


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def _num(req: dict, key: str, default, lo=None, hi=None, integer=False):
    v = req.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise HTTPError(400, f"'{key}' must be {'an integer' if integer else 'a number'}{rng}, got {v!r}", param=key)
    return v


def parse_common(req: dict, model_name: str) -> dict:
    """Sampling / length / stream fields shared by both routes -> LLM.generate keyword arguments + stream flag."""
    if "model" in req and req["model"] not in (model_name, None):
        raise HTTPError(404, f"model {req['model']!r} is not served here (this server runs {model_name!r})",
                        "not_found_error", "model")
    n = _num(req, "n", 1, 1, integer=True)
    if n != 1:
        raise HTTPError(400, "only n = 1 is supported (one completion per request)", param="n")
    max_tokens = _num(req, "max_completion_tokens", None, 1, integer=True)
    max_tokens = max_tokens or _num(req, "max_tokens", 256, 1, integer=True)
    temperature = _num(req, "temperature", 1.0, 0.0, 2.0)
    top_p = _num(req, "top_p", 1.0, 0.0, 1.0)
    top_k = _num(req, "top_k", 0, 0, integer=True)
    seed = _num(req, "seed", None, integer=True)
    stop = req.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise HTTPError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", param="stop")
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise HTTPError(400, "'stream' must be true or false", param="stream")
    try:
        SamplingParams(float(temperature), top_k, float(top_p))
    except SpecqError as e:
        raise HTTPError(400, str(e)) from None
    return dict(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), top_k=top_k,
                seed=seed, stop=stop), stream


def parse_prompt(req: dict, vocab: int):
    p = req.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
        return p
    raise HTTPError(400, "'prompt' must be a non-empty string or a non-empty list of token ids in the vocabulary",
                    param="prompt")


def parse_messages(req: dict) -> list[dict]:
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise HTTPError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise HTTPError(400, "each message needs a role of system, user or assistant", param="messages")
        c = m.get("content")
        if isinstance(c, list):   # content parts: text only
            if not all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str) for x in c):
                raise HTTPError(400, "only text content parts are supported", param="messages")
            c = "".join(x["text"] for x in c)
        if not isinstance(c, str):
            raise HTTPError(400, "each message needs string content", param="messages")
        out.append({"role": m["role"], "content": c})
    return out


class App:
    """The routes, independent of the socket layer: handle(method, path, body, send_event) -> (status, object);
    send_event(obj) writes one server-sent event while a streamed completion runs."""

    def __init__(self, llm, model_name: str, stats: bool = False):
        self.llm, self.name, self.stats = llm, model_name, stats
        self.lock = threading.Lock()
        self.created = int(time.time())

    def handle(self, method: str, path: str, body: bytes, send_event=None):
        path = path.split("?", 1)[0].rstrip("/") or "/"
        routes = {"/health": "GET", "/v1/models": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST"}
        if path not in routes:
            raise HTTPError(404, f"no route {path!r} (routes: {', '.join(routes)})", "not_found_error")
        if method != routes[path]:
            raise HTTPError(405, f"{path} takes {routes[path]}, not {method}")
        if path == "/health":
            return 200, {"status": "ok"}
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                                     "owned_by": "specq"}]}
        try:
            req = json.loads(body or b"")
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(req, dict):
            raise HTTPError(400, "the body must be a JSON object")
        kw, stream = parse_common(req, self.name)
        chat = path.endswith("chat/completions")
        prompt = parse_messages(req) if chat else parse_prompt(req, self.llm.model.cfg.vocab_size)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def chunk(delta: dict | str, finish=None) -> dict:
            c = {"index": 0, "finish_reason": finish}
            c.update({"delta": delta} if chat else {"text": delta, "logprobs": None})
            return {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created, "model": self.name,
                    "choices": [c]}

        on_text = None
        if stream:
            if send_event is None:
                raise HTTPError(400, "streaming is not available on this connection", param="stream")
            send_event(chunk({"role": "assistant", "content": ""} if chat else ""))
            on_text = lambda s: send_event(chunk({"content": s} if chat else s))  # noqa: E731
        with self.lock:
            try:
                out = (self.llm.chat(prompt, on_text=on_text, **kw) if chat
                       else self.llm.generate(prompt, on_text=on_text, **kw))
            except SpecqError as e:           # e.g. a prompt longer than the context
                raise HTTPError(400, str(e)) from None
        if self.stats:
            tau = out.metrics.get("tau")
            print(f"specq serve: {len(out.ids)} tokens in {out.seconds:.2f}s ({out.tok_s:.1f} tok/s" +
                  (f", tau {tau:.2f})" if tau else ")"), file=sys.stderr, flush=True)
        usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": len(out.ids),
                 "total_tokens": out.prompt_tokens + len(out.ids)}
        if stream:
            last = chunk({} if chat else "", out.finish_reason)
            last["usage"] = usage
            send_event(last)
            return 200, None
        choice = {"index": 0, "finish_reason": out.finish_reason}
        choice.update({"message": {"role": "assistant", "content": out.text}} if chat
                      else {"text": out.text, "logprobs": None})
        return 200, {"id": rid, "object": obj, "created": created, "model": self.name, "choices": [choice],
                     "usage": usage}


class Handler(BaseHTTPRequestHandler):
    app: App = None                 # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"
    quiet = False

    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write(f"specq serve: {self.address_string()} {fmt % args}\n")

    def _json(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        n = self.headers.get("Content-Length")
        if n is None:
            if self.headers.get("Transfer-Encoding"):
                raise HTTPError(411, "send a Content-Length (chunked bodies are not supported)")
            return b""
        try:
            n = int(n)
        except ValueError:
            raise HTTPError(400, f"bad Content-Length {n!r}") from None
        if n < 0 or n > MAX_BODY:
            raise HTTPError(413, f"request body of {n} bytes (at most {MAX_BODY})")
        return self.rfile.read(n)

    def _run(self, method: str):
        started = {"sse": False}

        def send_event(obj):
            if not started["sse"]:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                started["sse"] = True
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        try:
            body = self._body() if method == "POST" else b""
            status, obj = self.app.handle(method, self.path, body, send_event)
            if started["sse"]:
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True
            else:
                self._json(status, obj)
        except (BrokenPipeError, ConnectionResetError):   # the client went away mid-stream
            self.close_connection = True
        except HTTPError as e:
            self._error(e, started["sse"])
        except Exception as e:  # noqa: BLE001 - one line, not a traceback
            self.log_message("internal error: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self._error(HTTPError(500, f"internal error: {type(e).__name__}", "server_error"), started["sse"])

    def _error(self, e: HTTPError, in_stream: bool):
        try:
            if in_stream:                     # headers are gone: report inside the stream
                self.wfile.write(b"data: " + json.dumps(e.body()).encode() + b"\n\ndata: [DONE]\n\n")
                self.close_connection = True
            else:
                self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self):
        self._run("GET")

    def do_POST(self):
        self._run("POST")

    def do_PUT(self):
        self._run("PUT")

    def do_DELETE(self):
        self._run("DELETE")


def make_server(llm, model_name: str, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False,
                stats: bool = False):
    """A ThreadingHTTPServer serving llm (port 0: any free port; server.server_address has it); stats: one line
    per request on stderr (tokens, tok/s, tau)."""
    handler = type("SpecqHandler", (Handler,), {"app": App(llm, model_name, stats), "quiet": quiet})
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise SpecqError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
