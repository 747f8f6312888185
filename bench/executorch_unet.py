"""One SD UNet step as an ExecuTorch XNNPACK program, lowered with or without the
`[executorch] rewrite_for_xnnpack` rewrites (exporters/xnnpack_rewrites.py), batch dynamic or
static, its GEGLUs split as the build exports them (--split-geglu, models/geglu_split.py), with
or without the lowering's constant folding (--no-fold: as lowered before it): what the build's
lowering gives, without the build's validation (a whole SD-1.5 UNet validates for minutes on 2
cores).

    python bench/executorch_unet.py UNET_DIR [--rewrite] [--dynamic] [--split-geglu]
        [--no-fold] [--batch 2] [--calls 2]

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
    parser.add_argument("--split-geglu", action="store_true", help="as the build exports them")
    parser.add_argument("--no-fold", action="store_true", help="no constant folding")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    from diffusers import UNet2DConditionModel
    from executorch.runtime import Runtime

    from modelkiln.exporters import executorch
    from modelkiln.exporters.executorch import lower
    from modelkiln.exporters.xnnpack_rewrites import delegable
    from modelkiln.runtimes.executorch import set_threads

    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    unet = UNet2DConditionModel.from_pretrained(args.unet).eval()
    if args.split_geglu:
        from modelkiln.models.geglu_split import split_geglu_projections

        unet = split_geglu_projections(unet)
    if args.no_fold:
        executorch.constant_folding = _no_folding

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
        f"rewrite={args.rewrite} dynamic={args.dynamic} split_geglu={args.split_geglu} "
        f"fold={not args.no_fold}: lowered in "
        f"{time.perf_counter() - started:.0f} s, {delegation['delegated_subgraphs']} XNNPACK "
        f"subgraphs, {delegation['portable_nodes']} portable nodes "
        f"({', '.join(f'{op} {n}' for op, n in delegation['portable_ops'].items())})",
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


def _no_folding() -> Any:
    """An edge-program pass that changes nothing: the lowering as it was before folding."""
    from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult

    class Unchanged(ExportedProgramPassBase):
        def call(self, exported_program: Any) -> Any:
            return ExportedProgramPassResult(exported_program, False)

    return Unchanged()


if __name__ == "__main__":
    main()
