"""Offline by construction: tiny models from configs, built once per session and shared."""

from __future__ import annotations

import importlib.util
import os

# Before anything imports huggingface_hub / transformers: no test may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# pytest-xdist's workers run with COLUMNS=80, and rich fixes a console's width from COLUMNS
# when the console is made (modelkiln.cli's, at import); the CLI tests set a width per call.
os.environ.pop("COLUMNS", None)

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from cli_support import Outcome


def _backend_markers() -> dict[str, tuple[str, str]]:
    """marker -> (import name that must be present, why it skips otherwise): one per
    registered backend, from its descriptor."""
    from modelkiln.backends import backends

    markers = {}
    for backend in backends():
        package = backend.packages[0]
        needs = f"; running it needs {backend.needs}" if backend.needs else ""
        reason = f"{package} is not installed (pip install 'modelkiln[{backend.name}]'){needs}"
        markers[backend.name] = (package, reason)
    return markers


BACKEND_MARKERS = _backend_markers()


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = {
        marker: reason
        for marker, (package, reason) in BACKEND_MARKERS.items()
        if importlib.util.find_spec(package) is None
    }
    cuda = None
    for item in items:
        for marker, reason in missing.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
        if "gpu" in item.keywords:
            cuda = _has_cuda() if cuda is None else cuda
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


SOURCES = {
    "hf-classifier": lambda d: _testing().tiny_hf_vit(d, classifier=True),
    "hf-backbone": lambda d: _testing().tiny_hf_vit(d, classifier=False),
    # Every linear weight above coremltools' compression threshold (2048 elements).
    "hf-classifier-64": lambda d: _testing().tiny_hf_vit(d, classifier=True, hidden_size=64),
    "timm-classifier": lambda d: _testing().tiny_timm_vit(d),
    "timm-backbone": lambda d: _testing().tiny_timm_vit(d, num_classes=0),
    # The encoders built like ViT: DeiT (distillation token), DINOv2 (and registers), CLIP's
    # and SigLIP's vision towers.
    "deit-classifier": lambda d: _testing().tiny_hf_encoder(d, "deit", classifier=True),
    "dinov2-classifier": lambda d: _testing().tiny_hf_encoder(d, "dinov2", classifier=True),
    "dinov2-registers": lambda d: _testing().tiny_hf_encoder(d, "dinov2-registers"),
    "clip": lambda d: _testing().tiny_hf_encoder(d, "clip"),
    "siglip-vision": lambda d: _testing().tiny_hf_encoder(d, "siglip-vision"),
    # ... and as timm builds them.
    "timm-deit-distilled": lambda d: _testing().tiny_timm_vit(
        d, architecture="deit_tiny_distilled_patch16_224"
    ),
    "timm-dinov2-registers": lambda d: _testing().tiny_timm_vit(
        d, num_classes=0, architecture="vit_small_patch14_reg4_dinov2"
    ),
    "timm-clip": lambda d: _testing().tiny_timm_vit(
        d, num_classes=0, architecture="vit_base_patch16_clip_224"
    ),
    "sd": lambda d: _testing().tiny_sd(d),
    "sd-inpaint": lambda d: _testing().tiny_sd(d, inpaint=True),
    "sd-v": lambda d: _testing().tiny_sd(d, prediction_type="v_prediction"),
    "sd-controlnet": lambda d: _testing().tiny_sd(d, controlnet=1),
    "sd-multicontrolnet": lambda d: _testing().tiny_sd(d, controlnet=2),
    "sdxl-controlnet": lambda d: _testing().tiny_sdxl(d, controlnet=1),
    "sdxl": lambda d: _testing().tiny_sdxl(d),
    "sdxl-inpaint": lambda d: _testing().tiny_sdxl(d, inpaint=True),
    # What single files hold: SD 2.x's OpenCLIP text encoder, SDXL's two of different widths.
    "sd2": lambda d: _testing().tiny_sd(d, prediction_type="v_prediction", text_hidden_act="gelu"),
    "sdxl-wide": lambda d: _testing().tiny_sdxl(d, text_encoder_2_width=48),
    "sdxl-inpaint-wide": lambda d: _testing().tiny_sdxl(d, inpaint=True, text_encoder_2_width=48),
    "sd3": lambda d: _testing().tiny_sd3(d),
    "sd3-no-t5": lambda d: _testing().tiny_sd3(d, t5=False),
    # SD 3.5's qk-norm and SD 3.5 Medium's dual attention
    "sd3.5": lambda d: _testing().tiny_sd3(d, qk_norm="rms_norm", dual_attention_layers=(0,)),
    "flux-dev": lambda d: _testing().tiny_flux(d, guidance=True),
    "flux-schnell": lambda d: _testing().tiny_flux(d, guidance=False),
}


def _testing():  # type: ignore[no-untyped-def]
    from modelkiln import testing

    return testing


