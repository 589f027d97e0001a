"""`specq train-eagle`: train an EAGLE-2 head on the target's own answers.

1. prompts (chat template): GSM8K train questions, coding requests, and WikiText-2 valid paragraphs and
   topics inside varied instruction templates (summary, translation, QA, extraction, writing, ...);
2. the target answers them greedily (many sequences packed into one static cache, one token each per
   forward: a block-diagonal mask over the packed slots);
3. the forwards that generate also give the target's final-norm features -> one safetensors file
   (tokens, features, offsets), reused by later runs, so epochs cost only the head;
4. the head learns x_j = [emb(t_{j+1}); f_j] -> f_{j+1}: SmoothL1 (weight 1.0) + cross-entropy against
   the target's next-token distribution lm_head(f_{j+1}) (weight 0.1), on answer positions; with
   --unroll U also on its own predicted features for U more steps (EagleHead.forward_unrolled: the
   attention pattern of the tree's deeper levels, as in HASS / EAGLE-3's training-time test), step s
   weighted 0.8^s; AdamW, warmup + cosine schedule fitted to the time budget, bf16 autocast on CUDA;
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


def detok(line: str) -> str:
    """WikiText's tokenized text ("a @-@ b , c ( d )") -> plain text."""
    line = line.replace("<unk>", "").replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for a, b in ((" ,", ","), (" .", "."), (" ;", ";"), (" :", ":"), (" 's", "'s"), ("( ", "("), (" )", ")"),
                 (" n't", "n't"), ('" ', '"'), ("  ", " ")):
        line = line.replace(a, b)
    return line.strip()


