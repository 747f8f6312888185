"""Sessions and pipelines are safe to share between threads: every call gets its own answer.

One loaded classifier, 8 threads, 1,000 calls each, every thread with its own image: each
answer must be bit-identical to what that image gives alone (a shared OpenVINO infer request
once returned another thread's logits). A diffusion pipeline generating from several threads
gives each prompt the image it gives alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelkiln import load

THREADS = 8
CALLS = 1000


@pytest.mark.parametrize(
    ("profile", "overrides"),
    [
        pytest.param("vit-onnxruntime-fp32", (), marks=pytest.mark.onnxruntime, id="onnxruntime"),
        pytest.param("vit-openvino-fp32", (), marks=pytest.mark.openvino, id="openvino"),
        # Several infer requests at once: the pool, not only a lock.
        pytest.param(
            "vit-openvino-fp32",
            ("openvino.performance_hint=throughput",),
            marks=pytest.mark.openvino,
            id="openvino-throughput",
        ),
        # One static compilation (batch 1), its infer requests shared by the threads.
        pytest.param(
            "vit-openvino-fp32",
            ("openvino.static_shapes=true",),
            marks=pytest.mark.openvino,
            id="openvino-static-shapes",
        ),
        pytest.param("vit-torch-fp32", (), marks=pytest.mark.torch, id="torch"),
    ],
)
def test_one_session_from_eight_threads_gives_each_call_its_own_answer(
    profile: str, overrides: tuple[str, ...], built: Callable[..., Path]
) -> None:
    artifact = built("hf-classifier", profile, *overrides)
    rng = np.random.default_rng(3)
    with load(artifact) as pipeline:
        session = pipeline.session
        feeds = [
            {"pixel_values": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}
            for _ in range(THREADS)
        ]
        expected = [session.run(feed)["logits"] for feed in feeds]
        assert len({e.tobytes() for e in expected}) == THREADS, "the images must differ"
        wrong: list[int] = []
        failures: list[BaseException] = []
        start = threading.Barrier(THREADS)

        def hammer(index: int) -> None:
            start.wait()
            try:
                for _ in range(CALLS):
                    got = session.run(feeds[index])["logits"]
                    if not np.array_equal(got, expected[index]):
                        wrong.append(index)
            except BaseException as error:  # collected: a thread's exception is otherwise lost
                failures.append(error)

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    assert wrong == []


@pytest.mark.torch
@pytest.mark.openvino
def test_a_diffusion_pipeline_generates_each_prompt_as_alone_from_several_threads(
    built: Callable[..., Path],
) -> None:
    artifact = built("sd", "sd-openvino-fp32")
    prompts = ["a red cube", "a blue sphere", "a green cone"]
    with load(artifact) as pipeline:
        alone = [np.asarray(pipeline.text_to_image(p, steps=2, seed=5)[0]) for p in prompts]
        together: dict[int, np.ndarray] = {}
        failures: list[BaseException] = []

        def generate(index: int) -> None:
            try:
                image = pipeline.text_to_image(prompts[index], steps=2, seed=5)[0]
                together[index] = np.asarray(image)
            except BaseException as error:
                failures.append(error)

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    for index, image in enumerate(alone):
        np.testing.assert_array_equal(together[index], image)
