"""--executor ray: resource requests, a local 2-CPU cluster running a small matrix as local
execution does, and the errors of a cluster that cannot run it (one line, within a timeout)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from cli_support import assert_one_line_error, invoke, kiln
from PIL import Image

from modelkiln.bench.matrix import BuildJob
from modelkiln.build_cache import BuildCache, built_key
from modelkiln.cluster.resources import (
    ClusterSettings,
    Request,
    backend_resources,
    checkpoint_memory,
    require_fit,
)
from modelkiln.errors import ClusterError, ReportError
from modelkiln.memory_budget import OVERHEAD_BYTES, fp32_bytes
from modelkiln.plan import load_profile

pytestmark = [pytest.mark.onnxruntime, pytest.mark.openvino]

NODE = {"Alive": True, "NodeID": "n1", "Resources": {"CPU": 2.0, "memory": 24e9}}


def test_the_ray_table_is_checked() -> None:
    settings = ClusterSettings.from_table(
        {"build_cpus": 4, "timeout_s": 60, "resources": {"coreml": {"macos": 1}}}, "m [ray]"
    )
    assert settings == ClusterSettings(4, 60.0, {"coreml": {"macos": 1.0}})
    for table, message in (
        ({"build_cpu": 2}, "unknown key 'build_cpu'"),
        ({"build_cpus": 0}, "build_cpus must be a positive integer"),
        ({"timeout_s": -1}, "timeout_s must be a positive number"),
        ({"resources": {"coreml": 1}}, "resources.coreml = { macos = 1 }"),
    ):
        with pytest.raises(ReportError, match=message):
            ClusterSettings.from_table(table, "m [ray]")


def test_backends_and_the_matrix_say_what_their_workers_need() -> None:
    settings = ClusterSettings(resources={"coreml": {"macos": 1}, "tensorrt": {"GPU": 2}})
    assert backend_resources(("onnx", "onnxruntime"), ClusterSettings()) == {}
    # TensorRT's backend declares a GPU; the matrix may ask for more, and adds a Mac for Core ML.
    assert backend_resources(("tensorrt",), ClusterSettings()) == {"GPU": 1.0}
    assert backend_resources(("tensorrt",), settings) == {"GPU": 2.0}
    assert backend_resources(("coreml", "coreml"), settings) == {"macos": 1.0}


def test_a_request_no_node_can_hold_is_refused_before_ray_waits_forever() -> None:
    fits = require_fit(Request(2.0, int(8e9)), [NODE], "building x", "here")
    assert [node["NodeID"] for node in fits] == ["n1"]
    dead = {**NODE, "Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}
    with pytest.raises(ClusterError) as caught:
        require_fit(Request(2.0, 0, {"GPU": 1.0}), [NODE, dead], "building x · trt", "here")
    message = str(caught.value)
    assert "building x · trt needs CPU 2, GPU 1, and no node of the Ray cluster at here" in message
    assert "the largest has CPU 2, memory 24.0 GB" in message


def test_a_builds_memory_is_its_largest_component_in_fp32_plus_the_overhead(
    source_dir: Callable[[str], Path],
) -> None:
    source = source_dir("hf-classifier")
    weights = list(source.glob("*.safetensors"))
    assert checkpoint_memory(source) == fp32_bytes(weights) + OVERHEAD_BYTES


def test_measuring_nodes_restore_an_artifact_they_do_not_share_from_the_cache(
    built: Callable[..., Path], tmp_path: Path
) -> None:
    from modelkiln.cluster.ray_executor import RayExecutor, _locate
    from modelkiln.loading import open_artifact

    artifact = built("hf-classifier", "vit-onnxruntime-fp32")
    cache = BuildCache(tmp_path / "cache")
    key = built_key(artifact)
    assert key is not None
    cache.store(key, artifact)
    where = RayExecutor(None, cache=cache)._whereabouts(open_artifact(artifact))
    assert _locate(where, tmp_path) == artifact  # the same kiln.json at the same path

    elsewhere = {**where, "root": str(tmp_path / "not-here" / artifact.name)}
    restored = _locate(elsewhere, tmp_path / "scratch")
    assert restored == tmp_path / "scratch" / artifact.name
    assert built_key(restored) == key
    with pytest.raises(ClusterError, match="keep artifacts on a file system every node shares"):
        _locate({**elsewhere, "cache": None}, tmp_path / "scratch-2")


def test_the_driver_takes_a_build_made_on_another_node_from_the_cache(
    built: Callable[..., Path], source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from modelkiln.cluster.ray_executor import RayExecutor

    artifact = built("hf-classifier", "vit-onnxruntime-fp32")
    key = built_key(artifact)
    cache = BuildCache(tmp_path / "cache")
    cache.store(str(key), artifact)
    source = source_dir("hf-classifier")
    job = BuildJob(
        str(source), load_profile("vit-onnxruntime-fp32"), tmp_path / "out" / "a", source
    )
    result = {"key": key, "node": "node-2"}
    executor = RayExecutor(None)
    with pytest.raises(ClusterError, match="every node shares, or give --cache URL"):
        executor._here(job, result, None)
    assert executor._here(job, result, cache) == job.target
    assert built_key(job.target) == key


def test_build_matrix_options_are_checked(tmp_path: Path) -> None:
    matrix = tmp_path / "m.toml"
    matrix.write_text('schema_version = 1\nsources = ["x"]\nprofiles = ["y"]\n')
    both = invoke("build", "src", "--matrix", matrix)
    assert both.exit_code == 2 and "drop SOURCE and the single-build options" in both.output
    neither = invoke("build")
    assert neither.exit_code == 2 and "give SOURCE and --profile PROFILE" in neither.output
    single = invoke("build", "src", "-p", "vit-onnxruntime-fp32", "--executor", "ray")
    assert single.exit_code == 2 and "are for --matrix builds" in single.output
    local = invoke("bench", "--matrix", matrix, "--address", "x:1", "-o", tmp_path / "o")
    assert local.exit_code == 1 and "--address is for --executor ray" in str(local.exception)


def test_an_unreachable_address_is_one_line_within_seconds(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    matrix = _matrix(tmp_path, source_dir("hf-classifier"))
    refused = kiln("build", "--matrix", matrix, "--executor", "ray", "--address", "127.0.0.1:1")
    assert_one_line_error(refused, "cannot reach a Ray cluster at 127.0.0.1:1", "ray start")
    malformed = kiln("build", "--matrix", matrix, "--executor", "ray", "--address", "host:port")
    assert_one_line_error(malformed, "give HOST:PORT")


# --- a local Ray cluster of 2 CPUs -----------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=150 * 2**20,
    )
    yield
    ray.shutdown()


def _matrix(folder: Path, source: Path, ray_table: str = "build_cpus = 1") -> Path:
    data = folder / "data"
    rng = np.random.default_rng(3)
    for label in ("0", "1"):
        (data / label).mkdir(parents=True, exist_ok=True)
        for index in range(4):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / label / f"{index}.png")
    matrix = folder / "matrix.toml"
    matrix.write_text(
        f"""schema_version = 1