def wikitext_snippets(min_chars: int = 300, words: int = 60) -> list[str]:
    from ..paths import data_file
    out = []
    for line in data_file("wikitext2_valid.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if len(line) >= min_chars and not line.startswith("="):
            out.append(" ".join(detok(line).split()[:words]))
    return out


def wikitext_topics() -> list[str]:
    """Article titles and "section of article" topics of WikiText-2 valid."""
    from ..paths import data_file
    out, art = [], None
    for line in data_file("wikitext2_valid.txt").read_text(encoding="utf-8").splitlines():
        t = line.strip()
        if t.startswith("= = ") and not t.startswith("= = = ") and art:
            sec = detok(t.strip("= ").strip())
            if sec.lower() not in ("references", "notes", "see also", "external links", "footnotes", "sources"):
                out.append(f"the {sec[:1].lower() + sec[1:]} of {art}")
        elif t.startswith("= ") and not t.startswith("= ="):
            art = detok(t.strip("= ").strip())
            out.append(art)
    return out


# Instruction templates: a WikiText paragraph ({text}, {short}) or topic ({topic}, {topic2}) inside chat-style
# tasks of many kinds (continuation, summary, translation, QA over a passage, extraction, explanation,
# writing, role play, comparison), so the head sees the target answering more than GSM8K.
TEXT_TASKS = (
    "Continue the following text.\n\n{text}",
    "Summarize the following text in two or three sentences.\n\n{text}",
    "Write a short summary of this passage for a busy reader:\n\n{text}",
    "Translate the following text into French.\n\n{short}",
    "Translate the following text into German.\n\n{short}",
    "Translate the following text into Spanish.\n\n{short}",
    "Rewrite the following text in simple English.\n\n{short}",
    "What is the following text mainly about? Answer in one paragraph and cite the details that support it.\n\n{text}",
    "Extract the people, places and dates mentioned in the text below as JSON with keys \"people\", \"places\" "
    "and \"dates\".\n\n{text}",
    "Write three questions that can be answered from the text below, then answer each of them.\n\n{text}",
    "Passage: {text}\n\nUsing only the passage, explain the most important fact it states.",
    "Is the following statement likely to be true? Explain your reasoning.\n\n{short}",
)
TOPIC_TASKS = (
    "Explain {topic} to a high school student.",
    "Write a short story inspired by {topic}.",
    "Write a persuasive paragraph about why people should learn about {topic}.",
    "Pretend you are a tour guide and introduce {topic} to a group of visitors.",
    "You are a journalist. Write a short interview with an expert on {topic}.",
    "Write a short poem about {topic}.",
    "Give me five interesting facts about {topic}.",
    "Compare {topic} and {topic2}. What do they have in common and how do they differ?",
    "Write an email to a friend recommending that they read about {topic}.",
    "What are the main open questions or debates about {topic}?",
    "Create a short quiz with answers about {topic}.",
    "Write a blog post introduction about {topic}.",
)
CODE_TASKS = (
    "returns the n largest numbers of a list", "checks whether a string is a palindrome",
    "counts the words in a text file", "merges two sorted lists into one sorted list",
    "computes the factorial of a number recursively", "removes duplicate items from a list while keeping the order",
    "finds the most common character in a string", "converts a temperature from Celsius to Fahrenheit",
    "returns the Fibonacci numbers up to n", "reverses the words of a sentence",
    "computes the mean, median and mode of a list of numbers", "checks whether a number is prime",
    "flattens a nested list", "groups a list of words by their first letter",
    "validates an email address with a regular expression", "computes the greatest common divisor of two integers",
    "parses a CSV line into fields", "returns the second smallest element of a list",
    "rotates a matrix by 90 degrees", "finds all pairs in a list that sum to a target",
)
CODE_FORMS = (
    "Write a Python function that {task}. Include a docstring and a short example.",
    "Write a JavaScript function that {task} and explain how it works.",
    "Write a C++ function that {task}.",
    "I need a Python function that {task}. Please also write two unit tests for it.",
)


def build_prompts(tok, n: int, seed: int = 0, mix=(0.35, 0.10)) -> list[list[int]]:
    """n chat prompts (shuffled, seeded): a share mix[0] of GSM8K questions, mix[1] coding requests, the rest
    WikiText-2 valid paragraphs and topics inside varied instruction templates. No Spec-Bench / MT-bench text."""
    rng = random.Random(seed)
    gsm, wiki, topics = gsm8k_questions(), wikitext_snippets(), wikitext_topics()
    rng.shuffle(gsm)
    ng = min(len(gsm), int(mix[0] * n)) if gsm else 0
    nc = int(mix[1] * n)
    texts = list(gsm[:ng])
    texts += [rng.choice(CODE_FORMS).format(task=rng.choice(CODE_TASKS)) for _ in range(nc)]
    for i in range(n - len(texts)):
        if wiki and (i % 2 == 0 or not topics):
            w = rng.choice(wiki)
            texts.append(rng.choice(TEXT_TASKS).format(text=w, short=" ".join(w.split()[:30])))
        elif topics:
            texts.append(rng.choice(TOPIC_TASKS).format(topic=rng.choice(topics), topic2=rng.choice(topics)))
    if not texts:
        raise SpecqError("no training prompts found in the data folder")
    rng.shuffle(texts)
    return [tok.chat([{"role": "user", "content": t}]) for t in texts]


# Self-instruct: the target writes user requests of many kinds (seeded by a kind and a topic), which then
# become prompts; its own phrasing widens the prompt distribution beyond the fixed templates above.
REQUEST_KINDS = (
    "a short factual question", "a question about history", "a science question", "a question asking for advice",
    "a creative writing request", "a role-play request where the assistant plays a character",
    "a logic or reasoning puzzle", "a math word problem", "a request to write a short program",
    "a request to explain a concept simply", "a request to compare two things", "a request to write a letter or email",
    "a request to summarize a short news report (include the report)",
    "a request to extract information from a short text (include the text)",
    "a request to translate a sentence from German into English (include the German sentence)",
    "a question about a short passage (include the passage)",
)


def self_instruct(model, tok, n: int, seed: int = 0, gen_batch: int = 64, max_new: int = 96) -> list[str]:
    """n user requests written by the target (greedy), each seeded by a request kind and a WikiText topic."""
    rng = random.Random(seed + 1)
    topics = wikitext_topics() or ["everyday life"]
    asks = [f"Write {rng.choice(REQUEST_KINDS)} that a user might send to an AI assistant, related to "
            f"{rng.choice(topics)}. Reply with the request only." for _ in range(n)]
    eos = list(tok.eos_ids or model.cfg.eos_token_ids)
    out = []
    for k in range(0, n, gen_batch):
        chats = [tok.chat([{"role": "user", "content": a}]) for a in asks[k:k + gen_batch]]
        for ans in generate_packed(model, chats, max_new, eos):
            t = tok.decode([x for x in ans if x not in eos]).strip().strip('"').strip()
            if len(t) >= 12:
                out.append(t)
    return out


# ----------------------------------------------------------------------------- target answers and features

@torch.inference_mode()
def generate_packed(model, prompts: list[list[int]], max_new: int, eos_ids=(), features: bool = False):
    """Greedy answers for a batch of prompts: row b lives in cache slots [b*W, (b+1)*W).
    -> answers (list of token lists); with features=True also, per row, the target's final-norm features
    [len(prompt) + len(answer) - 1, D] of every token but the answer's last (the forward that feeds a
    token yields its feature, so no second pass is needed)."""
    dev = model.device
    B = len(prompts)
    W = max(len(p) for p in prompts) + max_new
    S = B * W
    model.setup_cache(S)
    base = torch.arange(B, device=dev) * W
    j = torch.arange(S, device=dev)
    cur, pre = [], []
    for b, p in enumerate(prompts):   # prefill each row
        m = len(p)
        i = torch.arange(m, device=dev)
        mask = (j[None] >= base[b]) & (j[None] <= base[b] + i[:, None])
        logits, h = model(torch.tensor(p, device=dev), i, base[b] + i, mask, logits_rows=slice(m - 1, m))
        cur.append(logits[0].argmax())
        pre.append(h)
    cur = torch.stack(cur)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    eos = torch.tensor(list(eos_ids) or [-1], device=dev)
    toks, hs, done = [], [], torch.zeros(B, dtype=torch.bool, device=dev)
    for s in range(max_new):
        toks.append(torch.where(done, -1, cur))
        done |= torch.isin(cur, eos)
        if s == max_new - 1 or (s % 16 == 15 and bool(done.all())):
            break
        mask = (j[None] >= base[:, None]) & (j[None] <= (base + lens)[:, None])
        logits, h = model(cur, lens, base + lens, mask)
        cur = logits.argmax(-1)
        hs.append(h)                                                    # features of the tokens just fed
        lens = lens + 1
    out = [[t for t in row if t >= 0] for row in torch.stack(toks, 1).tolist()]
    if not features:
        return out
    hs = torch.stack(hs, 1) if hs else pre[0].new_zeros(B, 0, pre[0].shape[-1])   # [B, steps, D]
    return out, [torch.cat([pre[b], hs[b, :max(len(a) - 1, 0)]]) for b, a in enumerate(out)]


def make_dataset(model, prompts, max_new, eos_ids, gen_batch=64, budget_s=0.0, log=print) -> dict:
    """Greedy answers + features -> {tokens [N] int32, feats [N, D] bf16, offsets [n+1], plens [n]}: per sequence
    the prompt and the answer without its last token (whose feature was never computed)."""
    res, t0 = {}, time.time()
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="generate", mininterval=5)
    except ImportError:
        bar = None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # similar lengths per batch
    groups = [order[k:k + gen_batch] for k in range(0, len(order), gen_batch)]
    random.Random(len(prompts)).shuffle(groups)   # a time budget must not drop the long prompts only
    for ids in groups:
        if budget_s and time.time() - t0 > budget_s:
            log(f"generation budget {budget_s:.0f}s reached after {len(res)} prompts")
            break
        ans, feats = generate_packed(model, [prompts[i] for i in ids], max_new, eos_ids, features=True)
        for i, a, f in zip(ids, ans, feats):
            if a:
                res[i] = ((prompts[i] + a)[:-1], f.to("cpu", torch.bfloat16))
        if bar:
            bar.update(len(ids))
    if bar:
        bar.close()
    keep = sorted(res)                                                  # prompt order
    seqs, plens = [res[i][0] for i in keep], [len(prompts[i]) for i in keep]
    n_ans = sum(len(s) - p for s, p in zip(seqs, plens))
    log(f"generated {len(seqs)} answers, {n_ans} tokens (+ features) in {time.time() - t0:.1f}s")
    off = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    return {"tokens": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
            "feats": torch.cat([res[i][1] for i in keep]), "offsets": off, "plens": torch.tensor(plens)}


