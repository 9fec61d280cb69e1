"""Model-level conformance: the same prompts on a backend and on the reference, compared.

Reports top-1 agreement of the next-token prediction at every prompt position and the KL
divergence KL(p_reference || p_backend) of the next-token distributions (max and mean).
"""
from __future__ import annotations

import torch

PROMPTS = ([1, 17, 42, 99, 5, 230, 311, 64, 77, 128, 9, 400, 33, 250, 18, 71, 150, 260, 3, 88],
           [7, 300, 21, 64, 12, 5, 99, 401, 2, 56, 19])
BUDGET = {"top1_min": 0.98, "kl_max": 1e-3}


def compare_model(name_or_path: str, backend: str, *, seed: int = 0, dtype=torch.float32) -> dict:
    """Run the prompts' prefill on ``backend`` and on the CPU reference; compare distributions."""
    import hal
    import hal.models as M
    ref_model = M.load(name_or_path, "cpu", dtype=dtype)
    model = M.load(name_or_path, backend, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    prompts = [[int(t) % V for t in p] for p in PROMPTS] + [torch.randint(0, V, (15,), generator=g).tolist()]
    ref = M.generate(ref_model, prompts, max_new_tokens=1).prefill_logits
    got = M.generate(model, prompts, max_new_tokens=1).prefill_logits
    per_prompt, kls = [], []
    for b, p in enumerate(prompts):
        r, x = ref[b, :len(p)].double(), got[b, :len(p)].double()
        per_prompt.append((r.argmax(-1) == x.argmax(-1)).tolist())
        lp, lq = torch.log_softmax(r, -1), torch.log_softmax(x, -1)
        kls.append((lp.exp() * (lp - lq)).sum(-1))
    kl = torch.cat(kls)
    agree = [a for row in per_prompt for a in row]
    top1 = sum(agree) / len(agree)
    return {"model": str(name_or_path), "backend": model.rt.backend_name, "label": model.rt.label,
            "plan": model.rt.plan_dict(), "prompts": prompts, "per_position_top1": per_prompt, "top1_agreement": top1,
            "kl_max": float(kl.max()), "kl_mean": float(kl.mean()), "budget": dict(BUDGET),
            "passed": top1 >= BUDGET["top1_min"] and float(kl.max()) <= BUDGET["kl_max"],
            "hal_version": hal.__version__}
