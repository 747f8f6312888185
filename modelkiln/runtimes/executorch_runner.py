"""The runner section of an executorch bundle's README: its programs run with ExecuTorch's own
APIs, without modelkiln, written from kiln.json (component names, entries, inputs' names,
dtypes and shapes, the outputs' order).

- Android: the AAR's `org.pytorch.executorch` classes, as ExecuTorch 1.4 and 1.5 define them
  (extension/android/executorch_android/src/main/java/org/pytorch/executorch/): Module.kt
  (`Module.load(path)`, `forward(vararg EValue): Array<EValue>`), Tensor.kt
  (`Tensor.fromBlob(FloatArray, LongArray)` and its overloads, `dataAsFloatArray`, ...) and
  EValue.kt (`EValue.from(Tensor)`, `toTensor()`). Kotlin sources with @JvmStatic factories, so
  Java calls the same names (`getDataAsFloatArray()`).
- Linux and macOS: the C++ `executorch::extension::Module` (extension/module/module.h) with
  `make_tensor_ptr` (extension/tensor/tensor_ptr.h), linked against the CMake package the pip
  wheel ships (docs/source/using-executorch-cpp.md: `find_package(executorch ...)`,
  `executorch::runtime`, `executorch::kernels_optimized`, `executorch::backend_xnnpack`), and
  the wheel's Python `executorch.runtime`.

Torch-free: it only writes text.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple

from modelkiln.records import ComponentRecord, Manifest
from modelkiln.specs import Dim, TensorSpec

# Where the pip runtime (and its C++ package) deploys; the other target is Android's AAR.
DESKTOP_TARGETS = ("linux-x86_64", "linux-aarch64", "macos")


class Kind(NamedTuple):
    """How one numpy dtype is written in each language."""

    kotlin_array: str  # the array Tensor.fromBlob takes
    kotlin_factory: str  # Tensor.fromBlob, or fromBlobUnsigned for uint8
    kotlin_getter: str  # the Tensor property that returns its data
    cpp: str  # the element type of make_tensor_ptr's std::vector
    torch: str


KINDS = {
    "float32": Kind("FloatArray", "fromBlob", "dataAsFloatArray", "float", "torch.float32"),
    "float64": Kind("DoubleArray", "fromBlob", "dataAsDoubleArray", "double", "torch.float64"),
    # Tensor.fromBlob(ShortArray) holds IEEE half bits.
    "float16": Kind(
        "ShortArray", "fromBlob", "dataAsShortArray", "executorch::aten::Half", "torch.float16"
    ),
    "int64": Kind("LongArray", "fromBlob", "dataAsLongArray", "int64_t", "torch.int64"),
    "int32": Kind("IntArray", "fromBlob", "dataAsIntArray", "int32_t", "torch.int32"),
    "int8": Kind("ByteArray", "fromBlob", "dataAsByteArray", "int8_t", "torch.int8"),
    "uint8": Kind(
        "ByteArray", "fromBlobUnsigned", "dataAsUnsignedByteArray", "uint8_t", "torch.uint8"
    ),
}


def example_size(dim: Dim) -> int:
    """The size a README example gives a dim: itself, or 1 per symbolic name ("batch * 2": 2)."""
    if isinstance(dim, int):
        return dim
    parts = dim.split()
    return int(parts[2]) if len(parts) == 3 and parts[1] == "*" and parts[2].isdigit() else 1


def example_sizes(spec: TensorSpec) -> list[int]:
    """The shape an example feeds ([] for a scalar, the UNet's timestep: the program takes it
    0-d, as kiln.json records it)."""
    return [example_size(d) for d in spec.shape]


def element_count(sizes: list[int]) -> str:
    """The number of elements as the snippets write it ("1" for a scalar)."""
    return " * ".join(map(str, sizes)) or "1"


def shape_text(spec: TensorSpec) -> str:
    scalar = ": a scalar" if not spec.shape else ""
    return f"{spec.dtype} [{', '.join(str(d) for d in spec.shape)}]{scalar}"


def camel(name: str) -> str:
    head, *rest = re.split(r"[^0-9A-Za-z]+", name)
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


class Names:
    """Variable names for the snippets: a tensor's own name unless another component uses it
    too (the UNet's and the VAE's `sample`), then prefixed with its component's."""

    def __init__(self, manifest: Manifest) -> None:
        used = Counter(
            name
            for record in manifest.components.values()
            for name in (*record.inputs, *record.outputs)
        )
        self._shared = {name for name, count in used.items() if count > 1} | set(
            manifest.components
        )

    def tensor(self, component: str, name: str) -> str:
        return f"{component}_{name}" if name in self._shared else name


