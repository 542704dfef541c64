"""The CUDA sources: constants agree with kernels/spec.py, each compiles, the launcher knows each."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kernels import KernelUnavailable, select_kernels
from kernels.cuda import MODULES, SOURCES, defines, module_source


def test_header_defaults_are_the_spec():
    header = (SOURCES / "descriptor.cuh").read_text()
    defaults = dict(re.findall(r"#define (\w+) (\d+)", header))
    for flag in defines():
        name, value = flag[2:].split("=")
        assert defaults[name] == value, f"descriptor.cuh says {name}={defaults[name]}, spec says {value}"


def test_launcher_loads_every_source():
    assert sorted(MODULES) == sorted(p.stem for p in SOURCES.glob("*.cu"))
    for module in MODULES:
        assert '#include "descriptor.cuh"' not in module_source(module)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("module", MODULES)
def test_each_source_compiles_as_the_launcher_compiles_it(module, tmp_path: Path):
    source = tmp_path / f"{module}.cu"
    source.write_text(module_source(module))
    subprocess.run(
        ["nvcc", "--cubin", "-arch=sm_90", *defines(), "-o", str(tmp_path / "out.cubin"), str(source)],
        check=True,
        capture_output=True,
    )


def test_auto_falls_back_to_the_cpu_reference_without_a_gpu_and_cuda_insists():
    try:
        cuda = select_kernels("cuda")
    except KernelUnavailable as exc:
        assert "PyCUDA" in str(exc) or "CUDA" in str(exc)
        assert select_kernels("auto").name == "cpu"
    else:
        assert cuda.name == "cuda" and select_kernels("auto").name == "cuda"
    assert select_kernels("cpu").name == "cpu"
    with pytest.raises(ValueError, match="not one of"):
        select_kernels("opencl")
