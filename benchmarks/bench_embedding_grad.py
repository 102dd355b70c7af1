"""The tied embedding's row-sparse backward against PyTorch's dense one, on a training micro-batch.

One optimizer step's forward + backward (two micro-batches of 16 rows: 2 prompts × G=8 each, shared
prompts, as `benchmarks/vs_trl.py` trains), timed alternately with the dense embedding backward and
with apo's row-sparse one (apo_cli/train/embedding.py), ``--rounds`` times each; prints the median
seconds of each and whether the gradients are equal bit for bit.

Usage::

    APO_CACHE=/tmp/apocache python benchmarks/bench_embedding_grad.py --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apo_cli.runtime.threads import configure_process  # noqa: E402  (before torch, as the apo command)

configure_process()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from apo_cli.batching import completion_logprobs, pack
    from apo_cli.models import quiet_transformers, resolve_model_path
    from apo_cli.train.embedding import row_gradient_embedding

    quiet_transformers()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model, 0), dtype=torch.float32).train()
    vocab = model.get_input_embeddings().weight.shape[0]
    rand = lambda n: torch.randint(3, vocab, (n,)).tolist()  # noqa: E731
    prompts = [rand(38)] * 8 + [rand(36)] * 8
    completions = [rand(int(n)) for n in torch.randint(8, 17, (16,))]
    packed = pack(prompts, completions, 0)
    emb = model.get_input_embeddings()
    dense_forward = emb.forward
    if not row_gradient_embedding(model, torch.device("cpu")):
        raise SystemExit(f"{args.model}: its input embedding is not tied to the output head; nothing to compare")
    rows_forward = emb.forward

    def step() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for _ in range(2):
            logp, _ = completion_logprobs(model, packed, with_entropy=True)
            (-(logp.sum() / packed.mask.sum())).backward()
        return time.perf_counter() - t0, [p.grad.clone() for p in model.parameters()]

    times: dict[str, list[float]] = {"dense": [], "rows": []}
    grads: dict[str, list[torch.Tensor]] = {}
    step()  # warm-up
    for r in range(args.rounds):
        for kind in (("dense", "rows") if r % 2 == 0 else ("rows", "dense")):
            emb.forward = dense_forward if kind == "dense" else rows_forward
            s, grads[kind] = step()
            times[kind].append(s)
    d, w = statistics.median(times["dense"]), statistics.median(times["rows"])
    same = all(torch.equal(a, b) for a, b in zip(grads["dense"], grads["rows"]))
    print(f"{args.model}: forward + backward of 2 micro-batches x 16 rows, {args.threads} threads, "
          f"{args.rounds} rounds each, alternating")
    print(f"  dense embedding backward   {d:.3f} s (median; {', '.join(f'{x:.2f}' for x in times['dense'])})")
    print(f"  row-sparse (apo)           {w:.3f} s (median; {', '.join(f'{x:.2f}' for x in times['rows'])})")
    print(f"  {100 * (d - w) / d:.1f} % less time; gradients equal bit for bit: {same}")


if __name__ == "__main__":
    main()
