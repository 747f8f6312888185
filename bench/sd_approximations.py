"""What each of SD's speed approximations saves end to end, and what it costs in quality.

    python bench/sd_approximations.py --work /tmp/kiln-bench [--profiles sd-openvino-int8,...]
        [--deep-cache 3] [--variants "exact;guidance_end=0.5;cache_interval=3"] [--torch]
        [--steps 20] [--runs 2] [--threads 2] [--peers]

An SD-1.5-sized pipeline with random weights (WORK/sd15, shared with bench/sd_speed.py),
built once per profile with `model.deep_cache = --deep-cache` (so that it can run DeepCache;
`cache_interval=1` runs its whole UNet every step: the exact pipeline) under
WORK/artifacts/PROFILE-deep-cache-N, each loaded once; a --profiles entry
`PROFILE+KEY=VALUE+...` builds the profile with those overrides too (an approximation made at
build, `sd-openvino-int8-hybrid+model.token_merging_ratio=0.5`), and its images are compared
with PROFILE's exact one where PROFILE is measured as well. Each variant is a set of generation
settings (`exact`: none; `guidance_end=0.5,cache_interval=3`: both;
`taylorseer_interval=3,taylorseer_warmup=2`: TaylorSeer's forecast) run on every profile's
artifact; each runs a 512x512 text-to-image generation (--steps steps, guidance 7.5, seed 0).
With --torch, diffusers' own pipeline in fp32 (the baseline of the `vs torch` column) is one
more label. Each pipeline runs in a child process of its own (modelkiln/bench/child_call.py;
runtimes in one process slow each other down); all labels are timed interleaved in rounds
(bench/interleaved.py), after one untimed 1-step call each. Quality: PSNR and SSIM of each
image against its profile's exact variant's, same seed. Writes WORK/sd_approximations.json and
.md, and each label's timed rounds as soon as they are measured to
WORK/sd_approximations_rounds.json.

--peers adds optimum-intel's exports of the same source (bench/sd_peer_child.py, run by
`make compat`'s .venv-optimum: int8 weights, and hybrid int8 on the calibration prompts,
each reshaped static to the image size as optimum-intel advises) and OpenVINO GenAI's C++
pipeline on the hybrid export (reshaped to the size and guidance), each in a process of its
own, timed in the same rounds. Our OpenVINO artifacts load with static_shapes (a static
compilation per batch the pipeline calls, `[openvino] static_shapes`), the same footing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

PROMPT = "a photograph of an astronaut riding a horse"
EXACT = "exact"
TORCH = "torch fp32 (diffusers)"
GUIDANCE = 7.5
PEER_CHILD = Path(__file__).with_name("sd_peer_child.py")
OPTIMUM_PYTHON = Path(".venv-optimum/bin/python")
# label -> (Python, sd_peer_child.py kind, the optimum-intel export it runs)
PEERS = {
    "optimum-intel int8 weights": (OPTIMUM_PYTHON, "optimum-intel", "int8"),
    "optimum-intel hybrid int8": (OPTIMUM_PYTHON, "optimum-intel", "hybrid"),
    "OpenVINO GenAI (optimum-intel hybrid int8 IR)": (Path(sys.executable), "genai", "hybrid"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--profiles", default="sd-openvino-int8", help="comma-separated")
    parser.add_argument("--deep-cache", type=int, default=3, help="the build's model.deep_cache")
    parser.add_argument("--variants", default="exact;guidance_end=0.5;cache_interval=3")
    parser.add_argument("--torch", action="store_true", help="diffusers fp32 as a baseline")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a tiny SD: checks the script")
    parser.add_argument("--peers", action="store_true", help="optimum-intel and OpenVINO GenAI")
    args = parser.parse_args()
    variants = {label: settings_of(label) for label in args.variants.split(";")}
    variants.setdefault(EXACT, {})  # the reference of the quality columns
    source = args.work / ("tiny" if args.tiny else "sd15")
    maker = "tiny_sd" if args.tiny else "random_sd15"
    if not (source / "model_index.json").is_file():
        print(f"writing a random pipeline ({maker}) to {source} ...", flush=True)
        code = f"from modelkiln.testing import {maker}; {maker}({str(source)!r})"
        subprocess.run([sys.executable, "-c", code], check=True)
    artifacts = {profile: built(source, profile, args) for profile in args.profiles.split(",")}
    peers = peer_exports(source, args) if args.peers else {}
    report = measure(artifacts, source, variants, args, peers)
    (args.work / "sd_approximations.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.work / "sd_approximations.md").write_text(table)
    print(table)


def built(source: Path, entry: str, args: argparse.Namespace) -> Path:
    """The artifact of `source` for a --profiles entry (`PROFILE` or
    `PROFILE+KEY=VALUE+...`, build overrides) with deep_cache, built unless it is there."""
    profile, *overrides = entry.split("+")
    pairs = [item.partition("=") for item in overrides]
    slug = "".join(f"-{key.rpartition('.')[2]}-{value}" for key, _, value in pairs)
    artifact = args.work / "artifacts" / f"{profile}-deep-cache-{args.deep_cache}{slug}"
    if not (artifact / "kiln.json").is_file():
        print(f"building {artifact.name} ...", flush=True)
        command = [sys.executable, "-m", "modelkiln", "build", str(source)]
        command += ["--profile", profile, "-o", str(artifact)]
        for item in [f"model.deep_cache={args.deep_cache}", *overrides]:
            command += ["--set", item]
        subprocess.run(command, check=True)
    return artifact


def peer_exports(source: Path, args: argparse.Namespace) -> dict[str, Path]:
    """optimum-intel's exports of `source` (WORK/peers/optimum-intel-WEIGHTS), made unless
    they are there, by label. The hybrid one calibrates on sd-openvino-int8-hybrid's prompts
    and as many UNet calls as that profile's calibration makes (prompts × (steps + 1))."""
    from modelkiln.plan import load_profile

    if not OPTIMUM_PYTHON.is_file():
        raise SystemExit(f"{OPTIMUM_PYTHON} is missing: `make compat` creates it")
    calibration = load_profile("sd-openvino-int8-hybrid").calibration
    prompts = list(calibration.prompts)
    samples = calibration.size * (calibration.steps + 1)
    folders = {}
    for label, (_, _, weights) in PEERS.items():
        folder = args.work / "peers" / f"optimum-intel-{weights}"
        if not (folder / "model_index.json").is_file():
            print(f"exporting {folder.name} with optimum-intel ...", flush=True)
            command = [str(OPTIMUM_PYTHON), str(PEER_CHILD), "export", str(source), str(folder)]
            command += ["--weights", weights, "--prompts", ";".join(prompts)]
            command += ["--samples", str(samples)]
            subprocess.run(command, check=True)
            # OpenVINO GenAI reads tokenizer IRs, which optimum-intel writes only beside
            # openvino-tokenizers: ours (what our OpenVINO artifacts get).
            from modelkiln.exporters.openvino import OpenVINOExporter

            OpenVINOExporter().complete(folder)
        folders[label] = folder
    return folders