def runner_readme(
    target: str,
    manifest: Manifest,
    *,
    aar: str,
    aar_version: str,
    pip_runtime: str,
    xnnpack: bool,
) -> str:
    """The README's runner section for a bundle of manifest's programs on target: the Android
    AAR `aar` at `aar_version`, else the pip runtime (with its C++ package)."""
    if target == "android":
        return "\n".join(_android(manifest, aar, aar_version))
    if target in DESKTOP_TARGETS:
        return "\n".join(_desktop(target, manifest, pip_runtime, xnnpack))
    return ""


def _provenance(manifest: Manifest, runtime: str | None = None) -> str:
    """What ran the programs before they were packed, and the `runtime` that did not."""
    exported = f"Exported by ExecuTorch {manifest.versions.get('executorch', '(unrecorded)')}"
    not_run = [
        f"{name}: {record.validation.not_run}"
        for name, record in manifest.components.items()
        if record.validation.passed is None
    ]
    if not_run:
        return f"{exported}; not validated ({'; '.join(not_run)})."
    machine = manifest.build.host.get("machine", "unrecorded")
    validated = (
        f"{exported} and validated against torch with ExecuTorch's Python runtime on the build "
        f"machine ({machine})"
    )
    return f"{validated}; {runtime} itself has not run them." if runtime else f"{validated}."


# Where each program's delegation record is, and what it is for beyond modelkiln's `info`.
DELEGATION = (
    "`delegation.json` beside each program lists what the delegate took and the ops left on "
    "the portable kernels: a runtime built with selected kernels must register those."
)


def _batch_note(manifest: Manifest) -> list[str]:
    symbolic = sorted(
        {
            dim.split()[0]
            for record in manifest.components.values()
            for spec in record.inputs.values()
            for dim in spec.symbolic_dims
        }
    )
    if not symbolic:
        return []
    names = ", ".join(f"`{name}`" for name in symbolic)
    return [
        f"The examples give {names} its smallest size. ExecuTorch plans each program's memory "
        "for the largest batch it was built for (the build's `shapes.max_batch_size` images "
        f"per call, {manifest.profile.shapes.max_batch_size} here) and refuses a larger one.",
        "",
    ]


def _android(manifest: Manifest, aar: str, version: str) -> list[str]:
    names = Names(manifest)
    code = [
        "import java.io.File",
        "import org.pytorch.executorch.EValue",
        "import org.pytorch.executorch.Module",
        "import org.pytorch.executorch.Tensor",
        "",
        "// In an Activity, or another Context: filesDir is the app's storage.",
    ]
    for index, (name, record) in enumerate(manifest.components.items()):
        code += [*([""] if index else []), *_kotlin(name, record, names)]
    return [
        "### Android: ExecuTorch's AAR",
        "",
        f"Add the runtime to the app's `build.gradle.kts` (its libraries are arm64-v8a and "
        f"x86_64). A program needs a runtime at least as new as the ExecuTorch that exported "
        f"it. {_provenance(manifest, 'the AAR')}",
        "",
        "```kotlin",
        "dependencies {",
        f'    implementation("{aar}:{version}")',
        "}",
        "```",
        "",
        "`Module.load` takes a path on the device: copy each `.pte` into the app's storage "
        "first (from its assets or a download), keeping the bundle's paths. `forward` returns "
        f"the outputs in the order below. {DELEGATION}",
        "",
        *_batch_note(manifest),
        "```kotlin",
        *code,
        "```",
        "",
        "From Java the calls are the same: `Module.load(path)`, "
        "`Tensor.fromBlob(new float[n], new long[] {...})`, `EValue.from(tensor)`, "
        "`outputs[0].toTensor().getDataAsFloatArray()`.",
        "",
    ]


def _kotlin(component: str, record: ComponentRecord, names: Names) -> list[str]:
    module = camel(component)
    lines = [
        f"// {component}: {record.entry}",
        f'val {module} = Module.load(File(filesDir, "{record.entry}").absolutePath)',
    ]
    arguments = []
    for name, spec in record.inputs.items():
        variable = camel(names.tensor(component, name))
        kind = KINDS.get(spec.dtype)
        if kind is None:
            lines.append(f"// {name}: {shape_text(spec)}, a dtype Tensor.fromBlob does not take")
            continue
        sizes = example_sizes(spec)
        count = element_count(sizes)
        shape = ", ".join(map(str, sizes))
        lines.append(
            f"val {variable} = Tensor.{kind.kotlin_factory}({kind.kotlin_array}({count}), "
            f"longArrayOf({shape}))  // {shape_text(spec)}"
        )
        arguments.append(f"EValue.from({variable})")
    outputs = f"{module}Outputs"
    lines.append(f"val {outputs} = {module}.forward({', '.join(arguments)})")
    for index, (name, spec) in enumerate(record.outputs.items()):
        getter = KINDS[spec.dtype].kotlin_getter if spec.dtype in KINDS else "toString()"
        variable = camel(names.tensor(component, name))
        lines.append(
            f"val {variable} = {outputs}[{index}].toTensor().{getter}  // {shape_text(spec)}"
        )
    return lines