def _shared_folder(tmp_path_factory: pytest.TempPathFactory, *parts: str) -> Path:
    """A folder of this run shared by pytest-xdist's workers (their base folders' parent)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return root.joinpath("shared", *parts)


def _made_once(folder: Path, make: Callable[[Path], Path]) -> Path:
    """make(folder) the first time any worker asks for `folder`; later asks (this worker's or
    another's) wait for it and reuse it. Each worker builds what its test files need, and
    files on both workers need the same tiny pipelines: a build is made once per run."""
    import shutil

    from filelock import FileLock

    done = folder.with_name(f"{folder.name}.done")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.with_name(f"{folder.name}.lock"))):
        if not done.is_file():
            if folder.exists():  # what a failed attempt left
                shutil.rmtree(folder)
            made = make(folder)
            done.write_text(str(made), encoding="utf-8")
        return Path(done.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """source_dir("hf-classifier") -> a saved tiny model directory (written once per run)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            folder = _shared_folder(tmp_path_factory, "sources", name)
            cache[name] = _made_once(folder, SOURCES[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def built(
    tmp_path_factory: pytest.TempPathFactory, source_dir: Callable[[str], Path]
) -> Callable[..., Path]:
    """built("hf-classifier", "vit-onnxruntime-fp32", "shapes.dynamic_batch=false") -> artifact.

    Each (source, profile, overrides) is built once per run and must not be modified by
    tests (copy it first).
    """
    import hashlib

    from modelkiln import build

    cache: dict[tuple[str, str, tuple[str, ...]], Path] = {}

    def get(source: str, profile: str, *overrides: str) -> Path:
        key = (source, profile, overrides)
        if key not in cache:
            digest = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:12]
            folder = _shared_folder(tmp_path_factory, "artifacts", f"{source}-{profile}-{digest}")
            cache[key] = _made_once(
                folder,
                lambda out: build(source_dir(source), profile, out, overrides=overrides),
            )
        return cache[key]

    return get


def _build_distributions(out: Path) -> Path:
    """`python -m build` of this checkout into `out`: the sdist, then the wheel built from it
    (as a user building the repository gets them). Skips where the build backend (hatchling)
    cannot be installed from the package index."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("build")
    except PackageNotFoundError:
        pytest.skip("PyPA build is not installed (pip install build, or the dev extra)")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out.parent,
    )
    if done.returncode != 0:
        output = f"{done.stdout}\n{done.stderr}"
        if "* Building" not in output:  # the backend never ran: installing it failed
            pytest.skip(f"cannot install the build backend here: {output.strip()[-300:]}")
        raise AssertionError(f"python -m build failed:\n{output.strip()[-3000:]}")
    return out


@pytest.fixture(scope="session")
def distributions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, sdist) of this checkout, built once per run and shared by pytest-xdist's
    workers. Don't modify them: install them, or copy them first."""
    folder = _made_once(_shared_folder(tmp_path_factory, "dist"), _build_distributions)
    (wheel,) = folder.glob("*.whl")
    (sdist,) = folder.glob("*.tar.gz")
    return wheel, sdist


@pytest.fixture(scope="session")
def wheel(distributions: tuple[Path, Path]) -> Path:
    """The wheel `pip install` gets (built from the sdist), once per run."""
    return distributions[0]


@pytest.fixture
def rgb_images() -> list[np.ndarray]:
    """Three random RGB images of different sizes."""
    rng = np.random.default_rng(7)
    return [
        rng.integers(0, 256, size=shape, dtype=np.uint8)
        for shape in ((40, 50, 3), (32, 32, 3), (64, 48, 3))
    ]


@pytest.fixture
def image_files(tmp_path: Path, rgb_images: list[np.ndarray]) -> Iterator[list[Path]]:
    from PIL import Image

    paths = []
    for i, array in enumerate(rgb_images):
        path = tmp_path / f"image_{i}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    yield paths


@pytest.fixture
def kiln_main(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Outcome]:
    """kiln_main(*args) -> Outcome of modelkiln.cli.main, the real entry point, in-process."""
    # main() setdefaults TRANSFORMERS_VERBOSITY; keep the process environment as it was.
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    from cli_support import WIDE, Outcome

    from modelkiln.cli import main

    for key, value in WIDE.items():
        monkeypatch.setenv(key, value)

    def run(*args: object) -> Outcome:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        code = exited.value.code
        return Outcome(code if isinstance(code, int) else 1, captured.out, captured.err)

    return run


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """small_disk("1m", read_only=False) -> a fresh tmpfs of that size mounted in tmp_path.

    Skips where mounting is not allowed (not root, macOS, a container without the right).
    """
    mounted: list[Path] = []

    def mount(size: str = "1m", *, read_only: bool = False) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError as error:
            pytest.skip(f"cannot mount a tmpfs here: {error}")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)
