"""One-token attention at Llama-3-8B / 70B head shapes: the two-launch decode kernels (specq.kernels.decode_attn:
rope + cache write + split attention, then the merge) against the three-launch path it replaces (specq.kernels.rope, then
attention.py's split and merge kernels). 32 layers of distinct caches per pass, CUDA-graph replays, us per layer.
Variants: STAGES (pipelined key blocks), WARPS (split, merge), BLOCK (keys per step; a slice is whole blocks). Session 10 also measured, with flags since removed: one launch with the
merge in the split kernel (last program on an atomic counter), slices of at least 128 / 256 / 512 keys.
PYTHONPATH=$PWD python3 bench/dev/decode_attn_ab.py"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.kernels import graph_time  # noqa: E402
from specq.kernels import attention as DA, decode_attn as DE, rope as RC  # noqa: E402


BASE = {"STAGES": DE.STAGES, "WARPS": DE.WARPS, "BLOCK": DE.BLOCK}
VARIANTS = {"default": {}, "b128": {"BLOCK": 128}, "b256": {"BLOCK": 256}, "b128w8": {"BLOCK": 128, "WARPS": (8, 1)},
            "b256w8": {"BLOCK": 256, "WARPS": (8, 1)}, "b64w8": {"WARPS": (8, 1)}}


@torch.no_grad()
def main():
    dev, L = "cuda", 32
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, us per layer (one token, {L} layers per pass)")
    for nh, nkv, S in ((32, 8, 4096), (64, 8, 4096)):
        caches = [(torch.randn(nkv, S, 128, device=dev, dtype=torch.bfloat16),
                   torch.randn(nkv, S, 128, device=dev, dtype=torch.bfloat16)) for _ in range(L)]
        qkv = torch.randn(1, (nh + 2 * nkv) * 128, device=dev, dtype=torch.bfloat16)
        ang = torch.rand(1, 64, device=dev) * 6
        cos, sin = torch.cat((ang, ang), -1).cos().bfloat16(), torch.cat((ang, ang), -1).sin().bfloat16()
        for slot in (128, 255, 512, 2048, 4000):
            slots = torch.tensor([slot], device=dev)
            mask = torch.zeros(1, S, dtype=torch.bool, device=dev)
            mask[0, :slot + 1] = True
            old = [lambda k=k, v=v: DA._run(RC._run(qkv, cos, sin, slots, k, v, nh, nkv), k, v, mask) for k, v in caches]
            new = [lambda k=k, v=v: DE._run(qkv, cos, sin, slots, k, v, mask, nh, nkv) for k, v in caches]
            line = f"  H={nh:<3d} Hkv={nkv} slot={slot:<5d} three launches {graph_time(old, reps=5) / L:6.2f} | two launches"
            for name, var in VARIANTS.items():
                for key, val in {**BASE, **var}.items():
                    setattr(DE, key, val)
                line += f"  {name} {graph_time(new, reps=5) / L:6.2f}"
            print(line)
    for key, val in BASE.items():
        setattr(DE, key, val)


if __name__ == "__main__":
    main()