# ----------------------------------------------------------------------------- training

def frozen_copy(target):
    """Trainable-graph-safe copies of the target's embedding and lm_head (inference tensors cannot be
    saved for backward), frozen."""
    emb = nn.Embedding.from_pretrained(target.embed_tokens.weight.detach().clone().float(), freeze=True)
    lm = nn.Linear(target.cfg.hidden_size, target.cfg.vocab_size, bias=False)
    lm.weight = nn.Parameter(target.lm_head.weight.detach().clone().float(), requires_grad=False)
    return emb, lm


def batches(data: dict, idx: list[int], batch_tokens: int, rng: random.Random | None = None):
    """Group sequence ids into batches of about batch_tokens padded tokens. With rng: sequences of similar
    length share a batch (sorted within chunks of the given order) and the batch order is shuffled."""
    off = data["offsets"].tolist()
    size = lambda i: off[i + 1] - off[i]  # noqa: E731
    if rng is not None:
        idx = [i for c in range(0, len(idx), 512) for i in sorted(idx[c:c + 512], key=size)]
    out, cur, longest = [], [], 0
    for i in idx:
        n = size(i)
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    if rng is not None:
        rng.shuffle(out)
    return out


def make_batch(data: dict, ids: list[int], device):
    """-> ids_in [B,T] (t_{j+1}), f_in [B,T,D] (f_j), f_out [B,T,D] (f_{j+1}), mask [B,T] (answer positions).
    Gathers from data's tensors wherever they live (keep them on the GPU: no host copies per batch)."""
    off, pl = data["offsets"], data["plens"]
    ids_t = torch.tensor(ids)
    start, n = off[ids_t], off[ids_t + 1] - off[ids_t] - 1                 # [B] pairs per sequence
    T = int(n.max())
    j = torch.arange(T)
    valid = j[None] < n[:, None]                                           # [B, T]
    at = (start[:, None] + torch.minimum(j[None], (n - 1).clamp_min(0)[:, None]))  # [B, T] index of f_j
    src = data["feats"].device
    at_d, valid_d = at.to(src), valid.to(src)
    tok = torch.where(valid_d, data["tokens"][at_d + 1].long(), 0)
    fin = data["feats"][at_d] * valid_d[..., None]
    fout = data["feats"][at_d + 1] * valid_d[..., None]
    mask = (valid & (j[None] >= (pl[ids_t] - 1).clamp_min(0)[:, None])).float()   # positions predicting answer tokens
    return tok.to(device), fin.to(device), fout.to(device), mask.to(device)


