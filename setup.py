"""Only for the optional compiled hot loop (cffi); everything else is in pyproject.toml."""

from __future__ import annotations

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """emuprobe._hotloop is an optimisation with a Python fallback: a machine
    without a C compiler or Python headers installs without it."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure means: no hot loop
            print(f"emuprobe: building the compiled hot loop failed ({e}); using Python only")

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"emuprobe: building {ext.name} failed ({e}); using Python only")


setup(
    cffi_modules=["emuprobe/engine/hotloop_build.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
)
