"""exporters/xnnpack_rewrites.py: the rewritten norms and attention compute torch's numbers,
the model is given back as it was, and programs built with the rewrites leave XNNPACK larger
graphs (no LayerNorm, GroupNorm or safe softmax on the portable kernels)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelkiln import load, open_artifact

pytestmark = [pytest.mark.torch, pytest.mark.executorch]

# The norms XNNPACK has no kernel for, and what only torch's SDPA decomposition (its safe
# softmax) puts in these graphs (eq also compares CLIP's token ids to its end token).
UNDELEGATED_BEFORE = (
    "aten_native_layer_norm_default",
    "aten_native_group_norm_default",
    "aten_any_dim",
    "aten_logical_not_default",
)


def _delegation(entry: Path) -> dict[str, object]:
    folder = entry if entry.is_dir() else entry.parent
    data: dict[str, object] = json.loads((folder / "delegation.json").read_text())
    return data


@pytest.mark.parametrize("affine", [True, False])
def test_the_layer_norm_is_torchs(affine: bool) -> None:
    import torch

    from modelkiln.exporters.xnnpack_rewrites import DelegableLayerNorm

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(48, eps=1e-6, elementwise_affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 7, 48) * 5 + 2
    torch.testing.assert_close(DelegableLayerNorm(norm)(x), norm(x), atol=2e-5, rtol=1e-5)


def test_the_group_norm_is_torchs() -> None:
    import torch

    from modelkiln.exporters.xnnpack_rewrites import DelegableGroupNorm

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 32, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    rewritten = DelegableGroupNorm(norm)
    for shape in [(2, 32, 5, 6), (2, 32, 30)]:  # the VAE's attention normalises (B, C, H*W)
        x = torch.randn(*shape) * 3 - 1
        torch.testing.assert_close(rewritten(x), norm(x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", ["none", "float", "bool", "causal", "scale", "3d"])
def test_the_attention_is_torchs(mask: str) -> None:
    import torch
    import torch.nn.functional as F

    from modelkiln.exporters.xnnpack_rewrites import delegable_attention

    torch.manual_seed(0)
    shape = (2, 3, 5, 8) if mask != "3d" else (6, 5, 8)
    q, k, v = torch.randn(*shape), torch.randn(*shape), torch.randn(*shape)
    kwargs: dict[str, object] = {}
    if mask == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 5, 5)
    elif mask == "bool":  # every row keeps a key: no fully masked row
        kwargs["attn_mask"] = (torch.rand(2, 1, 5, 5) > 0.5) | torch.eye(5, dtype=torch.bool)
    elif mask == "causal":
        kwargs["is_causal"] = True
    elif mask == "scale":
        kwargs["scale"] = 0.3
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)  # type: ignore[arg-type]
    actual = delegable_attention(q, k, v, **kwargs)  # type: ignore[arg-type]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_the_model_and_torch_are_given_back_as_they_were_even_after_an_error() -> None:
    import torch
    import torch.nn.functional as F

    from modelkiln.exporters.xnnpack_rewrites import (
        DelegableGroupNorm,
        DelegableLayerNorm,
        delegable,
    )

    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.GroupNorm(2, 8))
    originals = list(model)
    sdpa = F.scaled_dot_product_attention
    with delegable(model):
        assert isinstance(model[0], DelegableLayerNorm)
        assert isinstance(model[1], DelegableGroupNorm)
        assert F.scaled_dot_product_attention is not sdpa
    assert list(model) == originals and F.scaled_dot_product_attention is sdpa
    with pytest.raises(RuntimeError, match="traced badly"), delegable(model):
        raise RuntimeError("traced badly")
    assert list(model) == originals and F.scaled_dot_product_attention is sdpa


def test_the_vit_program_leaves_xnnpack_fewer_and_larger_pieces(
    built: Callable[..., Path],
) -> None:
    rewritten = built("hf-classifier", "vit-executorch-fp32")
    plain = built("hf-classifier", "vit-executorch-fp32", "executorch.rewrite_for_xnnpack=false")
    ours, theirs = _delegation(rewritten), _delegation(plain)
    portable = ours["portable_ops"]
    assert isinstance(portable, dict)
    assert not any(op in portable for op in UNDELEGATED_BEFORE)
    vit_ops = ("aten_native_layer_norm_default", "aten_any_dim", "aten_logical_not_default")
    assert all(op in theirs["portable_ops"] for op in vit_ops)  # type: ignore[operator]
    # The tiny ViT's two layers: 23 pieces and 111 portable nodes as exported.
    assert ours["delegated_subgraphs"] < theirs["delegated_subgraphs"] / 1.5  # type: ignore[operator]
    assert ours["portable_nodes"] < theirs["portable_nodes"] / 1.5  # type: ignore[operator]
    with load(rewritten) as fast, load(plain) as slow:
        pixels = np.random.default_rng(2).standard_normal((5, 3, 32, 32)).astype(np.float32)
        a = fast.session.run({"pixel_values": pixels})["logits"]
        b = slow.session.run({"pixel_values": pixels})["logits"]
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.slow
def test_the_sd_programs_keep_their_norms_and_attention_in_xnnpack(
    built: Callable[..., Path],
) -> None:
    artifact = built("sd", "sd-executorch-fp32")
    manifest = open_artifact(artifact).manifest
    for name, record in manifest.components.items():
        portable = _delegation(artifact / record.entry)["portable_ops"]
        assert isinstance(portable, dict)
        assert not any(op in portable for op in UNDELEGATED_BEFORE), (name, portable)
        assert record.validation.passed


def test_layers_sharing_a_boolean_mask_convert_it_once() -> None:
    import torch
    import torch.nn.functional as F

    from modelkiln.exporters.xnnpack_rewrites import delegable

    class TwoLayers(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = torch.ones(x.shape[-2], x.shape[-2], dtype=torch.bool).tril()
            for _ in range(2):
                x = F.scaled_dot_product_attention(x, x, x, attn_mask=mask)
            return x

    model = TwoLayers()
    x = torch.randn(2, 3, 5, 8)
    with delegable(model):
        program = torch.export.export(model, (x,), strict=False)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("masked_fill" in t for t in targets) == 1
    assert sum("bmm" in t for t in targets) == 4
    torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)
