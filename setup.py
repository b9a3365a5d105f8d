"""Builds the Go extension of self_limiters with gopy during ``pip install .``.

gopy and goimports come from the versions pinned by the tool directives of go.mod and are built
into _build/gotools. gopy runs goimports by name, so that folder goes first on PATH, and it runs
the generated build script with the interpreter of this build, which has pybindgen from
pyproject.toml's build requirements.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class BuildGoExtension(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if shutil.which("go") is None:
            raise RuntimeError("building self_limiters needs the Go toolchain (go 1.26 or newer) on PATH")
        tools = ROOT / "_build" / "gotools"
        # Inside the Go module, which gopy's go build needs; Go patterns such as ./... skip folders whose
        # name starts with "_", so the generated package stays out of go vet and go test. A folder
        # per build keeps builds that run at the same time apart.
        (ROOT / "_build").mkdir(exist_ok=True)
        output = Path(tempfile.mkdtemp(prefix="gopy-", dir=ROOT / "_build"))
        try:
            self._build_into(ext, tools, output)
        finally:
            shutil.rmtree(output, ignore_errors=True)

    def _build_into(self, ext: Extension, tools: Path, output: Path) -> None:
        env = dict(os.environ, PATH=f"{tools}{os.pathsep}{os.environ.get('PATH', '')}")

        self._run(["go", "build", "-o", f"{tools}{os.sep}", "github.com/go-python/gopy", "golang.org/x/tools/cmd/goimports"], env)
        self._run(
            [str(tools / "gopy"), "build", f"-vm={sys.executable}", f"-output={output}", "-name=slbridge", "-no-make", "./pybridge"],
            env,
        )

        built = sorted(output.glob("_slbridge.*.so"))
        if not built:
            raise RuntimeError(f"gopy build produced no _slbridge extension in {output}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)

    @staticmethod
    def _run(command: list, env: dict) -> None:
        print("running", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, env=env, check=True)


setup(
    ext_modules=[Extension("self_limiters._slbridge", sources=[])],
    cmdclass={"build_ext": BuildGoExtension},
)
