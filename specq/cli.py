"""`specq` command line. Every user error ends in one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import SpecqError

SPEC_METHODS = ["none", "auto", "draft", "ngram", "eagle", "hier", "multi"]
VERIFY_METHODS = ["auto", "greedy", "sampling", "rrs", "rrs-wo", "spechub", "target"]


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2",
                   help="HF model directory (config.json + safetensors + tokenizer.json), a .gguf file, a specq "
                        "quantized directory, or 'smollm2' (the embedded SmolLM2-135M-Instruct; default)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (GPU when present; default)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)")


def add_quant_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("quantization (applied on load; see also `specq quantize`)")
    g.add_argument("--format", default="none", choices=["none", "w4a16", "w3a16", "w2a16", "w8a8", "w4a8"],
                   help="quantize the target's linear layers to this format on load (default none)")
    g.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq", "awq_gptq", "smoothquant"],
                   help="calibration method (default rtn; smoothquant for w8a8/w4a8)")
    g.add_argument("--group-size", type=int, default=128, help="weight group size; -1 = per output channel (default 128; "
                   "where it does not divide a layer's input size, the largest smaller group that does is used)")
    g.add_argument("--quant-lm-head", action="store_true",
                   help="also quantize lm_head (RTN, weight-only formats; as gpt-fast int4 does); default: lm_head "
                        "stays in the compute dtype")
    from .compensate.tune import add_compensate_arg
    add_compensate_arg(g)


def add_sampling_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0 = off, default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off, default)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: random)")
    g.add_argument("--stop", action="append", default=[], help="stop string; may be given several times")


def add_spec_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("speculative decoding (lossless: output equals the target's)")
    g.add_argument("--spec", default="none", choices=SPEC_METHODS,
                   help="proposer: none (plain decoding), draft (a draft model's chain), ngram (prompt lookup), "
                        "eagle (EAGLE-2 dynamic tree), hier (EAGLE tree -> intermediate model -> chain), "
                        "multi (several sampled draft chains verified jointly), auto (the planner measures this "
                        "model's forward time vs tokens on this device and picks the EAGLE tree size, draft chain "
                        "length or plain decoding with the best expected tokens/s)")
    g.add_argument("--verify", default="auto", choices=VERIFY_METHODS,
                   help="verifier: greedy (T=0), sampling (speculative sampling), rrs / rrs-wo (recursive rejection "
                        "sampling with / without replacement), spechub (2 drafts, hub token), target (drafts without "
                        "probabilities); auto picks greedy at T=0 and the method's lossless default otherwise")
    g.add_argument("--draft-model", default=None, help="draft model for --spec draft/multi (same tokenizer); "
                                                      "default: a 4-bit RTN copy of the target")
    g.add_argument("--intermediate", default=None, help="intermediate model for --spec hier (default: the target itself, un-quantized)")
    g.add_argument("--eagle-head", default=None, help="EAGLE head directory (default: the bundled head for smollm2)")
    g.add_argument("--draft-len", type=int, default=5, help="draft chain length k for draft/ngram/multi (default 5)")
    g.add_argument("--n-drafts", type=int, default=2, help="drafts per position for --spec multi (default 2)")
    g.add_argument("--tree-top-k", type=int, default=16, help="EAGLE-2 tree: children per expanded node (default 16)")
    g.add_argument("--tree-depth", type=int, default=5, help="EAGLE-2 tree: expansion steps (default 5)")
    g.add_argument("--tree-tokens", type=int, default=80, help="EAGLE-2 tree: total draft tokens kept (default 80)")
    g.add_argument("--min-draft-length", type=int, default=6, help="hier: linear draft length the intermediate builds (default 6)")
    g.add_argument("--stats", action="store_true", help="print tau, acceptance per depth and the time split")


def spec_from_args(a) -> dict | None:
    if a.spec == "none":
        return None
    return dict(method=a.spec, verify=a.verify, draft_model=a.draft_model, intermediate=a.intermediate,
                eagle_head=a.eagle_head, k=a.draft_len, n_drafts=a.n_drafts, top_k=a.tree_top_k,
                depth=a.tree_depth, total_tokens=a.tree_tokens, min_draft_length=a.min_draft_length)


def quant_from_args(a) -> dict | None:
    if a.quant_lm_head:
        from .quant.quantize import check_lm_head
        if a.format == "none":
            raise SpecqError("--quant-lm-head needs --format (w4a16, w3a16, w2a16)")
        check_lm_head(a.format)                          # before the (slow) model load
    if a.format == "none":
        return None
    return dict(fmt=a.format, method=a.method, group_size=a.group_size, **({"lm_head": True} if a.quant_lm_head else {}))


def compile_flag(a) -> bool:
    """--compile / --compile-blocks -> whether to compile; --compile-blocks also switches to regional compilation
    (specq.models.llama.COMPILE_BLOCKS) for this process."""
    if getattr(a, "compile_blocks", False):
        from .models import llama
        llama.COMPILE_BLOCKS = True
        return True
    return bool(a.compile)


COMPILE_BLOCKS_HELP = ("GPU: --compile with each model's decoder layer compiled once for all its layers and the step "
                       "around them left eager (regional compilation): far shorter compiles for deep models, steps "
                       "~2%% slower")


def cmd_generate(a) -> int:
    from .api import LLM
    from .sampling import SamplingParams
    SamplingParams(a.temperature, a.top_k, a.top_p)          # validate before the (slow) model load
    if a.max_new_tokens < 1:
        raise SpecqError(f"invalid --max-new-tokens {a.max_new_tokens}: must be >= 1")
    if a.prompt is None:
        a.prompt = sys.stdin.read() if not sys.stdin.isatty() else "Write a short poem about the sea."
    llm = LLM(a.model, device=a.device, dtype=a.dtype, quant=quant_from_args(a), spec=spec_from_args(a),
              compensate=a.compensate, compile=compile_flag(a))
    if getattr(llm, "spec_choice", None):
        c = llm.spec_choice
        alt = ", ".join(f"{r['name']} {r['tok_s']:.0f}" for r in c["ranked"][1:4])
        print(f"[spec auto: {c['choice']} ({c['ranked'][0]['tok_s']:.0f} tok/s expected; next: {alt})]", file=sys.stderr)
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
              stop=a.stop, seed=a.seed)
    stream = None if a.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    if a.chat:
        msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
        out = llm.chat(msgs, on_text=stream, **kw)
    else:
        out = llm.generate(a.prompt, on_text=stream, **kw)
    info = {"tokens": len(out.ids), "seconds": round(out.seconds, 3), "tok_s": round(out.tok_s, 1),
            "finish_reason": out.finish_reason, "device": str(llm.device), **out.metrics}
    if a.json:
        print(json.dumps({"text": out.text, **info}))
    else:
        sys.stdout.write("\n")
        line = f"[{info['tokens']} tokens, {info['tok_s']} tok/s on {info['device']}, {out.finish_reason}]"
        if out.metrics:
            m = out.metrics
            line += f" tau={m['tau']:.2f}"
            if a.stats:
                acc = " ".join(f"{x:.2f}" for x in m["acceptance"][:8])
                t = m["time_s"]
                line += (f" | acceptance/depth [{acc}] | draft {t['draft']:.2f}s verify {t['verify']:.2f}s "
                         f"other {t['other'] + t['prefill']:.2f}s")
        print(line, file=sys.stderr)
    return 0


def cmd_serve(a) -> int:
    import os
    from .api import LLM
    from .server import make_server
    if not 0 <= a.port <= 65535:
        raise SpecqError(f"invalid --port {a.port}: must be in 0..65535")
    llm = LLM(a.model, device=a.device, dtype=a.dtype, quant=quant_from_args(a), spec=spec_from_args(a),
              compensate=a.compensate, compile=compile_flag(a))
    name = a.served_model_name or os.path.splitext(os.path.basename(os.path.normpath(a.model)))[0]
    srv = make_server(llm, name, a.host, a.port, quiet=a.quiet, stats=a.stats)
    host, port = srv.server_address[:2]
    print(f"specq serve: {name!r} on http://{host}:{port}/v1 (OpenAI API: /v1/models, /v1/completions, "
          f"/v1/chat/completions; Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specq", description="Fast lossless decoding of quantized LLMs at batch size 1: "
                                "quantized targets + speculative decoding + dynamic error compensation.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    g = sub.add_parser("generate", help="generate text (a chat answer by default), streamed to the terminal",
                       description="Generate text from a prompt, streamed to stdout; statistics go to stderr.")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin, else a demo prompt)")
    g.add_argument("--no-chat", dest="chat", action="store_false", help="treat the prompt as raw text (no chat template)")
    g.add_argument("--system", default=None, help="system message for chat mode")
    g.add_argument("--json", action="store_true", help="print one JSON object (text + statistics) instead of streaming")
    g.add_argument("--compile", action="store_true",
                   help="GPU: torch.compile the decode step (plain) or the verification and draft-model steps "
                        "(--spec) inside their CUDA graphs (tens of seconds to compile once; ~1.5-3x faster steps)")
    g.add_argument("--compile-blocks", action="store_true", help=COMPILE_BLOCKS_HELP)
    add_model_args(g); add_quant_args(g); add_sampling_args(g); add_spec_args(g)
    g.set_defaults(func=cmd_generate)
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat completions, streaming)",
                        description="Serve one model over HTTP with the OpenAI API (/v1/models, /v1/completions, "
                                    "/v1/chat/completions, stream=true as server-sent events). Requests run one at a "
                                    "time (batch size 1); quantization, speculative decoding and --compile apply to "
                                    "every request and never change what the target says.")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    sv.add_argument("--served-model-name", default=None, help="model id clients send and see (default: the "
                    "model's file or directory name)")
    sv.add_argument("--quiet", action="store_true", help="no request log on stderr")
    sv.add_argument("--compile", action="store_true", help="GPU: torch.compile the decode / verification steps "
                    "(the first request pays the compile)")
    sv.add_argument("--compile-blocks", action="store_true", help=COMPILE_BLOCKS_HELP)
    add_model_args(sv); add_quant_args(sv); add_spec_args(sv)
    sv.set_defaults(func=cmd_serve)
    from .bench.cli import add_parser as add_bench
    from .quant.cli import add_ppl_parser, add_quantize_parser
    from .spec.train_eagle import add_parser as add_train_eagle
    for add in (add_quantize_parser, add_ppl_parser, add_train_eagle, add_bench):
        add(sub)
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if not getattr(a, "func", None):
        p.print_help()
        return 2
    try:
        return int(a.func(a) or 0)
    except SpecqError as e:
        print(f"specq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specq: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as e:
        print(f"specq: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except torch_oom() as e:
        print(f"specq: error: out of GPU memory: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1


def torch_oom():
    import torch
    return getattr(torch.cuda, "OutOfMemoryError", MemoryError)


if __name__ == "__main__":
    sys.exit(main())
