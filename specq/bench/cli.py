"""`specq bench ...` subcommands."""
from __future__ import annotations


def add_parser(sub):
    from ..cli import add_model_args, add_quant_args
    p = sub.add_parser("bench", help="benchmarks (speculative methods over Spec-Bench / MT-bench)")
    bsub = p.add_subparsers(dest="bench_cmd", metavar="BENCH")
    s = bsub.add_parser("spec", help="tau, tok/s and speedup per category for speculative methods",
                        description="Run speculative methods over Spec-Bench or MT-bench (first turn, chat template) "
                                    "and report per category tau, tok/s and speedup over plain decoding measured in the "
                                    "same run; writes JSON + markdown + a bar chart.")
    add_model_args(s); add_quant_args(s)
    s.add_argument("--methods", default="ngram,eagle,draft,hier",
                   help="comma list of method[:verify], e.g. ngram,eagle,multi:rrs,multi:spechub (default ngram,eagle,draft,hier)")
    s.add_argument("--temperatures", default="0", help="comma list of temperatures (default 0)")
    s.add_argument("--bench", default="spec_bench", choices=["spec_bench", "mt_bench"], help="question set (default spec_bench)")
    s.add_argument("--per-category", type=int, default=10, help="questions per category (default 10)")
    s.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per question (default 128)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--draft-len", type=int, default=5, help="draft chain length for draft/ngram/multi (default 5)")
    s.add_argument("--n-drafts", type=int, default=2, help="drafts per position for multi (default 2)")
    s.add_argument("--draft-model", default=None, help="draft model (default: a 4-bit RTN copy of the target)")
    s.add_argument("--intermediate", default=None, help="hier intermediate model (default: the un-quantized target)")
    s.add_argument("--eagle-head", default=None, help="EAGLE head directory (default: bundled smollm2 head)")
    s.add_argument("--tree", default="16:5:80", help="EAGLE-2 tree top_k:depth:total_tokens for eagle/hier "
                   "(default 16:5:80, the generate default)")
    s.add_argument("--out", default=None, help="write JSON here (plus .md and .png beside it)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--compile", action="store_true", help="GPU: torch.compile the plain decode step and the "
                   "verification / draft-model steps (both sides of every speedup), inside their CUDA graphs")
    from ..cli import COMPILE_BLOCKS_HELP
    s.add_argument("--compile-blocks", action="store_true", help=COMPILE_BLOCKS_HELP)

    def run(a):
        from .spec import main
        return main(a)
    s.set_defaults(func=run)
    from .latency import add_parser as add_latency
    add_latency(bsub)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
