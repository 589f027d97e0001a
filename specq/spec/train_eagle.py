"""`specq train-eagle`: train an EAGLE-2 head on the target's own answers.

1. prompts: GSM8K train questions + WikiText-2 valid snippets, with the chat template;
2. the target answers them greedily (many sequences packed into one static cache, one token each per
   forward: a block-diagonal mask over the packed slots);
3. one forward per prompt+answer collects the target's final-norm features -> one safetensors file
   (tokens, features, offsets), reused by later runs, so epochs cost only the head;
4. the head learns x_j = [emb(t_{j+1}); f_j] -> f_{j+1}: SmoothL1 (weight 1.0) + cross-entropy against
   the target's next-token distribution lm_head(f_{j+1}) (weight 0.1), on answer positions; AdamW,
   warmup + cosine schedule, bf16 autocast on CUDA;
5. save model.safetensors (published EAGLE layout, bf16) + config.json.
"""
from __future__ import annotations

import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SpecqError
from .eagle import EagleHead, save_head


# ----------------------------------------------------------------------------- prompts

def gsm8k_questions() -> list[str]:
    from ..data import gsm8k_questions as read
    try:
        return read()
    except SpecqError as e:
        print(f"warning: {e}: training on WikiText prompts only", file=sys.stderr)
        return []