def head_loss(head: EagleHead, tok, fin, fout, mask, noise: float = 0.0, unroll: int = 0, decay: float = 0.8,
              ce_weight: float = 0.1):
    """Loss over the head's own unrolled steps (forward_unrolled): step s at index j predicts f_{j+1+s} from
    its own step-(s-1) output, as the tree does at depth s+1; step s is weighted decay**s. Only positions
    predicting answer tokens (mask) go through lm_head.
    -> loss, (reg, ce, top-1 agreement with the target) of step 0, [top-1 of each step]."""
    if noise:
        fin = fin + (torch.rand_like(fin, dtype=torch.float32) - 0.5).to(fin.dtype) * 2 * noise
    outs = head.forward_unrolled(tok, fin, unroll)                    # [B, T, D] each
    lm = head.shared["lm_head"]
    bi, ji = mask.bool().nonzero(as_tuple=True)                       # [N] answer positions (b, j)
    tgt = fout[bi, ji].float()                                        # [N, D] f_{j+1}
    with torch.no_grad():
        tl = lm(tgt).float()                                          # [N, V] target logits
        tp, tt = tl.softmax(-1), tl.argmax(-1)
    total, wsum, stats, accs = 0.0, 0.0, None, []
    for s, out in enumerate(outs):
        ok = ji >= s                                                  # step s at j - s predicts f_{j+1}
        if not bool(ok.any()):
            break
        o = out[bi[ok], ji[ok] - s]                                   # [N_s, D]
        reg = F.smooth_l1_loss(o.float(), tgt[ok], reduction="none").mean(-1)
        lp = lm(o).float().log_softmax(-1)
        ce = -(tp[ok] * lp).sum(-1)
        w = decay ** s
        total = total + w * (reg + ce_weight * ce).mean()
        wsum += w
        with torch.no_grad():
            accs.append((lp.argmax(-1) == tt[ok]).float().mean())
            if s == 0:
                stats = (reg.mean(), ce.mean(), accs[0])
    return total / wsum, stats, accs


