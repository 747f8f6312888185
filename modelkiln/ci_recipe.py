"""`kiln ci init`: the regression gate as a CI job (GitHub Actions or GitLab CI).

The job docs/benchmarking.md describes: build the candidate with a shared build cache, fetch
the last release's artifact, time the two paired on the same runner (`kiln compare --rerun`),
and keep the JUnit file, the Markdown summary and the plot whatever the outcome.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from modelkiln.errors import InputError

PROVIDERS = {"github": ".github/workflows/kiln-gate.yml", "gitlab": ".gitlab-ci.yml"}
# The building extra of each format's writer (pyproject.toml).
BUILD_EXTRAS = {
    "onnx": "onnx",
    "openvino": "openvino-build",
    "coreml": "coreml-build",
    "tensorrt": "tensorrt",
    "torch": "build",
}
# fsspec's package for each store scheme a cache URL may use.
STORE_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


@dataclass(frozen=True)
class Recipe:
    source: str  # what to build: a folder in the repository, or a hub id
    profile: str
    baseline: str  # the last release's artifact: a folder on the runner, or a store URL
    cache: str  # the build cache every job shares: a store URL
    batch_sizes: str = "1,8"
    package: str = "modelkiln"  # what pip installs ("modelkiln @ git+https://...")

    def install(self) -> str:
        from modelkiln.plan import load_profile

        format = load_profile(self.profile).export.format
        extras = sorted({BUILD_EXTRAS.get(format, "build"), "bench"})
        # Extras go after the name, before a direct reference: "name[extras] @ URL".
        name, at, url = self.package.partition(" @ ")
        packages = [f"{name.strip()}[{','.join(extras)}]{at}{url}"]
        for location in (self.cache, self.baseline):
            scheme = location.split("://", 1)[0] if "://" in location else ""
            if scheme in STORE_PACKAGES and STORE_PACKAGES[scheme] not in packages:
                packages.append(STORE_PACKAGES[scheme])
        return "pip install " + " ".join(shlex.quote(p) for p in packages)

    def steps(self) -> list[str]:
        """The job's shell commands, in order."""
        quote = shlex.quote
        build = (
            f"kiln build {quote(self.source)} -p {quote(self.profile)} -o candidate "
            f"--cache {quote(self.cache)}"
        )
        compare = (
            f"kiln compare baseline candidate --rerun --batch-size {self.batch_sizes} "
            "--junit gate.xml --markdown gate.md --plot gate.png"
        )
        return [self.install(), build, self._fetch_baseline(), compare]

    def _fetch_baseline(self) -> str:
        if "://" not in self.baseline:
            return f"cp -r {shlex.quote(self.baseline)} baseline"
        # fsspec comes with modelkiln's build extras: any store the cache can use.
        script = (
            "import fsspec, sys; fs, root = fsspec.core.url_to_fs(sys.argv[1]); "
            'fs.get(root.rstrip("/") + "/", "baseline/", recursive=True)'
        )
        return f"python -c {shlex.quote(script)} {shlex.quote(self.baseline)}"


def render(provider: str, recipe: Recipe) -> str:
    """The CI file for `provider`, as text."""
    steps = recipe.steps()
    header = (
        "# Written by `kiln ci init`: build the candidate with the shared build cache, time it\n"
        "# paired against the last release's artifact on this runner, fail on a regression.\n"
    )
    if provider == "github":
        runs = "".join(f"      - run: {_yaml(step)}\n" for step in steps)
        return (
            f"{header}name: kiln gate\non: [pull_request]\njobs:\n  gate:\n"
            "    runs-on: ubuntu-latest\n    steps:\n      - uses: actions/checkout@v4\n"
            "      - uses: actions/setup-python@v5\n        with: {python-version: '3.11'}\n"
            f"{runs}"
            '      - run: cat gate.md >> "$GITHUB_STEP_SUMMARY"\n        if: always()\n'
            "      - uses: actions/upload-artifact@v4\n        if: always()\n"
            "        with: {name: kiln-gate, path: 'gate.*'}\n"
        )
    if provider == "gitlab":
        script = "".join(f"    - {_yaml(step)}\n" for step in steps)
        return (
            f"{header}kiln-gate:\n  image: python:3.11\n  script:\n{script}"
            "  artifacts:\n    when: always\n    paths: [gate.md, gate.xml, gate.png]\n"
            "    reports:\n      junit: gate.xml\n"
        )
    raise InputError(f"unknown CI provider '{provider}'; choose one of {', '.join(PROVIDERS)}")


def _yaml(command: str) -> str:
    """A shell command as one YAML scalar: single-quoted, its quotes doubled."""
    return "'" + command.replace("'", "''") + "'"


__all__ = ["PROVIDERS", "Recipe", "render"]
