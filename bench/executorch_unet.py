"""One SD UNet step as an ExecuTorch XNNPACK program, lowered with or without the
`[executorch] rewrite_for_xnnpack` rewrites (exporters/xnnpack_rewrites.py), batch dynamic or
static: what the build's lowering gives, without the build's validation (a whole SD-1.5 UNet
validates for minutes on 2 cores).

    python bench/executorch_unet.py UNET_DIR [--rewrite] [--dynamic] [--batch 2] [--calls 2]

UNET_DIR: a diffusers UNet2DConditionModel folder (bench/sd_speed.py writes an SD-1.5-sized
one with random weights under WORK/sd15/unet). Run each variant in a process of its own; it
prints the lowering's subgraph and portable-node counts and each call's seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("unet")
    parser.add_argument("--rewrite", action="store_true")
    parser.add_argument("--dynamic", action="store_true", help="batch 1..2*batch, as the profile")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    from diffusers import UNet2DConditionModel
    from executorch.runtime import Runtime

    from modelkiln.exporters.executorch import lower
    from modelkiln.exporters.xnnpack_rewrites import delegable
    from modelkiln.runtimes.executorch import set_threads

    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    unet = UNet2DConditionModel.from_pretrained(args.unet).eval()

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample: Any, timestep: Any, context: Any) -> Any:
            return self.unet(sample, timestep, encoder_hidden_states=context).sample

    step = Step()
    size = unet.config.sample_size
    width = unet.config.cross_attention_dim
    feeds = (
        torch.randn(args.batch, unet.config.in_channels, size, size),
        torch.tensor(500.0),
        torch.randn(args.batch, 77, width),
    )
    shapes = None
    if args.dynamic:
        batch = torch.export.Dim("batch", min=1, max=2 * args.batch)
        shapes = ({0: batch}, None, {0: batch})
    started = time.perf_counter()
    rewritten = delegable(step) if args.rewrite else contextlib.nullcontext()
    with torch.no_grad(), rewritten:
        program = torch.export.export(step, feeds, dynamic_shapes=shapes, strict=False)
    buffer, delegation = lower(program, "xnnpack")
    print(
        f"rewrite={args.rewrite} dynamic={args.dynamic}: lowered in "
        f"{time.perf_counter() - started:.0f} s, {delegation['delegated_subgraphs']} XNNPACK "
        f"subgraphs, {delegation['portable_nodes']} portable nodes",
        flush=True,
    )
    del program
    method = Runtime.get().load_program(buffer).load_method("forward")
    for _ in range(args.calls):
        started = time.perf_counter()
        method.execute(list(feeds))
        print(f"step at batch {args.batch}: {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    with torch.no_grad():
        step(*feeds)
    print(f"torch eager fp32: {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