sources = ["{source}"]
profiles = ["vit-onnxruntime-fp32", "vit-openvino-fp32"]
[build]
output = "built"
[bench]
batch_sizes = [1, 2]
warmup = 1
runs = 3
data = "data"
isolate = false
[ray]
{ray_table}
""",
        encoding="utf-8",
    )
    return matrix


def test_a_matrix_on_ray_reports_what_local_execution_reports(
    ray_cluster: None, source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    matrix = _matrix(tmp_path, source_dir("hf-classifier"))
    on_ray = invoke("bench", "--matrix", matrix, "--executor", "ray", "-o", tmp_path / "ray")
    assert on_ray.exit_code == 0, on_ray.output
    manifests = sorted((tmp_path / "built").glob("*/*/kiln.json"))
    assert len(manifests) == 2
    stamps = [path.stat().st_mtime_ns for path in manifests]
    here = invoke("bench", "--matrix", matrix, "-o", tmp_path / "local")
    assert here.exit_code == 0, here.output
    assert [path.stat().st_mtime_ns for path in manifests] == stamps  # Ray's builds reused

    def read(name: str) -> list[dict[str, object]]:
        report = json.loads((tmp_path / name / "report.json").read_text(encoding="utf-8"))
        entries: list[dict[str, object]] = report["entries"]
        return entries

    ray_entries, local_entries = read("ray"), read("local")
    assert [e["key"] for e in ray_entries] == [e["key"] for e in local_entries]
    assert len(ray_entries) == 4
    assert [e["accuracy"] for e in ray_entries] == [e["accuracy"] for e in local_entries]
    assert [e["name"] for e in ray_entries] == [e["name"] for e in local_entries]
    assert all(e["node"]["hostname"] for e in ray_entries)  # type: ignore[index]
    assert all("node" not in e for e in local_entries)

    # kiln build --matrix on the cluster: everything is up to date, nothing is rebuilt.
    again = invoke("build", "--matrix", matrix, "--executor", "ray")
    assert again.exit_code == 0, again.output
    assert again.output.count("built ") == 2
    assert [path.stat().st_mtime_ns for path in manifests] == stamps


def test_an_impossible_request_and_a_timeout_end_in_one_line(
    ray_cluster: None, source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    source = source_dir("hf-classifier")
    greedy = _matrix(tmp_path / "greedy", source, "build_cpus = 64")
    refused = invoke("build", "--matrix", greedy, "--executor", "ray")
    assert refused.exit_code == 1
    assert isinstance(refused.exception, ClusterError)
    message = str(refused.exception)
    assert "needs CPU 64, memory" in message and "no node of the Ray cluster" in message
    assert "the largest has CPU 2" in message

    hurried = _matrix(tmp_path / "hurried", source, "build_cpus = 1\ntimeout_s = 0.5")
    late = invoke("build", "--matrix", hurried, "--executor", "ray")
    assert late.exit_code == 1
    assert isinstance(late.exception, ClusterError)
    assert "2 of 2 builds did not finish within 0.5 s" in str(late.exception)
    assert not list((tmp_path / "hurried" / "built").glob("*/*/kiln.json"))