def train_head(head: EagleHead, target, data: dict, epochs: int = 4, lr: float = 3e-4, batch_tokens: int = 4096,
               device="cpu", budget_s: float = 0.0, noise: float = 0.0, seed: int = 0, log=print,
               progress: bool = True, unroll: int = 0, ce_weight: float = 0.1) -> list[float]:
    """Train in place (fp32 master weights); returns the mean training loss of every epoch. With a time
    budget the epoch count is cut after the second epoch to what fits, so the schedule still completes."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    emb, lm = frozen_copy(target)
    head.to(device=device, dtype=torch.float32).train()
    head.bind(emb.to(device), lm.to(device))
    if torch.device(device).type == "cuda":                           # whole dataset on the GPU
        data = {k: (v.to(device) if k in ("tokens", "feats") else v) for k, v in data.items()}
    n = len(data["plens"])
    idx = list(range(n))
    rng.shuffle(idx)
    n_val = min(max(1, n // 20), n - 1) if n > 1 else 0
    val, tr = idx[:n_val], idx[n_val:]
    steps_per_epoch = len(batches(data, tr, batch_tokens, random.Random(0)))
    sch = {"total": max(1, epochs * steps_per_epoch)}
    warm = max(1, sch["total"] // 20)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + math.cos(math.pi * min(1.0, s / sch["total"])))
                                                   * 0.9 + 0.1))
    cuda = torch.device(device).type == "cuda"
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (lambda: torch.autocast("cpu", enabled=False))
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    t0, hist = time.time(), []
    ep = 0
    while ep < epochs:
        bs = batches(data, tr, batch_tokens, rng)
        it = tqdm(bs, desc=f"epoch {ep + 1}/{epochs}", mininterval=5) if (tqdm and progress) else bs
        tot = cnt = 0.0
        stop = False
        for b in it:
            tok, fin, fout, mask = make_batch(data, b, device)
            with ac():
                loss, _, _ = head_loss(head, tok, fin, fout, mask, noise, unroll, ce_weight=ce_weight)
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
        ep += 1
        if ep == 1:
            t1 = time.time()   # epoch 1 carries warm-up (CUDA init, autocast): time the budget on epoch 2
        if ep == 2 and budget_s and epochs > 2:                       # fit the schedule into the budget
            fit = 2 + max(0, int((budget_s - (time.time() - t0)) / max(time.time() - t1, 1e-6)))
            if fit < epochs:
                epochs = fit
                sch["total"] = max(1, epochs * steps_per_epoch)
                log(f"time budget: {epochs} epochs fit in {budget_s:.0f}s")
        msg = f"epoch {ep}: train loss {hist[-1]:.4f}"
        if val:
            with torch.no_grad(), ac():
                vs = [head_loss(head, *make_batch(data, b, device), unroll=unroll)
                      for b in batches(data, val, batch_tokens)]
            reg, ce, acc = (sum(float(v[1][i]) for v in vs) / len(vs) for i in range(3))
            msg += f" | val reg {reg:.4f} ce {ce:.3f} top1 {acc:.3f}"
            if unroll:
                steps = [sum(float(v[2][s]) for v in vs) / len(vs) for s in range(1, unroll + 1)]
                msg += " | unrolled top1 " + " ".join(f"{a:.3f}" for a in steps)
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
    p.add_argument("--unroll", type=int, default=0, help="extra training steps on the head's own predicted features "
                   "(training-time test, as HASS / EAGLE-3: the tree's deeper levels), e.g. 2")
    p.add_argument("--ce-weight", type=float, default=0.1, help="token cross-entropy weight (feature loss weight 1)")
    p.add_argument("--init", default=None, help="start from this head folder (fine-tune) instead of random weights")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--features", default=None, help="feature cache file (reused when it exists)")
    p.add_argument("--gen-budget-s", type=float, default=0.0, help="stop generating after this many seconds (0: no limit)")
    p.add_argument("--train-budget-s", type=float, default=0.0, help="stop training after this many seconds (0: no limit)")
    p.add_argument("--log", default=None, help="log file (default OUT/train_log.txt)")
    p.add_argument("--self-instruct", type=float, default=0.0, help="share of prompts written by the target itself "
                   "(a request kind + a WikiText topic as seed; default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from safetensors.torch import load_file, save_file
    from ..models import load_model
    if args.unroll < 0 or args.ce_weight < 0:
        raise SpecqError("--unroll and --ce-weight must be >= 0")
    for name in ("num_prompts", "max_new_tokens", "gen_batch", "epochs", "batch_tokens"):
        if getattr(args, name) < 1:
            raise SpecqError(f"--{name.replace('_', '-')} must be >= 1")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise SpecqError("--lr must be a positive number")
    if not 0.0 <= args.self_instruct < 1.0:
        raise SpecqError(f"invalid --self-instruct {args.self_instruct}: a share in [0, 1)")
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
        f"specq_eagle_v2_{Path(str(args.model)).stem}_{args.num_prompts}_{args.max_new_tokens}_{args.seed}.safetensors")
    if feat.is_file():
        try:
            data = load_file(str(feat))
        except Exception as e:
            raise SpecqError(f"cannot read feature cache {feat}: {e}") from None
        if data["feats"].shape[1] != target.cfg.hidden_size:
            raise SpecqError(f"feature cache {feat} was made for another model (hidden {data['feats'].shape[1]})")
        log(f"reusing features {feat}: {tuple(data['feats'].shape)}")
    else:
        n_self = int(args.self_instruct * args.num_prompts)
        asks = self_instruct(target, tok, n_self, args.seed, args.gen_batch) if n_self else []
        if n_self:
            log(f"self-instruct: {len(asks)} requests written by the target, e.g. {asks[0][:120]!r}")
        prompts = build_prompts(tok, args.num_prompts - len(asks), args.seed)
        prompts += [tok.chat([{"role": "user", "content": t}]) for t in asks]
        random.Random(args.seed).shuffle(prompts)
        eos = list(tok.eos_ids or target.cfg.eos_token_ids)
        data = make_dataset(target, prompts, args.max_new_tokens, eos, args.gen_batch, args.gen_budget_s, log)
        feat.parent.mkdir(parents=True, exist_ok=True)
        save_file(data, str(feat))
        log(f"features cached at {feat}")
    if args.init:
        from .eagle import load_head
        head = load_head(args.init, target, dtype=torch.float32)
        log(f"fine-tuning {args.init}")
    else:
        head = EagleHead(target.cfg, bias=True)
    t1 = time.time()
    hist = train_head(head, target, data, args.epochs, args.lr, args.batch_tokens, dev, args.train_budget_s,
                      args.noise, args.seed, log, unroll=args.unroll, ce_weight=args.ce_weight)
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