def _desktop(target: str, manifest: Manifest, pip_runtime: str, xnnpack: bool) -> list[str]:
    names = Names(manifest)
    quantized = any(record.quantization is not None for record in manifest.components.values())
    components = ["kernels_optimized"]
    components += ["backend_xnnpack"] if xnnpack else []
    # A quantized program can keep quantize / dequantize ops outside the delegate.
    components += ["kernels_quantized"] if quantized else []
    python = [
        "import torch",
        "from executorch.runtime import Runtime",
        "",
        "runtime = Runtime.get()",
    ]
    cpp = [
        "// main.cpp",
        "#include <executorch/extension/module/module.h>",
        "#include <executorch/extension/tensor/tensor.h>",
        "",
        "using namespace ::executorch::extension;",
        "",
        "int main() {",
    ]
    for index, (name, record) in enumerate(manifest.components.items()):
        python += ["", *_python(name, record, names)]
        cpp += [*([""] if index else []), *(f"  {line}" for line in _cpp(name, record, names))]
    cpp += ["  return 0;", "}"]
    prefix = (
        "python -c 'import executorch, pathlib; "
        'print(pathlib.Path(executorch.__path__[0]) / "share" / "cmake")\''
    )
    return [
        f"### {target}: ExecuTorch's Python and C++ runtimes",
        "",
        f"The pip wheel (`pip install '{pip_runtime}' torch`: its Python API takes torch "
        "tensors) runs the programs from Python, from the unpacked bundle (the paths are "
        f"relative to it). {_provenance(manifest)} {DELEGATION}",
        "",
        *_batch_note(manifest),
        "```python",
        *python,
        "```",
        "",
        "The wheel also ships the C++ runtime, its headers and a CMake package: a program of "
        "your own loads each `.pte` with `executorch::extension::Module`.",
        "",
        "```cmake",
        "cmake_minimum_required(VERSION 3.28)",
        "project(app CXX)",
        f"find_package(executorch REQUIRED COMPONENTS {' '.join(components)})",
        "add_executable(app main.cpp)",
        "target_link_libraries(app PRIVATE executorch::runtime "
        + " ".join(f"executorch::{c}" for c in components)
        + ")",
        "```",
        "",
        "```cpp",
        *cpp,
        "```",
        "",
        f'Configure with `cmake -S . -B build -DCMAKE_PREFIX_PATH="$({prefix})"`, build, and '
        "run it from the unpacked bundle.",
        "",
    ]


def _python(component: str, record: ComponentRecord, names: Names) -> list[str]:
    lines = [
        f"# {component}: {record.entry}",
        f'{component} = runtime.load_program("{record.entry}").load_method("forward")',
    ]
    arguments = []
    for name, spec in record.inputs.items():
        variable = names.tensor(component, name)
        sizes = tuple(example_sizes(spec))
        dtype = KINDS[spec.dtype].torch if spec.dtype in KINDS else f"torch.{spec.dtype}"
        lines.append(f"{variable} = torch.zeros({sizes!r}, dtype={dtype})  # {shape_text(spec)}")
        arguments.append(variable)
    outputs = [names.tensor(component, name) for name in record.outputs]
    lines.append(f"{', '.join(outputs)}, *_ = {component}.execute([{', '.join(arguments)}])")
    return lines


def _cpp(component: str, record: ComponentRecord, names: Names) -> list[str]:
    lines = [f"// {component}: {record.entry}", f'Module {component}("{record.entry}");']
    arguments = []
    for name, spec in record.inputs.items():
        variable = names.tensor(component, name)
        kind = KINDS.get(spec.dtype)
        element = kind.cpp if kind is not None else spec.dtype
        sizes = example_sizes(spec)
        data = f"std::vector<{element}>({element_count(sizes)})"
        # A std::vector<uint8_t> picks the raw-bytes overload, whose type defaults to Float.
        data += ", executorch::aten::ScalarType::Byte" if spec.dtype == "uint8" else ""
        value = f"make_tensor_ptr({{{', '.join(map(str, sizes))}}}, {data})"
        lines.append(f"auto {variable} = {value};  // {shape_text(spec)}")
        arguments.append(variable)
    result = f"{component}_outputs"
    # One input goes as itself: a one-element braced list is ambiguous between forward(EValue)
    # and forward(std::vector<EValue>).
    feed = arguments[0] if len(arguments) == 1 else f"{{{', '.join(arguments)}}}"
    lines.append(f"const auto {result} = {component}.forward({feed});")
    lines.append(f"if (!{result}.ok()) return 1;")
    for index, (name, spec) in enumerate(record.outputs.items()):
        kind = KINDS.get(spec.dtype)
        element = kind.cpp if kind is not None else spec.dtype
        variable = names.tensor(component, name)
        lines.append(
            f"const auto* {variable} = {result}->at({index}).toTensor()"
            f".const_data_ptr<{element}>();  // {shape_text(spec)}"
        )
    return lines