def wikitext_snippets(min_chars: int = 300, words: int = 60) -> list[str]:
    from ..paths import data_file
    out = []
    for line in data_file("wikitext2_valid.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if len(line) >= min_chars and not line.startswith("="):
            out.append(" ".join(line.split()[:words]))
    return out


def build_prompts(tok, n: int, seed: int = 0) -> list[list[int]]:
    """n chat prompts: two thirds GSM8K questions, the rest WikiText continuations (shuffled, seeded)."""
    rng = random.Random(seed)
    gsm, wiki = gsm8k_questions(), wikitext_snippets()
    rng.shuffle(gsm)
    rng.shuffle(wiki)
    ng = min(len(gsm), (2 * n) // 3) if gsm else 0
    texts = gsm[:ng] + [f"Continue the following text.\n\n{w}" for w in wiki[:n - ng]]
    if not texts:
        raise SpecqError("no training prompts found in the data folder")
    rng.shuffle(texts)
    return [tok.chat([{"role": "user", "content": t}]) for t in texts]


# ----------------------------------------------------------------------------- target answers and features

@torch.inference_mode()
def generate_packed(model, prompts: list[list[int]], max_new: int, eos_ids=()) -> list[list[int]]:
    """Greedy answers for a batch of prompts: row b lives in cache slots [b*W, (b+1)*W)."""
    dev = model.device
    B = len(prompts)
    W = max(len(p) for p in prompts) + max_new
    S = B * W
    model.setup_cache(S)
    base = torch.arange(B, device=dev) * W
    j = torch.arange(S, device=dev)
    cur = []
    for b, p in enumerate(prompts):   # prefill each row
        m = len(p)
        i = torch.arange(m, device=dev)
        mask = (j[None] >= base[b]) & (j[None] <= base[b] + i[:, None])
        logits = model(torch.tensor(p, device=dev), i, base[b] + i, mask, return_hidden=False, logits_rows=slice(m - 1, m))
        cur.append(logits[0].argmax())
    cur = torch.stack(cur)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    eos = torch.tensor(list(eos_ids) or [-1], device=dev)
    toks, done = [], torch.zeros(B, dtype=torch.bool, device=dev)
    for s in range(max_new):
        toks.append(torch.where(done, -1, cur))
        done |= torch.isin(cur, eos)
        if s == max_new - 1 or (s % 16 == 15 and bool(done.all())):
            break
        mask = (j[None] >= base[:, None]) & (j[None] <= (base + lens)[:, None])
        cur = model(cur, lens, base + lens, mask, return_hidden=False).argmax(-1)
        lens = lens + 1
    out = torch.stack(toks, 1).tolist()
    return [[t for t in row if t >= 0] for row in out]


@torch.inference_mode()
def collect_features(model, seqs: list[list[int]], plens: list[int]) -> dict:
    """One forward per sequence -> {tokens [N] int32, feats [N, D] bf16, offsets [n+1], plens [n]}."""
    dev = model.device
    L = max(len(s) for s in seqs)
    model.setup_cache(L)
    toks, feats = [], []
    for s in seqs:
        m = len(s)
        i = torch.arange(m, device=dev)
        _, h = model(torch.tensor(s, device=dev), i, i, i[:, None] >= torch.arange(L, device=dev)[None], logits_rows=slice(0, 0))
        toks.append(torch.tensor(s, dtype=torch.int32))
        feats.append(h.to("cpu", torch.bfloat16))
    off = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    return {"tokens": torch.cat(toks), "feats": torch.cat(feats), "offsets": off, "plens": torch.tensor(plens)}


def make_dataset(model, prompts, max_new, eos_ids, gen_batch=64, budget_s=0.0, log=print) -> dict:
    res, t0 = {}, time.time()
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="generate", mininterval=5)
    except ImportError:
        bar = None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # similar lengths per batch
    for k in range(0, len(order), gen_batch):
        if budget_s and time.time() - t0 > budget_s:
            log(f"generation budget {budget_s:.0f}s reached after {len(res)} prompts")
            break
        ids = order[k:k + gen_batch]
        for i, a in zip(ids, generate_packed(model, [prompts[i] for i in ids], max_new, eos_ids)):
            res[i] = prompts[i] + a
        if bar:
            bar.update(len(ids))
    if bar:
        bar.close()
    keep = sorted(res)                                                  # prompt order
    seqs, plens = [res[i] for i in keep], [len(prompts[i]) for i in keep]
    n_ans = sum(len(s) - p for s, p in zip(seqs, plens))
    log(f"generated {len(seqs)} answers, {n_ans} tokens in {time.time() - t0:.1f}s")
    t1 = time.time()
    data = collect_features(model, seqs, plens)
    log(f"features {tuple(data['feats'].shape)} in {time.time() - t1:.1f}s")
    return data


# ----------------------------------------------------------------------------- training

def frozen_copy(target):
    """Trainable-graph-safe copies of the target's embedding and lm_head (inference tensors cannot be
    saved for backward), frozen."""
    emb = nn.Embedding.from_pretrained(target.embed_tokens.weight.detach().clone().float(), freeze=True)
    lm = nn.Linear(target.cfg.hidden_size, target.cfg.vocab_size, bias=False)
    lm.weight = nn.Parameter(target.lm_head.weight.detach().clone().float(), requires_grad=False)
    return emb, lm


def batches(data: dict, idx: list[int], batch_tokens: int):
    """Group sequence ids into batches of about batch_tokens padded tokens."""
    off = data["offsets"].tolist()
    out, cur, longest = [], [], 0
    for i in idx:
        n = off[i + 1] - off[i]
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def make_batch(data: dict, ids: list[int], device):
    """-> ids_in [B,T] (t_{j+1}), f_in [B,T,D] (f_j), f_out [B,T,D] (f_{j+1}), mask [B,T] (answer positions)."""
    off, pl = data["offsets"], data["plens"]
    T = max(int(off[i + 1] - off[i]) - 1 for i in ids)
    B, D = len(ids), data["feats"].shape[1]
    tok = torch.zeros(B, T, dtype=torch.long)
    fin = torch.zeros(B, T, D, dtype=data["feats"].dtype)
    fout = torch.zeros_like(fin)
    mask = torch.zeros(B, T)
    for b, i in enumerate(ids):
        s, e = int(off[i]), int(off[i + 1])
        n = e - s - 1
        tok[b, :n] = data["tokens"][s + 1:e].long()
        fin[b, :n] = data["feats"][s:e - 1]
        fout[b, :n] = data["feats"][s + 1:e]
        mask[b, max(0, int(pl[i]) - 1):n] = 1.0    # positions that predict answer tokens
    return tok.to(device), fin.to(device), fout.to(device), mask.to(device)


def head_loss(head: EagleHead, tok, fin, fout, mask, noise: float = 0.0):
    """-> loss, (reg, ce, top-1 agreement with the target), all means over masked positions."""
    if noise:
        fin = fin + (torch.rand_like(fin, dtype=torch.float32) - 0.5).to(fin.dtype) * 2 * noise
    out = head.forward_seq(tok, fin)                                  # [B, T, D]
    reg = F.smooth_l1_loss(out.float(), fout.float(), reduction="none").mean(-1)
    lm = head.shared["lm_head"]
    with torch.no_grad():
        tl = lm(fout.float()).float()
        tp = tl.softmax(-1)
    lp = lm(out).float().log_softmax(-1)
    ce = -(tp * lp).sum(-1)
    n = mask.sum().clamp(min=1)
    loss = ((reg + 0.1 * ce) * mask).sum() / n
    with torch.no_grad():
        acc = ((lp.argmax(-1) == tl.argmax(-1)).float() * mask).sum() / n
    return loss, ((reg * mask).sum() / n, (ce * mask).sum() / n, acc)


def train_head(head: EagleHead, target, data: dict, epochs: int = 4, lr: float = 3e-4, batch_tokens: int = 4096,
               device="cpu", budget_s: float = 0.0, noise: float = 0.0, seed: int = 0, log=print,
               progress: bool = True) -> list[float]:
    """Train in place (fp32 master weights); returns the mean training loss of every epoch."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    emb, lm = frozen_copy(target)
    head.to(device=device, dtype=torch.float32).train()
    head.bind(emb.to(device), lm.to(device))
    n = len(data["plens"])
    idx = list(range(n))
    rng.shuffle(idx)
    n_val = min(max(1, n // 20), n - 1) if n > 1 else 0
    val, tr = idx[:n_val], idx[n_val:]
    steps_per_epoch = len(batches(data, tr, batch_tokens))
    total = max(1, epochs * steps_per_epoch)
    warm = max(1, total // 20)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + math.cos(math.pi * min(1.0, s / total))) * 0.9 + 0.1))
    cuda = torch.device(device).type == "cuda"
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (lambda: torch.autocast("cpu", enabled=False))
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    t0, hist = time.time(), []
    for ep in range(epochs):
        rng.shuffle(tr)
        bs = batches(data, tr, batch_tokens)
        it = tqdm(bs, desc=f"epoch {ep + 1}/{epochs}", mininterval=5) if (tqdm and progress) else bs
        tot = cnt = 0.0
        stop = False
        for b in it:
            tok, fin, fout, mask = make_batch(data, b, device)
            with ac():
                loss, _ = head_loss(head, tok, fin, fout, mask, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
            opt.step()
            sched.step()
            if not math.isfinite(loss.item()):
                raise SpecqError("EAGLE training diverged (non-finite loss); lower --lr")
            tot += loss.item()
            cnt += 1
            if budget_s and time.time() - t0 > budget_s:
                stop = True
                break
        hist.append(tot / max(cnt, 1))
        msg = f"epoch {ep + 1}: train loss {hist[-1]:.4f}"
        if val:
            with torch.no_grad(), ac():
                vs = [head_loss(head, *make_batch(data, b, device))[1] for b in batches(data, val, batch_tokens)]
            reg, ce, acc = (sum(float(v[i]) for v in vs) / len(vs) for i in range(3))
            msg += f" | val reg {reg:.4f} ce {ce:.3f} top1 {acc:.3f}"
        log(msg + f" | {time.time() - t0:.0f}s")
        if stop:
            log(f"training budget {budget_s:.0f}s reached")
            break
    head.eval()
    head.bind(target)
    return hist


# ----------------------------------------------------------------------------- CLI

def add_parser(subparsers):
    p = subparsers.add_parser("train-eagle", help="train an EAGLE-2 draft head on the target's own answers")
    p.add_argument("--model", default="smollm2", help="target: HF folder, .gguf file or 'smollm2'")
    p.add_argument("--out", default="eagle_smollm2", help="output folder (model.safetensors + config.json)")
    p.add_argument("--num-prompts", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--gen-batch", type=int, default=64, help="answers generated together (packed cache)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per training batch")
    p.add_argument("--noise", type=float, default=0.0, help="uniform noise on input features (EAGLE-style)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--features", default=None, help="feature cache file (reused when it exists)")
    p.add_argument("--gen-budget-s", type=float, default=0.0, help="stop generating after this many seconds (0: no limit)")
    p.add_argument("--train-budget-s", type=float, default=0.0, help="stop training after this many seconds (0: no limit)")
    p.add_argument("--log", default=None, help="log file (default OUT/train_log.txt)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from safetensors.torch import load_file, save_file
    from ..models import load_model
    for name in ("num_prompts", "max_new_tokens", "gen_batch", "epochs", "batch_tokens"):
        if getattr(args, name) < 1:
            raise SpecqError(f"--{name.replace('_', '-')} must be >= 1")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise SpecqError("--lr must be a positive number")
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SpecqError("--device cuda requested but CUDA is not available")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(args.log or out / "train_log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    t0 = time.time()
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    target, tok = load_model(args.model, dtype=dtype, device=dev)
    log(f"target {args.model}: {target.cfg.num_layers} layers, hidden {target.cfg.hidden_size}, "
        f"vocab {target.cfg.vocab_size} on {dev} ({time.time() - t0:.1f}s)")
    feat = Path(args.features) if args.features else Path(tempfile.gettempdir()) / (
        f"specq_eagle_{Path(str(args.model)).stem}_{args.num_prompts}_{args.max_new_tokens}_{args.seed}.safetensors")
    if feat.is_file():
        try:
            data = load_file(str(feat))
        except Exception as e:
            raise SpecqError(f"cannot read feature cache {feat}: {e}") from None
        if data["feats"].shape[1] != target.cfg.hidden_size:
            raise SpecqError(f"feature cache {feat} was made for another model (hidden {data['feats'].shape[1]})")
        log(f"reusing features {feat}: {tuple(data['feats'].shape)}")
    else:
        prompts = build_prompts(tok, args.num_prompts, args.seed)
        eos = list(tok.eos_ids or target.cfg.eos_token_ids)
        data = make_dataset(target, prompts, args.max_new_tokens, eos, args.gen_batch, args.gen_budget_s, log)
        feat.parent.mkdir(parents=True, exist_ok=True)
        save_file(data, str(feat))
        log(f"features cached at {feat}")
    head = EagleHead(target.cfg, bias=True)
    t1 = time.time()
    hist = train_head(head, target, data, args.epochs, args.lr, args.batch_tokens, dev, args.train_budget_s,
                      args.noise, args.seed, log)
    log(f"trained {len(hist)} epochs in {time.time() - t1:.1f}s")
    save_head(head, out, torch.bfloat16, extra={"target": str(args.model), "sequences": int(len(data["plens"])),
                                               "train_loss": hist})
    size = (out / "model.safetensors").stat().st_size
    log(f"saved {out}/model.safetensors ({size / 1e6:.1f} MB) + config.json; total {time.time() - t0:.0f}s")
    logf.close()
    return 0


def main(argv=None) -> int:  # python -m specq.spec.train_eagle ... == specq train-eagle ...
    from ..cli import main as cli_main
    return cli_main(["train-eagle"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