@contextmanager
def peer_process(
    label: str, folder: Path, size: int, threads: int, scratch: Path
) -> Iterator[Callable[..., Any]]:
    """A peer pipeline loaded in its own process (sd_peer_child.py serve) and a call that
    generates one image there: (settings, steps) -> the image (settings: none apply)."""
    from PIL import Image

    python, kind, _ = PEERS[label]
    command = [str(python), str(PEER_CHILD), "serve", kind, str(folder)]
    command += ["--size", str(size), "--threads", str(threads), "--guidance", str(GUIDANCE)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdin is not None and process.stdout is not None

    def wait_for(marker: str) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip() == marker:
                return
        raise RuntimeError(f"{label}: the peer process exited ({process.wait()}) first")

    try:
        wait_for("@@ready")
        out = scratch / f"{kind}-{folder.name}.png"

        def generate(chosen: dict[str, Any], steps: int) -> Any:
            assert process.stdin is not None
            request = {"steps": steps, "out": str(out), "prompt": PROMPT, "guidance": GUIDANCE}
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
            wait_for("@@done")
            return Image.open(out).convert("RGB")

        yield generate
    finally:
        process.stdin.close()
        process.wait(timeout=120)


def settings_of(label: str) -> dict[str, float | int]:
    """`guidance_end=0.5,cache_interval=3` -> the generation settings (`exact`: none)."""
    if label == EXACT:
        return {}
    settings: dict[str, float | int] = {}
    for part in label.split(","):
        key, _, value = part.partition("=")
        name = key.strip()
        whole = name == "cache_interval" or name.startswith("taylorseer_")
        settings[name] = int(value) if whole else float(value)
    return settings


def measure(
    artifacts: dict[str, Path],
    source: Path,
    variants: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    peers: dict[str, Path],
) -> dict[str, Any]:
    from modelkiln.bench.child_call import call_in_child
    from modelkiln.bench.interleaved import time_interleaved
    from modelkiln.env import cpu_info
    from modelkiln.image_quality import psnr, ssim

    images: dict[str, Any] = {}
    calls: dict[str, Callable[[int], Any]] = {}
    runs: dict[str, tuple[str, str]] = {}  # label -> (profile, variant)
    with ExitStack() as stack:
        # One child process per pipeline: runtimes in one process slow each other down.
        for profile, artifact in artifacts.items():
            generator = stack.enter_context(
                call_in_child(partial(open_generator, artifact, args.threads))
            )
            for variant, chosen in variants.items():
                label = f"{profile}: {variant}"
                runs[label] = (profile, variant)
                calls[label] = partial(generator, chosen)
        if args.torch:
            diffusers = stack.enter_context(
                call_in_child(partial(open_diffusers, source, args.threads))
            )
            calls[TORCH] = partial(diffusers, {})
            runs[TORCH] = ("diffusers", "exact")
        # The model's native size, as ours and diffusers generate: latents × the VAE's scale.
        unet = json.loads((source / "unet" / "config.json").read_text())
        vae = json.loads((source / "vae" / "config.json").read_text())
        pixels = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        for label, folder in peers.items():
            scratch = args.work / "peers"
            peer = stack.enter_context(peer_process(label, folder, pixels, args.threads, scratch))
            calls[label] = partial(peer, {})
            runs[label] = (label, EXACT)

        @contextmanager
        def opener(label: str) -> Iterator[Callable[[], object]]:
            def call() -> None:
                images[label] = calls[label](args.steps)

            yield call

        for call in calls.values():  # compile and first-call costs, untimed
            call(1)
        timings = time_interleaved(list(calls), opener, rounds=args.runs, block=1, warmup=0)
        # The raw rounds first: a long run's timings survive whatever the table does next.
        raw = {label: list(timing.rounds) for label, timing in timings.items()}
        (args.work / "sd_approximations_rounds.json").write_text(json.dumps(raw, indent=2))
        size = images[next(iter(calls))].size[::-1]
    cpu = cpu_info()
    rows = []
    for label, timing in timings.items():
        profile, variant = runs[label]
        # An entry with build overrides is compared with its profile's exact run, if measured.
        base = profile.split("+")[0]
        exact = f"{base if base in artifacts else profile}: {EXACT}"
        own = label != TORCH and label not in peers  # ours: an exact variant to compare with
        compared = own and label != exact
        rows.append(
            {
                "profile": profile,
                "variant": variant,
                "seconds": timing.median,
                "rounds_s": list(timing.rounds),
                "vs_exact": timings[exact].median / timing.median if own else None,
                "vs_torch": timings[TORCH].median / timing.median if TORCH in timings else None,
                "psnr_db": psnr(images[label], images[exact]) if compared else None,
                "ssim": ssim(images[label], images[exact]) if compared else None,
                "psnr_vs_torch_db": psnr(images[label], images[TORCH])
                if TORCH in images and label != TORCH
                else None,
            }
        )
    return {
        "machine": f"{cpu['model']} ({', '.join(cpu['features'])}), {args.threads} threads",
        "profiles": list(artifacts),
        "deep_cache": args.deep_cache,
        "model": "a tiny SD" if args.tiny else "SD-1.5-sized",
        "size": list(size),
        "steps": args.steps,
        "runs": args.runs,
        "rows": rows,
    }


@contextmanager
def open_generator(artifact: Path, threads: int) -> Iterator[Callable[..., Any]]:
    """In a child: the artifact loaded; (settings, steps) -> one seeded image, with
    cache_interval 1 unless the settings say (the artifact's default is its build's). An
    OpenVINO artifact compiles static shapes as it is called (as the peers are reshaped)."""
    from modelkiln import load
    from modelkiln.artifact import read_manifest

    static = {"static_shapes": True} if read_manifest(artifact).runtime == "openvino" else {}
    with load(artifact, threads=threads, **static) as pipeline:

        def generate(chosen: dict[str, Any], steps: int) -> Any:
            settings = {"cache_interval": 1, **chosen}
            settings |= {"steps": steps, "guidance": GUIDANCE, "seed": 0}
            return pipeline.text_to_image(PROMPT, **settings)[0]

        yield generate


@contextmanager
def open_diffusers(source: Path, threads: int) -> Iterator[Callable[..., Any]]:
    """In a child: diffusers' StableDiffusionPipeline in fp32, eager (the torch baseline);
    (settings, steps) -> one seeded image (settings: none apply)."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(threads)
    pipeline = StableDiffusionPipeline.from_pretrained(source)
    pipeline.set_progress_bar_config(disable=True)

    def generate(chosen: dict[str, Any], steps: int) -> Any:
        with torch.inference_mode():
            generator = torch.Generator().manual_seed(0)
            return pipeline(
                PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generator
            ).images[0]

    yield generate


def markdown(report: dict[str, Any]) -> str:
    height, width = report["size"]
    lines = [
        f"{', '.join(f'`{p}`' for p in report['profiles'])}, each built with "
        f"`model.deep_cache = {report['deep_cache']}`, "
        f"{report['model']} with random weights, {width}×{height}, {report['steps']} steps, "
        f"guidance {GUIDANCE}, one image; {report['machine']}; medians of {report['runs']} "
        "interleaved runs.",
        "",
        "| profile | variant | end to end | vs exact | vs torch fp32 | PSNR / SSIM vs exact "
        "| PSNR vs torch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        quality = "—" if row["psnr_db"] is None else f"{row['psnr_db']:.1f} dB / {row['ssim']:.3f}"
        versus_torch = "—" if row["vs_torch"] is None else f"{row['vs_torch']:.2f}×"
        versus_exact = "—" if row["vs_exact"] is None else f"{row['vs_exact']:.2f}×"
        to_torch = row.get("psnr_vs_torch_db")
        from_torch = "—" if to_torch is None else f"{to_torch:.1f} dB"
        lines.append(
            f"| {row['profile']} | {row['variant']} | {row['seconds']:.1f} s | {versus_exact} "
            f"| {versus_torch} | {quality} | {from_torch} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
